package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"net/url"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// TestMethodSetMatchesPgxpool derives the method set of *pgxpool.Pool by
// reflection, so the two types cannot drift apart as pgx evolves.
func TestMethodSetMatchesPgxpool(t *testing.T) {
	want := reflect.TypeFor[*pgxpool.Pool]()
	got := reflect.TypeFor[*Pool]()
	for i := range want.NumMethod() {
		wm := want.Method(i)
		gm, ok := got.MethodByName(wm.Name)
		if !ok {
			t.Errorf("*Pool has no method %s %v", wm.Name, wm.Type)
			continue
		}
		// Compare without the receiver (the first input).
		if !sameSignature(wm.Type, gm.Type) {
			t.Errorf("(*Pool).%s is %v, want the signature of %v", wm.Name, gm.Type, wm.Type)
		}
	}
}

func sameSignature(a, b reflect.Type) bool {
	if a.NumIn() != b.NumIn() || a.NumOut() != b.NumOut() || a.IsVariadic() != b.IsVariadic() {
		return false
	}
	for i := 1; i < a.NumIn(); i++ {
		if a.In(i) != b.In(i) {
			return false
		}
	}
	for i := range a.NumOut() {
		if a.Out(i) != b.Out(i) {
			return false
		}
	}
	return true
}

func fillPool(t *testing.T, p *Pool) {
	t.Helper()
	want := p.Config().MaxConns
	waitCond(t, func() string {
		// TotalConns counts connections still being made; wait for them.
		if st := p.Stat(); st.TotalConns() != want || st.ConstructingConns() != 0 {
			return fmt.Sprintf("pool holds %d connections (%d being made), want %d",
				st.TotalConns(), st.ConstructingConns(), want)
		}
		return ""
	})
}

// TestNodeIDs checks that the node IDs the pool decodes from the BackendKey
// are the proxies' IDs, in CockroachDB's short and long forms.
func TestNodeIDs(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name string
		opts clustertest.Options
	}{
		{"short", clustertest.Options{Nodes: 3, Balancing: clustertest.RoundRobin}},
		{"long", clustertest.Options{Nodes: 3, FirstID: 70000, LongIDs: true, Balancing: clustertest.RoundRobin}},
		{"short near limit", clustertest.Options{Nodes: 2, FirstID: 2046, Balancing: clustertest.RoundRobin}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.InProcess = true // identity needs no real server; keeps the test fast
			c := clustertest.New(t, tt.opts)
			p := startPool(t, c.DSN(), func(cfg *Config) {
				cfg.MaxConns = int32(3 * tt.opts.Nodes)
				cfg.MinConns = cfg.MaxConns
			})
			fillPool(t, p)
			var want []int
			for _, n := range c.Nodes() {
				want = append(want, n.ID())
			}
			waitCond(t, func() string {
				got := slices.Sorted(maps.Keys(poolCounts(p)))
				if !slices.Equal(got, want) {
					return fmt.Sprintf("pool sees nodes %v, cluster has %v", got, want)
				}
				return ""
			})
			waitCond(t, countsMatch(p, c))
		})
	}
}

// TestNodeStatsMatchServers fills a pool, then acquires, releases and closes
// connections, and checks at each step that the per-node counts equal the
// servers' own.
func TestNodeStatsMatchServers(t *testing.T) {
	t.Parallel()
	// The counts compared are the proxies'; in-process servers behind them
	// keep the test fast.
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true})
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MaxConns, cfg.MinConns = 12, 12
	})
	ctx := testCtx(t)
	fillPool(t, p)
	waitCond(t, countsMatch(p, c))

	// Hold 5 connections: in-use and idle per node must add up.
	var held []*pgxpool.Conn
	for range 5 {
		conn, err := p.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, conn)
	}
	heldPerNode := map[NodeID]int32{}
	for _, conn := range held {
		heldPerNode[connStateOf(conn.Conn()).node.id]++
	}
	checkInUse := func(want map[NodeID]int32) func() string {
		return func() string {
			var total int32
			for _, s := range p.NodeStats() {
				if s.AcquiredConns != want[s.ID] || s.IdleConns != s.TotalConns-s.AcquiredConns {
					return fmt.Sprintf("node %d: %+v, want %d acquired", s.ID, s, want[s.ID])
				}
				total += s.TotalConns
			}
			if total != 12 {
				return fmt.Sprintf("total %d, want 12", total)
			}
			return ""
		}
	}
	waitCond(t, checkInUse(heldPerNode))
	if st := p.Stat(); st.AcquiredConns() != 5 {
		t.Errorf("pgxpool says %d acquired, want 5", st.AcquiredConns())
	}

	// Release two; close two more (pgxpool destroys them on release).
	for _, conn := range held[:2] {
		heldPerNode[connStateOf(conn.Conn()).node.id]--
		conn.Release()
	}
	for _, conn := range held[2:4] {
		heldPerNode[connStateOf(conn.Conn()).node.id]--
		conn.Conn().Close(ctx)
		conn.Release()
	}
	waitCond(t, countsMatch(p, c))

	// Reset closes every idle connection; the last held one stays.
	p.Reset()
	waitCond(t, countsMatch(p, c))
	waitCond(t, func() string {
		var acquired int32
		for _, s := range p.NodeStats() {
			acquired += s.AcquiredConns
		}
		if acquired != 1 {
			return fmt.Sprintf("%d acquired, want 1", acquired)
		}
		return ""
	})
	held[4].Release()
	waitCond(t, countsMatch(p, c))
}

