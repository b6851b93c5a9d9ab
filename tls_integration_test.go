package clusterpool_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clustertest"
)

// tlsPassword is in every connection string of the TLS tests (trust auth
// ignores it) so that an error which printed the connection string would
// show it.
const tlsPassword = "s3cr3tpw"

// tlsParams make a few seconds of test stand for many probe and balance
// rounds. A probe must finish within its interval (TCP, TLS handshake,
// startup, one gossip query): 500 ms leaves room on a loaded machine, where
// 200 ms probes were seen to time out now and then.
const tlsParams = "&cluster_probe_interval=500ms" + tlsBalanceParams

const tlsBalanceParams = "&cluster_balance_interval=200ms&cluster_connect_rate=0"

// TestTLS runs the pool against a 3-node cluster whose nodes require TLS,
// with sslmode=verify-full and the cluster's CA, as a CockroachDB cluster in
// secure mode is reached. One cluster serves every subtest; each has its own
// pool.
func TestTLS(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, TLS: true})
	t.Run("LoadBalancer", func(t *testing.T) { testTLSPool(t, c, c.DSN()) })
	t.Run("Hosts", func(t *testing.T) { testTLSPool(t, c, c.HostsDSN()) })
	t.Run("RollingRestart", func(t *testing.T) { testTLSRollingRestart(t, c) })
	t.Run("WrongCA", func(t *testing.T) { testTLSWrongCA(t, c) })
	t.Run("GossipScaleOut", func(t *testing.T) { testTLSGossipScaleOut(t, c) }) // last: adds a node
}

// withPassword puts tlsPassword into one of the cluster's connection strings.
func withPassword(dsn string) string {
	return strings.Replace(dsn, "postgres://postgres@", "postgres://postgres:"+tlsPassword+"@", 1)
}

func tlsPool(t *testing.T, dsn string, conns int, params string) (*clusterpool.Pool, *probeErrors) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cfg, err := clusterpool.ParseConfig(withPassword(dsn) + fmt.Sprintf("&pool_min_conns=%d&pool_max_conns=%d", conns, conns) + params)
	if err != nil {
		t.Fatal(err)
	}
	pe := &probeErrors{}
	cfg.Tracer = pe
	p, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p, pe
}

// probeErrors keeps the errors of failed probes.
type probeErrors struct {
	mu   sync.Mutex
	errs []error
}

func (pe *probeErrors) TraceProbe(_ context.Context, _ *clusterpool.Pool, d clusterpool.TraceProbeData) {
	if d.Err != nil {
		pe.mu.Lock()
		pe.errs = append(pe.errs, d.Err)
		pe.mu.Unlock()
	}
}

func (pe *probeErrors) list() []error {
	pe.mu.Lock()
	defer pe.mu.Unlock()
	return slices.Clone(pe.errs)
}

