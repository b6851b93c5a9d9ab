package clusterpool

import (
	"slices"
	"time"
)

// ClusterStat is a snapshot of the pool's cluster-wide counters, as returned
// by Pool.ClusterStat. Every counter only grows over the pool's life, so it
// fits a monitoring counter; NodeStats has the current per-node state, whose
// counters go with a node when it expires. pgxpool's own statistics are in
// Pool.Stat.
type ClusterStat struct {
	retryAttempts     int64
	retryOutcomes     [lastRetryOutcome + 1]int64
	pruned            int64
	evictions         int64
	probes            int64
	probeFailures     int64
	probeSessions     int64
	redials           int64
	connectsThrottled int64
	connectWait       time.Duration
	callerConnectWait time.Duration
	connectsPrepaid   int64
	nodesAdded        int64
	nodesRemoved      int64
	hookPanics        int64
	localityFallbacks int64
	balanceRounds     int64

	maxConns, minConns, maxConnsPerNode int32
	effectiveMaxConns                   int32
	fullNodes                           int
	acquireTimeouts                     int64
	workloads                           []WorkloadStat
}

// ClusterStat returns a snapshot of the pool's cluster-wide counters. Each
// counter is read atomically, but not all of them at the same instant.
func (p *Pool) ClusterStat() *ClusterStat {
	c := &p.obs.counters
	s := &ClusterStat{
		retryAttempts:     c.retryAttempts.Load(),
		pruned:            c.pruned.Load(),
		evictions:         c.evictions.Load(),
		probes:            c.probes.Load(),
		probeFailures:     c.probeFailures.Load(),
		probeSessions:     c.probeSessions.Load(),
		connectsThrottled: c.connectsThrottled.Load(),
		connectWait:       time.Duration(c.connectWait.Load()),
		callerConnectWait: time.Duration(c.callerConnectWait.Load()),
		connectsPrepaid:   c.connectsPrepaid.Load(),
		nodesAdded:        c.nodesAdded.Load(),
		nodesRemoved:      c.nodesRemoved.Load(),
		hookPanics:        c.hookPanics.Load(),
		localityFallbacks: c.localityFallbacks.Load(),
		balanceRounds:     c.balanceRounds.Load(),
	}
	for i := range c.retryOutcomes {
		s.retryOutcomes[i] = c.retryOutcomes[i].Load()
	}
	if p.placement != nil {
		s.redials = p.placement.redials.Load()
	}
	if l := p.limits; l != nil {
		now := time.Now()
		s.maxConns, s.minConns = l.maxConns.Load(), int32(l.effectiveMin(now))
		s.maxConnsPerNode = l.perNode.Load()
		s.effectiveMaxConns = int32(l.effectiveMax(now))
		s.acquireTimeouts = l.timeouts.Load()
		s.workloads = l.workloadStats()
		nodes := p.tracker.nodeList()
		s.fullNodes = len(p.fullNodes(nodes, now))
	}
	return s
}

// RetryAttempts returns how many failed attempts were retried.
func (s *ClusterStat) RetryAttempts() int64 { return s.retryAttempts }

// RetryOutcome returns how many calls ended with outcome o; see
// RetryOutcome for which calls count.
func (s *ClusterStat) RetryOutcome(o RetryOutcome) int64 {
	if int(o) >= len(s.retryOutcomes) {
		return 0
	}
	return s.retryOutcomes[o]
}

// PrunedConns returns how many connections the balance rounds retired (closed
// when idle, or marked to close at release when in use).
func (s *ClusterStat) PrunedConns() int64 { return s.pruned }

// Evictions returns how many times a node was evicted: marked unhealthy
// after a drain signal, connection failures or gossip saying it is not live.
func (s *ClusterStat) Evictions() int64 { return s.evictions }

// Probes returns how many probes were made, successful or not.
func (s *ClusterStat) Probes() int64 { return s.probes }

// ProbeFailures returns how many probes failed to connect to or identify a
// node.
func (s *ClusterStat) ProbeFailures() int64 { return s.probeFailures }

