package clusterpool_test

import (
	"context"
	"fmt"
	"log"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// DBTX is the interface sqlc generates for the pgx/v5 driver (sql_package:
// "pgx/v5"). Code sqlc generated for a *pgxpool.Pool takes a *Pool unchanged.
type DBTX interface {
	Exec(context.Context, string, ...interface{}) (pgconn.CommandTag, error)
	Query(context.Context, string, ...interface{}) (pgx.Rows, error)
	QueryRow(context.Context, string, ...interface{}) pgx.Row
}

// DBTXWithCopyAndBatch is DBTX as sqlc generates it when the queries use
// :copyfrom and :batch* commands.
type DBTXWithCopyAndBatch interface {
	DBTX
	CopyFrom(ctx context.Context, tableName pgx.Identifier, columnNames []string, rowSrc pgx.CopyFromSource) (int64, error)
	SendBatch(context.Context, *pgx.Batch) pgx.BatchResults
}

var (
	_ DBTX                 = (*clusterpool.Pool)(nil)
	_ DBTXWithCopyAndBatch = (*clusterpool.Pool)(nil)
	_ DBTX                 = pgx.Tx(nil) // Queries.WithTx
)

// What sqlc would generate for a small schema and these queries:
//
//	CREATE TABLE kv (k STRING PRIMARY KEY, v INT8);
//	-- name: UpsertKV :exec
//	UPSERT INTO kv (k, v) VALUES ($1, $2);
//	-- name: GetKV :one
//	SELECT k, v FROM kv WHERE k = $1;
//	-- name: CountKV :one
//	SELECT count(*) FROM kv;

type Queries struct{ db DBTX }

func NewQueries(db DBTX) *Queries { return &Queries{db: db} }

func (q *Queries) WithTx(tx pgx.Tx) *Queries { return &Queries{db: tx} }

type Kv struct {
	K string
	V int64
}

const upsertKV = `-- name: UpsertKV :exec
UPSERT INTO kv (k, v) VALUES ($1, $2)
`

type UpsertKVParams struct {
	K string
	V int64
}

func (q *Queries) UpsertKV(ctx context.Context, arg UpsertKVParams) error {
	_, err := q.db.Exec(ctx, upsertKV, arg.K, arg.V)
	return err
}

const getKV = `-- name: GetKV :one
SELECT k, v FROM kv WHERE k = $1
`

func (q *Queries) GetKV(ctx context.Context, k string) (Kv, error) {
	row := q.db.QueryRow(ctx, getKV, k)
	var i Kv
	err := row.Scan(&i.K, &i.V)
	return i, err
}

const countKV = `-- name: CountKV :one
SELECT count(*) FROM kv
`

func (q *Queries) CountKV(ctx context.Context) (int64, error) {
	row := q.db.QueryRow(ctx, countKV)
	var count int64
	err := row.Scan(&count)
	return count, err
}

// sqlc's generated code for pgx/v5 takes a *clusterpool.Pool where it took
// a *pgxpool.Pool: pass the pool to the generated New. The statements then
// get the pool's balancing and retries (UPSERT is idempotent, so it could
// be marked with WithIdempotent; GetKV and CountKV are reads and are retried
// on another node on a connection failure).
func Example_sqlc() {
	ctx := context.Background()
	// One in-process node, so the example runs anywhere; each clustertest
	// node has its own data, unlike a CockroachDB cluster.
	cluster, err := clustertest.Start(ctx, clustertest.Options{Nodes: 1, InProcess: true})
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Close()
	pool, err := clusterpool.New(ctx, cluster.DSN())
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, "CREATE TABLE IF NOT EXISTS kv (k STRING PRIMARY KEY, v INT8)"); err != nil {
		log.Fatal(err)
	}

	q := NewQueries(pool) // generated: func New(db DBTX) *Queries
	for i, k := range []string{"a", "b", "a"} {
		if err := q.UpsertKV(clusterpool.WithIdempotent(ctx), UpsertKVParams{K: k, V: int64(i)}); err != nil {
			log.Fatal(err)
		}
	}
	kv, err := q.GetKV(ctx, "a")
	if err != nil {
		log.Fatal(err)
	}
	n, err := q.CountKV(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("a=%d, %d keys\n", kv.V, n)
	// Output:
	// a=2, 2 keys
}

// On a 3-node PostgreSQL cluster: generated queries run on the pool and, via
// WithTx, in a transaction of the pool, and the pool tracks the connections.
func TestSqlcQueriesOnCluster(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pool, err := clusterpool.New(ctx, c.DSN()+"&pool_min_conns=3&pool_max_conns=6")
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()

	// Each clustertest node has its own data: the table exists in the
	// transaction's session only.
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, "CREATE TEMP TABLE kv (k TEXT PRIMARY KEY, v INT8) ON COMMIT DROP"); err != nil {
		t.Fatal(err)
	}
	qtx := NewQueries(pool).WithTx(tx)
	const upsertPG = "INSERT INTO kv (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
	for i, k := range []string{"a", "b", "a"} {
		if _, err := tx.Exec(ctx, upsertPG, k, i); err != nil {
			t.Fatal(err)
		}
	}
	kv, err := qtx.GetKV(ctx, "a")
	if err != nil || kv != (Kv{"a", 2}) {
		t.Fatalf("GetKV = %+v, %v", kv, err)
	}
	if n, err := qtx.CountKV(ctx); err != nil || n != 2 {
		t.Fatalf("CountKV = %d, %v", n, err)
	}
	acquired := 0
	for _, s := range pool.NodeStats() {
		acquired += int(s.AcquiredConns)
	}
	if acquired != 1 {
		t.Errorf("NodeStat: %d acquired during the transaction, want 1: %+v", acquired, pool.NodeStats())
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}

	// Outside a transaction the pool itself is the DBTX; a read is routed
	// like any other statement.
	q := NewQueries(pool)
	if _, err := q.GetKV(ctx, "a"); err == nil {
		t.Error("GetKV found a row in a temporary table that was dropped")
	}
	if len(pool.NodeStats()) == 0 {
		t.Error("no node tracked")
	}
}
