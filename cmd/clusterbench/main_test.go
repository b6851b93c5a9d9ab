package main

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/clusterpool/clusterpool/internal/fakepg"
)

// runJSON runs the command with -json and decodes its results.
func runJSON(t *testing.T, ctx context.Context, args ...string) (*Results, string, int) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(ctx, append([]string{"-json"}, args...), &stdout, &stderr)
	if code != 0 {
		return nil, stderr.String(), code
	}
	var res Results
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("stdout is not JSON: %v\n%s", err, stdout.String())
	}
	return &res, stderr.String(), code
}

func checkSane(t *testing.T, res *Results, want []string) {
	t.Helper()
	if len(res.Scenarios) != len(want) {
		t.Fatalf("got %d scenarios, want %v", len(res.Scenarios), want)
	}
	for i, s := range res.Scenarios {
		if s.Name != want[i] {
			t.Errorf("scenario %d is %q, want %q", i, s.Name, want[i])
		}
		if len(s.Pools) != 2 || s.Pools[0].Pool != pgxpoolKind || s.Pools[1].Pool != clusterpoolKind {
			t.Fatalf("%s: pools %+v, want pgxpool then clusterpool", s.Name, s.Pools)
		}
		for _, p := range s.Pools {
			where := s.Name + "/" + p.Pool
			if p.Ops <= 0 || p.Errors < 0 || p.Errors > p.Ops {
				t.Errorf("%s: ops %d, errors %d", where, p.Ops, p.Errors)
			}
			l := p.Latency
			if !(0 < l.P50 && l.P50 <= l.P90 && l.P90 <= l.P99 && l.P99 <= l.Max) {
				t.Errorf("%s: percentiles out of order: %+v", where, l)
			}
			if len(p.Samples) == 0 {
				t.Errorf("%s: no samples", where)
			}
			// The phases between the events hold every operation, in order.
			if len(p.Events) > 0 {
				n, last := int64(0), math.Inf(-1)
				for _, ph := range p.Phases {
					n += int64(ph.Ops)
					if ph.From < last || ph.To < ph.From || ph.P99 <= 0 || ph.P99 > l.Max {
						t.Errorf("%s: phase %+v after %.2fs, max %.1f ms", where, ph, last, l.Max)
					}
					last = ph.To
				}
				if n != p.Ops {
					t.Errorf("%s: phases %+v hold %d operations of %d", where, p.Phases, n, p.Ops)
				}
			} else if p.Phases != nil {
				t.Errorf("%s: phases %+v without events", where, p.Phases)
			}
			for _, sm := range p.Samples {
				for id, n := range sm.Conns {
					if n < 0 {
						t.Errorf("%s: node %d has %d connections at %.1fs", where, id, n, sm.T)
					}
				}
			}
			// Counts add up: the servers' per-node counts sum to the pool's total.
			if got := sum(p.FinalNodeConns); got != p.FinalPoolConns {
				t.Errorf("%s: servers hold %d connections (%v), the pool %d", where, got, p.FinalNodeConns, p.FinalPoolConns)
			}
			if p.ConnsOpened < int64(p.FinalPoolConns) {
				t.Errorf("%s: %d connections opened but %d open", where, p.ConnsOpened, p.FinalPoolConns)
			}
			if p.PoolSize != res.Workers {
				t.Errorf("%s: pool size %d, want %d", where, p.PoolSize, res.Workers)
			}
			if len(p.Metrics) == 0 {
				t.Errorf("%s: no metrics", where)
			}
		}
		for _, m := range s.Pools[1].Metrics {
			if s.Pools[0].metric(m.Name) == nil {
				t.Errorf("%s: metric %s missing for pgxpool", s.Name, m.Name)
			}
			if _, ok := s.Ratios[m.Name]; !ok {
				t.Errorf("%s: no ratio for %s", s.Name, m.Name)
			}
			if m.Better != "lower" && m.Better != "higher" {
				t.Errorf("%s: metric %s has direction %q", s.Name, m.Name, m.Better)
			}
		}
	}
}

