package main

import (
	"context"
	"fmt"
	"math"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
)

const (
	fleetName = "fleet"
	// fleetWorkersPerPool callers per pool run the kv workload: steady
	// traffic for errors and latency that leaves the two cores room.
	fleetWorkersPerPool = 2
)

// fleetClusterDefaults are the fleet's clusterpool settings unless -cluster
// overrides them: the 500 ms balance and probe intervals of the harness
// issue 13 reports from, so the figures compare.
var fleetClusterDefaults = []string{"cluster_balance_interval=500ms", "cluster_probe_interval=500ms"}

// fleetApp is pool i's application_name, by which the servers tell the
// pools apart.
func fleetApp(i int) string { return fmt.Sprintf("clusterbench-fleet-%02d", i+1) }

// fleetTimeline is when each step of a fleet run happens, from one phase
// length: a long quiet start whose last fifth is the at-rest window, a
// phase after the scale-out, a drain and restart of node 1, and a phase
// after it.
type fleetTimeline struct {
	restFrom, add, drain, drainWait, up, end time.Duration
}

func newFleetTimeline(phase time.Duration) fleetTimeline {
	return fleetTimeline{
		restFrom:  2 * phase,
		add:       phase * 5 / 2,
		drain:     phase * 7 / 2,
		drainWait: phase / 10,
		up:        phase * 37 / 10,
		end:       phase * 47 / 10,
	}
}

var fleetScenario = scenario{
	name:        fleetName,
	headline:    "spread_end",
	destructive: true,
	separate:    true,
	describe: func(h *harness) string {
		o, tl := h.opts, newFleetTimeline(h.opts.fleetPhase)
		return fmt.Sprintf("A fleet of %d pools of %d connections each (MinConns = MaxConns), each pool with its own application_name and %d callers, "+
			"as %d service replicas would run against one cluster: they start together on %d nodes behind the random load balancer; "+
			"nothing changes from %v to %v (the at-rest window); node %d is added at %v; node 1 is drained at %v (57P01, %v connection wait), "+
			"down, and back at %v; the run ends at %v. The servers' counts of each pool's sessions (by application_name), probes' sessions of a few "+
			"milliseconds left out (each count is the median of five 100 ms samples). "+
			"%s "+
			"The cluster is even when every pool holds all its connections "+
			"within ±1 across the nodes and the node that (re)joined holds at least 95%% of its fair share, until the next event.",
			o.pools, o.poolConns, fleetWorkersPerPool, o.pools, o.nodes, secs(tl.restFrom), secs(tl.add), o.nodes+1, secs(tl.add), secs(tl.drain),
			secs(tl.drainWait), secs(tl.up), secs(tl.end), fleetViews(h))
	},
	clusterParams: func(h *harness) []string { return mergeParams(fleetClusterDefaults, h.userCluster) },
	run:           runFleet,
}

// fleetViews says what the servers show a client of the cluster.
func fleetViews(h *harness) string {
	switch {
	case h.opts.fleetGossip:
		return "The servers show CockroachDB's gossip tables (-fleet-gossip), kept current as nodes join, drain and come back."
	case h.inProcess:
		return "The servers show neither gossip nor sessions (in-process backend)."
	}
	return "No gossip (a user without VIEWCLUSTERMETADATA); the servers show crdb_internal.cluster_sessions (every user reads its own sessions), rewritten every " +
		secs(fleetSessionsEvery) + "."
}

// fleetSessionsEvery is how often the fleet's servers' sessions table is
// rewritten (clustertest.Cluster.SetSessions).
const fleetSessionsEvery = 200 * time.Millisecond

