package clustertest

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// SetGossip writes one row per node on every server, readable through the
// proxies as a client's probe reads it; a node added later has the last
// rows from its start; and a second call replaces the rows with the cluster
// as it is now.
func TestSetGossip(t *testing.T) {
	c := New(t, Options{Nodes: 2})
	ctx := testCtx(t)
	// view reads both tables through node id's proxy, one line per node.
	view := func(id int) string {
		conn := connect(t, ctx, c.Node(id).DSN())
		rows, err := conn.Query(ctx, `SELECT l.node_id, l.draining, l.membership, n.address, n.is_live
FROM crdb_internal.gossip_liveness l JOIN crdb_internal.gossip_nodes n USING (node_id) ORDER BY 1`)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		var lines []string
		for rows.Next() {
			var id int64
			var draining, live bool
			var membership, addr string
			if err := rows.Scan(&id, &draining, &membership, &addr, &live); err != nil {
				t.Fatal(err)
			}
			lines = append(lines, fmt.Sprintf("%d %t %s %s %t", id, draining, membership, addr, live))
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		return strings.Join(lines, "\n")
	}
	want := func(draining map[int]bool) string {
		var lines []string
		for _, n := range c.Nodes() {
			lines = append(lines, fmt.Sprintf("%d %t active %s true", n.ID(), draining[n.ID()], n.Addr()))
		}
		return strings.Join(lines, "\n")
	}

	if err := c.SetGossip(ctx, nil); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes() {
		if got, w := view(n.ID()), want(nil); got != w {
			t.Errorf("node %d's gossip:\n%s\nwant:\n%s", n.ID(), got, w)
		}
	}

	before := want(nil)
	n3, err := c.AddNode(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A node added after SetGossip has the tables from its start, with the
	// rows as they were, until the next SetGossip lists it.
	if got := view(n3.ID()); got != before {
		t.Errorf("node 3's gossip before the next SetGossip:\n%s\nwant the last rows:\n%s", got, before)
	}
	draining := map[int]bool{1: true}
	if err := c.SetGossip(ctx, draining); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes() {
		if got, w := view(n.ID()), want(draining); got != w {
			t.Errorf("after AddNode, node %d's gossip:\n%s\nwant:\n%s", n.ID(), got, w)
		}
	}
	if !strings.Contains(view(1), n3.Addr()) {
		t.Errorf("node 3 (%s) missing from node 1's gossip", n3.Addr())
	}
}

func TestSetGossipInProcess(t *testing.T) {
	c := New(t, Options{Nodes: 1, InProcess: true})
	err := c.SetGossip(testCtx(t), nil)
	if err == nil || !strings.Contains(err.Error(), "InProcess") {
		t.Fatalf("SetGossip on an in-process cluster: %v, want an error naming Options.InProcess", err)
	}
}

// SetSessions lists every open session of every node on every server, by
// node and application_name, each with a session_id, and a second call
// replaces the snapshot; a node that is down is listed as CockroachDB lists
// a node its fan-out cannot reach: one row with a NULL session_id and the
// error in active_queries.
func TestSetSessions(t *testing.T) {
	c := New(t, Options{Nodes: 2})
	ctx := testCtx(t)
	// view reads the table through node id's proxy: "node app count" lines.
	view := func(id int) string {
		conn := connect(t, ctx, c.Node(id).DSN()+"&application_name=reader")
		rows, err := conn.Query(ctx, `SELECT node_id, CASE WHEN session_id IS NOT NULL THEN application_name WHEN active_queries LIKE '-- %' THEN 'error' ELSE '?' END, count(*)
FROM crdb_internal.cluster_sessions GROUP BY 1, 2 ORDER BY 1, 2`)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		var lines []string
		for rows.Next() {
			var id, k int64
			var app string
			if err := rows.Scan(&id, &app, &k); err != nil {
				t.Fatal(err)
			}
			lines = append(lines, fmt.Sprintf("%d %s %d", id, app, k))
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		return strings.Join(lines, "\n")
	}
	// Two sessions of app a on node 2, none elsewhere but the reader's own.
	before := time.Now()
	connect(t, ctx, c.Node(2).DSN()+"&application_name=a")
	connect(t, ctx, c.Node(2).DSN()+"&application_name=a")
	after := time.Now()
	if err := c.SetSessions(ctx); err != nil {
		t.Fatal(err)
	}
	if got, want := view(1), "2 a 2"; got != want {
		t.Errorf("node 1's sessions:\n%s\nwant:\n%s", got, want)
	}
	// Each with when node 2 accepted it, in UTC.
	var started int
	utc := func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05.999999") }
	if err := connect(t, ctx, c.Node(1).DSN()+"&application_name=reader").QueryRow(ctx, `SELECT count(*) FROM crdb_internal.cluster_sessions
WHERE node_id = 2 AND session_start BETWEEN $1::timestamp AND $2::timestamp`, utc(before), utc(after)).Scan(&started); err != nil {
		t.Fatal(err)
	}
	if started != 2 {
		t.Errorf("%d of node 2's sessions started between %v and %v, want 2", started, before, after)
	}
	// The readers' own sessions on node 1 (the first view's and the
	// start-time check's; every connect stays open until the test ends)
	// show at the next snapshot.
	if err := c.SetSessions(ctx); err != nil {
		t.Fatal(err)
	}
	if got, want := view(1), "1 reader 2\n2 a 2"; got != want {
		t.Errorf("node 1's sessions after a second snapshot:\n%s\nwant:\n%s", got, want)
	}
	c.Node(2).Kill()
	if err := c.SetSessions(ctx); err != nil {
		t.Fatal(err)
	}
	// One more reader (the second view's) on node 1; node 2's sessions died
	// with it.
	if got, want := view(1), "1 reader 3\n2 error 1"; got != want {
		t.Errorf("node 1's sessions with node 2 down:\n%s\nwant:\n%s", got, want)
	}
	// A node added now has the table from its start, with the last rows.
	n3, err := c.AddNode(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := view(n3.ID()), "1 reader 3\n2 error 1"; got != want {
		t.Errorf("node 3's sessions before the next snapshot:\n%s\nwant the last rows:\n%s", got, want)
	}
	if err := New(t, Options{Nodes: 1, InProcess: true}).SetSessions(ctx); err == nil || !strings.Contains(err.Error(), "InProcess") {
		t.Errorf("SetSessions on an in-process cluster: %v, want an error naming Options.InProcess", err)
	}
}