func checkReport(t *testing.T, res *Results, dir string) {
	t.Helper()
	html, err := os.ReadFile(filepath.Join(dir, "index.html"))
	if err != nil {
		t.Fatal(err)
	}
	plotted := 0
	for _, s := range res.Scenarios {
		if hasPlot(s) {
			plotted++
		}
	}
	if got := strings.Count(string(html), "<svg"); got != plotted {
		t.Errorf("report has %d plots, want one per scenario but overhead (%d)", got, plotted)
	}
	// A table of p99 between the events for each scenario that has events.
	phased := 0
	for _, s := range res.Scenarios {
		if len(s.Pools) > 0 && len(s.Pools[0].Phases) > 0 {
			phased++
		}
	}
	if got := strings.Count(string(html), "p99 (ms) between events"); got != phased {
		t.Errorf("report has %d tables of p99 between events, want one per scenario with events (%d)", got, phased)
	}
	summary, _, _ := strings.Cut(string(html)[max(0, strings.Index(string(html), `id="summary"`)):], "</table>")
	for _, s := range res.Scenarios {
		if s.Verdict == "" || !strings.Contains(summary, `<a href="#`+s.Name+`">`) {
			t.Errorf("summary has no row for %s (verdict %q)", s.Name, s.Verdict)
		}
	}
	for _, bad := range []string{"<script", "http://", "https://"} {
		if strings.Contains(strings.ReplaceAll(string(html), `xmlns="http://www.w3.org/2000/svg"`, ""), bad) {
			t.Errorf("report is not self-contained: it contains %q", bad)
		}
	}
	var saved Results
	if js, err := os.ReadFile(filepath.Join(dir, "results.json")); err != nil || json.Unmarshal(js, &saved) != nil || len(saved.Scenarios) != len(res.Scenarios) {
		t.Errorf("results.json missing or incomplete: %v", err)
	}
	for _, s := range res.Scenarios {
		if !hasPlot(s) {
			continue
		}
		svg, err := os.ReadFile(filepath.Join(dir, s.Name+".svg"))
		if err != nil || !strings.HasPrefix(string(svg), "<svg") {
			t.Errorf("%s.svg: %v", s.Name, err)
		}
	}
}

func TestEveryScenarioInProcess(t *testing.T) {
	// Cluster directories go under TMPDIR; none may be left behind.
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	out := filepath.Join(t.TempDir(), "report")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, stderr, code := runJSON(t, ctx, "-backend", "inprocess", "-duration", "1500ms", "-warmup", "400ms", "-seed", "7", "-out", out)
	if code != 0 {
		t.Fatalf("exit code %d\n%s", code, stderr)
	}
	// The warm scenarios' load starts once the pool has been up for
	// -warmup; the others' at once.
	for _, s := range res.Scenarios {
		sc, _ := scenarioByName(s.Name)
		warm := sc.warm
		for _, p := range s.Pools {
			if warm && p.WarmUp < 0.4 || !warm && p.WarmUp != 0 {
				t.Errorf("%s/%s: the load started %.2fs after the pool was made (-warmup 400ms)", s.Name, p.Pool, p.WarmUp)
			}
		}
	}
	if first, _, _ := strings.Cut(stderr, "\n"); !strings.Contains(first, "in-process") {
		t.Errorf("first line does not say the backend is in-process: %q", first)
	}
	if res.Seed != 7 || res.Backend != "in-process" || res.Workers != 24 || res.Nodes != 3 {
		t.Errorf("header: seed %d backend %q workers %d nodes %d", res.Seed, res.Backend, res.Workers, res.Nodes)
	}
	var names []string
	for _, s := range scenarios {
		names = append(names, s.name)
	}
	checkSane(t, res, names)
	checkReport(t, res, out)
	// Without faults, nothing may fail: the workload itself is sound.
	for _, s := range res.Scenarios {
		if s.Name != "balance" && s.Name != "hot-spot" && s.Name != "overhead" {
			continue
		}
		for _, p := range s.Pools {
			if p.Errors != 0 {
				t.Errorf("%s/%s: %d errors without faults: %v", s.Name, p.Pool, p.Errors, p.ErrorExamples)
			}
		}
	}
	if left, _ := filepath.Glob(filepath.Join(tmp, "clustertest-*")); len(left) > 0 {
		t.Errorf("cluster directories left behind: %v", left)
	}
}

