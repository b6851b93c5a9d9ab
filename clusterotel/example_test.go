package clusterotel_test

import (
	"context"
	"fmt"
	"log"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clusterotel"
	"github.com/clusterpool/clusterpool/clustertest"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

func ExampleRegister() {
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

	// Your MeterProvider, with your exporter's reader; a ManualReader here.
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer mp.Shutdown(ctx)
	reg, err := clusterotel.Register(mp, "orders", pool)
	if err != nil {
		log.Fatal(err)
	}
	defer reg.Unregister()

	var rm metricdata.ResourceMetrics
	if err := reader.Collect(ctx, &rm); err != nil {
		log.Fatal(err)
	}
	for _, m := range rm.ScopeMetrics[0].Metrics {
		if m.Name == "clusterpool.max_conns" {
			fmt.Println(m.Name, m.Data.(metricdata.Sum[int64]).DataPoints[0].Value == int64(pool.Stat().MaxConns()))
		}
	}
	// Output:
	// clusterpool.max_conns true
}
