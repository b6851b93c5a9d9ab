package clusterpool

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"
)

// This file holds the balancing decisions: how many connections each node
// should hold, which nodes shed connections in a round, the order in which a
// new connection tries the listed hosts, and the connect-rate limiter. The
// decisions are pure functions of their inputs (counts, health, now) so they
// are tested without a cluster or a clock; the loop that applies them is thin.

// nodeView is what one balancing decision knows about a node.
type nodeView struct {
	ID NodeID
	// Conns is the number of the pool's connections open on the node, in
	// use or idle, not counting those already marked to retire.
	Conns int
	// Eligible means the node may hold connections: it is healthy, not
	// draining, and has been seen within the expiry window.
	Eligible bool
	// Refillable means a new connection can be expected to reach the node
	// soon: it holds connections or something saw it recently. A node that
	// is eligible but not refillable (it may have just gone away, and only
	// expiry will tell) counts in the targets but never causes pruning,
	// because pruning for it would only move connections between the others.
	Refillable bool
}

// balanceTargets spreads poolSize connections over the nodes: every node gets
// poolSize/len(nodes) and the remainder goes to the nodes that rank first by a
// hash of (seed, node ID). The seed is chosen once per pool, so the choice is
// stable over time (no rotation that keeps moving connections) and stable when
// other nodes join or leave (rendezvous hashing), yet many client pools with
// different seeds do not all give the extra connection to the same node, which
// would make that node hot cluster-wide.
//
// Targets sum to poolSize and differ by at most one. The result is nil when
// nodes is empty.
func balanceTargets(poolSize int, nodes []NodeID, seed uint64) map[NodeID]int {
	if len(nodes) == 0 {
		return nil
	}
	poolSize = max(poolSize, 0)
	base, rem := poolSize/len(nodes), poolSize%len(nodes)
	targets := make(map[NodeID]int, len(nodes))
	for _, id := range nodes {
		targets[id] = base
	}
	if rem == 0 {
		return targets
	}
	ranked := slices.Clone(nodes)
	slices.SortFunc(ranked, func(a, b NodeID) int {
		if c := cmp.Compare(nodeRank(seed, b), nodeRank(seed, a)); c != 0 {
			return c
		}
		return cmp.Compare(a, b)
	})
	for _, id := range ranked[:rem] {
		targets[id]++
	}
	return targets
}

