package main

import (
	"context"

	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
)

// The regions scenario: a cluster in two regions behind one load balancer,
// and a client in the first. clusterpool runs with cluster_locality set to
// that region; pgxpool has no such notion.
const (
	homeRegion  = "region=a"
	otherRegion = "region=b"
)

var regionsScenario = scenario{
	name:     "regions",
	headline: "in_region_end",
	description: "Two regions of -nodes nodes each behind one load balancer; the client is in region a (clusterpool: cluster_locality=" + homeRegion + "). " +
		"Every node of a drains a quarter into the run and is back at half time, under load; clusterpool runs without a connect rate limit (cluster_connect_rate=off), as pgxpool does. " +
		"Share of the servers' connections in region a before the drain and at the end, errors, balance rounds from a's return until the pool's connections are all back in a, and the spread over a's nodes at the end.",
	destructive: true,
	plan: func(h *harness) runPlan {
		d, half := h.opts.duration, h.opts.nodes
		localities := make([]string, 2*half)
		for i := range localities {
			localities[i] = homeRegion
			if i >= half {
				localities[i] = otherRegion
			}
		}
		return runPlan{
			nodes: 2 * half, poolSize: h.opts.workers, workload: kvMix,
			localities: localities,
			// No connect rate limit, as with pgxpool: with the default
			// 10/s, moving a pool of 24 twice takes longer than a run.
			cluster: []string{"cluster_locality=" + url.QueryEscape(homeRegion), "cluster_connect_rate=off"},
			script: func(ctx context.Context, c *clustertest.Cluster, mark func(string)) error {
				start := time.Now()
				if !sleepUntil(ctx, d/4) {
					return nil
				}
				mark("drain region a")
				var wg sync.WaitGroup
				errs := make([]error, half)
				for i := range half {
					wg.Go(func() { errs[i] = c.Node(i+1).Drain(ctx, d/10) })
				}
				wg.Wait()
				for _, err := range errs {
					if err != nil {
						return ignoreDone(ctx, err)
					}
				}
				if !sleepUntil(ctx, d/2-time.Since(start)) {
					return nil
				}
				for i := range half {
					if err := c.Node(i + 1).Restart(ctx); err != nil {
						return ignoreDone(ctx, err)
					}
				}
				mark("region a up")
				return nil
			},
		}
	},
	metrics: func(h *harness, r *PoolResult, info runInfo) []Metric {
		home := nodeIDs(1, info.plan.nodes/2)
		before := r.Samples
		if t, ok := info.events["drain region a"]; ok {
			before = samplesBefore(r.Samples, t)
		}
		var back *float64
		if t, ok := info.events["region a up"]; ok {
			if at := inRegionAt(r.Samples, t, home, info.plan.poolSize); at != nil {
				back = value(*at - t)
			}
		}
		spreadEnd := Metric{Name: "spread_end", Label: "spread over region a's nodes at the end", Value: homeSpread(r, home), Better: "lower", Ideal: value(1), Noise: 1}
		if spreadEnd.Value == nil {
			spreadEnd.Text = "no conns in a"
		}
		return []Metric{
			{Name: "in_region_start", Label: "conns in region a before the drain", Unit: "%", Value: regionShare(before, home, info.plan.poolSize), Better: "higher", Ideal: value(100)},
			errorsMetric(r),
			{Name: "rounds_back", Label: "balance rounds from a's return until all conns are back in a", Value: h.rounds(back), Better: "lower", Ideal: value(0), Noise: 1},
			{Name: "in_region_end", Label: "conns in region a at the end", Unit: "%", Value: regionShare(r.Samples, home, info.plan.poolSize), Better: "higher", Ideal: value(100),
				Text: regionText(r.Samples, home, info.plan.poolSize)},
			spreadEnd,
		}
	},
}

// homeSpread is the spread over home's nodes at the end, or nil when they
// hold no connection (a spread of 0 there is no balance).
func homeSpread(r *PoolResult, home []int) *float64 {
	last := lastConns(r)
	for _, id := range home {
		if last[id] > 0 {
			return value(float64(spread(last, home)))
		}
	}
	return nil
}

// samplesBefore returns the samples taken before t.
func samplesBefore(samples []Sample, t float64) []Sample {
	for i, s := range samples {
		if s.T >= t {
			return samples[:i]
		}
	}
	return samples
}

// inRegion is how many of the pool's size connections the nodes of home
// hold in the last sample. The servers' counts also hold clusterpool's
// short-lived probes and connections a redial is refusing, wherever they
// are, so the pool's size, not the sample's total, is the whole.
func inRegion(samples []Sample, home []int, size int) (int, bool) {
	if len(samples) == 0 || size == 0 {
		return 0, false
	}
	last := samples[len(samples)-1].Conns
	in := 0
	for _, id := range home {
		in += last[id]
	}
	return min(in, size), true
}

// regionShare is inRegion as a percentage; nil without samples.
func regionShare(samples []Sample, home []int, size int) *float64 {
	in, ok := inRegion(samples, home, size)
	if !ok {
		return nil
	}
	return value(100 * float64(in) / float64(size))
}

func regionText(samples []Sample, home []int, size int) string {
	in, ok := inRegion(samples, home, size)
	if !ok {
		return ""
	}
	return strconv.Itoa(in) + " of " + strconv.Itoa(size)
}

// inRegionAt is when, from the time from on, the nodes of home hold at
// least want connections (the whole pool) for the rest of the run; nil if
// that never lasts to the end. Other nodes' counts are not read: the
// servers also count clusterpool's short-lived probes, and connections
// refused by a redial while they are being set up.
func inRegionAt(samples []Sample, from float64, home []int, want int) *float64 {
	var at *float64
	for _, s := range samples {
		if s.T < from {
			continue
		}
		in := 0
		for _, id := range home {
			in += s.Conns[id]
		}
		ok := in >= want
		if ok && at == nil {
			at = value(s.T)
		} else if !ok {
			at = nil
		}
	}
	return at
}
