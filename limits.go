package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"
	"time"
)

// Runtime limits: the pool's size and MinConns changed while it runs, a cap
// on connections per node, bounds on named workloads, readiness, and a
// timeout on waiting for a connection.
//
// pgxpool's MaxConns is fixed when it is built, so the configured MaxConns
// is the ceiling and the runtime size is enforced around it:
//
//   - a new connection is admitted (BeforeConnect, admitConnect) only while
//     the pool holds fewer than the effective size; a refused one costs no
//     dial, and its acquirer waits for a connection to come back instead
//     (acquireConn);
//   - connections above the size are closed when idle, and when released
//     if in use (released), never under a query;
//   - pgxpool tops the pool up to its construction-time MinConns by itself;
//     its top-ups are admitted only up to the runtime MinConns, and a
//     background loop (run) opens the rest when the runtime MinConns is
//     higher.
//
// None of this runs until a limit is set: until then acquire and release
// cost one atomic load more than pgxpool's.

// ErrPoolExhausted is matched (errors.Is) by the error of a call that
// waited AcquireTimeout for a connection while every connection the pool
// may hold was handed out (or, with a workload, every connection its limit
// allows).
var ErrPoolExhausted = errors.New("clusterpool: pool exhausted: every connection is in use")

// ErrPoolConnecting is matched (errors.Is) by the error of a call that
// waited AcquireTimeout for a connection while new connections were still
// being opened: the cluster is slow to accept them, rather than the pool
// too small.
var ErrPoolConnecting = errors.New("clusterpool: connections are still being opened")

// errNoRoom refuses a new connection beyond the runtime size in
// BeforeConnect; the pool's own acquirers wait for a connection to come
// back instead of seeing it.
var errNoRoom = errors.New("clusterpool: pool at its runtime size (SetMaxConns or MaxConnsPerNode); not opening another connection")

// errNodeAtCap refuses, in ValidateConnect, a connection on a node at its
// per-node cap, so that pgconn tries the next host; if none is left the
// acquirer waits as for errNoRoom.
var errNodeAtCap = errors.New("clusterpool: node at its connection cap (MaxConnsPerNode); trying another")

// Waiting for room: each waiter is woken by a release (one per release) and
// also polls, doubling from minRoomWait to maxRoomWait, since a release is
// seen just before pgxpool takes the connection back and a connection
// destroyed by pgxpool itself signals nothing. A connect refused by a full
// node (53300) is tried again at most maxFullRetries times per acquire.
const (
	minRoomWait    = time.Millisecond
	maxRoomWait    = 100 * time.Millisecond
	maxFullRetries = 8
	// fullFor is how long a node that refused a connection (53300) takes
	// no new one.
	fullFor = hostDownFor
	// readyPoll is how often WaitReady looks at the pool.
	readyPoll = 10 * time.Millisecond
	// refillAgain is how soon the limits loop tries again while the pool is
	// below the runtime MinConns.
	refillAgain = 100 * time.Millisecond
)

// acquiringKey marks the context of the pool's own acquires under limits,
// so that admitConnect tells them from pgxpool's top-ups to MinConns.
type acquiringKey struct{}

// limits is the pool's runtime limits and their state.
type limits struct {
	p       *Pool
	ceiling int32 // the configured MaxConns: pgxpool's own size
	// active is set once any limit is in force, and stays set; until then
	// the hot path reads only this.
	active atomic.Bool
	// poolSet is set once p.pool exists: pgxpool starts its first connects
	// before NewWithConfig has it.
	poolSet atomic.Bool

	maxConns       atomic.Int32
	minConns       atomic.Int32
	perNode        atomic.Int32 // 0: no cap
	acquireTimeout atomic.Int64 // nanoseconds; 0: none
	// excess counts in-use connections to close at their release because
	// the pool is above its size (the limits loop sets it).
	excess atomic.Int32

	timeouts atomic.Int64 // acquires that ran out of AcquireTimeout
	rounds   atomic.Int64 // passes of the limits loop at its interval (not asked for)

	// workloads maps every workload that ever had a limit to its state; a
	// copy is swapped in when a new name appears.
	workloads atomic.Pointer[map[string]*workload]
	setMu     sync.Mutex // protects the fields below; orders the setters
	started   bool       // the limits loop runs

	kick chan struct{} // wakes the limits loop

	roomWaiting atomic.Int32
	roomMu      sync.Mutex // protects the fields below
	room        []chan struct{}
}

