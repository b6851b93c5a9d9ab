package clusterpool

import (
	"context"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/jackc/pgx/v5"
)

// Fleet tests: several pools, each with its own application_name, as
// service replicas run them against one cluster; the servers' counts per
// application (Cluster.OpenConnsByApp) tell the pools apart.
const (
	fleetPools        = 6
	fleetConns        = 6
	fleetBalanceEvery = 300 * time.Millisecond
	// Probes at 100 ms back off to 800 ms at rest: a pool behind the load
	// balancer with no gossip finds a new node of 4 within 40 s with
	// probability 1 - (3/4)^50, and the fleet test waits that long.
	fleetProbeEvery = 100 * time.Millisecond
	fleetWait       = 40 * time.Second
)

func fleetApp(i int) string { return fmt.Sprintf("fleet-%d", i) }

// startFleet starts fleetPools pools of fleetConns connections on dsn.
func startFleet(t *testing.T, dsn string) []*Pool {
	t.Helper()
	var pools []*Pool
	for i := range fleetPools {
		pools = append(pools, startPool(t, dsn+"&application_name="+fleetApp(i), func(cfg *Config) {
			cfg.MinConns, cfg.MaxConns = fleetConns, fleetConns
			cfg.BalanceInterval = fleetBalanceEvery
			cfg.ProbeInterval = fleetProbeEvery
			cfg.ConnectRate = -1
		}))
	}
	return pools
}

// fleetAtTargets is a waitCond condition: the servers see every pool at
// exactly its hashed targets over nodes (so within ±1, with its remainder
// where its hash says), and nothing on other nodes.
func fleetAtTargets(c *clustertest.Cluster, pools []*Pool, nodes []int) func() string {
	return func() string {
		byApp := c.OpenConnsByApp()
		var ids []NodeID
		for _, n := range nodes {
			ids = append(ids, NodeID(n))
		}
		for i, p := range pools {
			want := make(map[int]int)
			for id, k := range balanceTargets(fleetConns, ids, p.seed, p.remainderSwaps()...) {
				want[int(id)] = k
			}
			got := maps.Clone(byApp[fleetApp(i)])
			maps.DeleteFunc(got, func(id, k int) bool { return k == 0 && !slices.Contains(nodes, id) })
			if !maps.Equal(got, want) {
				var view []string
				for _, n := range p.NodeStats() {
					view = append(view, fmt.Sprintf("%d: %d conns, healthy %v, seen %v ago", n.ID, n.TotalConns, n.Healthy, time.Since(n.LastSeen).Round(time.Millisecond)))
				}
				return fmt.Sprintf("pool %d: servers see %v, its targets are %v; cluster %v; the pool's view %v, missing %v, probes %d (%d sessions)",
					i, got, want, c.OpenConns(), view, p.missingNodes(), p.ClusterStat().Probes(), p.ClusterStat().ProbeSessions())
			}
		}
		return ""
	}
}

// fleetOpened is what the fleet's pools opened by their own count, and
// the sessions the servers accepted less the probes'.
func fleetOpened(c *clustertest.Cluster, pools []*Pool) (pool, servers int64) {
	servers = totalOpened(c)
	for _, p := range pools {
		pool += p.Stat().NewConnsCount()
		servers -= p.probeConns()
	}
	return pool, servers
}

// assertFleetQuiet waits until the fleet has converged (at its targets over
// nodes, and no connection opened for four rounds: a move's refill may still
// be landing when the counts first match), then checks that it opens no
// connection for d (over six balance rounds).
func assertFleetQuiet(t *testing.T, c *clustertest.Cluster, pools []*Pool, nodes []int, d time.Duration, sessionProbes bool) {
	t.Helper()
	last, since := int64(-1), time.Now()
	atTargets := fleetAtTargets(c, pools, nodes)
	waitCondWithin(t, fleetWait, func() string {
		if n, _ := fleetOpened(c, pools); n != last {
			last, since = n, time.Now()
		}
		if msg := atTargets(); msg != "" {
			return msg
		}
		if time.Since(since) < 4*fleetBalanceEvery {
			return "connections opened in the last four rounds"
		}
		// At rest: after the number of nodes a pool knows changes, its
		// session probe keeps the base interval until enough connections
		// have landed on them that an unmet node would have shown up
		// (probeBackoff.observe); only then does it back off. (With
		// gossip readable there is no session probe at rest.)
		for i, p := range pools {
			if !sessionProbes {
				break
			}
			if known, landed := p.fleetCoverage(); landed < uint64(coverLandings(known)) {
				return fmt.Sprintf("pool %d still meeting the nodes: %d landings on %d, want %d", i, landed, known, coverLandings(known))
			}
		}
		return ""
	})
	pool, servers := fleetOpened(c, pools)
	time.Sleep(d) // a quiet period, not a wait for a condition
	pool2, servers2 := fleetOpened(c, pools)
	// The servers' count less the probes' is off by the probes in flight
	// at the first read: a pool counts a probe's session when its dial
	// reaches the load balancer, the node a moment later. Each pool has at
	// most one probe dial in flight, and its probes still come every
	// interval or two here: the explore draws ended with the fleet's
	// sessions (fleetCoverage), before the back-off had grown.
	if pool2 != pool || servers2-servers > int64(len(pools)) {
		t.Errorf("fleet at its targets opened %d connections (servers: %d) in %v: %v", pool2-pool, servers2-servers, d, c.OpenConnsByApp())
	}
}

