package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
)

// scenario is one comparison; it runs once per pool, each time on a fresh
// cluster started with the same seed, so both pools meet the same load
// balancer decisions.
type scenario struct {
	name        string
	description string
	// destructive scenarios change the cluster (kill, drain, add nodes):
	// they run only on the embedded cluster, never on -dsn.
	destructive bool
	// warm: the scenario's faults strike a running service, not one still
	// starting, so the load and the script start once the pool holds its
	// size and -warmup has passed since it was made (see runPool).
	warm bool
	// alternate runs the pools in turns on one cluster (A B B A A B), so
	// that a machine whose speed drifts (other processes) favours neither;
	// for throughput comparisons.
	alternate bool
	// plan describes one pool's run; metrics turns its raw result into figures.
	plan    func(h *harness) runPlan
	metrics func(h *harness, r *PoolResult, info runInfo) []Metric
	// run, when set, replaces the harness's single-pool run (fleet);
	// describe, when set, replaces description with one that names the
	// run's settings; clusterParams, when set, are the cluster_* settings
	// the scenario's clusterpool runs with instead of the run's.
	run           func(ctx context.Context, h *harness, kind string) (PoolResult, error)
	describe      func(h *harness) string
	clusterParams func(h *harness) []string
	// headline names the metric the report's summary shows.
	headline string
	// noPlot leaves out the plot of connections over time (overhead, whose
	// one node holds the whole pool throughout).
	noPlot bool
	// separate scenarios are not part of "all": they take minutes (fleet)
	// and are asked for by name.
	separate bool
}

// runPlan is what one pool run does.
type runPlan struct {
	nodes    int // cluster size at start
	poolSize int
	workload workload
	// dsn picks the address the pool connects to; nil means the load balancer.
	dsn func(c *clustertest.Cluster) string
	// before runs after the cluster started, before the pool is opened;
	// settle runs after the pool has opened its connections, before the load.
	before, settle func(ctx context.Context, c *clustertest.Cluster, mark func(string)) error
	// script runs alongside the load (faults over time); it must return
	// when ctx ends.
	script func(ctx context.Context, c *clustertest.Cluster, mark func(string)) error
	// localities are the nodes' localities (clustertest.Options); cluster
	// are cluster_* settings added to the run's for clusterpool.
	localities, cluster []string
}

// warmNames returns the names among names of the warm scenarios.
func warmNames(names []string) []string {
	var warm []string
	for _, n := range names {
		if s, ok := scenarioByName(n); ok && s.warm {
			warm = append(warm, n)
		}
	}
	return warm
}

// runInfo is what the metric functions need to know about a finished run.
type runInfo struct {
	plan   runPlan
	events map[string]float64 // event label → time (s)
	// openedAt is the number of connections the pool had opened (probe
	// connections not counted) when each event happened.
	openedAt map[string]int64
}

