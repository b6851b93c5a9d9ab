package clusterpool

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Node health: drain-aware eviction after a connection-level failure, and
// checks that tell a node that stopped answering from one that was merely
// slow.
//
// Eviction (nodeFailed): the first connection-level failure on node N (57P01
// from a draining CockroachDB node, EOF, a reset) evicts N at once: its idle
// connections are destroyed, its in-use ones retired when released, and none
// of its connections is handed out until a connect or probe reaches N again.
//
// A node cut off by a network partition (or hung) keeps its TCP connections
// open and answers nothing: no EOF, no reset, no 57P01. Calls on it end only
// by their callers' deadlines, and a caller's own deadline never counts
// against a node (a slow query that hit a short statement deadline says
// nothing about the node). So instead of counting such timeouts, the pool
// asks the node directly: when a call ends in its caller's deadline with its
// connection broken mid-statement on node N, when pgxpool's acquire-time ping
// of a connection on N fails, or when a connect to N's host (hosts listed)
// fails over to another host, the pool checks N in the background:
//
//   - it pings one of N's idle connections, bounded by the check timeout (a
//     node that serves a slow query on one connection still answers an
//     empty statement on another at once);
//   - with no idle connection on N but N's own address known (the
//     connection string lists the nodes), it dials N there instead;
//   - with neither, it watches N until the check times out: a call on N
//     that finishes, or a probe or connect that reaches N, means it
//     answers; calls on N all cut by deadlines mean it does not; otherwise
//     the check changes nothing (see healthChecker.silent).
//
// If N does not answer in time it is evicted, as after a lost connection.
// At most one check per node runs at a time, and a node is checked at most
// once per checkSpacing, so a storm of timeouts costs a ping a second per
// node.

// Connect and check timeouts.
const (
	// maxCheckTimeout bounds one health check; a shorter connect timeout
	// bounds it further.
	maxCheckTimeout = 5 * time.Second
	// checkSpacing is the least time between the end of one check of a
	// node and the start of the next.
	checkSpacing = time.Second
	// checkPoll is how often a check looks at the calls in flight on a
	// node when it has no idle connection to ping.
	checkPoll = 20 * time.Millisecond
	// checkQueue is how many check requests may wait for the check loop;
	// more are dropped (the node is checked on its next timeout).
	checkQueue = 64
)

// connectTimeout is the per-host timeout of the pool's own connects: the
// user's connect_timeout, or DefaultConnectTimeout.
func (p *Pool) connectTimeout() time.Duration {
	if d := p.config.ConnConfig.ConnectTimeout; d > 0 {
		return d
	}
	return DefaultConnectTimeout
}

// checkTimeout bounds one health check: how long a node may take to answer
// before it is evicted.
func (p *Pool) checkTimeout() time.Duration {
	return min(p.connectTimeout(), maxCheckTimeout)
}

// Failure window: this many connection-level failures within failureWindow
// mark a node unhealthy. One failure alone does not, so a single broken
// connection does not evict a healthy node; a clear drain signal (57P01) or a
// lost connection evicts at once (nodeFailed).
const (
	failureBurst  = 3
	failureWindow = 10 * time.Second
)

// nodeHealth is a node's health: its eviction and its health checks.
type nodeHealth struct {
	evicted atomic.Bool // refuse the node's connections at acquire
	// evictedAt is when the node was last evicted (unix nanoseconds): a
	// connection dialled before it does not vouch for the node.
	evictedAt atomic.Int64
	evictions atomic.Int64 // times the node was evicted; NodeStats reports it
	// checking is set while a health check of the node is under way, so at
	// most one runs per node; checkedAt is when the last one ended (unix
	// nanoseconds), so checks are spaced out.
	checking  atomic.Bool
	checkedAt atomic.Int64
	// reachedAt is when a probe or a new connection last reached the node
	// (unix nanoseconds): proof that it answers, for health checks.
	reachedAt atomic.Int64
	// cuts counts calls on the node cut by their callers' deadlines, and
	// acquire-time pings that failed; cutsJudged is its value when the
	// last health check ended.
	cuts       atomic.Int64
	cutsJudged atomic.Int64

	failMu sync.Mutex // protects the fields below
	// failures and failuresSince count connection-level failures in the
	// current window.
	failures      int
	failuresSince time.Time
}

