package clusterpool

// The tracker records which connection is on which node. Contracts for the
// rest of the package (hooks.go, prune.go, refill.go, placement.go, health.go, probe.go,
// retry.go):
//
//   - connStateOf(conn) returns the *connState the pool stored in the
//     connection's pgconn CustomData at AfterConnect, or nil when the
//     connection is not assigned to a node. No lock, no map lookup under a lock.
//   - connState.retire: set it to have the pool refuse the connection at its
//     next acquire (PrepareConn returns false, pgxpool destroys it). Never close
//     a pgx.Conn yourself: pgxpool owns it. Pool.retireIdle sweeps idle ones now.
//   - node.evicted: while set, PrepareConn refuses every connection on the
//     node (hot path: one atomic load). Eviction is health.go's
//     (tracker.evict, markHealthy, recordFailure). A successful connect to
//     the node (countConn, welcome) marks it healthy and seen.
//   - node counters retries, pruned, evictions: atomics the balance rounds,
//     retry code and eviction increment; NodeStats reports them.
//   - tracker.seen(id, now) records that something (probe, query) reached the
//     node; tracker.expire(now, window) forgets nodes with no connections not
//     seen within window (the balance round chooses the window and calls it).
//   - withAvoidNodes(ctx, ids...) / avoidNodesFrom(ctx): retry writes the nodes
//     a call already failed on; placement (BeforeConnect) reads them.
//   - tracker.snapshot(now) / Pool.NodeStats: counts per node, sorted by ID.
//
// Locks: tracker.mu protects the node map and changes only on connect, close,
// probe and expiry, never on acquire or release. node.mu protects a node's
// connection set. Acquire and release touch atomics only. Lock order:
// tracker.mu before node.mu.

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// customDataKey is where a connection's *connState lives in pgconn's CustomData.
const customDataKey = "clusterpool"

type tracker struct {
	obs *observer // reports node events (tracer.go); may be nil
	// suspect, when set, is told of a node whose connection failed
	// pgxpool's acquire-time ping (Pool.callCut); it must not block.
	suspect func(*node)
	// landings counts connections that reached a node: every tracked
	// connect, and every session probe that identified its node. Behind
	// one address each is a draw of the load balancer, which is how the
	// probe knows it has seen enough of them to have met every node
	// (probeBackoff.observe).
	landings atomic.Uint64

	mu sync.Mutex // protects the fields below
	// metAt is landings when the number of nodes last changed, and metTime
	// the time.
	metAt   uint64
	metTime time.Time
	// nodes holds every node with connections or seen recently.
	nodes map[NodeID]*node
	// localIDs maps a server address to the local NodeID assigned to it in
	// query mode (discovery order); lastLocalID is the last one handed out.
	localIDs    map[string]NodeID
	lastLocalID NodeID
}

type node struct {
	id NodeID

	conns      atomic.Int32 // connections open on this node and tracked
	lastSeen   atomic.Int64 // unix nanoseconds of the last sign of life
	draining   atomic.Bool  // the node said it is draining (probe)
	fullUntil  atomic.Int64 // unix nanoseconds until which it takes no new connection (53300; limits.go)
	capHeld    atomic.Int32 // connections accepted under the per-node cap, not yet tracked (limits.go)
	nodeHealth              // eviction and health checks (health.go)

	// locality is the node's locality once gossip or the node told it;
	// localityAsking is set while a connection asks the node for it, so
	// that a burst of connects asks once.
	locality       atomic.Pointer[nodeLocality]
	localityAsking atomic.Bool

	// Counters the balance rounds and retry code increment; reported in NodeStats.
	retries atomic.Int64 // queries retried because of this node
	pruned  atomic.Int64 // connections retired to rebalance

	mu sync.Mutex // protects the fields below
	// addr is the node's address when known (see NodeStat.Addr).
	addr string
	// connSet holds the node's tracked connections.
	connSet map[*connState]struct{}
}

