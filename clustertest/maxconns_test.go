package clustertest

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// requireTooMany fails unless err is CockroachDB's refusal of a session
// beyond server.max_connections_per_gateway.
func requireTooMany(t *testing.T, err error, max int) {
	t.Helper()
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		t.Fatalf("connect to a full node: %v (%T), want a *pgconn.PgError", err, err)
	}
	if pgErr.Code != "53300" || pgErr.Severity != "FATAL" || pgErr.Message != "sorry, too many clients already" {
		t.Fatalf("refusal %s %s %q, want FATAL 53300 \"sorry, too many clients already\"", pgErr.Severity, pgErr.Code, pgErr.Message)
	}
	if !strings.Contains(pgErr.Hint, "server.max_connections_per_gateway") || !strings.Contains(pgErr.Hint, " is "+strconv.Itoa(max)+" ") {
		t.Errorf("hint %q does not name the setting and %d", pgErr.Hint, max)
	}
}

// A node at its limit refuses the next session with 53300 after reading its
// StartupMessage, leaves the sessions it has alone, and lets the next one in
// once a slot is free.
func TestSetMaxConnections(t *testing.T) {
	c := New(t, Options{Nodes: 2})
	ctx := testCtx(t)
	n := c.Node(1)
	n.SetMaxConnections(2)
	a := connect(t, ctx, n.DSN())
	b := connect(t, ctx, n.DSN())

	_, err := pgx.Connect(ctx, n.DSN())
	requireTooMany(t, err, 2)
	if got := n.OpenConns(); got != 2 {
		t.Errorf("OpenConns %d after a refusal, want 2: a refused session must not count", got)
	}
	if got, total := n.RefusedConns(), n.TotalConns(); got != 1 || total != 3 {
		t.Errorf("RefusedConns %d, TotalConns %d; want 1 and 3", got, total)
	}
	// The node is full, not unhealthy: its sessions work, other nodes too.
	for i, conn := range []*pgx.Conn{a, b, connect(t, ctx, c.Node(2).DSN())} {
		var one int
		if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
	}

	// A freed slot lets the next session in; until the proxy has seen the
	// close, the node may still be full.
	a.Close(ctx)
	var c3 *pgx.Conn
	eventually(t, "a session in the freed slot", func() bool {
		conn, err := pgx.Connect(ctx, n.DSN())
		if err != nil {
			requireTooMany(t, err, 2)
			return false
		}
		c3 = conn
		return true
	})
	defer c3.Close(context.Background())
	_, err = pgx.Connect(ctx, n.DSN())
	requireTooMany(t, err, 2)

	// Lowering the limit below the sessions open closes none of them.
	n.SetMaxConnections(1)
	if err := b.Ping(ctx); err != nil {
		t.Fatalf("an open session after the limit was lowered: %v", err)
	}
	_, err = pgx.Connect(ctx, n.DSN())
	requireTooMany(t, err, 1)

	// 0 (and anything below) lifts the limit.
	n.SetMaxConnections(-1)
	connect(t, ctx, n.DSN())
	if got := n.OpenConns(); got != 3 {
		t.Errorf("OpenConns %d with no limit, want 3", got)
	}
}

// The limit holds under concurrent connects: never more sessions let in
// than slots, and every other connect refused with 53300.
func TestSetMaxConnectionsConcurrent(t *testing.T) {
	c := New(t, Options{Nodes: 1, InProcess: true})
	ctx := testCtx(t)
	n := c.Node(1)
	const max, clients = 3, 12
	n.SetMaxConnections(max)
	type result struct {
		conn *pgx.Conn
		err  error
	}
	results := make(chan result, clients)
	for i := 0; i < clients; i++ {
		go func() {
			conn, err := pgx.Connect(ctx, n.DSN())
			results <- result{conn, err}
		}()
	}
	var ok int
	for i := 0; i < clients; i++ {
		r := <-results
		if r.err != nil {
			requireTooMany(t, r.err, max)
			continue
		}
		ok++
		defer r.conn.Close(context.Background())
	}
	if ok != max || n.OpenConns() != max || n.RefusedConns() != clients-max {
		t.Errorf("%d sessions let in, OpenConns %d, RefusedConns %d; want %d, %d, %d", ok, n.OpenConns(), n.RefusedConns(), max, max, clients-max)
	}
}

// In TLS mode the refusal comes after the TLS handshake, encrypted, like
// any other answer to the StartupMessage.
func TestSetMaxConnectionsTLS(t *testing.T) {
	c := New(t, Options{Nodes: 1, TLS: true, InProcess: true})
	ctx := testCtx(t)
	n := c.Node(1)
	n.SetMaxConnections(1)
	connect(t, ctx, n.DSN())
	_, err := pgx.Connect(ctx, n.DSN())
	requireTooMany(t, err, 1)
	// Through the load balancer too, which only forwards bytes.
	_, err = pgx.Connect(ctx, c.DSN())
	requireTooMany(t, err, 1)
}