// TestHijackLeavesTracking: a hijacked connection stays counted until the
// caller closes it, and is then noticed by NodeStats.
func TestHijackLeavesTracking(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true})
	p := startPool(t, c.DSN(), func(cfg *Config) { cfg.MaxConns = 4 })
	ctx := testCtx(t)
	conn, err := p.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	raw := conn.Hijack()
	waitCond(t, countsMatch(p, c))
	raw.Close(ctx)
	waitCond(t, countsMatch(p, c))
	for _, s := range p.NodeStats() {
		if s.TotalConns != 0 || s.AcquiredConns != 0 {
			t.Errorf("after closing the hijacked connection: %+v", s)
		}
	}
}

// testPostgresNoNodeIDs: plain PostgreSQL behind one address gets no node IDs
// (its BackendKey is an OS process ID), whatever the identity mode, unless
// the pool is told to ask the server.
func TestPostgres(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2, Postgres: true})
	t.Run("no node IDs", func(t *testing.T) { testPostgresNoNodeIDs(t, c) })
	t.Run("query identity", func(t *testing.T) { testPostgresQueryIdentity(t, c) })
}

func testPostgresNoNodeIDs(t *testing.T, c *clustertest.Cluster) {
	for _, identity := range []NodeIdentity{NodeIdentityAuto, NodeIdentityBackendKey, NodeIdentityNone} {
		t.Run(string(identity), func(t *testing.T) {
			p := startPool(t, c.DSN(), func(cfg *Config) {
				cfg.MaxConns, cfg.MinConns = 4, 4
				cfg.NodeIdentity = identity
			})
			fillPool(t, p)
			var one int
			if err := p.QueryRow(testCtx(t), "SELECT 1").Scan(&one); err != nil || one != 1 {
				t.Fatalf("SELECT 1: %v %v", one, err)
			}
			if stats := p.NodeStats(); len(stats) != 0 {
				t.Errorf("NodeStats on PostgreSQL = %+v, want none", stats)
			}
		})
	}
}

// testPostgresQueryIdentity: with several hosts in the connection string
// (auto) or when asked (query), PostgreSQL nodes are identified by address
// with pool-local IDs, and the counts match the servers'.
func testPostgresQueryIdentity(t *testing.T, c *clustertest.Cluster) {
	// The address each node's server reports: its real server's port.
	nodeByAddr := map[string]int{}
	for _, n := range c.Nodes() {
		u, err := url.Parse(n.PostgresDSN())
		if err != nil {
			t.Fatal(err)
		}
		nodeByAddr[u.Host] = n.ID()
	}
	for _, tt := range []struct {
		name     string
		dsn      string
		identity NodeIdentity
	}{
		{"auto with hosts", c.HostsDSN(), NodeIdentityAuto},
		{"query behind balancer", c.DSN(), NodeIdentityQuery},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := startPool(t, tt.dsn, func(cfg *Config) {
				cfg.MaxConns, cfg.MinConns = 6, 6
				cfg.NodeIdentity = tt.identity
			})
			fillPool(t, p)
			waitCond(t, func() string {
				byNode := map[int]int{}
				for _, s := range p.NodeStats() {
					id, ok := nodeByAddr[s.Addr]
					if !ok {
						return fmt.Sprintf("NodeStats address %q is no node's server (%v)", s.Addr, nodeByAddr)
					}
					if s.ID < 1 || s.ID > 2 {
						return fmt.Sprintf("local ID %d, want 1 or 2", s.ID)
					}
					if s.TotalConns > 0 {
						byNode[id] = int(s.TotalConns)
					}
				}
				if servers := serverCounts(c); !maps.Equal(byNode, servers) {
					return fmt.Sprintf("pool counts %v, servers see %v", byNode, servers)
				}
				return ""
			})
		})
	}
}

