package main

import (
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
	"text/tabwriter"
	"time"
)

// Results is everything one run measured; -json prints it as is.
type Results struct {
	Date     string            `json:"date"` // UTC, RFC 3339
	Args     []string          `json:"args"` // the command line, to run it again
	Backend  string            `json:"backend"`
	Seed     int64             `json:"seed"`
	Nodes    int               `json:"nodes"`
	Workers  int               `json:"workers"`
	Duration string            `json:"duration"` // per scenario per pool
	Warmup   string            `json:"warmup"`   // -warmup, for the warm scenarios
	Settings map[string]string `json:"settings"` // clusterpool settings used
	// Features lists what the clusterpool build under test does, so numbers
	// from different stages of the library can be told apart.
	Features  []string         `json:"features"`
	Scenarios []ScenarioResult `json:"scenarios"`
	Skipped   []string         `json:"skipped,omitempty"`
	Report    string           `json:"report,omitempty"` // path of the HTML report
}

// ScenarioResult holds one scenario, run once per pool on the same cluster set-up.
type ScenarioResult struct {
	Name        string       `json:"name"`
	Description string       `json:"description"`
	Pools       []PoolResult `json:"pools"` // pgxpool first, then clusterpool
	// Ratios are clusterpool ÷ pgxpool for each metric, by metric name; null
	// when undefined (pgxpool's value is 0 or one side has no value).
	Ratios map[string]*float64 `json:"ratios"`
	// Headline names the metric that matters most for the scenario, and
	// Verdict says which pool did better on it beyond noise: "clusterpool
	// better", "pgxpool better" or "no real difference".
	Headline string `json:"headline"`
	Verdict  string `json:"verdict"`
	// TurnRatios are clusterpool ÷ pgxpool throughput for each pair of
	// turns of an alternating scenario (overhead): their spread shows how
	// far the overall ratio can be trusted.
	TurnRatios *Spread `json:"turn_ratios,omitempty"`
	// Repeats are, with -repeat, clusterpool ÷ pgxpool over every pair of
	// runs (the first is Pools): one run's latency ratio moves by a third
	// on a busy machine, their median much less.
	Repeats *Repeats `json:"repeats,omitempty"`
	// Settings are clusterpool's settings when the scenario uses its own
	// (fleet); null means the run's.
	Settings map[string]string `json:"settings,omitempty"`
}

// Spread is the median and range of a few values.
type Spread struct {
	Median float64   `json:"median"`
	Min    float64   `json:"min"`
	Max    float64   `json:"max"`
	Values []float64 `json:"values"`
}

// PoolResult is one pool's run of one scenario.
type PoolResult struct {
	Pool      string   `json:"pool"` // "pgxpool" or "clusterpool"
	PoolSize  int      `json:"pool_size"`
	Ops       int64    `json:"ops"`
	Errors    int64    `json:"errors"`
	OpsPerSec float64  `json:"ops_per_sec"`
	Latency   Latency  `json:"latency_ms"`
	Metrics   []Metric `json:"metrics"`
	// Samples are the servers' open connections per node over time.
	Samples []Sample `json:"samples"`
	Events  []Event  `json:"events,omitempty"`
	// Phases are the latencies between the events (a kill, a restart): where
	// in the run a pool's tail is. None without events.
	Phases []PhaseLatency `json:"between_events,omitempty"`
	// FinalNodeConns are the servers' per-node counts after the load stopped,
	// and FinalPoolConns the pool's own total at the same moment: the two
	// agree unless a connection was opening or closing.
	FinalNodeConns map[int]int `json:"final_node_conns"`
	FinalPoolConns int         `json:"final_pool_conns"`
	// ConnsOpened is how many connections the pool opened during the run
	// (those it refused after connecting included): the servers' count of
	// accepted connections, less ProbeConns.
	ConnsOpened int64 `json:"conns_opened"`
	// ProbeConns are the short-lived connections opened beside the pool:
	// clusterpool's probes, pgxpool's churn (-pgxpool-churn).
	ProbeConns int64 `json:"probe_conns"`
	// Library holds clusterpool's own counters (ClusterStat) at the end.
	Library map[string]float64 `json:"clusterpool_stats,omitempty"`
	// WarmUp is how long the pool had been up when the load started, in a
	// warm scenario (-warmup); the samples, events and latencies count
	// from then, ConnsOpened and Library from the pool's creation.
	WarmUp float64 `json:"warm_up_s,omitempty"`
	// LastErrorAt is when the last caller error happened (s); 0 if none.
	LastErrorAt float64 `json:"last_error_s"`
	// ErrorExamples are a few distinct error messages callers saw.
	ErrorExamples []string `json:"error_examples,omitempty"`
	// TurnOpsPerSec is the throughput of each turn of an alternating
	// scenario, in the pool's turn order.
	TurnOpsPerSec []float64 `json:"turn_ops_per_sec,omitempty"`
	// Fleet holds the fleet scenario's details.
	Fleet *FleetDetail `json:"fleet,omitempty"`
}

