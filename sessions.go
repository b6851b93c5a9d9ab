package clusterpool

import (
	"context"
	"errors"
	"maps"
	"math"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// sessionsQuery lists the nodes that hold sessions the reader may see.
// Every CockroachDB user can read its own sessions, on every node of the
// cluster, in crdb_internal.cluster_sessions, with no privilege (one with
// VIEWACTIVITY sees everybody's). Service replicas share a SQL user, so
// this is the fleet's footprint: a node where any replica holds a session.
// A node the fan-out could not reach (down, or cut off from the gateway) is
// listed too, as one row with its node_id, a NULL session_id and the error
// in active_queries: it holds no session, so it is left out. With each
// node come its sessions older than fleetCountAge (the fleet's footprint
// there, for fleetSwap: a probe's session lives a moment and would only
// make the counts flicker), when
// its oldest session started (session_start is a TIMESTAMP
// in UTC) and the gateway's time now, in UTC too, so that the pool reckons
// the session's age by the cluster's clock, not its own: a node whose
// sessions all started after the pool lost it has been back since
// (readSessions). Last, its sessions younger than $1 milliseconds: those
// that started after the number of nodes the pool knows last changed, each
// a draw of the load balancer (fleetCoverage).
var sessionsQuery = `SELECT node_id, count(CASE WHEN session_start < timezone('UTC', now()) - INTERVAL '` +
	strconv.FormatInt(fleetCountAge.Milliseconds(), 10) + ` milliseconds' THEN 1 END), min(session_start), timezone('UTC', now()),
count(CASE WHEN session_start > timezone('UTC', now()) - INTERVAL '1 millisecond' * $1::FLOAT8 THEN 1 END)
FROM crdb_internal.cluster_sessions WHERE session_id IS NOT NULL GROUP BY node_id`

// fleetCountAge is how old a session must be to count in the fleet's
// sessions per node (sessionsQuery): a new connection shows there this
// long after it opened.
const fleetCountAge = time.Second

// sessionsClockSlack is how far apart two CockroachDB nodes' clocks may be
// (the default --max-offset): session_start is the session's node's clock,
// the age is reckoned by the gateway's.
const sessionsClockSlack = 500 * time.Millisecond

// sessionsShare is how often the sessions are read at rest, as a share of
// the session probe's wait: twice per wait, over an idle connection, no new
// session.
const sessionsShare = 2

// sessionsDue reports whether the probe reads the sessions at a tick at
// now: only when gossip cannot be read (it says more, addresses and drains
// included), the pool's node IDs are CockroachDB's, the table has not been
// refused, and a share of the session probe's current wait has passed.
func (p *Pool) sessionsDue(st *probeState, now time.Time) bool {
	if !p.cockroachIDs() || !now.Before(st.gossipAfter) || now.Before(st.sessionsAfter) {
		return false
	}
	base := p.settings.probeInterval
	wait := st.backoff.wait(base, p.settings.probeMaxInterval, false) / sessionsShare
	return st.sessionsRead.IsZero() || !now.Before(st.sessionsRead.Add(wait-base/5))
}

// sessionsIdle reads the sessions over one of the pool's idle connections
// (overIdle) and reports whether it did.
func (p *Pool) sessionsIdle(ctx context.Context, st *probeState, now time.Time) bool {
	ok, err := p.overIdle(ctx, p.readSessions)
	switch {
	case err != nil && !isTransient(err):
		st.sessionsAfter = now.Add(gossipBackoff)
		p.obs.discoveryPaused(ctx, "sessions", err, st.sessionsAfter)
	case err != nil && slowFanOut(err):
		// A slow or failing fan-out (CockroachDB asks every node): wait
		// as long as the probe waits at rest before asking again.
		st.sessionsAfter = now.Add(p.settings.probeMaxInterval)
	case ok:
		st.sessionsRead = now
	}
	return ok
}

// slowFanOut reports whether a failed sessions read was the cluster's
// doing (the server answered with an error, or the read ran out of time)
// rather than the connection's: a connection that broke under the read (a
// node that just went away, as the reads are most wanted then) says nothing
// about the next read, which another connection makes at the next tick.
func slowFanOut(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) || errors.Is(err, context.DeadlineExceeded)
}

