package clusterprom_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clusterprom"
	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
)

func startPool(t *testing.T, c *clustertest.Cluster, conns int32) *clusterpool.Pool {
	t.Helper()
	cfg, err := clusterpool.ParseConfig(c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	cfg.MinConns, cfg.MaxConns = conns, conns
	// No background rounds: the test decides what happens.
	cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
	cfg.ConnectRate = -1 // no limit
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	p, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// waitFor polls cond every 20 ms for up to 20 s; the machine may be loaded.
func waitFor(t *testing.T, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		msg := cond()
		if msg == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out: %s", msg)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// values gathers reg and returns each sample's value by name{labels}, with
// labels sorted by name as Prometheus prints them.
func values(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]float64)
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			out[mf.GetName()+"{"+strings.Join(labels, ",")+"}"] = value(m)
		}
	}
	return out
}

func value(m *dto.Metric) float64 {
	switch {
	case m.GetGauge() != nil:
		return m.GetGauge().GetValue()
	case m.GetCounter() != nil:
		return m.GetCounter().GetValue()
	}
	return 0
}

func TestCollectorOnCluster(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 3, Balancing: clustertest.RoundRobin})
	pool := startPool(t, c, 6)
	waitFor(t, func() string {
		for _, s := range pool.NodeStats() {
			if s.TotalConns != 2 {
				return fmt.Sprintf("want 2 connections per node: %+v", pool.NodeStats())
			}
		}
		if len(pool.NodeStats()) != 3 {
			return fmt.Sprintf("want 3 nodes: %+v", pool.NodeStats())
		}
		return ""
	})

	col := clusterprom.NewCollector("orders", pool)
	if problems, err := testutil.CollectAndLint(col); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}
	const want = `
# HELP clusterpool_connections Open connections of the pool per node, idle or in use.
# TYPE clusterpool_connections gauge
clusterpool_connections{node="1",pool="orders",state="idle"} 2
clusterpool_connections{node="1",pool="orders",state="in_use"} 0
clusterpool_connections{node="2",pool="orders",state="idle"} 2
clusterpool_connections{node="2",pool="orders",state="in_use"} 0
clusterpool_connections{node="3",pool="orders",state="idle"} 2
clusterpool_connections{node="3",pool="orders",state="in_use"} 0
# HELP clusterpool_nodes Nodes known to the pool by state; each node counts once: unhealthy, else draining, else healthy.
# TYPE clusterpool_nodes gauge
clusterpool_nodes{pool="orders",state="draining"} 0
clusterpool_nodes{pool="orders",state="healthy"} 3
clusterpool_nodes{pool="orders",state="unhealthy"} 0
# HELP clusterpool_retries_total Calls that involved the retry logic, by how they ended.
# TYPE clusterpool_retries_total counter
clusterpool_retries_total{outcome="gave_up",pool="orders"} 0
clusterpool_retries_total{outcome="interrupted",pool="orders"} 0
clusterpool_retries_total{outcome="outcome_unknown",pool="orders"} 0
clusterpool_retries_total{outcome="succeeded",pool="orders"} 0
# HELP clusterpool_evictions_total Times a node was evicted.
# TYPE clusterpool_evictions_total counter
clusterpool_evictions_total{pool="orders"} 0
# HELP clusterpool_pruned_connections_total Connections of the node retired by the balancer.
# TYPE clusterpool_pruned_connections_total counter
clusterpool_pruned_connections_total{node="1",pool="orders"} 0
clusterpool_pruned_connections_total{node="2",pool="orders"} 0
clusterpool_pruned_connections_total{node="3",pool="orders"} 0
`
	if err := testutil.CollectAndCompare(col, strings.NewReader(want),
		"clusterpool_connections", "clusterpool_nodes", "clusterpool_retries_total",
		"clusterpool_evictions_total", "clusterpool_pruned_connections_total"); err != nil {
		t.Error(err)
	}

	// A connection in use shows as in_use on its node.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(col)
	inUse := 0.0
	for k, v := range values(t, reg) {
		if strings.HasPrefix(k, "clusterpool_connections{") && strings.Contains(k, `state="in_use"`) {
			inUse += v
		}
	}
	conn.Release()
	if inUse != 1 {
		t.Errorf("in_use connections = %v, want 1", inUse)
	}

	// A killed node: evicted, reported unhealthy, and reads retried elsewhere.
	stop := busyReads(t, pool, 6)
	c.Node(2).Kill()
	// The reads run until a retry has succeeded: the node is evicted at the
	// first failure, before the retry that failure starts has finished.
	waitFor(t, func() string {
		v := values(t, reg)
		if x := v[`clusterpool_nodes{pool="orders",state="unhealthy"}`]; x != 1 {
			return fmt.Sprintf("unhealthy nodes = %v", x)
		}
		if x := v[`clusterpool_retries_total{outcome="succeeded",pool="orders"}`]; x < 1 {
			return fmt.Sprintf("retries succeeded = %v", x)
		}
		return ""
	})
	stop()
	v := values(t, reg)
	for name, check := range map[string]func(float64) bool{
		`clusterpool_node_healthy{node="2",pool="orders"}`:         func(x float64) bool { return x == 0 },
		`clusterpool_node_healthy{node="1",pool="orders"}`:         func(x float64) bool { return x == 1 },
		`clusterpool_evictions_total{pool="orders"}`:               func(x float64) bool { return x >= 1 },
		`clusterpool_node_evictions_total{node="2",pool="orders"}`: func(x float64) bool { return x >= 1 },
		`clusterpool_retries_total{outcome="succeeded",pool="orders"}`: func(x float64) bool {
			return x >= 1
		},
		`clusterpool_retry_attempts_total{pool="orders"}`:        func(x float64) bool { return x >= 1 },
		`clusterpool_node_retries_total{node="2",pool="orders"}`: func(x float64) bool { return x >= 1 },
		`clusterpool_nodes_added_total{pool="orders"}`:           func(x float64) bool { return x == 3 },
	} {
		if x, ok := v[name]; !ok || !check(x) {
			t.Errorf("%s = %v (present %v)", name, x, ok)
		}
	}
}

