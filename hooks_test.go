package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// hookRecorder is a HookTracer that keeps what it is told.
type hookRecorder struct {
	mu     sync.Mutex
	panics []TraceHookPanicData
}

func (r *hookRecorder) TraceHookPanic(_ context.Context, _ *Pool, data TraceHookPanicData) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.panics = append(r.panics, data)
}

// count returns how many panics of hook were reported, and checks each
// report carries the value and a stack through the test's hook.
func (r *hookRecorder) count(t *testing.T, hook string) int {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, d := range r.panics {
		if d.Hook != hook {
			continue
		}
		n++
		if d.Value == nil || !strings.Contains(string(d.Stack), "_test.go") {
			t.Errorf("%s panic reported with value %v and stack\n%s", hook, d.Value, d.Stack)
		}
	}
	return n
}

// churn opens and closes connections: rounds of n concurrent acquires that
// each run a query, then a Reset, which closes every connection (through
// BeforeClose). Acquire errors are expected when a hook fails; it returns
// how many acquires succeeded.
func churn(t *testing.T, p *Pool, rounds, n int) int {
	t.Helper()
	var ok atomic.Int64
	for range rounds {
		var wg sync.WaitGroup
		for range n {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), condTimeout)
				defer cancel()
				c, err := p.Acquire(ctx)
				if err != nil {
					return
				}
				defer c.Release()
				if _, err := c.Exec(ctx, "SELECT 1"); err == nil {
					ok.Add(1)
				}
			})
		}
		wg.Wait()
		p.Reset()
	}
	return int(ok.Load())
}

// acquire acquires a connection with the tests' generous timeout.
func acquire(p *Pool) (*pgxpool.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), condTimeout)
	defer cancel()
	return p.Acquire(ctx)
}

// countsSettle waits until the tracker's per-node counts equal the
// servers' (probe connections come and go). It compares the tracker's own
// bookkeeping first: NodeStats also forgets connections it finds closed, so
// it would hide a hook wrapper that failed to untrack one. The test pools
// run no balancing round, the only other place that sweeps.
func countsSettle(t *testing.T, p *Pool, c *clustertest.Cluster) {
	t.Helper()
	waitCond(t, func() string {
		tracked, servers := trackedCounts(p), serverCounts(c)
		if !maps.Equal(tracked, servers) {
			return fmt.Sprintf("tracker counts %v, servers see %v", tracked, servers)
		}
		return ""
	})
	waitCond(t, countsMatch(p, c))
}

// trackedCounts returns the tracker's open connections per node, without
// zeros and without sweeping closed connections.
func trackedCounts(p *Pool) map[int]int {
	m := make(map[int]int)
	for _, n := range p.tracker.nodeList() {
		if k := n.conns.Load(); k != 0 {
			m[int(n.id)] = int(k)
		}
	}
	return m
}

// hookCluster starts a 3-node cluster and a pool on its load balancer.
func hookCluster(t *testing.T, mutate func(*Config)) (*clustertest.Cluster, *Pool, *hookRecorder) {
	t.Helper()
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	rec := &hookRecorder{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MaxConns = 6
		cfg.ConnectRate = -1            // no limit
		cfg.BalanceInterval = time.Hour // pruning would close connections the test counts on
		cfg.Tracer = rec
		mutate(cfg)
	})
	return c, p, rec
}

// A user AfterConnect that fails leaves no connection counted: pgxpool
// closes the connection without BeforeClose, and the pool forgets it.
func TestHookAfterConnectFails(t *testing.T) {
	t.Parallel()
	var calls atomic.Int64
	errHook := errors.New("after connect says no")
	c, p, _ := hookCluster(t, func(cfg *Config) {
		cfg.AfterConnect = func(context.Context, *pgx.Conn) error {
			if calls.Add(1)%2 == 0 {
				return errHook
			}
			return nil
		}
	})
	ok := churn(t, p, 6, 6)
	if ok == 0 || calls.Load() < 4 {
		t.Fatalf("%d acquires succeeded, AfterConnect called %d times", ok, calls.Load())
	}
	// A failure reaches the caller as pgxpool returns it.
	var err error
	for range 20 {
		var conn *pgxpool.Conn
		if conn, err = acquire(p); err != nil {
			break
		}
		conn.Release()
		p.Reset()
	}
	if !errors.Is(err, errHook) {
		t.Errorf("Acquire: %v, want the hook's error", err)
	}
	p.Reset()
	countsSettle(t, p, c)
}