// readSessions learns from the nodes that hold sessions of the fleet:
//
//   - Nodes the pool has never reached (or has forgotten): they are live,
//     since the cluster just listed their sessions, so the probe aims at
//     them (missingNodes) as at nodes gossip lists. Behind one load balancer
//     a pool at rest thus finds a new node soon after any replica of its
//     fleet does, not after its own backed-off probes happen to land there.
//     But a listed session does not say that this client can reach the
//     node: replicas behind another region's load balancer share the user
//     and list their nodes too. So the probe aims at a node heard of only
//     until its aimed draws have missed it as often as coverLandings says a
//     reachable node would have been met (missedHeard); then the pool stops
//     aiming there for as long as the node stays listed, and its back-off
//     resumes.
//   - Nodes the pool knows and misses (evicted, or holding none of its
//     connections: backAgain) whose oldest session of the fleet started
//     after the pool lost them (its eviction, or the last sign of life it
//     had: lostAt), by more than the clocks may differ: every session the
//     node held then is gone and it took new ones since, as a restarted
//     node does, so it is back and accepts sessions. That is proof enough
//     to end an eviction, as a gossip read that shows a node well again
//     is: the balance rounds move connections there at once, without
//     waiting for one of the pool's own probes to land there (one draw in
//     N behind a random load balancer), and without the pool having read
//     the list while the node was away. A node that kept older sessions
//     says nothing about this client's own trouble with it, and is left to
//     the pool's connections and probes.
func (p *Pool) readSessions(ctx context.Context, conn *pgx.Conn) error {
	met := p.tracker.met()
	sent := time.Now()
	// The sessions that started after met, by the cluster's clocks, which
	// may be that far apart: none when met is more recent than that.
	window := sent.Sub(met) - sessionsClockSlack
	if window <= 0 {
		window = -time.Hour
	}
	rows, err := conn.Query(ctx, sessionsQuery, window.Milliseconds())
	if err != nil {
		return err
	}
	type listing struct {
		id       int64
		sessions int64
		oldest   *time.Time // the oldest session's start; nil: unknown
		now      time.Time  // the gateway's clock
		newer    int64      // sessions that started within window
	}
	list, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (listing, error) {
		var l listing
		err := row.Scan(&l.id, &l.sessions, &l.oldest, &l.now, &l.newer)
		return l, err
	})
	if err != nil {
		return err
	}
	heard := make(map[NodeID]int)
	fleet := make(map[NodeID]int, len(list))
	var back []NodeID
	draws := 0
	p.pace.mu.Lock()
	news := false
	for _, l := range list {
		id := NodeID(l.id)
		if l.id <= 0 {
			continue
		}
		fleet[id] = int(l.sessions)
		n := p.tracker.node(id)
		if n == nil {
			missed, known := p.pace.heard[id]
			news = news || !known
			heard[id] = missed
			continue
		}
		draws += int(l.newer)
		if l.oldest != nil && backAgain(n) {
			// Its age by the gateway's clock, taken back from when the
			// query was sent: never later than the session started.
			oldest := sent.Add(-l.now.Sub(*l.oldest))
			if oldest.After(lostAt(n).Add(sessionsClockSlack)) {
				back = append(back, id)
			}
		}
	}
	p.pace.heard = heard
	if !fleetStill(p.pace.fleet, fleet) {
		p.pace.fleetSince = sent
	}
	p.pace.fleet, p.pace.fleetRead = fleet, sent
	if p.pace.drawsMark.Equal(met) {
		// A session since closed (a move's retired connection) was a draw
		// all the same: the count never falls between two changes.
		draws = max(draws, p.pace.fleetDraws)
	}
	p.pace.fleetDraws, p.pace.drawsMark = draws, met
	p.pace.mu.Unlock()
	now := time.Now()
	for _, id := range back {
		p.tracker.seen(id, now)
		if n := p.tracker.node(id); n != nil && n.evicted.Load() {
			// Only an eviction ends: a node the pool holds no connection
			// on keeps the failures its connects counted there.
			p.tracker.markHealthy(id, now)
		}
	}
	if news || len(back) > 0 {
		p.clusterChanged()
	}
	return nil
}

// fleetStill reports whether the fleet's sessions per node held still
// from one read (was) to the next (now): the same nodes with the same
// counts. One connection moved is a change (its old node one less, its new
// one more fleetCountAge later), and the sessions too young to count (a
// probe's) never make one.
func fleetStill(was, now map[NodeID]int) bool {
	return len(was) > 0 && maps.Equal(was, now)
}