// A fleet behind one random load balancer, no gossip: every pool places its
// remainder where its hash says, so the cluster adds up to what independent
// fair hashing gives; a node added later and a node restarted get every
// pool's share; balanced, the fleet opens nothing.
func TestFleetScaleOutAndRestart(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true})
	pools := startFleet(t, c.DSN())
	waitCondWithin(t, fleetWait, fleetAtTargets(c, pools, []int{1, 2, 3}))
	assertFleetQuiet(t, c, pools, []int{1, 2, 3}, 2*time.Second, true)

	n4, err := c.AddNode(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	added := time.Now()
	waitCondWithin(t, fleetWait, fleetAtTargets(c, pools, []int{1, 2, 3, 4}))
	t.Logf("scale-out: node 4 holds %d of %d (fair %d) after %v; peak %d new sessions/s there",
		n4.OpenConns(), fleetPools*fleetConns, fleetPools*fleetConns/4, time.Since(added).Round(time.Millisecond),
		n4.PeakAcceptRate(added, time.Now(), time.Second))
	assertFleetQuiet(t, c, pools, []int{1, 2, 3, 4}, 2*time.Second, true)

	n1 := c.Node(1)
	n1.Kill()
	waitCondWithin(t, fleetWait, func() string {
		for _, p := range pools {
			_, _ = p.Exec(testCtx(t), "SELECT 1") // meet a broken connection
		}
		if k := n1.OpenConns(); k != 0 {
			return fmt.Sprintf("killed node 1 holds %d", k)
		}
		return fleetAtTargets(c, pools, []int{2, 3, 4})()
	})
	if err := n1.Restart(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	waitCondWithin(t, fleetWait, fleetAtTargets(c, pools, []int{1, 2, 3, 4}))
	t.Logf("restart: node 1 holds %d (fair %d) after %v; peak %d new sessions/s there",
		n1.OpenConns(), fleetPools*fleetConns/4, time.Since(back).Round(time.Millisecond), n1.PeakAcceptRate(back, time.Now(), time.Second))
	assertFleetQuiet(t, c, pools, []int{1, 2, 3, 4}, 2*time.Second, true)
}

// A fleet behind one load balancer with gossip readable (as for a user with
// VIEWCLUSTERMETADATA): at rest the pools read gossip over their idle
// connections and open no probe session; a node added later is listed by
// gossip and aimed at; a node drained and restarted is back when gossip
// says so.
func TestFleetGossip(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	gossipSetup(t, c, nil)
	pools := startFleet(t, c.DSN())
	assertFleetQuiet(t, c, pools, []int{1, 2, 3}, time.Second, false)

	probes := func() (reads, sessions int64) {
		for _, p := range pools {
			st := p.ClusterStat()
			reads, sessions = reads+st.Probes(), sessions+st.ProbeSessions()
		}
		return reads, sessions
	}
	reads, sessions := probes()
	time.Sleep(2 * time.Second) // at rest, not a wait for a condition
	reads2, sessions2 := probes()
	if sessions2 != sessions || reads2 == reads {
		t.Errorf("at rest with gossip: %d probe sessions and %d probes in 2 s, want 0 sessions and some probes (gossip reads)", sessions2-sessions, reads2-reads)
	}

	n4, err := c.AddNode(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	gossipSetup(t, c, nil)
	added := time.Now()
	assertFleetQuiet(t, c, pools, []int{1, 2, 3, 4}, time.Second, false)
	_, sessions3 := probes()
	t.Logf("scale-out with gossip: node 4 holds %d (fair %d), %d probe sessions (%.1f per pool), peak %d new sessions/s there",
		n4.OpenConns(), fleetPools*fleetConns/4, sessions3-sessions2, float64(sessions3-sessions2)/fleetPools, n4.PeakAcceptRate(added, time.Now(), time.Second))

	n1 := c.Node(1)
	gossipSetup(t, c, map[int]bool{1: true})
	if err := n1.Drain(testCtx(t), 300*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	waitCondWithin(t, fleetWait, fleetAtTargets(c, pools, []int{2, 3, 4}))
	if err := n1.Restart(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	_, sessions4 := probes()
	gossipSetup(t, c, nil)
	back := time.Now()
	assertFleetQuiet(t, c, pools, []int{1, 2, 3, 4}, time.Second, false)
	_, sessions5 := probes()
	t.Logf("restart with gossip: node 1 holds %d (fair %d), %d probe sessions after it was back, peak %d new sessions/s there",
		n1.OpenConns(), fleetPools*fleetConns/4, sessions5-sessions4, n1.PeakAcceptRate(back, time.Now(), time.Second))
}

// Behind one address every connection the pool opens is a draw of the load
// balancer, as a session probe's dial is, and names the node it reached: a
// probe tick that finds some opened since the last tick opens no session.
// With nothing opened since, a due tick probes; with hosts listed the
// pool's connections go where it places them, so they stand in for nothing
// and a due tick probes.
func TestProbeOwnConnectsStandIn(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true})
	byHand := func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 3, 3
		// The test runs the ticks; the pool's own loops wait an hour.
		cfg.ProbeInterval, cfg.BalanceInterval = time.Hour, time.Hour
	}
	for _, tc := range []struct {
		name     string
		dsn      string
		standsIn bool
	}{
		{"one address", c.DSN(), true},
		{"hosts listed", c.HostsDSN(), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startPool(t, tc.dsn, byHand)
			waitCond(t, func() string {
				if n := p.tracker.landings.Load(); n < 3 {
					return fmt.Sprintf("%d connections landed, want the pool's 3", n)
				}
				return ""
			})
			ctx := testCtx(t)
			now := time.Now()
			var st probeState // no probe yet: one is due, and three connections landed since
			before := p.probeConns()
			if !p.probeTick(ctx, &st, now) {
				t.Fatal("probeTick stopped probing")
			}
			opened := p.probeConns() - before
			if tc.standsIn && opened != 0 {
				t.Errorf("the pool's own connections landed since the last tick, yet the probe opened %d sessions", opened)
			}
			if !tc.standsIn && opened == 0 {
				t.Error("with hosts listed a due probe opened no session")
			}
			if !st.backoff.lastProbe.Equal(now) {
				t.Errorf("the tick's probe time is %v, want %v: the landings count as the tick's probe", st.backoff.lastProbe, now)
			}
			// Nothing landed since: the next due tick opens a session.
			before = p.probeConns()
			if !p.probeTick(ctx, &st, now.Add(3*time.Hour)) {
				t.Fatal("probeTick stopped probing")
			}
			if p.probeConns() == before {
				t.Error("nothing landed since the last tick, yet a due tick opened no probe session")
			}
		})
	}
}

