package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// apps builds one sample: app → node → sessions.
func appsAt(t float64, apps map[string]map[int]int) fleetSample {
	return fleetSample{T: t, Apps: apps}
}

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		v    []int
		want int
	}{{[]int{1, 2, 3}, 2}, {[]int{3, 2, 1}, 2}, {[]int{5, 5, 0}, 5}, {[]int{0, 1, 0, 1, 0}, 0}, {[]int{2, 3, 3, 2, 3}, 3}, {[]int{7}, 7}} {
		if got := median(slices.Clone(tc.v)); got != tc.want {
			t.Errorf("median(%v) = %d, want %d", tc.v, got, tc.want)
		}
	}
}

func TestSmoothAppsDropsProbesKeepsMoves(t *testing.T) {
	// Pool a holds 3 on node 1 throughout; a probe of pool b shows on node
	// 2 in one sample, a slower one of pool a on node 1 in two; pool a
	// moves one connection from node 1 to node 2 at sample 4 for good.
	raw := []fleetSample{
		appsAt(0.0, map[string]map[int]int{"a": {1: 3, 2: 0}}),
		appsAt(0.1, map[string]map[int]int{"a": {1: 3, 2: 0}, "b": {1: 0, 2: 1}}),
		appsAt(0.2, map[string]map[int]int{"a": {1: 4, 2: 0}}),
		appsAt(0.3, map[string]map[int]int{"a": {1: 4, 2: 0}}),
		appsAt(0.4, map[string]map[int]int{"a": {1: 2, 2: 1}}),
		appsAt(0.5, map[string]map[int]int{"a": {1: 2, 2: 1}}),
		appsAt(0.6, map[string]map[int]int{"a": {1: 2, 2: 1}}),
	}
	got := smoothApps(raw)
	if len(got) != len(raw) {
		t.Fatalf("%d samples, want %d", len(got), len(raw))
	}
	want := [][2]int{{3, 0}, {3, 0}, {3, 0}, {3, 0}, {2, 1}, {2, 1}, {2, 1}}
	for i, s := range got {
		if s.T != raw[i].T {
			t.Errorf("sample %d at %v, want %v", i, s.T, raw[i].T)
		}
		if g := [2]int{s.Apps["a"][1], s.Apps["a"][2]}; g != want[i] {
			t.Errorf("sample %d: pool a on nodes 1, 2 = %v, want %v", i, g, want[i])
		}
		if n := s.Apps["b"][2]; n != 0 {
			t.Errorf("sample %d: the probe of pool b is still counted (%d)", i, n)
		}
	}
	// A node that appears (added) keeps its counts once two samples agree.
	raw = []fleetSample{
		appsAt(0, map[string]map[int]int{"a": {1: 2}}),
		appsAt(1, map[string]map[int]int{"a": {1: 1, 4: 1}}),
		appsAt(2, map[string]map[int]int{"a": {1: 1, 4: 1}}),
	}
	got = smoothApps(raw)
	if got[2].Apps["a"][4] != 1 || got[1].Apps["a"][4] != 1 || got[0].Apps["a"][4] != 0 {
		t.Errorf("node 4 over time: %d %d %d, want 0 1 1", got[0].Apps["a"][4], got[1].Apps["a"][4], got[2].Apps["a"][4])
	}
}