// Two pools in one registry: the pool label keeps their series apart.
func TestTwoPoolsOneRegistry(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 2})
	a, b := startPool(t, c, 2), startPool(t, c, 4)
	reg := prometheus.NewRegistry()
	reg.MustRegister(clusterprom.NewCollector("a", a), clusterprom.NewCollector("b", b))
	waitFor(t, func() string {
		v := values(t, reg)
		sum := func(pool string) float64 {
			s := 0.0
			for k, x := range v {
				if strings.HasPrefix(k, "clusterpool_connections{") && strings.Contains(k, `pool="`+pool+`"`) {
					s += x
				}
			}
			return s
		}
		if sum("a") != 2 || sum("b") != 4 {
			return fmt.Sprintf("connections a=%v b=%v, want 2 and 4", sum("a"), sum("b"))
		}
		return ""
	})
	if n, err := testutil.GatherAndCount(reg, "clusterpool_retries_total"); err != nil || n != 2*len(clusterpool.RetryOutcomes()) {
		t.Errorf("clusterpool_retries_total series = %d, %v; want %d", n, err, 2*len(clusterpool.RetryOutcomes()))
	}
}

// A panic in the caller's BeforeClose, which the pool recovers, is counted
// in clusterpool_hook_panics_total.
func TestHookPanicsCounted(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 2})
	cfg, err := clusterpool.ParseConfig(c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	cfg.MinConns, cfg.MaxConns = 2, 2
	cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
	cfg.BeforeClose = func(*pgx.Conn) { panic("boom") }
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pool, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	reg := prometheus.NewRegistry()
	reg.MustRegister(clusterprom.NewCollector("orders", pool))
	const metric = `clusterpool_hook_panics_total{pool="orders"}`
	if v := values(t, reg)[metric]; v != 0 {
		t.Errorf("%s = %v before any panic", metric, v)
	}
	waitFor(t, func() string {
		if n := pool.Stat().IdleConns(); n < 2 { // established, not in construction
			return fmt.Sprintf("%d idle connections, want 2", n)
		}
		return ""
	})
	pool.Reset() // closes both, through the panicking BeforeClose
	waitFor(t, func() string {
		v, n := values(t, reg)[metric], pool.ClusterStat().HookPanics()
		if v < 2 || v != float64(n) {
			return fmt.Sprintf("%s = %v, HookPanics() = %d, want at least 2", metric, v, n)
		}
		return ""
	})
}

