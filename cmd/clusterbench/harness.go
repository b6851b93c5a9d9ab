package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
)

// sampleEvery is how often the servers' connection counts are read.
const sampleEvery = 100 * time.Millisecond

// harness runs scenarios with one set of options.
type harness struct {
	opts      options
	inProcess bool // embedded cluster on fakepg instead of PostgreSQL
	// counterIsHooks is true with -dsn: counts per node come from the pools'
	// hooks, not from the servers.
	counterIsHooks bool
	prog           *progress
	// cluster are clusterpool's cluster_* settings; balanceInterval is the
	// one among them that turns times into rounds.
	cluster         []string
	balanceInterval time.Duration
	// userCluster are the -cluster settings as given, for scenarios with
	// defaults of their own.
	userCluster []string
}

func (h *harness) runScenario(ctx context.Context, s scenario) (ScenarioResult, error) {
	res := ScenarioResult{Name: s.name, Description: s.description, Headline: s.headline}
	if s.describe != nil {
		res.Description = s.describe(h)
	}
	if s.clusterParams != nil {
		_, settings, err := clusterpoolSettings(s.clusterParams(h))
		if err != nil {
			return res, fmt.Errorf("%s: %w", s.name, err)
		}
		res.Settings = settings
	}
	if s.alternate {
		pools, err := h.runAlternating(ctx, s)
		if err != nil {
			return res, fmt.Errorf("%s: %w", s.name, err)
		}
		res.Pools = pools
	} else {
		runPool := h.runPool
		if s.run != nil {
			runPool = func(ctx context.Context, s scenario, kind string) (PoolResult, error) { return s.run(ctx, h, kind) }
		}
		var pairs [][2]PoolResult
		for j := range h.opts.repeat {
			var pair [2]PoolResult
			for _, i := range pairOrder(j) {
				kind := poolKinds[i]
				r, err := runPool(ctx, s, kind)
				if err != nil {
					return res, fmt.Errorf("%s with %s: %w", s.name, kind, err)
				}
				pair[i] = r
			}
			pairs = append(pairs, pair)
		}
		res.Pools = pairs[0][:]
		res.Repeats = repeats(pairs)
	}
	res.computeRatios()
	return res, nil
}

// target is what one run talks to: an embedded cluster or the -dsn cluster.
type target struct {
	c       *clustertest.Cluster // nil with -dsn
	counter connCounter
	hooks   *hookCounter // with -dsn
	dsn     string
}

// setup starts a fresh embedded cluster for plan (same seed every time), or
// prepares counting for -dsn. The caller must call close.
func (h *harness) setup(ctx context.Context, plan runPlan) (*target, error) {
	if h.opts.dsn != "" {
		hooks := newHookCounter()
		return &target{counter: hooks, hooks: hooks, dsn: h.opts.dsn}, nil
	}
	c, err := clustertest.Start(ctx, clustertest.Options{Nodes: plan.nodes, Seed: h.opts.seed, InProcess: h.inProcess, Localities: plan.localities})
	if err != nil {
		return nil, err
	}
	t := &target{c: c, counter: clusterCounter{c}, dsn: c.DSN()}
	for _, n := range c.Nodes() {
		if err := ensureKV(ctx, n); err != nil {
			t.close()
			return nil, err
		}
	}
	if plan.dsn != nil {
		t.dsn = plan.dsn(c)
	}
	return t, nil
}

func (t *target) close() error {
	if t.c != nil {
		return t.c.Close()
	}
	return nil
}

// sampler reads the per-node counts every sampleEvery until stopped.
type sampler struct {
	counter connCounter
	start   time.Time
	offset  float64 // added to every sample's time (runs made of turns)

	mu      sync.Mutex // protects samples
	samples []Sample

	stop func()
	done chan struct{}
}