// evict marks node id unhealthy: its connections are refused at acquire until
// markHealthy. It returns the node's idle connections, marked retire, so the
// caller can sweep them (Pool.retireIdle). In-use ones are refused when they
// come back while the node is still evicted.
func (t *tracker) evict(id NodeID, now time.Time) []*connState {
	n := t.node(id)
	if n == nil {
		return nil
	}
	n.evictedAt.Store(now.UnixNano())
	if n.evicted.CompareAndSwap(false, true) {
		n.evictions.Add(1)
		t.obs.nodeHealth(id, false)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	var idle []*connState
	for cs := range n.connSet {
		if !cs.inUse() {
			cs.retire.Store(true)
			idle = append(idle, cs)
		}
	}
	return idle
}

// markHealthy clears node id's eviction and failure window. Its callers
// (a probe, a new connection) have just reached the node.
func (t *tracker) markHealthy(id NodeID, now time.Time) {
	n := t.node(id)
	if n == nil {
		return
	}
	n.reachedAt.Store(now.UnixNano())
	n.failMu.Lock()
	n.failures = 0
	n.failuresSince = time.Time{}
	n.failMu.Unlock()
	if n.evicted.Swap(false) {
		t.obs.nodeHealth(id, true)
	}
}

// recordFailure counts a connection-level failure on node id at now. It
// returns true when the node just became unhealthy: failureBurst failures
// within failureWindow. The node is then evicted; the caller sweeps its idle
// connections if it wants them gone at once.
func (t *tracker) recordFailure(id NodeID, now time.Time) bool {
	n := t.node(id)
	if n == nil {
		return false
	}
	n.failMu.Lock()
	if n.failuresSince.IsZero() || now.Sub(n.failuresSince) > failureWindow {
		n.failures, n.failuresSince = 0, now
	}
	n.failures++
	tripped := n.failures == failureBurst
	n.failMu.Unlock()
	if tripped && !n.evicted.Load() {
		t.evict(id, now)
		return true
	}
	return false
}

// nodeFailed is drain-aware eviction: after a connection-level failure on
// node n (57P01, EOF, reset, ...), the node is evicted at once, so its
// connections are refused at acquire until a successful connect or probe
// shows it healthy; its idle connections are destroyed now, and its in-use
// ones are marked to be retired when they come back, even if the node has
// recovered by then (they belong to the server process that failed).
func (p *Pool) nodeFailed(n *node) {
	now := time.Now()
	first := !n.evicted.Load()
	p.tracker.recordFailure(n.id, now)
	p.tracker.evict(n.id, now)
	n.mu.Lock()
	for cs := range n.connSet {
		cs.retire.Store(true)
	}
	n.mu.Unlock()
	if first {
		p.retireIdle(context.Background())
	}
}

// otherHealthyNode reports whether some known node outside avoid is healthy.
// It takes the tracker's lock, so it is only called on the retry path.
func (p *Pool) otherHealthyNode(avoid []NodeID) bool {
	for _, n := range p.tracker.nodeList() {
		if !n.evicted.Load() && !slices.Contains(avoid, n.id) {
			return true
		}
	}
	return false
}

// healthChecker runs node health checks in the background.
type healthChecker struct {
	p        *Pool
	requests chan *node
}

func newHealthChecker(p *Pool) *healthChecker {
	return &healthChecker{p: p, requests: make(chan *node, checkQueue)}
}

// callCut records that a caller's deadline cut a call in flight on n (or
// an acquire-time ping on n failed) and asks for a check of n.
func (p *Pool) callCut(n *node) {
	n.cuts.Add(1)
	p.suspectNode(n)
}

// suspectNode asks for a background check of n; see the top of this file.
// It never blocks and is cheap when a check is already under way or recent.
func (p *Pool) suspectNode(n *node) {
	if n == nil || p.health == nil {
		return
	}
	p.health.suspect(n, time.Now())
}

// suspectHost asks for a check of the node last seen behind the listed
// host, if any.
func (p *Pool) suspectHost(host string) {
	if p.placement.mode != connectPlaced {
		return
	}
	if id := p.placement.nodeBehind(host); id != 0 {
		p.suspectNode(p.tracker.node(id))
	}
}

func (h *healthChecker) suspect(n *node, now time.Time) {
	if n.evicted.Load() {
		return // nothing left to decide until it is healthy again
	}
	if now.UnixNano()-n.checkedAt.Load() < int64(checkSpacing) {
		return
	}
	if !n.checking.CompareAndSwap(false, true) {
		return
	}
	select {
	case h.requests <- n:
	default:
		n.checking.Store(false)
	}
}

// run starts each requested check in its own goroutine (a check may wait
// out its whole timeout) until ctx ends, then waits for the checks.
func (h *healthChecker) run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case n := <-h.requests:
			wg.Go(func() {
				defer func() {
					n.cutsJudged.Store(n.cuts.Load())
					n.checkedAt.Store(time.Now().UnixNano())
					n.checking.Store(false)
				}()
				h.check(ctx, n)
			})
		}
	}
}

