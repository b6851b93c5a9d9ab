package clusterpool

import (
	"context"
	"time"
)

// Tracers report what the pool does on its own, away from any query: nodes
// coming and going, evictions, pruning, retries, probes, connect
// throttling, panics in the caller's hooks, locality levels, changes of
// the runtime limits and discovery reads that stopped. Config.Tracer is
// inspected once, when the pool is created, for each of the interfaces
// below, as pgx inspects ConnConfig.Tracer; a value may implement any of
// them, and CombineTracers joins several values.
//
// Methods are called synchronously from the goroutine where the event
// happens (a caller's query for retries and connect throttling, the pool's
// background goroutines otherwise), never with a lock of the pool held. They
// must not block and must not call back into the pool except for read-only
// methods such as NodeStats and ClusterStat. ctx is the caller's context for
// retry and connect events, the context of the pool's background work for
// prune, probe and discovery events (it ends when the pool closes, or the
// probe times out), the hook's context for hook panics
// (context.Background() for BeforeClose, which has none), and
// context.Background() for node events.
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

// DiscoveryTracer traces the reads of CockroachDB's own tables that
// discovery uses besides the pool's connections and probes: the gossip
// tables and, without them, crdb_internal.cluster_sessions.
type DiscoveryTracer interface {
	// TraceDiscoveryPaused is called when reading one of those tables
	// failed with an error that does not go away by itself (no privilege,
	// no such table or column): the pool stops reading it until data.Until
	// and finds nodes by the other means meanwhile.
	TraceDiscoveryPaused(ctx context.Context, pool *Pool, data TraceDiscoveryPausedData)
}

// TraceDiscoveryPausedData is passed to DiscoveryTracer.TraceDiscoveryPaused.
type TraceDiscoveryPausedData struct {
	// Table is "gossip" (crdb_internal.gossip_liveness and gossip_nodes)
	// or "sessions" (crdb_internal.cluster_sessions).
	Table string
	// Err is the server's error, a *pgconn.PgError: 42501
	// (insufficient_privilege) on gossip means the user lacks
	// VIEWCLUSTERMETADATA; 42P01 or 3F000 (no such table or schema), that
	// the server is not CockroachDB.
	Err error
	// Until is when the pool reads the table again.
	Until time.Time
}

// LimitTracer traces the runtime limits (SetMaxConns and the other
// setters, workload waits).
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
		if t, ok := t.(DiscoveryTracer); ok {
			m.discovery = append(m.discovery, t)
		}
	}
	return m
}

// implementsTracer reports whether t implements at least one tracer interface.
func implementsTracer(t any) bool {
	switch t.(type) {
	case NodeTracer, PruneTracer, RetryTracer, ProbeTracer, ConnectTracer, HookTracer, LocalityTracer, LimitTracer, DiscoveryTracer, *multiTracer:
		return true
	}
	return false
}

// tracerInterfaces lists the tracer interfaces, for errors.
const tracerInterfaces = "NodeTracer, PruneTracer, RetryTracer, ProbeTracer, ConnectTracer, HookTracer, LocalityTracer, LimitTracer, DiscoveryTracer"

// multiTracer is what CombineTracers returns. It implements every tracer
// interface; the pool asks it which ones have members (see newObserver).
type multiTracer struct {
	all       []any
	node      []NodeTracer
	prune     []PruneTracer
	retry     []RetryTracer
	probe     []ProbeTracer
	connect   []ConnectTracer
	hook      []HookTracer
	locality  []LocalityTracer
	limit     []LimitTracer
	discovery []DiscoveryTracer
}

func (m *multiTracer) TraceDiscoveryPaused(ctx context.Context, pool *Pool, data TraceDiscoveryPausedData) {
	for _, t := range m.discovery {
		t.TraceDiscoveryPaused(ctx, pool, data)
	}
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
