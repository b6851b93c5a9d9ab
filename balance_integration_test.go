package clusterpool

import (
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
)

// Short intervals make a few seconds of a test stand for many rounds.
const (
	testBalanceInterval = 150 * time.Millisecond
	testProbeInterval   = 100 * time.Millisecond
)

func balancedConfig(minConns, maxConns int32) func(*Config) {
	return func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = minConns, maxConns
		cfg.BalanceInterval = testBalanceInterval
		cfg.ProbeInterval = testProbeInterval
		cfg.ConnectRate = -1 // no limit
	}
}

// spreadOf describes the servers' counts: "" when every node of the
// cluster holds within one of the others and the total is want (if >0).
func spreadOf(c *clustertest.Cluster, want int) string {
	counts := c.OpenConns()
	lo, hi, sum := 1<<30, 0, 0
	for _, n := range counts {
		lo, hi, sum = min(lo, n), max(hi, n), sum+n
	}
	if hi-lo > 1 || (want > 0 && sum != want) {
		return fmt.Sprintf("servers' counts %v (want spread <= 1, total %d)", counts, want)
	}
	return ""
}

func totalOpened(c *clustertest.Cluster) int64 {
	var sum int64
	for _, n := range c.Nodes() {
		sum += n.TotalConns()
	}
	return sum
}

// poolOpened is the number of connections the servers accepted for the pool
// itself: their total minus the connections the probes opened (every dial
// that succeeded, a probe that then timed out included). Removed nodes no
// longer count, so compare deltas taken while the node set is fixed.
func poolOpened(c *clustertest.Cluster, p *Pool) int64 {
	return totalOpened(c) - p.probeConns()
}

func TestBalanceEvenAtStart(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true})
	p := startPool(t, c.DSN(), balancedConfig(30, 30))
	waitCond(t, func() string { return spreadOf(c, 30) })
	// The pool's view equals the servers'.
	waitCond(t, func() string {
		if got, want := poolCounts(p), serverCounts(c); fmt.Sprint(got) != fmt.Sprint(want) {
			return fmt.Sprintf("pool %v, servers %v", got, want)
		}
		return ""
	})
}

// Behind one load-balancer address: a new node gets its share, a removed one
// is dropped from the targets, and once balanced nothing moves.
func TestBalanceScaleOutAndInBehindLoadBalancer(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true})
	p := startPool(t, c.DSN(), balancedConfig(30, 30))
	waitCond(t, func() string { return spreadOf(c, 30) })

	n4, err := c.AddNode(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	before := poolOpened(c, p)
	waitCond(t, func() string {
		if k := n4.OpenConns(); k < 7 || k > 8 {
			return fmt.Sprintf("node 4 holds %d, want 7 or 8; %v", k, c.OpenConns())
		}
		return spreadOf(c, 30)
	})
	moves := n4.OpenConns()
	opened := poolOpened(c, p) - before
	t.Logf("scale-out behind a random load balancer: %d opened for %d moves", opened, moves)
	// Each dial reaches the new node with probability 1/4 whatever the
	// strategy, so about 4 opens per move are expected (see README); the
	// bound here only catches runaway churn.
	if opened > int64(8*moves) {
		t.Errorf("opened %d connections for %d moves", opened, moves)
	}
	assertQuiet(t, c, p)

	if err := c.RemoveNode(testCtx(t), 2); err != nil {
		t.Fatal(err)
	}
	waitCond(t, func() string { return spreadOf(c, 30) })
	waitCond(t, func() string {
		for _, s := range p.NodeStats() {
			if s.ID == 2 && s.TotalConns > 0 {
				return fmt.Sprintf("pool still counts %d connections on removed node 2", s.TotalConns)
			}
		}
		return ""
	})
	assertQuiet(t, c, p)
}

// quietRounds is how many balancing rounds assertQuiet watches: the docs
// promise more than ten rounds with no connection opened.
const quietRounds = 11