var scenarios = []scenario{
	{
		name:        "balance",
		headline:    "spread_end",
		description: "Start-up: the pool opens all its connections through the load balancer, which spreads them at random. Spread of the servers' per-node counts (max − min), and time until balanced (spread ≤ 1 for the rest of the run).",
		plan: func(h *harness) runPlan {
			return runPlan{nodes: h.opts.nodes, poolSize: h.opts.workers, workload: kvMix}
		},
		metrics: func(h *harness, r *PoolResult, info runInfo) []Metric {
			nodes := nodeIDs(1, info.plan.nodes)
			if h.counterIsHooks {
				nodes = nodesSeen(r.Samples)
			}
			startSpread, moves := math.NaN(), 0
			for _, s := range r.Samples {
				if sum(s.Conns) >= info.plan.poolSize {
					startSpread = float64(spread(s.Conns, nodes))
					moves = minMoves(s.Conns, nodes)
					break
				}
			}
			at := settledAt(r.Samples, 0, nodes, info.plan.poolSize)
			return []Metric{
				{Name: "spread_start", Label: "spread at start (max−min conns)", Value: nanNil(startSpread), Better: "lower", Ideal: value(1), Noise: 1},
				{Name: "spread_end", Label: "spread at end", Value: value(float64(spread(lastConns(r), nodes))), Better: "lower", Ideal: value(1), Noise: 1},
				{Name: "time_to_balance", Label: "time until balanced", Unit: "s", Value: at, Better: "lower", Ideal: value(0), Noise: timeNoise},
				{Name: "rounds_to_balance", Label: "balance rounds until balanced", Value: h.rounds(at), Better: "lower", Ideal: value(0), Noise: 1},
				{Name: "reconnects", Label: fmt.Sprintf("conns opened beyond pool size (minimum moves %d)", moves), Value: value(float64(r.ConnsOpened - int64(info.plan.poolSize))), Better: "lower", Ideal: value(float64(moves)), Noise: 1},
			}
		},
	},
	{
		name:        "scale-out",
		headline:    "new_node_conns",
		description: "A node is added a fifth of the way into the run (the dashed line marks when it is up and routable). Rounds (balance intervals) and connections opened until the new node holds its share (spread ≤ 1 over all nodes).",
		destructive: true,
		plan: func(h *harness) runPlan {
			d := h.opts.duration
			return runPlan{
				nodes: h.opts.nodes, poolSize: h.opts.workers, workload: kvMix,
				script: func(ctx context.Context, c *clustertest.Cluster, mark func(string)) error {
					if !sleepUntil(ctx, d/5) {
						return nil
					}
					n, err := c.AddNode(ctx)
					if err != nil {
						return err
					}
					mark("add node " + strconv.Itoa(n.ID()))
					return ensureKV(ctx, n)
				},
			}
		},
		metrics: func(h *harness, r *PoolResult, info runInfo) []Metric {
			added := info.plan.nodes + 1
			label := "add node " + strconv.Itoa(added)
			t0, ok := info.events[label]
			if !ok {
				return nil
			}
			nodes := nodeIDs(1, added)
			at := settledAt(r.Samples, t0, nodes, info.plan.poolSize)
			var after *float64
			if at != nil {
				after = value(*at - t0)
			}
			fair := info.plan.poolSize / added
			minMoves := float64(fair)
			opened := float64(r.ConnsOpened - info.openedAt[label])
			onNew := lastConns(r)[added]
			return []Metric{
				{Name: "new_node_conns", Label: fmt.Sprintf("conns on the new node (fair share %d)", fair), Value: value(float64(onNew)), Better: "higher", Ideal: value(float64(fair)), Text: fmt.Sprintf("%d of %d", onNew, fair)},
				{Name: "spread_end", Label: "spread at end", Value: value(float64(spread(lastConns(r), nodes))), Better: "lower", Ideal: value(1), Noise: 1},
				{Name: "time_to_balance", Label: "time until balanced after add", Unit: "s", Value: after, Better: "lower", Ideal: value(0), Noise: timeNoise},
				{Name: "rounds_to_balance", Label: "balance rounds until balanced", Value: h.rounds(after), Better: "lower", Ideal: value(0), Noise: 1},
				{Name: "conns_opened", Label: "conns opened after add", Value: value(opened), Better: "lower", Ideal: value(minMoves), Noise: 1},
				{Name: "churn", Label: "conns opened ÷ minimum moves", Unit: "x", Value: value(opened / minMoves), Better: "lower", Ideal: value(1)},
			}
		},
	},
	{
		name:        "rolling-restart",
		headline:    "errors",
		description: "Each node in turn is drained (new connections refused with 57P01, existing ones closed after a connection wait) and restarted, under load. Errors seen by callers and latency. The load starts on a warm pool: it holds its size and has been up for -warmup.",
		destructive: true,
		warm:        true,
		plan: func(h *harness) runPlan {
			d, nodes := h.opts.duration, h.opts.nodes
			slot := d / time.Duration(nodes+1)
			wait := slot / 3
			return runPlan{
				nodes: nodes, poolSize: h.opts.workers, workload: kvMix,
				script: func(ctx context.Context, c *clustertest.Cluster, mark func(string)) error {
					start := time.Now()
					for i, n := range c.Nodes() {
						if !sleepUntil(ctx, slot/4+time.Duration(i)*slot-time.Since(start)) {
							return nil
						}
						mark("drain " + strconv.Itoa(n.ID()))
						if err := n.Drain(ctx, wait); err != nil {
							return ignoreDone(ctx, err)
						}
						if err := n.Restart(ctx); err != nil {
							return ignoreDone(ctx, err)
						}
						mark("up " + strconv.Itoa(n.ID()))
					}
					return nil
				},
			}
		},
		metrics: func(h *harness, r *PoolResult, info runInfo) []Metric {
			return []Metric{
				errorsMetric(r),
				{Name: "error_pct", Label: "failed operations", Unit: "%", Value: value(pct(r.Errors, r.Ops)), Better: "lower", Ideal: value(0)},
				{Name: "p50", Label: "p50 latency", Unit: "ms", Value: value(r.Latency.P50), Better: "lower"},
				{Name: "p99", Label: "p99 latency", Unit: "ms", Value: value(r.Latency.P99), Better: "lower"},
				{Name: "max", Label: "max latency", Unit: "ms", Value: value(r.Latency.Max), Better: "lower"},
			}
		},
	},
	{
		name:        "crash",
		headline:    "errors",
		description: "One node is killed (sockets closed, no message) a quarter into the run and restarted at half time, under load. Errors, p99, time until callers stop seeing errors, and time until the restarted node has its share again. The load starts on a warm pool: it holds its size and has been up for -warmup.",
		destructive: true,
		warm:        true,
		plan: func(h *harness) runPlan {
			d := h.opts.duration
			victim := h.opts.nodes/2 + 1
			return runPlan{
				nodes: h.opts.nodes, poolSize: h.opts.workers, workload: kvMix,
				script: func(ctx context.Context, c *clustertest.Cluster, mark func(string)) error {
					start := time.Now()
					if !sleepUntil(ctx, d/4) {
						return nil
					}
					n := c.Node(victim)
					// Marked first: callers' errors start while Kill closes
					// the sockets.
					mark("kill " + strconv.Itoa(victim))
					n.Kill()
					if !sleepUntil(ctx, d/2-time.Since(start)) {
						return nil
					}
					if err := n.Restart(ctx); err != nil {
						return ignoreDone(ctx, err)
					}
					mark("restart " + strconv.Itoa(victim))
					return nil
				},
			}
		},
		metrics: func(h *harness, r *PoolResult, info runInfo) []Metric {
			victim := strconv.Itoa(h.opts.nodes/2 + 1)
			killAt, restartAt := info.events["kill "+victim], info.events["restart "+victim]
			recover := 0.0
			if last := r.LastErrorAt; last > killAt {
				recover = last - killAt
			}
			var rebalanced *float64
			if t, ok := info.events["restart "+victim]; ok {
				if at := settledAt(r.Samples, t, nodeIDs(1, info.plan.nodes), info.plan.poolSize); at != nil {
					rebalanced = value(*at - restartAt)
				}
			}
			toRecover := Metric{Name: "time_to_recover", Label: "kill → last caller error", Unit: "ms", Value: value(recover * 1000), Better: "lower", Ideal: value(0)}
			if r.Errors == 0 {
				toRecover.Text = "no errors"
			}
			return []Metric{
				errorsMetric(r),
				{Name: "p99", Label: "p99 latency", Unit: "ms", Value: value(r.Latency.P99), Better: "lower"},
				toRecover,
				{Name: "time_to_rebalance", Label: "restart → balanced again", Unit: "s", Value: rebalanced, Better: "lower", Ideal: value(0), Noise: timeNoise},
			}
		},
	},
	{
		name:     "hot-spot",
		headline: "of_ideal",
		description: fmt.Sprintf("Every node serves at most %s queries at once (SetCapacity); each query holds the server %v. "+
			"The last node is down while the pool starts and comes back before the load begins, so the pool starts uneven, "+
			"as after a node restart. Throughput and p99 against the ideal of a perfectly balanced pool (nodes × capacity ÷ query time).", "workers/(2·nodes)", hotSpotQuery),
		destructive: true,
		plan: func(h *harness) runPlan {
			nodes := h.opts.nodes
			capacity := hotSpotCapacity(h.opts.workers, nodes)
			return runPlan{
				nodes: nodes, poolSize: h.opts.workers, workload: sleepQuery,
				before: func(ctx context.Context, c *clustertest.Cluster, mark func(string)) error {
					for _, n := range c.Nodes() {
						n.SetCapacity(capacity)
					}
					c.Node(nodes).Kill()
					mark("node " + strconv.Itoa(nodes) + " down")
					return nil
				},
				settle: func(ctx context.Context, c *clustertest.Cluster, mark func(string)) error {
					if err := c.Node(nodes).Restart(ctx); err != nil {
						return err
					}
					mark("node " + strconv.Itoa(nodes) + " back")
					return nil
				},
			}
		},
		metrics: func(h *harness, r *PoolResult, info runInfo) []Metric {
			nodes := info.plan.nodes
			ideal := float64(nodes*hotSpotCapacity(h.opts.workers, nodes)) / hotSpotQuery.Seconds()
			return []Metric{
				{Name: "ops_per_sec", Label: "throughput", Unit: "ops/s", Value: value(r.OpsPerSec), Better: "higher"},
				{Name: "of_ideal", Label: fmt.Sprintf("throughput ÷ ideal (%.0f ops/s)", ideal), Unit: "x", Value: value(r.OpsPerSec / ideal), Better: "higher", Ideal: value(1)},
				{Name: "p99", Label: "p99 latency", Unit: "ms", Value: value(r.Latency.P99), Better: "lower"},
				{Name: "p99_of_ideal", Label: fmt.Sprintf("p99 ÷ query time (%v)", hotSpotQuery), Unit: "x", Value: value(r.Latency.P99 / float64(hotSpotQuery.Milliseconds())), Better: "lower"},
				{Name: "spread_end", Label: "spread at end", Value: value(float64(spread(lastConns(r), nodeIDs(1, nodes)))), Better: "lower", Ideal: value(1), Noise: 1},
			}
		},
	},
	regionsScenario,
	{
		name:        "overhead",
		headline:    "ops_per_sec",
		noPlot:      true,
		description: "SELECT 1 back to back against a single node (no load balancer): what the pool itself costs per query. The pools take turns (A B B A A B, a third of the duration each, each turn on a freshly filled pool) so that the machine's drifting speed favours neither.",
		alternate:   true,
		plan: func(h *harness) runPlan {
			return runPlan{
				nodes: 1, poolSize: h.opts.workers, workload: selectOne,
				dsn: func(c *clustertest.Cluster) string { return c.Nodes()[0].DSN() },
			}
		},
		metrics: func(h *harness, r *PoolResult, info runInfo) []Metric {
			return []Metric{
				{Name: "ops_per_sec", Label: "SELECT 1 throughput", Unit: "ops/s", Value: value(r.OpsPerSec), Better: "higher"},
				{Name: "p50", Label: "p50 latency", Unit: "ms", Value: value(r.Latency.P50), Better: "lower"},
				{Name: "p99", Label: "p99 latency", Unit: "ms", Value: value(r.Latency.P99), Better: "lower"},
			}
		},
	},
}

