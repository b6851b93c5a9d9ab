package clusterpool

import (
	"context"
	"crypto/tls"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Connect-time placement. With several hosts in the connection string, a
// new connection tries first the host whose node is furthest below its
// target (plan.go's placementOrder). Behind one address a connection lands
// where the load balancer sends it; with the node's ID in the BackendKey,
// ValidateConnect can refuse one that landed on an over-target node and let
// pgconn dial the address again (a redial). Both learn which node is behind
// which address from the connections themselves.

// Placement and redial settings.
const (
	// maxRedials bounds how often a connection that landed on an over-target
	// node behind a single load-balancer address is refused and dialled again.
	maxRedials = 3
	// moveRedials bounds the redials of a move's replacement opened in the
	// background: no caller waits for it, and a move whose replacement
	// lands on a node at its target moved nothing (the next round moves
	// another connection, a round later, at the same expected cost in
	// dials). With one node of four to reach, 8 dials land there nine
	// times in ten, 4 dials two times in three. Each dial still needs its
	// token (redialPays, takeForRedial).
	moveRedials = 7
	// callerMoveRedials bounds the redials of a move's replacement that a
	// caller waits for (see redialPays).
	callerMoveRedials = 1
	// reservationTTL bounds how long a connect under way counts towards the
	// node placement chose for it; a connect that fails never reports back.
	reservationTTL = 10 * time.Second
	// hostDownFor is how long a listed host whose dial failed is tried last.
	hostDownFor = 30 * time.Second
)

// connectMode is how the pool places a new connection; it is fixed when the
// pool is created.
type connectMode uint8

const (
	// connectAsListed leaves the connection string's hosts as they are:
	// nothing is tracked, or one address whose nodes only a query or the
	// user's IdentifyNode tells apart, after ValidateConnect.
	connectAsListed connectMode = iota
	// connectPlaced orders several hosts so the connection goes to the
	// least-connected healthy node first.
	connectPlaced
	// connectRedial refuses, behind one address, a connection on a node
	// above its target (read from the BackendKey, so no query is needed to
	// decide) and dials the address again.
	connectRedial
)

// placement places the pool's new connections.
type placement struct {
	p    *Pool
	mode connectMode

	redials atomic.Int64 // connections refused by ValidateConnect
	// reached (redial mode) is set when a connect reaches a server and
	// cleared when a dial fails. Redial copies of the address are added only
	// while it is set, or when a retry asks to avoid nodes: until a connect
	// reaches a node there is nothing to refuse, and copies of an address
	// that does not answer would only repeat its dial error.
	reached atomic.Bool

	// placeMu makes placing a connect and reserving its host one step, so
	// that connects placed at once do not all see the same node below its
	// target (or its cap) and pick it; a connect waits on it no longer
	// than a placement takes, and never for I/O.
	placeMu sync.Mutex

	mu sync.Mutex // protects the fields below
	// hostNodes maps a dialled address ("ip:port") to the node behind it,
	// learned from connections; bounded by the number of hosts dialled.
	hostNodes map[string]NodeID
	// gossipHosts are the addresses of live nodes read from CockroachDB's
	// gossip tables, replaced on every read; kept only when the pool's node
	// IDs are CockroachDB's. They are dialled too, so a node added to the
	// cluster after the pool started is reachable; see groupsFor.
	gossipHosts map[NodeID]string
	// gossipLocalities holds the localities gossip gave with gossipHosts,
	// for the nodes among them; groupsFor dials only those within the
	// locality level in use.
	gossipLocalities map[NodeID]*nodeLocality
	// reservations are connects under way, by the host placed first and,
	// once the connection is up, by the address it reached. Each is held
	// until AfterConnect has counted the connection on its node (see
	// counted), so a connect always counts somewhere.
	reservations []*reservation
	// downHosts holds when a dial to a host (an IP literal placed first)
	// last failed; placement tries such a host last for hostDownFor, or
	// until a probe reaches it. Bounded by the hosts dialled.
	downHosts map[string]time.Time
}

type reservation struct {
	host  string // host:port, a key of hostNodes once mapped
	until time.Time
	// capRefused is set when the pool itself refused a connection of
	// this connect for the per-node cap: the host did not fail.
	capRefused bool
}

// reservationKey is where a new connection's CustomData holds the
// reservation its connect made, for counted to drop.
const reservationKey = "clusterpool.reservation"

func newPlacement(p *Pool) *placement {
	pl := &placement{
		p:         p,
		hostNodes: make(map[string]NodeID),
		downHosts: make(map[string]time.Time),
	}
	switch s := p.settings; {
	case !p.tracking():
	case s.multiHost:
		pl.mode = connectPlaced
	case p.cockroachIDs():
		pl.mode = connectRedial
	}
	return pl
}

// place prepares cc, the per-attempt copy of the connection config, for a
// connect by the pool's connect mode: it orders the hosts, or adds the
// redial fallbacks. It returns the check ValidateConnect runs on each
// connection the connect establishes, or nil. caller says an acquire waits
// for the connect; move, that it replaces a connection a balance round
// retired.
func (pl *placement) place(ctx context.Context, cc *pgx.ConnConfig, now time.Time, caller, move bool) pgconn.ValidateConnectFunc {
	pay := &dialTokens{}
	var check pgconn.ValidateConnectFunc
	switch pl.mode {
	case connectPlaced:
		check = pl.placeHosts(ctx, cc, now)
	case connectRedial:
		check = pl.installRedial(cc, avoidNodesFrom(ctx), caller, move, pay)
	default:
		return nil
	}
	if !pl.payDials(cc, pay, caller) || check == nil {
		return check
	}
	return func(ctx context.Context, pgConn *pgconn.PgConn) error {
		err := check(ctx, pgConn)
		if err == nil {
			pay.done.Store(true)
		}
		return err
	}
}

// dialTokens is what one connect's dials have paid: BeforeConnect took the
// first dial's token; a redial takes the next one before it refuses a
// connection (paid). Once placement accepted a connection (done) the
// connect is over: the connection's cancel requests dial with the same
// DialFunc, from other goroutines, and are not sessions.
type dialTokens struct {
	dials atomic.Int32
	paid  atomic.Bool
	done  atomic.Bool
}

// payDials makes every dial of a connect after the first have a connect
// token: pgconn dials the next host or copy of the address when an attempt
// fails, and a server that refused the session (57P01 while it starts or
// drains) has still counted it. A dial the redial did not pay for takes one
// here, waiting as the connect's first did (BeforeConnect), so the pool
// never opens more sessions than its budget, whatever the servers answer.
// It reports whether it did anything: not without a connect limit.
func (pl *placement) payDials(cc *pgx.ConnConfig, pay *dialTokens, caller bool) bool {
	dial := cc.DialFunc
	if dial == nil || pl.p.budget == nil || pl.p.budget.limiter == nil {
		return false
	}
	cc.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if pay.done.Load() {
			return dial(ctx, network, addr)
		}
		if pay.dials.Add(1) > 1 && !pay.paid.Swap(false) {
			if _, err := pl.p.budget.take(ctx, caller, nil); err != nil {
				return nil, err
			}
		}
		return dial(ctx, network, addr)
	}
	return true
}