// connState is the pool's record of one connection, stored in the
// connection's CustomData so the hot path finds it without a lock.
type connState struct {
	node *node
	// host is the address the connection was dialled at (remote IP:port), so
	// placement can map connection-string hosts to nodes.
	host string
	// cleanupDone is the connection's pgconn CleanupDone: closed once the
	// connection has closed, whoever closed it.
	cleanupDone <-chan struct{}

	// use counts the connection's acquires and releases: it is odd while a
	// caller holds the connection (inUse), and use/2 is how many times a
	// caller gave it back (releases; a health check tells from it that a
	// call on the node finished). It is the only in-use count: acquire and
	// release each make one atomic write to the connection's own state,
	// and NodeStats sums the flags, so the hot path never writes memory
	// shared between connections.
	use    atomic.Uint32
	retire atomic.Bool // refuse at the next acquire
	closed atomic.Bool // untracked; set once
	// pinging is set when pgxpool is about to ping the connection at
	// acquire (chainShouldPing), and cleared when the acquire goes on to
	// PrepareConn, which pgxpool calls only after a successful ping, or
	// when a sweep finds the connection idle. A ping abandoned by its
	// acquirer leaves it set even if the ping then succeeds, so only a
	// connection that is already broken when it is closed while pinging
	// failed its ping (untrack).
	pinging atomic.Bool
	// cut is set when a caller's own deadline or cancellation cut a call
	// in flight on the connection (pgx then closes it); health checks
	// read it.
	cut atomic.Bool
}

func newTracker() *tracker {
	return &tracker{
		nodes:    make(map[NodeID]*node),
		localIDs: make(map[string]NodeID),
	}
}

// connStateOf returns the connection's state, or nil if it is not tracked.
func connStateOf(c *pgx.Conn) *connState {
	if c == nil {
		return nil
	}
	cs, _ := c.PgConn().CustomData()[customDataKey].(*connState)
	return cs
}

// nodeLocked returns node id, creating it if needed.
func (t *tracker) nodeLocked(id NodeID, now time.Time) *node {
	n := t.nodes[id]
	if n == nil {
		n = &node{id: id, connSet: make(map[*connState]struct{})}
		n.lastSeen.Store(now.UnixNano())
		t.nodes[id] = n
		t.metAt, t.metTime = t.landings.Load(), now
	}
	return n
}

// node returns node id, or nil if unknown.
func (t *tracker) node(id NodeID) *node {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.nodes[id]
}

// localID returns the local NodeID for a server address (query mode),
// assigning the next one on first sight.
func (t *tracker) localID(addr string) NodeID {
	t.mu.Lock()
	defer t.mu.Unlock()
	if id, ok := t.localIDs[addr]; ok {
		return id
	}
	t.lastLocalID++
	t.localIDs[addr] = t.lastLocalID
	return t.lastLocalID
}

// countConn records a new connection on node id and stores its state in
// the connection: the first step of tracking it. It calls no tracer, so it
// may run under a lock of the pool's; welcome (with the time its connect
// began) must follow.
func (t *tracker) countConn(id NodeID, addr, host string, conn *pgx.Conn, now time.Time) *connState {
	cs := t.count(id, addr, host, conn.PgConn().CleanupDone(), now)
	conn.PgConn().CustomData()[customDataKey] = cs
	return cs
}

// add records a connection on node id. A successful connect is proof of
// life: the node is marked seen and healthy. But a connection dialled before
// its node's last eviction proves nothing about the node (its handshake may
// have finished just before the node failed): it does not mark the node
// healthy, and it is marked to retire, as the node's other connections were
// at the eviction.
func (t *tracker) add(id NodeID, addr, host string, cleanupDone <-chan struct{}, started, now time.Time) *connState {
	cs := t.count(id, addr, host, cleanupDone, now)
	t.welcome(cs, addr, started, now)
	return cs
}

// count is add's first step: the connection counts on node id. It calls
// no tracer.
func (t *tracker) count(id NodeID, addr, host string, cleanupDone <-chan struct{}, now time.Time) *connState {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := t.nodeLocked(id, now)
	cs := &connState{node: n, host: host, cleanupDone: cleanupDone}
	n.mu.Lock()
	if addr != "" {
		n.addr = addr
	}
	n.connSet[cs] = struct{}{}
	n.conns.Add(1)
	n.mu.Unlock()
	return cs
}

// welcome is add's second step, for a connection count has counted: the
// node is seen (a tracer learns of a new node), and healthy unless the
// connection was dialled before its last eviction.
func (t *tracker) welcome(cs *connState, addr string, started, now time.Time) {
	n := cs.node
	t.obs.nodeSeen(n, addr)
	t.landings.Add(1)

	n.lastSeen.Store(now.UnixNano())
	n.tookSession()
	if !started.IsZero() && started.UnixNano() <= n.evictedAt.Load() {
		cs.retire.Store(true)
	} else {
		t.markHealthy(n.id, now)
	}
}

