package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"
)

// recorder is a tracer implementing every interface; it keeps the events.
// It also reads the pool's stats on every event, as the documentation allows,
// so the integration tests would deadlock if an event were reported with a
// lock of the pool held.
type recorder struct {
	mu     sync.Mutex
	events []any
}

func (r *recorder) record(pool *Pool, e any) {
	if pool != nil {
		pool.NodeStats()
		pool.ClusterStat()
	}
	r.add(e)
}

func (r *recorder) add(e any) {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
}

func (r *recorder) TraceNodeAdded(_ context.Context, p *Pool, d TraceNodeAddedData) { r.record(p, d) }
func (r *recorder) TraceNodeRemoved(_ context.Context, p *Pool, d TraceNodeRemovedData) {
	r.record(p, d)
}
func (r *recorder) TraceNodeHealth(_ context.Context, p *Pool, d TraceNodeHealthData) { r.record(p, d) }
func (r *recorder) TraceNodeDraining(_ context.Context, p *Pool, d TraceNodeDrainingData) {
	r.record(p, d)
}
func (r *recorder) TracePrune(_ context.Context, p *Pool, d TracePruneData) { r.record(p, d) }
func (r *recorder) TraceRetry(_ context.Context, p *Pool, d TraceRetryData) { r.record(p, d) }
func (r *recorder) TraceRetryEnd(_ context.Context, p *Pool, d TraceRetryEndData) {
	r.record(p, d)
}
func (r *recorder) TraceProbe(_ context.Context, p *Pool, d TraceProbeData) { r.record(p, d) }
func (r *recorder) TraceConnectThrottled(_ context.Context, p *Pool, d TraceConnectThrottledData) {
	r.record(p, d)
}
func (r *recorder) TraceHookPanic(_ context.Context, p *Pool, d TraceHookPanicData) { r.record(p, d) }
func (r *recorder) TraceDiscoveryPaused(_ context.Context, p *Pool, d TraceDiscoveryPausedData) {
	r.record(p, d)
}

// eventsOf returns the recorded events of type T.
func eventsOf[T any](r *recorder) []T {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []T
	for _, e := range r.events {
		if e, ok := e.(T); ok {
			out = append(out, e)
		}
	}
	return out
}

// Single-interface tracers, for CombineTracers and interface discovery.
type retryOnly struct{ n *int }

func (t retryOnly) TraceRetry(context.Context, *Pool, TraceRetryData)       { *t.n++ }
func (t retryOnly) TraceRetryEnd(context.Context, *Pool, TraceRetryEndData) { *t.n += 10 }

type probeOnly struct{ n *int }

func (t probeOnly) TraceProbe(context.Context, *Pool, TraceProbeData) { *t.n++ }

type notATracer struct{}

func TestCombineTracers(t *testing.T) {
	var a, b, c int
	ra, rb, pc := retryOnly{&a}, retryOnly{&b}, probeOnly{&c}

	if got := CombineTracers(); got != nil {
		t.Errorf("CombineTracers() = %v, want nil", got)
	}
	if got := CombineTracers(nil, notATracer{}); got != nil {
		t.Errorf("CombineTracers(nil, notATracer) = %v, want nil", got)
	}
	if got := CombineTracers(nil, ra, notATracer{}); got != any(ra) {
		t.Errorf("CombineTracers of one tracer = %#v, want it unchanged", got)
	}

	// Nested combinations flatten; each event reaches each implementer once.
	all := CombineTracers(CombineTracers(ra, pc), rb)
	m, ok := all.(*multiTracer)
	if !ok || len(m.all) != 3 || len(m.retry) != 2 || len(m.probe) != 1 || len(m.node) != 0 {
		t.Fatalf("CombineTracers = %#v", all)
	}
	o := newObserver(nil, all)
	if o.retry == nil || o.probe == nil {
		t.Fatal("combined retry and probe tracers not found")
	}
	if o.node != nil || o.prune != nil || o.connect != nil {
		t.Errorf("interfaces no member implements were found: node %v prune %v connect %v", o.node, o.prune, o.connect)
	}
	o.retrying(context.Background(), RetryParams{Attempt: 1}, 0)
	o.retryEnded(context.Background(), TraceRetryEndData{Outcome: RetryGaveUp, Attempts: 2, Err: errors.New("x"), Class: ClassPermanent})
	o.probed(context.Background(), 1, nil)
	if a != 11 || b != 11 || c != 1 {
		t.Errorf("calls: a=%d b=%d c=%d, want 11 11 1", a, b, c)
	}
}