// TestIdentifyNode: a user function replaces the built-in identity.
func TestIdentifyNode(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true})
	var calls atomic.Int32
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MaxConns, cfg.MinConns = 3, 3
		cfg.IdentifyNode = func(ctx context.Context, params IdentifyNodeParams) (NodeID, string, error) {
			if calls.Add(1) == 2 {
				return 0, "", nil // this one stays untracked
			}
			return 42, "custom", nil
		}
	})
	fillPool(t, p)
	stats := p.NodeStats()
	if len(stats) != 1 || stats[0].ID != 42 || stats[0].Addr != "custom" || stats[0].TotalConns != 2 {
		t.Errorf("NodeStats = %+v, want node 42 with 2 connections", stats)
	}
	if calls.Load() != 3 {
		t.Errorf("IdentifyNode called %d times, want 3", calls.Load())
	}

	failing := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.IdentifyNode = func(context.Context, IdentifyNodeParams) (NodeID, string, error) {
			return 0, "", errors.New("no idea")
		}
	})
	if err := failing.Ping(testCtx(t)); err == nil || !strings.Contains(err.Error(), "no idea") {
		t.Errorf("Ping with a failing IdentifyNode = %v", err)
	}
}

// TestUserHooksRun checks that every hook set on the config still runs, in
// the documented order, and that their outcomes keep their pgxpool meaning.
func TestUserHooksRun(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true})
	var beforeConnect, afterConnect, prepare, beforeClose, traced atomic.Int32
	var refuseNext atomic.Bool
	var trackedInAfterConnect, trackedInBeforeClose atomic.Bool
	tracer := &countingTracer{queries: &traced}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MaxConns = 4
		cfg.ConnConfig.Tracer = tracer
		cfg.BeforeConnect = func(ctx context.Context, cc *pgx.ConnConfig) error {
			beforeConnect.Add(1)
			return nil
		}
		cfg.AfterConnect = func(ctx context.Context, conn *pgx.Conn) error {
			afterConnect.Add(1)
			trackedInAfterConnect.Store(connStateOf(conn) != nil) // ours ran first
			return nil
		}
		cfg.PrepareConn = func(ctx context.Context, conn *pgx.Conn) (bool, error) {
			prepare.Add(1)
			if refuseNext.CompareAndSwap(true, false) {
				return false, nil
			}
			return true, nil
		}
		cfg.BeforeClose = func(conn *pgx.Conn) {
			beforeClose.Add(1)
			trackedInBeforeClose.Store(connStateOf(conn) != nil && !connStateOf(conn).closed.Load())
		}
	})
	ctx := testCtx(t)
	if _, err := p.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	refuseNext.Store(true) // the idle connection is destroyed, a new one made
	if _, err := p.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	p.Close()
	// BeforeConnect may also run for the pool's probe connections.
	if beforeConnect.Load() < 2 || afterConnect.Load() != 2 || prepare.Load() != 3 || beforeClose.Load() != 2 {
		t.Errorf("hook calls: BeforeConnect %d AfterConnect %d PrepareConn %d BeforeClose %d, want >=2 2 3 2",
			beforeConnect.Load(), afterConnect.Load(), prepare.Load(), beforeClose.Load())
	}
	if !trackedInAfterConnect.Load() || !trackedInBeforeClose.Load() {
		t.Error("user hooks did not see the connection tracked")
	}
	if traced.Load() < 2 {
		t.Errorf("user tracer saw %d queries, want 2", traced.Load())
	}
	if tracer.releases.Load() != 2 {
		t.Errorf("user tracer saw %d releases, want 2", tracer.releases.Load())
	}
	if _, ok := p.Config().ConnConfig.Tracer.(*countingTracer); !ok {
		t.Error("Config() does not return the caller's tracer")
	}
}