// Without gossip a pool reads which nodes hold the fleet's sessions
// (crdb_internal.cluster_sessions, readable by every user) over an idle
// connection, and aims its probes at a node listed there that it has never
// reached: here node 7, which no probe can reach, so only the sessions can
// have named it. Once its aimed draws have missed node 7 as often as a
// reachable node would have been met, it stops aiming there (node 7 might
// be behind another region's load balancer) while node 7 stays listed; a
// node listed anew is aimed at anew.
func TestFleetSessionsName(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	setSessions := func(rows string) { writeSessions(t, c, rows) }
	// Node 8 is listed only as CockroachDB lists a node its fan-out could
	// not reach: no session, so nothing to aim at.
	const listed = `INSERT INTO crdb_internal.cluster_sessions VALUES (1, 'a', 'other', '', now()), (7, 'b', 'other', '', now()), (7, 'c', 'other', '', now()), (8, NULL, NULL, '-- rpc error', NULL);`
	setSessions(listed)
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 6, 6
		cfg.BalanceInterval = fleetBalanceEvery
		cfg.ProbeInterval = fleetProbeEvery
	})
	aimed := func() string {
		if m := p.missingNodes(); !slices.Contains(m, 7) {
			return fmt.Sprintf("the pool misses %v, want node 7 (listed by the sessions only)", m)
		}
		return ""
	}
	waitCond(t, aimed)
	// Aimed probes open up to aimedDials sessions each, none reaching node 7.
	before := p.ClusterStat().ProbeSessions()
	waitCond(t, func() string {
		if n := p.ClusterStat().ProbeSessions() - before; n < 2*aimedDials {
			return fmt.Sprintf("%d probe sessions since node 7 was named, want at least %d (two aimed probes)", n, 2*aimedDials)
		}
		return ""
	})
	heard := func() (missed int, ok bool) {
		p.pace.mu.Lock()
		defer p.pace.mu.Unlock()
		missed, ok = p.pace.heard[7]
		return missed, ok
	}
	waitCond(t, func() string {
		missed, ok := heard()
		if m := p.missingNodes(); slices.Contains(m, 7) || !ok {
			return fmt.Sprintf("node 7, still listed, missed by %d aimed draws (listed %v): the pool misses %v, want it to have given up after %d", missed, ok, m, coverLandings(3))
		}
		return ""
	})
	for _, n := range p.NodeStats() {
		if n.ID == 7 {
			t.Errorf("node 7, named by the sessions and never reached, is among the pool's nodes: %+v", n)
		}
	}
	p.pace.mu.Lock()
	_, eight := p.pace.heard[8]
	p.pace.mu.Unlock()
	if eight {
		t.Error("node 8, listed only by an error row (no session), was heard of")
	}
	setSessions("")
	waitCond(t, func() string {
		if missed, ok := heard(); ok {
			return fmt.Sprintf("with no session listed the pool still remembers node 7 (%d draws missed)", missed)
		}
		return ""
	})
	setSessions(listed)
	waitCond(t, aimed)
}