func TestObserverFindsInterfacesOnce(t *testing.T) {
	var n int
	o := newObserver(nil, retryOnly{&n})
	if o.retry == nil || o.node != nil || o.prune != nil || o.probe != nil || o.connect != nil {
		t.Errorf("observer of a RetryTracer: %+v", o)
	}
	o = newObserver(nil, &recorder{})
	if o.retry == nil || o.node == nil || o.prune == nil || o.probe == nil || o.connect == nil || o.hook == nil || o.discovery == nil {
		t.Errorf("observer of a full tracer misses interfaces: %+v", o)
	}
}

// With no tracer, reporting an event allocates nothing; a nil observer (the
// tracker's unit tests) is safe.
func TestObserverNoTracerNoAllocs(t *testing.T) {
	o := newObserver(nil, nil)
	ctx := context.Background()
	err := errors.New("boom")
	nodes := []NodeID{1, 2}
	allocs := testing.AllocsPerRun(100, func() {
		o.nodeHealth(1, false)
		o.nodeDraining(1, true)
		o.retrying(ctx, RetryParams{Attempt: 1, Err: err}, time.Millisecond)
		o.retryEnded(ctx, TraceRetryEndData{Outcome: RetryGaveUp, Attempts: 2, Nodes: nodes, Err: err, Class: ClassPermanent})
		o.probed(ctx, 1, err)
		o.discoveryPaused(ctx, "gossip", err, time.Time{})
	})
	if allocs != 0 {
		t.Errorf("%v allocations per event batch without a tracer, want 0", allocs)
	}
	var nilObs *observer
	nilObs.nodeSeen(&node{id: 1}, "")
	nilObs.nodesRemoved([]NodeID{1})
	nilObs.nodeHealth(1, true)
	nilObs.nodeDraining(1, true)
	nilObs.pruned(ctx, nil, nil)
	nilObs.retrying(ctx, RetryParams{}, 0)
	nilObs.retryEnded(ctx, TraceRetryEndData{Outcome: RetrySucceeded, Attempts: 2})
	nilObs.probed(ctx, 0, nil)
	nilObs.hookPanicked(ctx, hookBeforeClose, "boom", nil)
	nilObs.discoveryPaused(ctx, "sessions", nil, time.Time{})
}

// The wrappers around the caller's hooks cost no allocation when the hook
// returns normally: PrepareConn runs at every acquire.
func TestHookWrappersNoAllocs(t *testing.T) {
	p := &Pool{obs: newObserver(nil, nil), prepareConnHook: hookPrepareConn}
	p.userPrepareConn = func(context.Context, *pgx.Conn) (bool, error) { return true, nil }
	p.userAfterConnect = func(context.Context, *pgx.Conn) error { return nil }
	p.userBeforeClose = func(*pgx.Conn) {}
	ctx := context.Background()
	allocs := testing.AllocsPerRun(100, func() {
		_, _ = p.callPrepareConn(ctx, nil)
		_ = p.callAfterConnect(ctx, nil)
		p.callBeforeClose(nil)
	})
	if allocs != 0 {
		t.Errorf("%v allocations per hook calls, want 0", allocs)
	}
}

