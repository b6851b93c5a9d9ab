package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/clusterpool/clusterpool/clustertest"
)

// retryLoadEnv overrides how long the retry tests keep their load running
// (a Go duration). The default keeps the suite fast; the 20–30 s
// runs are CLUSTERPOOL_RETRY_LOAD=25s go test -race -run 'TestRetry$' .
const (
	retryLoadEnv     = "CLUSTERPOOL_RETRY_LOAD"
	retryLoadDefault = 6 * time.Second
	loadWorkers      = 32
	loadKeys         = 200
	opTimeout        = 20 * time.Second // generous: the machine is loaded
)

func retryLoad(t testing.TB) time.Duration {
	if s := os.Getenv(retryLoadEnv); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			t.Fatalf("%s=%q: want a positive duration", retryLoadEnv, s)
		}
		return d
	}
	return retryLoadDefault
}

// newKVCluster starts a cluster whose every node has the kv and ids tables:
// the nodes are separate PostgreSQL servers with separate data.
func newKVCluster(t testing.TB, nodes int) *clustertest.Cluster {
	t.Helper()
	c := clustertest.New(t, clustertest.Options{Nodes: nodes})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, n := range c.Nodes() {
		if err := n.ExecDirect(ctx, `
			CREATE TABLE IF NOT EXISTS kv (k INT PRIMARY KEY, v INT NOT NULL);
			CREATE TABLE IF NOT EXISTS ids (worker INT NOT NULL, seq INT NOT NULL);
			CREATE OR REPLACE FUNCTION fail_with(code text) RETURNS int LANGUAGE plpgsql AS
				$$ BEGIN RAISE EXCEPTION 'fail_with %', code USING ERRCODE = code; END $$`); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

func newRetryPool(t testing.TB, dsn string, maxConns int32) *Pool {
	t.Helper()
	return newRetryPoolWith(t, dsn, maxConns, nil)
}

func newRetryPoolWith(t testing.TB, dsn string, maxConns int32, configure func(*Config)) *Pool {
	t.Helper()
	cfg, err := ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = maxConns
	cfg.MinConns = maxConns
	// Long lifetimes: retries and eviction, not connection churn, must hide
	// the faults.
	cfg.MaxConnLifetime = time.Hour
	if configure != nil {
		configure(cfg)
	}
	p, err := NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func newPlainPool(t testing.TB, dsn string, maxConns int32) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = maxConns
	cfg.MinConns = maxConns
	cfg.MaxConnLifetime = time.Hour
	p, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// db is what the load needs from *Pool and *pgxpool.Pool alike.
type db interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
}

func beginFunc(ctx context.Context, d db, fn func(pgx.Tx) error) error {
	if p, ok := d.(*Pool); ok {
		return p.BeginFunc(ctx, fn)
	}
	return pgx.BeginFunc(ctx, d.(*pgxpool.Pool), fn)
}

const upsertSQL = `INSERT INTO kv (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v`

// kvOp is one read or idempotent write, chosen by i: QueryRow, Exec, Query,
// BeginFunc and SendBatch in turn.
func kvOp(ctx context.Context, d db, i int, rng *rand.Rand) error {
	k := rng.IntN(loadKeys)
	switch i % 5 {
	case 0:
		var v int
		err := d.QueryRow(ctx, "SELECT v FROM kv WHERE k = $1", k).Scan(&v)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		return err
	case 1:
		_, err := d.Exec(WithIdempotent(ctx), upsertSQL, k, i)
		return err
	case 2:
		rows, err := d.Query(ctx, "SELECT k, v FROM kv WHERE k >= $1 ORDER BY k LIMIT 5", k)
		if err != nil {
			return err
		}
		for rows.Next() {
		}
		return rows.Err()
	case 3:
		b := &pgx.Batch{}
		b.Queue("SELECT count(*) FROM kv WHERE k < $1", k)
		b.Queue(upsertSQL, k, i)
		br := d.SendBatch(WithIdempotent(ctx), b)
		var n int
		err := br.QueryRow().Scan(&n)
		if err == nil {
			_, err = br.Exec()
		}
		return errors.Join(err, br.Close())
	default:
		return beginFunc(WithIdempotent(ctx), d, func(tx pgx.Tx) error {
			var v int
			err := tx.QueryRow(ctx, "SELECT v FROM kv WHERE k = $1", k).Scan(&v)
			if err != nil && !errors.Is(err, pgx.ErrNoRows) {
				return err
			}
			_, err = tx.Exec(ctx, upsertSQL, k, v+1)
			return err
		})
	}
}

// loadResult is what callers saw during a load run.
type loadResult struct {
	mu   sync.Mutex
	ops  int
	errs []error
	lat  []time.Duration
}

func (r *loadResult) add(d time.Duration, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ops++
	r.lat = append(r.lat, d)
	if err != nil {
		r.errs = append(r.errs, err)
	}
}

func (r *loadResult) p99() time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.lat) == 0 {
		return 0
	}
	lat := slices.Clone(r.lat)
	slices.Sort(lat)
	return lat[(len(lat)*99)/100]
}