// liveNodes returns, for connect-time decisions, each eligible node's
// connections (plus connects under way to it) and the targets those imply
// with extra more connections. unmappedHosts counts hosts of the connection
// string whose node is not known yet: each stands for a node in the targets,
// or a cold start would send everything to the first node it maps.
func (pl *placement) liveNodes(now time.Time, extra, unmappedHosts int) (map[NodeID]placementNode, int) {
	nodes := pl.p.tracker.nodeList()
	pl.mu.Lock()
	pl.purgeReservationsLocked(now)
	tracked := make(map[NodeID]bool, len(nodes))
	for _, n := range nodes {
		tracked[n.id] = true
	}
	pending := make(map[NodeID]int)
	for _, r := range pl.reservations {
		// The node behind the host now: a connect placed before its host
		// was mapped counts towards the node another connect has since
		// found there (0 while the host is unmapped, or mapped to a node
		// the pool does not track yet).
		id := pl.hostNodes[r.host]
		if !tracked[id] {
			id = 0
		}
		pending[id]++
	}
	unmapped := pending[0]
	behindHost := make(map[NodeID]bool, len(pl.hostNodes))
	for _, id := range pl.hostNodes {
		behindHost[id] = true
	}
	pl.mu.Unlock()

	info := make(map[NodeID]placementNode, len(nodes))
	total := extra + unmapped
	var eligible []NodeID
	// Caps (limits.go): a full node takes no more than it holds, any node
	// no more than the per-node cap.
	perNode := pl.p.limits.nodeCap()
	var caps map[NodeID]int
	setCap := func(id NodeID, c int) {
		if caps == nil {
			caps = make(map[NodeID]int)
		}
		caps[id] = c
	}
	scope := pl.p.localityScope(nodes, now)
	for _, n := range nodes {
		c := int(n.conns.Load()) + pending[n.id]
		total += c
		healthy := !n.evicted.Load() && !n.draining.Load()
		outside := healthy && !scope.in(n)
		ok := healthy && !outside
		if ok {
			eligible = append(eligible, n.id)
		}
		full := n.full(now)
		switch {
		case full:
			setCap(n.id, c)
		case perNode > 0:
			setCap(n.id, perNode)
			full = c >= perNode
		}
		info[n.id] = placementNode{Conns: c, Eligible: ok, Outside: outside, Full: full}
	}
	// An unmapped host stands for a node not met yet, unless the pool
	// knows an eligible node that no host maps to (a probe met it, or
	// its connections are gone): that node is the one behind such a host,
	// and a slot for both would lower every other node's target.
	for _, id := range eligible {
		if unmappedHosts > 0 && !behindHost[id] {
			unmappedHosts--
		}
	}
	for i := range unmappedHosts {
		eligible = append(eligible, NodeID(-1-i)) // never a real node ID
		if perNode > 0 {
			setCap(NodeID(-1-i), perNode)
		}
	}
	targets := cappedTargets(total, eligible, pl.p.seed, caps, pl.p.remainderSwaps()...)
	for id, t := range targets {
		n, ok := info[id]
		if !ok {
			continue
		}
		n.Target = t
		info[id] = n
	}
	return info, total
}