// tlsWait polls cond every 20 ms for up to 20 s; cond returns what is still
// wrong, or "".
func tlsWait(t *testing.T, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		msg := cond()
		if msg == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met after 20 s: %s", msg)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// tlsBalanced says what keeps the pool from holding two connections on each
// of the 3 nodes, by its own count and by the servers'. A probe's connection
// may be open on a server for a moment.
func tlsBalanced(p *clusterpool.Pool, c *clustertest.Cluster) string {
	stats := p.NodeStats()
	if len(stats) != 3 {
		return fmt.Sprintf("pool knows %d nodes: %+v", len(stats), stats)
	}
	for _, s := range stats {
		if s.TotalConns != 2 || !s.Healthy {
			return fmt.Sprintf("pool's nodes %+v", stats)
		}
	}
	for id, n := range c.OpenConns() {
		if n != 2 && n != 3 {
			return fmt.Sprintf("node %d holds %d connections; servers %v", id, n, c.OpenConns())
		}
	}
	return ""
}

func totalAccepted(c *clustertest.Cluster) (sum int64) {
	for _, n := range c.Nodes() {
		sum += n.TotalConns()
	}
	return sum
}

// testTLSPool: the pool connects over verify-full TLS, identifies each
// connection's node by its BackendKey, spreads its connections evenly,
// probes without failure, and its balance rounds, which read each idle
// connection for a millisecond to find dead ones, do not break TLS
// connections: over rounds of an idle pool no connection is replaced.
func testTLSPool(t *testing.T, c *clustertest.Cluster, dsn string) {
	p, pe := tlsPool(t, dsn, 6, tlsParams)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := p.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_, isTLS := conn.Conn().PgConn().Conn().(*tls.Conn)
	conn.Release()
	if !isTLS {
		t.Fatal("pool connection is not TLS")
	}
	tlsWait(t, func() string { return tlsBalanced(p, c) })

	// Idle: only the probes open connections now. Watched over more than
	// ten of the pool's own balance rounds, and at least two successful
	// probes.
	probes, failures := p.ClusterStat().Probes(), p.ClusterStat().ProbeFailures()
	accepted, opened, rounds := totalAccepted(c), p.Stat().NewConnsCount(), p.ClusterStat().BalanceRounds()
	tlsWait(t, func() string {
		if n := p.ClusterStat().BalanceRounds() - rounds; n < 11 {
			return fmt.Sprintf("%d balance rounds so far", n)
		}
		if n := p.ClusterStat().Probes() - p.ClusterStat().ProbeFailures() - (probes - failures); n < 2 {
			return fmt.Sprintf("%d probes succeeded so far", n)
		}
		return ""
	})
	if n := p.Stat().NewConnsCount() - opened; n != 0 {
		t.Errorf("an idle pool opened %d connections over several balance rounds: the idle check broke TLS connections? nodes %+v", n, p.NodeStats())
	}
	// Each probe is one connection; one may be in flight at either end.
	dProbes, dAccepted := p.ClusterStat().Probes()-probes, totalAccepted(c)-accepted
	if dAccepted > dProbes+1 {
		t.Errorf("servers accepted %d connections during %d probes of an idle pool", dAccepted, dProbes)
	}
	// A probe has min(interval, 5 s) = 500 ms for TCP, the TLS handshake,
	// startup and the gossip query; on a loaded machine one may run out of
	// time, which says nothing about TLS. Any other failure does.
	for _, err := range pe.list() {
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("a probe failed over TLS other than by its timeout: %v", err)
		}
	}
	if msg := tlsBalanced(p, c); msg != "" {
		t.Error(msg)
	}
	var one int
	if err := p.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("SELECT 1: %v %d", err, one)
	}
	t.Logf("%s: nodes %+v; %d probes, %d redials", dsn, p.NodeStats(), p.ClusterStat().Probes(), p.ClusterStat().Redials())
}

// testTLSRollingRestart drains (500 ms connection wait) and restarts each
// node in turn under a read-only load: no caller sees an error, and each
// node is used again after its restart.
func testTLSRollingRestart(t *testing.T, c *clustertest.Cluster) {
	// Probe failures are not counted here, and 200 ms probes find a
	// restarted node sooner.
	p, _ := tlsPool(t, c.DSN(), 6, "&cluster_probe_interval=200ms"+tlsBalanceParams)
	tlsWait(t, func() string { return tlsBalanced(p, c) })
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var ops atomic.Int64
	var mu sync.Mutex
	var errs []error
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				var one int
				err := p.QueryRow(ctx, "SELECT 1").Scan(&one)
				cancel()
				ops.Add(1)
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		})
	}
	for _, n := range c.Nodes() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		err := n.Drain(ctx, 500*time.Millisecond)
		if err == nil {
			err = n.Restart(ctx)
		}
		cancel()
		if err != nil {
			close(stop)
			wg.Wait()
			t.Fatalf("node %d: %v", n.ID(), err)
		}
		// The pool uses the node again before the next one goes.
		tlsWait(t, func() string {
			for _, s := range p.NodeStats() {
				if int(s.ID) == n.ID() && s.Healthy && s.TotalConns > 0 {
					return ""
				}
			}
			return fmt.Sprintf("the pool holds no connection on restarted node %d: %+v", n.ID(), p.NodeStats())
		})
	}
	close(stop)
	wg.Wait()
	t.Logf("rolling restart over TLS: %d queries, %d errors, %d redials; nodes %+v", ops.Load(), len(errs), p.ClusterStat().Redials(), p.NodeStats())
	if len(errs) > 0 {
		t.Errorf("callers saw %d errors, first: %v", len(errs), errs[0])
	}
	tlsWait(t, func() string { return tlsBalanced(p, c) })
}

