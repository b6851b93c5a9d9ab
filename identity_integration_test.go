package clusterpool

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
)

// With IdentifyNode the pool's node IDs are the user's, not CockroachDB's:
// gossip, which names CockroachDB's IDs, must not mark the pool's node of the
// same number draining (here pool node 1 is CockroachDB node 3).
func TestGossipIgnoredForForeignNodeIDs(t *testing.T) {
	if err := clustertest.Available(); err != nil {
		t.Skip(err)
	}
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	gossipSetup(t, c, map[int]bool{1: true})
	p := startPool(t, c.DSN(), func(cfg *Config) {
		balancedConfig(6, 6)(cfg)
		cfg.IdentifyNode = func(_ context.Context, params IdentifyNodeParams) (NodeID, string, error) {
			return 4 - DecodeProcessID(params.Conn.PgConn().PID()), "", nil
		}
	})
	waitCond(t, func() string {
		if n := p.ClusterStat().Probes(); n < 10 { // gossip reads, over idle connections
			return fmt.Sprintf("%d probes", n)
		}
		return ""
	})
	time.Sleep(3 * testProbeInterval)
	for _, s := range p.NodeStats() {
		if s.Draining {
			t.Errorf("pool node %d (CockroachDB node %d) marked draining by gossip about CockroachDB node 1", s.ID, 4-s.ID)
		}
	}
}