// refreshSessions keeps the cluster's sessions table current until ctx
// ends. A failed write leaves the last snapshot, as a slow node leaves
// CockroachDB's view a little stale.
func refreshSessions(ctx context.Context, c *clustertest.Cluster) {
	t := time.NewTicker(fleetSessionsEvery)
	defer t.Stop()
	for {
		_ = c.SetSessions(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func secs(d time.Duration) string { return strconv.FormatFloat(d.Seconds(), 'f', -1, 64) + " s" }

// fleetProbe is what the pools had done at one moment, by their own counts.
type fleetProbe struct {
	probes, connects int64
}

func fleetCounts(pools []db) fleetProbe {
	var f fleetProbe
	for _, p := range pools {
		f.probes += probeConns(p)
		f.connects += p.Stat().NewConnsCount()
	}
	return f
}

// runFleet runs the fleet scenario for one pool kind on a fresh cluster.
func runFleet(ctx context.Context, h *harness, kind string) (res PoolResult, err error) {
	o := h.opts
	tl := newFleetTimeline(o.fleetPhase)
	t, err := h.setup(ctx, runPlan{nodes: o.nodes})
	if err != nil {
		return res, err
	}
	defer func() {
		if cerr := t.close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	c := t.c
	apps := make([]string, o.pools)
	for i := range apps {
		apps[i] = fleetApp(i)
	}
	params := mergeParams(fleetClusterDefaults, h.userCluster)

	start := time.Now()
	ev := &events{start: start, openedAt: make(map[string]int64)}
	smp := startFleetSampler(ctx, c, start)
	defer smp.finish()

	pools := make([]db, 0, o.pools)
	defer func() {
		for _, p := range pools {
			p.Close()
		}
	}()
	for _, app := range apps {
		p, err := newPool(ctx, kind, poolParams{dsn: withParams(t.dsn, []string{"application_name=" + app}), cluster: params, size: o.poolConns})
		if err != nil {
			return res, err
		}
		pools = append(pools, p)
	}

	// gossip writes the gossip tables when the run shows them (-fleet-gossip).
	gossip := func(ctx context.Context, draining map[int]bool) error {
		if !o.fleetGossip {
			return nil
		}
		return c.SetGossip(ctx, draining)
	}
	if err := gossip(ctx, nil); err != nil {
		return res, err
	}
	// Without gossip the servers still show every pool's sessions in
	// crdb_internal.cluster_sessions, as CockroachDB shows each user its
	// own on every node, kept current every fleetSessionsEvery.
	if !o.fleetGossip && !h.inProcess {
		sctx, stop := context.WithCancel(ctx)
		var swg sync.WaitGroup
		swg.Go(func() { refreshSessions(sctx, c) })
		defer func() {
			stop()
			swg.Wait()
		}()
	}

	var restMu sync.Mutex // protects rest
	var rest [2]fleetProbe
	script := func(ctx context.Context) error {
		if !sleepUntil(ctx, tl.restFrom-time.Since(start)) {
			return nil
		}
		restMu.Lock()
		rest[0] = fleetCounts(pools)
		restMu.Unlock()
		if !sleepUntil(ctx, tl.add-time.Since(start)) {
			return nil
		}
		restMu.Lock()
		rest[1] = fleetCounts(pools)
		restMu.Unlock()
		n, err := c.AddNode(ctx)
		if err != nil {
			return ignoreDone(ctx, err)
		}
		ev.mark("add node " + strconv.Itoa(n.ID()))
		if err := ensureKV(ctx, n); err != nil {
			return ignoreDone(ctx, err)
		}
		if err := gossip(ctx, nil); err != nil {
			return ignoreDone(ctx, err)
		}
		if !sleepUntil(ctx, tl.drain-time.Since(start)) {
			return nil
		}
		ev.mark("drain 1")
		if err := gossip(ctx, map[int]bool{1: true}); err != nil {
			return ignoreDone(ctx, err)
		}
		if err := c.Node(1).Drain(ctx, tl.drainWait); err != nil {
			return ignoreDone(ctx, err)
		}
		ev.mark("down 1")
		if !sleepUntil(ctx, tl.up-time.Since(start)) {
			return nil
		}
		if err := c.Node(1).Restart(ctx); err != nil {
			return ignoreDone(ctx, err)
		}
		ev.mark("up 1")
		return ignoreDone(ctx, gossip(ctx, nil))
	}
	rec := newRecorder(start)
	work := func(until context.Context) {
		var wg sync.WaitGroup
		for i, p := range pools {
			wg.Go(func() { runLoad(ctx, until, p, kvMix, fleetWorkersPerPool, o.seed+int64(i), rec) })
		}
		wg.Wait()
	}
	elapsed, err := h.load(ctx, fleetName, kind, tl.end, script, work, rec)
	if err != nil {
		return res, err
	}
	loadEnd := time.Since(start).Seconds()

	// The servers and the pools agree once nothing is opening or closing,
	// unless a pool still counts idle connections the drained node closed
	// (pgxpool finds out at their next acquire): then the servers' count
	// stops changing.
	var final map[int]int
	var poolTotal int
	last, lastChange := -1, time.Now()
	waitFor(ctx, 10*time.Second, func() bool {
		final = nodeCounts(fleetSample{Apps: c.OpenConnsByApp()}, apps)
		poolTotal = 0
		for _, p := range pools {
			poolTotal += int(p.Stat().TotalConns())
		}
		if n := sum(final); n != last {
			last, lastChange = n, time.Now()
		}
		return sum(final) == poolTotal || time.Since(lastChange) >= 500*time.Millisecond
	})
	smp.take()
	end := time.Now()
	raw := smp.finish()
	done := fleetCounts(pools)
	lib := make(map[string]float64)
	for _, p := range pools {
		for k, v := range libraryStats(p) {
			lib[k] += v
		}
	}
	for _, p := range pools {
		p.Close()
	}
	pools = nil

	accepts := make(map[int][]float64)
	sessions := 0
	for _, n := range c.Nodes() {
		for _, at := range n.AcceptTimes(start, end) {
			accepts[n.ID()] = append(accepts[n.ID()], at.Sub(start).Seconds())
		}
		sessions += len(accepts[n.ID()])
	}

	ev.mu.Lock()
	evs := append([]Event(nil), ev.list...)
	ev.mu.Unlock()
	at := make(map[string]float64)
	for _, e := range evs {
		at[e.Label] = e.T
	}

	smooth := smoothApps(raw)
	samples := make([]Sample, len(smooth))
	for i, s := range smooth {
		samples[i] = Sample{T: s.T, Conns: nodeCounts(s, apps)}
	}
	res = poolResult(kind, rec, elapsed, samples, evs, final, poolTotal, int64(sessions)-done.probes)
	res.PoolSize, res.ProbeConns = o.pools*o.poolConns, done.probes
	if len(lib) > 0 {
		res.Library = lib
	}

	restMu.Lock()
	restFrom, restTo := rest[0], rest[1]
	restMu.Unlock()
	fd := &FleetDetail{
		Pools: o.pools, ConnsPerPool: o.poolConns, WorkersPerPool: fleetWorkersPerPool,
		RestFrom: tl.restFrom.Seconds(), RestTo: tl.add.Seconds(),
		RestProbes: restTo.probes - restFrom.probes, RestPoolConnects: restTo.connects - restFrom.connects,
		Sessions: sessions, ProbeSessions: done.probes,
	}
	for _, id := range sortedKeys(accepts) {
		fd.RestSessions += countIn(accepts[id], fd.RestFrom, fd.RestTo)
	}
	added := o.nodes + 1
	addAt, okAdd := at["add node "+strconv.Itoa(added)]
	drainAt, okDrain := at["drain 1"]
	upAt, okUp := at["up 1"]
	// The last phase ends with the load: what the pools hold afterwards
	// is no longer under test.
	runEnd := loadEnd
	startTo := addAt
	if !okAdd {
		startTo = runEnd
	}
	fd.Phases = append(fd.Phases, fleetPhaseResult("cold start", smooth, accepts, apps, o.poolConns, nodeIDs(1, o.nodes), 0, 0, startTo))
	if okAdd && okDrain {
		fd.Phases = append(fd.Phases, fleetPhaseResult("scale-out", smooth, accepts, apps, o.poolConns, nodeIDs(1, added), added, addAt, drainAt))
	}
	if okUp {
		fd.Phases = append(fd.Phases, fleetPhaseResult("restart", smooth, accepts, apps, o.poolConns, nodeIDs(1, added), 1, upAt, runEnd))
	}
	fd.OverTime = fleetPoints(smooth, apps, o.poolConns, func(t float64) ([]int, int) {
		switch {
		case okUp && t >= upAt:
			return nodeIDs(1, added), 1
		case okAdd && t >= addAt:
			return nodeIDs(1, added), added
		}
		return nodeIDs(1, o.nodes), 0
	})
	res.Fleet = fd
	res.Metrics = commonMetrics(&res, fleetMetrics(&res, fd))
	return res, nil
}

func sortedKeys(m map[int][]float64) []int {
	ids := make([]int, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	sort.Ints(ids)
	return ids
}

// fleetMetrics turns a fleet run into the table's figures.
func fleetMetrics(r *PoolResult, fd *FleetDetail) []Metric {
	var ms []Metric
	phase := func(name string) *FleetPhase {
		for i := range fd.Phases {
			if fd.Phases[i].Name == name {
				return &fd.Phases[i]
			}
		}
		return nil
	}
	spreadIdeal := func(p *FleetPhase) *float64 {
		if (fd.Pools*fd.ConnsPerPool)%len(p.Nodes) == 0 {
			return value(0)
		}
		return value(1)
	}
	share := func(name, label string, p *FleetPhase) Metric {
		fair := int(math.Round(p.Fair))
		return Metric{Name: name, Label: fmt.Sprintf(label+" (fair share %d)", p.Rejoin, fair), Value: value(float64(p.RejoinConns)), Better: "higher",
			Ideal: value(math.Floor(0.95 * p.Fair)), Text: fmt.Sprintf("%d of %d", p.RejoinConns, fair)}
	}
	phaseMetrics := func(p *FleetPhase, suffix, when string) {
		ms = append(ms,
			Metric{Name: "spread_" + suffix, Label: fmt.Sprintf("cluster spread %s (max−min, %d nodes)", when, len(p.Nodes)), Value: value(float64(p.ClusterSpread)), Better: "lower", Ideal: spreadIdeal(p), Noise: 1},
			Metric{Name: "pool_spread_" + suffix, Label: fmt.Sprintf("worst pool's own spread %s", when), Value: value(float64(p.WorstPoolSpread)), Better: "lower", Ideal: value(1),
				Text: fmt.Sprintf("%d (%d of %d pools within ±1)", p.WorstPoolSpread, p.PoolsWithinOne, fd.Pools)},
		)
	}
	if p := phase("cold start"); p != nil {
		phaseMetrics(p, "start", "after cold start")
		ms = append(ms, Metric{Name: "even_start", Label: "time until even after cold start", Unit: "s", Value: p.EvenAfter, Better: "lower", Ideal: value(0), Noise: timeNoise})
	}
	ms = append(ms,
		Metric{Name: "rest_sessions", Label: fmt.Sprintf("sessions opened at rest, %g–%g s (servers' count)", fd.RestFrom, fd.RestTo), Value: value(float64(fd.RestSessions)), Better: "lower", Ideal: value(0), Noise: 1},
		Metric{Name: "rest_probes", Label: "of which probes (clusterpool's count)", Value: value(float64(fd.RestProbes)), Better: "lower", Ideal: value(0), Noise: 1},
	)
	if p := phase("scale-out"); p != nil {
		ms = append(ms, share("new_node_conns", "conns on the new node %d after scale-out", p))
		phaseMetrics(p, "add", "after scale-out")
		ms = append(ms,
			Metric{Name: "even_add", Label: "time until even after scale-out", Unit: "s", Value: p.EvenAfter, Better: "lower", Ideal: value(0), Noise: timeNoise},
			Metric{Name: "peak_add", Label: fmt.Sprintf("peak new sessions/s at node %d", p.Rejoin), Unit: "/s", Value: value(float64(p.PeakAcceptsPerSec)), Better: "lower", Noise: 1},
		)
	}
	if p := phase("restart"); p != nil {
		ms = append(ms, share("restarted_conns", "conns on the restarted node %d at the end", p))
		phaseMetrics(p, "end", "at the end")
		ms = append(ms,
			Metric{Name: "even_restart", Label: fmt.Sprintf("time until even after node %d is back", p.Rejoin), Unit: "s", Value: p.EvenAfter, Better: "lower", Ideal: value(0), Noise: timeNoise},
			Metric{Name: "first_even_restart", Label: fmt.Sprintf("time until first even for %gs after node %d is back", evenHold, p.Rejoin), Unit: "s", Value: p.FirstEven, Better: "lower", Ideal: value(0), Noise: timeNoise},
			Metric{Name: "peak_restart", Label: fmt.Sprintf("peak new sessions/s at node %d after restart", p.Rejoin), Unit: "/s", Value: value(float64(p.PeakAcceptsPerSec)), Better: "lower", Noise: 1},
		)
	}
	probePct := 0.0
	if fd.Sessions > 0 {
		probePct = 100 * float64(fd.ProbeSessions) / float64(fd.Sessions)
	}
	ms = append(ms,
		Metric{Name: "pool_sessions", Label: "pool sessions opened over the run (servers' count less probes)", Value: value(float64(int64(fd.Sessions) - fd.ProbeSessions)), Better: "lower", Ideal: value(float64(fd.Pools * fd.ConnsPerPool)), Noise: 1},
		Metric{Name: "probe_sessions", Label: "probe sessions over the run", Value: value(float64(fd.ProbeSessions)), Better: "lower", Ideal: value(0), Noise: 1},
		Metric{Name: "probe_share", Label: "probe sessions ÷ all sessions accepted", Unit: "%", Value: value(probePct), Better: "lower", Ideal: value(0)},
		errorsMetric(r),
		Metric{Name: "p50", Label: "p50 latency", Unit: "ms", Value: value(r.Latency.P50), Better: "lower"},
		Metric{Name: "p99", Label: "p99 latency", Unit: "ms", Value: value(r.Latency.P99), Better: "lower"},
		Metric{Name: "max", Label: "max latency (cold start included)", Unit: "ms", Value: value(r.Latency.Max), Better: "lower"},
	)
	return ms
}

// fleetSampler reads the servers' sessions by application every
// sampleEvery until stopped.
type fleetSampler struct {
	c     *clustertest.Cluster
	start time.Time

	mu      sync.Mutex // protects samples
	samples []fleetSample

	stop func()
	done chan struct{}
}

func startFleetSampler(ctx context.Context, c *clustertest.Cluster, start time.Time) *fleetSampler {
	s := &fleetSampler{c: c, start: start, done: make(chan struct{})}
	ctx, s.stop = context.WithCancel(ctx)
	go func() {
		defer close(s.done)
		t := time.NewTicker(sampleEvery)
		defer t.Stop()
		for {
			s.take()
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return s
}

func (s *fleetSampler) take() {
	apps := s.c.OpenConnsByApp()
	s.mu.Lock()
	s.samples = append(s.samples, fleetSample{T: time.Since(s.start).Seconds(), Apps: apps})
	s.mu.Unlock()
}

// finish stops the sampler (once) and returns its samples.
func (s *fleetSampler) finish() []fleetSample {
	s.stop()
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.samples
}