// untrack forgets a connection that is closing. broken says pgconn had
// closed it already (a read or write failed) rather than the pool closing a
// working connection. It is idempotent: BeforeClose, a failed AfterConnect
// and the closed-connection sweep may all call it.
func (t *tracker) untrack(cs *connState, broken bool) {
	if cs == nil {
		return
	}
	// Cleared before closed is set, so a health check that sees the
	// connection closed sees the mark only if the ping broke it.
	pingFailed := broken && cs.pinging.Load()
	if !pingFailed {
		cs.endPing()
	}
	if !cs.closed.CompareAndSwap(false, true) {
		return
	}
	n := cs.node
	n.mu.Lock()
	delete(n.connSet, cs)
	n.mu.Unlock()
	n.conns.Add(-1)
	if broken {
		t.obs.changed() // a lost connection
	}
	if pingFailed && t.suspect != nil {
		// The ping at acquire failed, most often because the node did
		// not answer before the acquirer's deadline: the acquire's error
		// names no node, so this is the only place that learns which.
		t.suspect(n)
	}
}

// acquired marks the connection in use; called when PrepareConn hands it
// out. Hot path: one atomic write (a second call changes nothing).
func (cs *connState) acquired() {
	for {
		u := cs.use.Load()
		if u&1 == 1 || cs.use.CompareAndSwap(u, u+1) {
			return
		}
	}
}

// released marks the connection idle again; called by the release tracer.
// Hot path: one atomic write (a second call changes nothing).
func (cs *connState) released() {
	for {
		u := cs.use.Load()
		if u&1 == 0 || cs.use.CompareAndSwap(u, u+1) {
			return
		}
	}
}

// inUse reports whether a caller holds the connection.
func (cs *connState) inUse() bool { return cs.use.Load()&1 == 1 }

// releases returns how many times a caller gave the connection back.
func (cs *connState) releases() uint32 { return cs.use.Load() / 2 }

// refused reports whether PrepareConn must refuse the connection.
// PrepareConn runs right after pgxpool's acquire-time ping succeeded, so it
// also ends the ping.
func (cs *connState) refused() bool {
	cs.endPing()
	return cs.retire.Load() || cs.node.evicted.Load()
}

// endPing clears pinging: the connection's acquire-time ping, if any, is
// over and did not break it. A load, and a store only after a ping.
func (cs *connState) endPing() {
	if cs.pinging.Load() {
		cs.pinging.Store(false)
	}
}

// seen records a sign of life from node id (probe, connect, query).
func (t *tracker) seen(id NodeID, now time.Time) {
	t.mu.Lock()
	n := t.nodeLocked(id, now)
	t.mu.Unlock()
	t.obs.nodeSeen(n, "")
	n.lastSeen.Store(now.UnixNano())
}

// expire forgets nodes that have no connections and have not been seen
// since now-window, and returns their IDs. It keeps memory bounded however
// many nodes come and go.
func (t *tracker) expire(now time.Time, window time.Duration) []NodeID {
	cutoff := now.Add(-window).UnixNano()
	t.mu.Lock()
	defer t.mu.Unlock()
	var gone []NodeID
	for id, n := range t.nodes {
		if n.conns.Load() == 0 && n.lastSeen.Load() < cutoff {
			delete(t.nodes, id)
			gone = append(gone, id)
		}
	}
	if len(gone) > 0 {
		t.metAt, t.metTime = t.landings.Load(), now
		for addr, id := range t.localIDs {
			if _, ok := t.nodes[id]; !ok {
				delete(t.localIDs, addr)
			}
		}
	}
	return gone
}

// nodeAt returns the node whose address (NodeStat.Addr) is addr, or nil.
func (t *tracker) nodeAt(addr string) *node {
	key := addrKey(addr)
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, n := range t.nodes {
		n.mu.Lock()
		a := n.addr
		n.mu.Unlock()
		if a != "" && addrKey(a) == key {
			return n
		}
	}
	return nil
}

// nodeList returns the known nodes sorted by ID.
func (t *tracker) nodeList() []*node {
	t.mu.Lock()
	nodes := make([]*node, 0, len(t.nodes))
	for _, n := range t.nodes {
		nodes = append(nodes, n)
	}
	t.mu.Unlock()
	slices.SortFunc(nodes, func(a, b *node) int { return compareIDs(a.id, b.id) })
	return nodes
}

// coverage returns how many nodes the tracker knows, and how many
// connections have landed (landings) since that number last changed.
func (t *tracker) coverage() (known int, landed uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.nodes), t.landings.Load() - t.metAt
}

