package main

import (
	"math"
	"sort"
)

// fleetSample is what the servers hold at T seconds into a fleet run: open
// sessions by application_name (one per pool) and node.
type fleetSample struct {
	T    float64
	Apps map[string]map[int]int
}

// FleetDetail is the fleet scenario's result beyond its metrics.
type FleetDetail struct {
	Pools          int `json:"pools"`
	ConnsPerPool   int `json:"conns_per_pool"`
	WorkersPerPool int `json:"workers_per_pool"`
	// Phases: after the cold start, after the scale-out, after the restart.
	Phases []FleetPhase `json:"phases"`
	// RestFrom and RestTo bound the quiet window (s) in which nothing
	// changes; RestSessions is how many sessions the servers accepted in
	// it, RestProbes how many of them were clusterpool's probes (its own
	// count) and RestPoolConnects how many the pools opened (theirs).
	RestFrom         float64 `json:"rest_from_s"`
	RestTo           float64 `json:"rest_to_s"`
	RestSessions     int     `json:"rest_sessions"`
	RestProbes       int64   `json:"rest_probes"`
	RestPoolConnects int64   `json:"rest_pool_connects"`
	// Sessions is how many sessions the servers accepted over the run, and
	// ProbeSessions how many of them were clusterpool's probes.
	Sessions      int   `json:"sessions"`
	ProbeSessions int64 `json:"probe_sessions"`
	// OverTime is the fleet's state at every sample.
	OverTime []FleetPoint `json:"over_time"`
}

// FleetPoint is the fleet's state in one (smoothed) sample: the
// cluster-wide spread over time, each pool's spread and whether the fleet
// is even (fleetEven).
type FleetPoint struct {
	T               float64 `json:"t"`
	ClusterSpread   int     `json:"cluster_spread"`
	WorstPoolSpread int     `json:"worst_pool_spread"`
	PoolsWithinOne  int     `json:"pools_within_one"`
	Even            bool    `json:"even"`
}

// fleetPoints computes a FleetPoint for every sample, over the nodes that
// nodesAt gives for its time and the rejoining node rejoinAt gives.
func fleetPoints(samples []fleetSample, apps []string, conns int, nodesAt func(t float64) (nodes []int, rejoin int)) []FleetPoint {
	out := make([]FleetPoint, len(samples))
	for i, s := range samples {
		nodes, rejoin := nodesAt(s.T)
		_, worst, within := poolSpreads(s, apps, nodes)
		fair := float64(len(apps)*conns) / float64(len(nodes))
		out[i] = FleetPoint{T: s.T, ClusterSpread: spread(nodeCounts(s, apps), nodes), WorstPoolSpread: worst, PoolsWithinOne: within,
			Even: fleetEven(s, apps, conns, nodes, rejoin, fair)}
	}
	return out
}

// FleetPhase is the state of the cluster at the end of one phase of a fleet
// run, and how it got there.
type FleetPhase struct {
	Name  string  `json:"name"`
	From  float64 `json:"from_s"` // the event that starts the phase
	To    float64 `json:"to_s"`   // the next event, or the end of the run
	Nodes []int   `json:"nodes"`
	// Rejoin is the node that came (back) at From, 0 for the cold start;
	// Fair is each node's fair share of the fleet's connections.
	Rejoin int     `json:"rejoin,omitempty"`
	Fair   float64 `json:"fair_share"`
	// At the phase's last sample: max − min of the nodes' counts; the
	// largest spread of one pool over the nodes; how many pools are within
	// ±1; the rejoining node's count.
	ClusterSpread   int            `json:"cluster_spread"`
	WorstPoolSpread int            `json:"worst_pool_spread"`
	PoolsWithinOne  int            `json:"pools_within_one"`
	RejoinConns     int            `json:"rejoin_conns,omitempty"`
	PoolSpreads     map[string]int `json:"pool_spreads"`
	// EvenAfter is the time (s) from From until the cluster was even and
	// stayed so to the phase's end (see fleetEven); null if never.
	EvenAfter *float64 `json:"even_after_s"`
	// FirstEven is the time (s) from From until the cluster was first even
	// for evenHold without a break; null if never. A later move (a fleet
	// swap, a pool's last move landing) can break the evenness for a
	// sample, which restarts EvenAfter's clock and not this one.
	FirstEven *float64 `json:"first_even_s"`
	// PeakAcceptsPerSec is the largest number of sessions the rejoining
	// node accepted within one second of the phase.
	PeakAcceptsPerSec int `json:"peak_accepts_per_sec,omitempty"`
}

// smoothWindow is how many samples on each side of a sample smoothApps
// takes the median over: five samples, 400 ms at 100 ms.
const smoothWindow = 2

// smoothApps keeps pool sessions only: each pool's count on each node is
// replaced by the median of it and its neighbours in time (smoothWindow on
// each side). A probe's session lives for a few milliseconds (3–30 ms on
// an idle cluster, longer under load), so it shows in two samples of five
// at most, and goes; a pool connection that stays open three samples
// stays, and a lasting change (a move, a node going down) keeps its time,
// since a median moves no step.
func smoothApps(samples []fleetSample) []fleetSample {
	out := make([]fleetSample, len(samples))
	at := func(i int, app string, node int) int {
		i = max(0, min(i, len(samples)-1))
		return samples[i].Apps[app][node]
	}
	window := make([]int, 2*smoothWindow+1)
	for i, s := range samples {
		apps := make(map[string]map[int]int, len(s.Apps))
		for j := max(0, i-smoothWindow); j <= min(i+smoothWindow, len(samples)-1); j++ {
			for app, nodes := range samples[j].Apps {
				if apps[app] == nil {
					apps[app] = make(map[int]int, len(nodes))
				}
				for node := range nodes {
					for k := range window {
						window[k] = at(i-smoothWindow+k, app, node)
					}
					apps[app][node] = median(window)
				}
			}
		}
		out[i] = fleetSample{T: s.T, Apps: apps}
	}
	return out
}