// backAgain reports whether a sign that node n is back ends what the pool
// misses there: n is evicted, or holds none of the pool's connections (a
// drain closes idle ones without an eviction, and the balance rounds leave
// alone a node nothing has seen lately). A node draining by gossip is left
// to gossip.
func backAgain(n *node) bool {
	return !n.draining.Load() && (n.evicted.Load() || n.conns.Load() == 0)
}

// lostAt is when the pool lost node n: its eviction, or the last sign of
// life it had from it (a balance round counts the pool's open connections
// as one), whichever came later.
func lostAt(n *node) time.Time {
	at := n.lastSeen.Load()
	if n.evicted.Load() {
		at = max(at, n.evictedAt.Load())
	}
	return time.Unix(0, at)
}

// missedHeard counts, for each node in missing that the pool has only
// heard of, the draws of a session probe aimed at it (the connections it
// landed, draws) when the probe did not reach it (reached). A dial that
// failed lands nowhere and counts for nothing: a load balancer that is down
// says nothing about the node.
func (p *Pool) missedHeard(missing []NodeID, reached NodeID, draws int) {
	if draws == 0 {
		return
	}
	p.pace.mu.Lock()
	defer p.pace.mu.Unlock()
	for _, id := range missing {
		if missed, ok := p.pace.heard[id]; ok && id != reached {
			p.pace.heard[id] = missed + draws
		}
	}
}

// fleetShare is the pool's share of its fleet's sessions on the nodes it
// knows, by the last read of the fleet's sessions if it was sent after
// since: the pool's open connections over the fleet's there (the list
// holds the pool's own too), at most 1. It is 1 without such a read:
// gossip readable instead, the sessions not readable, or a lone pool.
// Replicas behind another load balancer hold their sessions on nodes this
// pool does not know and do not count.
func (p *Pool) fleetShare(since time.Time) float64 {
	p.pace.mu.Lock()
	fleet, read := p.pace.fleet, p.pace.fleetRead
	total := 0
	for id, n := range fleet {
		if p.tracker.node(id) != nil {
			total += n
		}
	}
	p.pace.mu.Unlock()
	own := p.openConns()
	if !read.After(since) || total <= own || own <= 0 {
		return 1
	}
	return float64(own) / float64(total)
}

// fleetTurn reports whether a session probe for nodes the pool lost runs,
// for a pool holding share of its fleet's sessions (fleetShare) and u drawn
// uniformly from [0, 1): with probability √share, at least
// 1/maxAimEvery. Every pool of a fleet probes for a node that went away,
// and once one of them reaches it back the others read so from the
// sessions list (readSessions: backAgain) without a probe of their own. A
// fleet of M equal pools then opens about √M session probes per interval
// while the node is away instead of M: enough for one of them to land on
// it within an interval or two of its return behind a random load
// balancer (each lands there one time in N), for a √M-th of the sessions
// on the nodes that carry the load meanwhile.
func fleetTurn(share, u float64) bool {
	return u < max(math.Sqrt(share), 1.0/maxAimEvery)
}

// fleetCoverage is tracker.coverage with the fleet's sessions among the
// draws: how many nodes the pool knows, and the larger of its own landings
// and the fleet's sessions on those nodes that started since that number
// last changed (readSessions). Service replicas dial through the same load
// balancer, so a node the pool has not met would hold its share of those
// sessions, as it would of the pool's own landings; a pool that reads the
// list is spared most of the probes that would otherwise make the draws
// (probeBackoff's exploring). The list holds the pool's own open
// connections too, hence the larger of the two, not their sum. (Replicas
// behind another load balancer that share the user add draws of theirs on
// the nodes this pool knows; a node any replica reached is named by the
// list and aimed at all the same.)
func (p *Pool) fleetCoverage() (int, uint64) {
	known, landed := p.tracker.coverage()
	met := p.tracker.met()
	p.pace.mu.Lock()
	draws, mark := p.pace.fleetDraws, p.pace.drawsMark
	p.pace.mu.Unlock()
	if mark.Equal(met) && draws > 0 {
		landed = max(landed, uint64(draws))
	}
	return known, landed
}
