package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Probe settings.
const (
	// maxProbeTimeout bounds one probe (connect, identify, gossip query).
	maxProbeTimeout = 5 * time.Second
	// unidentifiedProbes is how many probes in a row may reach a server that
	// has no node identity (plain PostgreSQL behind one address) before the
	// probe stops for good: there is nothing to discover.
	unidentifiedProbes = 3
	// gossipReadTimeout bounds reading gossip over a pool connection.
	gossipReadTimeout = 2 * time.Second
	// gossipBackoff is how long the probe stops asking for the gossip tables
	// after it was not allowed to read them (or they do not exist).
	gossipBackoff = 10 * time.Minute
)

// gossipQuery reads CockroachDB's view of the cluster. It needs the
// VIEWCLUSTERMETADATA privilege (or admin); without it the probe falls back
// silently to what connections and probes see.
const gossipQuery = `SELECT l.node_id, l.draining, COALESCE(l.membership, 'active'), COALESCE(n.is_live, false), COALESCE(n.address, ''), COALESCE(n.locality, '')
FROM crdb_internal.gossip_liveness AS l LEFT JOIN crdb_internal.gossip_nodes AS n ON n.node_id = l.node_id`

// probeState is the probe loop's memory between probes; only the loop
// goroutine touches it.
type probeState struct {
	n             int          // session probes started; rotates the first host
	unidentified  int          // probes in a row that found no node identity
	gossipAfter   time.Time    // do not query gossip before this
	gossipRead    time.Time    // when gossip was last read over an idle connection
	reached       NodeID       // the node the last session probe reached (0: none)
	draws         int          // connections the last session probe landed, refused ones included
	sessionsAfter time.Time    // do not read the sessions before this
	sessionsRead  time.Time    // when the sessions were last read
	backoff       probeBackoff // when the next session probe is due
	// landings is the tracker's landings at the end of the last tick: more
	// at this tick means connections of the pool's own landed since.
	landings uint64
	// aimMissed counts the aimed probes in a row that reached none of the
	// nodes they aimed at, aimedAt, and sinceAim the session probes since
	// the last aimed one (aimNow).
	aimMissed, sinceAim int
	aimedAt             []NodeID
}

// aim returns the nodes a session probe about to run aims at, the pool
// missing missing: missing, or, when spaced (behind one address, with
// every node in missing one the pool lost: Pool.missing), none while aimed
// probes are spaced out (aimNow). A node missed that the last aimed probe did not aim
// at starts the spacing over. Hosts listed, the probe tries the missing
// nodes' hosts first, which costs no dial.
func (st *probeState) aim(missing []NodeID, spaced bool) []NodeID {
	if !spaced || len(missing) == 0 {
		st.aimMissed, st.aimedAt = 0, nil
		return missing
	}
	for _, id := range missing {
		if !slices.Contains(st.aimedAt, id) {
			st.aimMissed = 0
			break
		}
	}
	if !aimNow(st.aimMissed, st.sinceAim) {
		st.sinceAim++
		return nil
	}
	return missing
}

// aimed records a session probe that aimed at aim and reached reached.
func (st *probeState) aimed(aim []NodeID, reached NodeID) {
	st.sinceAim, st.aimedAt = 0, aim
	if slices.Contains(aim, reached) {
		st.aimMissed = 0
	} else {
		st.aimMissed++
	}
}

// probePace is what the probe loop learns from the rest of the pool: that
// something changed (so the probe snaps back to ProbeInterval), and which
// nodes gossip lists that the pool has not reached.
type probePace struct {
	changes atomic.Uint64 // bumped by clusterChanged

	mu sync.Mutex // protects the fields below
	// wanted are nodes gossip lists as live and active that the pool has
	// not reached: behind one address the probe aims at them.
	wanted map[NodeID]bool
	// gossipWell is each node's state at the last gossip read: live,
	// active and not draining.
	gossipWell map[NodeID]bool
	// heard are nodes that hold sessions of the fleet, by the last read of
	// crdb_internal.cluster_sessions, and that the pool has not reached,
	// each with the draws of the probes aimed at it that missed it since it
	// was first heard of (see readSessions).
	heard map[NodeID]int
	// fleet is the sessions of the fleet per node at the last read of
	// crdb_internal.cluster_sessions, sent at fleetRead, and held still
	// (fleetStill) over the reads since fleetSince (fleetSwap).
	fleet                 map[NodeID]int
	fleetRead, fleetSince time.Time
	// fleetDraws is how many of the fleet's sessions on the nodes the
	// pool knows started after the number of nodes it knows last changed,
	// the most any read since has listed; drawsMark is when that change
	// was (tracker.met). Each is a draw of the load balancer, as the pool's
	// own landings are (fleetCoverage).
	fleetDraws int
	drawsMark  time.Time
}