// allScenarios are the scenarios "all" runs, then the separate ones.
func allScenarios() []scenario {
	return append(append([]scenario{}, scenarios...), fleetScenario, limitsScenario)
}

// commonMetrics are added to every scenario's own.
func commonMetrics(r *PoolResult, own []Metric) []Metric {
	have := make(map[string]bool)
	for _, m := range own {
		have[m.Name] = true
	}
	for _, m := range []Metric{
		{Name: "ops_per_sec", Label: "throughput", Unit: "ops/s", Value: value(r.OpsPerSec), Better: "higher"},
		errorsMetric(r),
		{Name: "p50", Label: "p50 latency", Unit: "ms", Value: value(r.Latency.P50), Better: "lower"},
		{Name: "p99", Label: "p99 latency", Unit: "ms", Value: value(r.Latency.P99), Better: "lower"},
	} {
		if !have[m.Name] {
			own = append(own, m)
		}
	}
	return own
}

// timeNoise is the resolution of a time read from the samples: two
// sampling intervals, in seconds.
var timeNoise = 2 * sampleEvery.Seconds()

func errorsMetric(r *PoolResult) Metric {
	return Metric{Name: "errors", Label: "errors seen by callers", Value: value(float64(r.Errors)), Better: "lower", Ideal: value(0)}
}

