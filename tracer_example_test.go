package clusterpool_test

import (
	"context"
	"fmt"
	"log"
	"log/slog"
	"os"
	"time"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clusterslog"
	"github.com/clusterpool/clusterpool/clustertest"
)

// evictionAlerter is a tracer of one's own: it implements only the
// interface it needs.
type evictionAlerter struct{}

func (evictionAlerter) TraceNodeAdded(_ context.Context, _ *clusterpool.Pool, d clusterpool.TraceNodeAddedData) {
	fmt.Println("alerter: node", d.Node, "joined")
}

func (evictionAlerter) TraceNodeRemoved(context.Context, *clusterpool.Pool, clusterpool.TraceNodeRemovedData) {
}

func (evictionAlerter) TraceNodeHealth(_ context.Context, _ *clusterpool.Pool, d clusterpool.TraceNodeHealthData) {
	if !d.Healthy {
		fmt.Println("alerter: page someone, node", d.Node, "evicted")
	}
}

func (evictionAlerter) TraceNodeDraining(context.Context, *clusterpool.Pool, clusterpool.TraceNodeDrainingData) {
}

// Config.Tracer takes one value; CombineTracers sends each event to every
// tracer that implements its interface, here a tracer of one's own and the
// slog adapter.
func ExampleCombineTracers() {
	ctx := context.Background()
	cluster, err := clustertest.Start(ctx, clustertest.Options{Nodes: 1, InProcess: true})
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Close()

	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{} // stable output
			}
			return a
		},
	}))
	cfg, err := clusterpool.ParseConfig(cluster.DSN())
	if err != nil {
		log.Fatal(err)
	}
	cfg.Tracer = clusterpool.CombineTracers(evictionAlerter{}, clusterslog.New(logger))
	cfg.ProbeInterval = time.Hour
	pool, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	if err := pool.Ping(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("nodes added:", pool.ClusterStat().NodesAdded())
	// Output:
	// alerter: node 1 joined
	// level=INFO msg="clusterpool: node added" node=1
	// nodes added: 1
}
