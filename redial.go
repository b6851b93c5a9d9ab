package clusterpool

// Redial behind one address: a connection that a random load balancer put
// on the wrong node is refused in ValidateConnect and dialled again, when the
// redial is expected to pay.

import (
	"context"
	"errors"
	"maps"
	"net"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// errOverTarget refuses a connection in ValidateConnect so pgconn dials the
// next (identical) fallback. It never reaches the caller: the last attempt is
// always accepted.
var errOverTarget = errors.New("clusterpool: node is above its connection target; dialling again")

// installRedial adds redialsFor copies of the address's attempts as fallbacks
// and returns a check that refuses a connection when redialPays says so: it
// landed on a node in avoid (the nodes a retry already failed on), on a
// draining node, or on a node that overTarget says should not take it, and
// a token for the redial is at hand. The last copy is always accepted, so
// the load balancer's choice stands after that many refusals. caller and
// move are place's.
// Behind a random balancer each dial is a fresh draw: this reaches the
// under-filled node in fewer balancing rounds for the same number of
// connections opened.
func (pl *placement) installRedial(cc *pgx.ConnConfig, avoid []NodeID, caller, move bool, pay *dialTokens) pgconn.ValidateConnectFunc {
	capped := pl.p != nil && pl.p.limits.capping()
	if !pl.reached.Load() && len(avoid) == 0 && !capped {
		return func(context.Context, *pgconn.PgConn) error {
			pl.reached.Store(true)
			return nil
		}
	}
	// Repeat the whole list of attempts, not just the first: with
	// sslmode=prefer it is a TLS attempt and then a plain one, and against a
	// server without TLS copies of the first alone would be dials that fail.
	all := attempts(cc)
	limit := redialsFor(caller, move)
	fallbacks := make([]*pgconn.FallbackConfig, 0, len(all)*(limit+1))
	fallbacks = append(fallbacks, cc.Fallbacks...)
	for range limit {
		for _, fb := range all {
			c := *fb
			fallbacks = append(fallbacks, &c)
		}
	}
	cc.Fallbacks = fallbacks
	if dial := cc.DialFunc; dial != nil {
		cc.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dial(ctx, network, addr)
			if err != nil {
				pl.reached.Store(false)
			}
			return c, err
		}
	}
	attempt := 0 // pgconn tries the fallbacks one after another
	dialStart := time.Now()
	moveStart := dialStart
	return func(ctx context.Context, pgConn *pgconn.PgConn) error {
		pl.reached.Store(true)
		attempt++
		now := time.Now()
		c := redialCase{Attempt: attempt, DialTime: now.Sub(dialStart), Round: pl.p.settings.balanceInterval, Caller: caller, Move: move}
		dialStart = now
		id := pl.p.nodeOf(pgConn)
		if capped && !pl.p.holdCapSlot(id, pgConn, now) {
			// Never above the cap, even at the last copy: the acquirer
			// waits and tries again.
			pl.redials.Add(1)
			return errNodeAtCap
		}
		if id == 0 || attempt > limit {
			return nil
		}
		c.Avoid = slices.Contains(avoid, id)
		if n := pl.p.tracker.node(id); n != nil && n.draining.Load() {
			c.Draining = pl.overTarget(id, now) // draining, and another node may take it
		} else if !c.Avoid && move {
			c.OverTarget, c.Takers, c.Nodes = pl.moveLanding(id, now)
		} else if !c.Avoid {
			c.OverTarget = pl.overTarget(id, now)
			if c.OverTarget {
				c.Takers, c.Nodes = pl.takers(id, now)
			}
		}
		if !redialPays(c) {
			return nil
		}
		// A voluntary redial leaves the refill reserve alone; one that
		// keeps a call or a connection off a failed or draining node is
		// a refill of sorts and may spend it (never waiting).
		reserve := 0
		if !c.Avoid && !c.Draining {
			info, _ := pl.liveNodes(now, 0, 0)
			eligible, busiest := 0, 0
			for _, n := range info {
				if n.Eligible {
					eligible++
					busiest = max(busiest, n.Conns)
				}
			}
			reserve = refillReserve(int(pl.p.config.MaxConns), eligible, busiest)
		}
		if !pl.p.budget.takeForRedial(now, reserve) {
			// A move's replacement no caller waits for may wait for the
			// next token, within the round in which the move would
			// otherwise be made again (awaitRedial).
			if !move || caller || !pl.p.budget.awaitRedial(ctx, reserve, moveStart.Add(pl.p.settings.balanceInterval)) {
				return nil
			}
			dialStart = time.Now() // the next dial's time starts after the wait
		}
		releaseCapSlot(pgConn)
		pl.redials.Add(1)
		pay.paid.Store(true)
		return errOverTarget
	}
}

