package clusterpool

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Tracers report what the pool does on its own, away from any query: nodes
// coming and going, evictions, pruning, retries, probes, connect
// throttling, panics in the caller's hooks, locality levels and changes of
// the runtime limits. Config.Tracer is inspected once, when the pool is
// created, for each of the interfaces below, as pgx inspects
// ConnConfig.Tracer; a value may implement any of them, and CombineTracers
// joins several values.
//
// Methods are called synchronously from the goroutine where the event
// happens (a caller's query for retries and connect throttling, the pool's
// background goroutines otherwise), never with a lock of the pool held. They
// must not block and must not call back into the pool except for read-only
// methods such as NodeStats and ClusterStat. ctx is the caller's context for
// retry and connect events, the context of the pool's background work for
// prune and probe events (it ends when the pool closes, or the probe times
// out), the hook's context for hook panics (context.Background() for
// BeforeClose, which has none), and context.Background() for node events.
// The data values may be retained; slices in them are not reused by the
// pool.

// NodeTracer traces changes in what the pool knows about the cluster's nodes.
type NodeTracer interface {
	// TraceNodeAdded is called when the pool learns of a node: the first
	// connection or probe that reaches it, including after it expired.
	TraceNodeAdded(ctx context.Context, pool *Pool, data TraceNodeAddedData)
	// TraceNodeRemoved is called when the pool forgets a node that held no
	// connection and was not seen for the expiry window.
	TraceNodeRemoved(ctx context.Context, pool *Pool, data TraceNodeRemovedData)
	// TraceNodeHealth is called when a node is evicted (after a drain
	// signal, connection failures, or gossip saying it is not live) and
	// when it is healthy again (a successful connect or probe).
	TraceNodeHealth(ctx context.Context, pool *Pool, data TraceNodeHealthData)
	// TraceNodeDraining is called when CockroachDB's gossip says a node
	// started draining (or decommissioning), or stopped.
	TraceNodeDraining(ctx context.Context, pool *Pool, data TraceNodeDrainingData)
}

// TraceNodeAddedData is passed to NodeTracer.TraceNodeAdded.
type TraceNodeAddedData struct {
	Node NodeID
	// Addr is the node's address when known (see NodeStat.Addr).
	Addr string
}

// TraceNodeRemovedData is passed to NodeTracer.TraceNodeRemoved.
type TraceNodeRemovedData struct {
	Node NodeID
}

// TraceNodeHealthData is passed to NodeTracer.TraceNodeHealth.
type TraceNodeHealthData struct {
	Node NodeID
	// Healthy is false when the node was just evicted: its connections are
	// refused at acquire and its idle ones closed. True when it is back.
	Healthy bool
}

// TraceNodeDrainingData is passed to NodeTracer.TraceNodeDraining.
type TraceNodeDrainingData struct {
	Node NodeID
	// Draining is true when the node started draining, false when it no
	// longer is (a drain that was cancelled, or a node that restarted).
	Draining bool
}

// PruneTracer traces the balancer retiring connections.
type PruneTracer interface {
	// TracePrune is called after a balancing round retired connections of
	// a node: idle ones were closed, in-use ones marked to close when they
	// are released.
	TracePrune(ctx context.Context, pool *Pool, data TracePruneData)
}

// TracePruneData is passed to PruneTracer.TracePrune.
type TracePruneData struct {
	Node NodeID
	// Count is how many of the node's connections were retired.
	Count int
	// Reason says why.
	Reason PruneReason
}

// PruneReason says why the balancer retired connections.
type PruneReason uint8

const (
	// PruneRebalance: the node held more than its share of the pool.
	PruneRebalance PruneReason = iota + 1
	// PruneNodeUnavailable: the node is evicted, draining or expired, so
	// its target is zero.
	PruneNodeUnavailable
	// PruneOutsideLocality: the node is healthy but outside the locality
	// level the pool uses (Config.Locality), so its target is zero.
	PruneOutsideLocality
)

// String returns "rebalance", "node_unavailable" or "outside_locality",
// fit for a metric label.
func (r PruneReason) String() string {
	switch r {
	case PruneRebalance:
		return "rebalance"
	case PruneNodeUnavailable:
		return "node_unavailable"
	case PruneOutsideLocality:
		return "outside_locality"
	}
	return "unknown"
}

// RetryTracer traces the pool's statement and transaction retries.
type RetryTracer interface {
	// TraceRetry is called when a failed attempt is about to be retried,
	// before the backoff (if any) is slept.
	TraceRetry(ctx context.Context, pool *Pool, data TraceRetryData)
	// TraceRetryEnd is called when a call ends that retried at least once,
	// and when a call fails without a retry because its outcome is unknown.
	// A call that succeeds at its first attempt, or fails with an error that
	// no retry could fix, produces no event.
	TraceRetryEnd(ctx context.Context, pool *Pool, data TraceRetryEndData)
}

