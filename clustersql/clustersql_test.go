package clustersql_test

import (
	"context"
	"database/sql"
	"fmt"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clustersql"
	"github.com/clusterpool/clusterpool/clustertest"
)

func TestDatabaseSQLOnCluster(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 3, Balancing: clustertest.RoundRobin})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg, err := clusterpool.ParseConfig(c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	cfg.MinConns, cfg.MaxConns = 6, 6
	cfg.ConnectRate = -1 // no limit
	pool, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	db := clustersql.OpenDB(pool)
	defer db.Close()

	// Statements through the *sql.DB may run on any node, and each
	// clustertest node has its own data, so state lives in one connection.
	var sum int
	if err := db.QueryRowContext(ctx, "SELECT $1::int + $2::int", 40, 2).Scan(&sum); err != nil || sum != 42 {
		t.Fatalf("SELECT $1 + $2 = %d, %v", sum, err)
	}
	conn, err := db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ExecContext(ctx, "CREATE TEMP TABLE sqlkv (k INT PRIMARY KEY, v TEXT NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if _, err := conn.ExecContext(ctx, "INSERT INTO sqlkv (k, v) VALUES ($1, $2)", i, fmt.Sprint("v", i)); err != nil {
			t.Fatal(err)
		}
	}
	var n int
	if err := conn.QueryRowContext(ctx, "SELECT count(*) FROM sqlkv").Scan(&n); err != nil || n != 5 {
		t.Fatalf("count = %d, %v; want 5", n, err)
	}
	conn.Close()
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, "CREATE TEMP TABLE t (x INT) ON COMMIT DROP"); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, "INSERT INTO t VALUES ($1)", 1); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}

	// database/sql connections are the pool's: NodeStats counts them as
	// acquired while held, on the nodes they reached.
	var held []*sql.Conn
	for range 4 {
		conn, err := db.Conn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := conn.PingContext(ctx); err != nil {
			t.Fatal(err)
		}
		held = append(held, conn)
	}
	acquired, total := 0, 0
	for _, s := range pool.NodeStats() {
		acquired += int(s.AcquiredConns)
		total += int(s.TotalConns)
	}
	if acquired != 4 || total < 4 {
		t.Errorf("NodeStat: %d acquired of %d, want 4 acquired: %+v", acquired, total, pool.NodeStats())
	}
	if st := pool.Stat(); st.AcquiredConns() != 4 {
		t.Errorf("pgxpool Stat: %d acquired, want 4", st.AcquiredConns())
	}
	for _, conn := range held {
		conn.Close()
	}
	for _, s := range pool.NodeStats() {
		if s.AcquiredConns != 0 {
			t.Errorf("node %d: %d still acquired after database/sql released them", s.ID, s.AcquiredConns)
		}
	}
	if stats := db.Stats(); stats.Idle != 0 {
		t.Errorf("sql.DB keeps %d idle connections, want 0 (the pool keeps them)", stats.Idle)
	}
	// The pool's view equals the servers': every connection database/sql
	// used is counted on the node it reached.
	deadline := time.Now().Add(20 * time.Second)
	for {
		mine, servers := map[int]int{}, map[int]int{}
		for _, s := range pool.NodeStats() {
			if s.TotalConns > 0 {
				mine[int(s.ID)] = int(s.TotalConns)
			}
		}
		for id, k := range c.OpenConns() {
			if k > 0 {
				servers[id] = k
			}
		}
		if fmt.Sprint(mine) == fmt.Sprint(servers) && len(mine) == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pool counts %v, servers %v", mine, servers)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