func (r *loadResult) summary() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "%d ops, %d errors", r.ops, len(r.errs))
	for i, err := range r.errs {
		if i == 5 {
			fmt.Fprintf(&b, "\n\t...")
			break
		}
		fmt.Fprintf(&b, "\n\t%v", err)
	}
	return b.String()
}

// runLoad runs loadWorkers workers doing kvOp on d until stop is closed, then
// returns what they saw. Each operation has its own context: stopping the
// load never cancels an operation in flight.
func runLoad(d db, stop <-chan struct{}) *loadResult {
	res := &loadResult{}
	var wg sync.WaitGroup
	for w := range loadWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for i := w; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
				start := time.Now()
				err := kvOp(ctx, d, i, rng)
				res.add(time.Since(start), err)
				cancel()
			}
		}()
	}
	wg.Wait()
	return res
}

// faultCtx bounds a fault step (Drain, Restart).
func faultCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// rollingRestart drains (2 s connection wait) and restarts each node in
// turn, spread over total.
func rollingRestart(t testing.TB, c *clustertest.Cluster, total time.Duration) {
	nodes := c.Nodes()
	gap := total / time.Duration(len(nodes)+1)
	for _, n := range nodes {
		time.Sleep(gap)
		if err := n.Drain(faultCtx(t), 2*time.Second); err != nil {
			t.Fatalf("drain node %d: %v", n.ID(), err)
		}
		if err := n.Restart(faultCtx(t)); err != nil {
			t.Fatalf("restart node %d: %v", n.ID(), err)
		}
	}
	time.Sleep(gap)
}

// crash kills one node a third of the way through total and restarts it two
// thirds of the way through.
func crash(t testing.TB, n *clustertest.Node, total time.Duration) {
	time.Sleep(total / 3)
	n.Kill()
	time.Sleep(total / 3)
	if err := n.Restart(faultCtx(t)); err != nil {
		t.Fatalf("restart node %d: %v", n.ID(), err)
	}
	time.Sleep(total / 3)
}

// withLoad runs the load on each of dbs while fault runs, and returns what
// each load saw.
func withLoad(fault func(), dbs ...db) []*loadResult {
	stop := make(chan struct{})
	results := make([]*loadResult, len(dbs))
	var wg sync.WaitGroup
	for i, d := range dbs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = runLoad(d, stop)
		}()
	}
	fault()
	close(stop)
	wg.Wait()
	return results
}

