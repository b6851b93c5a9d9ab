package clusterotel_test

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clusterotel"
	"github.com/clusterpool/clusterpool/clustertest"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
)

// collect reads r and returns each data point's value by
// name{key="value",...}, attributes sorted by key.
func collect(t *testing.T, r *sdkmetric.ManualReader) map[string]float64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := r.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	out := make(map[string]float64)
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			add := func(attrs []string, v float64) {
				sort.Strings(attrs)
				out[m.Name+"{"+strings.Join(attrs, ",")+"}"] = v
			}
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					add(attrStrings(p.Attributes.ToSlice()), float64(p.Value))
				}
			case metricdata.Sum[float64]:
				for _, p := range d.DataPoints {
					add(attrStrings(p.Attributes.ToSlice()), p.Value)
				}
			case metricdata.Gauge[int64]:
				for _, p := range d.DataPoints {
					add(attrStrings(p.Attributes.ToSlice()), float64(p.Value))
				}
			default:
				t.Errorf("%s: unexpected data %T", m.Name, m.Data)
			}
		}
	}
	return out
}

func attrStrings(kvs []attribute.KeyValue) []string {
	out := make([]string, 0, len(kvs))
	for _, kv := range kvs {
		out = append(out, string(kv.Key)+"="+kv.Value.Emit())
	}
	return out
}

func TestMetricsOnCluster(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 1})
	cfg, err := clusterpool.ParseConfig(c.DSN())
	if err != nil {
		t.Fatal(err)
	}
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
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	reg, err := clusterotel.Register(mp, "orders", pool)
	if err != nil {
		t.Fatal(err)
	}

	a, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v := collect(t, reader)
	if x := v[`clusterpool.conns{pool=orders,state=acquired}`]; x != 2 {
		t.Errorf("acquired conns = %v with both acquired, want 2 (have %v)", x, v)
	}
	short, cancelShort := context.WithTimeout(ctx, 50*time.Millisecond)
	if conn, err := pool.Acquire(short); err == nil {
		conn.Release()
		t.Fatal("a third acquire from a full pool of 2 succeeded")
	}
	cancelShort()
	a.Release()
	b.Release()
	deadline := time.Now().Add(20 * time.Second)
	for pool.Stat().IdleConns() != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("%d idle connections, want 2", pool.Stat().IdleConns())
		}
		time.Sleep(20 * time.Millisecond)
	}

	v = collect(t, reader)
	ps, st := pool.Stat(), pool.ClusterStat()
	want := map[string]float64{
		`clusterpool.acquires{pool=orders}`:                   float64(ps.AcquireCount()),
		`clusterpool.acquire.duration{pool=orders}`:           ps.AcquireDuration().Seconds(),
		`clusterpool.empty_acquires{pool=orders}`:             float64(ps.EmptyAcquireCount()),
		`clusterpool.empty_acquire.wait_time{pool=orders}`:    ps.EmptyAcquireWaitTime().Seconds(),
		`clusterpool.canceled_acquires{pool=orders}`:          1,
		`clusterpool.conns{pool=orders,state=idle}`:           2,
		`clusterpool.conns{pool=orders,state=acquired}`:       0,
		`clusterpool.conns{pool=orders,state=constructing}`:   0,
		`clusterpool.max_conns{pool=orders}`:                  2,
		`clusterpool.new_conns{pool=orders}`:                  float64(ps.NewConnsCount()),
		`clusterpool.max_lifetime_destroys{pool=orders}`:      0,
		`clusterpool.max_idle_destroys{pool=orders}`:          0,
		`clusterpool.nodes{pool=orders,state=healthy}`:        1,
		`clusterpool.nodes{pool=orders,state=unhealthy}`:      0,
		`clusterpool.nodes{pool=orders,state=draining}`:       0,
		`clusterpool.nodes_added{pool=orders}`:                1,
		`clusterpool.evictions{pool=orders}`:                  0,
		`clusterpool.retry_attempts{pool=orders}`:             0,
		`clusterpool.probes{pool=orders}`:                     float64(st.Probes()),
		`clusterpool.probe_sessions{pool=orders}`:             float64(st.ProbeSessions()),
		`clusterpool.hook_panics{pool=orders}`:                0,
		`clusterpool.connect_throttle.wait_time{pool=orders}`: 0,
	}
	for _, o := range clusterpool.RetryOutcomes() {
		want[`clusterpool.retries{outcome=`+o.String()+`,pool=orders}`] = 0
	}
	for _, s := range pool.NodeStats() {
		n := fmt.Sprint(s.ID)
		want[`clusterpool.node.healthy{node=`+n+`,pool=orders}`] = 1
		want[`clusterpool.node.draining{node=`+n+`,pool=orders}`] = 0
		want[`clusterpool.node.connections{node=`+n+`,pool=orders,state=idle}`] = float64(s.IdleConns)
		want[`clusterpool.node.connections{node=`+n+`,pool=orders,state=in_use}`] = 0
		want[`clusterpool.node.evictions{node=`+n+`,pool=orders}`] = 0
	}
	for name, w := range want {
		if x, ok := v[name]; !ok || x != w {
			t.Errorf("%s = %v (present %v), want %v", name, x, ok, w)
		}
	}
	for name, min := range map[string]float64{
		`clusterpool.acquires{pool=orders}`:       2,
		`clusterpool.empty_acquires{pool=orders}`: 2,
		`clusterpool.new_conns{pool=orders}`:      2,
	} {
		if v[name] < min {
			t.Errorf("%s = %v, want at least %v", name, v[name], min)
		}
	}

	if err := reg.Unregister(); err != nil {
		t.Fatal(err)
	}
	if v := collect(t, reader); len(v) != 0 {
		t.Errorf("after Unregister, %d data points remain", len(v))
	}
}

