package clusterpool

import (
	"context"
	"fmt"
	"testing"

	"github.com/clusterpool/clusterpool/clustertest"
)

// With IdentifyNode the pool's node IDs are the user's, not CockroachDB's:
// gossip, which names CockroachDB's IDs, must not mark the pool's node of the
// same number draining (here pool node 1 is CockroachDB node 3).
func TestGossipIgnoredForForeignNodeIDs(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	gossipSetup(t, c, map[int]bool{1: true})
	p := startPool(t, c.DSN(), func(cfg *Config) {
		balancedConfig(6, 6)(cfg)
		cfg.IdentifyNode = func(_ context.Context, params IdentifyNodeParams) (NodeID, string, error) {
			return 4 - DecodeProcessID(params.Conn.PgConn().PID()), "", nil
		}
	})
	// Ten probes that reached a node and read the gossip naming CockroachDB
	// node 1 as draining; ClusterStat counts a probe once it has returned,
	// so each has applied what it read.
	waitCond(t, func() string {
		st := p.ClusterStat()
		if n := st.Probes() - st.ProbeFailures(); n < 10 { // gossip reads over idle connections count
			return fmt.Sprintf("%d successful probes", n)
		}
		return ""
	})
	for _, s := range p.NodeStats() {
		if s.Draining {
			t.Errorf("pool node %d (CockroachDB node %d) marked draining by gossip about CockroachDB node 1", s.ID, 4-s.ID)
		}
	}
}