// ProbeSessions returns how many connections the probes opened (dials that
// a server, or the load balancer in front of it, accepted); the probe closes
// each at once. A probe that reads gossip, or the fleet's sessions, over one
// of the pool's idle connections opens none; one aimed at a node behind a load balancer may
// open several.
func (s *ClusterStat) ProbeSessions() int64 { return s.probeSessions }

// Redials returns how many new connections were refused and dialled again
// because they landed on a node above its target behind a load balancer.
func (s *ClusterStat) Redials() int64 { return s.redials }

// ThrottledConnects returns how many new connections waited for the connect
// rate limit (Config.ConnectRate).
func (s *ClusterStat) ThrottledConnects() int64 { return s.connectsThrottled }

// ConnectWaitDuration returns the total time new connections waited for the
// connect rate limit. Balance moves never wait (their tokens are taken
// before they retire anything), so this is the refills' wait: connections
// replacing ones lost to a drain, a crash or an eviction, in a storm larger
// than the limit's burst.
func (s *ClusterStat) ConnectWaitDuration() time.Duration { return s.connectWait }

// CallerConnectWaitDuration returns the part of ConnectWaitDuration that
// acquires spent waiting: connects a caller's Acquire had started, not the
// pool's background refills. It is what the connect limit added to callers'
// latency.
func (s *ClusterStat) CallerConnectWaitDuration() time.Duration { return s.callerConnectWait }

// PrepaidConnects returns how many new connections used a token that a
// balance round took for them before retiring the connections they replace.
func (s *ClusterStat) PrepaidConnects() int64 { return s.connectsPrepaid }

// NodesAdded returns how many times the pool learned of a node, counting a
// node again when it comes back after expiring.
func (s *ClusterStat) NodesAdded() int64 { return s.nodesAdded }

// NodesRemoved returns how many times the pool forgot a node that expired.
func (s *ClusterStat) NodesRemoved() int64 { return s.nodesRemoved }

// HookPanics returns how many times one of the caller's hooks panicked and
// the pool recovered the panic (see HookTracer).
func (s *ClusterStat) HookPanics() int64 { return s.hookPanics }

// LocalityFallbacks returns how many times the pool moved to a less
// preferred level of its locality preference (Config.Locality) because no
// node of the level in use was healthy.
func (s *ClusterStat) LocalityFallbacks() int64 { return s.localityFallbacks }

// BalanceRounds returns how many balancing rounds the pool has run (one
// every BalanceInterval ±20% while nodes are tracked). Watching a pool over
// a number of rounds, rather than for a duration, tells whether it stays
// quiet once balanced however loaded the machine is.
func (s *ClusterStat) BalanceRounds() int64 { return s.balanceRounds }

// MaxConns returns the pool's size in force: the configured MaxConns, or
// what SetMaxConns set. Unlike the counters above it is a current value.
func (s *ClusterStat) MaxConns() int32 { return s.maxConns }

// MinConns returns the MinConns in force (SetMinConns), within the size.
func (s *ClusterStat) MinConns() int32 { return s.minConns }

// MaxConnsPerNode returns the per-node cap in force; 0 means none.
func (s *ClusterStat) MaxConnsPerNode() int32 { return s.maxConnsPerNode }

// EffectiveMaxConns returns how many connections the pool may hold now:
// MaxConns, or less when the per-node cap times the healthy nodes (with
// full nodes counting what they hold) leaves less room.
func (s *ClusterStat) EffectiveMaxConns() int32 { return s.effectiveMaxConns }

// FullNodes returns how many healthy nodes take no new connection now
// because they refused one (53300, too many connections).
func (s *ClusterStat) FullNodes() int { return s.fullNodes }

// AcquireTimeouts returns how many calls failed because AcquireTimeout
// passed before they got a connection (ErrPoolExhausted or
// ErrPoolConnecting).
func (s *ClusterStat) AcquireTimeouts() int64 { return s.acquireTimeouts }

// Workloads returns each workload that has (or had) a limit, by name.
func (s *ClusterStat) Workloads() []WorkloadStat { return slices.Clone(s.workloads) }
