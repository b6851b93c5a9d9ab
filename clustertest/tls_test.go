package clustertest

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// isTLS reports whether conn reached its server over TLS.
func isTLS(conn *pgx.Conn) bool {
	_, ok := conn.PgConn().Conn().(*tls.Conn)
	return ok
}

// TestTLSVerifyFull connects with the cluster's own DSNs (verify-full with
// its CA) through the load balancer, every host and each node proxy, with an
// SSLRequest and directly: TLS is in use, and the proxy still rewrites the
// BackendKey and adds crdb_version behind it.
func TestTLSVerifyFull(t *testing.T) {
	for _, inProcess := range []bool{true, false} {
		if !inProcess {
			requirePostgres(t)
		}
		c := New(t, Options{Nodes: 2, TLS: true, InProcess: inProcess})
		ctx := testCtx(t)
		if c.CAFile() == "" || !strings.Contains(c.DSN(), "sslmode=verify-full&sslrootcert=") {
			t.Fatalf("CAFile %q, DSN %s", c.CAFile(), c.DSN())
		}
		if pem, err := os.ReadFile(c.CAFile()); err != nil || !strings.Contains(string(pem), "BEGIN CERTIFICATE") {
			t.Fatalf("CA file: %v %q", err, pem)
		}
		dsns := []string{c.DSN(), c.HostsDSN(), c.DSN() + "&sslnegotiation=direct"}
		for _, n := range c.Nodes() {
			dsns = append(dsns, n.DSN(), n.DSN()+"&sslnegotiation=direct")
		}
		for _, dsn := range dsns {
			conn := connect(t, ctx, dsn)
			if !isTLS(conn) {
				t.Fatalf("%s: connection is not TLS", dsn)
			}
			pid := conn.PgConn().PID()
			if n := c.Node(int(pid >> 20)); n == nil {
				t.Errorf("%s: PID %#x names no node: BackendKey not rewritten", dsn, pid)
			}
			if v := conn.PgConn().ParameterStatus("crdb_version"); v != DefaultCrdbVersion {
				t.Errorf("%s: crdb_version %q", dsn, v)
			}
			var one int
			if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
				t.Fatalf("%s: SELECT 1: %v %d", dsn, err, one)
			}
		}
		// A node added later presents the same certificate.
		added, err := c.AddNode(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if conn := connect(t, ctx, added.DSN()); !isTLS(conn) {
			t.Fatal("added node: connection is not TLS")
		}
		// So is localhost (and ::1, not tested: the machine may lack IPv6).
		port := c.Node(1).Addr()[strings.LastIndexByte(c.Node(1).Addr(), ':')+1:]
		conn := connect(t, ctx, strings.Replace(c.Node(1).DSN(), c.Node(1).Addr(), "localhost:"+port, 1))
		if !isTLS(conn) {
			t.Fatal("localhost: connection is not TLS")
		}
	}
}