// clusterChanged tells the probe that something changed (a node seen for
// the first time, forgotten, evicted or healthy again, draining or not, a
// connection lost, a balance round that pruned): the probe snaps back to
// ProbeInterval at its next tick, since more changes tend to follow one.
func (p *Pool) clusterChanged() {
	p.pace.changes.Add(1)
}

// Back-off of the session probes at rest.
const (
	// maxProbeBackoff bounds the wait between session probes as a multiple
	// of ProbeInterval...
	maxProbeBackoff = 8
	// ...and maxProbeWait as a time, unless ProbeInterval itself is longer.
	maxProbeWait = time.Minute
	// aimedDials bounds the dials of a probe aimed, behind one address, at a
	// node the pool misses: each dial reaches it with probability 1/N.
	aimedDials = 4
	// maxAimEvery bounds how far apart aimed probes come while the nodes
	// they aim at stay out of reach: every maxAimEvery-th session probe
	// (aimNow).
	maxAimEvery = 8
)

// aimNow reports whether a session probe behind one address aims at nodes
// the pool lost (aimProbe), after missed aimed probes in a row reached none
// of them and since session probes since the last aimed one: every probe at
// first, then every second, fourth and eighth. A lost node may be down,
// out of every dial's reach: a health-checked load balancer then sends all
// of an aimed probe's dials to the nodes that are up, which refuse
// aimedDials-1 of them after a full connection set-up, for as long as the
// node is down. Once it is back, the plain probes in between reach it one
// dial in N, and the next aimed one with aimedDials.
func aimNow(missed, since int) bool {
	return since+1 >= min(1<<min(missed, 3), maxAimEvery)
}

// probeBackoff paces the session probes: every ProbeInterval while the pool
// changes, and further apart while nothing does. It is a pure value; the
// loop keeps it. The loop ticks every ProbeInterval ±20%, which is where
// the probes' jitter comes from.
type probeBackoff struct {
	changes    uint64    // the pool's change count last seen
	lastChange time.Time // when a change was last seen (first: the loop's start)
	lastProbe  time.Time // when the last session probe ran (zero: none yet)
	exploring  bool      // too few landings on the known nodes to back off
}

// observe returns b after looking at the pool's change count at now, and
// at the nodes it knows (known) and the connections that landed on them
// since it came to know that many (landed, tracker.coverage): a change
// snaps the pace back to ProbeInterval. And the probe does not back off
// while the pool may not have met every node yet: behind one address a
// node is found only when a connection or a probe lands on it, one draw
// in N, so a pool that knows k nodes keeps probing every interval until
// enough draws have landed on those k that a node it has not met would
// have shown up (coverLandings). A cold start's connects count, so this
// costs a few probes after the start and after the number of nodes
// changes, none at rest.
func (b probeBackoff) observe(changes uint64, known int, landed uint64, now time.Time) probeBackoff {
	if changes != b.changes || b.lastChange.IsZero() {
		b.changes, b.lastChange = changes, now
	}
	b.exploring = landed < uint64(coverLandings(known))
	return b
}

// coverLandings is how many draws of a random load balancer must all land
// on k known nodes before a (k+1)th node would have been met with
// probability 99%: the least m with (k/(k+1))^m ≤ 1%. 7 for one node, 12
// for two, 17 for three, 21 for four, 44 for nine. 0 for none (no node
// identified: nothing to count against).
func coverLandings(k int) int {
	if k <= 0 {
		return 0
	}
	return int(math.Ceil(math.Log(0.01) / math.Log(float64(k)/float64(k+1))))
}

