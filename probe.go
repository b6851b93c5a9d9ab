package clusterpool

import (
	"math"
	"time"
)

// expiryProbability is the chance we accept that a healthy node, reachable
// only through a random load balancer, is missed by every probe in the
// expiry window and leaves the target set for a while.
const expiryProbability = 1e-4

// expiryWindow is how long a node may go unseen (no connection open on it, no
// probe or connect reaching it) before it leaves the target set.
//
// Behind a random load balancer each probe reaches a given node of N with
// probability 1/N, so a live node without connections is missed by m probes
// in a row with probability (1-1/N)^m. The window covers the m that makes
// this below expiryProbability,
//
//	m = ceil(ln(1e-4) / ln(1-1/N))   (N=1: 1, N=3: 23, N=4: 33, N=10: 88)
//
// probes at the slowest jittered interval (1.2 × ProbeInterval), plus one
// interval of slack, and at least three balance intervals:
//
//	W = max(3 × BalanceInterval, (m+1) × 1.2 × ProbeInterval)
//
// With the 5 s defaults that is 2m24s for 3 nodes and 8m54s for 10. A node
// holding at least one connection never expires: the connection is proof of
// life, and if it dies the connection's failure says so sooner.
func expiryWindow(balanceInterval, probeInterval time.Duration, nodes int) time.Duration {
	m := 1.0
	if nodes > 1 {
		m = math.Ceil(math.Log(expiryProbability) / math.Log(1-1/float64(nodes)))
	}
	probes := time.Duration((m + 1) * 1.2 * float64(probeInterval))
	return max(3*balanceInterval, probes)
}
