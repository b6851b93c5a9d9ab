package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

func TestTraceNodeLifecycleAndPruning(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2})
	r := &recorder{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 6, 6
		cfg.BalanceInterval = traceBalanceInterval
		cfg.ProbeInterval = traceProbeInterval
		cfg.ConnectRate = -1 // no limit
		cfg.Tracer = r
	})
	for _, id := range []NodeID{1, 2} {
		waitEvent(t, r, fmt.Sprintf("node %d added", id), func(e TraceNodeAddedData) bool { return e.Node == id })
	}
	waitEvent(t, r, "probe reaching a node", func(e TraceProbeData) bool { return e.Err == nil && e.Node != 0 })

	// A new node gets its share: the other nodes' excess is pruned.
	if _, err := c.AddNode(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, r, "node 3 added", func(e TraceNodeAddedData) bool { return e.Node == 3 })
	pr := waitEvent(t, r, "rebalance prune", func(e TracePruneData) bool {
		return e.Reason == PruneRebalance && e.Count > 0 && e.Node != 3
	})
	t.Logf("prune event: %+v", pr)
	st := p.ClusterStat()
	if st.NodesAdded() < 3 || st.PrunedConns() < 1 || st.Probes() < 1 {
		t.Errorf("ClusterStat: added %d pruned %d probes %d", st.NodesAdded(), st.PrunedConns(), st.Probes())
	}
	var perNode int64
	for _, s := range p.NodeStats() {
		perNode += s.Pruned
	}
	if perNode != st.PrunedConns() {
		t.Errorf("NodeStat pruned sum %d != ClusterStat.PrunedConns %d", perNode, st.PrunedConns())
	}

	// A node that leaves the cluster: its connections go, and once no probe
	// has reached it for the expiry window the pool forgets it.
	if err := c.RemoveNode(testCtx(t), 1); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, r, "node 1 removed", func(e TraceNodeRemovedData) bool { return e.Node == 1 })
	if n := p.ClusterStat().NodesRemoved(); n < 1 {
		t.Errorf("ClusterStat.NodesRemoved = %d", n)
	}
}

// A reconnect storm meets the connect limiter. The limiter starts with
// MaxConns tokens (its burst) and adds rate per second, so by time T after
// the pool was created at most burst + rate × T connects can have started
// without waiting. The storm reconnects as fast as it can until a connect
// has waited; with the rate at 1 per second it gets there within a second
// of using up the burst, however slow the machine, and a storm that got
// past the bound without any wait means the limiter was bypassed.
func TestTraceConnectThrottled(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2})
	r := &recorder{}
	const rate, burst = 1.0, 2 // burst: MaxConns
	created := time.Now()      // no later than the limiter's creation
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 0, burst
		cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
		cfg.ConnectRate = rate
		cfg.Tracer = r
	})
	ctx := testCtx(t)
	for p.ClusterStat().ThrottledConnects() == 0 {
		p.Reset()
		if err := p.Ping(ctx); err != nil {
			t.Fatal(err)
		}
		opened, allowed := p.Stat().NewConnsCount(), burst+rate*time.Since(created).Seconds()
		if float64(opened) > allowed {
			t.Fatalf("%d connects, none of them waited, where the limiter allows %.1f without waiting (burst %d + %g/s × %v)",
				opened, allowed, burst, rate, time.Since(created).Round(time.Millisecond))
		}
	}
	ev := waitEvent(t, r, "connect throttled", func(e TraceConnectThrottledData) bool { return e.Err == nil })
	if ev.Limit != rate || ev.Waited <= 0 {
		t.Errorf("throttle event %+v", ev)
	}
	if st := p.ClusterStat(); st.ThrottledConnects() < 1 || st.ConnectWaitDuration() <= 0 {
		t.Errorf("ClusterStat throttled %d waited %v", st.ThrottledConnects(), st.ConnectWaitDuration())
	}
}