// TestRetry runs the retry scenarios on one shared 3-node cluster (starting
// one costs seconds on a loaded machine); each scenario starts with every
// node up and its own pool. AllNodesDown runs last.
func TestRetry(t *testing.T) {
	t.Parallel()
	c := newKVCluster(t, 3)
	for _, tc := range []struct {
		name string
		test func(*testing.T, *clustertest.Cluster)
	}{
		{"RollingRestart", testRetryRollingRestart},
		{"KillNode", testRetryKillNode},
		{"KillNodeHosts", testRetryKillNodeHosts},
		{"NonIdempotentKill", testRetryNonIdempotentKill},
		{"CallerCancel", testRetryCallerCancel},
		{"SQLSTATE", testRetrySQLState},
		{"AllNodesDown", testRetryAllNodesDown},
	} {
		for _, n := range c.Nodes() {
			if err := n.Restart(faultCtx(t)); err != nil {
				t.Fatalf("restart node %d: %v", n.ID(), err)
			}
		}
		t.Run(tc.name, func(t *testing.T) { tc.test(t, c) })
	}
}

func testRetryRollingRestart(t *testing.T, c *clustertest.Cluster) {
	p := newRetryPool(t, c.DSN(), 12)
	res := withLoad(func() { rollingRestart(t, c, retryLoad(t)) }, p)[0]
	t.Logf("rolling restart: %s; p99 %v; nodes %+v", res.summary(), res.p99(), p.NodeStats())
	if len(res.errs) != 0 || res.ops == 0 {
		t.Errorf("callers saw errors during a rolling restart: %s", res.summary())
	}
}

func testRetryKillNode(t *testing.T, c *clustertest.Cluster) {
	p := newRetryPool(t, c.DSN(), 12)
	res := withLoad(func() { crash(t, c.Node(2), retryLoad(t)) }, p)[0]
	t.Logf("crash: %s; p99 %v; nodes %+v", res.summary(), res.p99(), p.NodeStats())
	if len(res.errs) != 0 || res.ops == 0 {
		t.Errorf("callers saw errors when a node crashed: %s", res.summary())
	}
	var evicted bool
	for _, s := range p.NodeStats() {
		evicted = evicted || s.ID == 2 && s.Evictions > 0
	}
	if !evicted {
		t.Errorf("node 2 was never evicted: %+v", p.NodeStats())
	}
}

// testRetryKillNodeHosts is KillNode with the nodes' own addresses in the
// connection string: connect failures go through pgx's host fallbacks and
// new connections are placed away from the failed node.
func testRetryKillNodeHosts(t *testing.T, c *clustertest.Cluster) {
	p := newRetryPool(t, c.HostsDSN(), 12)
	res := withLoad(func() { crash(t, c.Node(2), retryLoad(t)) }, p)[0]
	t.Logf("crash, several hosts: %s; p99 %v; nodes %+v", res.summary(), res.p99(), p.NodeStats())
	if len(res.errs) != 0 || res.ops == 0 {
		t.Errorf("callers saw errors when a node crashed: %s", res.summary())
	}
}