func newLimits(p *Pool, cfg *Config) *limits {
	l := &limits{p: p, ceiling: cfg.MaxConns, kick: make(chan struct{}, 1)}
	l.maxConns.Store(cfg.MaxConns)
	l.minConns.Store(min(cfg.MinConns, cfg.MaxConns))
	l.perNode.Store(p.settings.maxConnsPerNode)
	l.acquireTimeout.Store(int64(p.settings.acquireTimeout))
	ws := make(map[string]*workload, len(cfg.WorkloadLimits))
	for name, n := range cfg.WorkloadLimits {
		ws[name] = &workload{name: name, limit: n}
	}
	l.workloads.Store(&ws)
	if len(ws) > 0 || l.perNode.Load() > 0 || l.acquireTimeout.Load() > 0 {
		l.active.Store(true)
	}
	return l
}

// on reports whether any limit is in force; l may be nil (a Pool built by
// hand in a test).
func (l *limits) on() bool { return l != nil && l.active.Load() }

// nodeCap is the per-node cap in force, 0 for none.
func (l *limits) nodeCap() int {
	if l == nil {
		return 0
	}
	return int(l.perNode.Load())
}

// poolReady is called once p.pool exists.
func (l *limits) poolReady() {
	l.poolSet.Store(true)
	if l.active.Load() {
		l.startLoop()
	}
}

// activate puts the limits in force (for good) and starts their loop.
func (l *limits) activate() {
	l.active.Store(true)
	l.startLoop()
	l.wake()
}

func (l *limits) startLoop() {
	l.setMu.Lock()
	defer l.setMu.Unlock()
	if l.started || !l.poolSet.Load() {
		return
	}
	p := l.p
	p.bgMu.Lock()
	defer p.bgMu.Unlock()
	if p.bgClosed {
		return
	}
	l.started = true
	p.goBackground(l.run)
}