// A recovered hook panic is counted and reaches every HookTracer combined,
// with the value, and the hook's error names the hook and wraps an error
// value.
func TestHookPanicRecovered(t *testing.T) {
	r1, r2 := &recorder{}, &hookRecorder{}
	p := &Pool{prepareConnHook: hookBeforeAcquire, tracker: newTracker()}
	p.obs = newObserver(p, CombineTracers(r1, r2, retryOnly{new(int)}))
	boom := errors.New("boom")
	p.userPrepareConn = func(context.Context, *pgx.Conn) (bool, error) { panic(boom) }
	ok, err := p.callPrepareConn(context.Background(), nil)
	if ok || !errors.Is(err, boom) || err.Error() != "clusterpool: BeforeAcquire hook panicked: boom" {
		t.Errorf("callPrepareConn = %v, %v", ok, err)
	}
	p.userBeforeClose = func(*pgx.Conn) { panic(nil) } // a *runtime.PanicNilError since Go 1.21
	p.callBeforeClose(nil)
	if n := p.ClusterStat().HookPanics(); n != 2 {
		t.Errorf("HookPanics() = %d, want 2", n)
	}
	events := eventsOf[TraceHookPanicData](r1)
	if len(events) != 2 || events[0].Hook != hookBeforeAcquire || events[0].Value != boom ||
		events[1].Hook != hookBeforeClose || events[1].Value == nil || len(events[0].Stack) == 0 {
		t.Errorf("events %+v", events)
	}
	if n := r2.count(t, hookBeforeAcquire) + r2.count(t, hookBeforeClose); n != 2 {
		t.Errorf("second tracer got %d panics, want 2", n)
	}
}

func TestObserverCounters(t *testing.T) {
	r := &recorder{}
	o := newObserver(nil, r)
	ctx := context.Background()
	n1, n2 := &node{id: 1}, &node{id: 2}

	o.nodeSeen(n1, "10.0.0.1:26257")
	o.nodeSeen(n1, "")
	o.nodeSeen(n2, "")
	o.nodesRemoved([]NodeID{2, 7}) // 7 was never reported
	n2again := &node{id: 2}
	o.nodeSeen(n2again, "") // created again after expiry: added again
	o.nodeHealth(1, false)
	o.nodeHealth(1, true)
	o.nodeDraining(2, true)

	n1.pruned.Store(3)
	n2again.pruned.Store(1)
	views := []nodeView{{ID: 1, Eligible: true}, {ID: 2, Eligible: false}}
	o.pruned(ctx, []*node{n1, n2again}, views)
	o.pruned(ctx, []*node{n1, n2again}, views) // nothing new
	n1.pruned.Add(2)
	o.pruned(ctx, []*node{n1, n2again}, views)

	o.retrying(ctx, RetryParams{Attempt: 1, Node: 1, Class: ClassConnection, Stage: StageStatement}, 0)
	o.retryEnded(ctx, TraceRetryEndData{Outcome: RetrySucceeded, Attempts: 2, Nodes: []NodeID{1}})
	o.retryEnded(ctx, TraceRetryEndData{Outcome: RetryOutcomeUnknown, Attempts: 1, Nodes: []NodeID{2}, Err: ErrOutcomeUnknown, Class: ClassPermanent})
	o.probed(ctx, 0, errors.New("refused"))
	o.probed(ctx, 3, nil)

	added := eventsOf[TraceNodeAddedData](r)
	if want := []TraceNodeAddedData{{1, "10.0.0.1:26257"}, {2, ""}, {2, ""}}; !slices.Equal(added, want) {
		t.Errorf("added %v, want %v", added, want)
	}
	if removed := eventsOf[TraceNodeRemovedData](r); !slices.Equal(removed, []TraceNodeRemovedData{{2}}) {
		t.Errorf("removed %v, want [{2}]", removed)
	}
	if h := eventsOf[TraceNodeHealthData](r); !slices.Equal(h, []TraceNodeHealthData{{1, false}, {1, true}}) {
		t.Errorf("health %v", h)
	}
	prunes := eventsOf[TracePruneData](r)
	wantPrunes := []TracePruneData{{1, 3, PruneRebalance}, {2, 1, PruneNodeUnavailable}, {1, 2, PruneRebalance}}
	if !slices.Equal(prunes, wantPrunes) {
		t.Errorf("prunes %v, want %v", prunes, wantPrunes)
	}
	ends := eventsOf[TraceRetryEndData](r)
	if len(ends) != 2 || ends[1].Class != ClassPermanent || ends[0].Outcome != RetrySucceeded {
		t.Errorf("retry ends %+v", ends)
	}

	c := &o.counters
	for name, got := range map[string]int64{
		"nodesAdded":    c.nodesAdded.Load(),
		"nodesRemoved":  c.nodesRemoved.Load(),
		"evictions":     c.evictions.Load(),
		"pruned":        c.pruned.Load(),
		"retryAttempts": c.retryAttempts.Load(),
		"succeeded":     c.retryOutcomes[RetrySucceeded].Load(),
		"unknown":       c.retryOutcomes[RetryOutcomeUnknown].Load(),
		"probes":        c.probes.Load(),
		"probeFailures": c.probeFailures.Load(),
	} {
		want := map[string]int64{"nodesAdded": 3, "nodesRemoved": 1, "evictions": 1, "pruned": 6,
			"retryAttempts": 1, "succeeded": 1, "unknown": 1, "probes": 2, "probeFailures": 1}[name]
		if got != want {
			t.Errorf("%s = %d, want %d", name, got, want)
		}
	}
}

