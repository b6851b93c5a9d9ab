package clusterpool

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The benchmarks compare *pgxpool.Pool and *Pool on the same node in the
// same run: one real PostgreSQL server behind a clustertest proxy, which makes
// it look like CockroachDB, so clusterpool's tracking is on. Compare the
// sub-benchmarks' ns/op (the README has the ratio and the command).

// benchPool is what the benchmarks use of either pool.
type benchPool interface {
	Acquire(context.Context) (*pgxpool.Conn, error)
	Exec(context.Context, string, ...any) (pgconn.CommandTag, error)
}

// benchPools starts a one-node cluster and returns its two pools.
func benchPools(b *testing.B) map[string]benchPool {
	b.Helper()
	c := clustertest.New(b, clustertest.Options{Nodes: 1})
	dsn := c.Nodes()[0].DSN()
	ctx := context.Background()
	ref, err := pgxpool.New(ctx, dsn)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(ref.Close)
	p, err := New(ctx, dsn)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(p.Close)
	if err := p.Ping(ctx); err != nil {
		b.Fatal(err)
	}
	if len(p.NodeStats()) != 1 {
		b.Fatalf("clusterpool does not track the node: %+v", p.NodeStats())
	}
	return map[string]benchPool{"pgxpool": ref, "clusterpool": p}
}

var benchOrder = []string{"pgxpool", "clusterpool"}

func BenchmarkExecSelect1(b *testing.B) {
	pools := benchPools(b)
	ctx := context.Background()
	for _, name := range benchOrder {
		pool := pools[name]
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := pool.Exec(ctx, "SELECT 1"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkAcquireRelease(b *testing.B) {
	pools := benchPools(b)
	ctx := context.Background()
	for _, name := range benchOrder {
		pool := pools[name]
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				conn, err := pool.Acquire(ctx)
				if err != nil {
					b.Fatal(err)
				}
				conn.Release()
			}
		})
	}
}

// BenchmarkAcquireReleaseParallel shows that acquire and release take no
// pool-wide lock of clusterpool's own: contention is pgxpool's.
func BenchmarkAcquireReleaseParallel(b *testing.B) {
	pools := benchPools(b)
	ctx := context.Background()
	for _, name := range benchOrder {
		pool := pools[name]
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					conn, err := pool.Acquire(ctx)
					if err != nil {
						b.Error(err)
						return
					}
					conn.Release()
				}
			})
		})
	}
}

// BenchmarkRatio measures clusterpool against pgxpool interleaved: blocks of
// operations alternate between the two pools (and which goes first), so load
// from other processes hits both alike. It reports each pool's ns/op and the
// median over block pairs of clusterpool's time divided by pgxpool's
// ("ratio"; 1.00 means equal, 1.03 means 3% slower).
func BenchmarkRatio(b *testing.B) {
	pools := benchPools(b)
	ctx := context.Background()
	ops := map[string]func(benchPool) error{
		"ExecSelect1": func(pool benchPool) error {
			_, err := pool.Exec(ctx, "SELECT 1")
			return err
		},
		"AcquireRelease": func(pool benchPool) error {
			conn, err := pool.Acquire(ctx)
			if err == nil {
				conn.Release()
			}
			return err
		},
	}
	for _, opName := range []string{"ExecSelect1", "AcquireRelease"} {
		op := ops[opName]
		b.Run(opName, func(b *testing.B) {
			const block = 32
			var total [2]time.Duration
			var ratios []float64
			runBlock := func(i int) time.Duration {
				pool := pools[benchOrder[i]]
				start := time.Now()
				for range block {
					if err := op(pool); err != nil {
						b.Fatal(err)
					}
				}
				d := time.Since(start)
				total[i] += d
				return d
			}
			n := 0
			for b.Loop() {
				var d [2]time.Duration
				first := n % 2
				d[first] = runBlock(first)
				d[1-first] = runBlock(1 - first)
				ratios = append(ratios, float64(d[1])/float64(d[0]))
				n++
			}
			slices.Sort(ratios)
			b.ReportMetric(float64(total[0].Nanoseconds())/float64(n*block), "pgxpool-ns/op")
			b.ReportMetric(float64(total[1].Nanoseconds())/float64(n*block), "clusterpool-ns/op")
			b.ReportMetric(ratios[len(ratios)/2], "ratio")
		})
	}
}
