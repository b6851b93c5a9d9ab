package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/clusterpool/clusterpool"
)

// The limits scenario: a runtime shrink of the pool and a noisy workload
// bounded by its limit, side by side with pgxpool, which can do neither
// (its size is fixed when it is built, and it has no notion of workloads):
// it keeps its size and lets the noisy work take what it wants.

const (
	limitsName = "limits"
	// limitsBatch is the noisy workload's name, and limitsBatchLimit the
	// connections clusterpool lets it hold at once.
	limitsBatch      = "batch"
	limitsBatchLimit = 2
	// limitsBatchQuery is how long each noisy query holds its connection.
	limitsBatchQuery = 50 * time.Millisecond
)

var limitsScenario = scenario{
	name:     limitsName,
	headline: "conns_end",
	separate: true,
	describe: func(h *harness) string {
		size := h.opts.workers
		return fmt.Sprintf("A pool of %d connections (MinConns = MaxConns) behind the load balancer, with %d callers of the kv mix and %d noisy callers "+
			"(workload %q: SELECT pg_sleep(%v) back to back). clusterpool bounds the noisy workload to %d connections (SetWorkloadLimits) from the start and "+
			"shrinks the pool to %d connections (SetMaxConns) halfway through the run; pgxpool can do neither: it keeps its %d connections and the noisy "+
			"callers take what they get. Figures: the servers' connections at the end, the most connections the noisy work held at once, "+
			"and the kv callers' latency (the noisy callers' operations are not counted in it).",
			size, h.opts.workers, limitsNoisy(h), limitsBatch, limitsBatchQuery, limitsBatchLimit, limitsShrunk(h), size)
	},
	run: runLimits,
}

func limitsNoisy(h *harness) int  { return max(2, h.opts.workers/2) }
func limitsShrunk(h *harness) int { return max(1, h.opts.workers/3) }

// runLimits runs the scenario for one pool kind on a fresh cluster.
func runLimits(ctx context.Context, h *harness, kind string) (res PoolResult, err error) {
	plan := runPlan{nodes: h.opts.nodes, poolSize: h.opts.workers, workload: kvMix}
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
	pool, err := newPool(ctx, kind, poolParams{dsn: t.dsn, cluster: h.cluster, size: plan.poolSize, hooks: t.hooks})
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
	cp, _ := pool.(*clusterpool.Pool)
	if cp != nil {
		if err := cp.SetWorkloadLimits(map[string]int{limitsBatch: limitsBatchLimit}); err != nil {
			return res, err
		}
	}
	smp := startSampler(ctx, t.counter, start, 0)
	defer smp.finish()
	waitFor(ctx, 20*time.Second, func() bool { return established(pool) >= plan.poolSize })

	rec, noisy := newRecorder(start), newRecorder(start)
	var held, peak atomic.Int64
	script := func(ctx context.Context) error {
		sleepCtx(ctx, h.opts.duration/2)
		if ctx.Err() != nil {
			return nil
		}
		if cp == nil {
			ev.mark(fmt.Sprintf("shrink to %d: pgxpool cannot (keeps %d)", limitsShrunk(h), plan.poolSize))
			return nil
		}
		ev.mark(fmt.Sprintf("SetMaxConns(%d)", limitsShrunk(h)))
		return cp.SetMaxConns(int32(limitsShrunk(h)))
	}
	work := func(until context.Context) {
		var wg sync.WaitGroup
		wg.Go(func() { runLoad(ctx, until, pool, plan.workload, h.opts.workers, h.opts.seed, rec) })
		for range limitsNoisy(h) {
			wg.Go(func() { runNoisy(ctx, until, pool, noisy, &held, &peak) })
		}
		wg.Wait()
	}
	elapsed, err := h.load(ctx, limitsName, kind, h.opts.duration, script, work, rec)
	if err != nil {
		return res, err
	}

	final, poolTotal := settleCounts(ctx, t.counter, pool)
	smp.take()
	samples := smp.finish()
	opened := t.counter.opened() - opened0
	probes := int64(0)
	if t.counter.seesProbes() {
		probes = probeConns(pool)
	}
	lib := libraryStats(pool)
	pool.Close()
	poolClosed = true

	ev.mu.Lock()
	evs := append([]Event(nil), ev.list...)
	ev.mu.Unlock()
	res = poolResult(kind, rec, elapsed, samples, evs, final, poolTotal, opened-probes)
	res.PoolSize, res.ProbeConns, res.Library = plan.poolSize, probes, lib
	res.Errors += noisy.errs.Load()
	res.Metrics = commonMetrics(&res, []Metric{
		{Name: "conns_end", Label: fmt.Sprintf("servers' connections at the end (asked for %d)", limitsShrunk(h)), Value: value(float64(sum(lastConns(&res)))), Better: "lower", Ideal: value(float64(limitsShrunk(h))), Noise: 1},
		{Name: "noisy_peak", Label: fmt.Sprintf("most connections the noisy work held (limit %d)", limitsBatchLimit), Value: value(float64(peak.Load())), Better: "lower", Ideal: value(limitsBatchLimit), Noise: 1},
		{Name: "noisy_ops", Label: "noisy operations", Unit: "ops", Value: value(float64(noisy.ops.Load())), Better: "lower"},
	})
	return res, nil
}

// acquireFuncer is AcquireFunc, which both pools have with this signature.
type acquireFuncer interface {
	AcquireFunc(ctx context.Context, f func(*pgxpool.Conn) error) error
}

// runNoisy runs one noisy caller until until is done: each operation holds
// a connection for limitsBatchQuery, as a batch job or a report would.
// held counts the noisy connections held now, peak the most ever.
func runNoisy(ctx, until context.Context, d db, rec *recorder, held, peak *atomic.Int64) {
	wctx := clusterpool.WithWorkload(ctx, limitsBatch)
	af, ok := d.(acquireFuncer)
	if !ok {
		return
	}
	for until.Err() == nil {
		op, cancel := context.WithTimeout(wctx, opTimeout)
		err := af.AcquireFunc(op, func(c *pgxpool.Conn) error {
			n := held.Add(1)
			defer held.Add(-1)
			for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
			}
			_, err := c.Exec(op, "SELECT pg_sleep($1)", limitsBatchQuery.Seconds())
			return err
		})
		cancel()
		if until.Err() != nil {
			break
		}
		rec.ops.Add(1)
		if err != nil {
			rec.fail(err)
		}
	}
}
