package clustertest

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
)

// BenchmarkStartCluster3 measures starting and closing a 3-node PostgreSQL
// cluster (the initdb template already exists after the first iteration).
func BenchmarkStartCluster3(b *testing.B) {
	if err := Available(); err != nil {
		b.Skip(err)
	}
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
	c := New(b, Options{Nodes: 1})
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
