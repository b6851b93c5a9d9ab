package clusterpool

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
)

// sessionsQuery lists the nodes that hold sessions the reader may see.
// Every CockroachDB user can read its own sessions, on every node of the
// cluster, in crdb_internal.cluster_sessions, with no privilege (one with
// VIEWACTIVITY sees everybody's). Service replicas share a SQL user, so
// this is the fleet's footprint: a node where any replica holds a session.
const sessionsQuery = `SELECT DISTINCT node_id FROM crdb_internal.cluster_sessions`

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
	case err != nil:
		// A slow or failing fan-out (CockroachDB asks every node): wait
		// as long as the probe waits at rest before asking again.
		st.sessionsAfter = now.Add(p.settings.probeMaxInterval)
	case ok:
		st.sessionsRead = now
	}
	return ok
}

// readSessions learns the nodes that hold sessions of the fleet and that
// the pool has never reached (or has forgotten): they are live, since the
// cluster just listed their sessions, so the probe aims at them
// (missingNodes) as at nodes gossip lists. Behind one load balancer a pool
// at rest thus finds a new node soon after any replica of its fleet does,
// not after its own backed-off probes happen to land there. A node the
// pool knows is left to its connections and probes: a listed session says
// nothing about whether this client reaches it.
//
// Nor does it say that this client can reach a node it has not: replicas
// behind another region's load balancer share the user and list their
// nodes too. So the probe aims at a node heard of only until its aimed
// draws have missed it as often as coverLandings says a reachable node
// would have been met (missedHeard); then the pool stops aiming there for
// as long as the node stays listed, and its back-off resumes.
func (p *Pool) readSessions(ctx context.Context, conn *pgx.Conn) error {
	rows, err := conn.Query(ctx, sessionsQuery)
	if err != nil {
		return err
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return err
	}
	heard := make(map[NodeID]int)
	p.pace.mu.Lock()
	news := false
	for _, raw := range ids {
		id := NodeID(raw)
		if raw <= 0 || p.tracker.node(id) != nil {
			continue
		}
		missed, known := p.pace.heard[id]
		news = news || !known
		heard[id] = missed
	}
	p.pace.heard = heard
	p.pace.mu.Unlock()
	if news {
		p.clusterChanged()
	}
	return nil
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