type countingTracer struct {
	queries  *atomic.Int32
	releases atomic.Int32
}

func (ct *countingTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	ct.queries.Add(1)
	return ctx
}
func (ct *countingTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}
func (ct *countingTracer) TraceRelease(*pgxpool.Pool, pgxpool.TraceReleaseData) {
	ct.releases.Add(1)
}

// TestHookFailures: a failing user AfterConnect leaves nothing tracked; the
// deprecated BeforeAcquire is honoured; PrepareConn's errors reach the caller.
func TestHookFailures(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 1, InProcess: true})
	ctx := testCtx(t)

	bad := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.AfterConnect = func(context.Context, *pgx.Conn) error { return errors.New("after connect says no") }
	})
	if err := bad.Ping(ctx); err == nil || !strings.Contains(err.Error(), "after connect says no") {
		t.Errorf("Ping = %v", err)
	}
	waitCond(t, func() string {
		if s := bad.NodeStats(); len(s) > 0 && s[0].TotalConns != 0 {
			return fmt.Sprintf("NodeStats after a failed AfterConnect: %+v", s)
		}
		return ""
	})

	var acquires atomic.Int32
	legacy := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.BeforeAcquire = func(context.Context, *pgx.Conn) bool { acquires.Add(1); return true }
	})
	if err := legacy.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	if acquires.Load() != 1 {
		t.Errorf("BeforeAcquire called %d times, want 1", acquires.Load())
	}

	errPrepare := errors.New("prepare says no")
	refusing := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.PrepareConn = func(context.Context, *pgx.Conn) (bool, error) { return true, errPrepare }
	})
	if err := refusing.Ping(ctx); !errors.Is(err, errPrepare) {
		t.Errorf("Ping = %v, want %v", err, errPrepare)
	}
	for _, s := range refusing.NodeStats() {
		if s.AcquiredConns != 0 {
			t.Errorf("a connection refused by PrepareConn counts as acquired: %+v", s)
		}
	}
}

// TestRetiredConnectionsRefused: connections on an evicted node are never
// handed out; connections marked retire are destroyed by retireIdle at once.
func TestRetiredConnectionsRefused(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true, Balancing: clustertest.RoundRobin})
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MaxConns, cfg.MinConns = 4, 4
		// Keep the balancer and probe out of this test's way.
		cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
	})
	ctx := testCtx(t)
	fillPool(t, p)
	waitCond(t, countsMatch(p, c))

	stats := p.NodeStats()
	if len(stats) != 2 {
		t.Fatalf("NodeStats = %+v, want 2 nodes", stats)
	}
	first, second := stats[0].ID, stats[1].ID
	idle := p.tracker.evict(first, time.Now())
	if len(idle) != int(stats[0].TotalConns) {
		t.Fatalf("evict returned %d idle connections, want %d", len(idle), stats[0].TotalConns)
	}
	for range 8 {
		conn, err := p.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if id := connStateOf(conn.Conn()).node.id; id == first {
			t.Fatalf("acquired a connection on evicted node %d", id)
		}
		conn.Release()
	}
	p.tracker.markHealthy(first, time.Now())

	n := p.tracker.node(second)
	n.mu.Lock()
	for cs := range n.connSet {
		cs.retire.Store(true)
	}
	n.mu.Unlock()
	p.retireIdle(ctx)
	waitCond(t, func() string {
		for _, s := range p.NodeStats() {
			if s.ID == second && s.TotalConns != 0 {
				return fmt.Sprintf("retired connections still open: %+v", s)
			}
		}
		return ""
	})
	waitCond(t, countsMatch(p, c))
}

// TestCloseStopsGoroutines: after Close, nothing the pool started runs.
func TestCloseStopsGoroutines(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true})
	ctx := testCtx(t)
	before := runtime.NumGoroutine()
	cfg, err := ParseConfig(c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns, cfg.MinConns = 4, 4
	p, err := NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	fillPool(t, p)
	p.Close()
	p.Close() // idempotent
	waitCond(t, func() string {
		if n := runtime.NumGoroutine(); n > before {
			return fmt.Sprintf("%d goroutines, %d before the pool:\n%s", n, before, poolStacks())
		}
		if s := poolStacks(); s != "" {
			return "pool goroutines still running:\n" + s
		}
		return ""
	})
	if err := p.Ping(ctx); err == nil {
		t.Error("Ping on a closed pool succeeded")
	}
}