// busyReads runs SELECT 1 in workers goroutines until the returned stop is
// called (or the test ends), so every connection of the pool is used: an
// idle pool would keep reusing one connection and might never meet a dead
// node. Reads are retried on another node, so a failed read fails the test.
func busyReads(t *testing.T, pool *clusterpool.Pool, workers int) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for ctx.Err() == nil {
				var one int
				if err := pool.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil && ctx.Err() == nil {
					t.Errorf("a read failed: %v", err)
				}
			}
		})
	}
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); wg.Wait() }) }
	t.Cleanup(stop)
	return stop
}

// pgxpool's Stat figures, exported under their own names, follow acquires on
// a live pool: waits for a connection being dialled, an acquire ended by its
// context, connections acquired and idle. Each value equals what Pool.Stat
// reports at the scrape; nothing else uses the pool meanwhile.
func TestPgxpoolStatOnCluster(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 1})
	cfg, err := clusterpool.ParseConfig(c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	// MinConns 0: the first acquires find the pool empty and wait for a dial.
	cfg.MinConns, cfg.MaxConns = 0, 2
	cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
	cfg.ConnectRate = -1 // no limit
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pool, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	reg := prometheus.NewRegistry()
	reg.MustRegister(clusterprom.NewCollector("orders", pool))
	if problems, err := testutil.GatherAndLint(reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}

	a, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v := values(t, reg)
	for _, state := range []string{"acquired", "idle", "constructing"} {
		want := map[string]float64{"acquired": 2}[state]
		if x := v[`clusterpool_conns{pool="orders",state="`+state+`"}`]; x != want {
			t.Errorf("conns %s = %v with both connections acquired, want %v", state, x, want)
		}
	}
	// The pool is full: this acquire waits until its context ends.
	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	if conn, err := pool.Acquire(short); err == nil {
		conn.Release()
		t.Fatal("a third acquire from a full pool of 2 succeeded")
	}
	cancelShort()
	a.Release()
	b.Release()
	waitFor(t, func() string {
		if n := pool.Stat().IdleConns(); n != 2 {
			return fmt.Sprintf("%d idle connections, want 2", n)
		}
		return ""
	})

	v = values(t, reg)
	ps := pool.Stat()
	for name, want := range map[string]float64{
		`clusterpool_acquire_total{pool="orders"}`:                    float64(ps.AcquireCount()),
		`clusterpool_acquire_duration_seconds_total{pool="orders"}`:   ps.AcquireDuration().Seconds(),
		`clusterpool_empty_acquire_total{pool="orders"}`:              float64(ps.EmptyAcquireCount()),
		`clusterpool_empty_acquire_wait_seconds_total{pool="orders"}`: ps.EmptyAcquireWaitTime().Seconds(),
		`clusterpool_canceled_acquire_total{pool="orders"}`:           float64(ps.CanceledAcquireCount()),
		`clusterpool_conns{pool="orders",state="idle"}`:               float64(ps.IdleConns()),
		`clusterpool_conns{pool="orders",state="acquired"}`:           float64(ps.AcquiredConns()),
		`clusterpool_conns{pool="orders",state="constructing"}`:       float64(ps.ConstructingConns()),
		`clusterpool_max_conns{pool="orders"}`:                        float64(ps.MaxConns()),
		`clusterpool_new_conns_total{pool="orders"}`:                  float64(ps.NewConnsCount()),
		`clusterpool_max_lifetime_destroy_total{pool="orders"}`:       float64(ps.MaxLifetimeDestroyCount()),
		`clusterpool_max_idle_destroy_total{pool="orders"}`:           float64(ps.MaxIdleDestroyCount()),
	} {
		if x, ok := v[name]; !ok || x != want {
			t.Errorf("%s = %v (present %v), Pool.Stat says %v", name, x, ok, want)
		}
	}
	// And the values are the ones the acquires above must have produced.
	for name, check := range map[string]func(float64) bool{
		`clusterpool_acquire_total{pool="orders"}`:                    func(x float64) bool { return x >= 2 },
		`clusterpool_acquire_duration_seconds_total{pool="orders"}`:   func(x float64) bool { return x > 0 },
		`clusterpool_empty_acquire_total{pool="orders"}`:              func(x float64) bool { return x >= 2 },
		`clusterpool_empty_acquire_wait_seconds_total{pool="orders"}`: func(x float64) bool { return x > 0 },
		`clusterpool_canceled_acquire_total{pool="orders"}`:           func(x float64) bool { return x == 1 },
		`clusterpool_conns{pool="orders",state="idle"}`:               func(x float64) bool { return x == 2 },
		`clusterpool_conns{pool="orders",state="acquired"}`:           func(x float64) bool { return x == 0 },
		`clusterpool_max_conns{pool="orders"}`:                        func(x float64) bool { return x == 2 },
		`clusterpool_new_conns_total{pool="orders"}`:                  func(x float64) bool { return x >= 2 },
		`clusterpool_max_lifetime_destroy_total{pool="orders"}`:       func(x float64) bool { return x == 0 },
		`clusterpool_max_idle_destroy_total{pool="orders"}`:           func(x float64) bool { return x == 0 },
	} {
		if x := v[name]; !check(x) {
			t.Errorf("%s = %v", name, x)
		}
	}
}

