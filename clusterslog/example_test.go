package clusterslog_test

import (
	"context"
	"log"
	"log/slog"
	"os"
	"time"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clusterslog"
	"github.com/clusterpool/clusterpool/clustertest"
)

func Example() {
	ctx := context.Background()
	cluster, err := clustertest.Start(ctx, clustertest.Options{Nodes: 1, InProcess: true})
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Close()

	// Any slog.Logger; here text without timestamps, so the output is stable.
	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	}))
	cfg, err := clusterpool.ParseConfig(cluster.DSN())
	if err != nil {
		log.Fatal(err)
	}
	cfg.Tracer = clusterslog.New(logger)
	cfg.ProbeInterval = time.Hour
	pool, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	if err := pool.Ping(ctx); err != nil {
		log.Fatal(err)
	}
	// Output:
	// level=INFO msg="clusterpool: node added" node=1
}