// probed returns b after a session probe at now.
func (b probeBackoff) probed(now time.Time) probeBackoff {
	b.lastProbe = now
	return b
}

// wait is how long after the last session probe the next is due: a share
// of the time the pool had been quiet when the last probe ran, at least
// base (ProbeInterval) and at most limit (ProbeMaxInterval). The share is a
// half, or an eighth while the pool misses a node (it waits to see it back,
// and learning that soon is what the aimed probes are for). After a change
// the probes come every base for two intervals (sixteen while missing),
// then each wait is half again as long as the one before (an eighth), up
// to the limit; any change snaps the wait back to base.
func (b probeBackoff) wait(base, limit time.Duration, missing bool) time.Duration {
	if b.exploring {
		return base
	}
	quiet := b.lastProbe.Sub(b.lastChange) // negative after a change: base
	share := quiet / 2
	if missing {
		share = quiet / 8
	}
	return min(max(base, share), max(limit, base))
}

// due reports whether a session probe is due at a tick at now: the wait
// has passed, less the 20% by which a jittered tick may come early, so that
// at a wait of base every tick probes. After a change the wait is base, so
// a change snaps a backed-off probe back at the next tick.
func (b probeBackoff) due(now time.Time, base, limit time.Duration, missing bool) bool {
	return b.lastProbe.IsZero() || !now.Before(b.lastProbe.Add(b.wait(base, limit, missing)-base/5))
}

// probeWaitCap is the default ProbeMaxInterval, the longest wait between
// session probes at rest: maxProbeBackoff intervals, at most maxProbeWait
// unless the interval itself is longer.
func probeWaitCap(base time.Duration) time.Duration {
	return max(base, min(maxProbeBackoff*base, maxProbeWait))
}

// runProbe discovers the cluster every ProbeInterval ±20%. When gossip is
// readable it reads it over one of the pool's idle connections: no new
// session; when it is not, it reads which nodes hold the fleet's sessions
// the same way (sessions.go). A session probe (one short-lived connection)
// runs on its own back-off: every ProbeInterval while the pool changes, up
// to ProbeMaxInterval apart while nothing does. When the pool misses a node
// (evicted, or listed by gossip or the sessions and never reached), the
// session probe aims at it; at a node it lost, less often while the aimed
// probes miss it (aimNow), and, in a fleet whose sessions it reads, only
// in its turn (fleetTurn). A new node joins the targets as soon as a probe
// reaches it, and a node no probe reaches for the expiry window leaves them.
func (p *Pool) runProbe(ctx context.Context) {
	// The loop's start counts as a probe: the first comes an interval later.
	now := time.Now()
	known, landed := p.tracker.coverage()
	st := probeState{backoff: probeBackoff{}.observe(p.pace.changes.Load(), known, landed, now).probed(now)}
	base := p.settings.probeInterval
	timer := time.NewTimer(jitter(base, rand.Float64()))
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		if !p.probeTick(ctx, &st, time.Now()) {
			return
		}
		timer.Reset(jitter(base, rand.Float64()))
	}
}