// A user BeforeClose that panics is recovered (it runs on puddle's
// goroutine, where the panic would end the test binary), counted, traced,
// and the connection is still closed and forgotten.
func TestHookBeforeClosePanics(t *testing.T) {
	t.Parallel()
	var calls atomic.Int64
	c, p, rec := hookCluster(t, func(cfg *Config) {
		cfg.BeforeClose = func(*pgx.Conn) {
			calls.Add(1)
			panic("before close blew up")
		}
	})
	if ok := churn(t, p, 6, 6); ok == 0 {
		t.Fatal("no acquire succeeded")
	}
	countsSettle(t, p, c)
	if stat := p.Stat(); stat.TotalConns() != 0 {
		t.Errorf("pgxpool still holds %d connections after Reset", stat.TotalConns())
	}
	if calls.Load() == 0 {
		t.Fatal("BeforeClose never called")
	}
	// The hook counts its call before it panics; the pool counts the panic
	// after, on puddle's goroutine.
	waitCond(t, func() string {
		n, got, traced := calls.Load(), p.ClusterStat().HookPanics(), rec.count(t, hookBeforeClose)
		if got != n || traced != int(n) {
			return fmt.Sprintf("HookPanics() = %d, %d traced, BeforeClose panicked %d times", got, traced, n)
		}
		return ""
	})
}

// A panic in AfterConnect, IdentifyNode or BeforeConnect fails the connect
// with an error naming the hook; on pgxpool's background goroutines (the
// MinConns refill) it is recovered too. Counts stay right.
func TestHookConnectPanics(t *testing.T) {
	t.Parallel()
	for _, hook := range []string{hookAfterConnect, hookIdentifyNode, hookBeforeConnect} {
		t.Run(hook, func(t *testing.T) {
			var calls atomic.Int64
			// Every other call panics, so the pool also holds connections.
			maybePanic := func() {
				if calls.Add(1)%2 == 0 {
					panic(fmt.Sprintf("%s blew up", hook))
				}
			}
			c, p, rec := hookCluster(t, func(cfg *Config) {
				cfg.MinConns = 2 // refilled in the background, through the hooks
				switch hook {
				case hookAfterConnect:
					cfg.AfterConnect = func(context.Context, *pgx.Conn) error { maybePanic(); return nil }
				case hookIdentifyNode:
					cfg.IdentifyNode = func(_ context.Context, params IdentifyNodeParams) (NodeID, string, error) {
						maybePanic()
						return DecodeProcessID(params.Conn.PgConn().PID()), "", nil
					}
				case hookBeforeConnect:
					cfg.BeforeConnect = func(context.Context, *pgx.ConnConfig) error { maybePanic(); return nil }
				}
			})
			var err error
			for range 20 {
				var conn *pgxpool.Conn
				conn, err = acquire(p)
				if err != nil {
					break
				}
				conn.Release()
				p.Reset()
			}
			want := "clusterpool: " + hook + " hook panicked: " + hook + " blew up"
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("Acquire: %v, want an error containing %q", err, want)
			}
			churn(t, p, 4, 6)
			p.Reset()
			countsSettle(t, p, c)
			waitCond(t, func() string {
				if n := rec.count(t, hook); n == 0 || int64(n) != p.ClusterStat().HookPanics() {
					return fmt.Sprintf("%d %s panics traced, HookPanics() = %d", n, hook, p.ClusterStat().HookPanics())
				}
				return ""
			})
		})
	}
}