// nodeRank is the rendezvous-hash score of a node for one pool's seed.
func nodeRank(seed uint64, id NodeID) uint64 {
	// splitmix64 finaliser: cheap, well mixed, no allocation.
	z := seed ^ (uint64(id) * 0x9e3779b97f4a7c15)
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// balancePlan is the outcome of one balancing round.
type balancePlan struct {
	// Targets holds the target of every eligible node.
	Targets map[NodeID]int
	// Prune says how many connections to retire per node this round.
	Prune map[NodeID]int
}

// planBalance decides one round. The pool's current size (the sum of Conns)
// is spread over the eligible nodes; see [balanceTargets] and [planPrune].
func planBalance(nodes []nodeView, seed uint64) balancePlan {
	size := 0
	var eligible []NodeID
	for _, n := range nodes {
		size += n.Conns
		if n.Eligible {
			eligible = append(eligible, n.ID)
		}
	}
	targets := balanceTargets(size, eligible, seed)
	return balancePlan{Targets: targets, Prune: planPrune(nodes, targets)}
}

// planPrune says how many connections each node sheds this round. nodes must
// list every eligible node, with Conns 0 where it holds none.
//
// An eligible node above its target sheds about half of its excess,
// ceil(excess/2) and at least one: a multiplicative decrease of the distance
// to the target, so a large imbalance closes in a few rounds while the last
// connection or two, where overshooting would oscillate, move one at a time.
// A node that is not eligible (unhealthy, draining or expired) sheds all its
// connections: no target keeps them there.
//
// Pruning only moves connections if the replacement can land on a node below
// its target, so nothing is pruned unless some refillable node is below its
// target; and an eligible node sheds only if it holds at least two more than
// that under-filled node, since moving one connection between nodes that
// differ by one only swaps which of them holds the extra one.
func planPrune(nodes []nodeView, targets map[NodeID]int) map[NodeID]int {
	minUnder, deficit := math.MaxInt, 0
	for _, n := range nodes {
		t, ok := targets[n.ID]
		if !ok || !n.Eligible || !n.Refillable || n.Conns >= t {
			continue
		}
		minUnder = min(minUnder, n.Conns)
		deficit += t - n.Conns
	}
	if deficit == 0 {
		return nil
	}
	var prune map[NodeID]int
	add := func(id NodeID, k int) {
		if k <= 0 {
			return
		}
		if prune == nil {
			prune = make(map[NodeID]int)
		}
		prune[id] = k
	}
	for _, n := range nodes {
		if n.Conns == 0 {
			continue
		}
		t, ok := targets[n.ID]
		if !n.Eligible || !ok {
			add(n.ID, n.Conns)
			continue
		}
		excess := n.Conns - t
		if excess <= 0 || n.Conns-minUnder < 2 {
			continue
		}
		add(n.ID, (excess+1)/2)
	}
	return prune
}

// isBalanced reports whether the eligible nodes' counts differ by at most one
// and no ineligible node holds connections. Tests and the report use it.
func isBalanced(counts map[NodeID]int, eligible []NodeID) bool {
	if len(eligible) == 0 {
		return true
	}
	lo, hi := math.MaxInt, math.MinInt
	for _, id := range eligible {
		lo, hi = min(lo, counts[id]), max(hi, counts[id])
	}
	for id, c := range counts {
		if c > 0 && !slices.Contains(eligible, id) {
			return false
		}
	}
	return hi-lo <= 1
}

// jitter returns d scaled by a factor in [0.8, 1.2) chosen by u in [0, 1), so
// that many clients started together do not balance or probe in lockstep.
func jitter(d time.Duration, u float64) time.Duration {
	return time.Duration(float64(d) * (0.8 + 0.4*u))
}

// newConnectLimiter returns the limiter for new connections, or nil when
// perSecond is 0 or +Inf (no limit). The burst is at least the pool's MaxConns
// so a cold start fills the pool at once; what it slows are reconnect storms,
// such as a whole pool reconnecting after a node restart. The token is taken
// in BeforeConnect with the caller's context, before dialling and without any
// lock held, so a waiting connect delays only itself.
func newConnectLimiter(perSecond float64, burst int) *rate.Limiter {
	if perSecond <= 0 || math.IsInf(perSecond, 1) || math.IsNaN(perSecond) {
		return nil
	}
	burst = max(burst, int(math.Ceil(perSecond)), 1)
	return rate.NewLimiter(rate.Limit(perSecond), burst)
}

// placementNode is what ordering the hosts of a new connection knows about
// the node behind one host.
type placementNode struct {
	Conns    int  // the pool's connections on the node, including dials under way
	Target   int  // the node's balancing target
	Eligible bool // healthy, not draining, not expired
	Avoid    bool // the caller asked to stay away (a retry after a failure there)
}

// placementOrder returns the order in which a new connection tries the hosts
// of the connection string. hostNodes[i] is the node last seen behind host i,
// or 0 if no connection has reached that host yet.
//
// First come hosts whose node is below target, most under-filled first; then
// hosts not mapped yet (trying them is how a node listed in the connection
// string is learned); then hosts whose node is at or above target, least
// loaded first; last, hosts whose node is unhealthy, draining, expired or to
// be avoided. No host is dropped: when everything better fails, pgconn still
// falls back to them. Ties are broken by a per-pool hash of the host's
// position, so different pools do not all prefer the same host.
//
// hostPending[i] (may be nil) counts connects under way to host i; unmapped
// hosts with fewer of them come first, so a cold start spreads over the hosts
// before any of them is mapped.
//
// hostDown[i] (may be nil) marks a host whose last dial failed recently; it
// goes last, with the unhealthy ones.
func placementOrder(hostNodes []NodeID, hostPending []int, hostDown []bool, nodes map[NodeID]placementNode, seed uint64) []int {
	order := make([]int, len(hostNodes))
	for i := range order {
		order[i] = i
	}
	class := func(i int) int {
		if hostDown != nil && hostDown[i] {
			return 3
		}
		id := hostNodes[i]
		if id == 0 {
			return 1
		}
		n, ok := nodes[id]
		switch {
		case !ok || !n.Eligible || n.Avoid:
			return 3
		case n.Conns < n.Target:
			return 0
		default:
			return 2
		}
	}
	slices.SortStableFunc(order, func(a, b int) int {
		ca, cb := class(a), class(b)
		if c := cmp.Compare(ca, cb); c != 0 {
			return c
		}
		if ca == 1 && hostPending != nil {
			if c := cmp.Compare(hostPending[a], hostPending[b]); c != 0 {
				return c
			}
		}
		if ca == 0 || ca == 2 {
			na, nb := nodes[hostNodes[a]], nodes[hostNodes[b]]
			if c := cmp.Compare(na.Conns-na.Target, nb.Conns-nb.Target); c != 0 {
				return c
			}
			if c := cmp.Compare(na.Conns, nb.Conns); c != 0 {
				return c
			}
		}
		return cmp.Compare(nodeRank(seed, NodeID(a+1)), nodeRank(seed, NodeID(b+1)))
	})
	return order
}

// Placement and redial settings.
const (
	// maxRedials bounds how often a connection that landed on an over-target
	// node behind a single load-balancer address is refused and dialled again.
	maxRedials = 3
	// reservationTTL bounds how long a connect under way counts towards the
	// node placement chose for it; a connect that fails never reports back.
	reservationTTL = 10 * time.Second
	// closeTimeout bounds closing a pruned connection (a Terminate message).
	closeTimeout = time.Second
	// refillWait is how long after pruning a pool below MinConns is taken
	// to be refilling (pgxpool waits 500 ms, then dials).
	refillWait = 3 * time.Second
	// hostDownFor is how long a listed host whose dial failed is tried last.
	hostDownFor = 30 * time.Second
	// aliveCheckTimeout is how long checking an idle connection for a
	// server-side close waits for bytes that are not expected to come.
	aliveCheckTimeout = time.Millisecond
)

// balancer applies the decisions above to a Pool: it takes the connect-rate
// token and orders hosts in BeforeConnect, refuses over-target connections in
// ValidateConnect behind a single address, and prunes every BalanceInterval.
type balancer struct {
	p       *Pool
	seed    uint64        // chosen once per pool; see balanceTargets
	limiter *rate.Limiter // nil: no limit
	// place reorders the connection string's hosts (several hosts); redial
	// refuses over-target connections and dials again (one address, with
	// node identity from the BackendKey, so no query is needed to decide).
	place  bool
	redial atomic.Bool // fixed at creation; atomic so the report can compare
	// health checks nodes suspected of not answering (health.go).
	health *healthChecker

	// Counters for tests and the README's numbers.
	rounds  atomic.Int64 // balancing rounds run
	probes  atomic.Int64 // probe connections the server accepted
	redials atomic.Int64 // connections refused by ValidateConnect

	lastPrune atomic.Int64 // unix nanoseconds of the last round that pruned

	// Starting the loops (start, startOnTracked); ready and wanted are
	// protected by Pool.bgMu. ready: the pgxpool exists, so the loops may
	// run; wanted: a connection was tracked before that.
	started       atomic.Bool
	ready, wanted bool

	mu sync.Mutex // protects the fields below
	// hostNodes maps a dialled address ("ip:port") to the node behind it,
	// learned from connections; bounded by the number of hosts dialled.
	hostNodes map[string]NodeID
	// gossipHosts are the addresses of live nodes read from CockroachDB's
	// gossip tables, replaced on every read. With several hosts in the
	// connection string they are dialled too, so a node added to the
	// cluster after the pool started is reachable; see groupsFor.
	gossipHosts map[NodeID]string
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
}

// reservationKey is where a new connection's CustomData holds the
// reservation its connect made, for counted to drop.
const reservationKey = "clusterpool.reservation"

func newBalancer(p *Pool) *balancer {
	s := p.settings
	b := &balancer{
		p:         p,
		seed:      rand.Uint64(),
		limiter:   newConnectLimiter(s.connectRate, s.connectBurst),
		hostNodes: make(map[string]NodeID),
		downHosts: make(map[string]time.Time),
	}
	if p.tracking() {
		b.health = newHealthChecker(p)
		p.tracker.suspect = p.callCut
		b.place = s.multiHost
		b.redial.Store(!s.multiHost && s.identifyNode == nil &&
			(s.identity == NodeIdentityAuto || s.identity == NodeIdentityBackendKey))
	}
	return b
}

// install chains the balancer's BeforeConnect in front of the user's, which
// runs last and so may still override the host order (and the connect
// timeout). When nodes are tracked it also wraps ShouldPing, so that a
// connection whose acquire-time ping fails gets its node checked
// (health.go); the user's ShouldPing, if any, still decides.
func (b *balancer) install(cfg *pgxpool.Config) {
	if b.health != nil {
		cfg.ShouldPing = chainShouldPing(cfg.ShouldPing)
	}
	user := cfg.BeforeConnect
	cfg.BeforeConnect = func(ctx context.Context, cc *pgx.ConnConfig) error {
		if err := b.beforeConnect(ctx, cc); err != nil {
			return err
		}
		if user != nil {
			return user(ctx, cc)
		}
		return nil
	}
}

// start runs the balancing loop, the probe and the health checker until the
// pool closes. With one host and an identity read from the BackendKey
// (auto, backend_key) the server may be plain PostgreSQL, which identifies
// no node: the pool is then pgxpool, with no goroutine and no sweep of its
// idle connections, so the loops wait for the first connection that is
// tracked on a node (startOnTracked). Called once the pgxpool exists.
func (b *balancer) start() {
	if !b.p.tracking() {
		return
	}
	b.p.bgMu.Lock()
	defer b.p.bgMu.Unlock()
	b.ready = true
	if b.lazyStart() && !b.wanted {
		return
	}
	b.startLocked()
}

// lazyStart reports whether the loops wait for a tracked connection.
func (b *balancer) lazyStart() bool {
	s := b.p.settings
	return !s.multiHost && s.identifyNode == nil &&
		(s.identity == NodeIdentityAuto || s.identity == NodeIdentityBackendKey)
}

// startOnTracked starts the loops if they wait for a tracked connection,
// which AfterConnect has just counted. After the first time it costs a lock.
func (b *balancer) startOnTracked() {
	if b.started.Load() {
		return
	}
	b.p.bgMu.Lock()
	defer b.p.bgMu.Unlock()
	b.wanted = true
	if b.ready { // else start, under way in NewWithConfig, sees wanted
		b.startLocked()
	}
}

// startLocked starts the loops once; the caller holds Pool.bgMu.
func (b *balancer) startLocked() {
	if b.p.bgClosed || b.started.Load() {
		return
	}
	b.started.Store(true)
	b.p.goBackground(b.run)
	b.p.goBackground(b.p.runProbe)
	b.p.goBackground(b.health.run)
}

// beforeConnect takes a connect-rate token, without any lock held, then
// places the connection. Without a connect_timeout of the user's, each host
// gets DefaultConnectTimeout: pgxpool runs connects under
// its own context, not the acquirer's, so a connect to a node that accepts
// TCP and never answers would otherwise hold a pool slot for pgxpool's
// 2 minutes, and with hosts listed pgconn moves on to the next host only
// when the timeout ends the attempt.
func (b *balancer) beforeConnect(ctx context.Context, cc *pgx.ConnConfig) error {
	if b.p.config.ConnConfig.ConnectTimeout <= 0 {
		cc.ConnectTimeout = DefaultConnectTimeout
	}
	if b.limiter != nil {
		if err := b.p.obs.waitConnect(ctx, b.limiter); err != nil {
			return fmt.Errorf("clusterpool: waiting for the connect rate limit (%g/s): %w", float64(b.limiter.Limit()), err)
		}
	}
	if b.p.tracking() {
		// Stamped after the rate-limit wait: the dial starts now.
		stampConnectStart(cc, time.Now())
	}
	switch {
	case b.place:
		b.placeHosts(ctx, cc, time.Now())
	case b.redial.Load():
		b.installRedial(cc, avoidNodesFrom(ctx))
	}
	b.p.bindCancelDials(cc)
	return nil
}

// liveNodes returns, for connect-time decisions, each eligible node's
// connections (plus connects under way to it) and the targets those imply
// with extra more connections. unmappedHosts counts hosts of the connection
// string whose node is not known yet: each stands for a node in the targets,
// or a cold start would send everything to the first node it maps.
func (b *balancer) liveNodes(now time.Time, extra, unmappedHosts int) (map[NodeID]placementNode, int) {
	nodes := b.p.tracker.nodeList()
	b.mu.Lock()
	b.purgeReservationsLocked(now)
	pending := make(map[NodeID]int)
	for _, r := range b.reservations {
		// The node behind the host now: a connect placed before its host
		// was mapped counts towards the node another connect has since
		// found there (0 while the host is still unmapped).
		pending[b.hostNodes[r.host]]++
	}
	unmapped := pending[0]
	b.mu.Unlock()

	info := make(map[NodeID]placementNode, len(nodes))
	total := extra + unmapped
	var eligible []NodeID
	for _, n := range nodes {
		c := int(n.conns.Load()) + pending[n.id]
		total += c
		ok := !n.evicted.Load() && !n.draining.Load()
		if ok {
			eligible = append(eligible, n.id)
		}
		info[n.id] = placementNode{Conns: c, Eligible: ok}
	}
	for i := range unmappedHosts {
		eligible = append(eligible, NodeID(-1-i)) // never a real node ID
	}
	targets := balanceTargets(total, eligible, b.seed)
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

func (b *balancer) purgeReservationsLocked(now time.Time) {
	b.reservations = slices.DeleteFunc(b.reservations, func(r *reservation) bool { return now.After(r.until) })
}

// placeHosts reorders cc's hosts (Host and Fallbacks) so the connection goes
// to the least-connected healthy node first. Entries with the same host:port
// (sslmode=prefer's TLS and plain attempts) stay together, in their order.
func (b *balancer) placeHosts(ctx context.Context, cc *pgx.ConnConfig, now time.Time) {
	groups := b.groupsFor(cc)
	if len(groups) < 2 {
		return
	}
	hostNodes := make([]NodeID, len(groups))
	unmapped := 0
	b.mu.Lock()
	for i, g := range groups {
		hostNodes[i] = b.hostNodes[g.key]
		if hostNodes[i] == 0 {
			unmapped++
		}
	}
	b.mu.Unlock()
	info, _ := b.liveNodes(now, 1, unmapped)
	for _, id := range avoidNodesFrom(ctx) {
		if n, ok := info[id]; ok {
			n.Avoid = true
			info[id] = n
		}
	}
	hostPending := make([]int, len(groups))
	hostDown := make([]bool, len(groups))
	b.mu.Lock()
	for i, g := range groups {
		for _, r := range b.reservations {
			if r.host == g.key {
				hostPending[i]++
			}
		}
		if t, ok := b.downHosts[g.key]; ok {
			hostDown[i] = now.Sub(t) < hostDownFor
		}
	}
	order := placementOrder(hostNodes, hostPending, hostDown, info, b.seed)
	first := groups[order[0]].key
	res := &reservation{host: first, until: now.Add(reservationTTL)}
	b.reservations = append(b.reservations, res)
	b.mu.Unlock()

	setHosts(cc, groups, order)
	b.chainValidate(cc, func(ctx context.Context, pgConn *pgconn.PgConn) error {
		b.connected(res, first, pgConn)
		return nil
	})
}

// hostGroup is one host:port of a connection string with its attempts.
type hostGroup struct {
	key     string // host:port
	entries []*pgconn.FallbackConfig
}

// hostGroups splits cc's Host and Fallbacks by host:port. Entries with the
// same host:port (sslmode=prefer's TLS and plain attempts) stay together, in
// their order.
func hostGroups(cc *pgx.ConnConfig) []*hostGroup {
	var groups []*hostGroup
	all := append([]*pgconn.FallbackConfig{{Host: cc.Host, Port: cc.Port, TLSConfig: cc.TLSConfig}}, cc.Fallbacks...)
	for _, fb := range all {
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
// host's TLS settings. It adds nothing behind a single address: a client told
// to use a load balancer may not be able to reach the nodes directly.
func (b *balancer) groupsFor(cc *pgx.ConnConfig) []*hostGroup {
	groups := hostGroups(cc)
	if !b.place {
		return groups
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	known := make(map[NodeID]bool)
	for _, g := range groups {
		if id := b.hostNodes[g.key]; id != 0 {
			known[id] = true
		}
	}
	for _, id := range slices.Sorted(maps.Keys(b.gossipHosts)) {
		addr := b.gossipHosts[id]
		host, portStr, err := net.SplitHostPort(addr)
		port, perr := strconv.ParseUint(portStr, 10, 16)
		if known[id] || err != nil || perr != nil {
			continue
		}
		key := hostPort(host, uint16(port))
		if slices.ContainsFunc(groups, func(g *hostGroup) bool { return g.key == key }) {
			continue
		}
		b.hostNodes[key] = id
		groups = append(groups, &hostGroup{key: key, entries: []*pgconn.FallbackConfig{{Host: host, Port: uint16(port), TLSConfig: tlsFor(cc.TLSConfig, host)}}})
	}
	return groups
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

// connected moves the reservation a connect made to the address it reached
// and learns which node is behind that address. The reservation stays until
// AfterConnect has counted the connection (counted): dropping it here would
// leave the connection counted nowhere while AfterConnect identifies it, and
// a connect placed in that moment would pick the same node.
func (b *balancer) connected(res *reservation, reserved string, pgConn *pgconn.PgConn) {
	var addr string
	if nc := pgConn.Conn(); nc != nil && nc.RemoteAddr() != nil {
		addr = addrKey(nc.RemoteAddr().String())
	}
	var id NodeID
	if isCockroachDB(pgConn) && b.p.cockroachIDs() {
		// Otherwise AfterConnect identifies the node and learnHosts maps
		// the address, in the pool's own ID space.
		id = DecodeProcessID(pgConn.PID())
	}
	now := time.Now()
	var failed NodeID
	b.mu.Lock()
	if addr != "" {
		res.host = addr
	}
	pgConn.CustomData()[reservationKey] = res
	if id != 0 && addr != "" {
		b.hostNodes[addr] = id
	}
	// The first host was an address the connection would report as its
	// own, and the connection is elsewhere: dialling the first one failed.
	if host, _, err := net.SplitHostPort(reserved); err == nil && net.ParseIP(host) != nil && addr != "" {
		if addr != reserved {
			b.downHosts[reserved] = now
			failed = b.hostNodes[reserved]
		} else {
			delete(b.downHosts, reserved)
		}
	}
	b.mu.Unlock()
	if failed != 0 {
		// Refused, timed out, or turned away: the check tells a node that
		// is gone or silent from one that answers.
		b.p.suspectNode(b.p.tracker.node(failed))
	}
}

// counted drops the reservation of the connect that opened pgConn, once
// AfterConnect has counted the connection on its node or failed it.
func (b *balancer) counted(pgConn *pgconn.PgConn) {
	res, _ := pgConn.CustomData()[reservationKey].(*reservation)
	if res == nil {
		return
	}
	delete(pgConn.CustomData(), reservationKey)
	b.mu.Lock()
	defer b.mu.Unlock()
	b.reservations = slices.DeleteFunc(b.reservations, func(r *reservation) bool { return r == res })
}

// reached records that a connection (a probe) reached remote, so placement
// stops treating it as down.
func (b *balancer) reached(remote string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.downHosts, addrKey(remote))
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

// learnHosts maps addresses to nodes from the pool's connections (the
// query identity reveals the node only after ValidateConnect), and forgets
// addresses of nodes that are neither tracked nor listed by gossip, so the
// map stays bounded by the cluster's current size.
func (b *balancer) learnHosts(nodes []*node) {
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
	b.mu.Lock()
	defer b.mu.Unlock()
	for host, id := range seen {
		b.hostNodes[host] = id
	}
	maps.DeleteFunc(b.hostNodes, func(_ string, id NodeID) bool {
		_, listed := b.gossipHosts[id]
		return !tracked[id] && !listed
	})
}

// chainValidate runs v, then the ValidateConnect already on cc (for example
// target_session_attrs').
func (b *balancer) chainValidate(cc *pgx.ConnConfig, v pgconn.ValidateConnectFunc) {
	prev := cc.ValidateConnect
	cc.ValidateConnect = func(ctx context.Context, pgConn *pgconn.PgConn) error {
		if err := v(ctx, pgConn); err != nil {
			return err
		}
		if prev != nil {
			return prev(ctx, pgConn)
		}
		return nil
	}
}

// errOverTarget refuses a connection in ValidateConnect so pgconn dials the
// next (identical) fallback. It never reaches the caller: the last attempt is
// always accepted.
var errOverTarget = errors.New("clusterpool: node is above its connection target; dialling again")

// installRedial adds maxRedials copies of the address's attempts as fallbacks
// and a ValidateConnect that refuses a connection landing on a node in avoid
// (the nodes a retry already failed on) or on a node that overTarget says
// should not take it. The last copy is always accepted, so the load
// balancer's choice stands after maxRedials refusals.
// Behind a random balancer each dial is a fresh draw: this reaches the
// under-filled node in fewer balancing rounds for the same number of
// connections opened (see the README's numbers).
func (b *balancer) installRedial(cc *pgx.ConnConfig, avoid []NodeID) {
	// Repeat the whole list of attempts, not just the first: with
	// sslmode=prefer it is a TLS attempt and then a plain one, and against a
	// server without TLS copies of the first alone would be dials that fail.
	all := append([]*pgconn.FallbackConfig{{Host: cc.Host, Port: cc.Port, TLSConfig: cc.TLSConfig}}, cc.Fallbacks...)
	fallbacks := make([]*pgconn.FallbackConfig, 0, len(all)*(maxRedials+1))
	fallbacks = append(fallbacks, cc.Fallbacks...)
	for range maxRedials {
		for _, fb := range all {
			c := *fb
			fallbacks = append(fallbacks, &c)
		}
	}
	cc.Fallbacks = fallbacks
	attempt := 0 // pgconn tries the fallbacks one after another
	b.chainValidate(cc, func(ctx context.Context, pgConn *pgconn.PgConn) error {
		attempt++
		if attempt > maxRedials || !isCockroachDB(pgConn) {
			return nil
		}
		now := time.Now()
		// A redial is a new connection for the server too: it needs a token
		// of its own, and without one the connection is kept.
		id := DecodeProcessID(pgConn.PID())
		if (slices.Contains(avoid, id) || b.overTarget(id, now)) && (b.limiter == nil || b.limiter.AllowN(now, 1)) {
			b.redials.Add(1)
			return errOverTarget
		}
		return nil
	})
}

// overTarget reports whether a new connection on node id should be refused:
// the node is draining, or it would be above its target while another
// eligible node that can take it is below target and
// holds at least two fewer: as in planPrune, moving a connection between
// nodes one apart only swaps which holds the extra one, and refusing such
// connections during a cold start, when every count lags behind the dials
// under way, costs more dials than the balancer's rounds do later.
func (b *balancer) overTarget(id NodeID, now time.Time) bool {
	info, _ := b.liveNodes(now, 1, 0)
	n, ok := info[id]
	if !ok {
		return false // a node nobody has seen yet is below any target
	}
	if !n.Eligible {
		// Draining: the next round would retire the connection, so dial
		// again if any other node may take it. Evicted: a connect is proof
		// of health (it ends the eviction), so keep it.
		if nd := b.p.tracker.node(id); nd == nil || !nd.draining.Load() {
			return false
		}
		return slices.ContainsFunc(slices.Collect(maps.Values(info)), func(o placementNode) bool { return o.Eligible })
	}
	if n.Conns < n.Target {
		return false
	}
	refill := b.refillWindow()
	for oid, o := range info {
		if oid == id || !o.Eligible || o.Conns >= o.Target || o.Conns > n.Conns-2 {
			continue
		}
		if o.Conns > 0 || b.recentlySeen(oid, now, refill) {
			return true
		}
	}
	return false
}

func (b *balancer) recentlySeen(id NodeID, now time.Time, within time.Duration) bool {
	n := b.p.tracker.node(id)
	return n != nil && now.Sub(time.Unix(0, n.lastSeen.Load())) <= within
}

// refillWindow is how long after a node was last seen a new connection can
// be expected to reach it. Behind a random load balancer a live node without
// connections is seen about every N probes; a node that just went away stays
// refillable this long, so a short window limits pruning for nothing.
func (b *balancer) refillWindow() time.Duration {
	return 2 * max(b.p.settings.balanceInterval, b.p.settings.probeInterval)
}

// run is the balancing loop: one round every BalanceInterval ±20%.
func (b *balancer) run(ctx context.Context) {
	timer := time.NewTimer(jitter(b.p.settings.balanceInterval, rand.Float64()))
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		b.round(ctx, time.Now())
		timer.Reset(jitter(b.p.settings.balanceInterval, rand.Float64()))
	}
}

// round is one balancing round: refresh what is known about the nodes, plan,
// and retire connections per the plan.
func (b *balancer) round(ctx context.Context, now time.Time) balancePlan {
	b.rounds.Add(1)
	t := b.p.tracker
	for _, s := range t.snapshot() { // also forgets connections closed behind the pool's back
		if s.TotalConns > 0 {
			t.seen(s.ID, now) // an open connection is proof of life
		}
	}
	nodes := t.nodeList()
	b.p.obs.nodesRemoved(t.expire(now, expiryWindow(b.p.settings.balanceInterval, b.p.settings.probeInterval, max(len(nodes), 1))))
	nodes = t.nodeList()
	b.learnHosts(nodes)

	refill := b.refillWindow()
	views := make([]nodeView, 0, len(nodes))
	for _, n := range nodes {
		conns := int(n.conns.Load()) - n.markedToRetire()
		views = append(views, nodeView{
			ID:         n.id,
			Conns:      max(conns, 0),
			Eligible:   !n.evicted.Load() && !n.draining.Load(),
			Refillable: conns > 0 || now.Sub(time.Unix(0, n.lastSeen.Load())) <= refill,
		})
	}
	plan := planBalance(views, b.seed)
	if b.settling(now) {
		// Connections are being opened (a refill after the last round): their
		// nodes are not known yet, so pruning now would overshoot.
		plan.Prune = nil
	}
	if len(plan.Prune) > 0 {
		b.lastPrune.Store(now.UnixNano())
	}
	b.retire(ctx, plan.Prune, now)
	b.p.obs.pruned(ctx, nodes, views)
	return plan
}

// settling reports whether connections are being opened right now, or
// soon: pgxpool starts refilling to MinConns 500 ms after a pruned connection
// is destroyed. Below MinConns for long after the last prune (connections
// destroyed without a refill, as eviction does), the pool is balanced at
// the size it has rather than not at all.
func (b *balancer) settling(now time.Time) bool {
	st := b.p.pool.Stat()
	if st.ConstructingConns() > 0 {
		return true
	}
	if st.TotalConns() < b.p.config.MinConns && now.Sub(time.Unix(0, b.lastPrune.Load())) < refillWait {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.purgeReservationsLocked(now)
	return len(b.reservations) > 0
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

// retire closes prune[id] connections of each node, idle ones at once, and
// marks in-use ones to be refused at their next acquire. It also checks the
// other idle connections for a close by the server (a node that went away
// leaves idle connections that look open until used).
//
// A pruned idle connection is closed (Terminate) and then released: pgxpool
// destroys a closed connection on release and starts its health check, which
// tops the pool up to MinConns through BeforeConnect, i.e. placement.
func (b *balancer) retire(ctx context.Context, prune map[NodeID]int, now time.Time) {
	remaining := maps.Clone(prune)
	conns := b.p.sweepIdle(ctx)
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
					b.p.tracker.recordFailure(cs.node.id, now)
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
		n := b.p.tracker.node(id)
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