// A drained node (57P01 on its connections) is evicted, and the reads that
// met it are retried elsewhere.
func TestTraceDrainedNode(t *testing.T) {
	t.Parallel()
	// Round robin spreads the six connections two per node; with a random
	// load balancer node 2 would get none about a quarter of the time.
	c := clustertest.New(t, clustertest.Options{Nodes: 3, Balancing: clustertest.RoundRobin})
	r := &recorder{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 6, 6
		cfg.BalanceInterval = time.Hour // no sweep: only a failed read may find node 2's closed connections
		cfg.ProbeInterval = time.Hour   // no probe: nothing reaches node 2 once it is down
		cfg.ConnectRate = -1            // no limit
		cfg.Tracer = r
		// pgxpool pings a connection idle for over a second before handing
		// it out and quietly drops it if the ping fails: node 2's
		// connections would then vanish with no failed read, hence no
		// eviction and no retry to observe.
		cfg.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { return false }
	})
	// No connect may be in flight at the drain: one whose handshake with
	// node 2 raced it would be reported after the eviction.
	waitSettled(t, p, c, 6)
	// The application keeps every connection busy while node 2 drains, as
	// during a rolling restart.
	stop := busyReads(t, p, 6)
	ctx := testCtx(t)
	if err := c.Node(2).Drain(ctx, 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, r, "node 2 evicted", func(e TraceNodeHealthData) bool { return e.Node == 2 && !e.Healthy })
	end := waitEvent(t, r, "retried read", func(e TraceRetryEndData) bool { return slices.Contains(e.Nodes, 2) })
	if end.Outcome != RetrySucceeded || end.Attempts < 2 || end.Err != nil {
		t.Errorf("a read that met node 2 ended %v: %+v", end.Outcome, end)
	}
	re := waitEvent(t, r, "retry after node 2", func(e TraceRetryData) bool { return e.Node == 2 })
	if re.Class != ClassConnection || re.Err == nil || re.Attempt < 1 {
		t.Errorf("retry event %+v", re)
	}
	stop()
	assertEvictedAfterRetry(t, p, 2)
	// Node 2 is down after the drain and nothing can reach it, so nothing
	// may have called it healthy again.
	for _, e := range eventsOf[TraceNodeHealthData](r) {
		if e.Node == 2 && e.Healthy {
			t.Errorf("node 2 reported healthy after its drain: health events %+v", eventsOf[TraceNodeHealthData](r))
			break
		}
	}
}

// A probe that cannot reach the cluster is reported with its error and
// counted, and counts against no node.
func TestTraceProbeFailure(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 1})
	r := &recorder{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 1, 1
		cfg.BalanceInterval = time.Hour
		cfg.ProbeInterval = traceProbeInterval
		cfg.ConnectRate = -1 // no limit
		cfg.Tracer = r
	})
	waitEvent(t, r, "successful probe", func(e TraceProbeData) bool { return e.Err == nil && e.Node == 1 })
	c.Node(1).Kill()
	ev := waitEvent(t, r, "failed probe", func(e TraceProbeData) bool { return e.Err != nil })
	if ev.Node != 0 {
		t.Errorf("failed probe names node %d", ev.Node)
	}
	if n := p.ClusterStat().ProbeFailures(); n < 1 {
		t.Errorf("ClusterStat.ProbeFailures = %d", n)
	}
	for _, s := range p.NodeStats() {
		if s.Evictions != 0 {
			t.Errorf("a failed probe evicted node %d: %+v", s.ID, s)
		}
	}
}

// CockroachDB's gossip says node 2 is draining: the probe reports it, and
// the balancer retires node 2's connections as unavailable. The clustertest
// nodes are PostgreSQL, so each gets the two gossip tables the probe reads
// (Cluster.SetGossip), which the test then rewrites.
func TestTraceGossipDraining(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, Balancing: clustertest.RoundRobin})
	ctx := testCtx(t)
	gossip := func(draining map[int]bool) {
		t.Helper()
		if err := c.SetGossip(ctx, draining); err != nil {
			t.Fatal(err)
		}
	}
	gossip(nil)

	r := &recorder{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 6, 6
		cfg.BalanceInterval = traceBalanceInterval
		cfg.ProbeInterval = traceProbeInterval
		cfg.ConnectRate = -1 // no limit
		cfg.Tracer = r
	})
	waitCond(t, func() string {
		if k := poolCounts(p)[2]; k == 0 {
			return fmt.Sprintf("no connection on node 2 yet: %v", poolCounts(p))
		}
		return ""
	})

	gossip(map[int]bool{2: true})
	waitEvent(t, r, "node 2 draining", func(e TraceNodeDrainingData) bool { return e.Node == 2 && e.Draining })
	waitEvent(t, r, "node 2 pruned as unavailable", func(e TracePruneData) bool {
		return e.Node == 2 && e.Reason == PruneNodeUnavailable && e.Count > 0
	})
	waitCond(t, func() string {
		if k := poolCounts(p)[2]; k != 0 {
			return fmt.Sprintf("node 2 still holds %d connections", k)
		}
		return ""
	})

	gossip(nil)
	waitEvent(t, r, "node 2 no longer draining", func(e TraceNodeDrainingData) bool { return e.Node == 2 && !e.Draining })
}

// nodeAddedUser uses the pool from the first TraceNodeAdded; later calls
// return at once (a sync.Once would make them wait for the first).
type nodeAddedUser struct {
	used atomic.Bool
	err  chan error
}

