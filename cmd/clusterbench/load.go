package main

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/clusterpool/clusterpool"
)

// db is what the workload needs from a pool; *pgxpool.Pool and
// *clusterpool.Pool both have it, with the same signatures.
type db interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Stat() *pgxpool.Stat
	Close()
}

var (
	_ db = (*pgxpool.Pool)(nil)
	_ db = (*clusterpool.Pool)(nil)
)

const (
	createKV = "CREATE TABLE IF NOT EXISTS kv (k INT8 PRIMARY KEY, v INT8 NOT NULL)"
	upsertKV = "INSERT INTO kv (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
	readKV   = "SELECT v FROM kv WHERE k = $1"
	keySpace = 1000

	// opTimeout bounds one operation, as a service would bound a request.
	opTimeout = 5 * time.Second
)

// workload is what each worker does in a loop.
type workload int

const (
	// kvMix: 80% reads by key, 20% idempotent upserts (marked as such with
	// clusterpool.WithIdempotent, as a user would), 2 ms think time: steady
	// application traffic that leaves the CPU room for the cluster.
	kvMix workload = iota
	// selectOne: SELECT 1 back to back, for the pool's own overhead.
	selectOne
	// sleepQuery: SELECT pg_sleep(hotSpotQuery), server time that counts
	// against a node's capacity (clustertest's SetCapacity).
	sleepQuery
)

const hotSpotQuery = 10 * time.Millisecond

// recorder collects the outcome of every operation of one run.
type recorder struct {
	start time.Time

	ops, errs atomic.Int64
	lastErr   atomic.Int64 // nanoseconds after start of the last error; 0 if none

	mu       sync.Mutex // protects the fields below
	lat      []time.Duration
	at       []time.Duration // when each of lat's operations started, after start
	examples []string
}

func newRecorder(start time.Time) *recorder { return &recorder{start: start} }

// add records operations: their latencies and when each started.
func (r *recorder) add(lat, at []time.Duration) {
	r.mu.Lock()
	r.lat = append(r.lat, lat...)
	r.at = append(r.at, at...)
	r.mu.Unlock()
}

func (r *recorder) fail(err error) {
	r.errs.Add(1)
	r.lastErr.Store(int64(time.Since(r.start)))
	msg := err.Error()
	if len(msg) > 200 {
		msg = msg[:200] + "…"
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.examples) >= 5 {
		return
	}
	for _, e := range r.examples {
		if e == msg {
			return
		}
	}
	r.examples = append(r.examples, msg)
}

// runLoad runs workers until until is done and records into rec. Each
// operation runs under ctx, not until: the load's end lets operations in
// flight finish, as a service's shutdown would, because pgx closes a
// connection whose query is cancelled, and the harness's own cancellations
// would otherwise take up to one connection per worker from the pool just
// before its final counts are read.
func runLoad(ctx, until context.Context, d db, w workload, workers int, seed int64, rec *recorder) {
	var wg sync.WaitGroup
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(seed), uint64(i)))
			lat, at := make([]time.Duration, 0, 4096), make([]time.Duration, 0, 4096)
			for until.Err() == nil {
				t0 := time.Now()
				err := doOp(ctx, d, w, rng)
				el := time.Since(t0)
				if until.Err() != nil {
					break // the run ended during this op: neither success nor failure
				}
				lat, at = append(lat, el), append(at, t0.Sub(rec.start))
				rec.ops.Add(1)
				if err != nil {
					rec.fail(err)
				}
				if w == kvMix {
					sleepCtx(until, 2*time.Millisecond)
				}
			}
			rec.add(lat, at)
		}()
	}
	wg.Wait()
}

func doOp(ctx context.Context, d db, w workload, rng *rand.Rand) error {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	switch w {
	case selectOne:
		var n int
		return d.QueryRow(ctx, "SELECT 1").Scan(&n)
	case sleepQuery:
		_, err := d.Exec(ctx, "SELECT pg_sleep($1)", hotSpotQuery.Seconds())
		return err
	default:
		k := rng.Int64N(keySpace)
		if rng.IntN(5) == 0 {
			_, err := d.Exec(clusterpool.WithIdempotent(ctx), upsertKV, k, rng.Int64())
			return err
		}
		var v int64
		err := d.QueryRow(ctx, readKV, k).Scan(&v)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil // every node has its own data: a key may not be there yet
		}
		return err
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}