func TestWaitConnectReportsThrottling(t *testing.T) {
	r := &recorder{}
	o := newObserver(nil, r)
	b := &connectBudget{limiter: rate.NewLimiter(rate.Limit(200), 1), obs: o}
	ctx := context.Background()
	if _, err := b.take(ctx, true, nil); err != nil { // the burst token: no wait
		t.Fatal(err)
	}
	if got := eventsOf[TraceConnectThrottledData](r); len(got) != 0 {
		t.Fatalf("throttle reported for an available token: %v", got)
	}
	if _, err := b.take(ctx, true, nil); err != nil {
		t.Fatal(err)
	}
	got := eventsOf[TraceConnectThrottledData](r)
	if len(got) != 1 || got[0].Limit != 200 || got[0].Err != nil {
		t.Fatalf("throttle events %+v", got)
	}
	// A context that ends during the wait is reported with its error.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	b.limiter = rate.NewLimiter(rate.Limit(0.001), 1)
	b.limiter.Allow()
	if _, err := b.take(cctx, true, nil); err == nil {
		t.Fatal("take with a canceled context succeeded")
	}
	if got := eventsOf[TraceConnectThrottledData](r); len(got) != 2 || got[1].Err == nil {
		t.Fatalf("throttle events %+v", got)
	}
	if n := o.counters.connectsThrottled.Load(); n != 2 {
		t.Errorf("connectsThrottled = %d, want 2", n)
	}
}

func TestConfigTracerMustImplementATracer(t *testing.T) {
	cfg, err := ParseConfig("postgres://u@127.0.0.1:1/db")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Tracer = notATracer{}
	_, err = NewWithConfig(context.Background(), cfg)
	if err == nil || !strings.Contains(err.Error(), "Config.Tracer") {
		t.Fatalf("NewWithConfig with a non-tracer: %v", err)
	}
}

func TestEnumStrings(t *testing.T) {
	for _, o := range RetryOutcomes() {
		if s := o.String(); s == "unknown" || strings.ContainsAny(s, " -") {
			t.Errorf("RetryOutcome(%d) = %q", o, s)
		}
	}
	if PruneRebalance.String() != "rebalance" || PruneNodeUnavailable.String() != "node_unavailable" {
		t.Error("PruneReason strings")
	}
}

// Integration tier: each event fires in the clustertest scenario that
// should cause it.

const (
	traceBalanceInterval = 100 * time.Millisecond
	traceProbeInterval   = 100 * time.Millisecond
)