// testRetryNonIdempotentKill inserts rows with unique (worker, seq) keys and
// no retry mark while a node crashes with one insert certainly in flight on
// it: every insert the caller saw succeed is applied exactly once, none
// twice, every failure that left its row applied says its outcome is
// unknown, no failure that says it is known applied, and the insert in
// flight says its outcome is unknown.
func testRetryNonIdempotentKill(t *testing.T, c *clustertest.Cluster) {
	p := newRetryPool(t, c.DSN(), 12)
	ctx := faultCtx(t)
	for _, n := range c.Nodes() {
		if err := n.ExecDirect(ctx, "TRUNCATE ids"); err != nil {
			t.Fatal(err)
		}
	}

	type outcome struct {
		err error
	}
	var mu sync.Mutex
	outcomes := make(map[[2]int]outcome)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range loadWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := 0; ; seq++ {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
				_, err := p.Exec(ctx, "INSERT INTO ids (worker, seq) VALUES ($1, $2)", w, seq)
				cancel()
				mu.Lock()
				outcomes[[2]int{w, seq}] = outcome{err}
				mu.Unlock()
			}
		}()
	}
	// The crash comes while one write is certainly in flight: a slow
	// INSERT (a 60 s pg_sleep on the server, cancelled after the crash so
	// it never commits) is running on the node that is killed, seen in
	// pg_stat_activity. Its caller must hear that the outcome is unknown.
	direct := make(map[int]*pgx.Conn)
	for _, n := range c.Nodes() {
		conn, err := pgx.Connect(ctx, n.PostgresDSN())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
		direct[n.ID()] = conn
	}
	const sleeping = `SELECT pid FROM pg_stat_activity WHERE state = 'active' AND wait_event = 'PgSleep' AND query LIKE 'INSERT INTO ids%'`
	inFlight := [2]int{-1, 0}
	slowDone := make(chan error, 1)
	load := retryLoad(t)
	time.Sleep(load / 3)
	go func() {
		_, err := p.Exec(ctx, "INSERT INTO ids (worker, seq) SELECT $1::int, $2::int FROM pg_sleep(60)", inFlight[0], inFlight[1])
		slowDone <- err
	}()
	var victim *clustertest.Node
	var pid int
	waitCond(t, func() string {
		for _, n := range c.Nodes() {
			if err := direct[n.ID()].QueryRow(ctx, sleeping).Scan(&pid); err == nil {
				victim = n
				return ""
			} else if !errors.Is(err, pgx.ErrNoRows) {
				return fmt.Sprintf("node %d: pg_stat_activity: %v", n.ID(), err)
			}
		}
		return "the slow INSERT is not running on any server yet"
	})
	victim.Kill()
	if _, err := direct[victim.ID()].Exec(ctx, "SELECT pg_cancel_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	slowErr := <-slowDone
	mu.Lock()
	outcomes[inFlight] = outcome{slowErr}
	mu.Unlock()
	time.Sleep(load / 3)
	if err := victim.Restart(faultCtx(t)); err != nil {
		t.Fatalf("restart node %d: %v", victim.ID(), err)
	}
	time.Sleep(load / 3)
	close(stop)
	wg.Wait()
	if !errors.Is(slowErr, ErrOutcomeUnknown) {
		t.Errorf("the INSERT in flight on node %d when it crashed: %v, want ErrOutcomeUnknown", victim.ID(), slowErr)
	}

	// The union of every node's table.
	applied := make(map[[2]int]int)
	for _, n := range c.Nodes() {
		conn, err := pgx.Connect(ctx, n.PostgresDSN())
		if err != nil {
			t.Fatal(err)
		}
		rows, _ := conn.Query(ctx, "SELECT worker, seq FROM ids")
		var key [2]int
		_, err = pgx.ForEachRow(rows, []any{&key[0], &key[1]}, func() error {
			applied[key]++
			return nil
		})
		conn.Close(ctx)
		if err != nil {
			t.Fatal(err)
		}
	}

	var ok, unknown, failed int
	for key, o := range outcomes {
		n := applied[key]
		switch {
		case n > 1:
			t.Errorf("insert %v applied %d times (error %v)", key, n, o.err)
		case o.err == nil:
			ok++
			if n != 1 {
				t.Errorf("insert %v succeeded but is not in any table", key)
			}
		case errors.Is(o.err, ErrOutcomeUnknown):
			unknown++
		default:
			failed++
			if n != 0 {
				t.Errorf("insert %v failed with a known outcome but was applied: %v", key, o.err)
			}
		}
	}
	for key := range applied {
		if _, ok := outcomes[key]; !ok {
			t.Errorf("row %v applied but never inserted", key)
		}
	}
	t.Logf("non-idempotent inserts: %d ok, %d outcome unknown (one of them the slow INSERT), %d failed", ok, unknown, failed)
	if ok == 0 || unknown == 0 {
		t.Errorf("%d inserts succeeded and %d had an unknown outcome, want both", ok, unknown)
	}
}