// Each node's locality is an attribute of clusterpool.node.locality.
func TestNodeLocality(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true, Balancing: clustertest.RoundRobin,
		Localities: []string{"region=a", "region=b"}})
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
	t.Cleanup(pool.Close)
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	reg, err := clusterotel.Register(mp, "orders", pool)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Unregister()
	deadline := time.Now().Add(20 * time.Second)
	for {
		v := collect(t, reader)
		a, b := v[`clusterpool.node.locality{locality=region=a,node=1,pool=orders}`], v[`clusterpool.node.locality{locality=region=b,node=2,pool=orders}`]
		_, fallbacks := v[`clusterpool.locality_fallbacks{pool=orders}`]
		if a == 1 && b == 1 && fallbacks {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node localities not reported: %v", v)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The runtime limits and each limited workload's figures are exported.
func TestLimitsAndWorkloads(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 1, InProcess: true})
	cfg, err := clusterpool.ParseConfig(c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	cfg.MinConns, cfg.MaxConns = 0, 4
	cfg.BalanceInterval, cfg.ProbeInterval, cfg.ConnectRate = time.Hour, time.Hour, -1
	cfg.WorkloadLimits = map[string]int{"batch": 1}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pool, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	t.Cleanup(func() { _ = mp.Shutdown(context.Background()) })
	reg, err := clusterotel.Register(mp, "orders", pool)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = reg.Unregister() }()
	if err := pool.SetMaxConns(3); err != nil {
		t.Fatal(err)
	}
	batch := clusterpool.WithWorkload(ctx, "batch")
	held, err := pool.Acquire(batch)
	if err != nil {
		t.Fatal(err)
	}
	short, cancelShort := context.WithTimeout(batch, 30*time.Millisecond)
	if _, err := pool.Acquire(short); err == nil {
		t.Fatal("a second batch connection past the limit of 1")
	}
	cancelShort()
	v := collect(t, reader)
	for name, want := range map[string]float64{
		`clusterpool.workload.limit{pool=orders,workload=batch}`:    1,
		`clusterpool.workload.in_use{pool=orders,workload=batch}`:   1,
		`clusterpool.workload.waiting{pool=orders,workload=batch}`:  0,
		`clusterpool.workload.acquires{pool=orders,workload=batch}`: 1,
		`clusterpool.workload.waits{pool=orders,workload=batch}`:    1,
		`clusterpool.limit.max_conns{pool=orders}`:                  3,
		`clusterpool.limit.min_conns{pool=orders}`:                  0,
		`clusterpool.limit.max_conns_per_node{pool=orders}`:         0,
		`clusterpool.effective_max_conns{pool=orders}`:              3,
		`clusterpool.full_nodes{pool=orders}`:                       0,
		`clusterpool.acquire_timeouts{pool=orders}`:                 0,
	} {
		if got, ok := v[name]; !ok || got != want {
			t.Errorf("%s = %v (reported %v), want %v", name, got, ok, want)
		}
	}
	if v[`clusterpool.workload.wait_time{pool=orders,workload=batch}`] <= 0 {
		t.Error("no wait time for the call that waited")
	}
	held.Release()
}