// met returns when the number of nodes the tracker knows last changed.
func (t *tracker) met() time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.metTime
}

func compareIDs(a, b NodeID) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// sweepClosed untracks connections whose pgconn has finished closing without
// the pool's BeforeClose: hijacked connections the caller closed, and broken
// ones the pool has not destroyed yet. Either way the server no longer counts
// them.
func (n *node) sweepClosed(t *tracker) {
	var closed []*connState
	n.mu.Lock()
	for cs := range n.connSet {
		select {
		case <-cs.cleanupDone:
			closed = append(closed, cs)
		default:
		}
	}
	n.mu.Unlock()
	for _, cs := range closed {
		t.untrack(cs, true)
	}
}

// markedToRetire counts the node's connections already marked to retire.
func (n *node) markedToRetire() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	k := 0
	for cs := range n.connSet {
		if cs.retire.Load() {
			k++
		}
	}
	return k
}

// NodeStat is a snapshot of one node's connections and health, as returned
// by Pool.NodeStats. Field names follow pgxpool.Stat.
type NodeStat struct {
	// ID is the node's ID: the CockroachDB SQL instance ID with BackendKey
	// identity, a pool-local ID (1, 2, ... in discovery order) with query
	// identity, or what Config.IdentifyNode returned.
	ID NodeID
	// Addr is the node's address when known: the server's address with query
	// identity, the address dialled when the connection string lists the
	// nodes' own hosts; empty behind a single load-balancer address.
	Addr string

	TotalConns    int32 // open connections on the node
	IdleConns     int32 // of those, idle in the pool
	AcquiredConns int32 // of those, acquired by callers

	// Healthy is false while the node is evicted after failures or a drain
	// signal; its connections are not handed out.
	Healthy bool
	// Draining is true when the node reported that it is draining.
	Draining bool
	// Full is true while the node, healthy, takes no new connection: it
	// refused one with SQLSTATE 53300 (too many connections), or its
	// listed host refused a connect that went to another host. Balancing
	// then targets no more connections to it than it holds.
	Full bool
	// Locality is the node's locality in CockroachDB's --locality form
	// ("region=us-east1,zone=us-east1-b") once the pool knows it: from
	// CockroachDB's gossip tables when the probe may read them, or, with
	// Config.Locality set, from the node itself. Empty when not known or
	// when the node has none.
	Locality string
	// LastSeen is the last time a connect, probe or query reached the node.
	LastSeen time.Time

	Retries   int64 // queries retried because of a failure on this node
	Pruned    int64 // connections retired by the balance rounds
	Evictions int64 // times the node was evicted
}

// snapshot returns NodeStats for every known node, sorted by ID.
func (t *tracker) snapshot() []NodeStat {
	now := time.Now()
	nodes := t.nodeList()
	stats := make([]NodeStat, 0, len(nodes))
	for _, n := range nodes {
		n.sweepClosed(t)
		n.mu.Lock()
		addr := n.addr
		total, inUse := int32(len(n.connSet)), int32(0)
		for cs := range n.connSet {
			if cs.inUse() {
				inUse++
			}
		}
		n.mu.Unlock()
		var locality string
		if nl := n.localityOf(); nl != nil {
			locality = nl.raw
		}
		stats = append(stats, NodeStat{
			ID:            n.id,
			Addr:          addr,
			Locality:      locality,
			TotalConns:    total,
			IdleConns:     total - inUse,
			AcquiredConns: inUse,
			Healthy:       !n.evicted.Load(),
			Draining:      n.draining.Load(),
			Full:          n.full(now),
			LastSeen:      time.Unix(0, n.lastSeen.Load()),
			Retries:       n.retries.Load(),
			Pruned:        n.pruned.Load(),
			Evictions:     n.evictions.Load(),
		})
	}
	return stats
}

type avoidNodesKey struct{}

// withAvoidNodes returns a context that asks placement to avoid the given
// nodes (in addition to any ctx already names).
func withAvoidNodes(ctx context.Context, ids ...NodeID) context.Context {
	if len(ids) == 0 {
		return ctx
	}
	prev := avoidNodesFrom(ctx)
	all := make([]NodeID, 0, len(prev)+len(ids))
	all = append(append(all, prev...), ids...)
	return context.WithValue(ctx, avoidNodesKey{}, all)
}

// avoidNodesFrom returns the nodes ctx asks placement to avoid.
func avoidNodesFrom(ctx context.Context) []NodeID {
	ids, _ := ctx.Value(avoidNodesKey{}).([]NodeID)
	return ids
}
