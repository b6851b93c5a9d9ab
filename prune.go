package clusterpool

import (
	"context"
	"maps"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The balance round: every BalanceInterval the pool refreshes what it knows
// about the nodes, plans (plan.go), and retires connections per the plan. It
// never closes a connection in use: idle ones are closed and released at
// once, in-use ones are marked and closed when their caller releases them.
// A move pays first: the round takes the tokens for the replacements from
// the connect budget before it retires anything, and retires no more than it
// could pay for.
//
// Replacements, and refills of connections the pool lost, are opened in the
// background (refill, refill.go), not by the next caller that finds the pool short: a
// caller whose Acquire opens a connection waits for that connect.

const (
	// closeTimeout bounds closing a pruned connection (a Terminate message).
	closeTimeout = time.Second
	// refillWait is how long after pruning a pool below MinConns is taken
	// to be refilling (pgxpool waits 500 ms, then dials).
	refillWait = 3 * time.Second
	// aliveCheckTimeout is how long checking an idle connection for a
	// server-side close waits for bytes that are not expected to come.
	aliveCheckTimeout = time.Millisecond
)

// runBalance is the balancing loop: one round every BalanceInterval ±20%.
func (p *Pool) runBalance(ctx context.Context) {
	timer := time.NewTimer(jitter(p.settings.balanceInterval, rand.Float64()))
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		p.balanceRound(ctx, time.Now())
		timer.Reset(jitter(p.settings.balanceInterval, rand.Float64()))
	}
}

// balanceRound is one balancing round: refresh what is known about the
// nodes, plan, and retire connections per the plan.
func (p *Pool) balanceRound(ctx context.Context, now time.Time) balancePlan {
	p.obs.counters.balanceRounds.Add(1)
	t := p.tracker
	for _, s := range t.snapshot() { // also forgets connections closed behind the pool's back
		if s.TotalConns > 0 {
			t.seen(s.ID, now) // an open connection is proof of life
		}
	}
	nodes := t.nodeList()
	p.obs.nodesRemoved(t.expire(now, expiryWindow(p.settings.balanceInterval, p.settings.probeInterval, max(len(nodes), 1))))
	nodes = t.nodeList()
	p.placement.learnHosts(nodes)

	refill := p.refillWindow()
	scope := p.localityScope(nodes, now)
	views := make([]nodeView, 0, len(nodes))
	for _, n := range nodes {
		conns := int(n.conns.Load()) - n.markedToRetire()
		healthy := !n.evicted.Load() && !n.draining.Load()
		outside := healthy && !scope.in(n)
		views = append(views, nodeView{
			ID:         n.id,
			Conns:      max(conns, 0),
			Eligible:   healthy && !outside,
			Refillable: conns > 0 || now.Sub(time.Unix(0, n.lastSeen.Load())) <= refill,
			Cap:        p.limits.nodeCap(),
			Full:       n.full(now),
			Outside:    outside,
		})
	}
	settling := p.settling(now)
	exact := p.balance.observe(views, int(p.config.MinConns), settling, now, p.settings.balanceInterval/2)
	p.balance.spreadJoins(views, exact, now, time.Duration(rand.Float64()*float64(p.settings.balanceInterval)))
	plan := planBalance(views, p.seed, exact, p.remainderSwaps()...)
	if exact && len(plan.Prune) == 0 {
		// Steady at its targets: what the start allowance was for is done.
		p.budget.endStart()
		if !settling && p.swapRemainder(plan, views, now) {
			plan = planBalance(views, p.seed, exact, p.remainderSwaps()...)
		}
	}
	if settling {
		// Connections are being opened (a refill after the last round): their
		// nodes are not known yet, so pruning now would overshoot.
		plan.Prune = nil
	}
	plan.Prune = p.payMoves(plan, views, now)
	if len(plan.Prune) > 0 {
		p.lastPrune.Store(now.UnixNano())
		p.clusterChanged()
	}
	p.retire(ctx, plan.Prune, now)
	p.obs.pruned(ctx, nodes, views)
	p.keep() // the replacements, and whatever an earlier refill missed
	return plan
}

// remainderSwaps returns the pool's corrections to its remainder.
func (p *Pool) remainderSwaps() []remainderSwap {
	if s := p.swaps.Load(); s != nil {
		return *s
	}
	return nil
}