// wake asks the limits loop for a pass now.
func (l *limits) wake() {
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// SetMaxConns sets the pool's size while it runs: from 1 up to the
// configured MaxConns (pool_max_conns), which stays the ceiling. Shrinking
// closes idle connections above the new size at once and in-use ones when
// they are released, never under a query, within one balance interval;
// callers beyond the new size wait for a connection (within their context
// and AcquireTimeout) rather than fail. Growing lets callers open
// connections again, through the connect rate limit. MinConns above the
// new size is held at the size until it grows again. Safe to call at any
// time, also during Close; after Close it has no effect.
func (p *Pool) SetMaxConns(n int32) error {
	l := p.limits
	if n < 1 || n > l.ceiling {
		return fmt.Errorf("clusterpool: SetMaxConns: invalid value %d: must be from 1 to MaxConns (%d)", n, l.ceiling)
	}
	if old := l.maxConns.Swap(n); n > old {
		l.wakeAllRoom()
	}
	l.activate()
	p.obs.limitsChanged(p.limitsData())
	return nil
}

// SetMinConns sets how many connections the pool keeps open while it runs,
// from 0 up to the configured MaxConns; above the current size
// (SetMaxConns) it counts as the size. The pool opens what is missing in
// the background, through placement and the connect rate limit, and stops
// pgxpool's own top-ups at the new value.
func (p *Pool) SetMinConns(n int32) error {
	l := p.limits
	if n < 0 || n > l.ceiling {
		return fmt.Errorf("clusterpool: SetMinConns: invalid value %d: must be from 0 to MaxConns (%d)", n, l.ceiling)
	}
	l.minConns.Store(n)
	l.activate()
	p.obs.limitsChanged(p.limitsData())
	return nil
}

// SetMaxConnsPerNode sets the per-node cap (Config.MaxConnsPerNode) while
// the pool runs; 0 or negative removes it. Connections above a lowered cap
// are closed when idle and when released if in use.
func (p *Pool) SetMaxConnsPerNode(n int32) error {
	l := p.limits
	n = max(n, 0)
	if old := l.perNode.Swap(n); old == 0 || n > old {
		l.wakeAllRoom()
	}
	l.activate()
	p.obs.limitsChanged(p.limitsData())
	return nil
}

// SetAcquireTimeout sets Config.AcquireTimeout while the pool runs; 0 or
// negative turns it off. Calls already waiting keep the timeout they
// started with.
func (p *Pool) SetAcquireTimeout(d time.Duration) error {
	l := p.limits
	l.acquireTimeout.Store(int64(max(d, 0)))
	l.activate()
	p.obs.limitsChanged(p.limitsData())
	return nil
}

// limitsData is the limits in force, for the tracers.
func (p *Pool) limitsData() TraceLimitsData {
	l := p.limits
	d := TraceLimitsData{
		MaxConns:        l.maxConns.Load(),
		MinConns:        l.minConns.Load(),
		MaxConnsPerNode: l.perNode.Load(),
		AcquireTimeout:  time.Duration(l.acquireTimeout.Load()),
	}
	for name, w := range *l.workloads.Load() {
		if n := w.currentLimit(); n > 0 {
			if d.WorkloadLimits == nil {
				d.WorkloadLimits = make(map[string]int)
			}
			d.WorkloadLimits[name] = n
		}
	}
	return d
}

// admitConnect is BeforeConnect's check under limits: the pool's own
// acquirers may open connections up to the effective size, pgxpool's
// top-ups up to the runtime MinConns.
func (l *limits) admitConnect(ctx context.Context) error {
	if !l.on() || !l.poolSet.Load() {
		return nil
	}
	now := time.Now()
	limit := l.effectiveMax(now)
	if ctx.Value(acquiringKey{}) == nil {
		limit = min(limit, l.effectiveMin(now))
	}
	// TotalConns counts this connect too.
	if int(l.p.pool.Stat().TotalConns()) > limit {
		return errNoRoom
	}
	return nil
}

// effectiveMax is the most connections the pool may hold now: the runtime
// size, or less when the per-node cap (or full nodes) leave less room on
// the healthy nodes known.
func (l *limits) effectiveMax(now time.Time) int {
	size := int(l.maxConns.Load())
	if room, capped := l.p.capRoom(now); capped {
		size = min(size, room)
	}
	return size
}

// effectiveMin is the runtime MinConns, within the effective size.
func (l *limits) effectiveMin(now time.Time) int {
	return min(int(l.minConns.Load()), l.effectiveMax(now))
}

// run is the limits loop: every balance interval, and when a setter asks,
// it closes connections above the limits and opens those missing for
// MinConns.
func (l *limits) run(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	round := false // the timer is set for a balance interval, not a refill
	for {
		select {
		case <-ctx.Done():
			return
		case <-l.kick:
		case <-timer.C:
			if round {
				l.rounds.Add(1)
			}
		}
		short := l.enforce(ctx, time.Now())
		next := l.p.settings.balanceInterval
		if short {
			next = min(next, refillAgain)
		}
		round = next == l.p.settings.balanceInterval
		timer.Reset(next)
	}
}

// enforce makes one pass; it reports whether the pool is still below its
// runtime MinConns.
func (l *limits) enforce(ctx context.Context, now time.Time) bool {
	p := l.p
	effMax, effMin := l.effectiveMax(now), l.effectiveMin(now)
	st := p.pool.Stat()
	// Connects under way count for MinConns, not as connections to close.
	total, open := int(st.TotalConns()), int(st.TotalConns()-st.ConstructingConns())
	if p.tracking() {
		l.excess.Store(0)
		if prune := planLimits(p.limitViews(p.tracker.nodeList(), now), effMax, p.seed); len(prune) > 0 {
			p.retire(ctx, prune, now)
		}
		// Connections not tracked on a node (a plain server) count only
		// against the size.
		if untracked := open - p.trackedConns(); untracked > 0 && open > effMax {
			l.excess.Store(int32(min(untracked, open-effMax)))
		}
	} else if open > effMax {
		closed := 0
		for _, c := range p.sweepIdle(ctx) {
			if closed < open-effMax {
				closeQuietly(c.Conn())
				closed++
			}
			c.Release()
		}
		l.excess.Store(int32(open - effMax - closed))
	} else {
		l.excess.Store(0)
	}
	if total < effMin {
		p.keep() // the background refill (refill.go), to the runtime MinConns
		return true
	}
	return false
}

// openConns counts the pool's open connections for refilling: those
// tracked on nodes, which leave the count when they start closing (pgxpool
// still counts a connection being destroyed); when the pool identifies no
// node (plain PostgreSQL), pgxpool's count of those not being opened.
func (p *Pool) openConns() int {
	if k := p.trackedConns(); k > 0 || len(p.tracker.nodeList()) > 0 {
		return k
	}
	st := p.pool.Stat()
	return int(st.TotalConns() - st.ConstructingConns())
}

// trackedConns counts the connections tracked on nodes.
func (p *Pool) trackedConns() int {
	k := 0
	for _, n := range p.tracker.nodeList() {
		k += int(n.conns.Load())
	}
	return k
}

// planLimits says how many connections each node must lose for the pool to
// fit size and every node its cap: a node above its cap loses the excess;
// then, while the pool is above size, the node furthest above its target
// (cappedTargets at size) loses one. Connections on nodes that are not
// eligible count as above target. Pure.
func planLimits(nodes []nodeView, size int, seed uint64) map[NodeID]int {
	var eligible []NodeID
	caps := make(map[NodeID]int)
	left := make(map[NodeID]int, len(nodes))
	total := 0
	for _, n := range nodes {
		left[n.ID] = n.Conns
		total += n.Conns
		if n.Eligible {
			eligible = append(eligible, n.ID)
		}
		if n.Cap > 0 {
			caps[n.ID] = n.Cap
		}
	}
	prune := make(map[NodeID]int)
	for _, n := range nodes {
		if c, ok := caps[n.ID]; ok && n.Conns > c {
			prune[n.ID] = n.Conns - c
			left[n.ID] = c
			total -= n.Conns - c
		}
	}
	if total > size {
		targets := cappedTargets(size, eligible, seed, viewCaps(nodes))
		for ; total > size; total-- {
			var worst NodeID
			best := 0
			for _, n := range nodes { // in ID order: ties go to the lowest ID
				if over := left[n.ID] - targets[n.ID]; over > best {
					worst, best = n.ID, over
				}
			}
			if best == 0 {
				break
			}
			prune[worst]++
			left[worst]--
		}
	}
	maps.DeleteFunc(prune, func(_ NodeID, k int) bool { return k <= 0 })
	if len(prune) == 0 {
		return nil
	}
	return prune
}

// WaitReady blocks until the pool holds its MinConns connections (the
// runtime value, SetMinConns, within the current size), spread over the
// healthy nodes as the balancer would have them (each holds at least its
// share of MinConns), or until ctx ends, returning an error that says what
// was missing and wraps ctx's error. With MinConns 0 it returns at once.
// For services that gate their readiness on the database.
func (p *Pool) WaitReady(ctx context.Context) error {
	if p.limits.active.Load() {
		p.limits.wake()
	}
	t := time.NewTicker(readyPoll)
	defer t.Stop()
	for {
		why := p.notReady(time.Now())
		if why == "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("clusterpool: WaitReady: %s: %w", why, ctx.Err())
		case <-p.bgCtx.Done():
			return errors.New("clusterpool: WaitReady: the pool is closed")
		case <-t.C:
		}
	}
}

// notReady says why the pool is not ready, or returns "".
func (p *Pool) notReady(now time.Time) string {
	want := p.limits.effectiveMin(now)
	if want <= 0 {
		return ""
	}
	st := p.pool.Stat()
	if open := int(st.TotalConns() - st.ConstructingConns()); open < want {
		return fmt.Sprintf("%d of %d connections open", open, want)
	}
	if !p.tracking() {
		return ""
	}
	views := p.limitViews(p.tracker.nodeList(), now)
	var eligible []NodeID
	for _, v := range views {
		if v.Eligible {
			eligible = append(eligible, v.ID)
		}
	}
	targets := cappedTargets(want, eligible, p.seed, viewCaps(views), p.remainderSwaps()...)
	for _, v := range views {
		if t := targets[v.ID]; v.Eligible && v.Conns < t {
			return fmt.Sprintf("node %d holds %d of its %d", v.ID, v.Conns, t)
		}
	}
	return ""
}