func TestRealPostgres(t *testing.T) {
	if err := clustertest.Available(); err != nil {
		if os.Getenv("CLUSTERTEST_REQUIRE") == "1" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, stderr, code := runJSON(t, ctx, "-backend", "postgres", "-scenario", "balance", "-duration", "1500ms", "-pgxpool-churn", "100ms", "-out", out)
	if code != 0 {
		t.Fatalf("exit code %d\n%s", code, stderr)
	}
	if res.Backend != "postgres" {
		t.Errorf("backend %q", res.Backend)
	}
	checkSane(t, res, []string{"balance"})
	checkReport(t, res, out)
	// -pgxpool-churn: pgxpool's turn opened short-lived connections
	// beside the pool (one every 100 ms for 1.5 s), counted apart from the
	// pool's own, which stay its 24.
	for _, p := range res.Scenarios[0].Pools {
		if p.Pool != pgxpoolKind {
			continue
		}
		if p.ProbeConns < 3 || p.ConnsOpened != int64(p.PoolSize) {
			t.Errorf("pgxpool with -pgxpool-churn 100ms: %d short-lived connections, %d opened by the pool of %d; want at least 3, and the pool's own", p.ProbeConns, p.ConnsOpened, p.PoolSize)
		}
	}
}

func TestDSNRunsOnlyNonDestructiveScenarios(t *testing.T) {
	srv, err := fakepg.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dsn := "postgres://postgres@" + srv.Addr() + "/postgres?sslmode=disable"
	res, stderr, code := runJSON(t, ctx, "-dsn", dsn, "-duration", "900ms", "-workers", "4", "-cluster", "cluster_connect_rate=0", "-out", t.TempDir())
	if code != 0 {
		t.Fatalf("exit code %d\n%s", code, stderr)
	}
	checkSane(t, res, []string{"balance", "overhead"})
	if res.Settings["cluster_connect_rate"] != "off" || res.Settings["cluster_balance_interval"] != "250ms" {
		t.Errorf("settings %v: want -cluster applied over the benchmark's defaults", res.Settings)
	}
	if strings.Join(res.Skipped, ",") != "scale-out,rolling-restart,crash,hot-spot,regions" {
		t.Errorf("skipped %v", res.Skipped)
	}
	if !strings.Contains(stderr, "skipped scale-out, rolling-restart, crash, hot-spot, regions") {
		t.Errorf("does not say what it skipped:\n%s", stderr)
	}
}

// TestDSNCountsNodesByBackendKey points -dsn at an embedded cluster's load
// balancer: the pools' hooks must find the nodes from CockroachDB's
// BackendKey, and agree with the servers' own counts.
func TestDSNCountsNodesByBackendKey(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true, Seed: 3})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// Unlike CockroachDB, each clustertest node is a database of its own.
	for _, n := range c.Nodes() {
		if err := ensureKV(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	res, stderr, code := runJSON(t, ctx, "-dsn", c.DSN(), "-scenario", "balance", "-duration", "900ms", "-out", t.TempDir())
	if code != 0 {
		t.Fatalf("exit code %d\n%s", code, stderr)
	}
	checkSane(t, res, []string{"balance"})
	for _, p := range res.Scenarios[0].Pools {
		if p.Errors != 0 {
			t.Errorf("%s: %d errors: %v", p.Pool, p.Errors, p.ErrorExamples)
		}
		for id := range p.FinalNodeConns {
			if c.Node(id) == nil {
				t.Errorf("%s: counted connections on node %d, which does not exist", p.Pool, id)
			}
		}
	}
}

func TestUnreachableDSN(t *testing.T) {
	var stdout, stderr bytes.Buffer
	// Port 1 on localhost refuses at once; the connect timeout bounds the rest.
	code := run(context.Background(), []string{"-dsn", "postgres://u:secret@127.0.0.1:1/db?connect_timeout=3"}, &stdout, &stderr)
	if code != 1 {
		t.Fatalf("exit code %d, want 1\n%s", code, stderr.String())
	}
	if !strings.Contains(stderr.String(), "cannot connect to -dsn host 127.0.0.1 port 1") {
		t.Errorf("unclear error: %s", stderr.String())
	}
	if strings.Contains(stderr.String()+stdout.String(), "secret") {
		t.Error("the password was printed")
	}
}

func TestBadInput(t *testing.T) {
	for _, args := range [][]string{
		{"-nope"},
		{"-scenario", "balance,warp-speed"},
		{"-scenario", ""},
		{"-duration", "0s"},
		{"-duration", "soon"},
		{"-nodes", "0"},
		{"-workers", "-1"},
		{"-backend", "oracle"},
		{"-pools", "0"},
		{"-pool-conns", "0"},
		{"-fleet-phase", "100ms"},
		{"-pgxpool-churn", "-1s"},
		{"-repeat", "0"},
		{"-repeat", "21"},
		{"-pgxpool-churn", "10us"},
		{"-warmup", "-1s"},
		{"-warmup", "11m"},
		{"-cluster", "pool_max_conns=3"},
		{"-cluster", "cluster_bogus=1"},
		{"-cluster", "cluster_connect_rate=-1"},
		{"extra-argument"},
	} {
		var stdout, stderr bytes.Buffer
		if code := run(context.Background(), args, &stdout, &stderr); code != 2 {
			t.Errorf("%v: exit code %d, want 2", args, code)
		}
		if !strings.Contains(stderr.String(), "usage: clusterbench") {
			t.Errorf("%v: no usage on stderr:\n%s", args, stderr.String())
		}
	}
}

func TestInterruptClosesTheCluster(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	ctx, cancel := context.WithCancel(context.Background())
	var stdout, stderr syncBuffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"-backend", "inprocess", "-scenario", "crash", "-duration", "1m", "-out", t.TempDir()}, &stdout, &stderr)
	}()
	// Interrupt once the load runs (its progress line is out).
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(stdout.String(), "running for") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	select {
	case code := <-done:
		if code != 130 {
			t.Errorf("exit code %d, want 130\n%s", code, stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("run did not stop after the interrupt")
	}
	if left, _ := filepath.Glob(filepath.Join(tmp, "clustertest-*")); len(left) > 0 {
		t.Errorf("cluster directories left behind: %v", left)
	}
}

func TestSettledAt(t *testing.T) {
	s := func(t float64, a, b int) Sample { return Sample{T: t, Conns: map[int]int{1: a, 2: b}} }
	nodes := []int{1, 2}
	for _, tc := range []struct {
		name    string
		samples []Sample
		want    float64 // -1: never
	}{
		{"balanced from the start", []Sample{s(0, 5, 5), s(1, 5, 5)}, 0},
		{"balances later", []Sample{s(0, 8, 2), s(1, 6, 4), s(2, 5, 5), s(3, 5, 5)}, 2},
		{"balanced then not", []Sample{s(0, 5, 5), s(1, 8, 2)}, -1},
		{"dip in total resets", []Sample{s(0, 5, 5), s(1, 4, 4), s(2, 5, 5)}, 2},
		{"never", []Sample{s(0, 8, 2), s(1, 8, 2)}, -1},
	} {
		got := settledAt(tc.samples, 0, nodes, 10)
		if (got == nil) != (tc.want < 0) || (got != nil && *got != tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestMinMoves(t *testing.T) {
	for _, tc := range []struct {
		conns map[int]int
		want  int
	}{
		{map[int]int{1: 8, 2: 8, 3: 8}, 0},
		{map[int]int{1: 9, 2: 8, 3: 7}, 1},
		{map[int]int{1: 10, 2: 7, 3: 7}, 2},
		{map[int]int{1: 9, 2: 9, 3: 6}, 2}, // targets 8, 8, 8
		{map[int]int{1: 9, 2: 9, 3: 7}, 1}, // 25: targets 9, 8, 8
		{map[int]int{1: 12, 2: 12}, 8},     // node 3 empty
	} {
		if got := minMoves(tc.conns, []int{1, 2, 3}); got != tc.want {
			t.Errorf("minMoves(%v) = %d, want %d", tc.conns, got, tc.want)
		}
	}
}

func TestPercentiles(t *testing.T) {
	var d []time.Duration
	for i := 100; i >= 1; i-- {
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	l := percentiles(d)
	if l.P50 != 50 || l.P90 != 90 || l.P99 != 99 || l.Max != 100 {
		t.Errorf("percentiles = %+v", l)
	}
	if (percentiles(nil) != Latency{}) {
		t.Error("percentiles of nothing should be zero")
	}
}

// syncBuffer is a bytes.Buffer safe for one writer and one reader.
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

// -repeat runs each scenario's pair again and gives the spread of the
// ratios; the first pair is the one the table shows, and the pairs take
// turns at which pool runs first. overhead alternates its pools already and
// is run once.
func TestRepeatInProcess(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, stderr, code := runJSON(t, ctx, "-backend", "inprocess", "-scenario", "balance,overhead,crash", "-duration", "600ms", "-warmup", "200ms", "-repeat", "3", "-seed", "7", "-out", t.TempDir())
	if code != 0 {
		t.Fatalf("exit code %d\n%s", code, stderr)
	}
	var order []string
	for _, line := range strings.Split(stderr, "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == "balance" && strings.HasSuffix(f[1], ":") && f[2] == "running" {
			order = append(order, strings.TrimSuffix(f[1], ":"))
		}
	}
	if want := []string{"pgxpool", "clusterpool", "clusterpool", "pgxpool", "pgxpool", "clusterpool"}; !slices.Equal(order, want) {
		t.Errorf("balance's runs in the order %v, want %v\n%s", order, want, stderr)
	}
	for _, s := range res.Scenarios {
		r := s.Repeats
		switch s.Name {
		case "balance":
			if r == nil || r.Runs != 3 || r.P99 == nil || r.Max == nil || r.Throughput == nil {
				t.Fatalf("balance with -repeat 3: repeats %+v, want three pairs' ratios", r)
			}
			for name, sp := range map[string]*Spread{"p99": r.P99, "max": r.Max, "throughput": r.Throughput} {
				if len(sp.Values) != 3 || sp.Min > sp.Median || sp.Median > sp.Max {
					t.Errorf("%s ratios %+v: want 3 values, min ≤ median ≤ max", name, sp)
				}
			}
			if want := s.Pools[1].Latency.P99 / s.Pools[0].Latency.P99; math.Abs(r.P99.Values[0]-want) > 1e-9 {
				t.Errorf("first pair's p99 ratio %v, want the table's %v", r.P99.Values[0], want)
			}
		case "overhead":
			if r != nil {
				t.Errorf("overhead with -repeat: repeats %+v, want none (its turns alternate)", r)
			}
		case "crash":
			// The kill and the restart cut each run in three.
			var labels []string
			for _, ph := range r.Phases {
				labels = append(labels, ph.Label)
				if len(ph.P99.Values) != 3 {
					t.Errorf("crash phase %q: ratios %v, want 3", ph.Label, ph.P99.Values)
				}
			}
			if want := []string{"start → kill 2", "kill 2 → restart 2", "restart 2 → end"}; !slices.Equal(labels, want) {
				t.Errorf("crash phases %q, want %q", labels, want)
			}
		}
	}
}

// The phases cut the operations at the events' times, by when each started.
func TestPhaseLatencies(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		var d []time.Duration
		for _, x := range v {
			d = append(d, time.Duration(x)*time.Millisecond)
		}
		return d
	}
	// Started at 0.1, 0.2, 1.2, 1.5 (the kill's own instant: after it), 3.5
	// and 5.1 s (after the end: the last phase); latencies in ms.
	at := ms(100, 200, 1200, 1500, 3500, 5100)
	lat := ms(1, 3, 50, 7, 2, 4)
	evs := []Event{{T: 3, Label: "restart 2"}, {T: 1.5, Label: "kill 2"}, {T: 1.6, Label: "nothing started"}}
	got := phaseLatencies(lat, at, evs, 5)
	want := []PhaseLatency{
		{Label: "start → kill 2", From: 0, To: 1.5, Ops: 3, P99: 50},
		{Label: "kill 2 → nothing started", From: 1.5, To: 1.6, Ops: 1, P99: 7},
		{Label: "restart 2 → end", From: 3, To: 5, Ops: 2, P99: 4},
	}
	if !slices.Equal(got, want) {
		t.Errorf("phases\n got %+v\nwant %+v", got, want)
	}
	if !slices.Equal(lat, ms(1, 3, 50, 7, 2, 4)) {
		t.Errorf("latencies reordered: %v", lat)
	}
	if phaseLatencies(lat, at, nil, 5) != nil {
		t.Error("phases without events")
	}
}

// A phase's p99 ratios are taken over the pairs that have it on both sides.
func TestPhaseRatios(t *testing.T) {
	run := func(p99 ...float64) PoolResult {
		var r PoolResult
		for i, v := range p99 {
			if v > 0 {
				r.Phases = append(r.Phases, PhaseLatency{Label: []string{"a", "b"}[i], P99: v})
			}
		}
		r.Latency.P99, r.Latency.Max, r.OpsPerSec = 1, 1, 1
		return r
	}
	r := repeats([][2]PoolResult{{run(2, 4), run(3, 4)}, {run(2, 0), run(2, 8)}, {run(1, 2), run(1, 6)}})
	if len(r.Phases) != 2 || r.Phases[0].Label != "a" || r.Phases[1].Label != "b" {
		t.Fatalf("phases %+v, want a then b", r.Phases)
	}
	if a := r.Phases[0].P99; !slices.Equal(a.Values, []float64{1.5, 1, 1}) || a.Median != 1 {
		t.Errorf("a: %+v, want 1.5, 1, 1 with median 1", a)
	}
	if b := r.Phases[1].P99; !slices.Equal(b.Values, []float64{1, 3}) || b.Median != 2 {
		t.Errorf("b: %+v, want 1 and 3 (the second pair's pgxpool lacks b), median 2", b)
	}
	if s := r.phaseSummary(); s != "a ×1.00 (×1.00–×1.50); b ×2.00 (×1.00–×3.00)" {
		t.Errorf("phase summary %q", s)
	}
}

// The phases' ratios come below the table, a line each.
func TestWriteTablePhases(t *testing.T) {
	pool := func(kind string) PoolResult {
		return PoolResult{Pool: kind, Metrics: []Metric{{Name: "p99", Label: "p99 latency", Unit: "ms", Value: value(2)}}}
	}
	res := &Results{Scenarios: []ScenarioResult{{
		Name:  "crash",
		Pools: []PoolResult{pool(pgxpoolKind), pool(clusterpoolKind)},
		Repeats: &Repeats{Runs: 2, Phases: []PhaseSpread{
			{Label: "start → kill 2", P99: &Spread{Median: 1, Min: 0.9, Max: 1.1}},
			{Label: "kill 2 → end", P99: &Spread{Median: 1.5, Min: 1.2, Max: 1.8}},
		}},
	}}}
	var b bytes.Buffer
	writeTable(&b, res)
	want := "\ncrash, p99 between events over the 2 pairs (clusterpool ÷ pgxpool, median and range):\n" +
		"  start → kill 2  ×1.00 (×0.90–×1.10)\n" +
		"  kill 2 → end  ×1.50 (×1.20–×1.80)\n"
	if !strings.HasSuffix(b.String(), want) {
		t.Errorf("table ends\n%s\nwant it to end\n%s", b.String(), want)
	}
}