// testRetryCallerCancel: callers cancelling their own contexts (before and
// during queries) under load never make a node unhealthy.
func testRetryCallerCancel(t *testing.T, c *clustertest.Cluster) {
	p := newRetryPool(t, c.DSN(), 12)

	var canceled atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range loadWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 2))
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rng.IntN(30))*time.Millisecond)
				var err error
				if i%2 == 0 {
					_, err = p.Exec(ctx, "SELECT pg_sleep(0.02)")
				} else {
					err = p.BeginFunc(ctx, func(tx pgx.Tx) error {
						_, err := tx.Exec(ctx, "SELECT pg_sleep(0.01)")
						return err
					})
				}
				cancel()
				if err != nil {
					if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
						t.Errorf("unexpected error: %v", err)
					}
					canceled.Add(1)
				}
			}
		}()
	}
	time.Sleep(min(retryLoad(t)/2, 3*time.Second))
	close(stop)
	wg.Wait()

	if canceled.Load() == 0 {
		t.Fatal("no call was cancelled; the test tested nothing")
	}
	for _, s := range p.NodeStats() {
		if !s.Healthy || s.Evictions != 0 || s.Retries != 0 {
			t.Errorf("node %d counted the callers' cancellations: %+v", s.ID, s)
		}
	}
	// And the pool still works.
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	if _, err := p.Exec(ctx, "SELECT 1"); err != nil {
		t.Error(err)
	}
	t.Logf("%d calls cancelled by their callers; nodes %+v", canceled.Load(), p.NodeStats())
}

// testRetryAllNodesDown: with every node down, each call returns by its
// context deadline with an error that names the attempts and the nodes.
func testRetryAllNodesDown(t *testing.T, c *clustertest.Cluster) {
	p := newRetryPool(t, c.DSN(), 6)
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	if _, err := p.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes() {
		n.Kill()
	}

	const callTimeout = 2 * time.Second
	var retryErrors atomic.Int64
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 2 {
				ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
				done := make(chan error, 1)
				go func() {
					if (w+i)%2 == 0 {
						_, err := p.Exec(WithIdempotent(ctx), upsertSQL, w, i)
						done <- err
					} else {
						done <- p.QueryRow(ctx, "SELECT v FROM kv WHERE k = $1", w).Scan(new(int))
					}
				}()
				select {
				case err := <-done:
					var re *RetryError
					switch {
					case err == nil:
						t.Error("a call succeeded with every node down")
					case !errors.As(err, &re) && errors.Is(err, ctx.Err()):
						// The first attempt used up the whole deadline (a
						// loaded machine): the caller's own context error,
						// unwrapped, as from pgxpool.
					case !errors.As(err, &re):
						t.Errorf("error is neither a *RetryError nor the caller's context error: %v", err)
					case !strings.Contains(err.Error(), "attempt") || len(re.Nodes) > 0 && !strings.Contains(err.Error(), "on nodes"):
						t.Errorf("error does not name attempts and nodes: %v", err)
					default:
						retryErrors.Add(1)
						if w == 0 {
							t.Logf("call %d: %v", i, err)
						}
					}
				case <-time.After(callTimeout + 15*time.Second):
					t.Error("a call did not return by its context deadline (plus a generous margin)")
				}
				cancel()
			}
		}()
	}
	wg.Wait()
	if retryErrors.Load() == 0 {
		t.Error("no call returned a *RetryError naming attempts and nodes")
	}
}

