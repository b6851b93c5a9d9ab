package clusterpool

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// observer is where the rest of the package reports events: it counts them
// (ClusterStat) and forwards them to the tracers found in Config.Tracer.
// Every method is safe on a nil *observer and costs a nil check and at most
// an atomic add when no tracer is set: event data is built only for a
// tracer that will receive it.
type observer struct {
	pool      *Pool
	node      NodeTracer
	prune     PruneTracer
	retry     RetryTracer
	probe     ProbeTracer
	connect   ConnectTracer
	hook      HookTracer
	locality  LocalityTracer
	limit     LimitTracer
	discovery DiscoveryTracer

	counters clusterCounters

	mu sync.Mutex // protects the fields below
	// known maps each node the tracers were told about to the tracker's
	// record of it, so a node the tracker forgot and created again is
	// reported as added again.
	known map[NodeID]*node
	// prunedSeen is each node's pruned counter as last reported.
	prunedSeen map[*node]int64
}

// clusterCounters are the pool-wide counters behind ClusterStat. They only
// grow, unlike the per-node counters in NodeStats, which go when a node
// expires.
type clusterCounters struct {
	retryAttempts     atomic.Int64
	retryOutcomes     [lastRetryOutcome + 1]atomic.Int64 // by RetryOutcome
	pruned            atomic.Int64
	evictions         atomic.Int64
	probes            atomic.Int64
	probeFailures     atomic.Int64
	probeSessions     atomic.Int64
	connectsThrottled atomic.Int64
	connectWait       atomic.Int64 // nanoseconds
	callerConnectWait atomic.Int64 // nanoseconds, of connectWait
	connectsPrepaid   atomic.Int64
	nodesAdded        atomic.Int64
	nodesRemoved      atomic.Int64
	hookPanics        atomic.Int64
	localityFallbacks atomic.Int64
	balanceRounds     atomic.Int64
}

// newObserver finds the tracer interfaces tracer implements. A combined
// tracer contributes only the interfaces some member implements.
func newObserver(p *Pool, tracer any) *observer {
	o := &observer{
		pool:       p,
		known:      make(map[NodeID]*node),
		prunedSeen: make(map[*node]int64),
	}
	if m, ok := tracer.(*multiTracer); ok {
		if len(m.node) > 0 {
			o.node = m
		}
		if len(m.prune) > 0 {
			o.prune = m
		}
		if len(m.retry) > 0 {
			o.retry = m
		}
		if len(m.probe) > 0 {
			o.probe = m
		}
		if len(m.connect) > 0 {
			o.connect = m
		}
		if len(m.hook) > 0 {
			o.hook = m
		}
		if len(m.locality) > 0 {
			o.locality = m
		}
		if len(m.limit) > 0 {
			o.limit = m
		}
		if len(m.discovery) > 0 {
			o.discovery = m
		}
		return o
	}
	o.node, _ = tracer.(NodeTracer)
	o.prune, _ = tracer.(PruneTracer)
	o.retry, _ = tracer.(RetryTracer)
	o.probe, _ = tracer.(ProbeTracer)
	o.connect, _ = tracer.(ConnectTracer)
	o.hook, _ = tracer.(HookTracer)
	o.locality, _ = tracer.(LocalityTracer)
	o.limit, _ = tracer.(LimitTracer)
	o.discovery, _ = tracer.(DiscoveryTracer)
	return o
}

// nodeSeen reports n as added if the tracers were not told about it yet.
// The tracker calls it, with no lock held, after a connect or probe reached
// the node.
func (o *observer) nodeSeen(n *node, addr string) {
	if o == nil || n == nil {
		return
	}
	o.mu.Lock()
	old, ok := o.known[n.id]
	if ok && old == n {
		o.mu.Unlock()
		return
	}
	o.known[n.id] = n
	o.mu.Unlock()
	o.counters.nodesAdded.Add(1)
	o.changed()
	if o.node != nil {
		o.node.TraceNodeAdded(context.Background(), o.pool, TraceNodeAddedData{Node: n.id, Addr: addr})
	}
}

// nodesRemoved reports the nodes the tracker just forgot (tracker.expire).
func (o *observer) nodesRemoved(ids []NodeID) {
	if o == nil {
		return
	}
	for _, id := range ids {
		o.mu.Lock()
		n, ok := o.known[id]
		delete(o.known, id)
		delete(o.prunedSeen, n)
		o.mu.Unlock()
		if !ok {
			continue
		}
		o.counters.nodesRemoved.Add(1)
		o.changed()
		if o.node != nil {
			o.node.TraceNodeRemoved(context.Background(), o.pool, TraceNodeRemovedData{Node: id})
		}
	}
}

