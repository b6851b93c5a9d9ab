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
		"Share of the pool's connections in region a before the drain and at the end, errors, and balance rounds from a's return until every connection is back in a and balanced there.",
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
		return []Metric{
			{Name: "in_region_start", Label: "conns in region a before the drain", Unit: "%", Value: regionShare(before, home), Better: "higher", Ideal: value(100)},
			errorsMetric(r),
			{Name: "rounds_back", Label: "balance rounds from a's return until all conns are in a, balanced", Value: h.rounds(back), Better: "lower", Ideal: value(0), Noise: 1},
			{Name: "in_region_end", Label: "conns in region a at the end", Unit: "%", Value: regionShare(r.Samples, home), Better: "higher", Ideal: value(100),
				Text: regionText(r.Samples, home)},
		}
	},
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

// regionShare is the percentage of the last sample's connections held by
// the nodes of home; nil without samples or connections.
func regionShare(samples []Sample, home []int) *float64 {
	if len(samples) == 0 {
		return nil
	}
	last := samples[len(samples)-1].Conns
	total := sum(last)
	if total == 0 {
		return nil
	}
	in := 0
	for _, id := range home {
		in += last[id]
	}
	return value(100 * float64(in) / float64(total))
}

func regionText(samples []Sample, home []int) string {
	if len(samples) == 0 {
		return ""
	}
	last := samples[len(samples)-1].Conns
	in := 0
	for _, id := range home {
		in += last[id]
	}
	return strconv.Itoa(in) + " of " + strconv.Itoa(sum(last))
}

// inRegionAt is when, from the time from on, the nodes of home hold all
// of at least want connections within one of each other, and other nodes
// none, for the rest of the run; nil if that never lasts to the end.
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
		ok := in == sum(s.Conns) && in >= want && spread(s.Conns, home) <= 1
		if ok && at == nil {
			at = value(s.T)
		} else if !ok {
			at = nil
		}
	}
	return at
}