// swapRemainder asks fleetSwap, for a pool steady at its targets (plan),
// whether to move one of its remainder connections to even out the
// cluster, and records the swap when so; it reports whether it did. It
// needs the fleet's sessions per node read after the pool's own last
// prune (a swap's move among them) had time to land (a balance interval), and held still over
// reads two balance intervals and fleetCountAge apart: while the fleet
// moves (a node joined or came back, and every pool is moving its share
// there) the counts say where connections were, not where they will
// settle, and pools swapping on them would overshoot together; and a
// connection that moved leaves its old node's count at once but shows on
// its new node's only fleetCountAge later. Nor may a per-node cap or runtime
// limit be set (their targets are the limits' to set). The pool draws once
// per read. A swap that
// undoes an earlier one drops it, back to the hash's choice; the pool keeps
// at most one swap per node.
func (p *Pool) swapRemainder(plan balancePlan, views []nodeView, now time.Time) bool {
	if p.limits.on() {
		return false
	}
	size := 0
	for _, v := range views {
		if v.Cap > 0 || v.Full {
			return false
		}
		size += v.Conns
	}
	// A swap's move is a prune too: a swap whose move is not paid yet
	// leaves the plan with prunes, and no swap is asked for then.
	settled := time.Unix(0, p.lastPrune.Load()).Add(p.settings.balanceInterval + fleetCountAge)
	p.pace.mu.Lock()
	fleet, read, since := p.pace.fleet, p.pace.fleetRead, p.pace.fleetSince
	p.pace.mu.Unlock()
	if len(fleet) == 0 || !read.After(settled) || read.Sub(since) < 2*p.settings.balanceInterval+fleetCountAge {
		return false
	}
	// One draw per read: every pool draws once on what it read, as
	// fleetSwap's odds assume; drawing again each round on the same read
	// would multiply them.
	if p.swapRead.Swap(read.UnixNano()) == read.UnixNano() {
		return false
	}
	s, ok := fleetSwap(plan.Targets, fleet, size, rand.Float64(), p.placement.mode == connectRedial)
	if !ok {
		return false
	}
	old := p.remainderSwaps()
	swaps := make([]remainderSwap, 0, len(old)+1)
	undone := false
	for _, o := range old {
		if !undone && o.From == s.To && o.To == s.From {
			undone = true
			continue
		}
		swaps = append(swaps, o)
	}
	if !undone {
		swaps = append(swaps, s)
	}
	if len(swaps) > len(plan.Targets) {
		swaps = swaps[len(swaps)-len(plan.Targets):]
	}
	prev := p.swaps.Swap(&swaps)
	p.swapMove.Store(&swapMove{swap: s, before: prev, after: &swaps, at: now})
	return true
}

// swapMove is a swap whose move may be under way: its connection retired
// from From, the replacement dialling until it lands on To.
type swapMove struct {
	swap          remainderSwap
	before, after *[]remainderSwap // the pool's swaps without it, with it
	at            time.Time
}

// cancelSwap is asked where a move's replacement landed on node id, over
// its target: when id is where the last swap, made within a balance
// interval, took its connection from, the replacement landed back where it
// came from first (one dial in two of those that reach either node, behind
// a random load balancer), and the swap is dropped rather than dialled on:
// a swap is a correction no pool needs, and the pool is back at its hash's
// targets at once, where dialling on would leave it a connection short (or
// at a spread of two) for as long. fleetSwap's odds count on half the swaps
// ending so. It reports whether it dropped one.
func (p *Pool) cancelSwap(id NodeID, now time.Time) bool {
	m := p.swapMove.Load()
	if m == nil || m.swap.From != id || now.Sub(m.at) > p.settings.balanceInterval {
		return false
	}
	if !p.swapMove.CompareAndSwap(m, nil) {
		return false
	}
	return p.swaps.CompareAndSwap(m.after, m.before)
}

// payMoves takes from the connect budget the tokens for the replacements of
// the connections plan retires from eligible nodes (moves), and for the
// redials that steer them, leaving the refill reserve alone, and returns
// plan.Prune cut down to the moves paid for. Leaving a healthy node outside
// the locality level in use is a move too. Connections on other ineligible
// nodes (draining, evicted, expired) are shed whatever the budget: their
// node is going, and their replacements are refills.
func (p *Pool) payMoves(plan balancePlan, views []nodeView, now time.Time) map[NodeID]int {
	if len(plan.Prune) == 0 {
		return plan.Prune
	}
	moving := make(map[NodeID]bool, len(views))
	nodes, reachable, takers, busiest := 0, 0, 0, 0
	for _, v := range views {
		if v.Outside {
			moving[v.ID] = true
		}
		if v.Eligible {
			moving[v.ID] = true
			nodes++
			busiest = max(busiest, v.Conns)
			if t, ok := plan.Targets[v.ID]; ok && v.Refillable && v.Conns < t {
				takers++
			}
		}
		if v.Eligible || v.Conns > 0 {
			reachable++
		}
	}
	want := 0
	for id, k := range plan.Prune {
		if moving[id] {
			want += k
		}
	}
	dials := dialsPerMove(p.placement.mode != connectRedial, takers, reachable)
	// The start allowance evens out where a full pool's connections landed;
	// a pool below MinConns is still opening (a connect of the cold start
	// failed, or a refill is under way), and its refills are placed where
	// the pool is short, which may need no move at all.
	start := p.openConns() >= p.minConnsNow(now)
	paid := p.budget.prepay(now, want, dials, refillReserve(int(p.config.MaxConns), nodes, busiest), start)
	return paidPrune(plan.Prune, moving, paid)
}