// Latency percentiles of every operation, failed ones included, in milliseconds.
type Latency struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

// PhaseLatency is the latency of the operations that started between two
// of a run's events, or between the start or the end and the nearest.
type PhaseLatency struct {
	Label string  `json:"label"` // "start → kill 2", "kill 2 → restart 2", "restart 2 → end"
	From  float64 `json:"from_s"`
	To    float64 `json:"to_s"`
	Ops   int     `json:"ops"`
	P99   float64 `json:"p99_ms"`
}

// phaseLatencies splits operations (their latencies, and when each started)
// at the events' times and returns each phase's p99, in order; phases in
// which no operation started are left out, and so is everything without
// events. lat and at are not changed.
func phaseLatencies(lat, at []time.Duration, evs []Event, end float64) []PhaseLatency {
	if len(evs) == 0 {
		return nil
	}
	evs = append([]Event(nil), evs...)
	sort.SliceStable(evs, func(i, j int) bool { return evs[i].T < evs[j].T })
	cuts := append([]Event{{Label: "start"}}, evs...)
	cuts = append(cuts, Event{T: max(end, evs[len(evs)-1].T), Label: "end"})
	phases := make([][]time.Duration, len(cuts)-1)
	for i, a := range at {
		t := a.Seconds()
		k := sort.Search(len(cuts)-1, func(k int) bool { return cuts[k+1].T > t })
		k = min(k, len(phases)-1) // at or after the end: the last phase
		phases[k] = append(phases[k], lat[i])
	}
	var out []PhaseLatency
	for k, d := range phases {
		if len(d) == 0 {
			continue
		}
		out = append(out, PhaseLatency{
			Label: cuts[k].Label + " → " + cuts[k+1].Label,
			From:  cuts[k].T,
			To:    cuts[k+1].T,
			Ops:   len(d),
			P99:   percentiles(d).P99,
		})
	}
	return out
}

// Metric is one figure of a scenario. Value is null when the event never
// happened (e.g. pgxpool never balanced).
type Metric struct {
	Name   string   `json:"name"`
	Label  string   `json:"label"`
	Unit   string   `json:"unit"`
	Value  *float64 `json:"value"`
	Better string   `json:"better"` // "lower" or "higher"
	// Text, when set, is shown instead of the value: "no errors" rather
	// than a time of 0 ms, "38 of 40" for a share of a fair share.
	Text string `json:"text,omitempty"`
	// Ideal is the best value the figure can take (0 errors, a spread of
	// 1, the fair share); a value at or past it is never shown as worse.
	Ideal *float64 `json:"ideal,omitempty"`
	// Noise is the absolute difference below which two values are not
	// told apart (one connection of a spread, one sampling interval); the
	// relative threshold comes from the unit (see noiseOf).
	Noise float64 `json:"noise,omitempty"`
}

// Sample is the servers' open connections per node at T seconds into the run.
type Sample struct {
	T     float64     `json:"t"`
	Conns map[int]int `json:"conns"`
}

// Event marks something the scenario did to the cluster, at T seconds.
type Event struct {
	T     float64 `json:"t"`
	Label string  `json:"label"`
}

func value(v float64) *float64 { return &v }

func (r *PoolResult) metric(name string) *Metric {
	for i := range r.Metrics {
		if r.Metrics[i].Name == name {
			return &r.Metrics[i]
		}
	}
	return nil
}

// phase returns the run's phase labelled label, or nil.
func (r *PoolResult) phase(label string) *PhaseLatency {
	for i := range r.Phases {
		if r.Phases[i].Label == label {
			return &r.Phases[i]
		}
	}
	return nil
}