func (pl *placement) purgeReservationsLocked(now time.Time) {
	pl.reservations = slices.DeleteFunc(pl.reservations, func(r *reservation) bool { return now.After(r.until) })
}

// pendingConnects reports whether connects placed by the pool are under way.
func (pl *placement) pendingConnects(now time.Time) bool {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	pl.purgeReservationsLocked(now)
	return len(pl.reservations) > 0
}

// placeHosts reorders cc's hosts (Host and Fallbacks) so the connection goes
// to the least-connected healthy node first, and returns the check that
// records which node the connection reached.
func (pl *placement) placeHosts(ctx context.Context, cc *pgx.ConnConfig, now time.Time) pgconn.ValidateConnectFunc {
	groups := pl.groupsFor(cc)
	if len(groups) < 2 {
		return nil
	}
	pl.placeMu.Lock()
	defer pl.placeMu.Unlock()
	hostNodes := make([]NodeID, len(groups))
	unmapped := 0
	pl.mu.Lock()
	for i, g := range groups {
		hostNodes[i] = pl.hostNodes[g.key]
	}
	pl.mu.Unlock()
	for i, id := range hostNodes {
		// A host whose node the pool does not track yet (the BackendKey
		// named it at connect, AfterConnect has not counted it) counts as
		// unmapped: its connects under way are still its reservations.
		if id != 0 && pl.p.tracker.node(id) == nil {
			hostNodes[i] = 0
		}
		if hostNodes[i] == 0 {
			unmapped++
		}
	}
	info, _ := pl.liveNodes(now, 1, unmapped)
	for _, id := range avoidNodesFrom(ctx) {
		if n, ok := info[id]; ok {
			n.Avoid = true
			info[id] = n
		}
	}
	hostPending := make([]int, len(groups))
	hostDown := make([]bool, len(groups))
	pl.mu.Lock()
	for i, g := range groups {
		for _, r := range pl.reservations {
			if r.host == g.key {
				hostPending[i]++
			}
		}
		if t, ok := pl.downHosts[g.key]; ok {
			hostDown[i] = now.Sub(t) < hostDownFor
		}
		if c := pl.p.limits.nodeCap(); c > 0 && hostNodes[i] == 0 && hostPending[i] >= c {
			hostDown[i] = true // its node, whichever it is, would be at its cap
		}
	}
	order := placementOrder(hostNodes, hostPending, hostDown, info, pl.p.seed)
	first := groups[order[0]].key
	res := &reservation{host: first, until: now.Add(reservationTTL)}
	pl.reservations = append(pl.reservations, res)
	pl.mu.Unlock()

	setHosts(cc, groups, order)
	return func(_ context.Context, pgConn *pgconn.PgConn) error {
		pl.connected(res, first, pgConn)
		id := pl.p.nodeOf(pgConn)
		if id == 0 {
			id = pl.nodeBehind(remoteAddr(pgConn))
		}
		if !pl.p.holdCapSlot(id, pgConn, time.Now()) {
			pl.mu.Lock()
			res.capRefused = true
			pl.mu.Unlock()
			return errNodeAtCap // pgconn tries the next host
		}
		return nil
	}
}

