package clustertest

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// SetGossip writes CockroachDB's view of the cluster into every node's
// server, where a client reading crdb_internal finds it: the tables
// crdb_internal.gossip_liveness (node_id, draining, membership) and
// crdb_internal.gossip_nodes (node_id, address, is_live, locality), with one
// row per node of the cluster now, each live and active at its proxy
// address, with its locality ("" for none, as CockroachDB shows it), and
// draining where draining says so (nil: none). It creates the tables if
// needed and replaces their rows in one transaction per server.
//
// The tables do not follow the cluster: call SetGossip again after AddNode,
// RemoveNode or a change of draining. A node AddNode starts after the first
// SetGossip has the tables from its start, with the last SetGossip's rows
// (which do not list it), as crdb_internal is on every CockroachDB node.
// Nodes stopped or partitioned still get their rows, since it writes
// straight to the servers, not through the proxies. It needs PostgreSQL
// servers, so it fails with Options.InProcess.
func (c *Cluster) SetGossip(ctx context.Context, draining map[int]bool) error {
	if c.opts.InProcess {
		return errors.New("clustertest: SetGossip needs PostgreSQL servers, not Options.InProcess")
	}
	c.internalMu.Lock()
	defer c.internalMu.Unlock()
	nodes := c.Nodes()
	var liveness, addrs []string
	for _, n := range nodes {
		liveness = append(liveness, fmt.Sprintf("(%d, %t, 'active')", n.ID(), draining[n.ID()]))
		addrs = append(addrs, fmt.Sprintf("(%d, '%s', true, %s)", n.ID(), n.Addr(), quoteLiteral(n.Locality())))
	}
	sql := `CREATE SCHEMA IF NOT EXISTS crdb_internal;
CREATE TABLE IF NOT EXISTS crdb_internal.gossip_liveness (node_id INT8, draining BOOL, membership TEXT);
CREATE TABLE IF NOT EXISTS crdb_internal.gossip_nodes (node_id INT8, address TEXT, is_live BOOL, locality TEXT);
BEGIN;
DELETE FROM crdb_internal.gossip_liveness;
DELETE FROM crdb_internal.gossip_nodes;
INSERT INTO crdb_internal.gossip_liveness VALUES ` + strings.Join(liveness, ", ") + `;
INSERT INTO crdb_internal.gossip_nodes VALUES ` + strings.Join(addrs, ", ") + `;
COMMIT;`
	c.gossip = sql
	for _, n := range nodes {
		if err := n.ExecDirect(ctx, sql); err != nil {
			return err
		}
	}
	return nil
}

// SetSessions writes the sessions open now into every node's server as
// CockroachDB's crdb_internal.cluster_sessions shows them: one row per
// session on any node of the cluster, with the columns node_id, session_id,
// application_name, active_queries and session_start (when the node
// accepted it, a TIMESTAMP in UTC; CockroachDB has more columns). Every
// CockroachDB user can read its own sessions there, on every node, without
// a privilege; a client that reads it learns which nodes hold sessions,
// including nodes it has never reached. The sessions are the proxies'
// counts (Node.OpenConnsByApp), so nodes partitioned from the client are
// listed. A node that is Down cannot answer the cluster's fan-out, and
// CockroachDB then lists one row for it with its node_id, a NULL
// session_id and the error in active_queries: so does SetSessions.
//
// As with SetGossip the table is a snapshot: call SetSessions as often as
// the test needs it current (a node added after it has the table from its
// start, with the last rows). It needs PostgreSQL servers, so it fails with
// Options.InProcess.
func (c *Cluster) SetSessions(ctx context.Context) error {
	if c.opts.InProcess {
		return errors.New("clustertest: SetSessions needs PostgreSQL servers, not Options.InProcess")
	}
	c.internalMu.Lock()
	defer c.internalMu.Unlock()
	nodes := c.Nodes()
	var rows []string
	for _, n := range nodes {
		if n.State() == Down {
			rows = append(rows, fmt.Sprintf("(%d, NULL, NULL, %s, NULL)", n.ID(),
				quoteLiteral(fmt.Sprintf("-- rpc error: node %d unavailable", n.ID()))))
			continue
		}
		for i, s := range n.Sessions() {
			rows = append(rows, fmt.Sprintf("(%d, '%d-%d', %s, '', '%s')", n.ID(), n.ID(), i, quoteLiteral(s.App),
				s.Start.UTC().Format("2006-01-02 15:04:05.999999")))
		}
	}
	insert := ""
	if len(rows) > 0 {
		insert = `INSERT INTO crdb_internal.cluster_sessions VALUES ` + strings.Join(rows, ", ") + `;
`
	}
	sql := `CREATE SCHEMA IF NOT EXISTS crdb_internal;
CREATE TABLE IF NOT EXISTS crdb_internal.cluster_sessions (node_id INT8, session_id TEXT, application_name TEXT, active_queries TEXT, session_start TIMESTAMP);
BEGIN;
DELETE FROM crdb_internal.cluster_sessions;
` + insert + `COMMIT;`
	c.sessions = sql
	for _, n := range nodes {
		if err := n.ExecDirect(ctx, sql); err != nil {
			return err
		}
	}
	return nil
}