// Each node's locality is a label of clusterpool_node_locality, and a
// fallback of the pool's locality preference is counted.
func TestNodeLocality(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true, Balancing: clustertest.RoundRobin,
		Localities: []string{"region=a,zone=a1", "region=b,zone=b1"}})
	cfg, err := clusterpool.ParseConfig(c.DSN() + "&cluster_locality=region%3Da")
	if err != nil {
		t.Fatal(err)
	}
	cfg.MinConns, cfg.MaxConns = 2, 2
	cfg.BalanceInterval, cfg.ProbeInterval = 50*time.Millisecond, 50*time.Millisecond
	cfg.ConnectRate = -1
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pool, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	reg := prometheus.NewRegistry()
	col := clusterprom.NewCollector("orders", pool)
	reg.MustRegister(col)
	waitFor(t, func() string {
		v := values(t, reg)
		for _, k := range []string{
			`clusterpool_node_locality{locality="region=a,zone=a1",node="1",pool="orders"}`,
			`clusterpool_node_locality{locality="region=b,zone=b1",node="2",pool="orders"}`,
		} {
			if v[k] != 1 {
				return fmt.Sprintf("%s = %v; have %v", k, v[k], v)
			}
		}
		return ""
	})
	if problems, err := testutil.CollectAndLint(col); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}
	// Region a drains: the pool falls back to the whole cluster.
	if err := c.Node(1).Drain(ctx, 0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() string {
		if v := values(t, reg)[`clusterpool_locality_fallbacks_total{pool="orders"}`]; v != 1 {
			return fmt.Sprintf("clusterpool_locality_fallbacks_total = %v, want 1", v)
		}
		return ""
	})
}