// writeSessions replaces every node's crdb_internal.cluster_sessions with
// the rows that SQL inserts (node_id, session_id, application_name,
// active_queries, session_start), as clustertest's SetSessions writes it.
func writeSessions(t *testing.T, c *clustertest.Cluster, insert string) {
	t.Helper()
	for _, n := range c.Nodes() {
		if err := n.ExecDirect(testCtx(t), `CREATE SCHEMA IF NOT EXISTS crdb_internal;
CREATE TABLE IF NOT EXISTS crdb_internal.cluster_sessions (node_id INT8, session_id TEXT, application_name TEXT, active_queries TEXT, session_start TIMESTAMP);
DELETE FROM crdb_internal.cluster_sessions;`+insert); err != nil {
			t.Fatal(err)
		}
	}
}

// sessionsReader starts a one-node cluster, a pool whose own loops are too
// slow to interfere (the test drives the sessions reads) and a connection
// to read over.
func sessionsReader(t *testing.T) (*clustertest.Cluster, *Pool, *pgx.Conn) {
	t.Helper()
	c := clustertest.New(t, clustertest.Options{Nodes: 1})
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 0, 4
		cfg.BalanceInterval = time.Hour
		cfg.ProbeInterval = time.Hour
	})
	conn, err := pgx.Connect(testCtx(t), c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return c, p, conn
}