// nodeHealth reports an eviction (healthy false) or a recovery. The caller
// reports only transitions.
func (o *observer) nodeHealth(id NodeID, healthy bool) {
	if o == nil {
		return
	}
	if !healthy {
		o.counters.evictions.Add(1)
	}
	o.changed()
	if o.node != nil {
		o.node.TraceNodeHealth(context.Background(), o.pool, TraceNodeHealthData{Node: id, Healthy: healthy})
	}
}

// nodeDraining reports a change of a node's draining state.
func (o *observer) nodeDraining(id NodeID, draining bool) {
	o.changed()
	if o != nil && o.node != nil {
		o.node.TraceNodeDraining(context.Background(), o.pool, TraceNodeDrainingData{Node: id, Draining: draining})
	}
}

// pruned reports what a balancing round retired, per node, by comparing
// each node's pruned counter with what was last reported. views says which
// nodes were eligible, for the reason. Only the balancing loop calls it. The
// cluster-wide counter takes the whole round before any event is traced, so
// a tracer reading ClusterStat sees it agree with the nodes' counters.
func (o *observer) pruned(ctx context.Context, nodes []*node, views []nodeView) {
	if o == nil {
		return
	}
	type retired struct {
		id NodeID
		k  int64
	}
	var round []retired
	o.mu.Lock()
	for _, n := range nodes {
		total := n.pruned.Load()
		if k := total - o.prunedSeen[n]; k > 0 {
			o.prunedSeen[n] = total
			round = append(round, retired{n.id, k})
		}
	}
	o.mu.Unlock()
	for _, r := range round {
		o.counters.pruned.Add(r.k)
	}
	if o.prune == nil {
		return
	}
	for _, r := range round {
		reason := PruneRebalance
		if i := slices.IndexFunc(views, func(v nodeView) bool { return v.ID == r.id }); i >= 0 && !views[i].Eligible {
			reason = PruneNodeUnavailable
			if views[i].Outside {
				reason = PruneOutsideLocality
			}
		}
		o.prune.TracePrune(ctx, o.pool, TracePruneData{Node: r.id, Count: int(r.k), Reason: reason})
	}
}

// retrying reports that the failed attempt described by params will be
// retried after delay.
func (o *observer) retrying(ctx context.Context, params RetryParams, delay time.Duration) {
	if o == nil {
		return
	}
	o.counters.retryAttempts.Add(1)
	if o.retry != nil {
		o.retry.TraceRetry(ctx, o.pool, TraceRetryData{
			Attempt: params.Attempt,
			Node:    params.Node,
			Err:     params.Err,
			Class:   params.Class,
			Stage:   params.Stage,
			Delay:   delay,
		})
	}
}

// retryEnded reports a call's end after retries (or a refused retry).
func (o *observer) retryEnded(ctx context.Context, data TraceRetryEndData) {
	if o == nil {
		return
	}
	o.counters.retryOutcomes[data.Outcome].Add(1)
	if o.retry != nil {
		data.Nodes = slices.Clone(data.Nodes)
		o.retry.TraceRetryEnd(ctx, o.pool, data)
	}
}

// traceSuccess reports a successful call; only one that retried is an
// event. Every successful return of a retry loop calls it: a call that
// succeeds at once pays one comparison.
func (l *retryLoop) traceSuccess() {
	if l.attempts > 0 {
		l.p.obs.retryEnded(l.ctx, TraceRetryEndData{Outcome: RetrySucceeded, Attempts: l.attempts + 1, Nodes: l.nodes})
	}
}

// traceGiveUp reports a call that ends with v's error, if that is an event.
func (l *retryLoop) traceGiveUp(v verdict) {
	if v.outcome == 0 {
		return
	}
	l.p.obs.retryEnded(l.ctx, TraceRetryEndData{
		Outcome:  v.outcome,
		Attempts: v.state.attempts,
		Nodes:    v.state.nodes,
		Err:      v.cause,
		Class:    v.class,
	})
}