// TraceRetryData is passed to RetryTracer.TraceRetry.
type TraceRetryData struct {
	// Attempt is the number of the attempt that failed, from 1.
	Attempt int
	// Node is the node the attempt ran on; 0 when not known.
	Node NodeID
	// Err is the attempt's error and Class its class as the retry policy
	// saw it (RetryParams.Class).
	Err   error
	Class ErrorClass
	// Stage is how far the work had got.
	Stage Stage
	// Delay is the backoff before the next attempt; 0 when the next attempt
	// goes at once to another node.
	Delay time.Duration
}

// TraceRetryEndData is passed to RetryTracer.TraceRetryEnd.
type TraceRetryEndData struct {
	Outcome RetryOutcome
	// Attempts is the number of attempts made.
	Attempts int
	// Nodes are the nodes the failed attempts ran on, in order of first
	// use, without repeats; attempts on an unknown node are not listed.
	Nodes []NodeID
	// Err is the last attempt's error (nil when Outcome is RetrySucceeded)
	// and Class its class as the retry policy saw it (RetryParams.Class,
	// the same as TraceRetryData.Class). The caller gets Err wrapped in a
	// *RetryError.
	Err   error
	Class ErrorClass
}

// RetryOutcome is how a call that involved the retry logic ended.
type RetryOutcome uint8

const (
	// RetrySucceeded: the call succeeded after at least one retry.
	RetrySucceeded RetryOutcome = iota + 1
	// RetryGaveUp: attempts ran out, or the policy declined another one,
	// after at least one retry.
	RetryGaveUp
	// RetryOutcomeUnknown: the call failed and was not retried (further)
	// because its work may have been applied; the error matches
	// ErrOutcomeUnknown.
	RetryOutcomeUnknown
	// RetryInterrupted: the caller's context ended a call that had been
	// retried, during an attempt or a backoff. (A first attempt at a write
	// that the caller's context cut after it was sent counts as
	// RetryOutcomeUnknown.)
	RetryInterrupted
)

// lastRetryOutcome is the highest RetryOutcome; counters are indexed by
// outcome.
const lastRetryOutcome = RetryInterrupted

// RetryOutcomes returns every RetryOutcome, in order, for exporters that
// report a counter per outcome.
func RetryOutcomes() []RetryOutcome {
	return []RetryOutcome{RetrySucceeded, RetryGaveUp, RetryOutcomeUnknown, RetryInterrupted}
}

// String returns "succeeded", "gave_up", "outcome_unknown" or "interrupted",
// fit for a metric label.
func (o RetryOutcome) String() string {
	switch o {
	case RetrySucceeded:
		return "succeeded"
	case RetryGaveUp:
		return "gave_up"
	case RetryOutcomeUnknown:
		return "outcome_unknown"
	case RetryInterrupted:
		return "interrupted"
	}
	return "unknown"
}

// ProbeTracer traces the periodic probe that discovers nodes.
type ProbeTracer interface {
	// TraceProbe is called after each probe.
	TraceProbe(ctx context.Context, pool *Pool, data TraceProbeData)
}

// TraceProbeData is passed to ProbeTracer.TraceProbe.
type TraceProbeData struct {
	// Node is the node the probe reached; 0 when it failed or reached a
	// server without a node identity (plain PostgreSQL behind one address).
	Node NodeID
	// Err is why the probe failed (connect or identification); nil when it
	// succeeded. A failed probe counts against no node.
	Err error
}

// ConnectTracer traces the pool's limit on new connections per second
// (Config.ConnectRate).
type ConnectTracer interface {
	// TraceConnectThrottled is called when a new connection had to wait for
	// the connect rate limit, after the wait.
	TraceConnectThrottled(ctx context.Context, pool *Pool, data TraceConnectThrottledData)
}

// TraceConnectThrottledData is passed to ConnectTracer.TraceConnectThrottled.
type TraceConnectThrottledData struct {
	// Waited is how long the connection waited for the limiter.
	Waited time.Duration
	// Limit is the limit in connections per second.
	Limit float64
	// Background is true when no acquire was waiting for the connection:
	// it was one of the pool's own refills (or pgxpool's MinConns fill).
	Background bool
	// Err is non-nil when the caller's context ended during the wait; the
	// connection was then not opened.
	Err error
}

// LocalityTracer traces the pool's locality preference (Config.Locality):
// what it learns of the nodes' localities, and the level it uses.
type LocalityTracer interface {
	// TraceNodeLocality is called when the pool learns a node's locality
	// (from gossip, or from the node with Config.Locality set), or sees it
	// change.
	TraceNodeLocality(ctx context.Context, pool *Pool, data TraceNodeLocalityData)
	// TraceLocalityLevel is called when the pool moves to another level of
	// its locality preference: down when no node of the level in use is
	// healthy, back up when a node of a more preferred level is. Only with
	// Config.Locality set.
	TraceLocalityLevel(ctx context.Context, pool *Pool, data TraceLocalityLevelData)
}

