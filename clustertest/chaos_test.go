package clustertest

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// TestChaos runs clients against the load balancer while every fault is
// injected at once, then closes the cluster mid-flight: nothing may panic,
// race, deadlock or leak a goroutine. Query errors are expected.
func TestChaos(t *testing.T) {
	t.Run("InProcess", func(t *testing.T) { testChaos(t, true) })
	t.Run("PostgreSQL", func(t *testing.T) {
		requirePostgres(t)
		testChaos(t, false)
	})
}

func testChaos(t *testing.T, inProcess bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := Start(ctx, Options{Nodes: 3, InProcess: inProcess, Seed: 11})
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				qctx, qcancel := context.WithTimeout(ctx, 300*time.Millisecond)
				if conn, err := pgconn.Connect(qctx, c.DSN()); err == nil {
					conn.Exec(qctx, "SELECT 1").ReadAll()
					conn.Close(qctx)
				}
				qcancel()
			}
		}()
	}
	for round := 0; round < 30; round++ {
		n := c.Nodes()[round%3]
		switch round % 6 {
		case 0:
			n.Kill()
		case 1:
			dctx, dcancel := context.WithTimeout(ctx, 50*time.Millisecond)
			n.Drain(dctx, 20*time.Millisecond)
			dcancel()
		case 2:
			n.Partition()
		case 3:
			n.SetCapacity(1)
			n.SetLatency(time.Millisecond)
		case 4:
			n.Heal()
			n.SetCapacity(0)
			n.SetLatency(0)
		case 5:
			if added, err := c.AddNode(ctx); err == nil {
				c.RemoveNode(ctx, added.ID())
			}
		}
		for _, n := range c.Nodes() {
			if round%2 == 1 {
				n.Restart(ctx)
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	closed := make(chan error)
	go func() { closed <- c.Close() }() // while the clients still run
	c.AddNode(ctx)                      // wins or loses the race with Close; either way nothing may be left
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	close(stop)
	wg.Wait()
	if left := clustertestGoroutinesAfter(); len(left) > 0 {
		t.Fatalf("%d goroutines left after Close:\n%s", len(left), strings.Join(left, "\n\n"))
	}
}