// probeTick reads gossip over an idle connection when it can (else, when
// due, the fleet's sessions: sessionsDue), and runs a session probe when one
// is due or a node is missed that gossip cannot vouch for. It reports
// whether probing should go on.
func (p *Pool) probeTick(ctx context.Context, st *probeState, now time.Time) bool {
	landed := p.tracker.landings.Load() != st.landings
	defer func() { st.landings = p.tracker.landings.Load() }()
	known, covered := p.fleetCoverage()
	st.backoff = st.backoff.observe(p.pace.changes.Load(), known, covered, now)
	gossiped := p.gossipIdle(ctx, st, now)
	if ctx.Err() != nil {
		return false
	}
	if gossiped {
		st.gossipRead = now
	} else if p.sessionsDue(st, now) && p.sessionsIdle(ctx, st, now) {
		// A node heard of is a change: the session probe snaps back. The
		// fleet's sessions may have covered the nodes.
		known, covered = p.fleetCoverage()
		st.backoff = st.backoff.observe(p.pace.changes.Load(), known, covered, now)
	}
	if ctx.Err() != nil {
		return false
	}
	missing, lostOnly := p.missing()
	if now.Sub(st.gossipRead) < p.settings.probeMaxInterval && len(missing) == 0 {
		// Gossip vouches for every node: no session needed, also at a
		// tick that found no idle connection to read it over.
		return true
	}
	if !st.backoff.due(now, p.settings.probeInterval, p.settings.probeMaxInterval, len(missing) > 0) {
		return true
	}
	st.backoff = st.backoff.probed(now)
	if landed && p.placement.mode == connectRedial {
		// Behind one address every connect the pool made since the last
		// tick (a refill, a move's replacement or redial) was a draw of
		// the load balancer, as a probe's dial is, and told the pool
		// which node it reached, a missed one included: it stands for
		// this tick's session probe, which would cost the cluster one
		// more session for the same news.
		return true
	}
	spaced := p.placement.mode == connectRedial && lostOnly
	// The fleet's sessions are read at least twice per longest wait
	// (sessionsDue); a fleet's size changes slowly.
	if spaced && !fleetTurn(p.fleetShare(now.Add(-2*p.settings.probeMaxInterval)), rand.Float64()) {
		// The rest of the fleet looks out for the lost nodes as well.
		return true
	}
	st.reached, st.draws = 0, 0
	aim := st.aim(missing, spaced)
	goOn := p.probe(ctx, st, missing, aim, !gossiped)
	if spaced && len(aim) > 0 {
		st.aimed(aim, st.reached)
	}
	p.missedHeard(missing, st.reached, st.draws)
	return goOn
}

// missingNodes returns the nodes the pool misses, sorted: evicted ones it
// waits to see back (unless gossip says they are draining, leaving or not
// live: then gossip will tell when they are back), those gossip lists or
// that hold sessions of the fleet (readSessions) that it has never reached,
// and, when the pool holds at least a connection per
// node, nodes that hold none of them and that nothing reached within the
// refill window (their connections closed without an eviction, as idle ones
// a drain closes do: the balance rounds cannot move connections there until
// something sees the node again).
func (p *Pool) missingNodes() []NodeID {
	ids, _ := p.missing()
	return ids
}

// missing is missingNodes, and whether every one of them is a node the
// pool lost (evicted or unseen) that gossip does not say is live and well.
// Such a node may be down, and aimed probes at it are spaced out (aimNow).
// A node gossip says is well, or that gossip or the fleet's sessions name
// and the pool never reached, is up as far as they know: every probe aims
// at it, until the draws give up on one only heard of (missedHeard).
func (p *Pool) missing() (ids []NodeID, lostOnly bool) {
	nodes := p.tracker.nodeList()
	now := time.Now()
	full := p.pool != nil && int(p.pool.Stat().TotalConns()) >= len(nodes)
	var evicted []NodeID
	for _, n := range nodes {
		unseen := full && n.conns.Load() == 0 && now.Sub(time.Unix(0, n.lastSeen.Load())) > p.refillWindow()
		if (n.evicted.Load() || unseen) && !n.draining.Load() {
			evicted = append(evicted, n.id)
		}
	}
	lostOnly = true
	p.pace.mu.Lock()
	for _, id := range evicted {
		if well, known := p.pace.gossipWell[id]; !known || well {
			ids = append(ids, id)
			lostOnly = lostOnly && !known
		}
	}
	for id := range p.pace.wanted {
		if !slices.Contains(ids, id) && p.tracker.node(id) == nil {
			ids = append(ids, id)
			lostOnly = false
		}
	}
	giveUp := coverLandings(len(nodes))
	for id, missed := range p.pace.heard {
		if missed < giveUp && !slices.Contains(ids, id) && p.tracker.node(id) == nil {
			ids = append(ids, id)
			lostOnly = false
		}
	}
	p.pace.mu.Unlock()
	slices.Sort(ids)
	return ids, lostOnly
}

// gossipIdle reads gossip over one of the pool's idle connections
// (overIdle), and reports whether it did. No idle connection, or gossip not
// readable: it reports false and the probe opens a session.
func (p *Pool) gossipIdle(ctx context.Context, st *probeState, now time.Time) bool {
	if !now.After(st.gossipAfter) {
		return false
	}
	ok, err := p.overIdle(ctx, func(ctx context.Context, conn *pgx.Conn) error {
		return p.readGossip(ctx, conn, now)
	})
	p.gossipFailed(ctx, st, now, err)
	return ok
}