// atOwnTargets describes the pool's own counts: "" when its healthy nodes
// hold exactly the targets its hash gives for size connections (a steady
// pool places its remainder there, so within ±1 is not yet converged).
func atOwnTargets(p *Pool, size int) string {
	var ids []NodeID
	got := make(map[NodeID]int)
	for _, s := range p.NodeStats() {
		if s.Healthy && !s.Draining {
			ids = append(ids, s.ID)
			got[s.ID] = int(s.TotalConns)
		}
	}
	if want := balanceTargets(size, ids, p.seed); !maps.Equal(got, want) {
		return fmt.Sprintf("pool's counts %v, its targets %v", got, want)
	}
	return ""
}

// assertQuiet waits until the pool has converged (balanced, at its own
// targets, and no connection opened for four rounds: a refill may still be
// landing when the counts first look even), then checks that the pool opens no connection
// while its own round counter advances by quietRounds: rounds in which a
// balanced pool must not oscillate, however slowly a loaded machine runs
// them. The probes' connections are not the pool's; one may straddle the
// start or the end of the period.
func assertQuiet(t *testing.T, c *clustertest.Cluster, p *Pool) {
	t.Helper()
	last, lastRound := p.Stat().NewConnsCount(), p.ClusterStat().BalanceRounds()
	waitCond(t, func() string {
		if n := p.Stat().NewConnsCount(); n != last {
			last, lastRound = n, p.ClusterStat().BalanceRounds()
		}
		if msg := spreadOf(c, 30); msg != "" {
			return msg
		}
		if msg := atOwnTargets(p, 30); msg != "" {
			return msg
		}
		if p.ClusterStat().BalanceRounds()-lastRound < 4 {
			return "connections opened in the last four rounds"
		}
		return ""
	})
	pruned := func() (k int64) {
		for _, s := range p.NodeStats() {
			k += s.Pruned
		}
		return k
	}
	before, newBefore, prunedBefore, rounds := poolOpened(c, p), p.Stat().NewConnsCount(), pruned(), p.ClusterStat().BalanceRounds()
	waitCond(t, func() string {
		if n := p.ClusterStat().BalanceRounds() - rounds; n < quietRounds {
			return fmt.Sprintf("%d rounds of quiet so far, want %d", n, quietRounds)
		}
		return ""
	})
	if opened, n := poolOpened(c, p)-before, p.Stat().NewConnsCount()-newBefore; opened > 1 || n != 0 {
		t.Errorf("balanced pool opened %d connections (servers: %d; pruned %d) in %d rounds of quiet: %v",
			n, opened, pruned()-prunedBefore, p.ClusterStat().BalanceRounds()-rounds, c.OpenConns())
	}
}

// Below MaxConns (MinConns 12 of 30) under light load the pool is balanced
// too: targets come from the pool's current size, not MaxConns.
func TestBalanceBelowMaxConns(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true})
	p := startPool(t, c.DSN(), balancedConfig(12, 30))
	ctx := testCtx(t)
	done := make(chan struct{})
	defer close(done)
	go func() { // light load: a couple of queries at a time
		for {
			select {
			case <-done:
				return
			default:
			}
			_, _ = p.Exec(ctx, "SELECT 1")
			time.Sleep(5 * time.Millisecond)
		}
	}()
	waitCond(t, func() string {
		counts := c.OpenConns()
		total := 0
		for _, n := range counts {
			total += n
		}
		if total < 12 {
			return fmt.Sprintf("pool below MinConns: %v", counts)
		}
		return spreadOf(c, 0)
	})
}

