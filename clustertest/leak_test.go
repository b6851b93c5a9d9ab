package clustertest

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// clustertestGoroutines returns the stacks of goroutines running clustertest
// code, other than tests.
func clustertestGoroutines() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var found []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "clustertest.(*") || strings.Contains(g, "clustertest.launchPostgres") {
			if !strings.Contains(g, "clustertest.Test") && !strings.Contains(g, "clustertest.Benchmark") {
				found = append(found, g)
			}
		}
	}
	return found
}

// clustertestGoroutinesAfter returns what clustertestGoroutines still finds
// after giving goroutines that were told to stop (a caller's Drain that just
// got its answer, say) up to 5 s to be scheduled and return. The cluster's
// own goroutines are gone when Close returns.
func clustertestGoroutinesAfter() []string {
	deadline := time.Now().Add(5 * time.Second)
	for {
		left := clustertestGoroutines()
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestCloseLeavesNoGoroutine exercises every kind of goroutine the cluster
// starts (load balancer relays, proxies, drains, cancels, held partitions),
// leaves connections open, and checks that Close ends them all.
func TestCloseLeavesNoGoroutine(t *testing.T) {
	for _, inProcess := range []bool{true, false} {
		if !inProcess {
			requirePostgres(t)
		}
		ctx := testCtx(t)
		c, err := Start(ctx, Options{Nodes: 2, InProcess: inProcess})
		if err != nil {
			t.Fatal(err)
		}
		var conns []*pgconn.PgConn
		for _, dsn := range []string{c.DSN(), c.DSN(), c.Node(1).DSN(), c.Node(2).DSN(), c.Node(2).DSN()} {
			conn, err := pgconn.Connect(ctx, dsn)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(context.Background())
			conns = append(conns, conn)
		}
		n1, n2 := c.Node(1), c.Node(2)
		// pgconn.Exec sends without waiting for the answer.
		n2.SetCapacity(1)
		conns[3].Exec(ctx, "SELECT pg_sleep(3600)") // holds node 2's only slot
		conns[4].Exec(ctx, "SELECT 1")              // queues behind it
		n1.SetLatency(time.Hour)
		conns[2].Exec(ctx, "SELECT 1") // waits in node 1's latency
		eventually(t, "a query in flight on node 2", func() bool { inFlight, _ := n2.queries.stats(); return inFlight == 1 })
		n2.Partition()
		go n2.Drain(ctx, time.Hour)
		n1.Kill()
		eventually(t, "node 2 draining", func() bool { return n2.State() == Draining })
		if len(clustertestGoroutines()) == 0 {
			t.Fatal("found no cluster goroutine before Close: the check below would prove nothing")
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if err := c.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		if left := clustertestGoroutinesAfter(); len(left) > 0 {
			t.Fatalf("InProcess=%v: %d goroutines left after Close:\n%s", inProcess, len(left), strings.Join(left, "\n\n"))
		}
		for _, conn := range conns {
			conn.Close(ctx)
		}
	}
}