// redialCase is what deciding on a redial knows.
type redialCase struct {
	// Attempt counts the dials of this connect so far, this one included.
	Attempt int
	// Avoid: the connection is on a node the retry opening it failed on.
	Avoid bool
	// Draining: the node is draining and another node may take the
	// connection.
	Draining bool
	// OverTarget: the balancer would move a connection off the node.
	OverTarget bool
	// Takers of Nodes nodes behind the address would take the connection
	// (eligible, below target, reachable).
	Takers, Nodes int
	// Caller: an acquire waits for this connect.
	Caller bool
	// Move: the connect replaces a connection a balance round retired, and
	// found its tokens paid (OverTarget then says whether the node is at or
	// above its target, see moveLanding).
	Move bool
	// DialTime is how long this dial took, connect and authentication.
	DialTime time.Duration
	// Round is the balance interval.
	Round time.Duration
}

// redialsFor is how many times a connect may refuse the connection it
// landed and dial again: moveRedials for a move's replacement that no
// caller waits for, maxRedials otherwise.
func redialsFor(caller, move bool) int {
	if move && !caller {
		return moveRedials
	}
	return maxRedials
}

// redialPays decides whether to refuse a connection and dial the address
// again. The last of redialsFor+1 dials is always kept.
//
// A connection that a retry must not use (Avoid), or that a draining node
// will close, is worth a dial whoever waits for it. Otherwise a redial only
// saves a move: the connection would be retired by a balance round and
// replaced. Behind a random load balancer both reach a taker with the same
// chance per dial, so a redial costs the cluster no more connections than
// the move, and balances in the connect rather than rounds later. But it
// costs time where the move costs none:
//
//   - a caller that waits for this connect would wait for the redials too,
//     while a move happens in the background. A move's replacement that a
//     caller opened (in a pool whose connections are all in use, the caller
//     that released the retired connection usually takes its place first)
//     gets callerMoveRedials: without any, the move lands where the load
//     balancer sends it (on a taker with a chance of Takers/Nodes) and the
//     next round retires another connection, so another caller pays a
//     connect; with all of them, one caller would wait for up to
//     maxRedials+1 connects. One redial lifts the chance to land right from
//     1/3 to 5/9 for one taker of three, for at most one more connect: in
//     clusterbench's crash scenario it cut the moves from 15-22 to 11-15
//     and p99 from 1.65-1.87x pgxpool's to 1.08-1.49x, the maximum from
//     up to 1.58x to 0.95x (three seeds each);
//   - the pool is a connection short while it redials: only worth it if the
//     dials it expects (Nodes/Takers, at most the dials left) take less
//     than a round, in which the move would have been made anyway. A slow
//     dial (TLS to a distant cluster, a server busy hashing passwords, a
//     silent node reached through the load balancer) says the next ones will
//     be slow too.
func redialPays(c redialCase) bool {
	switch {
	case c.Attempt > redialsFor(c.Caller, c.Move):
		return false
	case c.Avoid || c.Draining:
		return true
	case !c.OverTarget || c.Takers <= 0:
		return false
	case c.Caller && (!c.Move || c.Attempt > callerMoveRedials):
		return false
	}
	left := redialsFor(c.Caller, c.Move) + 1 - c.Attempt
	expected := min(left, (max(c.Nodes, c.Takers)+c.Takers-1)/c.Takers)
	return time.Duration(expected)*c.DialTime < c.Round
}

