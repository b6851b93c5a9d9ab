package clusterslog_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clusterslog"
	"github.com/clusterpool/clusterpool/clustertest"
)

// syncBuffer is a bytes.Buffer safe for the pool's goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// records parses the JSON lines written so far.
func (b *syncBuffer) records(t *testing.T) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(b.String()), "\n") {
		if line == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("bad JSON line %q: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

func newLogger(level slog.Level) (*slog.Logger, *syncBuffer) {
	buf := &syncBuffer{}
	return slog.New(slog.NewJSONHandler(buf, &slog.HandlerOptions{Level: level})), buf
}

func TestLevelsAndAttributes(t *testing.T) {
	ctx := context.Background()
	boom := errors.New("boom")
	until := time.Date(2026, 12, 4, 5, 0, 0, 0, time.UTC)
	tests := []struct {
		name  string
		emit  func(*clusterslog.Tracer)
		level string
		msg   string
		attrs map[string]any
	}{
		{"added", func(tr *clusterslog.Tracer) {
			tr.TraceNodeAdded(ctx, nil, clusterpool.TraceNodeAddedData{Node: 3, Addr: "10.0.0.3:26257"})
		}, "INFO", "clusterpool: node added", map[string]any{"node": 3.0, "addr": "10.0.0.3:26257"}},
		{"removed", func(tr *clusterslog.Tracer) {
			tr.TraceNodeRemoved(ctx, nil, clusterpool.TraceNodeRemovedData{Node: 4})
		}, "INFO", "clusterpool: node removed (expired)", map[string]any{"node": 4.0}},
		{"evicted", func(tr *clusterslog.Tracer) {
			tr.TraceNodeHealth(ctx, nil, clusterpool.TraceNodeHealthData{Node: 2})
		}, "WARN", "clusterpool: node evicted", map[string]any{"node": 2.0}},
		{"healthy", func(tr *clusterslog.Tracer) {
			tr.TraceNodeHealth(ctx, nil, clusterpool.TraceNodeHealthData{Node: 2, Healthy: true})
		}, "INFO", "clusterpool: node healthy again", map[string]any{"node": 2.0}},
		{"draining", func(tr *clusterslog.Tracer) {
			tr.TraceNodeDraining(ctx, nil, clusterpool.TraceNodeDrainingData{Node: 5, Draining: true})
		}, "INFO", "clusterpool: node draining", map[string]any{"node": 5.0}},
		{"rebalance", func(tr *clusterslog.Tracer) {
			tr.TracePrune(ctx, nil, clusterpool.TracePruneData{Node: 1, Count: 2, Reason: clusterpool.PruneRebalance})
		}, "DEBUG", "clusterpool: connections pruned", map[string]any{"node": 1.0, "count": 2.0, "reason": "rebalance"}},
		{"prune unavailable", func(tr *clusterslog.Tracer) {
			tr.TracePrune(ctx, nil, clusterpool.TracePruneData{Node: 1, Count: 4, Reason: clusterpool.PruneNodeUnavailable})
		}, "INFO", "clusterpool: connections pruned", map[string]any{"count": 4.0, "reason": "node_unavailable"}},
		{"retry", func(tr *clusterslog.Tracer) {
			tr.TraceRetry(ctx, nil, clusterpool.TraceRetryData{Attempt: 1, Node: 2, Err: boom, Class: clusterpool.ClassConnection, Stage: clusterpool.StageStatement})
		}, "DEBUG", "clusterpool: retrying", map[string]any{"attempt": 1.0, "node": 2.0, "error_class": "connection", "stage": "statement", "err": "boom"}},
		{"retry succeeded", func(tr *clusterslog.Tracer) {
			tr.TraceRetryEnd(ctx, nil, clusterpool.TraceRetryEndData{Outcome: clusterpool.RetrySucceeded, Attempts: 2, Nodes: []clusterpool.NodeID{2}})
		}, "INFO", "clusterpool: succeeded after retries", map[string]any{"outcome": "succeeded", "attempts": 2.0, "nodes": []any{2.0}}},
		{"gave up", func(tr *clusterslog.Tracer) {
			tr.TraceRetryEnd(ctx, nil, clusterpool.TraceRetryEndData{Outcome: clusterpool.RetryGaveUp, Attempts: 6, Nodes: []clusterpool.NodeID{1, 2}, Err: boom, Class: clusterpool.ClassConnection})
		}, "WARN", "clusterpool: gave up retrying", map[string]any{"outcome": "gave_up", "attempts": 6.0, "error_class": "connection"}},
		{"unknown", func(tr *clusterslog.Tracer) {
			tr.TraceRetryEnd(ctx, nil, clusterpool.TraceRetryEndData{Outcome: clusterpool.RetryOutcomeUnknown, Attempts: 1, Err: boom, Class: clusterpool.ClassAmbiguous})
		}, "WARN", "clusterpool: not retried, outcome unknown", map[string]any{"outcome": "outcome_unknown"}},
		{"interrupted", func(tr *clusterslog.Tracer) {
			tr.TraceRetryEnd(ctx, nil, clusterpool.TraceRetryEndData{Outcome: clusterpool.RetryInterrupted, Attempts: 3, Err: boom})
		}, "INFO", "clusterpool: retries interrupted by the caller's context", map[string]any{"outcome": "interrupted"}},
		{"probe", func(tr *clusterslog.Tracer) {
			tr.TraceProbe(ctx, nil, clusterpool.TraceProbeData{Node: 7})
		}, "DEBUG", "clusterpool: probe", map[string]any{"node": 7.0}},
		{"probe failed", func(tr *clusterslog.Tracer) {
			tr.TraceProbe(ctx, nil, clusterpool.TraceProbeData{Err: boom})
		}, "DEBUG", "clusterpool: probe failed", map[string]any{"err": "boom"}},
		{"prune outside locality", func(tr *clusterslog.Tracer) {
			tr.TracePrune(ctx, nil, clusterpool.TracePruneData{Node: 4, Count: 2, Reason: clusterpool.PruneOutsideLocality})
		}, "INFO", "clusterpool: connections pruned", map[string]any{"count": 2.0, "reason": "outside_locality"}},
		{"node locality", func(tr *clusterslog.Tracer) {
			tr.TraceNodeLocality(ctx, nil, clusterpool.TraceNodeLocalityData{Node: 4, Locality: "region=b,zone=b1"})
		}, "INFO", "clusterpool: node locality", map[string]any{"node": 4.0, "locality": "region=b,zone=b1"}},
		{"locality fallback", func(tr *clusterslog.Tracer) {
			tr.TraceLocalityLevel(ctx, nil, clusterpool.TraceLocalityLevelData{Level: "", Previous: "region", Fallback: true})
		}, "WARN", "clusterpool: locality fallback: no healthy node in the preferred level", map[string]any{"locality_level": "cluster", "previous_level": "region"}},
		{"locality back", func(tr *clusterslog.Tracer) {
			tr.TraceLocalityLevel(ctx, nil, clusterpool.TraceLocalityLevelData{Level: "zone", Previous: "region"})
		}, "INFO", "clusterpool: back on a preferred locality level", map[string]any{"locality_level": "zone", "previous_level": "region"}},
		{"throttled", func(tr *clusterslog.Tracer) {
			tr.TraceConnectThrottled(ctx, nil, clusterpool.TraceConnectThrottledData{Waited: 250 * time.Millisecond, Limit: 10})
		}, "DEBUG", "clusterpool: new connection throttled", map[string]any{"waited": float64(250 * time.Millisecond), "limit_per_second": 10.0}},
		{"limits", func(tr *clusterslog.Tracer) {
			tr.TraceLimits(ctx, nil, clusterpool.TraceLimitsData{MaxConns: 10, MinConns: 4, MaxConnsPerNode: 5, AcquireTimeout: time.Second, WorkloadLimits: map[string]int{"batch": 2}})
		}, "INFO", "clusterpool: limits changed", map[string]any{"max_conns": 10.0, "min_conns": 4.0, "max_conns_per_node": 5.0, "acquire_timeout": float64(time.Second), "workload_limits": map[string]any{"batch": 2.0}}},
		{"discovery refused", func(tr *clusterslog.Tracer) {
			tr.TraceDiscoveryPaused(ctx, nil, clusterpool.TraceDiscoveryPausedData{Table: "gossip", Until: until, Err: &pgconn.PgError{Severity: "ERROR", Code: "42501", Message: "no VIEWCLUSTERMETADATA"}})
		}, "WARN", "clusterpool: discovery table refused (insufficient privilege), paused", map[string]any{"table": "gossip", "until": until.Format(time.RFC3339Nano), "err": "ERROR: no VIEWCLUSTERMETADATA (SQLSTATE 42501)"}},
		{"discovery table missing", func(tr *clusterslog.Tracer) {
			tr.TraceDiscoveryPaused(ctx, nil, clusterpool.TraceDiscoveryPausedData{Table: "sessions", Until: until, Err: fmt.Errorf("read: %w", &pgconn.PgError{Code: "42P01"})})
		}, "DEBUG", "clusterpool: discovery table not readable, paused", map[string]any{"table": "sessions"}},
		{"workload wait", func(tr *clusterslog.Tracer) {
			tr.TraceWorkloadWait(ctx, nil, clusterpool.TraceWorkloadWaitData{Workload: "batch", Waited: 3 * time.Millisecond})
		}, "DEBUG", "clusterpool: waited for the workload's limit", map[string]any{"workload": "batch", "waited": float64(3 * time.Millisecond)}},
		{"workload wait gave up", func(tr *clusterslog.Tracer) {
			tr.TraceWorkloadWait(ctx, nil, clusterpool.TraceWorkloadWaitData{Workload: "batch", Waited: time.Second, Err: boom})
		}, "WARN", "clusterpool: gave up waiting for the workload's limit", map[string]any{"workload": "batch", "err": "boom"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logger, buf := newLogger(slog.LevelDebug)
			tt.emit(clusterslog.New(logger))
			recs := buf.records(t)
			if len(recs) != 1 {
				t.Fatalf("%d records, want 1: %s", len(recs), buf)
			}
			r := recs[0]
			if r["level"] != tt.level || r["msg"] != tt.msg {
				t.Errorf("level %v msg %q, want %s %q", r["level"], r["msg"], tt.level, tt.msg)
			}
			for k, want := range tt.attrs {
				if got := r[k]; fmt.Sprint(got) != fmt.Sprint(want) {
					t.Errorf("%s = %v, want %v", k, got, want)
				}
			}

			// Above the record's level nothing is written.
			logger, buf = newLogger(slog.LevelError)
			tt.emit(clusterslog.New(logger))
			if s := buf.String(); s != "" {
				t.Errorf("written above its level: %s", s)
			}
		})
	}
}

// A recovered panic in a hook is logged at Error with the hook, the panic
// value and the stack, and at every level up to Error.
func TestHookPanic(t *testing.T) {
	data := clusterpool.TraceHookPanicData{Hook: "BeforeClose", Value: errors.New("boom"), Stack: []byte("goroutine 7 [running]:\nmain.hook()")}
	logger, buf := newLogger(slog.LevelError)
	clusterslog.New(logger).TraceHookPanic(context.Background(), nil, data)
	recs := buf.records(t)
	if len(recs) != 1 {
		t.Fatalf("%d records, want 1: %s", len(recs), buf)
	}
	r := recs[0]
	if r["level"] != "ERROR" || r["msg"] != "clusterpool: hook panicked (recovered)" ||
		r["hook"] != "BeforeClose" || r["panic"] != "boom" || r["stack"] != string(data.Stack) {
		t.Errorf("record %v", r)
	}
	logger, buf = newLogger(slog.LevelError + 1)
	clusterslog.New(logger).TraceHookPanic(context.Background(), nil, data)
	if s := buf.String(); s != "" {
		t.Errorf("written above its level: %s", s)
	}
}

// On a real cluster: node IDs appear in the records, an eviction is a
// warning, and the password in the connection string never appears.
func TestLogsOnCluster(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 3, Balancing: clustertest.RoundRobin})
	const password = "s3cret-pw"
	dsn := strings.Replace(c.DSN(), "postgres://postgres@", "postgres://postgres:"+password+"@", 1)
	if dsn == c.DSN() {
		t.Fatalf("unexpected DSN form %q", c.DSN())
	}
	cfg, err := clusterpool.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	logger, buf := newLogger(slog.LevelDebug)
	cfg.Tracer = clusterslog.New(logger)
	cfg.MinConns, cfg.MaxConns = 6, 6
	cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
	cfg.ConnectRate = -1 // no limit
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pool, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()

	waitFor(t, "three nodes added", func() bool { return len(find(buf.records(t), "clusterpool: node added")) == 3 })

	stop := busyReads(t, pool, 6)
	c.Node(2).Kill()
	// Read-only statements are retried elsewhere; some meet node 2.
	waitFor(t, "node 2 evicted", func() bool {
		for _, r := range find(buf.records(t), "clusterpool: node evicted") {
			if r["node"] == 2.0 && r["level"] == "WARN" {
				return true
			}
		}
		return false
	})
	stop()
	// New connects to a dead node fail with errors that name the user and
	// the address, never the password.
	pool.Reset()
	for range 10 {
		var one int
		_ = pool.QueryRow(ctx, "SELECT 1").Scan(&one)
	}
	out := buf.String()
	if strings.Contains(out, password) {
		t.Errorf("the log contains the password:\n%s", out)
	}
	if !strings.Contains(out, `"node":2`) {
		t.Errorf("no record names node 2:\n%s", out)
	}
	t.Logf("%d records", len(buf.records(t)))
}

