package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Probe settings.
const (
	// maxProbeTimeout bounds one probe (connect, identify, gossip query).
	maxProbeTimeout = 5 * time.Second
	// unidentifiedProbes is how many probes in a row may reach a server that
	// has no node identity (plain PostgreSQL behind one address) before the
	// probe stops for good: there is nothing to discover.
	unidentifiedProbes = 3
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
	n            int       // probes started; rotates the first host
	unidentified int       // probes in a row that found no node identity
	gossipAfter  time.Time // do not query gossip before this
}

// runProbe opens one short-lived connection every ProbeInterval ±20% so the
// pool learns of nodes it holds no connection to: a new node joins the
// targets as soon as a probe reaches it, and a node no probe reaches for the
// expiry window leaves them.
func (p *Pool) runProbe(ctx context.Context) {
	var st probeState
	timer := time.NewTimer(jitter(p.settings.probeInterval, rand.Float64()))
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		if !p.probe(ctx, &st) {
			return
		}
		timer.Reset(jitter(p.settings.probeInterval, rand.Float64()))
	}
}

// probe runs one probe and reports whether probing should go on. The
// connection is built from the pool's own connection config (same TLS,
// credentials, DialFunc, user BeforeConnect) but is not a pool connection:
// it is neither tracked nor rate limited, and it is closed at once. A failed
// probe counts against no node: behind a load balancer it is not known which
// node failed, and the pool's own connects report real failures. With hosts
// listed, the node behind the host tried first is checked (health.go),
// which evicts it only if it does not answer the check either.
//
// Every step (the user's BeforeConnect aside) runs under one context with
// the probe's timeout, closing the connection included, so a node that
// accepts TCP and never answers holds the probe no longer than that.
func (p *Pool) probe(parent context.Context, st *probeState) bool {
	ctx, cancel := context.WithTimeout(parent, min(p.settings.probeInterval, maxProbeTimeout))
	defer cancel()
	id, err := p.probeOnce(ctx, st)
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
func (p *Pool) probeOnce(ctx context.Context, st *probeState) (NodeID, error) {
	// Several hosts: visit them in turn, so every listed node is probed
	// every len(groups) probes however connections are placed.
	cc, err := p.sideConfig(ctx, func(groups []*hostGroup) []int {
		if len(groups) < 2 {
			return nil
		}
		order := make([]int, len(groups))
		for i := range order {
			order[i] = (st.n + i) % len(groups)
		}
		return order
	})
	st.n++
	if err != nil {
		return 0, fmt.Errorf("clusterpool: probe: BeforeConnect: %w", err)
	}
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
	now := time.Now()
	p.tracker.seen(id, now)
	p.tracker.markHealthy(id, now)
	if now.After(st.gossipAfter) {
		if err := p.readGossip(ctx, conn, now); err != nil && !isTransient(err) {
			st.gossipAfter = now.Add(gossipBackoff)
		}
	}
	if err := p.learnLocality(ctx, conn, p.tracker.node(id)); err != nil {
		return id, err
	}
	return id, nil
}

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
		for _, e := range entries {
			if e.live && !e.draining && e.membership == "active" && e.address != "" {
				hosts[NodeID(e.id)] = e.address
			}
		}
		p.placement.mu.Lock()
		p.placement.gossipHosts = hosts
		p.placement.gossipLocalities = localities
		p.placement.mu.Unlock()
	}
	for _, e := range entries {
		n := p.gossipNode(NodeID(e.id), e.address)
		if n == nil {
			continue
		}
		leaving := e.draining || e.membership != "active"
		if n.draining.Swap(leaving) != leaving {
			p.obs.nodeDraining(n.id, leaving)
		}
		switch {
		case !e.live:
			p.tracker.evict(n.id, now)
		case !leaving:
			p.tracker.seen(n.id, now)
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