// takers counts the nodes that would take a connection refused on node id
// (eligible, below target, and holding connections or seen recently) and
// the nodes a dial of the address may reach: every known node.
func (pl *placement) takers(id NodeID, now time.Time) (takers, nodes int) {
	info, _ := pl.liveNodes(now, 1, 0)
	refill := pl.p.refillWindow()
	for oid, o := range info {
		if oid != id && o.Eligible && o.Conns < o.Target && (o.Conns > 0 || pl.recentlySeen(oid, now, refill)) {
			takers++
		}
	}
	return takers, len(info)
}

// moveLanding judges where a move's replacement landed: on node id, which
// is over (at or above its target, not counting the connections marked to
// retire, which are leaving: the one this connect replaces among them), and
// takers of nodes other nodes below theirs. A move is made to fill a node
// below its target, so its replacement is steered to one, not merely away
// from a node two above the lightest as overTarget steers the pool's other
// connects: that would leave it on a node one above, for the next round to
// move again. A node that is not eligible (draining, evicted, outside the
// locality level) is judged by overTarget.
func (pl *placement) moveLanding(id NodeID, now time.Time) (over bool, takers, nodes int) {
	info, _ := pl.liveNodes(now, 1, 0)
	if n, ok := info[id]; !ok || !n.Eligible {
		over = pl.overTarget(id, now)
		if over {
			takers, nodes = pl.takers(id, now)
		}
		return over, takers, nodes
	}
	total := 1 // this connection
	conns := make(map[NodeID]int, len(info))
	var eligible []NodeID
	for nid, n := range info {
		c := n.Conns
		if nd := pl.p.tracker.node(nid); nd != nil {
			c -= nd.markedToRetire()
		}
		conns[nid] = max(c, 0)
		total += conns[nid]
		if n.Eligible {
			eligible = append(eligible, nid)
		}
	}
	targets := balanceTargets(total, eligible, pl.p.seed, pl.p.remainderSwaps()...)
	for _, nid := range eligible {
		if nid != id && conns[nid] < targets[nid] {
			takers++
		}
	}
	over = conns[id] >= targets[id]
	if over && pl.p.cancelSwap(id, now) {
		// Back where a swap took it from: the swap is dropped, and the
		// connection is at the hash's target there.
		return false, takers, len(info)
	}
	return over, takers, len(info)
}

// overTarget reports whether a new connection on node id should be refused:
// the node is draining, or it would be above its target while another
// eligible node that can take it is below target and worthMoving says the
// connection should go there instead, by the rule the balance rounds prune
// by: exact when the connect brings the pool back to the size it was steady
// at (a refill after a move), otherwise only for nodes two or more apart
// (during a cold start every count lags behind the dials under way, and
// refusing then costs more dials than the balance rounds do later).
func (pl *placement) overTarget(id NodeID, now time.Time) bool {
	info, total := pl.liveNodes(now, 1, 0)
	exact := pl.p.balance.exactAt(total)
	n, ok := info[id]
	if !ok {
		return false // a node nobody has seen yet is below any target
	}
	if !n.Eligible {
		// Draining, or outside the locality level in use: the balancer
		// would retire the connection, so dial again if any other node may
		// take it. Evicted: a connect is proof of health (it ends the
		// eviction), so keep it.
		if nd := pl.p.tracker.node(id); !n.Outside && (nd == nil || !nd.draining.Load()) {
			return false
		}
		return slices.ContainsFunc(slices.Collect(maps.Values(info)), func(o placementNode) bool { return o.Eligible })
	}
	if n.Conns < n.Target {
		return false
	}
	refill := pl.p.refillWindow()
	for oid, o := range info {
		if oid == id || !o.Eligible || o.Conns >= o.Target || !worthMoving(n.Conns, o.Conns, exact) {
			continue
		}
		if o.Conns > 0 || pl.recentlySeen(oid, now, refill) {
			return true
		}
	}
	return false
}

func (pl *placement) recentlySeen(id NodeID, now time.Time, within time.Duration) bool {
	n := pl.p.tracker.node(id)
	return n != nil && now.Sub(time.Unix(0, n.lastSeen.Load())) <= within
}