// median returns the middle value of an odd number of values (which it
// sorts).
func median(v []int) int {
	sort.Ints(v)
	return v[len(v)/2]
}

// nodeCounts sums the pools' sessions per node.
func nodeCounts(s fleetSample, apps []string) map[int]int {
	m := make(map[int]int)
	for _, app := range apps {
		for node, n := range s.Apps[app] {
			m[node] += n
		}
	}
	return m
}

// poolSpreads returns each pool's spread over nodes, the largest, and how
// many pools are within ±1.
func poolSpreads(s fleetSample, apps []string, nodes []int) (spreads map[string]int, worst, withinOne int) {
	spreads = make(map[string]int, len(apps))
	for _, app := range apps {
		sp := spread(s.Apps[app], nodes)
		spreads[app] = sp
		worst = max(worst, sp)
		if sp <= 1 {
			withinOne++
		}
	}
	return spreads, worst, withinOne
}

// fleetEven reports whether the fleet is even in s: every pool holds all
// its conns on the given nodes within ±1 of each other, and the rejoining
// node (if any) holds at least 95% of its fair share, rounded down. A pool
// may hold one more for a moment (a move's replacement opened before the
// connection it replaces is closed): that is still all its conns.
func fleetEven(s fleetSample, apps []string, conns int, nodes []int, rejoin int, fair float64) bool {
	for _, app := range apps {
		total := 0
		for _, id := range nodes {
			total += s.Apps[app][id]
		}
		if total < conns || spread(s.Apps[app], nodes) > 1 {
			return false
		}
	}
	if rejoin != 0 && float64(nodeCounts(s, apps)[rejoin]) < math.Floor(0.95*fair) {
		return false
	}
	return true
}

// holdsFrom returns how long after from cond first held on a sample and
// went on holding on every sample up to to; nil if it did not hold on the
// last sample before to (or there is none).
func holdsFrom(samples []fleetSample, from, to float64, cond func(fleetSample) bool) *float64 {
	var at *float64
	for _, s := range samples {
		if s.T < from || s.T > to {
			continue
		}
		switch ok := cond(s); {
		case ok && at == nil:
			at = value(s.T - from)
		case !ok:
			at = nil
		}
	}
	return at
}

// evenHold is how long the fleet must stay even for FirstEven.
const evenHold = 1.0

// firstHeld returns how long after from cond first held on every sample of
// at least hold seconds (all within [from, to]); nil if it never did.
func firstHeld(samples []fleetSample, from, to, hold float64, cond func(fleetSample) bool) *float64 {
	start := -1.0
	for _, s := range samples {
		if s.T < from || s.T > to {
			continue
		}
		switch {
		case !cond(s):
			start = -1
		case start < 0:
			start = s.T
			fallthrough
		default:
			if s.T-start >= hold {
				return value(start - from)
			}
		}
	}
	return nil
}

// lastIn returns the last sample in [from, to], false if there is none.
func lastIn(samples []fleetSample, from, to float64) (fleetSample, bool) {
	for i := len(samples) - 1; i >= 0; i-- {
		if s := samples[i]; s.T >= from && s.T <= to {
			return s, true
		}
	}
	return fleetSample{}, false
}

// countIn returns how many of the sorted times fall in [from, to).
func countIn(times []float64, from, to float64) int {
	lo := sort.SearchFloat64s(times, from)
	hi := sort.SearchFloat64s(times, to)
	return hi - lo
}

// peakIn returns the largest number of the sorted times in [from, to) that
// fall within one window-long interval.
func peakIn(times []float64, from, to, window float64) int {
	lo := sort.SearchFloat64s(times, from)
	hi := sort.SearchFloat64s(times, to)
	times = times[lo:hi]
	peak, start := 0, 0
	for end, t := range times {
		for t-times[start] >= window {
			start++
		}
		peak = max(peak, end-start+1)
	}
	return peak
}

// fleetPhaseResult measures one phase over the smoothed samples and the
// nodes' accept times (s since the run's start, sorted).
func fleetPhaseResult(name string, samples []fleetSample, accepts map[int][]float64, apps []string, conns int, nodes []int, rejoin int, from, to float64) FleetPhase {
	fair := float64(len(apps)*conns) / float64(len(nodes))
	p := FleetPhase{Name: name, From: from, To: to, Nodes: nodes, Rejoin: rejoin, Fair: fair}
	if last, ok := lastIn(samples, from, to); ok {
		counts := nodeCounts(last, apps)
		p.ClusterSpread = spread(counts, nodes)
		p.PoolSpreads, p.WorstPoolSpread, p.PoolsWithinOne = poolSpreads(last, apps, nodes)
		p.RejoinConns = counts[rejoin]
	}
	even := func(s fleetSample) bool { return fleetEven(s, apps, conns, nodes, rejoin, fair) }
	p.EvenAfter = holdsFrom(samples, from, to, even)
	p.FirstEven = firstHeld(samples, from, to, evenHold, even)
	if rejoin != 0 {
		p.PeakAcceptsPerSec = peakIn(accepts[rejoin], from, to, 1)
	}
	return p
}