// check asks node n whether it answers, and evicts it if it does not.
func (h *healthChecker) check(parent context.Context, n *node) {
	ctx, cancel := context.WithTimeout(parent, h.p.checkTimeout())
	defer cancel()
	if h.silent(ctx, n) && parent.Err() == nil {
		h.p.nodeFailed(n)
	}
}

// silent reports whether node n failed to answer within ctx. In order of
// preference, the evidence is:
//
//  1. a ping of one of n's idle connections;
//  2. a dial of n's own address (hosts listed);
//  3. otherwise, what happens on n until the check times out. n answered if
//     a probe or a new connection reaches it, a call on it finishes (its
//     connection comes back to the pool without being cut), or an idle
//     connection appears and answers a ping (as in 1). n is silent if the
//     calls in flight on it (and pgxpool's acquire-time pings), at the start
//     or since, were all cut by their callers' deadlines (or failed), at
//     least two were cut since the last check, and nothing else was heard
//     from it. Behind a load balancer and under load this is all a
//     partition leaves: the node's connections are all in use, hang, and
//     are cut one by one, and connects and probes that land on it hang too.
//     Calls still in flight when the check ends prove nothing either way.
//
// With none of these, the check finds nothing: n is not evicted. So a
// single slow query cut by a short deadline never evicts a node: the node
// has another connection to ping, other calls that finish, or nothing else
// to judge by. What can evict a healthy node is every call on it cut by
// deadlines for the whole check, with no idle connection, probe or new
// connection reaching it meanwhile, as a burst of slow queries with short
// deadlines filling its connections may do; that eviction closes nothing
// the deadlines had not closed already, and ends at the next connect or
// probe that reaches the node.
func (h *healthChecker) silent(ctx context.Context, n *node) bool {
	start := time.Now().UnixNano()
	var busy []busyConn
	dialled := false
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		if n.reachedAt.Load() > start {
			return false
		}
		if n.hasIdleConn() {
			if answered, known := h.pingIdle(ctx, n); known {
				return !answered
			}
		}
		if !dialled {
			dialled = true
			if answered, known := h.dialNode(ctx, n); known {
				return !answered
			}
		}
		busy = n.busyConns(busy)
		for _, b := range busy {
			if b.finished() {
				return false
			}
		}
		timer.Reset(checkPoll)
		select {
		case <-ctx.Done():
			for _, b := range busy {
				if !b.cs.closed.Load() || !b.cs.cut.Load() && !b.cs.pinging.Load() {
					return false // still in flight, or closed for another reason
				}
			}
			// Every call seen was cut. One cut alone (the one that asked
			// for this check, say) is a slow query as much as a silent
			// node; two or more since the last check, with nothing heard
			// from the node, are taken as silence.
			return n.cuts.Load()-n.cutsJudged.Load() >= 2
		case <-timer.C:
		}
	}
}