// A panic in PrepareConn (or BeforeAcquire) fails that Acquire with an
// error naming the hook, and the connection, whose state the hook may have
// left half changed, is destroyed rather than left acquired for good.
func TestHookPrepareConnPanics(t *testing.T) {
	t.Parallel()
	for _, hook := range []string{hookPrepareConn, hookBeforeAcquire} {
		t.Run(hook, func(t *testing.T) {
			var panicNext atomic.Bool
			c, p, rec := hookCluster(t, func(cfg *Config) {
				check := func() {
					if panicNext.CompareAndSwap(true, false) {
						panic(errors.New(hook + " blew up"))
					}
				}
				if hook == hookPrepareConn {
					cfg.PrepareConn = func(context.Context, *pgx.Conn) (bool, error) { check(); return true, nil }
				} else {
					cfg.BeforeAcquire = func(context.Context, *pgx.Conn) bool { check(); return true }
				}
			})
			conn, err := acquire(p)
			if err != nil {
				t.Fatal(err)
			}
			conn.Release()
			panicNext.Store(true)
			_, err = acquire(p)
			want := "clusterpool: " + hook + " hook panicked: " + hook + " blew up"
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("Acquire: %v, want an error containing %q", err, want)
			}
			// puddle destroys a connection in a goroutine of its own.
			waitCond(t, func() string {
				if stat := p.Stat(); stat.AcquiredConns() != 0 {
					return fmt.Sprintf("%d connections left acquired", stat.AcquiredConns())
				}
				for _, s := range p.NodeStats() {
					if s.AcquiredConns != 0 {
						return fmt.Sprintf("node %d: %d connections counted acquired", s.ID, s.AcquiredConns)
					}
				}
				return ""
			})
			if conn, err = acquire(p); err != nil {
				t.Fatalf("Acquire after the panic: %v", err)
			}
			conn.Release()
			countsSettle(t, p, c)
			if rec.count(t, hook) != 1 || p.ClusterStat().HookPanics() != 1 {
				t.Errorf("%d panics traced, HookPanics() = %d, want 1", rec.count(t, hook), p.ClusterStat().HookPanics())
			}
		})
	}
}

// Without node tracking (NodeIdentityNone) the pool installs its wrappers
// only around the hooks the caller set, and still recovers their panics.
func TestHookPanicsUntracked(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 1, InProcess: true})
	var closes atomic.Int64
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.NodeIdentity = NodeIdentityNone
		cfg.MaxConns = 2
		cfg.BeforeClose = func(*pgx.Conn) {
			closes.Add(1)
			panic("boom")
		}
	})
	if p.tracking() {
		t.Fatal("pool tracks nodes with NodeIdentityNone")
	}
	if ok := churn(t, p, 3, 2); ok == 0 {
		t.Fatal("no acquire succeeded")
	}
	waitCond(t, func() string {
		if n, got := closes.Load(), p.ClusterStat().HookPanics(); n == 0 || got != n || p.Stat().TotalConns() != 0 {
			return fmt.Sprintf("BeforeClose panicked %d times, HookPanics() = %d, %d connections open", n, got, p.Stat().TotalConns())
		}
		return ""
	})
}

// TestConfigKeepsTheCallersHooks: the pool recovers panics in the caller's
// BeforeConnect where it calls it, but Pool.Config and Pool.ClusterConfig
// hand back the caller's own function, as pgxpool.Pool.Config does.
func TestConfigKeepsTheCallersHooks(t *testing.T) {
	cfg, err := ParseConfig("postgres://u@127.0.0.1:1/db?cluster_probe_interval=1h")
	if err != nil {
		t.Fatal(err)
	}
	cfg.BeforeConnect = func(context.Context, *pgx.ConnConfig) error { panic("mine") }
	p, err := NewWithConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for name, c := range map[string]*pgxpool.Config{"Config": p.Config(), "ClusterConfig": p.ClusterConfig().Config} {
		func() {
			defer func() {
				if v := recover(); v != "mine" {
					t.Errorf("%s().BeforeConnect recovered its panic (got %v): it is not the caller's function", name, v)
				}
			}()
			_ = c.BeforeConnect(context.Background(), c.ConnConfig.Copy())
		}()
	}
	if n := p.ClusterStat().HookPanics(); n != 0 {
		t.Errorf("HookPanics = %d after calling the caller's own hook, want 0", n)
	}
}