func TestFleetEven(t *testing.T) {
	apps := []string{"a", "b"}
	nodes := []int{1, 2, 3}
	for _, tc := range []struct {
		name   string
		s      map[string]map[int]int
		rejoin int
		fair   float64
		want   bool
	}{
		{"each pool within ±1", map[string]map[int]int{"a": {1: 2, 2: 1, 3: 1}, "b": {1: 1, 2: 2, 3: 1}}, 0, 0, true},
		{"one pool spread 2", map[string]map[int]int{"a": {1: 2, 2: 2, 3: 0}, "b": {1: 1, 2: 2, 3: 1}}, 0, 0, false},
		{"one pool short of its conns", map[string]map[int]int{"a": {1: 1, 2: 1, 3: 1}, "b": {1: 1, 2: 2, 3: 1}}, 0, 0, false},
		{"a move's replacement open beside the old conn", map[string]map[int]int{"a": {1: 2, 2: 2, 3: 1}, "b": {1: 1, 2: 2, 3: 1}}, 0, 0, true},
		{"a pool missing", map[string]map[int]int{"a": {1: 2, 2: 1, 3: 1}}, 0, 0, false},
		{"rejoined node at 95% of fair, rounded down", map[string]map[int]int{"a": {1: 2, 2: 1, 3: 1}, "b": {1: 1, 2: 2, 3: 1}}, 3, 2.2, true},
		{"rejoined node below 95% of fair", map[string]map[int]int{"a": {1: 2, 2: 1, 3: 1}, "b": {1: 1, 2: 2, 3: 1}}, 3, 4, false}, // 2 < ⌊3.8⌋
		// Sessions on a node outside the set do not count for the pool.
		{"conns on a node left out", map[string]map[int]int{"a": {1: 1, 2: 1, 3: 1, 4: 1}, "b": {1: 1, 2: 2, 3: 1}}, 0, 0, false},
	} {
		if got := fleetEven(fleetSample{Apps: tc.s}, apps, 4, nodes, tc.rejoin, tc.fair); got != tc.want {
			t.Errorf("%s: fleetEven = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// okSamples returns a sample every step seconds from 0, on which okCond
// holds where vals says so.
func okSamples(step float64, vals ...bool) []fleetSample {
	var s []fleetSample
	for i, v := range vals {
		var apps map[string]map[int]int
		if v {
			apps = map[string]map[int]int{"ok": {1: 1}}
		}
		s = append(s, appsAt(float64(i)*step, apps))
	}
	return s
}

func okCond(s fleetSample) bool { return s.Apps["ok"][1] == 1 }

// whenCase is a case of a function that finds, in samples between from and
// to, when okCond starts to hold: want is that time, -1 for never.
type whenCase struct {
	name     string
	samples  []fleetSample
	from, to float64
	want     float64
}

func checkWhen(t *testing.T, cases []whenCase, when func(s []fleetSample, from, to float64) *float64) {
	t.Helper()
	for _, tc := range cases {
		got := when(tc.samples, tc.from, tc.to)
		if (got == nil) != (tc.want < 0) || (got != nil && *got != tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, deref(got), tc.want)
		}
	}
}

func TestHoldsFrom(t *testing.T) {
	mk := func(vals ...bool) []fleetSample { return okSamples(1, vals...) }
	checkWhen(t, []whenCase{
		{"from the start", mk(true, true, true), 0, 10, 0},
		{"later", mk(false, false, true, true), 0, 10, 2},
		{"counted from from", mk(false, false, true, true), 1, 10, 1},
		{"lost again", mk(true, true, false), 0, 10, -1},
		{"a dip resets", mk(true, false, true, true), 0, 10, 2},
		{"only until to", mk(false, true, true, false), 0, 2, 1},
		{"nothing in the window", mk(true, true), 5, 10, -1},
	}, func(s []fleetSample, from, to float64) *float64 { return holdsFrom(s, from, to, okCond) })
}

// firstHeld finds the first run of samples that holds for hold seconds,
// whatever comes after it.
func TestFirstHeld(t *testing.T) {
	mk := func(vals ...bool) []fleetSample { return okSamples(0.5, vals...) }
	checkWhen(t, []whenCase{
		{"from the start", mk(true, true, true), 0, 10, 0},
		{"later", mk(false, true, true, true, false), 0, 10, 0.5},
		{"a break after it counts not", mk(true, true, true, false, true), 0, 10, 0},
		{"too short, then held", mk(true, true, false, true, true, true), 0, 10, 1.5},
		{"never long enough", mk(true, true, false, true, true), 0, 10, -1},
		{"counted from from", mk(false, false, true, true, true), 0.5, 10, 0.5},
		{"cut at to", mk(true, true, true), 0, 0.5, -1},
	}, func(s []fleetSample, from, to float64) *float64 { return firstHeld(s, from, to, 1, okCond) })
}

func deref(v *float64) any {
	if v == nil {
		return nil
	}
	return *v
}

func TestCountAndPeakIn(t *testing.T) {
	times := []float64{0.1, 0.2, 0.95, 1.05, 1.5, 3, 3.2}
	if got := countIn(times, 0.2, 1.5); got != 3 { // 0.2, 0.95, 1.05
		t.Errorf("countIn = %d, want 3", got)
	}
	if got := countIn(times, 4, 5); got != 0 {
		t.Errorf("countIn past the end = %d, want 0", got)
	}
	for _, tc := range []struct {
		from, to float64
		want     int
	}{
		{0, 10, 4},    // 0.1, 0.2, 0.95, 1.05 within [0.1, 1.1)
		{0.15, 10, 3}, // 0.2 … 1.05, or 0.95 … 1.5
		{1, 10, 2},    // 1.05, 1.5 or 3, 3.2
		{2, 10, 2},    // 3, 3.2
		{5, 10, 0},
	} {
		if got := peakIn(times, tc.from, tc.to, 1); got != tc.want {
			t.Errorf("peakIn(%v, %v) = %d, want %d", tc.from, tc.to, got, tc.want)
		}
	}
	// A burst across a second boundary is one burst.
	if got := peakIn([]float64{0.9, 0.95, 1.0, 1.05, 1.1}, 0, 5, 1); got != 5 {
		t.Errorf("burst across 1 s: peak %d, want 5", got)
	}
}

func TestFleetPhaseResult(t *testing.T) {
	apps := []string{"a", "b"}
	// Two pools of 3 on nodes 1-2; node 3 joins at t=1 and gets one of
	// each pool's connections at t=2.
	samples := []fleetSample{
		appsAt(0, map[string]map[int]int{"a": {1: 2, 2: 1}, "b": {1: 2, 2: 1}}),
		appsAt(1, map[string]map[int]int{"a": {1: 2, 2: 1, 3: 0}, "b": {1: 2, 2: 1, 3: 0}}),
		appsAt(2, map[string]map[int]int{"a": {1: 1, 2: 1, 3: 1}, "b": {1: 2, 2: 0, 3: 1}}),
		appsAt(3, map[string]map[int]int{"a": {1: 1, 2: 1, 3: 1}, "b": {1: 1, 2: 1, 3: 1}}),
		appsAt(4, map[string]map[int]int{"a": {1: 1, 2: 1, 3: 1}, "b": {1: 1, 2: 1, 3: 1}}),
	}
	accepts := map[int][]float64{3: {1.5, 1.6, 2.2, 2.4, 3.9}, 1: {0.1}}
	p := fleetPhaseResult("scale-out", samples, accepts, apps, 3, []int{1, 2, 3}, 3, 1, 10)
	if p.Fair != 2 || p.ClusterSpread != 0 || p.WorstPoolSpread != 0 || p.PoolsWithinOne != 2 || p.RejoinConns != 2 {
		t.Errorf("end of phase: %+v", p)
	}
	if p.EvenAfter == nil || *p.EvenAfter != 2 { // t=3, two seconds after the add
		t.Errorf("even after %v, want 2", deref(p.EvenAfter))
	}
	if p.PeakAcceptsPerSec != 4 { // 1.5 … 2.4; node 1's accept is not node 3's
		t.Errorf("peak %d, want 4", p.PeakAcceptsPerSec)
	}
	if want := map[string]int{"a": 0, "b": 0}; !reflect.DeepEqual(p.PoolSpreads, want) {
		t.Errorf("pool spreads %v, want %v", p.PoolSpreads, want)
	}
	// The same phase cut before the last move: never even, pool b at
	// spread 2, nodes at 3, 1, 2.
	p = fleetPhaseResult("scale-out", samples, accepts, apps, 3, []int{1, 2, 3}, 3, 1, 2)
	if p.EvenAfter != nil || p.WorstPoolSpread != 2 || p.PoolsWithinOne != 1 || p.ClusterSpread != 2 {
		t.Errorf("cut at t=2: %+v, even %v", p, deref(p.EvenAfter))
	}
}

func TestFleetPoints(t *testing.T) {
	apps := []string{"a", "b"}
	samples := []fleetSample{
		appsAt(0, map[string]map[int]int{"a": {1: 2, 2: 1, 3: 1}, "b": {1: 2, 2: 1, 3: 1}}),
		appsAt(1, map[string]map[int]int{"a": {1: 2, 2: 1, 3: 1, 4: 0}, "b": {1: 2, 2: 1, 3: 1, 4: 0}}),
		appsAt(2, map[string]map[int]int{"a": {1: 1, 2: 1, 3: 1, 4: 1}, "b": {1: 1, 2: 1, 3: 1, 4: 1}}),
	}
	got := fleetPoints(samples, apps, 4, func(t float64) ([]int, int) {
		if t >= 1 {
			return nodeIDs(1, 4), 4
		}
		return nodeIDs(1, 3), 0
	})
	want := []FleetPoint{
		{T: 0, ClusterSpread: 2, WorstPoolSpread: 1, PoolsWithinOne: 2, Even: true},
		{T: 1, ClusterSpread: 4, WorstPoolSpread: 2, PoolsWithinOne: 0, Even: false},
		{T: 2, ClusterSpread: 0, WorstPoolSpread: 0, PoolsWithinOne: 2, Even: true},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("fleetPoints:\n got %+v\nwant %+v", got, want)
	}
}

func TestFleetTimeline(t *testing.T) {
	tl := newFleetTimeline(10 * time.Second)
	want := fleetTimeline{restFrom: 20 * time.Second, add: 25 * time.Second, drain: 35 * time.Second, drainWait: time.Second, up: 37 * time.Second, end: 47 * time.Second}
	if tl != want {
		t.Errorf("timeline %+v, want %+v", tl, want)
	}
}

func TestFleetMetrics(t *testing.T) {
	phase := func(name string, nodes, rejoin int, fair float64, conns int, even *float64) FleetPhase {
		return FleetPhase{Name: name, Nodes: nodeIDs(1, nodes), Rejoin: rejoin, Fair: fair, RejoinConns: conns, EvenAfter: even, ClusterSpread: 3, WorstPoolSpread: 1, PoolsWithinOne: 16}
	}
	fd := &FleetDetail{Pools: 16, ConnsPerPool: 10, RestFrom: 20, RestTo: 25, RestSessions: 40, RestProbes: 38, Sessions: 400, ProbeSessions: 100,
		Phases: []FleetPhase{phase("cold start", 3, 0, 160.0/3, 0, value(3)), phase("scale-out", 4, 4, 40, 38, value(2.5)), phase("restart", 4, 1, 40, 37, nil)}}
	r := &PoolResult{Errors: 0}
	ms := fleetMetrics(r, fd)
	byName := make(map[string]Metric)
	for _, m := range ms {
		if _, dup := byName[m.Name]; dup {
			t.Errorf("metric %s twice", m.Name)
		}
		byName[m.Name] = m
	}
	for name, want := range map[string]string{
		"new_node_conns":  "38 of 40",
		"restarted_conns": "37 of 40",
		"pool_spread_end": "1 (16 of 16 pools within ±1)",
		"even_restart":    "never",
		"even_add":        "2.50 s",
		"rest_sessions":   "40",
		"rest_probes":     "38",
		"probe_share":     "25 %",
		"pool_sessions":   "300",
		"spread_start":    "3",
		"peak_restart":    "0 /s",
		"errors":          "0",
	} {
		m, ok := byName[name]
		if !ok {
			t.Errorf("no metric %s", name)
			continue
		}
		if got := formatValue(m); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	if l := byName["new_node_conns"].Label; l != "conns on the new node 4 after scale-out (fair share 40)" {
		t.Errorf("label %q", l)
	}
	// 38 of 40 is the goal (95%): at the ideal.
	if m := byName["new_node_conns"]; !atIdeal(m, *m.Value) || atIdeal(byName["restarted_conns"], 37) {
		t.Errorf("ideal of a share: 38 of 40 should be at it, 37 of 40 not")
	}
	if m := byName["spread_start"]; m.Ideal == nil || *m.Ideal != 1 { // 160 over 3 nodes
		t.Errorf("spread over 3 nodes: ideal %v, want 1", deref(m.Ideal))
	}
	if m := byName["spread_end"]; m.Ideal == nil || *m.Ideal != 0 { // 160 over 4 nodes
		t.Errorf("spread over 4 nodes: ideal %v, want 0", deref(m.Ideal))
	}
}

func TestCompare(t *testing.T) {
	m := func(v *float64, better, unit string, ideal *float64, noise float64) Metric {
		return Metric{Name: "x", Value: v, Better: better, Unit: unit, Ideal: ideal, Noise: noise}
	}
	for _, tc := range []struct {
		name       string
		base, this Metric
		want       int
	}{
		{"spread 9 → 0", m(value(9), "lower", "", value(1), 1), m(value(0), "lower", "", value(1), 1), 1},
		{"spread 0 → 1: both ideal", m(value(0), "lower", "", value(1), 1), m(value(1), "lower", "", value(1), 1), 0},
		{"spread 2 → 3: one connection is noise", m(value(2), "lower", "", value(1), 1), m(value(3), "lower", "", value(1), 1), 0},
		{"no errors either side", m(value(0), "lower", "", value(0), 0), m(value(0), "lower", "", value(0), 0), 0},
		{"errors 0 → 2", m(value(0), "lower", "", value(0), 0), m(value(2), "lower", "", value(0), 0), -1},
		{"latency within a fifth", m(value(1.24), "lower", "ms", nil, 0), m(value(1.45), "lower", "ms", nil, 0), 0},
		{"latency ×14", m(value(88), "lower", "ms", nil, 0), m(value(1245), "lower", "ms", nil, 0), -1},
		{"throughput within a tenth", m(value(6416), "higher", "ops/s", nil, 0), m(value(6000), "higher", "ops/s", nil, 0), 0},
		{"throughput ×0.8", m(value(6706), "higher", "ops/s", nil, 0), m(value(5448), "higher", "ops/s", nil, 0), -1},
		{"fair share reached, pgxpool over it", m(value(7), "higher", "", value(6), 0), m(value(6), "higher", "", value(6), 0), 0},
		{"pgxpool never balanced", m(nil, "lower", "s", value(0), timeNoise), m(value(2.5), "lower", "s", value(0), timeNoise), 1},
		{"clusterpool never balanced", m(value(2.5), "lower", "s", value(0), timeNoise), m(nil, "lower", "s", value(0), timeNoise), -1},
		{"times one sample apart", m(value(2.0), "lower", "s", value(0), timeNoise), m(value(2.1), "lower", "s", value(0), timeNoise), 0},
		{"neither got there", m(nil, "lower", "s", nil, 0), m(nil, "lower", "s", nil, 0), 0},
	} {
		if got := compare(tc.base, tc.this); got != tc.want {
			t.Errorf("%s: compare = %d, want %d", tc.name, got, tc.want)
		}
	}
}

func TestTurnRatios(t *testing.T) {
	got := turnRatios([]float64{100, 110, 90}, []float64{99, 121, 90})
	if got == nil || got.Median != 1 || got.Min != 0.99 || got.Max < 1.0999 || got.Max > 1.1001 || len(got.Values) != 3 {
		t.Errorf("turnRatios = %+v", got)
	}
	if got := turnRatios([]float64{100, 100}, []float64{90, 110}); got == nil || got.Median != 1 {
		t.Errorf("even count: median %+v, want 1", got)
	}
	if turnRatios(nil, []float64{1}) != nil {
		t.Error("no turns: want nil")
	}
}

// TestReportMarksOnlyRealDifferences renders a report from made-up results:
// the summary's verdicts, "no errors" for a pool without errors, no red on
// a value at its ideal, and the overhead's turn ratios in place of a plot.
func TestReportMarksOnlyRealDifferences(t *testing.T) {
	crash := func(kind string, errs int64, recoverMs float64) PoolResult {
		r := PoolResult{Pool: kind, Errors: errs, Ops: 100, LastErrorAt: recoverMs / 1000,
			Samples: []Sample{{T: 0, Conns: map[int]int{1: 8, 2: 8, 3: 8}}}}
		rec := Metric{Name: "time_to_recover", Label: "kill → last caller error", Unit: "ms", Value: value(recoverMs), Better: "lower", Ideal: value(0)}
		if errs == 0 {
			rec.Text = "no errors"
		}
		r.Metrics = []Metric{errorsMetric(&r), rec,
			{Name: "spread_end", Label: "spread at end", Value: value(float64(errs % 2)), Better: "lower", Ideal: value(1), Noise: 1}}
		return r
	}
	overhead := func(kind string, turns ...float64) PoolResult {
		return PoolResult{Pool: kind, TurnOpsPerSec: turns, Metrics: []Metric{{Name: "ops_per_sec", Label: "SELECT 1 throughput", Unit: "ops/s", Value: value(turns[0]), Better: "higher"}}}
	}
	res := &Results{Scenarios: []ScenarioResult{
		{Name: "crash", Headline: "errors", Pools: []PoolResult{crash(pgxpoolKind, 10, 120), crash(clusterpoolKind, 0, 0)}},
		{Name: "overhead", Headline: "ops_per_sec", Pools: []PoolResult{overhead(pgxpoolKind, 100, 100, 100), overhead(clusterpoolKind, 98, 101, 97)}},
	}}
	for i := range res.Scenarios {
		res.Scenarios[i].computeRatios()
	}
	page := reportHTML(res)
	summary, _, _ := strings.Cut(page[strings.Index(page, `id="summary"`):], "</table>")
	for _, want := range []string{">crash</a>", ">overhead</a>", `class="better">clusterpool better`, ">no real difference<", "turns ×0.97–×1.01"} {
		if !strings.Contains(summary, want) {
			t.Errorf("summary lacks %q:\n%s", want, summary)
		}
	}
	if !strings.Contains(page, `<td class="better">no errors</td>`) {
		t.Error(`the pool without errors does not read "no errors"`)
	}
	if strings.Contains(page, "0.00 ms") {
		t.Error(`"0.00 ms" where there were no errors`)
	}
	// clusterpool's spread 1 (pgxpool 0) is at its ideal: not red.
	if strings.Contains(page, `class="worse"`) {
		t.Errorf("a value is marked worse:\n%s", page)
	}
	if n := strings.Count(page, "<svg"); n != 1 {
		t.Errorf("%d plots, want 1 (crash only, none for overhead)", n)
	}
	if !strings.Contains(page, "per pair of turns: ×0.98, ×1.01, ×0.97") {
		t.Error("overhead's turn ratios missing")
	}
}

func TestScenarioFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{nil, []string{"balance", "scale-out", "rolling-restart", "crash", "hot-spot", "regions", "overhead"}},
		{[]string{"-scenario", "fleet"}, []string{"fleet"}},
		{[]string{"-scenarios", "fleet"}, []string{"fleet"}},
		{[]string{"-scenario", "all,fleet"}, []string{"balance", "scale-out", "rolling-restart", "crash", "hot-spot", "regions", "overhead", "fleet"}},
	} {
		var stderr bytes.Buffer
		o, code := parseFlags(tc.args, &stderr)
		if o == nil {
			t.Errorf("%v: exit %d: %s", tc.args, code, stderr.String())
			continue
		}
		if !slices.Equal(o.scenarios, tc.want) {
			t.Errorf("%v: scenarios %v, want %v", tc.args, o.scenarios, tc.want)
		}
		if o.pools != 16 || o.poolConns != 10 || o.fleetPhase != 10*time.Second {
			t.Errorf("%v: fleet defaults %d × %d, phase %v", tc.args, o.pools, o.poolConns, o.fleetPhase)
		}
	}
}

// TestFleetInProcess runs the fleet scenario end to end on a tiny fleet, on
// the in-process backend: every figure is there for both pools, and the
// servers' counts agree with the pools'.
func TestFleetInProcess(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	out := filepath.Join(t.TempDir(), "report")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, stderr, code := runJSON(t, ctx, "-backend", "inprocess", "-scenario", "fleet", "-pools", "3", "-pool-conns", "4", "-fleet-phase", "1s", "-seed", "11", "-out", out)
	if code != 0 {
		t.Fatalf("exit code %d\n%s", code, stderr)
	}
	if !strings.Contains(stderr, "probe interval 500ms") {
		t.Errorf("the output does not say the fleet's probe interval:\n%s", stderr)
	}
	if len(res.Scenarios) != 1 || res.Scenarios[0].Name != "fleet" {
		t.Fatalf("scenarios %+v", res.Scenarios)
	}
	s := res.Scenarios[0]
	if s.Settings["cluster_balance_interval"] != "500ms" || s.Settings["cluster_probe_interval"] != "500ms" {
		t.Errorf("fleet settings %v, want 500ms intervals", s.Settings)
	}
	if s.Headline != "spread_end" || s.Verdict == "" {
		t.Errorf("headline %q verdict %q", s.Headline, s.Verdict)
	}
	if len(s.Pools) != 2 || s.Pools[0].Pool != pgxpoolKind || s.Pools[1].Pool != clusterpoolKind {
		t.Fatalf("pools %+v", s.Pools)
	}
	var names []string
	for _, m := range s.Pools[1].Metrics {
		names = append(names, m.Name)
		if s.Pools[0].metric(m.Name) == nil {
			t.Errorf("metric %s missing for pgxpool", m.Name)
		}
	}
	for _, want := range []string{"spread_start", "pool_spread_start", "even_start", "rest_sessions", "rest_probes", "new_node_conns", "spread_add",
		"even_add", "peak_add", "restarted_conns", "spread_end", "pool_spread_end", "even_restart", "peak_restart", "pool_sessions", "probe_sessions",
		"probe_share", "errors", "p50", "p99", "max"} {
		if !slices.Contains(names, want) {
			t.Errorf("no metric %s (have %v)", want, names)
		}
	}
	for _, p := range s.Pools {
		where := "fleet/" + p.Pool
		f := p.Fleet
		if f == nil {
			t.Fatalf("%s: no fleet detail", where)
		}
		if p.PoolSize != 12 || f.Pools != 3 || f.ConnsPerPool != 4 {
			t.Errorf("%s: pool size %d, %d pools × %d", where, p.PoolSize, f.Pools, f.ConnsPerPool)
		}
		if len(f.Phases) != 3 {
			t.Fatalf("%s: phases %+v", where, f.Phases)
		}
		for _, ph := range f.Phases {
			if len(ph.PoolSpreads) != 3 {
				t.Errorf("%s: phase %s has spreads of %d pools, want 3: %v", where, ph.Name, len(ph.PoolSpreads), ph.PoolSpreads)
			}
		}
		if f.Phases[1].Rejoin != 4 || f.Phases[2].Rejoin != 1 || f.Phases[1].Fair != 3 {
			t.Errorf("%s: rejoining nodes %d, %d, fair share %v", where, f.Phases[1].Rejoin, f.Phases[2].Rejoin, f.Phases[1].Fair)
		}
		// A pool may count idle connections the drained node closed until
		// it next acquires them (pgxpool does): never fewer than the servers.
		if got := sum(p.FinalNodeConns); got > p.FinalPoolConns || got == 0 {
			t.Errorf("%s: servers hold %d of the fleet's sessions (%v), the pools %d", where, got, p.FinalNodeConns, p.FinalPoolConns)
		}
		if f.Sessions < p.PoolSize {
			t.Errorf("%s: servers accepted %d sessions for %d connections", where, f.Sessions, p.PoolSize)
		}
		if len(f.OverTime) != len(p.Samples) {
			t.Errorf("%s: %d points over time for %d samples", where, len(f.OverTime), len(p.Samples))
		}
		if p.Ops <= 0 || len(p.Samples) == 0 || len(p.Events) != 4 {
			t.Errorf("%s: ops %d, %d samples, events %v", where, p.Ops, len(p.Samples), p.Events)
		}
	}
	// pgxpool opens nothing while nothing changes and never probes.
	if f := s.Pools[0].Fleet; f.RestSessions != 0 || f.ProbeSessions != 0 {
		t.Errorf("pgxpool: %d sessions at rest, %d probes", f.RestSessions, f.ProbeSessions)
	}
	if f := s.Pools[1].Fleet; f.ProbeSessions == 0 {
		t.Error("clusterpool: no probe sessions counted")
	}
	html, err := os.ReadFile(filepath.Join(out, "index.html"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(html), `id="summary"`) || strings.Count(string(html), "<svg") != 1 {
		t.Error("report: want a summary and the fleet's one plot")
	}
	if _, err := os.Stat(filepath.Join(out, "fleet.svg")); err != nil {
		t.Error(err)
	}
	if left, _ := filepath.Glob(filepath.Join(tmp, "clustertest-*")); len(left) > 0 {
		t.Errorf("cluster directories left behind: %v", left)
	}
}