// A node the pool misses whose sessions of the fleet all started after the
// pool lost it (more than the clocks' slack after) is back: the read ends
// its eviction and counts it as seen, without one of the pool's own probes
// landing there, and without the pool having read the list while the node
// was away. A node that kept an older session, one listed only by an error
// row, one whose sessions started within the slack, and one not listed are
// left as they are. The pool's loops are too slow here to interfere: the
// test drives the reads.
func TestSessionsBack(t *testing.T) {
	t.Parallel()
	c, p, conn := sessionsReader(t)
	lost := time.Now().Add(-time.Minute)
	for id := NodeID(1); id <= 4; id++ {
		p.tracker.seen(id, lost)
	}
	for id := NodeID(2); id <= 4; id++ {
		p.tracker.evict(id, lost)
	}
	// Node 1 is not evicted, holds none of the pool's connections, and its
	// connects have failed once.
	p.tracker.recordFailure(1, time.Now())
	evicted := func() []NodeID {
		var ids []NodeID
		for _, n := range p.tracker.nodeList() {
			if n.evicted.Load() {
				ids = append(ids, n.id)
			}
		}
		return ids
	}
	session := func(id int, start time.Time) string {
		return fmt.Sprintf("(%d, 's%d-%d', 'other', '', '%s')", id, id, start.UnixNano(), start.UTC().Format("2006-01-02 15:04:05.999999"))
	}
	read := func(rows ...string) {
		t.Helper()
		writeSessions(t, c, "INSERT INTO crdb_internal.cluster_sessions VALUES "+strings.Join(rows, ", ")+";")
		if err := p.readSessions(testCtx(t), conn); err != nil {
			t.Fatal(err)
		}
	}
	old, after, soon := lost.Add(-time.Hour), lost.Add(10*time.Second), lost.Add(sessionsClockSlack/2)
	errorRow := "(3, NULL, NULL, '-- rpc error', NULL)"
	read(session(1, old), session(2, old), session(2, after), errorRow)
	if got := evicted(); !slices.Equal(got, []NodeID{2, 3, 4}) {
		t.Fatalf("node 2 kept a session older than its eviction: evicted %v, want [2 3 4]", got)
	}
	read(session(1, old), session(3, soon), session(4, soon))
	if got := evicted(); !slices.Equal(got, []NodeID{2, 3, 4}) {
		t.Fatalf("nodes 3 and 4 with sessions that started within the clocks' slack of their eviction: evicted %v, want [2 3 4]", got)
	}
	changes := p.pace.changes.Load()
	read(session(1, after), session(2, after), session(2, after.Add(time.Second)), errorRow)
	if got := evicted(); !slices.Equal(got, []NodeID{3, 4}) {
		t.Errorf("every session on node 2 started after its eviction: evicted %v, want [3 4]", got)
	}
	if p.pace.changes.Load() == changes {
		t.Error("node 2 came back and the probe was not told of a change")
	}
	for _, id := range []NodeID{1, 2} {
		if seen := time.Unix(0, p.tracker.node(id).lastSeen.Load()); !seen.After(lost) {
			t.Errorf("node %d came back and was last seen at %v, when it was lost", id, seen)
		}
	}
	n1 := p.tracker.node(1)
	n1.failMu.Lock()
	failures := n1.failures
	n1.failMu.Unlock()
	if failures != 1 {
		t.Errorf("node 1, not evicted, has %d failures after the read, want the 1 its connect counted: only an eviction ends", failures)
	}
	// The fleet's sessions per node count only those older than
	// fleetCountAge: a probe's session lives a moment.
	read(session(1, old), session(1, time.Now()), session(2, old))
	p.pace.mu.Lock()
	fleet := maps.Clone(p.pace.fleet)
	p.pace.mu.Unlock()
	if want := map[NodeID]int{1: 1, 2: 1}; !maps.Equal(fleet, want) {
		t.Errorf("sessions per node %v, want %v (node 1's new session too young to count)", fleet, want)
	}
}

// The fleet's sessions that started after the number of nodes the pool
// knows last changed, by more than the clocks' slack, on nodes it knows,
// count as draws toward meeting every node (fleetCoverage), read from a
// real server: older ones, ones within the slack and ones on a node only
// heard of do not; the count holds when those sessions close; after the
// next change, no session counts until one starts after it.
func TestSessionsDraws(t *testing.T) {
	t.Parallel()
	c, p, conn := sessionsReader(t)
	met := time.Now().Add(-time.Minute)
	for id := NodeID(1); id <= 3; id++ {
		p.tracker.seen(id, met) // the third makes the last change
	}
	var rows []string
	add := func(id, n int, start time.Time) {
		for i := range n {
			rows = append(rows, fmt.Sprintf("(%d, 's%d-%d-%d', 'other', '', '%s')", id, id, start.UnixNano(), i, start.UTC().Format("2006-01-02 15:04:05.999999")))
		}
	}
	add(1, 5, met.Add(-time.Minute))         // before the change
	add(1, 7, met.Add(30*time.Second))       // after
	add(2, 4, met.Add(50*time.Second))       // after
	add(3, 2, met.Add(sessionsClockSlack/2)) // within the clocks' slack
	add(9, 6, met.Add(40*time.Second))       // a node only heard of
	read := func() {
		t.Helper()
		writeSessions(t, c, "INSERT INTO crdb_internal.cluster_sessions VALUES "+strings.Join(rows, ", ")+";")
		if err := p.readSessions(testCtx(t), conn); err != nil {
			t.Fatal(err)
		}
	}
	read()
	if known, landed := p.fleetCoverage(); known != 3 || landed != 11 {
		t.Errorf("coverage %d nodes, %d draws; want 3 nodes, 11 draws (7 on node 1, 4 on node 2)", known, landed)
	}
	// Sessions that close were draws all the same: the count holds.
	rows = rows[:5]
	read()
	if known, landed := p.fleetCoverage(); known != 3 || landed != 11 {
		t.Errorf("after the sessions since the change closed: coverage %d nodes, %d draws; want 3, 11", known, landed)
	}
	p.tracker.seen(4, time.Now())
	read()
	if known, landed := p.fleetCoverage(); known != 4 || landed != 0 {
		t.Errorf("just after node 4 was met: coverage %d nodes, %d draws; want 4, 0", known, landed)
	}
}

