package clusterpool

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

func TestTraceNodeLifecycleAndPruning(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 2})
	r := &recorder{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 6, 6
		cfg.BalanceInterval = traceBalanceInterval
		cfg.ProbeInterval = traceProbeInterval
		cfg.ConnectRate = 0
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
		t.Errorf("NodeStats pruned sum %d != ClusterStat.PrunedConns %d", perNode, st.PrunedConns())
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

func TestTraceConnectThrottled(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 2})
	r := &recorder{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 0, 2
		cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
		cfg.ConnectRate = 10 // burst 10 (at least MaxConns and the rate)
		cfg.Tracer = r
	})
	ctx := testCtx(t)
	// A reconnect storm: more connects than the burst in a short time.
	for range 8 {
		p.Reset()
		if err := p.Ping(ctx); err != nil {
			t.Fatal(err)
		}
		if err := p.AcquireFunc(ctx, func(*pgxpool.Conn) error { return p.Ping(ctx) }); err != nil {
			t.Fatal(err)
		}
	}
	ev := waitEvent(t, r, "connect throttled", func(e TraceConnectThrottledData) bool { return e.Err == nil })
	if ev.Limit != 10 || ev.Waited <= 0 {
		t.Errorf("throttle event %+v", ev)
	}
	if st := p.ClusterStat(); st.ThrottledConnects() < 1 || st.ConnectWaitDuration() <= 0 {
		t.Errorf("ClusterStat throttled %d waited %v", st.ThrottledConnects(), st.ConnectWaitDuration())
	}
}

// A drained node (57P01 on its connections) is evicted, and the reads that
// met it are retried elsewhere.
func TestTraceDrainedNode(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 3, Balancing: clustertest.RoundRobin})
	r := &recorder{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 6, 6
		cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
		cfg.ConnectRate = 0
		cfg.Tracer = r
	})
	waitCond(t, func() string {
		if len(poolCounts(p)) < 3 || p.Stat().TotalConns() < 6 {
			return fmt.Sprintf("pool counts %v", poolCounts(p))
		}
		return ""
	})
	// The application keeps every connection busy while node 2 drains, as
	// during a rolling restart.
	stop := busyReads(t, p, 6)
	ctx := testCtx(t)
	if err := c.Node(2).Drain(ctx, 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, r, "node 2 evicted", func(e TraceNodeHealthData) bool { return e.Node == 2 && !e.Healthy })
	end := waitEvent(t, r, "retried read", func(e TraceRetryEndData) bool { return slices.Contains(e.Nodes, 2) })
	if end.Outcome != RetrySucceeded {
		t.Errorf("a read that met node 2 ended %v: %+v", end.Outcome, end)
	}
	stop()
	if n := p.ClusterStat().Evictions(); n < 1 {
		t.Errorf("ClusterStat.Evictions = %d", n)
	}
}

// A probe that cannot reach the cluster is reported with its error and
// counted, and counts against no node.
func TestTraceProbeFailure(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 1})
	r := &recorder{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 1, 1
		cfg.BalanceInterval = time.Hour
		cfg.ProbeInterval = traceProbeInterval
		cfg.ConnectRate = 0
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
// nodes are PostgreSQL, so each gets a crdb_internal schema with the two
// gossip tables the probe reads, which the test then edits.
func TestTraceGossipDraining(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 3, Balancing: clustertest.RoundRobin})
	ctx := testCtx(t)
	gossip := func(sql string) {
		t.Helper()
		for _, n := range c.Nodes() {
			conn, err := pgx.Connect(ctx, n.DSN())
			if err != nil {
				t.Fatal(err)
			}
			_, err = conn.Exec(ctx, sql)
			conn.Close(ctx)
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	gossip(`CREATE SCHEMA crdb_internal;
CREATE TABLE crdb_internal.gossip_liveness (node_id INT8, draining BOOL, membership TEXT);
CREATE TABLE crdb_internal.gossip_nodes (node_id INT8, address TEXT, is_live BOOL);
INSERT INTO crdb_internal.gossip_liveness VALUES (1, false, 'active'), (2, false, 'active'), (3, false, 'active');
INSERT INTO crdb_internal.gossip_nodes VALUES (1, '', true), (2, '', true), (3, '', true)`)

	r := &recorder{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 6, 6
		cfg.BalanceInterval = traceBalanceInterval
		cfg.ProbeInterval = traceProbeInterval
		cfg.ConnectRate = 0
		cfg.Tracer = r
	})
	waitCond(t, func() string {
		if k := poolCounts(p)[2]; k == 0 {
			return fmt.Sprintf("no connection on node 2 yet: %v", poolCounts(p))
		}
		return ""
	})

	gossip(`UPDATE crdb_internal.gossip_liveness SET draining = true WHERE node_id = 2`)
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

	gossip(`UPDATE crdb_internal.gossip_liveness SET draining = false WHERE node_id = 2`)
	waitEvent(t, r, "node 2 no longer draining", func(e TraceNodeDrainingData) bool { return e.Node == 2 && !e.Draining })
}