// testRetrySQLState checks the policy against errors raised by a real
// server: 40001 is retried (BeginFunc re-runs the function), 40003 only when
// idempotent, other errors never, WithoutRetry and Config.RetryPolicy turn
// retries off, and the errors keep their *pgconn.PgError.
func testRetrySQLState(t *testing.T, c *clustertest.Cluster) {
	const maxRetries = 2
	// DefaultRetryPolicy behind a tripwire: the pool may consult its policy
	// only while attempts remain, so one consulted past MaxRetries ends the
	// call there (and fails the test below) instead of retrying 40001 until
	// the context ends.
	var pastCap atomic.Int64
	capped := func(ctx context.Context, rp RetryParams) bool {
		if rp.Attempt > rp.MaxRetries {
			pastCap.Add(1)
			return false
		}
		return DefaultRetryPolicy(ctx, rp)
	}
	defer func() {
		if n := pastCap.Load(); n != 0 {
			t.Errorf("the pool consulted its policy %d times past MaxRetries %d", n, maxRetries)
		}
	}()
	p := newRetryPoolWith(t, c.DSN(), 4, func(cfg *Config) {
		cfg.MaxRetries = maxRetries
		cfg.RetryPolicy = capped
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// check wants err to carry SQLSTATE code after attempts attempts
	// (1: returned unchanged, not a *RetryError).
	check := func(name string, err error, code string, attempts int, unknown bool) {
		t.Helper()
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != code {
			t.Errorf("%s: error %v does not carry SQLSTATE %s", name, err, code)
		}
		var re *RetryError
		switch {
		case attempts == 1 && !unknown && errors.As(err, &re):
			t.Errorf("%s: a single attempt's error was wrapped: %v", name, err)
		case (attempts > 1 || unknown) && (!errors.As(err, &re) || re.Attempts != attempts):
			t.Errorf("%s: want %d attempts, got %v", name, attempts, err)
		}
		if errors.Is(err, ErrOutcomeUnknown) != unknown {
			t.Errorf("%s: errors.Is(ErrOutcomeUnknown) = %v, want %v: %v", name, !unknown, unknown, err)
		}
	}

	_, err := p.Exec(ctx, "SELECT fail_with('40001')")
	check("Exec 40001", err, "40001", maxRetries+1, false)
	err = p.QueryRow(ctx, "SELECT fail_with('40001')").Scan(new(int))
	check("QueryRow 40001", err, "40001", maxRetries+1, false)
	_, err = p.Query(ctx, "SELECT fail_with('40001')")
	check("Query 40001", err, "40001", maxRetries+1, false)
	b := &pgx.Batch{}
	b.Queue("SELECT fail_with('40001')")
	br := p.SendBatch(ctx, b)
	_, err = br.Exec()
	br.Close()
	check("SendBatch 40001", err, "40001", maxRetries+1, false)

	_, err = p.Exec(WithoutRetry(ctx), "SELECT fail_with('40001')")
	check("WithoutRetry 40001", err, "40001", 1, false)
	_, err = p.Exec(ctx, "SELECT fail_with('40003')")
	check("Exec 40003", err, "40003", 1, true)
	_, err = p.Exec(WithIdempotent(ctx), "SELECT fail_with('40003')")
	check("idempotent Exec 40003", err, "40003", maxRetries+1, true)
	_, err = p.Exec(WithIdempotent(ctx), "SELECT fail_with('23505')")
	check("Exec 23505", err, "23505", 1, false)

	// BeginFunc re-runs the function after 40001 until it succeeds.
	calls := 0
	err = p.BeginFunc(ctx, func(tx pgx.Tx) error {
		calls++
		sql := "SELECT 1"
		if calls < 3 {
			sql = "SELECT fail_with('40001')"
		}
		_, err := tx.Exec(ctx, sql)
		return err
	})
	if err != nil || calls != 3 {
		t.Errorf("BeginFunc: %v after %d calls, want success after 3", err, calls)
	}
	// A non-database error from the function is returned as is, once.
	errMine := errors.New("mine")
	calls = 0
	err = p.BeginFunc(ctx, func(tx pgx.Tx) error { calls++; return errMine })
	if err != errMine || calls != 1 {
		t.Errorf("BeginFunc: %v after %d calls, want errMine after 1", err, calls)
	}

	// Query's first row is read before it returns; the rows behave as
	// pgx's, empty or not, and give their connection back.
	for _, tc := range []struct {
		sql  string
		want int
	}{{"SELECT generate_series(1, 3)", 3}, {"SELECT 1 WHERE false", 0}} {
		rows, err := p.Query(ctx, tc.sql)
		if err != nil {
			t.Fatal(err)
		}
		got, err := pgx.CollectRows(rows, pgx.RowTo[int])
		if err != nil || len(got) != tc.want || rows.CommandTag().RowsAffected() != int64(tc.want) {
			t.Errorf("Query(%q): %v, %v, tag %v; want %d rows", tc.sql, got, err, rows.CommandTag(), tc.want)
		}
	}
	// The pool's own work (a balance round's idle sweep, a refill, the
	// discovery query) holds a connection for a moment now and then, so
	// wait: a connection the rows kept stays acquired for good.
	noneAcquired := func(after string) {
		t.Helper()
		waitCond(t, func() string {
			if n := p.Stat().AcquiredConns(); n != 0 {
				return fmt.Sprintf("%d connections still acquired after %s", n, after)
			}
			return ""
		})
	}
	noneAcquired("reading rows")

	// A network error from something else the function talks to is not
	// this node's failure: returned once, nothing evicted.
	foreign := fmt.Errorf("calling another service: %w", sysErr(syscall.ECONNRESET))
	calls = 0
	err = p.BeginFunc(ctx, func(tx pgx.Tx) error { calls++; return foreign })
	if err != foreign || calls != 1 {
		t.Errorf("BeginFunc: %v after %d calls, want the foreign error after 1", err, calls)
	}
	for _, s := range p.NodeStats() {
		if s.Evictions != 0 {
			t.Errorf("a foreign network error evicted node %d", s.ID)
		}
	}
	// A panicking function leaves no connection acquired.
	func() {
		defer func() { _ = recover() }()
		_ = p.BeginFunc(ctx, func(tx pgx.Tx) error { panic("boom") })
	}()
	noneAcquired("a panic in BeginFunc")

	// Retries are traced: two retries, then the end of the call.
	tr := &retryTrace{}
	traced := newRetryPoolWith(t, c.DSN(), 2, func(cfg *Config) {
		cfg.MaxRetries = maxRetries
		cfg.RetryPolicy = capped
		cfg.Tracer = tr
	})
	_, err = traced.Exec(ctx, "SELECT fail_with('40001')")
	check("traced Exec 40001", err, "40001", maxRetries+1, false)
	tr.mu.Lock()
	if tr.retries != maxRetries || len(tr.ends) != 1 || tr.ends[0].Outcome != RetryGaveUp || tr.ends[0].Attempts != maxRetries+1 {
		t.Errorf("traced %d retries and ends %+v; want %d retries and one gave_up end", tr.retries, tr.ends, maxRetries)
	}
	tr.mu.Unlock()

	// A policy that never retries 40001.
	noRestart := newRetryPoolWith(t, c.DSN(), 2, func(cfg *Config) {
		cfg.RetryPolicy = func(ctx context.Context, p RetryParams) bool {
			return p.Class != ClassRestartTxn && DefaultRetryPolicy(ctx, p)
		}
	})
	_, err = noRestart.Exec(ctx, "SELECT fail_with('40001')")
	check("RetryPolicy 40001", err, "40001", 1, false)
}

type retryTrace struct {
	mu      sync.Mutex
	retries int
	ends    []TraceRetryEndData
}

func (r *retryTrace) TraceRetry(context.Context, *Pool, TraceRetryData) {
	r.mu.Lock()
	r.retries++
	r.mu.Unlock()
}

func (r *retryTrace) TraceRetryEnd(_ context.Context, _ *Pool, data TraceRetryEndData) {
	r.mu.Lock()
	r.ends = append(r.ends, data)
	r.mu.Unlock()
}