// waitEvent waits until r holds an event of type T for which ok is true.
func waitEvent[T any](t *testing.T, r *recorder, what string, ok func(T) bool) T {
	t.Helper()
	var found T
	waitCond(t, func() string {
		for _, e := range eventsOf[T](r) {
			if ok(e) {
				found = e
				return ""
			}
		}
		return fmt.Sprintf("no %s event yet; events of that type: %+v", what, eventsOf[T](r))
	})
	return found
}

// assertEvictedAfterRetry checks what an eviction of node id, and a retry
// that moved off it and succeeded, leave in ClusterStat and NodeStats.
func assertEvictedAfterRetry(t *testing.T, p *Pool, id NodeID) {
	t.Helper()
	st := p.ClusterStat()
	if st.Evictions() < 1 || st.RetryAttempts() < 1 || st.RetryOutcome(RetrySucceeded) < 1 {
		t.Errorf("ClusterStat: evictions %d retries %d succeeded %d", st.Evictions(), st.RetryAttempts(), st.RetryOutcome(RetrySucceeded))
	}
	stats := p.NodeStats()
	i := slices.IndexFunc(stats, func(s NodeStat) bool { return s.ID == id })
	if i < 0 {
		t.Errorf("node %d missing from NodeStat %+v", id, stats)
		return
	}
	if s := stats[i]; s.Healthy || s.Evictions < 1 || s.Retries < 1 {
		t.Errorf("node %d stats %+v", id, s)
	}
}

// waitSettled waits until the pool holds want connections spread over every
// node of c, none still being established, and the node proxies count the
// same connections. A connect still in flight when a test kills or drains a
// node could complete its handshake just before and report it to the pool
// just after the eviction, which marks the node healthy again (a successful
// connect is proof of life), and the node's health would flap.
func waitSettled(t *testing.T, p *Pool, c *clustertest.Cluster, want int) {
	t.Helper()
	match := countsMatch(p, c)
	waitCond(t, func() string {
		st, counts := p.Stat(), poolCounts(p)
		total := 0
		for _, k := range counts {
			total += k
		}
		if len(counts) < len(c.Nodes()) || total != want || st.ConstructingConns() > 0 {
			return fmt.Sprintf("pool counts %v (want %d on %d nodes), %d being established",
				counts, want, len(c.Nodes()), st.ConstructingConns())
		}
		return match()
	})
}

func TestTraceKilledNodeEvictionAndRetries(t *testing.T) {
	t.Parallel()
	// Round robin spreads the six connections two per node; with a random
	// load balancer a node would get none about a quarter of the time.
	c := clustertest.New(t, clustertest.Options{Nodes: 3, Balancing: clustertest.RoundRobin})
	r := &recorder{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 6, 6
		cfg.BalanceInterval = time.Hour // no pruning: the test controls the connections
		cfg.ProbeInterval = time.Hour   // no probe: nothing reaches node 2 while it is down
		cfg.ConnectRate = -1            // no limit
		cfg.Tracer = r
		// pgxpool pings a connection idle for over a second before handing
		// it out and quietly drops it if the ping fails: node 2's
		// connections would then vanish with no failed read, hence no
		// eviction and no retry to observe.
		cfg.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { return false }
	})
	waitSettled(t, p, c, 6)
	// Every connection is kept busy, so some read meets node 2's dead
	// connections (an idle pool would keep reusing one connection).
	stop := busyReads(t, p, 6)
	c.Node(2).Kill()
	ctx := testCtx(t)
	h := waitEvent(t, r, "node 2 unhealthy", func(e TraceNodeHealthData) bool { return e.Node == 2 && !e.Healthy })
	t.Logf("health event: %+v", h)
	re := waitEvent(t, r, "retry on node 2", func(e TraceRetryData) bool { return e.Node == 2 })
	if re.Class != ClassConnection || re.Err == nil || re.Attempt < 1 {
		t.Errorf("retry event %+v", re)
	}
	end := waitEvent(t, r, "retry success after node 2", func(e TraceRetryEndData) bool {
		return e.Outcome == RetrySucceeded && slices.Contains(e.Nodes, 2)
	})
	if end.Attempts < 2 || end.Err != nil {
		t.Errorf("retry end %+v", end)
	}
	assertEvictedAfterRetry(t, p, 2)

	stop()
	// Nothing could reach node 2 while it was down, so nothing may have
	// called it healthy.
	healthDown := eventsOf[TraceNodeHealthData](r)
	for _, e := range healthDown {
		if e.Node == 2 && e.Healthy {
			t.Errorf("node 2 reported healthy while down: health events %+v", healthDown)
			break
		}
	}

	// Back up: the first connection that reaches it marks it healthy.
	if err := c.Node(2).Restart(ctx); err != nil {
		t.Fatal(err)
	}
	p.Reset()
	waitCond(t, func() string {
		var one int
		_ = p.QueryRow(ctx, "SELECT 1").Scan(&one)
		if _, ok := poolCounts(p)[2]; !ok {
			return fmt.Sprintf("no connection on node 2 yet: %v", poolCounts(p))
		}
		return ""
	})
	waitCond(t, func() string {
		for _, e := range eventsOf[TraceNodeHealthData](r)[len(healthDown):] {
			if e.Node == 2 && e.Healthy {
				return ""
			}
		}
		return fmt.Sprintf("no node 2 healthy event after the restart; health events %+v", eventsOf[TraceNodeHealthData](r))
	})
}

