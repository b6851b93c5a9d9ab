package clusterpool

// Workload limits (bulkheads): calls marked WithWorkload(ctx, name) hold
// at most the workload's limit of connections at once; the rest wait, FIFO,
// within their context.

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

type workloadKey struct{}

// workloadDataKey is where an acquired connection's CustomData holds the
// *workload whose slot it takes, until its release.
const workloadDataKey = "clusterpool.workload"

// WithWorkload returns a context that marks the calls made with it as
// work of the named workload, which Config.WorkloadLimits (or
// Pool.SetWorkloadLimits) may bound. An empty name unmarks the context. A
// connection of a workload taken out of the pool with Hijack keeps its
// slot: the pool never sees it released.
func WithWorkload(ctx context.Context, name string) context.Context {
	return context.WithValue(ctx, workloadKey{}, name)
}

// workloadFrom returns the workload ctx names, or "".
func workloadFrom(ctx context.Context) string {
	name, _ := ctx.Value(workloadKey{}).(string)
	return name
}

// SetWorkloadLimits replaces Config.WorkloadLimits while the pool runs. A
// workload whose limit is lowered keeps the connections it holds until
// they are released; its new calls wait, in arrival order, until it is
// below the new limit. A workload left out of limits is no longer bounded
// (its waiting calls go ahead). Each name must be non-empty and each limit
// at least 1.
func (p *Pool) SetWorkloadLimits(limits map[string]int) error {
	if err := checkWorkloadLimits("SetWorkloadLimits", limits); err != nil {
		return err
	}
	l := p.limits
	l.setMu.Lock()
	ws := maps.Clone(*l.workloads.Load())
	for name := range limits {
		if ws[name] == nil {
			ws[name] = &workload{name: name}
		}
	}
	l.workloads.Store(&ws)
	l.setMu.Unlock()
	for name, w := range ws {
		w.setLimit(limits[name])
	}
	l.activate()
	p.obs.limitsChanged(p.limitsData())
	return nil
}

// checkWorkloadLimits validates workload limits; what names the setting
// in errors.
func checkWorkloadLimits(what string, limits map[string]int) error {
	for _, name := range slices.Sorted(maps.Keys(limits)) {
		switch n := limits[name]; {
		case name == "":
			return fmt.Errorf("clusterpool: %s: invalid workload name \"\" (limit %d): must not be empty", what, n)
		case n < 1:
			return fmt.Errorf("clusterpool: %s: workload %q: invalid limit %d: must be at least 1", what, name, n)
		}
	}
	return nil
}

// workload is one named workload's limit and state.
type workload struct {
	name string

	acquires  atomic.Int64 // slots taken
	waits     atomic.Int64 // of those, after waiting
	waitNanos atomic.Int64 // time waited, in total

	mu      sync.Mutex // protects the fields below
	limit   int        // 0: none
	inUse   int
	waiters []chan struct{} // FIFO
}

// acquire takes a slot, waiting in line while the workload is at its
// limit; waited says whether it had to.
func (w *workload) acquire(ctx context.Context) (waited bool, err error) {
	w.mu.Lock()
	if w.limit == 0 || w.inUse < w.limit && len(w.waiters) == 0 {
		w.inUse++
		w.mu.Unlock()
		w.acquires.Add(1)
		return false, nil
	}
	ch := make(chan struct{}, 1)
	w.waiters = append(w.waiters, ch)
	w.mu.Unlock()
	start := time.Now()
	defer func() { w.waitNanos.Add(int64(time.Since(start))) }()
	w.waits.Add(1)
	select {
	case <-ch:
		w.acquires.Add(1)
		return true, nil
	case <-ctx.Done():
	}
	w.mu.Lock()
	i := slices.Index(w.waiters, ch)
	if i >= 0 {
		w.waiters = slices.Delete(w.waiters, i, i+1)
	}
	w.mu.Unlock()
	if i < 0 { // granted meanwhile: give it back
		w.release()
	}
	return true, ctx.Err()
}

// release gives a slot back, handing it to the next in line.
func (w *workload) release() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.inUse--
	w.grantLocked()
}

func (w *workload) grantLocked() {
	for len(w.waiters) > 0 && (w.limit == 0 || w.inUse < w.limit) {
		w.inUse++
		w.waiters[0] <- struct{}{}
		w.waiters = w.waiters[1:]
	}
}

func (w *workload) setLimit(n int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.limit = n
	w.grantLocked()
}

func (w *workload) currentLimit() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.limit
}

// WorkloadStat is a snapshot of one workload's use of the pool, as
// ClusterStat.Workloads returns it.
type WorkloadStat struct {
	Name string
	// Limit is the workload's limit; 0 when it has none any more.
	Limit int
	// InUse is how many connections the workload's calls hold now.
	InUse int
	// Waiting is how many of its calls wait for a slot now.
	Waiting int
	// Acquires counts the slots its calls took; Waits those that waited
	// first, WaitDuration how long they waited in total (calls that gave
	// up waiting included).
	Acquires     int64
	Waits        int64
	WaitDuration time.Duration
}

func (w *workload) stat() WorkloadStat {
	w.mu.Lock()
	s := WorkloadStat{Name: w.name, Limit: w.limit, InUse: w.inUse, Waiting: len(w.waiters)}
	w.mu.Unlock()
	s.Acquires = w.acquires.Load()
	s.Waits = w.waits.Load()
	s.WaitDuration = time.Duration(w.waitNanos.Load())
	return s
}

// workloadStats returns every workload's stat, by name.
func (l *limits) workloadStats() []WorkloadStat {
	ws := *l.workloads.Load()
	stats := make([]WorkloadStat, 0, len(ws))
	for _, w := range ws {
		stats = append(stats, w.stat())
	}
	slices.SortFunc(stats, func(a, b WorkloadStat) int { return cmp.Compare(a.Name, b.Name) })
	return stats
}
