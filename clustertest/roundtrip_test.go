package clustertest

import (
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
)

// TestRoundTripAccounting runs every shape of round trip pgx produces
// (simple and extended protocol, batches with a failing statement in the
// middle, COPY, transactions) through a node with capacity 1: each must
// finish (a leaked slot would block the next one forever) and leave no slot
// held.
func TestRoundTripAccounting(t *testing.T) {
	c := New(t, Options{Nodes: 1})
	ctx := testCtx(t)
	n := c.Node(1)
	n.SetCapacity(1)
	conn := connect(t, ctx, n.DSN())
	if _, err := conn.Exec(ctx, "CREATE TABLE kv (k int PRIMARY KEY, v text)"); err != nil {
		t.Fatal(err)
	}
	modes := []pgx.QueryExecMode{
		pgx.QueryExecModeCacheStatement, pgx.QueryExecModeCacheDescribe,
		pgx.QueryExecModeDescribeExec, pgx.QueryExecModeExec, pgx.QueryExecModeSimpleProtocol,
	}
	for i, mode := range modes {
		batch := &pgx.Batch{}
		batch.Queue("INSERT INTO kv VALUES ($1, 'a')", 100+i)
		batch.Queue("SELECT 1/0")
		batch.Queue("SELECT 1")
		if err := conn.SendBatch(ctx, batch).Close(); err == nil || !strings.Contains(err.Error(), "22012") {
			t.Fatalf("%v: batch error %v, want division by zero", mode, err)
		}
		var v string
		if err := conn.QueryRow(ctx, "SELECT v FROM kv WHERE k = $1", mode, 100+i).Scan(&v); err == nil {
			t.Fatalf("%v: the failed batch's insert was committed", mode)
		}
	}
	// A pipeline with two Syncs in flight at once.
	pipeline := conn.PgConn().StartPipeline(ctx)
	pipeline.SendQueryParams("SELECT 1", nil, nil, nil, nil)
	pipeline.SendPipelineSync()
	pipeline.SendQueryParams("SELECT 2", nil, nil, nil, nil)
	pipeline.SendPipelineSync()
	if err := pipeline.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := pipeline.Close(); err != nil {
		t.Fatalf("pipeline: %v", err)
	}
	rows := [][]any{{1, "x"}, {2, "y"}}
	if copied, err := conn.CopyFrom(ctx, pgx.Identifier{"kv"}, []string{"k", "v"}, pgx.CopyFromRows(rows)); err != nil || copied != 2 {
		t.Fatalf("COPY: %d rows, %v", copied, err)
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "UPDATE kv SET v = 'z' WHERE k = 1"); err != nil {
		t.Fatal(err)
	}
	// Between the statements of a transaction the slot is free: another
	// connection gets through.
	other := connect(t, ctx, n.DSN())
	if _, err := other.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if inFlight, _ := n.queries.stats(); inFlight != 0 {
		t.Fatalf("%d slots still held", inFlight)
	}
}