func scenarioByName(name string) (scenario, bool) {
	for _, s := range allScenarios() {
		if s.name == name {
			return s, true
		}
	}
	return scenario{}, false
}

// minMoves is the fewest connections that must move for conns to be
// balanced: targets differ by at most one, the larger ones on the nodes that
// hold the most.
func minMoves(conns map[int]int, nodes []int) int {
	counts := make([]int, len(nodes))
	total := 0
	for i, id := range nodes {
		counts[i] = conns[id]
		total += counts[i]
	}
	sort.Sort(sort.Reverse(sort.IntSlice(counts)))
	moves := 0
	for i, c := range counts {
		target := total / len(nodes)
		if i < total%len(nodes) {
			target++
		}
		moves += max(0, c-target)
	}
	return moves
}

func hotSpotCapacity(workers, nodes int) int { return max(1, workers/(2*nodes)) }

// rounds converts a time into balance intervals.
func (h *harness) rounds(at *float64) *float64 {
	if at == nil {
		return nil
	}
	return value(math.Ceil(*at / h.balanceInterval.Seconds()))
}

func nanNil(v float64) *float64 {
	if math.IsNaN(v) {
		return nil
	}
	return value(v)
}

func pct(n, of int64) float64 {
	if of == 0 {
		return 0
	}
	return 100 * float64(n) / float64(of)
}