// keepSessions rewrites the sessions table every 100 ms, as CockroachDB
// would show it, until the returned stop is called.
func keepSessions(c *clustertest.Cluster) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			_ = c.SetSessions(ctx)
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return func() { cancel(); <-done }
}

// Pools that read the fleet's sessions per node even out the cluster
// beyond what their hashes give: here four pools of 6 on 4 nodes are made
// to put their two extra connections on nodes 1 and 2 (8 / 8 / 4 / 4 on
// the servers); they move extras to nodes 3 and 4 a pool at a time
// (fleetSwap) until the cluster's spread is at most 2, every pool within ±1
// and at its targets, and then stop: no connection opened for two seconds.
func TestFleetSwapEvensOut(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 4})
	// The table lists nothing until the pools hold the uneven start: they
	// read it, and see no fleet to even out.
	writeSessions(t, c, "")
	const pools, conns = 4, fleetConns
	var ps []*Pool
	for i := range pools {
		ps = append(ps, startPool(t, c.DSN()+"&application_name="+fleetApp(i), func(cfg *Config) {
			cfg.MinConns, cfg.MaxConns = conns, conns
			cfg.BalanceInterval = fleetBalanceEvery
			cfg.ProbeInterval = fleetProbeEvery
			cfg.ConnectRate = -1
		}))
	}
	nodes := []NodeID{1, 2, 3, 4}
	for _, p := range ps {
		var swaps []remainderSwap
		hashed := balanceTargets(conns, nodes, p.seed)
		free := []NodeID{1, 2}
		free = slices.DeleteFunc(free, func(id NodeID) bool { return hashed[id] == 2 })
		for _, id := range []NodeID{3, 4} {
			if hashed[id] == 2 {
				swaps = append(swaps, remainderSwap{From: id, To: free[0]})
				free = free[1:]
			}
		}
		p.swaps.Store(&swaps)
	}
	atTargets := fleetAtTargets(c, ps, []int{1, 2, 3, 4})
	waitCond(t, func() string {
		if msg := atTargets(); msg != "" {
			return msg
		}
		if got := c.OpenConns(); got[1] != 8 || got[2] != 8 {
			return fmt.Sprintf("cluster %v, want nodes 1 and 2 at 8 (every pool's extras) before the pools may even it out", got)
		}
		return ""
	})
	t.Logf("every extra on nodes 1 and 2: cluster %v", c.OpenConns())
	defer keepSessions(c)()
	waitCond(t, func() string {
		if msg := atTargets(); msg != "" {
			return msg
		}
		got := c.OpenConns()
		lo, hi := math.MaxInt, 0
		for _, id := range nodes {
			lo, hi = min(lo, got[int(id)]), max(hi, got[int(id)])
		}
		if hi-lo > 2 {
			// What gates the next swap (swapRemainder), for a failure under load.
			var gates []string
			for i, p := range ps {
				p.pace.mu.Lock()
				read, since := p.pace.fleetRead, p.pace.fleetSince
				p.pace.mu.Unlock()
				gates = append(gates, fmt.Sprintf("pool %d: swaps %v, evictions %d, last prune %v ago, fleet read %v ago and still for %v",
					i, p.remainderSwaps(), p.ClusterStat().Evictions(), time.Since(time.Unix(0, p.lastPrune.Load())).Round(time.Millisecond),
					time.Since(read).Round(time.Millisecond), read.Sub(since).Round(time.Millisecond)))
			}
			return fmt.Sprintf("cluster %v: spread %d, want at most 2; %s", got, hi-lo, strings.Join(gates, "; "))
		}
		return ""
	})
	swapped := 0 // the pools whose swaps hold: the hashes alone put it at 8/8/4/4
	for _, p := range ps {
		if len(p.remainderSwaps()) > 0 {
			swapped++
		}
	}
	if swapped == 0 {
		t.Error("the cluster evened out with no swap in force")
	}
	t.Logf("evened out: cluster %v, %d pools swapped", c.OpenConns(), swapped)
	assertFleetQuiet(t, c, ps, []int{1, 2, 3, 4}, 2*time.Second, true)
}

