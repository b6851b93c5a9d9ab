package clusterprom_test

import (
	"context"
	"fmt"
	"log"
	"strings"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clusterprom"
	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func ExampleNewCollector() {
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
	if err := pool.Ping(ctx); err != nil {
		log.Fatal(err)
	}

	// Your registry (or prometheus.DefaultRegisterer, if you use it); one
	// collector per pool, told apart by the pool label.
	reg := prometheus.NewRegistry()
	reg.MustRegister(clusterprom.NewCollector("orders", pool))

	err = testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP clusterpool_nodes Nodes known to the pool by state; each node counts once: unhealthy, else draining, else healthy.
# TYPE clusterpool_nodes gauge
clusterpool_nodes{pool="orders",state="draining"} 0
clusterpool_nodes{pool="orders",state="healthy"} 1
clusterpool_nodes{pool="orders",state="unhealthy"} 0
`), "clusterpool_nodes")
	fmt.Println("clusterpool_nodes as expected:", err == nil)
	// Output:
	// clusterpool_nodes as expected: true
}
