package clusterpool

// Per-node connection caps (MaxConnsPerNode) and nodes that refuse new
// connections with 53300 (CockroachDB's server.max_connections_per_gateway):
// a full node is healthy, only full; it takes no more connections for a while.

import (
	"errors"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

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
// and no session has reached it since (a pool connection, a probe, a
// health check's dial: tookSession). An evicted node is unhealthy, not
// full.
func (n *node) full(now time.Time) bool {
	return n.fullUntil.Load() > now.UnixNano() && !n.evicted.Load()
}

// tookSession records that the node accepted a new session (a pool
// connection, a probe, a health check's dial): it is not full.
func (n *node) tookSession() {
	n.fullUntil.Store(0)
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