// busyConn is a connection in use when a check started.
type busyConn struct {
	cs       *connState
	releases uint32 // cs.releases then
}

// finished reports whether a call on the connection finished since the
// check started: it was released more often than a cut (whose connection
// is released once, then destroyed) accounts for.
func (b busyConn) finished() bool {
	n := b.cs.releases() - b.releases
	if b.cs.cut.Load() {
		return n > 1
	}
	return n > 0
}

// busyConns adds to busy the node's connections in use by callers now, or
// being pinged by pgxpool for an acquire, that it does not hold yet, except
// those already retiring (which close on release whatever the node does) or
// cut. A ping that fails leaves its connection closed while still marked
// pinging, which counts as a cut; one that succeeds leads to a call whose
// release counts as finished.
func (n *node) busyConns(busy []busyConn) []busyConn {
	n.mu.Lock()
	defer n.mu.Unlock()
	for cs := range n.connSet {
		if (cs.inUse() || cs.pinging.Load()) && !cs.retire.Load() && !cs.cut.Load() &&
			!slices.ContainsFunc(busy, func(b busyConn) bool { return b.cs == cs }) {
			busy = append(busy, busyConn{cs: cs, releases: cs.releases()})
		}
	}
	return busy
}

// hasIdleConn reports whether the node has an idle connection to ping.
func (n *node) hasIdleConn() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	for cs := range n.connSet {
		if !cs.inUse() && !cs.pinging.Load() && !cs.retire.Load() {
			return true
		}
	}
	return false
}

// pingIdle pings one of n's idle connections. known is false when n has no
// idle connection to ping.
func (h *healthChecker) pingIdle(ctx context.Context, n *node) (answered, known bool) {
	var mine *pgxpool.Conn
	// All but one of the idle connections go straight back.
	for _, c := range h.p.sweepIdle(ctx) {
		cs := connStateOf(c.Conn())
		if mine == nil && cs != nil && cs.node == n && !cs.refused() {
			mine = c
			continue
		}
		releaseSwept(c)
	}
	if mine == nil {
		return false, false
	}
	err := mine.Ping(ctx)
	if err != nil && !mine.Conn().IsClosed() {
		closeQuietly(mine.Conn()) // so that Release destroys it
	}
	mine.Release()
	return !nodeSilent(err), true
}

// dialNode opens a connection to n's own address, when the connection
// string lists the nodes and one of them is known to be n. known is false
// when no address of n is known.
func (h *healthChecker) dialNode(ctx context.Context, n *node) (answered, known bool) {
	pl := h.p.placement
	if pl.mode != connectPlaced {
		return false, false // behind one address a dial reaches any node
	}
	cc, err := h.p.sideConfig(ctx, func(groups []*hostGroup) []int {
		for i, g := range groups {
			if pl.nodeBehind(g.key) == n.id {
				known = true
				return []int{i}
			}
		}
		return nil
	})
	if err != nil || !known {
		return false, false
	}
	cc.ConnectTimeout = 0 // ctx bounds the check
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		if isTooManyConns(err) {
			h.p.markFull(n.id, time.Now())
		}
		return !nodeSilent(err), true
	}
	_ = conn.Close(ctx) // bounded by the check's context
	n.tookSession()     // it had room for the check
	return true, true
}

// nodeSilent reports whether a check's error means the node did not answer:
// a timeout or a connection-level failure. Any other error (a refused
// password, say) came from the node, so it answered.
func nodeSilent(err error) bool {
	switch Classify(err) {
	case ClassCanceled, ClassConnection:
		return true
	}
	return false
}
