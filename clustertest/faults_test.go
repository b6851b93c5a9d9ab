package clustertest

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
)

// connectCancelling connects with pgx's CancelRequest context handler, so a
// cancelled context sends a CancelRequest instead of closing the socket.
func connectCancelling(t *testing.T, ctx context.Context, dsn string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.BuildContextWatcherHandler = func(pc *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.CancelRequestContextWatcherHandler{Conn: pc, DeadlineDelay: 20 * time.Second}
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

func TestCancelThroughProxy(t *testing.T) {
	c := New(t, Options{Nodes: 2, Seed: 7})
	ctx := testCtx(t)
	// Through a node proxy, and through the load balancer, which may send
	// the CancelRequest to another node's proxy: it must be forwarded.
	for _, dsn := range []string{c.Node(2).DSN(), c.DSN(), c.DSN(), c.DSN()} {
		conn := connectCancelling(t, ctx, dsn)
		qctx, cancel := context.WithCancel(ctx)
		go cancelWhenSleeping(ctx, c, cancel)
		_, err := conn.Exec(qctx, "SELECT pg_sleep(30)")
		cancel()
		// 57014 query_canceled comes from the server: the CancelRequest
		// reached it with its real key. (A dropped one would end in the
		// 20 s deadline and a broken connection instead.)
		if sqlState(err) != "57014" {
			t.Fatalf("%s: pg_sleep ended with %v, want SQLSTATE 57014", dsn, err)
		}
		if err := conn.Ping(ctx); err != nil {
			t.Fatalf("connection unusable after cancel: %v", err)
		}
	}
}

// cancelWhenSleeping calls cancel once some node's server runs the
// pg_sleep(30), so the CancelRequest cannot overtake the query.
func cancelWhenSleeping(ctx context.Context, c *Cluster, cancel context.CancelFunc) {
	defer cancel()
	var watchers []*pgx.Conn
	for _, n := range c.Nodes() {
		conn, err := pgx.Connect(ctx, n.PostgresDSN())
		if err != nil {
			return
		}
		defer conn.Close(context.Background())
		watchers = append(watchers, conn)
	}
	for ctx.Err() == nil {
		for _, w := range watchers {
			var sleeping int
			err := w.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'").Scan(&sleeping)
			if err != nil || sleeping > 0 {
				return
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestDrain(t *testing.T) {
	c := New(t, Options{Nodes: 2, Seed: 3})
	ctx := testCtx(t)
	n := c.Node(1)
	existing := connect(t, ctx, n.DSN())

	drained := make(chan error, 1)
	// The checks below must fit in the connection wait, even on a slow machine.
	go func() { drained <- n.Drain(ctx, 3*time.Second) }()
	eventually(t, "node 1 draining", func() bool { return n.State() == Draining })

	// New connections are refused at once with 57P01.
	_, err := pgconn.Connect(ctx, n.DSN())
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57P01" || !strings.Contains(pgErr.Message, "not accepting clients") {
		t.Fatalf("new connection to draining node: %v, want 57P01 not accepting clients", err)
	}
	// The load balancer no longer routes to it.
	for i := 0; i < 3; i++ {
		conn := connect(t, ctx, c.DSN())
		if id := conn.PgConn().PID() >> 20; id != 2 {
			t.Fatalf("load balancer routed to node %d while node 1 drains", id)
		}
		conn.Close(ctx)
	}
	// The existing connection works until the wait is over, then gets
	// 57P01 "server is shutting down" (here in the middle of a query).
	if _, err := existing.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatalf("existing connection during drain: %v", err)
	}
	_, err = existing.Exec(ctx, "SELECT pg_sleep(30)")
	if !errors.As(err, &pgErr) || pgErr.Code != "57P01" || !strings.Contains(pgErr.Message, "shutting down") {
		t.Fatalf("existing connection at the end of the drain: %v, want 57P01 shutting down", err)
	}
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	if s := n.State(); s != Down {
		t.Fatalf("state after Drain %v", s)
	}
	if _, err := pgconn.Connect(ctx, n.DSN()); err == nil || sqlState(err) != "" {
		t.Fatalf("connect to a drained node: %v, want a connection error", err)
	}
	eventually(t, "no open connections on node 1", func() bool { return n.OpenConns() == 0 })
}

func TestDrainIdleConnection(t *testing.T) {
	c := New(t, Options{Nodes: 1, InProcess: true})
	ctx := testCtx(t)
	n := c.Node(1)
	conn, err := pgconn.Connect(ctx, n.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if err := n.Drain(ctx, 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	// The message is waiting on the idle connection's socket.
	_, err = conn.ReceiveMessage(ctx)
	if sqlState(err) != "57P01" {
		t.Fatalf("idle connection after drain: %v, want 57P01", err)
	}
}

func TestKillAndRestart(t *testing.T) {
	c := New(t, Options{Nodes: 2, Seed: 5})
	ctx := testCtx(t)
	n := c.Node(1)
	conn := connect(t, ctx, n.DSN())
	n.Kill()
	if n.State() != Down {
		t.Fatalf("state after Kill %v", n.State())
	}
	_, err := conn.Exec(ctx, "SELECT 1")
	if err == nil || sqlState(err) != "" {
		t.Fatalf("query on a killed node: %v, want a connection error", err)
	}
	if n.OpenConns() != 0 {
		t.Fatalf("OpenConns %d after Kill", n.OpenConns())
	}
	if _, err := pgconn.Connect(ctx, n.DSN()); err == nil {
		t.Fatal("connected to a killed node")
	}
	for i := 0; i < 5; i++ {
		conn := connect(t, ctx, c.DSN())
		if id := conn.PgConn().PID() >> 20; id != 2 {
			t.Fatalf("load balancer routed to killed node %d", id)
		}
		conn.Close(ctx)
	}

	addr := n.Addr()
	if err := n.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if n.Addr() != addr || n.State() != Up {
		t.Fatalf("after Restart: %s %v, want %s Up", n.Addr(), n.State(), addr)
	}
	conn = connect(t, ctx, n.DSN())
	if id := int(conn.PgConn().PID() >> 20); id != 1 {
		t.Fatalf("restarted node reports ID %d", id)
	}
	eventually(t, "load balancer routing to node 1 again", func() bool {
		conn, err := pgconn.Connect(ctx, c.DSN())
		if err != nil {
			return false
		}
		defer conn.Close(ctx)
		return conn.PID()>>20 == 1
	})
}

func TestRestartPortTaken(t *testing.T) {
	c := New(t, Options{Nodes: 1, InProcess: true})
	ctx := testCtx(t)
	n := c.Node(1)
	n.Kill()
	// The killed node's port may take a moment to be free again; the test
	// needs it, so it waits for it and fails rather than skipping.
	var ln net.Listener
	eventually(t, "the killed node's port "+n.Addr()+" free to listen on", func() bool {
		var err error
		ln, err = net.Listen("tcp", n.Addr())
		return err == nil
	})
	defer ln.Close()
	err := n.Restart(ctx)
	if err == nil || !strings.Contains(err.Error(), "cannot listen") {
		t.Fatalf("Restart with the port taken: %v", err)
	}
	ln.Close()
	if err := n.Restart(ctx); err != nil {
		t.Fatalf("Restart once the port is free: %v", err)
	}
}

func TestCapacity(t *testing.T) {
	c := New(t, Options{Nodes: 1})
	ctx := testCtx(t)
	n := c.Node(1)
	const clients = 6
	conns := make([]*pgx.Conn, clients)
	for i := range conns {
		conns[i] = connect(t, ctx, n.DSN())
	}
	// run starts one pg_sleep per connection at once and returns the most
	// sleeps the server itself saw running together, and the proxy's peak.
	run := func() (serverPeak, proxyPeak int) {
		n.queries.resetPeak()
		watcher := connect(t, ctx, n.PostgresDSN())
		stop := make(chan struct{})
		watched := make(chan int)
		go func() {
			peak := 0
			for {
				select {
				case <-stop:
					watched <- peak
					return
				default:
				}
				var active int
				if err := watcher.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep(0.3)%' AND state = 'active'").Scan(&active); err == nil && active > peak {
					peak = active
				}
			}
		}()
		var wg sync.WaitGroup
		for _, conn := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := conn.Exec(ctx, "SELECT pg_sleep(0.3)"); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		close(stop)
		serverPeak = <-watched
		_, proxyPeak = n.queries.stats()
		return serverPeak, proxyPeak
	}

	n.SetCapacity(2)
	serverPeak, proxyPeak := run()
	if serverPeak > 2 || proxyPeak != 2 {
		t.Errorf("capacity 2: server saw %d sleeps at once, proxy %d; want at most 2 and 2", serverPeak, proxyPeak)
	}
	n.SetCapacity(0)
	if _, proxyPeak := run(); proxyPeak <= 2 {
		t.Errorf("unlimited: proxy peak %d, want more than 2 (else the cap above proved nothing)", proxyPeak)
	}
	if inFlight, _ := n.queries.stats(); inFlight != 0 {
		t.Errorf("%d queries still hold slots", inFlight)
	}
}

func TestLatency(t *testing.T) {
	c := New(t, Options{Nodes: 1, InProcess: true})
	ctx := testCtx(t)
	n := c.Node(1)
	conn := connect(t, ctx, n.DSN())
	const d = 150 * time.Millisecond
	n.SetLatency(d)
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeSimpleProtocol, pgx.QueryExecModeExec} {
		start := time.Now()
		if _, err := conn.Exec(ctx, "SELECT 1", mode); err != nil {
			t.Fatal(err)
		}
		// A lower bound only: the machine may add any amount on top.
		if took := time.Since(start); took < d {
			t.Errorf("%v: round trip took %v, less than the latency %v", mode, took, d)
		}
	}
}

func TestPartition(t *testing.T) {
	c := New(t, Options{Nodes: 1, InProcess: true})
	ctx := testCtx(t)
	n := c.Node(1)
	conn := connect(t, ctx, n.DSN())
	n.Partition()
	done := make(chan error, 1)
	go func() {
		_, err := conn.Exec(ctx, "SELECT 1")
		done <- err
	}()
	// The bytes are held, the socket stays open: no answer and no error.
	select {
	case err := <-done:
		t.Fatalf("query answered (%v) during a partition", err)
	case <-time.After(200 * time.Millisecond):
	}
	if n.State() != Up || n.OpenConns() != 1 {
		t.Fatalf("partitioned node: %v with %d open, want Up with 1", n.State(), n.OpenConns())
	}
	n.Heal()
	if err := <-done; err != nil {
		t.Fatalf("query after Heal: %v", err)
	}
}

func TestAddRemoveNode(t *testing.T) {
	c := New(t, Options{Nodes: 1, InProcess: true})
	ctx := testCtx(t)
	n2, err := c.AddNode(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n2.ID() != 2 || len(c.Nodes()) != 2 || c.Node(2) != n2 {
		t.Fatalf("AddNode: id %d, %d nodes", n2.ID(), len(c.Nodes()))
	}
	if !strings.Contains(c.HostsDSN(), c.Node(1).Addr()+","+n2.Addr()) {
		t.Fatalf("HostsDSN %s", c.HostsDSN())
	}
	conn := connect(t, ctx, n2.DSN())
	if id := conn.PgConn().PID() >> 20; id != 2 {
		t.Fatalf("new node reports %d", id)
	}
	if err := c.RemoveNode(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if c.Node(1) != nil || len(c.Nodes()) != 1 {
		t.Fatal("node 1 still listed after RemoveNode")
	}
	if err := c.RemoveNode(ctx, 1); err == nil {
		t.Fatal("RemoveNode of a missing node succeeded")
	}
	n3, err := c.AddNode(ctx)
	if err != nil || n3.ID() != 3 {
		t.Fatalf("AddNode after a removal: %v, id %v", err, n3)
	}
}

func TestBadInput(t *testing.T) {
	ctx := testCtx(t)
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		opts Options
		want string
	}{
		{"no nodes", Options{}, "at least 1 node"},
		{"negative nodes", Options{Nodes: -1}, "at least 1 node"},
		{"negative FirstID", Options{Nodes: 1, FirstID: -3}, "FirstID"},
		{"short IDs past 2047", Options{Nodes: 2, FirstID: 2047}, "largest short ID"},
		{"long IDs past 2^31-1", Options{Nodes: 2, FirstID: MaxLongID, LongIDs: true}, "largest long ID"},
		{"BaseDir under a file", Options{Nodes: 1, InProcess: true, BaseDir: filepath.Join(file, "sub")}, "BaseDir"},
		{"bad balancing", Options{Nodes: 1, Balancing: 7}, "Balancing"},
		{"NUL in CrdbVersion", Options{Nodes: 1, CrdbVersion: "v\x00"}, "NUL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Start(ctx, tc.opts)
			if err == nil {
				c.Close()
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "clustertest: ") {
				t.Fatalf("error %q does not mention %q", err, tc.want)
			}
		})
	}

	t.Run("AddNode past 2047", func(t *testing.T) {
		c := New(t, Options{Nodes: 1, FirstID: 2047, InProcess: true})
		if _, err := c.AddNode(ctx); err == nil || !strings.Contains(err.Error(), "2047") {
			t.Fatalf("AddNode: %v", err)
		}
	})
}

// TestPostgresFailsToStart runs fake binaries whose postgres exits at once:
// the error must carry the tail of the server's log.
func TestPostgresFailsToStart(t *testing.T) {
	// Root without a postgres user has nothing to run the fake as: skip as
	// New would, or fail under CLUSTERTEST_REQUIRE=1.
	_, err := lookupRunAs()
	skipUnlessRequired(t, err)
	dir := t.TempDir()
	// The fake programs run as the postgres user when the test runs as root.
	for p := dir; p != filepath.Dir(p) && p != os.TempDir(); p = filepath.Dir(p) {
		os.Chmod(p, 0o755)
	}
	bin := filepath.Join(dir, "bin")
	os.Mkdir(bin, 0o755)
	initdb := "#!/bin/sh\nwhile [ $# -gt 0 ]; do if [ \"$1\" = -D ]; then echo 15 > \"$2/PG_VERSION\"; fi; shift; done\n"
	postgres := "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'postgres (fake) 15'; exit 0; fi\necho 'FATAL:  simulated start failure' >&2\nexit 1\n"
	if err := os.WriteFile(filepath.Join(bin, "initdb"), []byte(initdb), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bin, "postgres"), []byte(postgres), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CLUSTERTEST_PGBIN", bin)
	base := filepath.Join(dir, "base")
	os.Mkdir(base, 0o755)
	c, err := Start(testCtx(t), Options{Nodes: 2, BaseDir: base})
	if err == nil {
		c.Close()
		t.Fatal("Start succeeded with a failing postgres")
	}
	t.Log(err)
	if !strings.Contains(err.Error(), "simulated start failure") {
		t.Fatalf("error lacks the server log: %v", err)
	}
	entries, _ := os.ReadDir(base)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "clustertest-") && !strings.HasPrefix(e.Name(), "clustertest-template-") {
			t.Errorf("left behind %s", e.Name())
		}
	}
}

// TestCancelForwardedFromAnotherNode sends the CancelRequest for a query on
// node 1 to node 2's proxy, as a load balancer may: CockroachDB forwards it
// to the node named in the key, and so must the proxies, in both modes.
func TestCancelForwardedFromAnotherNode(t *testing.T) {
	for _, postgres := range []bool{false, true} {
		c := New(t, Options{Nodes: 2, Postgres: postgres})
		ctx := testCtx(t)
		conn := connectCancelling(t, ctx, c.Node(1).DSN())
		pgc := conn.PgConn()
		running, cancelled := context.WithCancel(ctx)
		go cancelWhenSleeping(ctx, c, cancelled)
		go func() {
			<-running.Done() // the sleep runs on node 1: cancel it via node 2
			req := make([]byte, 12, 16)
			binary.BigEndian.PutUint32(req[0:], uint32(12+len(pgc.SecretKey())))
			binary.BigEndian.PutUint32(req[4:], cancelRequestCode)
			binary.BigEndian.PutUint32(req[8:], pgc.PID())
			req = append(req, pgc.SecretKey()...)
			nc, err := net.Dial("tcp", c.Node(2).Addr())
			if err != nil {
				t.Error(err)
				return
			}
			defer nc.Close()
			nc.Write(req)
			nc.Read(make([]byte, 1)) // until the proxy closes it
		}()
		_, err := conn.Exec(ctx, "SELECT pg_sleep(30)")
		if sqlState(err) != "57014" {
			t.Fatalf("Postgres=%v: pg_sleep ended with %v, want SQLSTATE 57014", postgres, err)
		}
	}
}

// TestSSLRequest connects with sslmode=prefer: the proxy relays the
// SSLRequest and the server's refusal; a draining node answers it itself.
func TestSSLRequest(t *testing.T) {
	c := New(t, Options{Nodes: 1})
	ctx := testCtx(t)
	n := c.Node(1)
	dsn := strings.Replace(n.DSN(), "sslmode=disable", "sslmode=prefer", 1)
	conn := connect(t, ctx, dsn)
	if id := conn.PgConn().PID() >> 20; id != 1 {
		t.Fatalf("PID decodes to %d", id)
	}
	go n.Drain(ctx, time.Hour) // held open by conn
	eventually(t, "draining", func() bool { return n.State() == Draining })
	if _, err := pgconn.Connect(ctx, dsn); sqlState(err) != "57P01" {
		t.Fatalf("sslmode=prefer to a draining node: %v, want 57P01", err)
	}
}

func TestNoNodeUp(t *testing.T) {
	c := New(t, Options{Nodes: 2, InProcess: true})
	ctx := testCtx(t)
	for _, n := range c.Nodes() {
		n.Kill()
	}
	// The balancer closes the connection at once: an error, not a hang.
	if _, err := pgconn.Connect(ctx, c.DSN()); err == nil {
		t.Fatal("connected through the load balancer with every node down")
	}
	if err := c.Node(2).Restart(ctx); err != nil {
		t.Fatal(err)
	}
	conn := connect(t, ctx, c.DSN())
	if id := conn.PgConn().PID() >> 20; id != 2 {
		t.Fatalf("routed to node %d, the only one up is 2", id)
	}
}

func TestDrainContextEnds(t *testing.T) {
	c := New(t, Options{Nodes: 1, InProcess: true})
	ctx := testCtx(t)
	n := c.Node(1)
	conn := connect(t, ctx, n.DSN())
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := n.Drain(short, time.Hour); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain with an ending context: %v", err)
	}
	if n.State() != Draining {
		t.Fatalf("state %v, want the drain to go on", n.State())
	}
	// Closing the last connection ends the connection wait early.
	conn.Close(ctx)
	if err := n.Drain(ctx, time.Hour); err != nil {
		t.Fatal(err)
	}
	if n.State() != Down {
		t.Fatalf("state %v after the drain", n.State())
	}
}