// TraceNodeLocalityData is passed to LocalityTracer.TraceNodeLocality.
type TraceNodeLocalityData struct {
	Node NodeID
	// Locality is the node's locality, as NodeStat.Locality.
	Locality string
}

// TraceLocalityLevelData is passed to LocalityTracer.TraceLocalityLevel.
type TraceLocalityLevelData struct {
	// Level names the level now in use by the last tier of Config.Locality
	// its nodes share ("zone", "region"); "" is the whole cluster.
	Level string
	// Previous names the level used before, the same way.
	Previous string
	// Fallback is true when the pool moved to a less preferred level,
	// false when it moved back to a more preferred one.
	Fallback bool
}

// HookTracer traces the panics the pool recovers in the caller's hooks
// (see "Hooks" in the Pool documentation).
type HookTracer interface {
	// TraceHookPanic is called after a hook panicked and the panic was
	// recovered.
	TraceHookPanic(ctx context.Context, pool *Pool, data TraceHookPanicData)
}

// TraceHookPanicData is passed to HookTracer.TraceHookPanic.
type TraceHookPanicData struct {
	// Hook names the hook: "BeforeConnect", "AfterConnect",
	// "IdentifyNode", "PrepareConn", "BeforeAcquire" or "BeforeClose".
	Hook string
	// Value is the value the hook panicked with.
	Value any
	// Stack is the panicking goroutine's stack, as runtime/debug.Stack
	// formats it.
	Stack []byte
}

// LimitTracer traces the runtime limits (see "Runtime limits" in the
// package documentation).
type LimitTracer interface {
	// TraceLimits is called after a setter (SetMaxConns, SetMinConns,
	// SetMaxConnsPerNode, SetAcquireTimeout, SetWorkloadLimits) changed the
	// limits, with the limits now in force.
	TraceLimits(ctx context.Context, pool *Pool, data TraceLimitsData)
	// TraceWorkloadWait is called when a call of a workload at its limit
	// has waited for a slot, after the wait.
	TraceWorkloadWait(ctx context.Context, pool *Pool, data TraceWorkloadWaitData)
}

// TraceLimitsData is passed to LimitTracer.TraceLimits.
type TraceLimitsData struct {
	MaxConns        int32 // the pool's runtime size
	MinConns        int32 // the runtime MinConns
	MaxConnsPerNode int32 // 0: no cap
	AcquireTimeout  time.Duration
	// WorkloadLimits holds the limited workloads; nil when none is.
	WorkloadLimits map[string]int
}

// TraceWorkloadWaitData is passed to LimitTracer.TraceWorkloadWait.
type TraceWorkloadWaitData struct {
	Workload string
	// Waited is how long the call waited for a slot.
	Waited time.Duration
	// Err is non-nil when the wait ended without a slot: the caller's
	// context, or AcquireTimeout, ended it.
	Err error
}

// CombineTracers returns a tracer that forwards each event to every one of
// tracers that implements the event's interface, in order. Nil values and
// values that implement none of the interfaces (a pgx.QueryTracer meant for
// ConnConfig.Tracer, say) are dropped, and combined tracers are flattened.
// It returns nil when no value
// implements any tracer interface and the value itself when only one does.
// The pool only calls interfaces that at least one of tracers implements,
// so combining costs nothing for the others.
func CombineTracers(tracers ...any) any {
	var flat []any
	for _, t := range tracers {
		switch t := t.(type) {
		case nil:
		case *multiTracer:
			flat = append(flat, t.all...)
		default:
			if implementsTracer(t) {
				flat = append(flat, t)
			}
		}
	}
	switch len(flat) {
	case 0:
		return nil
	case 1:
		return flat[0]
	}
	m := &multiTracer{all: flat}
	for _, t := range flat {
		if t, ok := t.(NodeTracer); ok {
			m.node = append(m.node, t)
		}
		if t, ok := t.(PruneTracer); ok {
			m.prune = append(m.prune, t)
		}
		if t, ok := t.(RetryTracer); ok {
			m.retry = append(m.retry, t)
		}
		if t, ok := t.(ProbeTracer); ok {
			m.probe = append(m.probe, t)
		}
		if t, ok := t.(ConnectTracer); ok {
			m.connect = append(m.connect, t)
		}
		if t, ok := t.(HookTracer); ok {
			m.hook = append(m.hook, t)
		}
		if t, ok := t.(LocalityTracer); ok {
			m.locality = append(m.locality, t)
		}
		if t, ok := t.(LimitTracer); ok {
			m.limit = append(m.limit, t)
		}
	}
	return m
}

