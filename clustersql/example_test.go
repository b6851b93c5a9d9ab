package clustersql_test

import (
	"context"
	"fmt"
	"log"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clustersql"
	"github.com/clusterpool/clusterpool/clustertest"
)

func ExampleOpenDB() {
	ctx := context.Background()
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

	db := clustersql.OpenDB(pool)
	defer db.Close() // before pool.Close

	var one int
	if err := db.QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil {
		log.Fatal(err)
	}
	stats := pool.NodeStats()
	fmt.Printf("SELECT 1 = %d; the pool tracks %d node(s)\n", one, len(stats))
	// Output:
	// SELECT 1 = 1; the pool tracks 1 node(s)
}