// computeRatios fills s.Ratios (clusterpool ÷ pgxpool for every metric),
// the turn ratios of an alternating scenario and the headline's verdict.
func (s *ScenarioResult) computeRatios() {
	s.Ratios = make(map[string]*float64)
	if len(s.Pools) != 2 {
		return
	}
	base, other := &s.Pools[0], &s.Pools[1]
	for _, m := range other.Metrics {
		b := base.metric(m.Name)
		if b == nil || b.Value == nil || m.Value == nil || *b.Value == 0 {
			s.Ratios[m.Name] = nil
			continue
		}
		s.Ratios[m.Name] = value(*m.Value / *b.Value)
	}
	s.TurnRatios = turnRatios(base.TurnOpsPerSec, other.TurnOpsPerSec)
	if b, m := base.metric(s.Headline), other.metric(s.Headline); b != nil && m != nil {
		s.Verdict = verdict(compare(*b, *m))
	}
}

// Repeats are the spreads of clusterpool ÷ pgxpool over repeated pairs of
// runs of one scenario.
type Repeats struct {
	Runs       int     `json:"runs"`
	P99        *Spread `json:"p99"`
	Max        *Spread `json:"max"`
	Throughput *Spread `json:"throughput"`
	// Phases are the p99 ratios of each phase between the run's events
	// (PoolResult.Phases), over the pairs that have it on both sides.
	Phases []PhaseSpread `json:"between_events,omitempty"`
}

// PhaseSpread is the spread of one phase's p99 ratios over repeated pairs.
type PhaseSpread struct {
	Label string  `json:"label"`
	P99   *Spread `json:"p99"`
}

// repeats returns the spreads of the pairs' ratios; nil for a single pair.
func repeats(pairs [][2]PoolResult) *Repeats {
	if len(pairs) < 2 {
		return nil
	}
	ratios := func(of func(PoolResult) float64) *Spread {
		var base, other []float64
		for _, p := range pairs {
			base, other = append(base, of(p[0])), append(other, of(p[1]))
		}
		return turnRatios(base, other)
	}
	return &Repeats{
		Runs:       len(pairs),
		P99:        ratios(func(r PoolResult) float64 { return r.Latency.P99 }),
		Max:        ratios(func(r PoolResult) float64 { return r.Latency.Max }),
		Throughput: ratios(func(r PoolResult) float64 { return r.OpsPerSec }),
		Phases:     phaseRatios(pairs),
	}
}

// phaseRatios returns, for each phase of the first pair's pgxpool run in
// order, the spread of its p99 ratios over the pairs in which both runs
// have that phase.
func phaseRatios(pairs [][2]PoolResult) []PhaseSpread {
	var out []PhaseSpread
	for _, ph := range pairs[0][0].Phases {
		var base, other []float64
		for _, p := range pairs {
			if b, o := p[0].phase(ph.Label), p[1].phase(ph.Label); b != nil && o != nil {
				base, other = append(base, b.P99), append(other, o.P99)
			}
		}
		if sp := turnRatios(base, other); sp != nil {
			out = append(out, PhaseSpread{Label: ph.Label, P99: sp})
		}
	}
	return out
}

// turnRatios pairs the two pools' turns in order (the k-th turn of one with
// the k-th of the other) and returns the spread of their throughput ratios.
func turnRatios(base, other []float64) *Spread {
	var r []float64
	for k := range min(len(base), len(other)) {
		if base[k] > 0 {
			r = append(r, other[k]/base[k])
		}
	}
	if len(r) == 0 {
		return nil
	}
	sorted := append([]float64(nil), r...)
	sort.Float64s(sorted)
	med := sorted[len(sorted)/2]
	if len(sorted)%2 == 0 {
		med = (sorted[len(sorted)/2-1] + sorted[len(sorted)/2]) / 2
	}
	return &Spread{Median: med, Min: sorted[0], Max: sorted[len(sorted)-1], Values: r}
}

func verdict(c int) string {
	switch c {
	case 1:
		return "clusterpool better"
	case -1:
		return "pgxpool better"
	}
	return "no real difference"
}

// formatValue prints a metric value with its unit (or its Text); "never"
// for null.
func formatValue(m Metric) string {
	if m.Text != "" {
		return m.Text
	}
	if m.Value == nil {
		return "never"
	}
	v := *m.Value
	switch m.Unit {
	case "ms":
		if v >= 100 {
			return fmt.Sprintf("%.0f ms", v)
		}
		return fmt.Sprintf("%.2f ms", v)
	case "s":
		return fmt.Sprintf("%.2f s", v)
	case "ops/s":
		return fmt.Sprintf("%.0f ops/s", v)
	case "x":
		return fmt.Sprintf("%.2f", v)
	case "":
		if v == math.Trunc(v) {
			return fmt.Sprintf("%.0f", v)
		}
		return fmt.Sprintf("%.2f", v)
	default:
		if v == math.Trunc(v) {
			return fmt.Sprintf("%.0f %s", v, m.Unit)
		}
		return fmt.Sprintf("%.1f %s", v, m.Unit)
	}
}

