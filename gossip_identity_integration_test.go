package clusterpool

import (
	"context"
	"fmt"
	"testing"

	"github.com/clusterpool/clusterpool/clustertest"
)

// With the query identity or IdentifyNode the pool's node IDs are not
// CockroachDB's, so gossip entries are matched to the pool's nodes by
// address, here the nodes' own addresses listed in the connection string:
// the node gossip says is draining, and only that one, is marked draining
// and loses its connections. (Gossip names CockroachDB node 1; with
// IdentifyNode it is pool node 3 and pool node 1 is CockroachDB node 3.)
func TestGossipMatchedByAddress(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
	}{
		{"query", func(cfg *Config) { cfg.NodeIdentity = NodeIdentityQuery }},
		{"IdentifyNode", func(cfg *Config) {
			cfg.IdentifyNode = func(_ context.Context, params IdentifyNodeParams) (NodeID, string, error) {
				return 4 - DecodeProcessID(params.Conn.PgConn().PID()), "", nil
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := clustertest.New(t, clustertest.Options{Nodes: 3})
			gossipSetup(t, c, nil)
			p := startPool(t, c.HostsDSN(), func(cfg *Config) {
				balancedConfig(6, 6)(cfg)
				tc.mutate(cfg)
			})
			var drained NodeID // the pool's ID of CockroachDB node 1
			waitCond(t, func() string {
				if drained = p.placement.nodeBehind(c.Node(1).Addr()); drained == 0 {
					return "the pool has not mapped node 1's address yet"
				}
				return spreadOf(c, 6)
			})
			if tc.name == "IdentifyNode" && drained != 3 {
				t.Fatalf("node 1's address leads to pool node %d, want 3", drained)
			}

			gossipSetup(t, c, map[int]bool{1: true})
			waitCond(t, func() string {
				var draining []NodeID
				for _, s := range p.NodeStats() {
					if s.Draining {
						draining = append(draining, s.ID)
					}
				}
				if len(draining) != 1 || draining[0] != drained {
					return fmt.Sprintf("pool nodes marked draining %v, want [%d]", draining, drained)
				}
				if k := c.Node(1).OpenConns(); k != 0 {
					return fmt.Sprintf("draining node 1 still holds %d connections", k)
				}
				if k := c.Node(2).OpenConns() + c.Node(3).OpenConns(); k != 6 {
					return fmt.Sprintf("nodes 2 and 3 hold %d connections, want 6", k)
				}
				return ""
			})
		})
	}
}
