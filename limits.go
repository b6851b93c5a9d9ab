package clusterpool

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
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

type workloadKey struct{}

// acquiringKey marks the context of the pool's own acquires under limits,
// so that admitConnect tells them from pgxpool's top-ups to MinConns.
type acquiringKey struct{}

// workloadDataKey is where an acquired connection's CustomData holds the
// *workload whose slot it takes, until its release.
const workloadDataKey = "clusterpool.workload"

// WithWorkload returns a context that marks the calls made with it as
// work of the named workload, which Config.WorkloadLimits (or
// Pool.SetWorkloadLimits) may bound. An empty name unmarks the context.
func WithWorkload(ctx context.Context, name string) context.Context {
	return context.WithValue(ctx, workloadKey{}, name)
}

// workloadFrom returns the workload ctx names, or "".
func workloadFrom(ctx context.Context) string {
	name, _ := ctx.Value(workloadKey{}).(string)
	return name
}

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

// acquireConn is how every method of the pool gets a connection. Without
// limits it is pgxpool's Acquire, plus another try when a full node
// refused the connect (53300).
func (p *Pool) acquireConn(ctx context.Context) (*pgxpool.Conn, error) {
	if p.limits.on() {
		return p.limits.acquire(ctx)
	}
	c, err := p.pool.Acquire(ctx)
	if err != nil {
		return p.acquireFailed(ctx, err)
	}
	return c, nil
}

// acquireFailed is acquireConn's path after pgxpool's Acquire failed
// without limits: a connect refused by a full node, or for the cap, is
// tried again within the limits' loop; any other error is returned.
func (p *Pool) acquireFailed(ctx context.Context, err error) (*pgxpool.Conn, error) {
	// errNoRoom: a limit was set while this acquire was under way.
	if ctx.Err() == nil && (isTooManyConns(err) || errors.Is(err, errNodeAtCap) || errors.Is(err, errNoRoom) || errors.Is(err, errNoToken)) {
		return p.limits.acquire(ctx)
	}
	return nil, err
}

// acquire gets a connection within the limits: a slot of the call's
// workload, then a connection within the pool's size, all within
// AcquireTimeout.
func (l *limits) acquire(ctx context.Context) (*pgxpool.Conn, error) {
	actx := context.WithValue(ctx, acquiringKey{}, l)
	timeout := time.Duration(l.acquireTimeout.Load())
	if timeout > 0 {
		var cancel context.CancelFunc
		actx, cancel = context.WithTimeout(actx, timeout)
		defer cancel()
	}
	var w *workload
	if name := workloadFrom(ctx); name != "" {
		w = (*l.workloads.Load())[name]
	}
	if w != nil {
		start := time.Now()
		waited, err := w.acquire(actx)
		if waited {
			l.p.obs.workloadWaited(ctx, w.name, time.Since(start), err)
		}
		if err != nil {
			return nil, l.acquireError(ctx, actx, err, timeout, w)
		}
	}
	c, err := l.acquireConn(actx)
	if err != nil {
		if w != nil {
			w.release()
		}
		return nil, l.acquireError(ctx, actx, err, timeout, nil)
	}
	if w != nil {
		c.Conn().PgConn().CustomData()[workloadDataKey] = w
	}
	return c, nil
}

// acquireConn is pgxpool's Acquire, waiting while the pool is at its
// runtime size and trying again after a full node's refusal.
func (l *limits) acquireConn(ctx context.Context) (*pgxpool.Conn, error) {
	wait := minRoomWait
	refused := 0
	for try := 0; ; try++ {
		if try > 0 && !l.roomNow() {
			// Still no idle connection and no room: wait again rather
			// than have pgxpool start a connect only to see it refused.
			if err := l.waitRoom(ctx, wait); err != nil {
				return nil, err
			}
			wait = min(2*wait, maxRoomWait)
			continue
		}
		c, err := l.p.pool.Acquire(ctx)
		switch {
		case err == nil:
			return c, nil
		case ctx.Err() != nil:
			return nil, err
		case errors.Is(err, errNoRoom), errors.Is(err, errNodeAtCap), errors.Is(err, errNoToken):
		case isTooManyConns(err) && refused < maxFullRetries:
			refused++
			l.p.noteTooMany(err)
		default:
			return nil, err
		}
		if err := l.waitRoom(ctx, wait); err != nil {
			return nil, err
		}
		wait = min(2*wait, maxRoomWait)
	}
}

// roomNow reports whether an acquire may succeed now: an idle connection,
// or room for a new one.
func (l *limits) roomNow() bool {
	st := l.p.pool.Stat()
	return st.IdleConns() > 0 || int(st.TotalConns()) < l.effectiveMax(time.Now())
}