func find(recs []map[string]any, msg string) []map[string]any {
	var out []map[string]any
	for _, r := range recs {
		if r["msg"] == msg {
			out = append(out, r)
		}
	}
	return out
}

// waitFor polls cond every 20 ms for up to 20 s; the machine may be loaded.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
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

// On a cluster in two regions: each node's locality is logged once learned,
// and a fallback when the preferred region drains is a warning.
func TestLocalityOnCluster(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true, Balancing: clustertest.RoundRobin,
		Localities: []string{"region=a", "region=b"}})
	cfg, err := clusterpool.ParseConfig(c.DSN() + "&cluster_locality=region%3Da")
	if err != nil {
		t.Fatal(err)
	}
	logger, buf := newLogger(slog.LevelInfo)
	cfg.Tracer = clusterslog.New(logger)
	cfg.MinConns, cfg.MaxConns = 2, 2
	cfg.BalanceInterval, cfg.ProbeInterval = 50*time.Millisecond, 50*time.Millisecond
	cfg.ConnectRate = -1
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pool, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	waitFor(t, "both localities logged", func() bool {
		seen := make(map[float64]any)
		for _, r := range find(buf.records(t), "clusterpool: node locality") {
			seen[r["node"].(float64)] = r["locality"]
		}
		return seen[1] == "region=a" && seen[2] == "region=b"
	})
	if err := c.Node(1).Drain(ctx, 0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the fallback logged", func() bool {
		for _, r := range find(buf.records(t), "clusterpool: locality fallback: no healthy node in the preferred level") {
			if r["level"] == "WARN" && r["previous_level"] == "region" && r["locality_level"] == "cluster" {
				return true
			}
		}
		return false
	})
}