// After every node restarts, the pool reconnects within its connect rate.
// The limiter starts full with a burst of MaxConns and adds rate tokens a
// second, and the balancer has a start allowance of half the burst for its
// moves after the cold start, so from the moment the pool is created the
// number of connections it has opened can never exceed MaxConns +
// ⌈MaxConns/2⌉ + rate × (time since then). Three
// restarts in a row ask for 120 connections; the bound is checked at every
// poll, so without the limiter the count runs ahead of it at the first
// reconnect storm, however slow the machine (the window grows only with
// time the test spends, not with the pool's slowness to refill).
func TestBalanceConnectRateAfterRestart(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true})
	const rate, size = 20.0, 30
	created := time.Now()
	p := startPool(t, c.DSN(), func(cfg *Config) {
		balancedConfig(size, size)(cfg)
		cfg.ConnectRate = rate
	})
	// withinRate fails the test at once when the pool is over the bound:
	// the count is read before the clock, so the bound is never too tight.
	// It counts the connections the servers accepted for the pool, which
	// each took a token first; pgxpool's NewConnsCount counts a connect
	// when it starts, before it waits for its token, so a storm of 30
	// started together would overrun the bound by the connects waiting.
	withinRate := func() {
		t.Helper()
		opened := poolOpened(c, p)
		elapsed := time.Since(created)
		if limit := float64(size+startAllowance(size)) + rate*elapsed.Seconds(); float64(opened) > limit {
			t.Fatalf("opened %d connections %v after the pool was created; the limiter allows at most %d + %d + %g/s × %v = %.1f",
				opened, elapsed.Round(time.Millisecond), size, startAllowance(size), rate, elapsed.Round(time.Millisecond), limit)
		}
	}
	waitCond(t, func() string { withinRate(); return spreadOf(c, size) })
	ctx := testCtx(t)
	throttled := p.ClusterStat().ThrottledConnects()
	for round := range 3 {
		for _, n := range c.Nodes() {
			n.Kill()
			if err := n.Restart(ctx); err != nil {
				t.Fatal(err)
			}
		}
		// Use the pool so broken connections are noticed and replaced.
		waitCond(t, func() string {
			_, _ = p.Exec(ctx, "SELECT 1")
			withinRate()
			if msg := spreadOf(c, size); msg != "" {
				return fmt.Sprintf("round %d: %s", round, msg)
			}
			return ""
		})
	}
	withinRate()
	// Whether any connect had to wait depends on how fast the storms come (on a
	// loaded machine the tokens keep up), so it is logged, not asserted; the
	// bound above is what the limiter guarantees.
	t.Logf("throttled connects: %d", p.ClusterStat().ThrottledConnects()-throttled)
	t.Logf("%d connections in %v (rate %g/s, burst %d)", poolOpened(c, p), time.Since(created).Round(time.Millisecond), rate, size)
}

// Plain PostgreSQL behind one address: no node identity, so no balancing,
// no probe after the first few, and queries work as with pgxpool.
func TestBalanceOffOnPlainPostgres(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 1, Postgres: true, InProcess: true})
	p := startPool(t, c.Nodes()[0].DSN(), balancedConfig(4, 4))
	for range 20 {
		if _, err := p.Exec(testCtx(t), "SELECT 1"); err != nil {
			t.Fatal(err)
		}
	}
	if s := p.NodeStats(); len(s) != 0 {
		t.Fatalf("NodeStats on plain PostgreSQL = %v, want none", s)
	}
	// The probe gives up: the server's connection total stops growing.
	waitCond(t, func() string {
		before := totalOpened(c)
		time.Sleep(5 * testProbeInterval)
		if d := totalOpened(c) - before; d != 0 {
			return fmt.Sprintf("%d connections opened while idle", d)
		}
		return ""
	})
}

// gossipSetup writes gossip tables on every node's server with one row per
// node of the cluster, as CockroachDB would show them (Cluster.SetGossip).
func gossipSetup(t *testing.T, c *clustertest.Cluster, draining map[int]bool) {
	t.Helper()
	if err := c.SetGossip(testCtx(t), draining); err != nil {
		t.Fatal(err)
	}
}

// A node that gossip reports as draining leaves the targets and loses its
// connections; when it stops draining it gets its share back.
func TestBalanceGossipDraining(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	gossipSetup(t, c, nil)
	p := startPool(t, c.DSN(), balancedConfig(30, 30))
	waitCond(t, func() string { return spreadOf(c, 30) })

	gossipSetup(t, c, map[int]bool{3: true})
	waitCond(t, func() string {
		if k := c.Node(3).OpenConns(); k != 0 {
			return fmt.Sprintf("draining node 3 still holds %d", k)
		}
		if k := c.Node(1).OpenConns() + c.Node(2).OpenConns(); k != 30 {
			return fmt.Sprintf("nodes 1 and 2 hold %d, want 30", k)
		}
		return ""
	})
	for _, s := range p.NodeStats() {
		if s.ID == 3 && !s.Draining {
			t.Errorf("NodeStat for node 3: Draining false")
		}
	}
	gossipSetup(t, c, nil)
	waitCond(t, func() string { return spreadOf(c, 30) })
}

