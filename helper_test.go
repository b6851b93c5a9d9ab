package clusterpool

import (
	"context"
	"fmt"
	"maps"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
	"golang.org/x/time/rate"
)

// Tests wait for conditions with a generous deadline and never assert on wall
// time: the machine running them may be loaded.
const (
	condTimeout = 20 * time.Second
	condPoll    = 20 * time.Millisecond
)

// waitCond polls cond until it returns "" (met) or condTimeout passes, and
// then fails the test with cond's last description of what is still wrong.
func waitCond(t testing.TB, cond func() string) {
	t.Helper()
	waitCondWithin(t, condTimeout, cond)
}

// waitCondWithin is waitCond with the deadline d.
func waitCondWithin(t testing.TB, d time.Duration, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		msg := cond()
		if msg == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met after %v: %s", d, msg)
		}
		time.Sleep(condPoll)
	}
}

// emptyBucket takes every whole token left in lim's bucket, however many
// the pool's own connects took first: AllowN takes nothing when it asks
// for more than the bucket holds, so spending "the burst" leaves whatever
// is there when a background connect got in before.
func emptyBucket(lim *rate.Limiter) {
	for {
		now := time.Now()
		n := int(lim.TokensAt(now))
		if n < 1 || lim.AllowN(now, n) {
			return
		}
	}
}

// startPool parses connString, lets mutate adjust the config, and creates a
// pool that is closed when the test ends.
func startPool(t testing.TB, connString string, mutate func(*Config)) *Pool {
	t.Helper()
	cfg, err := ParseConfig(connString)
	if err != nil {
		t.Fatal(err)
	}
	if mutate != nil {
		mutate(cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), condTimeout)
	defer cancel()
	p, err := NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// testCtx is a context for one test step, bounded so a hang fails the test.
func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), condTimeout)
	t.Cleanup(cancel)
	return ctx
}

// poolCounts returns the pool's TotalConns per node.
func poolCounts(p *Pool) map[int]int {
	m := make(map[int]int)
	for _, s := range p.NodeStats() {
		if s.TotalConns > 0 {
			m[int(s.ID)] = int(s.TotalConns)
		}
	}
	return m
}

// serverCounts returns the proxies' open connections per node, without zeros.
func serverCounts(c *clustertest.Cluster) map[int]int {
	m := c.OpenConns()
	maps.DeleteFunc(m, func(_, n int) bool { return n == 0 })
	return m
}

// countsMatch is a waitCond condition: the pool's per-node counts equal what
// the servers see.
func countsMatch(p *Pool, c *clustertest.Cluster) func() string {
	return func() string {
		pool, servers := poolCounts(p), serverCounts(c)
		if !maps.Equal(pool, servers) {
			return fmt.Sprintf("pool counts %v, servers see %v", pool, servers)
		}
		return ""
	}
}

// pollWindow tells how much a counter grew since the poll before last: what
// the servers may still count for a moment after the pool is done with it
// (a session the pool closed or refused is gone from a server a little
// after the pool lets it go).
type pollWindow struct{ prev, last int64 }

// sinceLastPolls starts a window at the counter's value now.
func sinceLastPolls(now int64) *pollWindow { return &pollWindow{now, now} }

// poll records the counter's value now and returns its growth since the
// poll before last.
func (w *pollWindow) poll(now int64) int {
	d := now - w.prev
	w.prev, w.last = w.last, now
	return int(d)
}