func lastConns(r *PoolResult) map[int]int {
	if len(r.Samples) == 0 {
		return nil
	}
	return r.Samples[len(r.Samples)-1].Conns
}

func nodesSeen(samples []Sample) []int {
	seen := make(map[int]bool)
	var ids []int
	for _, s := range samples {
		for id := range s.Conns {
			if !seen[id] {
				seen[id] = true
				ids = append(ids, id)
			}
		}
	}
	return ids
}

// sleepUntil waits d (if positive); false if ctx ended first.
func sleepUntil(ctx context.Context, d time.Duration) bool {
	if d > 0 {
		sleepCtx(ctx, d)
	}
	return ctx.Err() == nil
}

func ignoreDone(ctx context.Context, err error) error {
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		return nil
	}
	return err
}

// events is a run's event log, written by the scenario's script while the
// sampler and workers run.
type events struct {
	start   time.Time
	counter connCounter
	pool    db // once open: its probe connections are not counted as opened

	mu       sync.Mutex // protects the fields below
	list     []Event
	openedAt map[string]int64
}

func (e *events) mark(label string) {
	var opened int64
	if e.counter != nil {
		opened = e.counter.opened()
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.pool != nil && e.counter != nil && e.counter.seesProbes() {
		opened -= probeConns(e.pool)
	}
	e.list = append(e.list, Event{T: time.Since(e.start).Seconds(), Label: label})
	e.openedAt[label] = opened
}