// gossipFailed stops gossip reads for gossipBackoff when err, a gossip
// read's error, does not go away by itself, and says so to the tracer.
func (p *Pool) gossipFailed(ctx context.Context, st *probeState, now time.Time, err error) {
	if err != nil && !isTransient(err) {
		st.gossipAfter = now.Add(gossipBackoff)
		p.obs.discoveryPaused(ctx, "gossip", err, st.gossipAfter)
	}
}

// overIdle runs read over one of the pool's idle connections and reports
// whether it ran and succeeded; a probe is counted either way once a
// connection was found. It takes the idle connections for a moment
// (sweepIdle: no caller waits on a connect for it, and a caller finds the
// others back at once), keeps one on a healthy node and puts the rest back.
// No idle connection: false, nil.
func (p *Pool) overIdle(ctx context.Context, read func(context.Context, *pgx.Conn) error) (bool, error) {
	var conn *pgxpool.Conn
	for _, c := range p.sweepIdle(ctx) {
		cs := connStateOf(c.Conn())
		if conn == nil && cs != nil && !cs.refused() && !cs.node.draining.Load() {
			conn = c
			continue
		}
		releaseSwept(c)
	}
	if conn == nil {
		return false, nil
	}
	id := connStateOf(conn.Conn()).node.id
	// Cutting the query short would cost the connection (pgconn closes one
	// whose query it cancels) and open another: allow a slow server time.
	qctx, cancel := context.WithTimeout(ctx, gossipReadTimeout)
	err := read(qctx, conn.Conn())
	cancel()
	conn.Release()
	if ctx.Err() != nil {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	p.obs.probed(ctx, id, nil)
	return true, nil
}

// probe runs one session probe and reports whether probing should go on.
// The connection is built from the pool's own connection config (same TLS,
// credentials, DialFunc, user BeforeConnect) but is not a pool connection:
// it is neither tracked nor rate limited, and it is closed at once. A failed
// probe counts against no node: behind a load balancer it is not known which
// node failed, and the pool's own connects report real failures. With hosts
// listed, the node behind the host tried first is checked (health.go),
// which evicts it only if it does not answer the check either.
//
// missing are the nodes the pool misses (missingNodes); the probe tries
// their hosts first, and behind one address dials again until it reaches
// one of aim (a subset: probeState.aim). gossip says whether to read gossip
// on the probe's connection.
//
// Every step (the user's BeforeConnect aside) runs under one context with
// the probe's timeout, closing the connection included, so a node that
// accepts TCP and never answers holds the probe no longer than that.
func (p *Pool) probe(parent context.Context, st *probeState, missing, aim []NodeID, gossip bool) bool {
	ctx, cancel := context.WithTimeout(parent, min(p.settings.probeInterval, maxProbeTimeout))
	defer cancel()
	id, err := p.probeOnce(ctx, st, missing, aim, gossip)
	if parent.Err() != nil {
		return false // the pool is closing: not a probe failure
	}
	p.obs.probed(ctx, id, err)
	if err == nil && id == 0 {
		st.unidentified++
		return st.unidentified < unidentifiedProbes
	}
	if id != 0 {
		st.unidentified = 0
	}
	return true
}

// probeOnce connects, identifies the node, records it as seen and healthy,
// and reads gossip when allowed. It returns the node reached (0: none or no
// identity) and why it failed.
//
// With several hosts it tries first the host of a node the pool misses,
// else the hosts in turn, so every listed node is probed every len(hosts)
// probes however connections are placed. Behind one address, when the pool
// misses a node, it refuses connections that reach another node and dials
// again, up to aimedDials in all (the last connection is kept).
func (p *Pool) probeOnce(ctx context.Context, st *probeState, missing, aim []NodeID, gossip bool) (NodeID, error) {
	cc, err := p.sideConfig(ctx, func(groups []*hostGroup) []int {
		return p.placement.probeOrder(groups, missing, st.n)
	})
	st.n++
	if err != nil {
		return 0, fmt.Errorf("clusterpool: probe: BeforeConnect: %w", err)
	}
	p.aimProbe(cc, aim, &st.draws)
	conn, err := pgx.ConnectConfig(ctx, cc)
	if err != nil {
		if !errors.Is(ctx.Err(), context.Canceled) { // not the pool closing
			p.suspectHost(hostPort(cc.Host, cc.Port))
		}
		return 0, fmt.Errorf("clusterpool: probe: %w", err)
	}
	// Terminate is sent while the probe's time lasts; after that the
	// socket is just closed.
	defer func() { _ = conn.Close(ctx) }()
	if remote := remoteAddr(conn.PgConn()); remote != "" {
		p.placement.reachedHost(remote)
	}
	id, _, err := p.identify(ctx, conn)
	if err != nil || id == 0 {
		return 0, err
	}
	st.reached = id
	now := time.Now()
	p.tracker.seen(id, now)
	p.tracker.landings.Add(1)
	if n := p.tracker.node(id); n != nil {
		n.tookSession() // it had room for the probe
	}
	p.tracker.markHealthy(id, now)
	if gossip && now.After(st.gossipAfter) {
		p.gossipFailed(ctx, st, now, p.readGossip(ctx, conn, now))
	}
	if err := p.learnLocality(ctx, conn, p.tracker.node(id)); err != nil {
		return id, err
	}
	return id, nil
}

// aimProbe counts the connections a probe opens (every dial that
// succeeds: a server accepted it, whatever happens next) and, behind one
// address with node IDs in the BackendKey, when the pool misses a node, adds
// copies of the address so that a connection reaching another node is
// refused and dialled again (each dial is a fresh draw of the load
// balancer), up to aimedDials in all; the last connection is kept. It
// counts in landed the connections that reached a server (authenticated),
// refused ones included: the probe's draws.
func (p *Pool) aimProbe(cc *pgx.ConnConfig, missing []NodeID, landed *int) {
	if dial := cc.DialFunc; dial != nil {
		cc.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dial(ctx, network, addr)
			if err == nil {
				p.obs.probeSession()
			}
			return c, err
		}
	}
	prev := cc.ValidateConnect
	dials, aimed := 1, p.placement.mode == connectRedial && len(missing) > 0
	if aimed {
		all := attempts(cc)
		for range aimedDials - 1 {
			for _, fb := range all {
				c := *fb
				cc.Fallbacks = append(cc.Fallbacks, &c)
			}
		}
		dials = aimedDials
	}
	cc.ValidateConnect = func(ctx context.Context, pgConn *pgconn.PgConn) error {
		*landed++ // pgconn runs the attempts one after another
		if aimed && *landed < dials {
			if id := p.nodeOf(pgConn); id != 0 && !slices.Contains(missing, id) {
				return errProbeElsewhere
			}
		}
		if prev != nil {
			return prev(ctx, pgConn)
		}
		return nil
	}
}

