package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/jackc/pgx/v5/pgxpool"
)

// An acquire whose context ends during pgxpool's acquire-time ping gives up
// on the ping, which goes on and succeeds: pgxpool puts the connection back.
// Closing that working connection later is not a failed ping: its node is
// not asked about (no cut counted, no health check).
func TestAbandonedPingIsNotACut(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 1, InProcess: true})
	var cancelAcquire atomic.Pointer[context.CancelFunc]
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 1, 1
		cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
		cfg.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool {
			if cancel := cancelAcquire.Swap(nil); cancel != nil {
				(*cancel)() // the acquirer gives up as the ping starts
			}
			return true
		}
	})
	fillPool(t, p)
	n := p.tracker.nodeList()[0]

	c.Node(1).SetLatency(300 * time.Millisecond) // the ping is still under way when the acquire ends
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cancelAcquire.Store(&cancel)
	if _, err := p.Acquire(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Acquire with its context cancelled during the ping: %v", err)
	}
	waitCond(t, func() string {
		if st := p.Stat(); st.IdleConns() != 1 || st.AcquiredConns() != 0 {
			return fmt.Sprintf("ping not back yet: %d idle, %d acquired", st.IdleConns(), st.AcquiredConns())
		}
		return ""
	})
	c.Node(1).SetLatency(0)

	var pinged *connState
	n.mu.Lock()
	for cs := range n.connSet {
		pinged = cs
	}
	n.mu.Unlock()
	p.Reset() // closes the working connection (and the pool opens another)
	waitCond(t, func() string {
		if !pinged.closed.Load() {
			return "the pinged connection is still tracked"
		}
		return ""
	})
	if k := n.cuts.Load(); k != 0 {
		t.Errorf("closing a connection whose ping succeeded counted %d cut calls on its node", k)
	}
}

// A sweep of the idle connections (here retireIdle, as after an eviction;
// also a balance round and a health check's ping) takes them out of the pool
// and puts them back: that is no call on them, so a health check watching
// the node must not take the sweep's release for a call that finished (a
// sign that the node answers). The user has no PrepareConn here.
func TestSweepIsNotACall(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 1, InProcess: true})
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 2, 2
		cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
	})
	fillPool(t, p)
	n := p.tracker.nodeList()[0]
	releases := make(map[*connState]uint32)
	n.mu.Lock()
	for cs := range n.connSet {
		releases[cs] = cs.releases()
	}
	n.mu.Unlock()
	if len(releases) != 2 {
		t.Fatalf("%d connections tracked, want 2", len(releases))
	}
	if k := p.retireIdle(testCtx(t)); k != 0 {
		t.Fatalf("retireIdle destroyed %d healthy connections", k)
	}
	for cs, before := range releases {
		if got := cs.releases(); got != before || cs.inUse() {
			t.Errorf("after a sweep a connection shows %d releases (was %d), in use %v", got, before, cs.inUse())
		}
	}
}
