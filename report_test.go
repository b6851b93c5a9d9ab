//go:build report

// The reports behind the figures in docs/: they print numbers rather than
// assert them, so they are built only with the report tag (a plain go test
// neither runs nor skips them).

package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/clusterpool/clusterpool/clustertest"
)

// TestBalanceReport produces the balancing numbers in docs/balancing.md:
//
//	go test -tags report -count=1 -run TestBalanceReport -v .
func TestBalanceReport(t *testing.T) {
	type phase struct {
		name   string
		change func(c *clustertest.Cluster)
		want   int // total connections expected
	}
	addNode := func(c *clustertest.Cluster) {
		if _, err := c.AddNode(testCtx(t)); err != nil {
			t.Fatal(err)
		}
	}
	removeNode := func(c *clustertest.Cluster) {
		if err := c.RemoveNode(testCtx(t), 2); err != nil {
			t.Fatal(err)
		}
	}
	phases := []phase{{"start (3 nodes)", nil, 30}, {"add node 4", addNode, 30}, {"remove node 2", removeNode, 30}}
	type scenario struct {
		name   string
		gossip bool // real PostgreSQL nodes with gossip tables, HostsDSN
		plain  bool // plain pgxpool
		redial bool
		runs   int
	}
	scenarios := []scenario{
		{name: "clusterpool, one LB address, redial", redial: true, runs: 4},
		{name: "clusterpool, one LB address, no redial", runs: 4},
		{name: "pgxpool, one LB address", plain: true, runs: 2},
	}
	if clustertest.Available() == nil {
		scenarios = append(scenarios, scenario{name: "clusterpool, node hosts + gossip", gossip: true, runs: 2})
	}
	for _, sc := range scenarios {
		for run := range sc.runs {
			c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: !sc.gossip, Seed: int64(run + 1)})
			dsn := c.DSN()
			if sc.gossip {
				gossipSetup(t, c, nil)
				dsn = c.HostsDSN()
			}
			var p *Pool
			var plain *pgxpool.Pool
			rounds, probes := func() int64 { return 0 }, func() int64 { return 0 }
			if sc.plain {
				cfg, err := pgxpool.ParseConfig(dsn + "&pool_min_conns=30&pool_max_conns=30")
				if err != nil {
					t.Fatal(err)
				}
				plain, err = pgxpool.NewWithConfig(testCtx(t), cfg)
				if err != nil {
					t.Fatal(err)
				}
			} else {
				// Rounds longer than pgxpool's 500 ms refill delay, as with
				// the 5 s default, so a round sees the last round's refill.
				p = startPool(t, dsn, func(cfg *Config) {
					balancedConfig(30, 30)(cfg)
					cfg.BalanceInterval = 600 * time.Millisecond
					cfg.ProbeInterval = 200 * time.Millisecond
					if !sc.redial && !sc.gossip {
						// The same node IDs, from a function of the
						// user's: the pool then has no BackendKey
						// identity to redial by.
						cfg.IdentifyNode = func(_ context.Context, params IdentifyNodeParams) (NodeID, string, error) {
							return DecodeProcessID(params.Conn.PgConn().PID()), "", nil
						}
					}
				})
				rounds = func() int64 { return p.ClusterStat().BalanceRounds() }
				probes = p.probeConns
			}
			for _, ph := range phases {
				if ph.change != nil {
					ph.change(c)
					if sc.gossip {
						gossipSetup(t, c, nil)
					}
				}
				r0, o0, p0 := rounds(), totalOpened(c), probes()
				start := time.Now()
				var spread string
				seenRounds := int64(-1) // rounds when the pool first saw node 4
				for {
					spread = spreadOf(c, ph.want)
					if seenRounds < 0 && p != nil && slices.ContainsFunc(p.NodeStats(), func(s NodeStat) bool { return s.ID == 4 }) {
						seenRounds = rounds()
					}
					if spread == "" || time.Since(start) > 30*time.Second {
						break
					}
					time.Sleep(condPoll)
				}
				result := "balanced"
				if spread != "" {
					result = "NOT balanced after 30s: " + spread
				}
				moves := ""
				if ph.name == "add node 4" {
					moves = fmt.Sprintf(" (min moves %d)", c.Node(4).OpenConns())
					if seenRounds >= 0 {
						moves += fmt.Sprintf(" | rounds after node 4 seen %d", rounds()-seenRounds)
					}
				}
				t.Logf("%s | run %d | %s | rounds %d | opened %d%s | %s",
					sc.name, run, ph.name, rounds()-r0, totalOpened(c)-o0-(probes()-p0), moves, result)
			}
			if plain != nil {
				plain.Close()
			}
			if p != nil {
				p.Close()
			}
			c.Close()
		}
	}
}

// TestRetryReport prints the README's numbers: errors seen by callers and
// p99 latency, for clusterpool and plain pgxpool side by side on the same
// cluster under the same faults:
//
//	CLUSTERPOOL_RETRY_LOAD=20s go test -tags report -count=1 -run TestRetryReport -v .
func TestRetryReport(t *testing.T) {
	c := newKVCluster(t, 3)
	cp := newRetryPool(t, c.DSN(), 12)
	pp := newPlainPool(t, c.DSN(), 12)
	d := retryLoad(t)

	report := func(name string, res []*loadResult) {
		t.Logf("%-16s clusterpool: %6d ops %4d errors p99 %8v | pgxpool: %6d ops %4d errors p99 %8v",
			name, res[0].ops, len(res[0].errs), res[0].p99().Round(time.Millisecond),
			res[1].ops, len(res[1].errs), res[1].p99().Round(time.Millisecond))
		for i, r := range res {
			if len(r.errs) > 0 {
				t.Logf("  %s errors, first of them: %s", [...]string{"clusterpool", "pgxpool"}[i], r.summary())
			}
		}
	}
	report("steady", withLoad(func() { time.Sleep(d / 2) }, cp, pp))
	report("rolling restart", withLoad(func() { rollingRestart(t, c, d) }, cp, pp))
	report("crash (Kill)", withLoad(func() { crash(t, c.Node(2), d) }, cp, pp))

	// Plain INSERTs, not marked idempotent, during another rolling restart:
	// what cannot be hidden is the writes in flight when a node force-closes.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var counts [2]struct{ ok, unknown, other int }
	for i, d := range []db{cp, pp} {
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
					_, err := d.Exec(ctx, "INSERT INTO ids (worker, seq) VALUES ($1, $2)", i*1000+w, seq)
					cancel()
					mu.Lock()
					switch {
					case err == nil:
						counts[i].ok++
					case errors.Is(err, ErrOutcomeUnknown):
						counts[i].unknown++
					default:
						counts[i].other++
					}
					mu.Unlock()
				}
			}()
		}
	}
	rollingRestart(t, c, d)
	close(stop)
	wg.Wait()
	t.Logf("rolling restart, plain INSERT: clusterpool %d ok, %d outcome unknown, %d other errors | pgxpool %d ok, %d errors",
		counts[0].ok, counts[0].unknown, counts[0].other, counts[1].ok, counts[1].other)
}