// errProbeElsewhere refuses a probe's connection that reached a node other
// than the one the probe aims at, so pgconn dials again; it never leaves
// the probe.
var errProbeElsewhere = errors.New("clusterpool: probe reached a node it does not aim at; dialling again")

// isTransient reports whether a gossip query error may go away by itself
// (connection trouble, timeout, a node shutting down) rather than mean "not
// allowed" or "no such relation or column", which stops gossip queries for
// gossipBackoff.
func isTransient(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return true
	}
	switch pgErr.Code {
	case "42501", // insufficient_privilege: no VIEWCLUSTERMETADATA
		"42P01", // undefined_table
		"3F000", // invalid_schema_name
		"42703", // undefined_column: another version's columns
		"0A000": // feature_not_supported
		return false
	}
	return true
}

// readGossip applies CockroachDB's liveness view: a draining or
// decommissioning node leaves the targets (its idle connections are retired
// by the next balancing round); a node gossip says is not live is evicted
// until a connect or probe reaches it again; a live, active node the pool
// already knows counts as seen, so it does not expire while the load
// balancer happens to miss it. Nodes the pool has never reached are not
// added: a node listed in gossip may be unreachable from this client, and
// counting it would prune connections for a place they cannot go. Their
// addresses are kept, and when the connection string lists several hosts
// the probe and placement dial them too (see placement.groupsFor), so a node
// added after the pool started is reached and joins the targets. The address
// is gossip_nodes.address, CockroachDB's RPC address, which is also its SQL
// address unless the node listens for SQL on a separate port.
//
// Gossip names nodes by CockroachDB's IDs. When the pool's IDs are its own
// or the user's (the query identity, IdentifyNode), an entry is matched to a
// pool node by address instead (see gossipNode), and no address is kept for
// dialling, since it could not be matched to the node it leads to.
func (p *Pool) readGossip(ctx context.Context, conn *pgx.Conn, now time.Time) error {
	rows, err := conn.Query(ctx, gossipQuery)
	if err != nil {
		return err
	}
	type entry struct {
		id             int64
		draining, live bool
		membership     string
		address        string
		locality       string
	}
	var entries []entry
	for rows.Next() {
		var e entry
		if err := rows.Scan(&e.id, &e.draining, &e.membership, &e.live, &e.address, &e.locality); err != nil {
			rows.Close()
			return err
		}
		entries = append(entries, e)
	}
	if err := rows.Err(); err != nil {
		return err
	}
	// Localities first: the hosts below are dialled by the level the
	// known nodes' localities choose.
	localities := make(map[NodeID]*nodeLocality)
	for _, e := range entries {
		if n := p.gossipNode(NodeID(e.id), e.address); n != nil && n.setLocality(e.locality, p.settings.locality) {
			p.obs.nodeLocality(n.id, e.locality)
		}
		nl := &nodeLocality{raw: e.locality}
		nl.setShared(p.settings.locality)
		localities[NodeID(e.id)] = nl
	}
	if p.cockroachIDs() {
		hosts := make(map[NodeID]string)
		wanted := make(map[NodeID]bool)
		for _, e := range entries {
			if !e.live || e.draining || e.membership != "active" {
				continue
			}
			if e.address != "" {
				hosts[NodeID(e.id)] = e.address
			}
			if p.tracker.node(NodeID(e.id)) == nil {
				wanted[NodeID(e.id)] = true
			}
		}
		p.placement.mu.Lock()
		p.placement.gossipHosts = hosts
		p.placement.gossipLocalities = localities
		p.placement.mu.Unlock()
		p.pace.mu.Lock()
		news := false
		for id := range wanted {
			news = news || !p.pace.wanted[id]
		}
		p.pace.wanted = wanted
		p.pace.mu.Unlock()
		if news {
			p.clusterChanged()
		}
	}
	well := make(map[NodeID]bool, len(entries))
	for _, e := range entries {
		n := p.gossipNode(NodeID(e.id), e.address)
		if n == nil {
			continue
		}
		leaving := e.draining || e.membership != "active"
		if n.draining.Swap(leaving) != leaving {
			p.obs.nodeDraining(n.id, leaving)
		}
		well[n.id] = e.live && !leaving
		switch {
		case !e.live:
			p.tracker.evict(n.id, now)
		case !leaving:
			p.tracker.seen(n.id, now)
		}
	}
	p.pace.mu.Lock()
	was := p.pace.gossipWell
	p.pace.gossipWell = well
	p.pace.mu.Unlock()
	for id, ok := range well {
		if wasWell, known := was[id]; ok && known && !wasWell {
			// Gossip showed the node draining, leaving or not live at the
			// last read and well now: it came back (a restart). That is
			// proof enough to end an eviction without a session; a node
			// gossip showed well throughout is probed instead.
			p.tracker.markHealthy(id, now)
		}
	}
	return nil
}

// gossipNode returns the pool's node that a gossip entry names, or nil: by
// CockroachDB's node ID when the pool's IDs are CockroachDB's; otherwise by
// the entry's address, as the host the pool dials the node at or the
// address the node was identified with.
func (p *Pool) gossipNode(id NodeID, addr string) *node {
	if p.cockroachIDs() {
		return p.tracker.node(id)
	}
	if addr == "" {
		return nil
	}
	if mapped := p.placement.nodeBehind(addr); mapped != 0 {
		return p.tracker.node(mapped)
	}
	return p.tracker.nodeAt(addr)
}