func (u *nodeAddedUser) TraceNodeAdded(ctx context.Context, p *Pool, _ TraceNodeAddedData) {
	if u.used.Swap(true) {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, condTimeout)
	defer cancel()
	_, err := p.Exec(ctx, "SELECT 1")
	u.err <- err
}
func (u *nodeAddedUser) TraceNodeRemoved(context.Context, *Pool, TraceNodeRemovedData)   {}
func (u *nodeAddedUser) TraceNodeHealth(context.Context, *Pool, TraceNodeHealthData)     {}
func (u *nodeAddedUser) TraceNodeDraining(context.Context, *Pool, TraceNodeDrainingData) {}

// A tracer may use the pool: the pool calls no tracer while it holds a lock
// that placing a connect needs. Here the first connection's AfterConnect
// calls TraceNodeAdded, whose query needs a second connection, placed over
// the listed hosts while the first is being counted.
func TestTracerMayUseThePool(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true})
	u := &nodeAddedUser{err: make(chan error, 1)}
	p := startPool(t, c.HostsDSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 0, 2
		cfg.Tracer = u
	})
	go func() { _ = p.Ping(testCtx(t)) }()
	select {
	case err := <-u.err:
		if err != nil {
			t.Fatalf("a query from TraceNodeAdded: %v", err)
		}
	case <-time.After(condTimeout):
		t.Fatalf("a query from TraceNodeAdded did not return within %v: the pool called the tracer under a lock", condTimeout)
	}
}

// A discovery table the server does not have (plain PostgreSQL: neither
// the gossip tables nor cluster_sessions), or refuses (a user without
// VIEWCLUSTERMETADATA), is reported with the server's error and when the
// pool reads it again, ten minutes on, and is not read again meanwhile.
func TestTraceDiscoveryPaused(t *testing.T) {
	t.Parallel()
	check := func(t *testing.T, r *recorder, table string, codes ...string) {
		t.Helper()
		ev := waitEvent(t, r, table+" paused", func(e TraceDiscoveryPausedData) bool { return e.Table == table })
		var pgErr *pgconn.PgError
		if !errors.As(ev.Err, &pgErr) || !slices.Contains(codes, pgErr.Code) {
			t.Errorf("%s paused with %v, want a server error with SQLSTATE in %v", table, ev.Err, codes)
		}
		if left := time.Until(ev.Until); left < gossipBackoff-time.Minute || left > gossipBackoff {
			t.Errorf("%s paused until %v from now, want about %v", table, left, gossipBackoff)
		}
	}
	// Probe ticks at traceProbeInterval: after several more, each table
	// was reported once.
	once := func(t *testing.T, r *recorder, p *Pool) {
		t.Helper()
		probes := p.ClusterStat().Probes()
		waitCond(t, func() string {
			if n := p.ClusterStat().Probes(); n < probes+5 {
				return fmt.Sprintf("%d probes since the events, want 5", n-probes)
			}
			return ""
		})
		tables := map[string]int{}
		for _, e := range eventsOf[TraceDiscoveryPausedData](r) {
			tables[e.Table]++
		}
		for table, n := range tables {
			if n != 1 {
				t.Errorf("%s paused %d times, want once: %+v", table, n, eventsOf[TraceDiscoveryPausedData](r))
			}
		}
	}
	start := func(t *testing.T, dsn string) (*recorder, *Pool) {
		r := &recorder{}
		p := startPool(t, dsn, func(cfg *Config) {
			cfg.MinConns, cfg.MaxConns = 2, 2
			cfg.BalanceInterval = time.Hour
			cfg.ProbeInterval = traceProbeInterval
			cfg.ProbeMaxInterval = -1 // every tick
			cfg.ConnectRate = -1      // no limit
			cfg.Tracer = r
		})
		return r, p
	}

	t.Run("Missing", func(t *testing.T) {
		t.Parallel()
		c := clustertest.New(t, clustertest.Options{Nodes: 2, Balancing: clustertest.RoundRobin})
		r, p := start(t, c.DSN())
		check(t, r, "gossip", "42P01", "3F000")
		check(t, r, "sessions", "42P01", "3F000")
		once(t, r, p)
	})
	t.Run("Refused", func(t *testing.T) {
		t.Parallel()
		c := clustertest.New(t, clustertest.Options{Nodes: 2, Balancing: clustertest.RoundRobin})
		ctx := testCtx(t)
		if err := c.SetGossip(ctx, nil); err != nil {
			t.Fatal(err)
		}
		for _, n := range c.Nodes() {
			if err := n.ExecDirect(ctx, "CREATE ROLE app LOGIN"); err != nil {
				t.Fatal(err)
			}
		}
		dsn := strings.Replace(c.DSN(), "postgres://postgres@", "postgres://app@", 1)
		if dsn == c.DSN() {
			t.Fatalf("unexpected DSN form %q", c.DSN())
		}
		r, p := start(t, dsn)
		check(t, r, "gossip", "42501")
		once(t, r, p)
	})
}