// giveUpOutcome is how a call that gives up after attempts ended, or 0 when
// that is no event: a single attempt with a known outcome and no
// interruption involved no retry.
func giveUpOutcome(attempts int, unknown bool, interrupted error) RetryOutcome {
	switch {
	case interrupted != nil && (attempts > 1 || !unknown):
		// A single write cut by the caller's context after it was sent
		// is not interrupted between attempts: its outcome is unknown.
		return RetryInterrupted
	case unknown:
		return RetryOutcomeUnknown
	case attempts > 1:
		return RetryGaveUp
	}
	return 0
}

// probed reports one probe's result.
func (o *observer) probed(ctx context.Context, id NodeID, err error) {
	if o == nil {
		return
	}
	o.counters.probes.Add(1)
	if err != nil {
		o.counters.probeFailures.Add(1)
	}
	if o.probe != nil {
		o.probe.TraceProbe(ctx, o.pool, TraceProbeData{Node: id, Err: err})
	}
}

// discoveryPaused reports that reads of table stop until until after err.
func (o *observer) discoveryPaused(ctx context.Context, table string, err error, until time.Time) {
	if o != nil && o.discovery != nil {
		o.discovery.TraceDiscoveryPaused(ctx, o.pool, TraceDiscoveryPausedData{Table: table, Err: err, Until: until})
	}
}

// probeSession counts a session a probe opened (a server accepted it).
func (o *observer) probeSession() {
	if o != nil {
		o.counters.probeSessions.Add(1)
	}
}

// changed tells the probe that the cluster, or the pool's view of it,
// changed (Pool.clusterChanged).
func (o *observer) changed() {
	if o != nil && o.pool != nil {
		o.pool.clusterChanged()
	}
}

// connectThrottled reports that a new connection waited for the connect
// rate limit (connectBudget.take); err is the wait's error, if any.
func (o *observer) connectThrottled(ctx context.Context, waited time.Duration, limit float64, caller bool, err error) {
	if o == nil {
		return
	}
	o.counters.connectsThrottled.Add(1)
	o.counters.connectWait.Add(int64(waited))
	if caller {
		o.counters.callerConnectWait.Add(int64(waited))
	}
	if o.connect != nil {
		o.connect.TraceConnectThrottled(ctx, o.pool, TraceConnectThrottledData{
			Waited:     waited,
			Limit:      limit,
			Background: !caller,
			Err:        err,
		})
	}
}

// connectPrepaid reports that a new connection used a token a balance move
// had taken for it.
func (o *observer) connectPrepaid() {
	if o == nil {
		return
	}
	o.counters.connectsPrepaid.Add(1)
}

// hookPanicked reports a recovered panic in the caller's hook.
func (o *observer) hookPanicked(ctx context.Context, hook string, value any, stack []byte) {
	if o == nil {
		return
	}
	o.counters.hookPanics.Add(1)
	if o.hook != nil {
		o.hook.TraceHookPanic(ctx, o.pool, TraceHookPanicData{Hook: hook, Value: value, Stack: stack})
	}
}

// nodeLocality reports that the pool learned node id's locality.
func (o *observer) nodeLocality(id NodeID, locality string) {
	if o != nil && o.locality != nil {
		o.locality.TraceNodeLocality(context.Background(), o.pool, TraceNodeLocalityData{Node: id, Locality: locality})
	}
}

// localityLevel reports a move from the level needing prev shared tiers
// to the one needing need.
func (o *observer) localityLevel(lp *localityPrefs, prev, need int) {
	if o == nil {
		return
	}
	fallback := need < prev
	if fallback {
		o.counters.localityFallbacks.Add(1)
	}
	if o.locality != nil {
		o.locality.TraceLocalityLevel(context.Background(), o.pool, TraceLocalityLevelData{
			Level:    lp.levelName(need),
			Previous: lp.levelName(prev),
			Fallback: fallback,
		})
	}
}

// limitsChanged reports the limits a setter left in force.
func (o *observer) limitsChanged(data TraceLimitsData) {
	if o != nil && o.limit != nil {
		o.limit.TraceLimits(context.Background(), o.pool, data)
	}
}

// workloadWaited reports a call that waited for its workload's slot.
func (o *observer) workloadWaited(ctx context.Context, workload string, waited time.Duration, err error) {
	if o != nil && o.limit != nil {
		o.limit.TraceWorkloadWait(ctx, o.pool, TraceWorkloadWaitData{Workload: workload, Waited: waited, Err: err})
	}
}