// With every node's address in the connection string, placement sends each
// new connection to the least-connected node: a cold start is balanced with
// no connection opened beyond the pool's own.
func TestBalanceHostsPlacement(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true})
	p := startPool(t, c.HostsDSN(), balancedConfig(30, 30))
	waitCond(t, func() string { return spreadOf(c, 30) })
	// Exactly the pool: no connect placed on a node that then had to move,
	// and nothing opened twice. The servers may count one probe more than
	// the pool has counted yet.
	if opened, n := poolOpened(c, p), p.Stat().NewConnsCount(); n != 30 || opened > 31 {
		t.Errorf("cold start opened %d connections (servers: %d) for a pool of 30; %+v", n, opened, p.NodeStats())
	}
	assertQuiet(t, c, p)
}

// With several hosts and gossip addresses, a node added after the pool
// started is dialled directly: it gets its share with at most twice the
// minimum number of connections opened (the minimum being its share).
// Removing a node brings the targets back to the remaining nodes.
func TestBalanceScaleOutWithGossip(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	gossipSetup(t, c, nil)
	p := startPool(t, c.HostsDSN(), balancedConfig(30, 30))
	waitCond(t, func() string { return spreadOf(c, 30) })

	n4, err := c.AddNode(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	before, start := poolOpened(c, p), time.Now()
	gossipSetup(t, c, nil)
	waitCond(t, func() string {
		if k := n4.OpenConns(); k < 7 || k > 8 {
			return fmt.Sprintf("node 4 holds %d, want 7 or 8; %v", k, c.OpenConns())
		}
		return spreadOf(c, 30)
	})
	moves, opened := n4.OpenConns(), poolOpened(c, p)-before
	t.Logf("scale-out with hosts+gossip: %d opened for %d moves in %v", opened, moves, time.Since(start))
	if opened > int64(2*moves) {
		t.Errorf("opened %d connections for %d moves", opened, moves)
	}
	assertQuiet(t, c, p)

	if err := c.RemoveNode(testCtx(t), 2); err != nil {
		t.Fatal(err)
	}
	gossipSetup(t, c, nil)
	waitCond(t, func() string { return spreadOf(c, 30) })
	assertQuiet(t, c, p)
}

// A node seen just now with no connection joins the targets and draws
// connections; one last seen before the refill window stays in the targets
// (until expiry) but draws none, since nothing says a connection can land
// there; one not seen for the expiry window is forgotten.
func TestBalanceRoundSeenExpired(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true})
	p := startPool(t, c.DSN(), func(cfg *Config) {
		balancedConfig(10, 10)(cfg)
		cfg.BalanceInterval = time.Hour // rounds run by hand below
		cfg.ProbeInterval = time.Hour
	})
	// A cold start behind the load balancer may place the connections
	// unevenly (8/2 was seen in CI), and then node 1 or 2 below its target
	// would rightly cause pruning below. Balance by hand first.
	waitCond(t, func() string {
		counts := poolCounts(p)
		if p.Stat().TotalConns() < 10 || p.Stat().ConstructingConns() > 0 {
			return fmt.Sprintf("pool filling: %v", counts)
		}
		if len(counts) != 2 || counts[1]-counts[2] > 1 || counts[2]-counts[1] > 1 {
			p.balanceRound(testCtx(t), time.Now())
			return fmt.Sprintf("pool not balanced: %v", counts)
		}
		return ""
	})
	now := time.Now()
	window := expiryWindow(time.Hour, time.Hour, 5)
	p.tracker.seen(97, now.Add(-window-time.Minute)) // expired
	p.tracker.seen(98, now.Add(-3*p.refillWindow()))
	plan := p.balanceRound(testCtx(t), now)
	if _, ok := plan.Targets[97]; ok {
		t.Errorf("expired node 97 has a target: %v", plan.Targets)
	}
	if p.tracker.node(97) != nil {
		t.Error("expired node 97 is still tracked")
	}
	if _, ok := plan.Targets[98]; !ok || len(plan.Prune) != 0 {
		t.Errorf("node 98 (not refillable): targets %v, prune %v; want a target and no pruning", plan.Targets, plan.Prune)
	}
	// Pretend node 98 was just probed: now connections should move to it
	// (here they cannot really, so the plan is only inspected).
	p.tracker.seen(98, now)
	plan = p.balanceRound(testCtx(t), now)
	if len(plan.Prune) == 0 {
		t.Errorf("node 98 seen now with no connections: want pruning, plan %+v", plan)
	}
}