// attempts lists the connection attempts of cc in pgconn's order: Host,
// then the Fallbacks. Several may share a host:port (sslmode=prefer's TLS
// and plain attempts).
func attempts(cc *pgx.ConnConfig) []*pgconn.FallbackConfig {
	return append([]*pgconn.FallbackConfig{{Host: cc.Host, Port: cc.Port, TLSConfig: cc.TLSConfig}}, cc.Fallbacks...)
}

// hostGroup is one host:port of a connection string with its attempts.
type hostGroup struct {
	key     string // host:port
	entries []*pgconn.FallbackConfig
}

// hostGroups splits cc's attempts by host:port, keeping the attempts of one
// host:port together, in their order.
func hostGroups(cc *pgx.ConnConfig) []*hostGroup {
	var groups []*hostGroup
	for _, fb := range attempts(cc) {
		key := hostPort(fb.Host, fb.Port)
		i := slices.IndexFunc(groups, func(g *hostGroup) bool { return g.key == key })
		if i < 0 {
			groups = append(groups, &hostGroup{key: key})
			i = len(groups) - 1
		}
		groups[i].entries = append(groups[i].entries, fb)
	}
	return groups
}

// groupsFor returns cc's host groups plus one for each node that gossip
// lists at an address the connection string does not name, with the first
// host's TLS settings, if the node is within the locality level in use. It
// adds nothing behind a single address: a client told to use a load
// balancer may not be able to reach the nodes directly.
func (pl *placement) groupsFor(cc *pgx.ConnConfig) []*hostGroup {
	groups := hostGroups(cc)
	if pl.mode != connectPlaced {
		return groups
	}
	inScope := pl.gossipScope()
	pl.mu.Lock()
	defer pl.mu.Unlock()
	known := make(map[NodeID]bool)
	for _, g := range groups {
		if id := pl.hostNodes[g.key]; id != 0 {
			known[id] = true
		}
	}
	for _, id := range slices.Sorted(maps.Keys(pl.gossipHosts)) {
		addr := pl.gossipHosts[id]
		host, portStr, err := net.SplitHostPort(addr)
		port, perr := strconv.ParseUint(portStr, 10, 16)
		if known[id] || err != nil || perr != nil {
			continue
		}
		if inScope != nil && !inScope(id) {
			continue // another region's node, say: dialled only in a fallback
		}
		key := hostPort(host, uint16(port))
		if slices.ContainsFunc(groups, func(g *hostGroup) bool { return g.key == key }) {
			continue
		}
		pl.hostNodes[key] = id
		groups = append(groups, &hostGroup{key: key, entries: []*pgconn.FallbackConfig{{Host: host, Port: uint16(port), TLSConfig: tlsFor(cc.TLSConfig, host)}}})
	}
	return groups
}

