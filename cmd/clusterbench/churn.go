package main

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// startChurn opens a connection to dsn every interval, and closes it at
// once, until ctx ends; wait waits for that and returns how many the
// servers accepted. With -pgxpool-churn it runs beside pgxpool's load, so
// that pgxpool pays for connection set-ups as clusterpool pays for its
// probes and moves. On one machine the servers and the callers share the CPU,
// and the set-ups' cost shows in every caller's latency, not only in the
// pool that made them; the flag tells that cost apart from the rest.
func startChurn(ctx context.Context, dsn string, interval time.Duration) (wait func() int64) {
	var accepted atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			conn, err := pgx.Connect(ctx, dsn)
			if err != nil {
				continue // a node down, or the run ending: no set-up to count
			}
			accepted.Add(1)
			closeCtx, cancel := context.WithTimeout(context.Background(), time.Second)
			_ = conn.Close(closeCtx)
			cancel()
		}
	}()
	return func() int64 {
		<-done
		return accepted.Load()
	}
}