// poolStacks returns the stacks of goroutines running code of this package
// (outside tests) or of pgxpool/puddle.
func poolStacks() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if strings.Contains(g, "runtime.Stack") {
			continue
		}
		if strings.Contains(g, "jackc/pgx/v5/pgxpool") || strings.Contains(g, "jackc/puddle") ||
			(strings.Contains(g, "clusterpool/clusterpool.") && !strings.Contains(g, "clustertest") && !strings.Contains(g, "_test.go")) {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}

// TestSameAsPgxpool runs the same calls against plain PostgreSQL through
// pgxpool and through clusterpool and compares results and error kinds.
func TestSameAsPgxpool(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 1, Postgres: true})
	dsn := c.Nodes()[0].PostgresDSN()
	ctx := testCtx(t)
	ref, err := pgxpool.New(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	p := startPool(t, dsn, nil)
	if _, err := ref.Exec(ctx, "CREATE TABLE IF NOT EXISTS same_as_pgxpool (k int PRIMARY KEY, v text)"); err != nil {
		t.Fatal(err)
	}

	type pool interface {
		Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
		Query(context.Context, string, ...any) (pgx.Rows, error)
		QueryRow(context.Context, string, ...any) pgx.Row
		SendBatch(context.Context, *pgx.Batch) pgx.BatchResults
		Begin(context.Context) (pgx.Tx, error)
		CopyFrom(context.Context, pgx.Identifier, []string, pgx.CopyFromSource) (int64, error)
		Ping(context.Context) error
	}
	run := func(p pool, base int) []string {
		var out []string
		note := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
		code := func(err error) string {
			var pgErr *pgconn.PgError
			switch {
			case err == nil:
				return "ok"
			case errors.As(err, &pgErr):
				return "pg " + pgErr.Code
			case errors.Is(err, pgx.ErrNoRows):
				return "no rows"
			case errors.Is(err, context.Canceled):
				return "canceled"
			}
			return "other " + err.Error()
		}
		tag, err := p.Exec(ctx, "INSERT INTO same_as_pgxpool VALUES ($1, 'a'), ($1 + 1, 'b')", base)
		note("exec %s %s", tag, code(err))
		_, err = p.Exec(ctx, "INSERT INTO same_as_pgxpool VALUES ($1, 'dup')", base)
		note("duplicate %s", code(err))
		_, err = p.Exec(ctx, "SELEC 1")
		note("syntax %s", code(err))
		rows, err := p.Query(ctx, "SELECT k - $1, v FROM same_as_pgxpool WHERE k >= $1 AND k < $1 + 10 ORDER BY k", base)
		if err == nil {
			vals, err := pgx.CollectRows(rows, pgx.RowToMap)
			note("query %v %s", vals, code(err))
		}
		var v string
		note("no rows %s", code(p.QueryRow(ctx, "SELECT v FROM same_as_pgxpool WHERE k = -1").Scan(&v)))
		b := &pgx.Batch{}
		b.Queue("SELECT 1")
		b.Queue("SELECT 1/0")
		br := p.SendBatch(ctx, b)
		_, err1 := br.Exec()
		_, err2 := br.Exec()
		note("batch %s %s %s", code(err1), code(err2), code(br.Close()))
		tx, err := p.Begin(ctx)
		if err == nil {
			_, err = tx.Exec(ctx, "UPDATE same_as_pgxpool SET v = 'c' WHERE k = $1", base)
			note("tx %s %s", code(err), code(tx.Rollback(ctx)))
		}
		n, err := p.CopyFrom(ctx, pgx.Identifier{"same_as_pgxpool"}, []string{"k", "v"},
			pgx.CopyFromRows([][]any{{base + 5, "x"}, {base + 6, "y"}}))
		note("copy %d %s", n, code(err))
		canceled, cancel := context.WithCancel(ctx)
		cancel()
		_, err = p.Exec(canceled, "SELECT 1")
		note("canceled %s", code(err))
		note("ping %s", code(p.Ping(ctx)))
		return out
	}
	want := run(ref, 100)
	got := run(p, 200)
	t.Logf("results: %q", got)
	if !slices.Equal(got, want) {
		t.Errorf("clusterpool and pgxpool differ:\n got %q\nwant %q", got, want)
	}
	if stats := p.NodeStats(); len(stats) != 0 {
		t.Errorf("NodeStats on single-host PostgreSQL = %+v", stats)
	}
}