func TestTraceWriteOutcomeUnknown(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 1})
	r := &recorder{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 1, 1
		cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
		cfg.ConnectRate = -1 // no limit
		cfg.Tracer = r
	})
	ctx := testCtx(t)
	if _, err := p.Exec(ctx, "CREATE TABLE IF NOT EXISTS kv (k INT PRIMARY KEY, v INT)"); err != nil {
		t.Fatal(err)
	}
	// The write sleeps on the server; the node dies while the server runs
	// it, seen in pg_stat_activity, so the write was sent and its answer
	// is lost: the pool must not run it again.
	const insert = "INSERT INTO kv (k, v) SELECT $1::int, $2::int FROM pg_sleep(60)"
	direct, err := pgx.Connect(ctx, c.Node(1).PostgresDSN())
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close(context.Background())
	killed := make(chan struct{})
	go func() {
		defer close(killed)
		defer c.Node(1).Kill()
		for {
			var k int
			if err := direct.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
				WHERE state = 'active' AND wait_event = 'PgSleep' AND pid <> pg_backend_pid()`).Scan(&k); err != nil {
				t.Errorf("pg_stat_activity: %v", err)
				return
			}
			if k > 0 {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	defer func() {
		// The server still runs the write after the proxy went: end it.
		_, _ = direct.Exec(context.Background(), `SELECT pg_cancel_backend(pid) FROM pg_stat_activity
			WHERE wait_event = 'PgSleep' AND pid <> pg_backend_pid()`)
	}()
	_, err = p.Exec(ctx, insert, 2, 2)
	<-killed
	if !errors.Is(err, ErrOutcomeUnknown) {
		t.Fatalf("the write did not end with an unknown outcome: %v; retries %+v", err, eventsOf[TraceRetryData](r))
	}
	end := waitEvent(t, r, "outcome unknown", func(e TraceRetryEndData) bool { return e.Outcome == RetryOutcomeUnknown })
	if end.Attempts != 1 || end.Err == nil {
		t.Errorf("retry end %+v", end)
	}
	if n := p.ClusterStat().RetryOutcome(RetryOutcomeUnknown); n != 1 {
		t.Errorf("ClusterStat outcome_unknown = %d, want 1", n)
	}
}

// busyReads runs SELECT 1 in workers goroutines until the returned stop is
// called (or the test ends); a failed read fails the test, since reads are
// retried on another node.
func busyReads(t *testing.T, p *Pool, workers int) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for ctx.Err() == nil {
				var one int
				if err := p.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil && ctx.Err() == nil {
					t.Errorf("a read failed: %v", err)
				}
			}
		})
	}
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); wg.Wait() }) }
	t.Cleanup(stop)
	return stop
}