// While a node is away, the pools of a fleet that read each other's
// sessions look for it together (fleetTurn): twelve equal pools each probe
// with probability √(1/12), so they open far fewer probe sessions than the
// same pools do when the sessions list is empty and each probes alone; and
// every pool still moves its share back once the node returns. The same
// outage twice, with the list and without, on one cluster. Not parallel:
// its 48 connections, kills and restarts weigh on the two cores, and
// beside it TestFleetSwapEvensOut once made one swap in 20 s where it
// needs two (full -race suite, e7608a0, with eight pools of 6 here).
func TestFleetProbesForLostNodeTogether(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	ctx := testCtx(t)
	writeSessions(t, c, "")
	const pools, conns = 12, 4
	var ps []*Pool
	for i := range pools {
		ps = append(ps, startPool(t, c.DSN()+"&application_name="+fleetApp(i), func(cfg *Config) {
			cfg.MinConns, cfg.MaxConns = conns, conns
			cfg.BalanceInterval = fleetBalanceEvery
			// A pool forgets a node it has not seen for about 29 probe
			// intervals (expiryWindow, 3 nodes), and then explores
			// instead: 7 s at this interval, longer than the outage
			// below (about 1 s until every pool misses the node, then
			// the 3 s measured).
			cfg.ProbeInterval = 250 * time.Millisecond
			cfg.ConnectRate = -1
		}))
	}
	// onEvery waits until every pool holds at least one connection on
	// each of nodes, by the servers' count.
	onEvery := func(nodes ...int) {
		t.Helper()
		waitCondWithin(t, fleetWait, func() string {
			byApp := c.OpenConnsByApp()
			for i := range ps {
				for _, id := range nodes {
					if byApp[fleetApp(i)][id] == 0 {
						return fmt.Sprintf("pool %d holds none on node %d: %v", i, id, byApp)
					}
				}
			}
			return ""
		})
	}
	onEvery(1, 2, 3)
	victim := c.Node(3)
	probeSessions := func() (n int64) {
		for _, p := range ps {
			n += p.ClusterStat().ProbeSessions()
		}
		return n
	}
	// outage kills node 3, waits until every pool misses it and holds its
	// size again, and returns the probe sessions the fleet opened over the
	// next three seconds; then it restarts node 3 and waits until every pool
	// holds connections there again.
	outage := func(what string) int64 {
		t.Helper()
		victim.Kill()
		waitCondWithin(t, fleetWait, func() string {
			for i, p := range ps {
				_, _ = p.Exec(ctx, "SELECT 1") // meet a broken connection
				if !slices.Contains(p.missingNodes(), 3) || p.Stat().TotalConns() != conns {
					return fmt.Sprintf("pool %d misses %v, holds %d", i, p.missingNodes(), p.Stat().TotalConns())
				}
			}
			return ""
		})
		before := probeSessions()
		time.Sleep(3 * time.Second) // a stretch of the outage, not a wait for a condition
		n := probeSessions() - before
		if err := victim.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		back := time.Now()
		onEvery(3)
		t.Logf("%s: %d probe sessions in 3 s of the outage; every pool back on node 3 %v after the restart",
			what, n, time.Since(back).Round(time.Millisecond))
		return n
	}
	stop := keepSessions(c)
	together := outage("sessions listed")
	stop()
	writeSessions(t, c, "")
	alone := outage("sessions not listed")
	// Each pool probes one due tick in √12 ≈ 3.5, and aims less often for
	// it: under half of what the pools open alone (0.42-0.45 in three runs
	// under two CPU hogs; 1.08 with every pool probing as if alone).
	if together*4 > alone*3 {
		t.Errorf("the fleet opened %d probe sessions while its pools read each other's sessions, %d while they did not: want under three quarters", together, alone)
	}
}