// acquireError is the caller's error for err, which ended an acquire
// under actx: AcquireTimeout's own expiry becomes ErrPoolExhausted or
// ErrPoolConnecting; anything else is returned as it is.
func (l *limits) acquireError(ctx, actx context.Context, err error, timeout time.Duration, w *workload) error {
	if timeout <= 0 || ctx.Err() != nil || !errors.Is(actx.Err(), context.DeadlineExceeded) {
		return err
	}
	l.timeouts.Add(1)
	if w != nil {
		return fmt.Errorf("clusterpool: no connection within cluster_acquire_timeout (%v): workload %q holds its limit of %d: %w", timeout, w.name, w.currentLimit(), ErrPoolExhausted)
	}
	// Still being opened: connects under way while the pool has fewer
	// connections open than it may hold.
	st := l.p.pool.Stat()
	if open := st.TotalConns() - st.ConstructingConns(); st.ConstructingConns() > 0 && int(open) < l.effectiveMax(time.Now()) {
		return fmt.Errorf("clusterpool: no connection within cluster_acquire_timeout (%v): %d connections still being opened: %w", timeout, st.ConstructingConns(), ErrPoolConnecting)
	}
	return fmt.Errorf("clusterpool: no connection within cluster_acquire_timeout (%v): all %d connections in use: %w", timeout, st.AcquiredConns(), ErrPoolExhausted)
}

// waitRoom waits until a connection comes back (or d passes, or ctx ends).
func (l *limits) waitRoom(ctx context.Context, d time.Duration) error {
	ch := make(chan struct{}, 1)
	l.roomWaiting.Add(1)
	defer l.roomWaiting.Add(-1)
	l.roomMu.Lock()
	l.room = append(l.room, ch)
	l.roomMu.Unlock()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
		return nil
	case <-t.C:
	case <-ctx.Done():
	case <-l.p.bgCtx.Done(): // closing: pgxpool's next Acquire says so
	}
	l.roomMu.Lock()
	i := slices.Index(l.room, ch)
	if i >= 0 {
		l.room = slices.Delete(l.room, i, i+1)
	}
	l.roomMu.Unlock()
	if i < 0 {
		l.wakeRoom() // woken meanwhile: pass it on
	}
	return ctx.Err()
}

// wakeRoom wakes the longest waiting caller, if any.
func (l *limits) wakeRoom() {
	if l.roomWaiting.Load() == 0 {
		return
	}
	l.roomMu.Lock()
	defer l.roomMu.Unlock()
	if len(l.room) > 0 {
		l.room[0] <- struct{}{}
		l.room = l.room[1:]
	}
}

func (l *limits) wakeAllRoom() {
	l.roomMu.Lock()
	defer l.roomMu.Unlock()
	for _, ch := range l.room {
		ch <- struct{}{}
	}
	l.room = nil
}

// released is the release tracer's part under limits: the connection's
// workload slot is freed, it is closed (so that pgxpool destroys it) if the
// pool is above its size or the connection is retiring, and a waiting
// caller is woken.
func (l *limits) released(conn *pgx.Conn) {
	cd := conn.PgConn().CustomData()
	if w, ok := cd[workloadDataKey].(*workload); ok {
		delete(cd, workloadDataKey)
		w.release()
	}
	retiring := false
	if cs := connStateOf(conn); cs != nil && cs.retire.Load() {
		retiring = true
	}
	if retiring || l.takeExcess() {
		closeNow(conn)
	}
	l.wakeRoom()
}

// takeExcess takes one of the connections to close at release, if any.
func (l *limits) takeExcess() bool {
	for {
		n := l.excess.Load()
		if n <= 0 {
			return false
		}
		if l.excess.CompareAndSwap(n, n-1) {
			return true
		}
	}
}

// closeNow closes conn without a Terminate message (a done context), so
// that pgxpool destroys it on release; nothing is waited for.
func closeNow(conn *pgx.Conn) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_ = conn.Close(ctx)
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

// capRoom returns how many connections the nodes can hold within their
// caps, and false when that is not bounded (a node without cap). Nodes not
// known yet count too: with hosts listed each unmapped host holds up to
// the cap; behind one address, before any node is known, one node's worth
// is let through, and more as connections find the nodes. There, a node
// not known yet is only found by a connection or a probe, so the per-node
// cap alone bounds the pool: full nodes only shape the targets.
func (p *Pool) capRoom(now time.Time) (int, bool) {
	if !p.tracking() {
		return 0, false
	}
	perNode := p.limits.nodeCap()
	placed := p.placement.mode == connectPlaced
	if perNode == 0 && !placed {
		return 0, false
	}
	views := p.limitViews(p.tracker.nodeList(), now)
	room, known := 0, 0
	caps := viewCaps(views)
	for _, v := range views {
		if !v.Eligible {
			continue
		}
		c, ok := caps[v.ID]
		if !ok {
			return 0, false
		}
		room += c
		known++
	}
	switch unmapped := p.placement.unmappedHosts(); {
	case perNode == 0 && (known == 0 || unmapped > 0):
		return 0, false // only full nodes are known: others may take more
	case placed:
		room += unmapped * perNode
	case known == 0:
		room = perNode
	}
	return room, true
}