// TestAcquireAllocs: acquiring and releasing through clusterpool allocates no
// more than through pgxpool.
func TestAcquireAllocs(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 1, InProcess: true})
	ctx := testCtx(t)
	ref, err := pgxpool.New(ctx, c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer ref.Close()
	p := startPool(t, c.DSN(), nil)
	measure := func(acquire func() (*pgxpool.Conn, error)) float64 {
		conn, err := acquire() // warm up: open the connection
		if err != nil {
			t.Fatal(err)
		}
		conn.Release()
		return testing.AllocsPerRun(200, func() {
			conn, err := acquire()
			if err != nil {
				panic(err)
			}
			conn.Release()
		})
	}
	refAllocs := measure(func() (*pgxpool.Conn, error) { return ref.Acquire(ctx) })
	gotAllocs := measure(func() (*pgxpool.Conn, error) { return p.Acquire(ctx) })
	if gotAllocs > refAllocs {
		t.Errorf("Acquire+Release allocates %.1f times, pgxpool %.1f", gotAllocs, refAllocs)
	}
	t.Logf("allocs per Acquire+Release: clusterpool %.1f, pgxpool %.1f", gotAllocs, refAllocs)
}

// TestNewWithConfigErrors: invalid settings are reported by name, without the
// password.
func TestNewWithConfigErrors(t *testing.T) {
	cfg, err := ParseConfig("postgres://u:topsecret@127.0.0.1:1/db")
	if err != nil {
		t.Fatal(err)
	}
	cfg.ConnectRate = math.NaN()
	_, err = NewWithConfig(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "ConnectRate") || strings.Contains(err.Error(), "topsecret") {
		t.Errorf("NewWithConfig = %v", err)
	}
	if _, err := NewWithConfig(context.Background(), nil); err == nil {
		t.Error("NewWithConfig(nil) succeeded")
	}
	if _, err := New(context.Background(), "postgres://u:topsecret@h/db?cluster_x=1"); err == nil || strings.Contains(err.Error(), "topsecret") {
		t.Errorf("New = %v", err)
	}
}

// TestWrapPgxpoolConfig: a Config built around an existing pgxpool.Config
// (cluster fields left zero) works, with the defaults.
func TestWrapPgxpoolConfig(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true})
	pgxCfg, err := pgxpool.ParseConfig(c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	pgxCfg.MaxConns = 3
	ctx := testCtx(t)
	p, err := NewWithConfig(ctx, &Config{Config: pgxCfg})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if _, err := p.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if s := p.settings; s.balanceInterval != DefaultBalanceInterval || s.maxRetries != DefaultMaxRetries || s.connectRate != DefaultConnectRate {
		t.Errorf("settings from zero fields: %+v", s)
	}
	waitCond(t, countsMatch(p, c))
}

// TestSweepRefillsMinConns: connections a sweep destroys (here: every
// connection of an evicted node) are replaced at once, not at pgxpool's next
// health check, which this pool has put an hour away.
func TestSweepRefillsMinConns(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true, Seed: 7})
	p := startPool(t, c.HostsDSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 6, 6
		cfg.HealthCheckPeriod = time.Hour
		cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
	})
	fillPool(t, p)
	waitCond(t, countsMatch(p, c))

	victim := p.NodeStats()[0]
	p.tracker.evict(victim.ID, time.Now())
	if n := p.retireIdle(testCtx(t)); n != int(victim.TotalConns) {
		t.Fatalf("retireIdle destroyed %d connections, want the evicted node's %d", n, victim.TotalConns)
	}
	waitCond(t, func() string {
		if got := p.Stat().TotalConns(); got != 6 {
			return fmt.Sprintf("pool has %d connections after the sweep, want MinConns 6 back", got)
		}
		return ""
	})
	waitCond(t, countsMatch(p, c))
}

// TestConnectStartStamped: every pool connection carries the time its
// connect began, which eviction compares against (trackDialled).
func TestConnectStartStamped(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 1, InProcess: true})
	before := time.Now()
	p := startPool(t, c.DSN(), nil)
	conn, err := p.Acquire(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	if started := connectStart(conn.Conn()); started.Before(before) || started.After(time.Now()) {
		t.Fatalf("connect start = %v, want between %v and now", started, before)
	}
}