// Plain PostgreSQL servers listed in the connection string: nodes are
// identified by one query per connection, and placement spreads the pool.
func TestBalanceHostsPlacementPostgres(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, Postgres: true})
	p := startPool(t, c.HostsDSN(), balancedConfig(30, 30))
	waitCond(t, func() string { return spreadOf(c, 30) })
	// The servers count a connection when they accept it, the pool once its
	// identifying query has answered.
	waitCond(t, func() string {
		if got, want := poolCounts(p), serverCounts(c); len(got) != 3 || fmt.Sprint(got) != fmt.Sprint(want) {
			return fmt.Sprintf("pool %v, servers %v", got, want)
		}
		return ""
	})
	assertQuiet(t, c, p)
}

// Close stops the balancing loop and the probe even while they are busy
// (rounds and probes every few milliseconds), and waits for them.
//
// Not parallel: it reads every goroutine's stack, so another test's pool
// would look like this one's still running.
func TestBalanceCloseStopsLoops(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true})
	cfg, err := ParseConfig(c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	balancedConfig(9, 9)(cfg)
	cfg.BalanceInterval, cfg.ProbeInterval = 5*time.Millisecond, 5*time.Millisecond
	p, err := NewWithConfig(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	waitCond(t, func() string {
		if n := p.ClusterStat().Probes(); n < 20 {
			return fmt.Sprintf("%d probes", n)
		}
		return ""
	})
	p.Close()
	probes := p.ClusterStat().Probes()
	waitCond(t, func() string {
		if s := poolStacks(); s != "" {
			return "pool goroutines still running:\n" + s
		}
		return ""
	})
	time.Sleep(50 * time.Millisecond) // ten intervals: nothing may run after Close returned
	if got := p.ClusterStat().Probes(); got != probes {
		t.Errorf("probes %d→%d after Close", probes, got)
	}
}

// Behind one address, a new connection for a retry that failed on some nodes
// is redialled until it lands elsewhere (bounded: the last dial is kept).
func TestBalanceRedialAvoidsNodes(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true, Balancing: clustertest.RoundRobin})
	p := startPool(t, c.DSN(), func(cfg *Config) {
		balancedConfig(0, 5)(cfg)
		// No probe: its dial through the load balancer would take a turn
		// of the round robin between two redials.
		cfg.ProbeInterval = time.Hour
	})
	ctx := withAvoidNodes(testCtx(t), 1, 2)
	for i := range 5 {
		// Holding each connection makes the next Acquire open a new one.
		conn, err := p.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Release()
		// Round robin over 3 nodes: 4 dials always reach node 3.
		var id NodeID
		if cs := connStateOf(conn.Conn()); cs != nil {
			id = cs.node.id
		}
		if id != 3 {
			t.Fatalf("connection %d is on node %d, want 3", i, id)
		}
	}
}

// A listed host that refuses connections is tried last once a dial to it
// failed, so new connections do not keep paying for it.
func TestBalanceHostsSkipsDeadHost(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true})
	dead := "127.0.0.1:1" // nothing listens on port 1
	dsn := strings.Replace(c.HostsDSN(), "@", "@"+dead+",", 1)
	p := startPool(t, dsn, balancedConfig(30, 30))
	waitCond(t, func() string { return spreadOf(c, 30) })
	p.placement.mu.Lock()
	_, down := p.placement.downHosts[dead]
	p.placement.mu.Unlock()
	if !down {
		t.Errorf("host %s not marked down", dead)
	}
	// After the first failures, connects go to live hosts first: opening
	// more connections does not dial the dead host again.
	cfg := p.pool.Config().ConnConfig.Copy()
	p.placement.placeHosts(testCtx(t), cfg, time.Now())
	if cfg.Host+":"+fmt.Sprint(cfg.Port) == dead {
		t.Errorf("dead host %s placed first", dead)
	}
}