// probeOrder returns the order in which a probe tries groups (nil: as
// listed, for a single host): first the hosts of nodes the pool misses
// (missing, see Pool.missingNodes) and hosts not mapped to a node yet, then
// the others, rotated by n so every listed node is probed every len(groups)
// probes however connections are placed.
func (pl *placement) probeOrder(groups []*hostGroup, missing []NodeID, n int) []int {
	if len(groups) < 2 {
		return nil
	}
	pl.mu.Lock()
	aimed := make([]bool, len(groups))
	for i, g := range groups {
		id := pl.hostNodes[g.key]
		aimed[i] = id == 0 || slices.Contains(missing, id)
	}
	pl.mu.Unlock()
	order := make([]int, len(groups))
	for i := range order {
		order[i] = (n + i) % len(groups)
	}
	slices.SortStableFunc(order, func(a, b int) int {
		switch {
		case aimed[a] == aimed[b]:
			return 0
		case aimed[a]:
			return -1
		}
		return 1
	})
	return order
}

// tlsFor returns the TLS settings for dialling host with the settings tc
// that pgconn built for another host. sslmode=verify-full sets ServerName to
// the host it was parsed for, and a certificate must be checked against the
// name actually dialled, so the copy names host; the other modes leave
// ServerName empty (verify-ca checks the chain itself) and tc is shared.
func tlsFor(tc *tls.Config, host string) *tls.Config {
	if tc == nil || tc.ServerName == "" || tc.ServerName == host {
		return tc
	}
	c := tc.Clone()
	c.ServerName = host
	return c
}

// setHosts writes groups into cc in the given order.
func setHosts(cc *pgx.ConnConfig, groups []*hostGroup, order []int) {
	var sorted []*pgconn.FallbackConfig
	for _, i := range order {
		sorted = append(sorted, groups[i].entries...)
	}
	cc.Host, cc.Port, cc.TLSConfig = sorted[0].Host, sorted[0].Port, sorted[0].TLSConfig
	cc.Fallbacks = sorted[1:]
}

// sideConfig returns the connection config of a connection outside the pool
// (a probe, a health check's dial): the pool's connection config (same TLS,
// credentials, DialFunc), its host groups in the order order picks (nil, or
// an empty pick: as listed), then the user's BeforeConnect, which runs last
// as it does for the pool's own connects; its error is the hook's. The
// connection is neither placed, counted nor rate limited.
func (p *Pool) sideConfig(ctx context.Context, order func([]*hostGroup) []int) (*pgx.ConnConfig, error) {
	cc := p.config.ConnConfig.Copy()
	if order != nil {
		groups := p.placement.groupsFor(cc)
		if o := order(groups); len(o) > 0 {
			setHosts(cc, groups, o)
		}
	}
	if p.userBeforeConnect != nil {
		if err := p.userBeforeConnect(ctx, cc); err != nil {
			return nil, err
		}
	}
	return cc, nil
}

// connected moves the reservation a connect made to the address it reached
// and learns which node is behind that address. The reservation stays until
// AfterConnect has counted the connection (counted): dropping it here would
// leave the connection counted nowhere while AfterConnect identifies it, and
// a connect placed in that moment would pick the same node.
func (pl *placement) connected(res *reservation, reserved string, pgConn *pgconn.PgConn) {
	var addr string
	if remote := remoteAddr(pgConn); remote != "" {
		addr = addrKey(remote)
	}
	// 0 unless the connect alone tells: AfterConnect then identifies the
	// node, and learnHosts maps the address in the pool's own ID space.
	id := pl.p.nodeOf(pgConn)
	now := time.Now()
	var failed NodeID
	pl.mu.Lock()
	if addr != "" {
		res.host = addr
	}
	pgConn.CustomData()[reservationKey] = res
	if id != 0 && addr != "" {
		pl.hostNodes[addr] = id
	}
	// The first host was an address the connection would report as its
	// own, and the connection is elsewhere: dialling the first one failed.
	if host, _, err := net.SplitHostPort(reserved); err == nil && net.ParseIP(host) != nil && addr != "" && !res.capRefused {
		if addr != reserved {
			pl.downHosts[reserved] = now
			failed = pl.hostNodes[reserved]
		} else {
			delete(pl.downHosts, reserved)
		}
	}
	pl.mu.Unlock()
	if failed != 0 {
		// Refused, timed out, or turned away: the check tells a node that
		// is gone or silent from one that answers. Until then it is full
		// (limits.go): no target draws connections to it.
		pl.p.markFull(failed, now)
		pl.p.suspectNode(pl.p.tracker.node(failed))
	}
}