func startSampler(ctx context.Context, counter connCounter, start time.Time, offset float64) *sampler {
	s := &sampler{counter: counter, start: start, offset: offset, done: make(chan struct{})}
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

func (s *sampler) take() {
	conns := s.counter.openConns()
	s.mu.Lock()
	s.samples = append(s.samples, Sample{T: s.offset + time.Since(s.start).Seconds(), Conns: conns})
	s.mu.Unlock()
}

// finish stops the sampler and returns its samples.
func (s *sampler) finish() []Sample {
	s.stop()
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.samples
}

// settleCounts waits (briefly) until the pool's own count and the servers'
// agree, which they do once nothing is opening or closing, and returns both.
func settleCounts(ctx context.Context, counter connCounter, pool db) (map[int]int, int) {
	var final map[int]int
	var poolTotal int
	waitFor(ctx, 10*time.Second, func() bool {
		final = counter.openConns()
		poolTotal = int(pool.Stat().TotalConns())
		return sum(final) == poolTotal
	})
	return final, poolTotal
}

// runPool runs one scenario for one pool kind on a fresh cluster.
func (h *harness) runPool(ctx context.Context, s scenario, kind string) (res PoolResult, err error) {
	plan := s.plan(h)
	t, err := h.setup(ctx, plan)
	if err != nil {
		return res, err
	}
	defer func() {
		if cerr := t.close(); cerr != nil && err == nil {
			err = cerr
		}
	}()

	start := time.Now()
	ev := &events{start: start, counter: t.counter, openedAt: make(map[string]int64)}
	opened0 := t.counter.opened()
	if plan.before != nil {
		if err := plan.before(ctx, t.c, ev.mark); err != nil {
			return res, err
		}
	}
	pool, err := newPool(ctx, kind, poolParams{dsn: t.dsn, cluster: mergeParams(h.cluster, plan.cluster), size: plan.poolSize, hooks: t.hooks})
	if err != nil {
		return res, err
	}
	poolClosed := false
	defer func() {
		if !poolClosed {
			pool.Close()
		}
	}()
	ev.mu.Lock()
	ev.pool = pool
	ev.mu.Unlock()
	var warmUp time.Duration
	if s.warm {
		// A running service: the pool holds its size and has been up for
		// -warmup. Its samples, events and latencies count from here; its
		// connects and ClusterStat still count from its creation.
		waitFor(ctx, 20*time.Second, func() bool { return established(pool) >= plan.poolSize })
		if !sleepUntil(ctx, h.opts.warmup-time.Since(start)) {
			return res, ctx.Err()
		}
		warmUp = time.Since(start)
		start = time.Now()
		ev.mu.Lock()
		ev.start = start
		ev.mu.Unlock()
	}
	smp := startSampler(ctx, t.counter, start, 0)
	defer smp.finish()

	if plan.settle != nil {
		// Let the pool open its connections first, so the start is uneven.
		waitFor(ctx, 20*time.Second, func() bool { return established(pool) >= plan.poolSize })
		if err := plan.settle(ctx, t.c, ev.mark); err != nil {
			return res, err
		}
	}

	rec := newRecorder(start)
	var script func(context.Context) error
	if plan.script != nil {
		script = func(ctx context.Context) error { return plan.script(ctx, t.c, ev.mark) }
	}
	var churned func() int64
	work := func(until context.Context) {
		if kind == pgxpoolKind && h.opts.pgxpoolChurn > 0 {
			churned = startChurn(until, t.dsn, h.opts.pgxpoolChurn)
		}
		runLoad(ctx, until, pool, plan.workload, h.opts.workers, h.opts.seed, rec)
	}
	elapsed, err := h.load(ctx, s.name, kind, h.opts.duration, script, work, rec)
	var churn int64
	if churned != nil {
		churn = churned()
	}
	if err != nil {
		return res, err
	}

	final, poolTotal := settleCounts(ctx, t.counter, pool)
	smp.take()
	samples := smp.finish() // before Close, which the plot should not show
	opened := t.counter.opened() - opened0
	probes := int64(0)
	if t.counter.seesProbes() {
		probes = probeConns(pool) + churn
	}
	lib := libraryStats(pool)
	pool.Close()
	poolClosed = true

	ev.mu.Lock()
	evs := append([]Event(nil), ev.list...)
	info := runInfo{plan: plan, events: make(map[string]float64), openedAt: make(map[string]int64)}
	for _, e := range evs {
		info.events[e.Label] = e.T
	}
	for k, v := range ev.openedAt {
		info.openedAt[k] = v - opened0
	}
	ev.mu.Unlock()

	res = poolResult(kind, rec, elapsed, samples, evs, final, poolTotal, opened-probes)
	res.PoolSize, res.ProbeConns, res.Library = plan.poolSize, probes, lib
	res.WarmUp = warmUp.Seconds()
	res.Metrics = commonMetrics(&res, s.metrics(h, &res, info))
	return res, nil
}

// load runs work, which must return soon after its context ends (and the
// scenario's script, if any) for d, with progress, and returns how long the
// load ran.
func (h *harness) load(ctx context.Context, scenario, label string, d time.Duration, script func(context.Context) error, work func(context.Context), rec *recorder) (time.Duration, error) {
	h.prog.begin(scenario, label, d)
	loadStart := time.Now()
	loadCtx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	scriptErr := make(chan error, 1)
	go func() {
		if script == nil {
			scriptErr <- nil
			return
		}
		scriptErr <- script(loadCtx)
	}()
	progDone := make(chan struct{})
	go func() {
		defer close(progDone)
		h.prog.run(loadCtx, loadStart, d)
	}()
	opsBefore, errsBefore := rec.ops.Load(), rec.errs.Load()
	work(loadCtx)
	elapsed := time.Since(loadStart)
	cancel()
	<-progDone
	if err := <-scriptErr; err != nil {
		return elapsed, err
	}
	if err := ctx.Err(); err != nil {
		return elapsed, err
	}
	h.prog.end(d, rec.ops.Load()-opsBefore, rec.errs.Load()-errsBefore)
	return elapsed, nil
}

func poolResult(kind string, rec *recorder, elapsed time.Duration, samples []Sample, evs []Event, final map[int]int, poolTotal int, opened int64) PoolResult {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	phases := phaseLatencies(rec.lat, rec.at, evs, elapsed.Seconds()) // before percentiles sorts rec.lat
	r := PoolResult{
		Pool:           kind,
		Ops:            rec.ops.Load(),
		Errors:         rec.errs.Load(),
		OpsPerSec:      float64(rec.ops.Load()) / elapsed.Seconds(),
		Phases:         phases,
		Latency:        percentiles(rec.lat),
		Samples:        samples,
		Events:         evs,
		FinalNodeConns: final,
		FinalPoolConns: poolTotal,
		ConnsOpened:    opened,
		ErrorExamples:  rec.examples,
	}
	if last := rec.lastErr.Load(); last > 0 {
		r.LastErrorAt = time.Duration(last).Seconds()
	}
	return r
}

// turnOrder is A B B A A B: each pool goes first, middle and last once in
// each pair of turns, so a linear drift in the machine's speed cancels out.
var turnOrder = []int{0, 1, 1, 0, 0, 1}

// runAlternating runs both pools in turns on one cluster; each turn opens a
// fresh pool, waits until it is full, runs the load and closes it, so that
// connection set-up is not timed and the servers' counts belong to one pool.
func (h *harness) runAlternating(ctx context.Context, s scenario) (res []PoolResult, err error) {
	plan := s.plan(h)
	t, err := h.setup(ctx, plan)
	if err != nil {
		return nil, err
	}
	defer func() {
		if cerr := t.close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	turns := len(turnOrder) / len(poolKinds)
	turn := h.opts.duration / time.Duration(turns)
	type acc struct {
		rec       *recorder
		elapsed   time.Duration
		samples   []Sample
		opened    int64
		probes    int64
		turnRates []float64
		lib       map[string]float64
		final     map[int]int
		poolTotal int
		done      int
	}
	accs := make([]*acc, len(poolKinds))
	for i := range accs {
		accs[i] = &acc{rec: newRecorder(time.Now())}
	}
	for _, k := range turnOrder {
		kind, a := poolKinds[k], accs[k]
		opened0 := t.counter.opened()
		pool, err := newPool(ctx, kind, poolParams{dsn: t.dsn, cluster: h.cluster, size: plan.poolSize, hooks: t.hooks})
		if err != nil {
			return nil, err
		}
		waitFor(ctx, 20*time.Second, func() bool { return established(pool) >= plan.poolSize })
		smp := startSampler(ctx, t.counter, time.Now(), a.elapsed.Seconds())
		a.done++
		label := fmt.Sprintf("%s (turn %d of %d)", kind, a.done, turns)
		ops0 := a.rec.ops.Load()
		work := func(until context.Context) {
			runLoad(ctx, until, pool, plan.workload, h.opts.workers, h.opts.seed, a.rec)
		}
		el, err := h.load(ctx, s.name, label, turn, nil, work, a.rec)
		a.elapsed += el
		if el > 0 {
			a.turnRates = append(a.turnRates, float64(a.rec.ops.Load()-ops0)/el.Seconds())
		}
		if err == nil {
			a.final, a.poolTotal = settleCounts(ctx, t.counter, pool)
			smp.take()
		}
		a.samples = append(a.samples, smp.finish()...)
		a.opened += t.counter.opened() - opened0
		if t.counter.seesProbes() {
			a.probes += probeConns(pool)
		}
		for k, v := range libraryStats(pool) {
			if a.lib == nil {
				a.lib = make(map[string]float64)
			}
			a.lib[k] += v
		}
		pool.Close()
		if err != nil {
			return nil, err
		}
		// The next turn starts with no connection of this pool left open.
		waitFor(ctx, 5*time.Second, func() bool { return sum(t.counter.openConns()) == 0 })
	}
	info := runInfo{plan: plan}
	for k, kind := range poolKinds {
		a := accs[k]
		r := poolResult(kind, a.rec, a.elapsed, a.samples, nil, a.final, a.poolTotal, a.opened-a.probes)
		r.PoolSize, r.ProbeConns, r.Library, r.TurnOpsPerSec = plan.poolSize, a.probes, a.lib, a.turnRates
		r.Metrics = commonMetrics(&r, s.metrics(h, &r, info))
		res = append(res, r)
	}
	return res, nil
}

// established is how many of the pool's connections are open (connects in
// progress, which pgxpool's TotalConns includes, not counted).
func established(pool db) int {
	s := pool.Stat()
	return int(s.TotalConns() - s.ConstructingConns())
}

// waitFor polls cond every 20 ms until it holds or the timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		sleepCtx(ctx, 20*time.Millisecond)
	}
}

// pairOrder is the order in which pair j of a scenario's repeated pairs
// runs its pools, as indexes into poolKinds: pgxpool first in the first
// pair (the table's and the report's), clusterpool first in the next, and
// so on, so that whatever the machine carries from one turn to the next
// (the last cluster's files written back, a warmer cache, a busier
// neighbour) weighs on each pool in half the pairs. Run by run, the same
// pool run twice gives a p99 ratio anywhere from 0.5 to 2 on the machine
// of docs/benchmarks.md.
func pairOrder(j int) [2]int {
	if j%2 == 1 {
		return [2]int{1, 0}
	}
	return [2]int{0, 1}
}