// TestTLSWrongCA: a client trusting another CA fails the handshake with
// x509's unknown-authority error, and the node logs nothing worse.
func TestTLSWrongCA(t *testing.T) {
	c := New(t, Options{Nodes: 1, TLS: true, InProcess: true})
	ctx := testCtx(t)
	other, err := newCertAuthority("another CA", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	otherFile := filepath.Join(t.TempDir(), "other-ca.pem")
	if err := os.WriteFile(otherFile, other.pem, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, dsn := range []string{c.DSN(), c.Node(1).DSN()} {
		dsn = strings.Replace(dsn, "sslrootcert="+url.QueryEscape(c.CAFile()), "sslrootcert="+url.QueryEscape(otherFile), 1)
		if !strings.Contains(dsn, "other-ca.pem") {
			t.Fatalf("could not swap the CA in %s", dsn)
		}
		_, err := pgx.Connect(ctx, dsn)
		var unknown x509.UnknownAuthorityError
		if !errors.As(err, &unknown) || !strings.Contains(err.Error(), "certificate signed by unknown authority") {
			t.Fatalf("%s: connect error %v, want x509.UnknownAuthorityError", dsn, err)
		}
	}
	// The cluster is unharmed.
	if conn := connect(t, ctx, c.DSN()); !isTLS(conn) {
		t.Fatal("not TLS")
	}
}

// TestTLSRequired: in TLS mode a startup without TLS is refused with FATAL
// 28000, and sslmode=prefer (TLS without verification) gets in. Outside TLS
// mode nothing changes (TestSSLRequest).
func TestTLSRequired(t *testing.T) {
	c := New(t, Options{Nodes: 1, TLS: true, InProcess: true})
	ctx := testCtx(t)
	plain := "postgres://postgres@" + c.Node(1).Addr() + "/postgres?sslmode=disable"
	_, err := pgconn.Connect(ctx, plain)
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "28000" || pgErr.Severity != "FATAL" || !strings.Contains(pgErr.Message, "SSL connection required") {
		t.Fatalf("plain startup: %v, want FATAL 28000 SSL connection required", err)
	}
	conn := connect(t, ctx, "postgres://postgres@"+c.Node(1).Addr()+"/postgres?sslmode=prefer")
	if !isTLS(conn) {
		t.Fatal("sslmode=prefer: connection is not TLS")
	}
	// GSSENCRequest (which pgx never sends) is answered 'N', and the client
	// may go on with an SSLRequest, answered 'S'.
	nc, err := net.Dial("tcp", c.Node(1).Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	for _, req := range []struct {
		code uint32
		want byte
	}{{gssEncRequestCode, 'N'}, {sslRequestCode, 'S'}} {
		pkt := binary.BigEndian.AppendUint32([]byte{0, 0, 0, 8}, req.code)
		answer := make([]byte, 1)
		if _, err := nc.Write(pkt); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(nc, answer); err != nil || answer[0] != req.want {
			t.Fatalf("request %d: answer %q, %v; want %q", req.code, answer, err, req.want)
		}
	}
}

// TestTLSPartition: a partitioned node holds the TLS handshake like any
// other byte, and a TLS connection's query, until Heal.
func TestTLSPartition(t *testing.T) {
	c := New(t, Options{Nodes: 1, TLS: true, InProcess: true})
	ctx := testCtx(t)
	n := c.Node(1)
	open := connect(t, ctx, n.DSN())
	n.Partition()
	for _, dsn := range []string{n.DSN(), n.DSN() + "&sslnegotiation=direct"} {
		short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		_, err := pgx.Connect(short, dsn)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("%s: connect to a partitioned node: %v, want a timeout", dsn, err)
		}
	}
	done := make(chan error, 1)
	go func() {
		_, err := open.Exec(ctx, "SELECT 1")
		done <- err
	}()
	n.Heal()
	if err := <-done; err != nil {
		t.Fatalf("query held by the partition: %v", err)
	}
	if conn := connect(t, ctx, n.DSN()); !isTLS(conn) {
		t.Fatal("not TLS after Heal")
	}
}

// TestTLSCancel cancels a query on a TLS connection with pgx's own
// CancelRequest (sent over TLS since pgx 5.9) and with a plain one on a
// fresh TCP connection, through the node proxy and the load balancer.
func TestTLSCancel(t *testing.T) {
	c := New(t, Options{Nodes: 2, TLS: true, Seed: 11})
	ctx := testCtx(t)
	for _, overTLS := range []bool{true, false} {
		for _, dsn := range []string{c.Node(2).DSN(), c.DSN()} {
			conn := connectCancelling(t, ctx, dsn)
			pgc := conn.PgConn()
			running, sleeping := context.WithCancel(ctx)
			go cancelWhenSleeping(ctx, c, sleeping)
			errc := make(chan error, 1)
			go func() {
				<-running.Done()
				if overTLS {
					errc <- pgc.CancelRequest(ctx)
					return
				}
				errc <- sendPlainCancel(c.lb.addr(), pgc.PID(), pgc.SecretKey())
			}()
			_, err := conn.Exec(ctx, "SELECT pg_sleep(30)")
			if err := <-errc; err != nil {
				t.Fatalf("TLS=%v %s: cancel: %v", overTLS, dsn, err)
			}
			if sqlState(err) != "57014" {
				t.Fatalf("TLS=%v %s: pg_sleep ended with %v, want SQLSTATE 57014", overTLS, dsn, err)
			}
			if err := conn.Ping(ctx); err != nil {
				t.Fatalf("connection unusable after cancel: %v", err)
			}
		}
	}
}

func sendPlainCancel(addr string, pid uint32, secret []byte) error {
	req := make([]byte, 12, 12+len(secret))
	binary.BigEndian.PutUint32(req[0:], uint32(12+len(secret)))
	binary.BigEndian.PutUint32(req[4:], cancelRequestCode)
	binary.BigEndian.PutUint32(req[8:], pid)
	req = append(req, secret...)
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer nc.Close()
	if _, err := nc.Write(req); err != nil {
		return err
	}
	nc.Read(make([]byte, 1)) // until the proxy closes it
	return nil
}

// TestTLSDrain: a draining node still completes the handshake so that its
// 57P01 reaches a verify-full client, and a connection open on it gets the
// shutdown message over TLS at the end of the connection wait.
func TestTLSDrain(t *testing.T) {
	c := New(t, Options{Nodes: 2, TLS: true, InProcess: true})
	ctx := testCtx(t)
	n := c.Node(1)
	open := connect(t, ctx, n.DSN())
	go n.Drain(ctx, 500*time.Millisecond)
	eventually(t, "node 1 draining", func() bool { return n.State() == Draining })
	_, err := pgx.Connect(ctx, n.DSN())
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57P01" || pgErr.Message != msgNotAccepting {
		t.Fatalf("new connection to a draining node: %v, want 57P01 %q", err, msgNotAccepting)
	}
	_, err = open.Exec(ctx, "SELECT 1")
	for err == nil {
		time.Sleep(20 * time.Millisecond)
		_, err = open.Exec(ctx, "SELECT 1")
	}
	if !errors.As(err, &pgErr) || pgErr.Code != "57P01" || pgErr.Message != msgShuttingDown {
		t.Fatalf("open connection at the end of the drain: %v, want 57P01 %q", err, msgShuttingDown)
	}
}

// TestTLSCloseLeavesNoGoroutine leaves TLS connections open, one client
// stuck in the handshake and one that never sends its startup message
// after the handshake, and checks that Close ends every goroutine at once.
func TestTLSCloseLeavesNoGoroutine(t *testing.T) {
	ctx := testCtx(t)
	c, err := Start(ctx, Options{Nodes: 2, TLS: true, InProcess: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, dsn := range []string{c.DSN(), c.Node(1).DSN(), c.HostsDSN()} {
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
	}
	// Stuck in the handshake: SSLRequest answered, no ClientHello.
	stuck, err := net.Dial("tcp", c.Node(2).Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close()
	stuck.Write([]byte{0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f}) // SSLRequest
	if _, err := io.ReadFull(stuck, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	// Encrypted but silent.
	pool := x509.NewCertPool()
	pem, _ := os.ReadFile(c.CAFile())
	pool.AppendCertsFromPEM(pem)
	silent, err := tls.Dial("tcp", c.lb.addr(), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", NextProtos: []string{alpnPostgres}})
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	if len(clustertestGoroutines()) == 0 {
		t.Fatal("found no cluster goroutine before Close: the check below would prove nothing")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if left := clustertestGoroutinesAfter(); len(left) > 0 {
		t.Fatalf("%d goroutines left after Close:\n%s", len(left), strings.Join(left, "\n\n"))
	}
	if _, err := os.Stat(c.CAFile()); !os.IsNotExist(err) {
		t.Errorf("CA file still there after Close: %v", err)
	}
}

// TestTLSUnencryptedDataAfterSSLRequest: bytes pipelined behind the
// SSLRequest, before the 'S', could come from a man in the middle;
// PostgreSQL drops such a connection and so does the proxy.
func TestTLSUnencryptedDataAfterSSLRequest(t *testing.T) {
	c := New(t, Options{Nodes: 1, TLS: true, InProcess: true})
	nc, err := net.Dial("tcp", c.Node(1).Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	nc.Write([]byte{0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f, 0, 0, 0, 8, 0, 3, 0, 0})
	b, err := io.ReadAll(bufio.NewReader(nc))
	if len(b) != 0 || err != nil {
		t.Fatalf("got %q, %v; want the connection closed without an answer", b, err)
	}
}

// BenchmarkTLSConnect alternates a connect (and close) to a node of a plain
// cluster and to one of a TLS cluster (verify-full, ECDSA P-256), so both see
// the same machine load, and reports the extra time a TLS connect takes and
// the ratio of the two. InProcess nodes isolate the handshake; PostgreSQL
// nodes add the server's backend start to both.
func BenchmarkTLSConnect(b *testing.B) {
	for _, inProcess := range []bool{true, false} {
		name := "postgres"
		if inProcess {
			name = "inprocess"
		}
		b.Run(name, func(b *testing.B) {
			quiet := func(string, ...any) {}
			plain := New(b, Options{Nodes: 1, InProcess: inProcess, Logf: quiet})
			secure := New(b, Options{Nodes: 1, InProcess: inProcess, TLS: true, Logf: quiet})
			ctx := context.Background()
			var cfgs [2]*pgconn.Config
			for i, dsn := range []string{plain.Node(1).DSN(), secure.Node(1).DSN()} {
				cfg, err := pgconn.ParseConfig(dsn)
				if err != nil {
					b.Fatal(err)
				}
				cfgs[i] = cfg
			}
			var spent [2]time.Duration
			for b.Loop() {
				for i, cfg := range cfgs {
					start := time.Now()
					conn, err := pgconn.ConnectConfig(ctx, cfg)
					if err != nil {
						b.Fatal(err)
					}
					conn.Close(ctx)
					spent[i] += time.Since(start)
				}
			}
			b.ReportMetric(float64(spent[1]-spent[0])/float64(b.N)/1e3, "tls-extra-µs/connect")
			b.ReportMetric(float64(spent[1])/float64(spent[0]), "tls/plain")
		})
	}
}

// BenchmarkTLSOverhead alternates one SELECT 1 on a connection to a plain
// cluster's node and one on a TLS cluster's (both PostgreSQL behind the
// proxy), and reports the TLS round trip's time over the plain one.
func BenchmarkTLSOverhead(b *testing.B) {
	quiet := func(string, ...any) {}
	plain := New(b, Options{Nodes: 1, Logf: quiet})
	secure := New(b, Options{Nodes: 1, TLS: true, Logf: quiet})
	benchAlternate(b, plain.Node(1).DSN(), secure.Node(1).DSN(), "tls/plain")
}