// paidPrune cuts the moves of prune (the entries of the nodes in moving)
// down to paid, taking them first from the nodes that shed the most, so an
// underpaid round still narrows the widest gap; the other entries stay.
// Ties go to the lower node ID.
func paidPrune(prune map[NodeID]int, moving map[NodeID]bool, paid int) map[NodeID]int {
	var moves []NodeID
	out := make(map[NodeID]int, len(prune))
	for id, k := range prune {
		if moving[id] {
			moves = append(moves, id)
		} else {
			out[id] = k
		}
	}
	left := maps.Clone(prune)
	for paid > 0 {
		best := NodeID(0)
		found := false
		for _, id := range moves {
			if left[id] > 0 && (!found || left[id] > left[best] || left[id] == left[best] && id < best) {
				best, found = id, true
			}
		}
		if !found {
			break
		}
		left[best]--
		out[best]++
		paid--
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// balanceState is what the balance rounds remember between rounds.
type balanceState struct {
	// steadySize is the pool's size when a round last found it steady (0:
	// never); a connect that brings the pool back to it is judged by the
	// exact rule (placement.overTarget).
	steadySize atomic.Int64

	mu     sync.Mutex // protects the fields below
	steady steadiness
	// ready holds when each eligible node may first receive moves
	// (spreadJoins).
	ready map[NodeID]time.Time
}

// spreadJoins applies spreadJoins to a round's views.
func (b *balanceState) spreadJoins(views []nodeView, steady bool, now time.Time, delay time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ready == nil {
		b.ready = make(map[NodeID]time.Time)
	}
	spreadJoins(views, b.ready, steady, now, delay)
}

// observe records the size of the pool a round found (views) and reports
// whether the pool is steady, so the round places its remainder exactly.
func (b *balanceState) observe(views []nodeView, minConns int, settling bool, now time.Time, hold time.Duration) bool {
	size := 0
	for _, v := range views {
		size += v.Conns
	}
	b.mu.Lock()
	var steady bool
	b.steady, steady = b.steady.observe(size, minConns, settling, now, hold)
	b.mu.Unlock()
	if steady {
		b.steadySize.Store(int64(size))
	}
	return steady
}

// exactAt reports whether a pool of size total (a connect under way
// included) is back at the size it was last steady at, where the exact
// rule of worthMoving applies.
func (b *balanceState) exactAt(total int) bool {
	s := b.steadySize.Load()
	return s > 0 && int64(total) == s
}

// refillWindow is how long after a node was last seen a new connection can
// be expected to reach it. Behind a random load balancer a live node without
// connections is seen about every N probes; a node that just went away stays
// refillable this long, so a short window limits pruning for nothing. It
// covers the first moves towards a node that joined being held back for up
// to a balance interval (spreadJoins), and a round after that.
func (p *Pool) refillWindow() time.Duration {
	return 2*max(p.settings.balanceInterval, p.settings.probeInterval) + p.settings.balanceInterval
}

// settling reports whether connections are being opened right now, or
// soon: pgxpool starts refilling to MinConns 500 ms after a pruned connection
// is destroyed. Below MinConns for long after the last prune (connections
// destroyed without a refill, as eviction does), the pool is balanced at
// the size it has rather than not at all.
func (p *Pool) settling(now time.Time) bool {
	st := p.pool.Stat()
	if c := st.ConstructingConns(); c > 0 {
		// Under runtime limits a pool at its runtime size has no connect
		// under way that BeforeConnect will admit (admitConnect): those
		// are acquirers' first tries, refused at once, and under load
		// there may always be one. They change no node's count.
		if !p.limits.on() || int(st.TotalConns()-c) < p.limits.effectiveMax(now) {
			return true
		}
	}
	if int(st.TotalConns()) < p.minConnsNow(now) && now.Sub(time.Unix(0, p.lastPrune.Load())) < refillWait {
		return true
	}
	return p.placement.pendingConnects(now)
}

// retire closes prune[id] connections of each node, idle ones at once, and
// marks in-use ones to be refused at their next acquire. It also checks the
// other idle connections for a close by the server (a node that went away
// leaves idle connections that look open until used).
//
// A pruned idle connection is closed (Terminate) and then released: pgxpool
// destroys a closed connection on release and starts its health check, which
// tops the pool up to MinConns through BeforeConnect, i.e. placement.
func (p *Pool) retire(ctx context.Context, prune map[NodeID]int, now time.Time) {
	remaining := maps.Clone(prune)
	conns := p.sweepIdle(ctx)
	var victims []*pgxpool.Conn
	var wg sync.WaitGroup
	for _, c := range conns {
		cs := connStateOf(c.Conn())
		if cs != nil && cs.refused() {
			releaseSwept(c) // already retiring: close it so the release refills
			continue
		}
		if cs != nil && remaining[cs.node.id] > 0 {
			remaining[cs.node.id]--
			victims = append(victims, c)
			continue
		}
		// Each check waits about a millisecond for nothing; run them side
		// by side and put each connection back as soon as it is checked.
		wg.Go(func() {
			if err := checkAlive(c.Conn().PgConn()); err != nil {
				if cs != nil {
					p.tracker.recordFailure(cs.node.id, now)
				}
				closeQuietly(c.Conn())
			}
			c.Release()
		})
	}
	for _, c := range victims {
		if cs := connStateOf(c.Conn()); cs != nil {
			cs.node.pruned.Add(1)
		}
		closeQuietly(c.Conn())
		c.Release()
	}
	wg.Wait()
	for id, k := range remaining {
		if k <= 0 {
			continue
		}
		n := p.tracker.node(id)
		if n == nil {
			continue
		}
		n.mu.Lock()
		for cs := range n.connSet {
			if k == 0 {
				break
			}
			if cs.inUse() && cs.retire.CompareAndSwap(false, true) {
				n.pruned.Add(1)
				k--
			}
		}
		n.mu.Unlock()
	}
}

func closeQuietly(c *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	_ = c.Close(ctx) // the connection is going away either way
}

// checkAlive reports an error when the server has closed an idle connection
// (or sent it a fatal error such as 57P01). It reads with a very short
// deadline and sends nothing, as pgconn's deprecated CheckConn does; a timeout
// means the connection is still open.
func checkAlive(pgConn *pgconn.PgConn) error {
	ctx, cancel := context.WithTimeout(context.Background(), aliveCheckTimeout)
	defer cancel()
	if _, err := pgConn.ReceiveMessage(ctx); err != nil && !pgconn.Timeout(err) {
		return err
	}
	return nil
}

type sweepKey struct{}

func sweeping(ctx context.Context) bool { return ctx.Value(sweepKey{}) != nil }

// sweepIdle takes every idle connection out of the pool for a sweep (a
// balance round's pruning and alive check, retireIdle, a health check's
// ping). Under the sweep's context PrepareConn hands each over as it is,
// refused ones included, without the user's hook and without counting it
// as acquired. Each goes back through releaseSwept or Release.
func (p *Pool) sweepIdle(ctx context.Context) []*pgxpool.Conn {
	p.sweeps.Add(1)
	defer p.sweeps.Add(-1)
	return p.pool.AcquireAllIdle(context.WithValue(ctx, sweepKey{}, true))
}

// retireIdle destroys the idle connections that are marked for retirement or
// sit on an evicted node, now rather than at their next acquire, and returns
// how many it destroyed. It briefly takes every idle connection out of the
// pool (pgxpool.AcquireAllIdle) and puts the others back untouched; an
// Acquire racing with it may open a new connection.
func (p *Pool) retireIdle(ctx context.Context) int {
	n := 0
	for _, c := range p.sweepIdle(ctx) {
		if releaseSwept(c) {
			n++
		}
	}
	return n
}

// releaseSwept puts back a connection taken by a sweep. A refused one
// (retiring, or on an evicted node) is closed first, so that the release
// destroys it and starts pgxpool's refill through placement; it reports
// whether it did that.
func releaseSwept(c *pgxpool.Conn) bool {
	cs := connStateOf(c.Conn())
	if cs != nil && cs.refused() {
		closeQuietly(c.Conn())
		c.Release()
		return true
	}
	c.Release()
	return false
}
