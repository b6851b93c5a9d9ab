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
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg, err := clusterpool.ParseConfig(c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	cfg.MinConns, cfg.MaxConns = 6, 6
	cfg.ConnectRate = 0
	pool, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	db := clustersql.OpenDB(pool)
	defer db.Close()

	if _, err := db.ExecContext(ctx, "CREATE TABLE IF NOT EXISTS sqlkv (k INT PRIMARY KEY, v TEXT NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if _, err := db.ExecContext(ctx, "INSERT INTO sqlkv (k, v) VALUES ($1, $2)", i, fmt.Sprint("v", i)); err != nil {
			t.Fatal(err)
		}
	}
	var n int
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM sqlkv").Scan(&n); err != nil || n != 5 {
		t.Fatalf("count = %d, %v; want 5", n, err)
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, "UPDATE sqlkv SET v = 'x' WHERE k = $1", 1); err != nil {
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
		t.Errorf("NodeStats: %d acquired of %d, want 4 acquired: %+v", acquired, total, pool.NodeStats())
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
	if len(pool.NodeStats()) != 3 {
		t.Errorf("NodeStats has %d nodes, want 3: %+v", len(pool.NodeStats()), pool.NodeStats())
	}
}