// testTLSWrongCA: with a CA that did not sign the nodes' certificate, the
// first use fails with x509's unknown-authority error, and the error does
// not carry the password.
func testTLSWrongCA(t *testing.T, c *clustertest.Cluster) {
	wrong := filepath.Join(t.TempDir(), "wrong-ca.pem")
	if err := os.WriteFile(wrong, otherCA(t), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, dsn := range []string{c.DSN(), c.HostsDSN()} {
		dsn = strings.Replace(dsn, url.QueryEscape(c.CAFile()), url.QueryEscape(wrong), 1)
		if !strings.Contains(dsn, "wrong-ca.pem") {
			t.Fatalf("could not swap the CA in %s", dsn)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		p, err := clusterpool.New(ctx, withPassword(dsn)+tlsParams)
		if err != nil {
			cancel()
			t.Fatal(err) // New does not connect without MinConns
		}
		err = p.Ping(ctx)
		_, acqErr := p.Acquire(ctx)
		_, execErr := p.Exec(ctx, "SELECT 1")
		cancel()
		stat := p.ClusterStat()
		p.Close()
		for what, err := range map[string]error{"Ping": err, "Acquire": acqErr, "Exec": execErr} {
			var unknown x509.UnknownAuthorityError
			if !errors.As(err, &unknown) || !strings.Contains(err.Error(), "certificate signed by unknown authority") {
				t.Errorf("%s: %s error %v, want x509.UnknownAuthorityError", dsn, what, err)
			}
			if err != nil && strings.Contains(err.Error(), tlsPassword) {
				t.Errorf("%s: %s error shows the password: %v", dsn, what, err)
			}
		}
		// At once: one attempt per call, no retry, and no node blamed for
		// the client's configuration.
		if n, e := stat.RetryAttempts(), stat.Evictions(); n != 0 || e != 0 {
			t.Errorf("%s: a wrong CA cost %d retries and %d evictions, want none", dsn, n, e)
		}
	}
}

// otherCA returns the PEM certificate of a CA made up here, which signed
// nothing the cluster presents.
func otherCA(t *testing.T) []byte {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "not the cluster's CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// TestTLSWrongCANotRetried fails until Classify (retry.go) classes a failed
// certificate verification as permanent. A certificate the client cannot verify is a
// configuration error, the same on every node and every attempt, like a
// failed authentication (28P01), which is not retried either. One attempt
// already tries every host of the connection string, or several dials
// behind one address, so retrying only multiplies the handshakes and
// delays the error.
func TestTLSWrongCANotRetried(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2, TLS: true, InProcess: true})
	wrong := filepath.Join(t.TempDir(), "wrong-ca.pem")
	if err := os.WriteFile(wrong, otherCA(t), 0o644); err != nil {
		t.Fatal(err)
	}
	dsn := strings.Replace(c.DSN(), url.QueryEscape(c.CAFile()), url.QueryEscape(wrong), 1)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	p, err := clusterpool.New(ctx, withPassword(dsn)+tlsParams)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	_, err = p.Exec(ctx, "SELECT 1")
	var unknown x509.UnknownAuthorityError
	if !errors.As(err, &unknown) {
		t.Fatalf("Exec: %v, want x509.UnknownAuthorityError", err)
	}
	if class := clusterpool.Classify(err); class != clusterpool.ClassPermanent {
		t.Errorf("Classify = %v, want permanent", class)
	}
	if n := p.ClusterStat().RetryAttempts(); n != 0 {
		t.Errorf("%d retries of a certificate error: %v", n, err)
	}
}

// testTLSGossipScaleOut: a node added after the pool started is missing from
// the pool's connection string; the pool learns its address from the gossip
// tables (made up on each PostgreSQL server, as CockroachDB shows them) and
// dials it with the same verify-full TLS settings. A learned host without
// TLS would be refused with 28000 and the node would get nothing.
func testTLSGossipScaleOut(t *testing.T, c *clustertest.Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// The gossip tables exist before the pool starts, as crdb_internal does
	// on CockroachDB: a pool whose first read finds no table (42P01) takes
	// the server for one without gossip and stops asking for ten minutes
	// (gossipBackoff), so a pool made first would race SetGossip.
	if err := c.SetGossip(ctx, nil); err != nil {
		t.Fatal(err)
	}
	p, pe := tlsPool(t, c.HostsDSN(), 12, "&cluster_probe_interval=200ms"+tlsBalanceParams)
	tlsWait(t, func() string {
		for _, s := range p.NodeStats() {
			if s.TotalConns != 4 {
				return fmt.Sprintf("pool's nodes %+v", p.NodeStats())
			}
		}
		return ""
	})
	n4, err := c.AddNode(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetGossip(ctx, nil); err != nil {
		t.Fatal(err)
	}
	tlsWait(t, func() string {
		if k := n4.OpenConns(); k < 3 {
			return fmt.Sprintf("node 4, known only from gossip, holds %d connections; servers %v; probe errors %v", k, c.OpenConns(), pe.list())
		}
		for _, s := range p.NodeStats() {
			if int(s.ID) == n4.ID() && s.TotalConns >= 3 {
				return ""
			}
		}
		return fmt.Sprintf("the pool does not count node 4's connections: %+v", p.NodeStats())
	})
}
