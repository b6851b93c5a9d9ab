// Command clusterbench shows, in a minute or two and with no set-up, what
// clusterpool does on a cluster that plain pgxpool does not: it starts a
// local 3-node cluster, runs the same scenarios (start-up balance, scale-out,
// rolling restart, crash, hot spot, two regions, per-query overhead, and on request a
// fleet of pools sharing one cluster) with both pools,
// prints a table with ratios to pgxpool and writes an HTML report with a plot
// of connections per node over time for each scenario.
//
//	go run ./cmd/clusterbench                 # seven scenarios, about 1 minute
//	go run ./cmd/clusterbench -scenario fleet # 16 pools on one cluster, about 2 minutes
//	go run ./cmd/clusterbench -scenario crash -duration 10s
//	go run ./cmd/clusterbench -json > results.json
//	go run ./cmd/clusterbench -cluster cluster_connect_rate=0   # try other clusterpool settings
//	go run ./cmd/clusterbench -dsn 'postgres://root@lb:26257/bench'  # balance and overhead only
//
// Run it with -h for every flag.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// Ctrl-C ends the run early; every scenario then closes its pool and its
	// embedded cluster (removing the data directories) before exiting.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