// implementsTracer reports whether t implements at least one tracer interface.
func implementsTracer(t any) bool {
	switch t.(type) {
	case NodeTracer, PruneTracer, RetryTracer, ProbeTracer, ConnectTracer, HookTracer, LocalityTracer, LimitTracer, *multiTracer:
		return true
	}
	return false
}

// tracerInterfaces lists the tracer interfaces, for errors.
const tracerInterfaces = "NodeTracer, PruneTracer, RetryTracer, ProbeTracer, ConnectTracer, HookTracer, LocalityTracer, LimitTracer"

// multiTracer is what CombineTracers returns. It implements every tracer
// interface; the pool asks it which ones have members (see newObserver).
type multiTracer struct {
	all      []any
	node     []NodeTracer
	prune    []PruneTracer
	retry    []RetryTracer
	probe    []ProbeTracer
	connect  []ConnectTracer
	hook     []HookTracer
	locality []LocalityTracer
	limit    []LimitTracer
}

func (m *multiTracer) TraceLimits(ctx context.Context, pool *Pool, data TraceLimitsData) {
	for _, t := range m.limit {
		t.TraceLimits(ctx, pool, data)
	}
}

func (m *multiTracer) TraceWorkloadWait(ctx context.Context, pool *Pool, data TraceWorkloadWaitData) {
	for _, t := range m.limit {
		t.TraceWorkloadWait(ctx, pool, data)
	}
}

func (m *multiTracer) TraceNodeAdded(ctx context.Context, pool *Pool, data TraceNodeAddedData) {
	for _, t := range m.node {
		t.TraceNodeAdded(ctx, pool, data)
	}
}

func (m *multiTracer) TraceNodeRemoved(ctx context.Context, pool *Pool, data TraceNodeRemovedData) {
	for _, t := range m.node {
		t.TraceNodeRemoved(ctx, pool, data)
	}
}

func (m *multiTracer) TraceNodeHealth(ctx context.Context, pool *Pool, data TraceNodeHealthData) {
	for _, t := range m.node {
		t.TraceNodeHealth(ctx, pool, data)
	}
}

func (m *multiTracer) TraceNodeDraining(ctx context.Context, pool *Pool, data TraceNodeDrainingData) {
	for _, t := range m.node {
		t.TraceNodeDraining(ctx, pool, data)
	}
}

func (m *multiTracer) TracePrune(ctx context.Context, pool *Pool, data TracePruneData) {
	for _, t := range m.prune {
		t.TracePrune(ctx, pool, data)
	}
}

func (m *multiTracer) TraceRetry(ctx context.Context, pool *Pool, data TraceRetryData) {
	for _, t := range m.retry {
		t.TraceRetry(ctx, pool, data)
	}
}

func (m *multiTracer) TraceRetryEnd(ctx context.Context, pool *Pool, data TraceRetryEndData) {
	for _, t := range m.retry {
		t.TraceRetryEnd(ctx, pool, data)
	}
}

func (m *multiTracer) TraceProbe(ctx context.Context, pool *Pool, data TraceProbeData) {
	for _, t := range m.probe {
		t.TraceProbe(ctx, pool, data)
	}
}

func (m *multiTracer) TraceConnectThrottled(ctx context.Context, pool *Pool, data TraceConnectThrottledData) {
	for _, t := range m.connect {
		t.TraceConnectThrottled(ctx, pool, data)
	}
}

func (m *multiTracer) TraceHookPanic(ctx context.Context, pool *Pool, data TraceHookPanicData) {
	for _, t := range m.hook {
		t.TraceHookPanic(ctx, pool, data)
	}
}

func (m *multiTracer) TraceNodeLocality(ctx context.Context, pool *Pool, data TraceNodeLocalityData) {
	for _, t := range m.locality {
		t.TraceNodeLocality(ctx, pool, data)
	}
}

func (m *multiTracer) TraceLocalityLevel(ctx context.Context, pool *Pool, data TraceLocalityLevelData) {
	for _, t := range m.locality {
		t.TraceLocalityLevel(ctx, pool, data)
	}
}

// observer is where the rest of the package reports events: it counts them
// (ClusterStat) and forwards them to the tracers found in Config.Tracer.
// Every method is safe on a nil *observer and costs a nil check and at most
// an atomic add when no tracer is set: event data is built only for a
// tracer that will receive it.
type observer struct {
	pool     *Pool
	node     NodeTracer
	prune    PruneTracer
	retry    RetryTracer
	probe    ProbeTracer
	connect  ConnectTracer
	hook     HookTracer
	locality LocalityTracer
	limit    LimitTracer

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
