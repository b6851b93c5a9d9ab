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
	if err != nil && !isTransient(err) {
		st.sessionsAfter = now.Add(gossipBackoff)
	}
	if ok {
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
func (p *Pool) readSessions(ctx context.Context, conn *pgx.Conn) error {
	rows, err := conn.Query(ctx, sessionsQuery)
	if err != nil {
		return err
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return err
	}
	heard := make(map[NodeID]bool)
	for _, id := range ids {
		if id > 0 && p.tracker.node(NodeID(id)) == nil {
			heard[NodeID(id)] = true
		}
	}
	p.pace.mu.Lock()
	news := false
	for id := range heard {
		news = news || !p.pace.heard[id]
	}
	p.pace.heard = heard
	p.pace.mu.Unlock()
	if news {
		p.clusterChanged()
	}
	return nil
}