// limitViews returns each node's connections, eligibility and caps.
func (p *Pool) limitViews(nodes []*node, now time.Time) []nodeView {
	views := make([]nodeView, 0, len(nodes))
	full := p.fullNodes(nodes, now)
	perNode := p.limits.nodeCap()
	scope := p.localityScope(nodes, now)
	for _, n := range nodes {
		views = append(views, nodeView{
			ID:       n.id,
			Conns:    max(int(n.conns.Load())-n.markedToRetire(), 0),
			Eligible: !n.evicted.Load() && !n.draining.Load() && scope.in(n),
			Cap:      perNode,
			Full:     full[n.id],
		})
	}
	return views
}

// fullNodes returns the healthy nodes that take no new connection now
// (node.full).
func (p *Pool) fullNodes(nodes []*node, now time.Time) map[NodeID]bool {
	var full map[NodeID]bool
	for _, n := range nodes {
		if n.full(now) {
			if full == nil {
				full = make(map[NodeID]bool)
			}
			full[n.id] = true
		}
	}
	return full
}

// full reports whether the node, healthy, takes no new connection now: it
// refused one with 53300 (too many connections), or with hosts listed its
// host refused a connect that then went to another host, within fullFor,
// and no connection has reached it since. An evicted node is unhealthy,
// not full.
func (n *node) full(now time.Time) bool {
	return n.fullUntil.Load() > now.UnixNano() && !n.evicted.Load()
}

// capping reports whether connects must check node caps: a per-node cap is
// set or a node is full.
func (l *limits) capping() bool {
	if l == nil {
		return false
	}
	return l.nodeCap() > 0 || l.p.anyFull(time.Now())
}

func (p *Pool) anyFull(now time.Time) bool {
	for _, n := range p.tracker.nodeList() {
		if n.full(now) {
			return true
		}
	}
	return false
}

// capSlotKey is where a new connection's CustomData holds the node whose
// cap slot it took in ValidateConnect, until AfterConnect has tracked it.
const capSlotKey = "clusterpool.capSlot"

// holdCapSlot is ValidateConnect's cap check: it reports whether the new
// connection pgConn on node id may stay, and if so counts it on the node
// until it is tracked (releaseCapSlot), so that connects under way at once
// cannot together pass the cap. A full node takes none; an unknown node
// (id 0) is not checked.
func (p *Pool) holdCapSlot(id NodeID, pgConn *pgconn.PgConn, now time.Time) bool {
	c := p.limits.nodeCap()
	if id == 0 {
		return true
	}
	n := p.tracker.node(id)
	if n == nil {
		if c == 0 {
			return true
		}
		p.tracker.seen(id, now) // so that its slots count from the first connect
		n = p.tracker.node(id)
	}
	if n.full(now) {
		return false
	}
	if c == 0 {
		return true
	}
	for {
		held := n.capHeld.Load()
		if int(n.conns.Load())+int(held)+1 > c {
			return false
		}
		if n.capHeld.CompareAndSwap(held, held+1) {
			pgConn.CustomData()[capSlotKey] = n
			return true
		}
	}
}

// releaseCapSlot gives back the slot holdCapSlot took for pgConn, if any,
// once AfterConnect has tracked it or failed it.
func releaseCapSlot(pgConn *pgconn.PgConn) {
	if n, ok := pgConn.CustomData()[capSlotKey].(*node); ok {
		delete(pgConn.CustomData(), capSlotKey)
		n.capHeld.Add(-1)
	}
}

// noteTooMany marks full the node a connect refused with 53300, when the
// error says which: the connect config names one host and a node was seen
// behind it. Behind one load-balancer address the node is not known.
func (p *Pool) noteTooMany(err error) {
	var ce *pgconn.ConnectError
	if !errors.As(err, &ce) || ce.Config == nil || len(ce.Config.Fallbacks) > 0 {
		return
	}
	p.markFull(p.placement.nodeBehind(hostPort(ce.Config.Host, ce.Config.Port)), time.Now())
}

// markFull records that node id refused a connection (53300) at now.
func (p *Pool) markFull(id NodeID, now time.Time) {
	if id == 0 {
		return
	}
	if n := p.tracker.node(id); n != nil {
		n.fullUntil.Store(now.Add(fullFor).UnixNano())
	}
}

// isTooManyConns reports whether err is a server's refusal of a new
// session for too many connections (SQLSTATE 53300, CockroachDB's
// server.max_connections_per_gateway): the node is healthy, only full.
func isTooManyConns(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == sqlStateTooManyConnections
}

const sqlStateTooManyConnections = "53300"

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
		p.keep() // the background refill (prune.go), to the runtime MinConns
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
	targets := cappedTargets(want, eligible, p.seed, viewCaps(views))
	for _, v := range views {
		if t := targets[v.ID]; v.Eligible && v.Conns < t {
			return fmt.Sprintf("node %d holds %d of its %d", v.ID, v.Conns, t)
		}
	}
	return ""
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