// counted drops the reservation of the connect that opened pgConn, once
// AfterConnect has counted the connection on its node (id) or failed it (id
// 0). With hosts listed it first maps the host the connection reached to
// id, in the same step: from then on the connection counts on the host
// through its node, where until then the reservation counted it. Left to
// the next balance round (learnHosts), the host would have looked emptier
// than it was to the connects placed meanwhile.
func (pl *placement) counted(pgConn *pgconn.PgConn, id NodeID) {
	releaseCapSlot(pgConn)
	res, _ := pgConn.CustomData()[reservationKey].(*reservation)
	if res == nil {
		return
	}
	delete(pgConn.CustomData(), reservationKey)
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if id != 0 && pl.mode == connectPlaced && res.host != "" && !res.capRefused {
		pl.hostNodes[res.host] = id
	}
	pl.reservations = slices.DeleteFunc(pl.reservations, func(r *reservation) bool { return r == res })
}

// reachedHost records that a connection (a probe) reached remote, so
// placement stops treating it as down.
func (pl *placement) reachedHost(remote string) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	delete(pl.downHosts, addrKey(remote))
}

// nodeBehind returns the node last seen behind the dialled address addr, or 0.
func (pl *placement) nodeBehind(addr string) NodeID {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	return pl.hostNodes[addrKey(addr)]
}

// remoteAddr returns the address pgConn is connected to ("ip:port"), or "".
func remoteAddr(pgConn *pgconn.PgConn) string {
	if nc := pgConn.Conn(); nc != nil && nc.RemoteAddr() != nil {
		return nc.RemoteAddr().String()
	}
	return ""
}

// addrKey writes a dialled address ("ip:port", "[v6]:port") the way
// hostGroups keys hosts, so the two compare.
func addrKey(remote string) string {
	host, port, err := net.SplitHostPort(remote)
	if err != nil {
		return remote
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return remote
	}
	return hostPort(host, uint16(p))
}

// learnHosts maps the listed addresses to nodes from the pool's connections
// (the query identity reveals the node only after ValidateConnect), and
// forgets addresses of nodes that are neither tracked nor listed by gossip,
// so the map stays bounded by the cluster's current size.
func (pl *placement) learnHosts(nodes []*node) {
	if pl.mode != connectPlaced {
		return // behind one address every connection has the same host
	}
	seen := make(map[string]NodeID)
	tracked := make(map[NodeID]bool, len(nodes))
	for _, n := range nodes {
		tracked[n.id] = true
		n.mu.Lock()
		for cs := range n.connSet {
			if cs.host != "" {
				seen[addrKey(cs.host)] = n.id
			}
		}
		n.mu.Unlock()
	}
	pl.mu.Lock()
	defer pl.mu.Unlock()
	for host, id := range seen {
		pl.hostNodes[host] = id
	}
	maps.DeleteFunc(pl.hostNodes, func(_ string, id NodeID) bool {
		_, listed := pl.gossipHosts[id]
		return !tracked[id] && !listed
	})
}

// unmappedHosts counts the connection string's hosts whose node is not
// known yet.
func (pl *placement) unmappedHosts() int {
	groups := hostGroups(pl.p.config.ConnConfig)
	pl.mu.Lock()
	defer pl.mu.Unlock()
	k := 0
	for _, g := range groups {
		if pl.hostNodes[g.key] == 0 {
			k++
		}
	}
	return k
}
