package clustertest

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// BenchmarkStartCluster3 measures starting and closing a 3-node PostgreSQL
// cluster in the steady state of a test suite: the initdb template exists
// and each iteration reuses the spare data directories the previous one left.
func BenchmarkStartCluster3(b *testing.B) {
	requirePostgres(b)
	ctx := context.Background()
	for b.Loop() {
		c, err := Start(ctx, Options{Nodes: 3})
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkProxySelect1 measures SELECT 1 round trips on one connection,
// straight to PostgreSQL and through the node proxy; the ratio of the two is
// the proxy's overhead.
func BenchmarkProxySelect1(b *testing.B) {
	c := New(b, Options{Nodes: 1, Logf: func(string, ...any) {}})
	ctx := context.Background()
	n := c.Node(1)
	for _, bc := range []struct{ name, dsn string }{{"direct", n.PostgresDSN()}, {"proxy", n.DSN()}} {
		b.Run(bc.name, func(b *testing.B) {
			conn, err := pgx.Connect(ctx, bc.dsn)
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close(ctx)
			var one int
			for b.Loop() {
				if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkProxyOverhead alternates one SELECT 1 straight to PostgreSQL and
// one through the proxy, so both see the same machine load, and reports the
// proxy's round trip time over the direct one (lower is better; 1 would be
// free).
func BenchmarkProxyOverhead(b *testing.B) {
	c := New(b, Options{Nodes: 1, Logf: func(string, ...any) {}})
	n := c.Node(1)
	benchAlternate(b, n.PostgresDSN(), n.DSN(), "proxy/direct")
}

// benchAlternate alternates one SELECT 1 on a connection to base and one on
// a connection to other, so both see the same machine load, and reports the
// time spent on other's over base's as unit.
func benchAlternate(b *testing.B, base, other, unit string) {
	ctx := context.Background()
	var conns [2]*pgx.Conn
	for i, dsn := range []string{base, other} {
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close(ctx)
		conns[i] = conn
	}
	var spent [2]time.Duration
	var one int
	for b.Loop() {
		for i, conn := range conns {
			start := time.Now()
			if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
				b.Fatal(err)
			}
			spent[i] += time.Since(start)
		}
	}
	b.ReportMetric(float64(spent[1])/float64(spent[0]), unit)
}