func formatRatio(r *float64) string {
	if r == nil {
		return "–"
	}
	return fmt.Sprintf("×%.2f", *r)
}

// writeTable prints the results table: one row per metric, pgxpool and
// clusterpool side by side with their ratio.
func writeTable(w io.Writer, res *Results) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\tmetric\tpgxpool\tclusterpool\tratio\t")
	for _, s := range res.Scenarios {
		if len(s.Pools) != 2 {
			continue
		}
		for i, m := range s.Pools[1].Metrics {
			name := ""
			if i == 0 {
				name = s.Name
			}
			base := "–"
			if b := s.Pools[0].metric(m.Name); b != nil {
				base = formatValue(*b)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t\n", name, m.Label, base, formatValue(m), formatRatio(s.Ratios[m.Name]))
		}
		if tr := s.TurnRatios; tr != nil {
			fmt.Fprintf(tw, "\tthroughput ratio per pair of turns (median, range)\t\t\t%s (%s–%s)\t\n", formatRatio(&tr.Median), formatRatio(&tr.Min), formatRatio(&tr.Max))
		}
		if r := s.Repeats; r != nil {
			fmt.Fprintf(tw, "\tover %d pairs of runs (median, range)\t\t\t%s\t\n", r.Runs, r.summary())
		}
	}
	tw.Flush()
	// The phases' ratios are too long for the table's column: below it.
	for _, s := range res.Scenarios {
		if r := s.Repeats; r != nil && len(r.Phases) > 0 {
			fmt.Fprintf(w, "\n%s, p99 between events over the %d pairs (clusterpool ÷ pgxpool, median and range):\n", s.Name, r.Runs)
			for _, ph := range r.Phases {
				fmt.Fprintf(w, "  %s  %s\n", ph.Label, spreadText(ph.P99))
			}
		}
	}
}

// percentiles returns the latency percentiles of d (which it sorts).
func percentiles(d []time.Duration) Latency {
	if len(d) == 0 {
		return Latency{}
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	at := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(d)))) - 1
		i = max(0, min(i, len(d)-1))
		return float64(d[i]) / float64(time.Millisecond)
	}
	return Latency{P50: at(0.50), P90: at(0.90), P99: at(0.99), Max: at(1)}
}

// spread is max − min of the counts over the given nodes (missing = 0).
func spread(conns map[int]int, nodes []int) int {
	if len(nodes) == 0 {
		return 0
	}
	lo, hi := math.MaxInt, math.MinInt
	for _, id := range nodes {
		n := conns[id]
		lo, hi = min(lo, n), max(hi, n)
	}
	return hi - lo
}

func sum(conns map[int]int) int {
	t := 0
	for _, n := range conns {
		t += n
	}
	return t
}

// settledAt returns the time of the first sample at or after from from which
// on every sample has spread ≤ 1 over nodes and holds at least want
// connections; nil if that never happens before the run ends.
func settledAt(samples []Sample, from float64, nodes []int, want int) *float64 {
	var at *float64
	for _, s := range samples {
		if s.T < from {
			continue
		}
		ok := spread(s.Conns, nodes) <= 1 && sum(s.Conns) >= want
		if ok && at == nil {
			at = value(s.T)
		} else if !ok {
			at = nil
		}
	}
	return at
}

func nodeIDs(from, to int) []int {
	var ids []int
	for id := from; id <= to; id++ {
		ids = append(ids, id)
	}
	return ids
}

// summary is the repeats' ratios in one line.
func (r *Repeats) summary() string {
	part := func(name string, sp *Spread) string {
		if sp == nil {
			return name + " –"
		}
		return name + " " + spreadText(sp)
	}
	return part("p99", r.P99) + ", " + part("max", r.Max) + ", " + part("throughput", r.Throughput)
}

// phaseSummary is the phases' p99 ratios in one line; "" without phases.
func (r *Repeats) phaseSummary() string {
	var parts []string
	for _, ph := range r.Phases {
		parts = append(parts, ph.Label+" "+spreadText(ph.P99))
	}
	return strings.Join(parts, "; ")
}

// spreadText is a spread of ratios as "×1.20 (×0.90–×1.50)".
func spreadText(sp *Spread) string {
	return fmt.Sprintf("%s (%s–%s)", formatRatio(&sp.Median), formatRatio(&sp.Min), formatRatio(&sp.Max))
}
