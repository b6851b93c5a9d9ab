package clusterpool

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
)

// A node that is down behind one random address: the load balancer, as a
// health-checked one does, sends every dial to the nodes that are up, so
// all of an aimed probe's dials land elsewhere and all but the last are
// refused after a full connection set-up. Aimed probes at the lost node are
// spaced out (aimNow): over the probes that follow its loss the sessions
// per probe stay well under aimedDials. Once the node is back, the probes
// find it and the pool moves its share there.
func TestProbeSpacesAimsAtDownNode(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	p := startPool(t, c.DSN(), func(cfg *Config) {
		balancedConfig(3, 3)(cfg)
		// Room for an aimed probe's four dials within its timeout (the
		// interval) on a loaded machine, and a session probe every tick.
		cfg.ProbeInterval = 250 * time.Millisecond
		cfg.ProbeMaxInterval = -1
	})
	waitCond(t, func() string { return spreadOf(c, 3) })
	ctx := testCtx(t)
	// Node 3 is killed under a query: a lost connection evicts it. (An
	// idle connection found closed would not; the node would only be
	// missed once the refill window had passed.)
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() { _, _ = p.Exec(ctx, "SELECT pg_sleep(1)") })
	}
	waitCond(t, func() string {
		if n := p.Stat().AcquiredConns(); n < 3 {
			return fmt.Sprintf("%d connections in use, want 3", n)
		}
		return ""
	})
	c.Node(3).Kill()
	wg.Wait()
	waitCond(t, func() string {
		for _, s := range p.NodeStats() {
			if s.ID == 3 && !s.Healthy {
				return ""
			}
		}
		return fmt.Sprintf("node 3 not evicted: %+v", p.NodeStats())
	})
	st := p.ClusterStat()
	probes, sessions := st.Probes(), st.ProbeSessions()
	// Within the expiry window (7.2 s at these intervals), after which the
	// pool forgets node 3 and aims at it no more.
	const window = 12
	waitCond(t, func() string {
		if n := p.ClusterStat().Probes() - probes; n < window {
			return fmt.Sprintf("%d probes since node 3 was lost, want %d", n, window)
		}
		return ""
	})
	st = p.ClusterStat()
	// Every probe aimed: aimedDials sessions each. Spaced: at most 3 of
	// 12 consecutive probes aim (the 1st, 3rd and 7th after the loss), 21
	// sessions at most.
	dp, ds := st.Probes()-probes, st.ProbeSessions()-sessions
	t.Logf("%d probe sessions in %d probes while node 3 was down", ds, dp)
	if float64(ds) > 2.5*float64(dp) {
		t.Errorf("%d probe sessions in %d probes while node 3 was down, want at most 2.5 per probe", ds, dp)
	}
	if err := c.Node(3).Restart(ctx); err != nil {
		t.Fatal(err)
	}
	waitCond(t, func() string {
		_, _ = p.Exec(ctx, "SELECT 1")
		return spreadOf(c, 3)
	})
}
