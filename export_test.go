package clusterpool

import (
	"math"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

// Test scaffolding over the package's internals: nothing in the library
// needs these.

// isBalanced reports whether the eligible nodes' counts differ by at most one
// and no ineligible node holds connections.
func isBalanced(counts map[NodeID]int, eligible []NodeID) bool {
	if len(eligible) == 0 {
		return true
	}
	lo, hi := math.MaxInt, math.MinInt
	for _, id := range eligible {
		lo, hi = min(lo, counts[id]), max(hi, counts[id])
	}
	for id, c := range counts {
		if c > 0 && !slices.Contains(eligible, id) {
			return false
		}
	}
	return hi-lo <= 1
}

// track records a connection on node id with no pgx connection behind it
// (the argument is always nil in the tracker's unit tests).
func (t *tracker) track(id NodeID, addr, host string, _ *pgx.Conn, now time.Time) *connState {
	return t.add(id, addr, host, nil, time.Time{}, now)
}

// trackDialled is track for a connection whose connect began at started.
func (t *tracker) trackDialled(id NodeID, addr, host string, _ *pgx.Conn, started, now time.Time) *connState {
	return t.add(id, addr, host, nil, started, now)
}

// probeConns is how many sessions the probes opened.
func (p *Pool) probeConns() int64 {
	return p.ClusterStat().ProbeSessions()
}
