package main

import (
	"encoding/json"
	"fmt"
	"html"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// writeReport writes dir/index.html (self-contained: inline SVG and CSS, no
// script, nothing fetched), each scenario's plot as dir/<scenario>.svg, and
// the results as dir/results.json (what -json prints).
func writeReport(dir string, res *Results) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating report directory: %w", err)
	}
	js, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "results.json"), append(js, '\n'), 0o644); err != nil {
		return "", err
	}
	for _, s := range res.Scenarios {
		if !hasPlot(s) {
			continue
		}
		svg := plotSVG(s, true)
		if err := os.WriteFile(filepath.Join(dir, s.Name+".svg"), []byte(svg), 0o644); err != nil {
			return "", err
		}
	}
	path := filepath.Join(dir, "index.html")
	return path, os.WriteFile(path, []byte(reportHTML(res)), 0o644)
}

const css = `body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0}td,th{padding:.25em .8em;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f6f6f6}
.better{color:#1a7f37;font-weight:600}.worse{color:#b42318}.note{color:#555;font-size:.92em}
code{background:#f3f3f3;padding:0 .3em;border-radius:3px}svg{max-width:100%;height:auto}`

func reportHTML(res *Results) string {
	var b strings.Builder
	e := html.EscapeString
	fmt.Fprintf(&b, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>clusterbench: clusterpool vs pgxpool</title><style>%s</style></head><body>\n", css)
	fmt.Fprintf(&b, "<h1>clusterbench: clusterpool vs pgxpool</h1>\n")
	single := ""
	for _, s := range res.Scenarios {
		if len(s.Settings) == 0 { // not a scenario with settings of its own
			single = fmt.Sprintf(" · %d workers, pool size %d (MinConns = MaxConns) · %s per scenario per pool", res.Workers, res.Workers, res.Duration)
			var names []string
			for _, sc := range res.Scenarios {
				names = append(names, sc.Name)
			}
			if warm := warmNames(names); len(warm) > 0 {
				single += fmt.Sprintf(" (%s on a pool up for %s)", strings.Join(warm, ", "), res.Warmup)
			}
			break
		}
	}
	fmt.Fprintf(&b, "<p class=\"note\">%s · backend: %s · %d nodes%s · seed %d</p>\n",
		e(res.Date), e(res.Backend), res.Nodes, e(single), res.Seed)
	var settings []string
	for k, v := range res.Settings {
		settings = append(settings, "<code>"+e(k)+"="+e(v)+"</code>")
	}
	sort.Strings(settings)
	runSettings := ""
	if single != "" {
		runSettings = "clusterpool settings: " + strings.Join(settings, " ") + ". "
	}
	fmt.Fprintf(&b, "<p class=\"note\">%sBoth pools run the same workload on a fresh cluster started with the same seed, so the load balancer makes the same choices for both. Connection counts are the servers' own. Ratios are clusterpool ÷ pgxpool. A scenario with settings of its own says so.</p>\n", runSettings)
	if len(res.Skipped) > 0 {
		fmt.Fprintf(&b, "<p class=\"note\">Skipped (they would disturb a real cluster): %s.</p>\n", e(strings.Join(res.Skipped, ", ")))
	}
	writeSummary(&b, res)
	for _, s := range res.Scenarios {
		fmt.Fprintf(&b, "<h2 id=\"%s\">%s</h2>\n<p>%s</p>\n", e(s.Name), e(s.Name), e(s.Description))
		if len(s.Settings) > 0 {
			fmt.Fprintf(&b, "<p class=\"note\">clusterpool settings for this scenario: %s.</p>\n", e(settingsLine(s.Settings)))
		}
		if len(s.Pools) != 2 {
			continue
		}
		b.WriteString("<table><tr><th>metric</th><th>pgxpool</th><th>clusterpool</th><th>ratio</th></tr>\n")
		for _, m := range s.Pools[1].Metrics {
			base := s.Pools[0].metric(m.Name)
			baseText := "–"
			if base != nil {
				baseText = formatValue(*base)
			}
			class := ""
			if base != nil {
				switch compare(*base, m) {
				case 1:
					class = " class=\"better\""
				case -1:
					class = " class=\"worse\""
				}
			}
			fmt.Fprintf(&b, "<tr><td>%s</td><td>%s</td><td%s>%s</td><td>%s</td></tr>\n",
				e(m.Label), e(baseText), class, e(formatValue(m)), e(formatRatio(s.Ratios[m.Name])))
		}
		b.WriteString("</table>\n")
		if tr := s.TurnRatios; tr != nil {
			fmt.Fprintf(&b, "<p>Throughput ratio (clusterpool ÷ pgxpool) per pair of turns: %s — median %s, range %s–%s. The range is how far the machine's speed drifts between turns: a ratio inside it tells the pools apart no better than chance.</p>\n",
				e(joinRatios(tr.Values)), e(formatRatio(&tr.Median)), e(formatRatio(&tr.Min)), e(formatRatio(&tr.Max)))
		}
		if r := s.Repeats; r != nil {
			fmt.Fprintf(&b, "<p>Over %d pairs of runs (clusterpool ÷ pgxpool, median and range; the figures above are the first pair's): %s.</p>\n", r.Runs, e(r.summary()))
			if ps := r.phaseSummary(); ps != "" {
				fmt.Fprintf(&b, "<p>p99 between the events, the same pairs: %s.</p>\n", e(ps))
			}
		}
		if hasPlot(s) {
			b.WriteString(plotSVG(s, false))
		}
		b.WriteString("\n<table><tr><th>latency (ms)</th><th>p50</th><th>p90</th><th>p99</th><th>max</th><th>ops</th><th>errors</th><th>conns opened</th><th>short-lived conns (probes, churn)</th></tr>\n")
		for _, p := range s.Pools {
			l := p.Latency
			fmt.Fprintf(&b, "<tr><td>%s</td><td>%.2f</td><td>%.2f</td><td>%.2f</td><td>%.1f</td><td>%d</td><td>%d</td><td>%d</td><td>%d</td></tr>\n",
				e(p.Pool), l.P50, l.P90, l.P99, l.Max, p.Ops, p.Errors, p.ConnsOpened, p.ProbeConns)
		}
		b.WriteString("</table>\n")
		b.WriteString(phaseTable(s.Pools))
		for _, p := range s.Pools {
			if len(p.Library) == 0 {
				continue
			}
			var kv []string
			for k, v := range p.Library {
				kv = append(kv, fmt.Sprintf("%s %g", k, v))
			}
			sort.Strings(kv)
			fmt.Fprintf(&b, "<p class=\"note\">%s's own counters (ClusterStat): %s.</p>\n", e(p.Pool), e(strings.Join(kv, ", ")))
		}
		for _, p := range s.Pools {
			if len(p.ErrorExamples) > 0 {
				fmt.Fprintf(&b, "<details><summary>errors seen with %s (examples)</summary><ul>", e(p.Pool))
				for _, msg := range p.ErrorExamples {
					fmt.Fprintf(&b, "<li><code>%s</code></li>", e(msg))
				}
				b.WriteString("</ul></details>\n")
			}
		}
	}
	b.WriteString("<p class=\"note\">Made by <code>go run ./cmd/clusterbench</code>.</p>\n</body></html>\n")
	return b.String()
}

// writeSummary writes the table at the top of the report: one row per
// scenario with the figure that matters most, both pools and the verdict.
func writeSummary(b *strings.Builder, res *Results) {
	e := html.EscapeString
	b.WriteString("<h2 id=\"summary\">Summary</h2>\n<table><tr><th>scenario</th><th>figure</th><th>pgxpool</th><th>clusterpool</th><th>ratio</th><th>verdict</th></tr>\n")
	for _, s := range res.Scenarios {
		if len(s.Pools) != 2 {
			continue
		}
		base, m := s.Pools[0].metric(s.Headline), s.Pools[1].metric(s.Headline)
		if base == nil || m == nil {
			continue
		}
		ratio := formatRatio(s.Ratios[m.Name])
		if tr := s.TurnRatios; tr != nil {
			ratio += fmt.Sprintf(" (turns %s–%s)", formatRatio(&tr.Min), formatRatio(&tr.Max))
		}
		fmt.Fprintf(b, "<tr><td><a href=\"#%s\">%s</a></td><td>%s</td><td>%s</td><td>%s</td><td>%s</td><td%s>%s</td></tr>\n",
			e(s.Name), e(s.Name), e(m.Label), e(formatValue(*base)), e(formatValue(*m)), e(ratio), verdictClass(s.Verdict), e(s.Verdict))
	}
	b.WriteString("</table>\n<p class=\"note\">Verdicts and colours mark only differences beyond the noise: 20% for latencies, 10% for other figures, and a figure's own step where it has one (one connection of a spread, one sample of a time); a value at its ideal (no errors, a spread of at most 1, the fair share) is never marked worse.</p>\n")
}

func verdictClass(v string) string {
	switch v {
	case "clusterpool better":
		return " class=\"better\""
	case "pgxpool better":
		return " class=\"worse\""
	}
	return ""
}

func joinRatios(r []float64) string {
	parts := make([]string, len(r))
	for i := range r {
		parts[i] = formatRatio(&r[i])
	}
	return strings.Join(parts, ", ")
}

// hasPlot reports whether the scenario's connections over time are worth a
// plot: not for overhead, whose single node holds the whole pool throughout.
func hasPlot(s ScenarioResult) bool {
	sc, ok := scenarioByName(s.Name)
	return !ok || !sc.noPlot
}

// compare says whether m is better (1), worse (-1) or no different (0)
// than base, by the metric's direction. A difference within the noise
// (noiseOf) is none; a value at its ideal is never worse, and one beside a
// base already at its ideal never better.
func compare(base, m Metric) int {
	lower := m.Better == "lower"
	switch {
	case base.Value == nil && m.Value == nil:
		return 0
	case base.Value == nil: // pgxpool never got there
		if lower {
			return 1
		}
		return 0
	case m.Value == nil:
		if lower {
			return -1
		}
		return 0
	}
	b, v := *base.Value, *m.Value
	rel, abs := noiseOf(m)
	d := v - b
	if math.Abs(d) <= abs || math.Abs(d) <= rel*math.Max(math.Abs(b), math.Abs(v)) {
		return 0
	}
	if (d < 0) == lower {
		if atIdeal(m, b) {
			return 0
		}
		return 1
	}
	if atIdeal(m, v) {
		return 0
	}
	return -1
}

// noiseOf returns the relative and absolute differences below which two
// values of m are not told apart: latencies move by a fifth between runs
// of the same build on a shared machine, other figures by a tenth, and
// counts by the metric's own Noise.
func noiseOf(m Metric) (rel, abs float64) {
	rel = 0.10
	if m.Unit == "ms" {
		rel = 0.20
	}
	return rel, m.Noise
}

// atIdeal reports whether v is at or past m's ideal value.
func atIdeal(m Metric, v float64) bool {
	if m.Ideal == nil {
		return false
	}
	if m.Better == "lower" {
		return v <= *m.Ideal
	}
	return v >= *m.Ideal
}

var nodeColors = []string{"#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"}

// plotSVG draws connections per node over time, pgxpool and clusterpool side
// by side on the same scales, with the scenario's events as dashed lines.
func plotSVG(s ScenarioResult, standalone bool) string {
	const (
		width, height   = 980, 340
		panelW, panelH  = 420, 220
		top, left, gap  = 58, 56, 60
		legendY         = top + panelH + 48
		fontFamily      = "system-ui,-apple-system,Segoe UI,sans-serif"
		fontSizeSmall   = 11
		fontSizeRegular = 13
	)
	tmax, ymax := 1.0, 1
	nodeSet := make(map[int]bool)
	for _, p := range s.Pools {
		for _, sm := range p.Samples {
			tmax = math.Max(tmax, sm.T)
			for id, n := range sm.Conns {
				ymax = max(ymax, n)
				nodeSet[id] = true
			}
		}
	}
	ystep := niceStep(float64(ymax), 5)
	yTop := math.Ceil(float64(ymax)/ystep) * ystep
	if yTop <= float64(ymax) {
		yTop += ystep
	}
	var ids []int
	for id := range nodeSet {
		ids = append(ids, id)
	}
	sort.Ints(ids)
	color := func(id int) string { return nodeColors[(id-1+len(nodeColors))%len(nodeColors)] }

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %d %d" width="%d" height="%d" font-family="%s" font-size="%d" role="img" aria-label="%s: connections per node over time">`,
		width, height, width, height, fontFamily, fontSizeRegular, html.EscapeString(s.Name))
	b.WriteString("\n")
	if standalone {
		fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="#ffffff"/>`+"\n", width, height)
	}
	what := "open connections per node (servers' counts) over time"
	if s.Name == fleetName {
		what = "the fleet's pool sessions per node (servers' counts, all pools) over time"
	}
	fmt.Fprintf(&b, `<text x="%d" y="20" font-weight="600">%s — %s</text>`+"\n", left, html.EscapeString(s.Name), what)
	for pi, p := range s.Pools {
		x0 := float64(left + pi*(panelW+gap))
		y0 := float64(top)
		px := func(t float64) float64 { return x0 + t/tmax*panelW }
		py := func(v float64) float64 { return y0 + panelH - v/yTop*panelH }
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" font-weight="600">%s</text>`+"\n", x0, y0-10, html.EscapeString(p.Pool))
		// Grid and axes.
		for v := 0.0; v <= yTop+1e-9; v += ystep {
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#e5e5e5"/>`, x0, py(v), x0+panelW, py(v))
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end" font-size="%d" fill="#555">%g</text>`+"\n", x0-6, py(v)+4, fontSizeSmall, v)
		}
		xstep := niceStep(tmax, 8)
		for t := 0.0; t <= tmax+1e-9; t += xstep {
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle" font-size="%d" fill="#555">%gs</text>`+"\n", px(t), y0+panelH+16, fontSizeSmall, t)
		}
		fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%d" height="%d" fill="none" stroke="#999"/>`+"\n", x0, y0, panelW, panelH)
		// Events.
		for i, ev := range p.Events {
			x := px(ev.T)
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#888" stroke-dasharray="4 3"/>`, x, y0, x, y0+panelH)
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="%d" fill="#444">%s</text>`+"\n", x+3, y0+12+float64(i%4)*12, fontSizeSmall, html.EscapeString(ev.Label))
		}
		// The fair share: where every node's line should end up, from the
		// last event on.
		if p.PoolSize > 0 && len(ids) > 0 {
			fair := float64(p.PoolSize) / float64(len(ids))
			t0 := 0.0
			for _, ev := range p.Events {
				t0 = math.Max(t0, ev.T)
			}
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#111" stroke-opacity="0.45" stroke-width="1.5" stroke-dasharray="2 3"/>`, px(t0), py(fair), x0+panelW, py(fair))
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end" font-size="%d" fill="#444">fair share</text>`+"\n", x0+panelW-4, py(fair)-5, fontSizeSmall)
		}
		// One line per node, each nudged by a pixel or two so that nodes
		// with equal counts stay visible.
		for k, id := range ids {
			nudge := (float64(k) - float64(len(ids)-1)/2) * 2
			var pts []string
			for _, sm := range p.Samples {
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(sm.T), py(float64(sm.Conns[id]))+nudge))
			}
			if len(pts) > 0 {
				fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" stroke-linejoin="round" points="%s"/>`+"\n", color(id), strings.Join(pts, " "))
			}
		}
	}
	// Legend.
	for i, id := range ids {
		x := left + i*90
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="3"/><text x="%d" y="%d">node %d</text>`+"\n",
			x, legendY-4, x+22, legendY-4, color(id), x+28, legendY, id)
	}
	b.WriteString("</svg>")
	return b.String()
}

// niceStep picks a round step (1, 2, 5 × 10^k) giving about n ticks over span.
func niceStep(span float64, n int) float64 {
	if span <= 0 {
		return 1
	}
	raw := span / float64(n)
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*mag >= raw {
			return math.Max(1, m*mag)
		}
	}
	return math.Max(1, 10*mag)
}

// phaseTable is the pools' p99 between the events, a column per phase of the
// first pool's run; "" when it has none.
func phaseTable(pools []PoolResult) string {
	if len(pools) == 0 || len(pools[0].Phases) == 0 {
		return ""
	}
	e := html.EscapeString
	var b strings.Builder
	b.WriteString("\n<table><tr><th>p99 (ms) between events</th>")
	for _, ph := range pools[0].Phases {
		fmt.Fprintf(&b, "<th>%s</th>", e(ph.Label))
	}
	b.WriteString("</tr>\n")
	for _, p := range pools {
		fmt.Fprintf(&b, "<tr><td>%s</td>", e(p.Pool))
		for _, ph := range pools[0].Phases {
			cell := "–"
			if q := p.phase(ph.Label); q != nil {
				cell = fmt.Sprintf("%.2f", q.P99)
			}
			fmt.Fprintf(&b, "<td>%s</td>", cell)
		}
		b.WriteString("</tr>\n")
	}
	b.WriteString("</table>\n")
	return b.String()
}
