// Package clusterotel exports a clusterpool.Pool's statistics as
// OpenTelemetry metrics.
//
//	pool, err := clusterpool.New(ctx, connString)
//	...
//	reg, err := clusterotel.Register(meterProvider, "orders", pool)
//	...
//	defer reg.Unregister()
//
// Every instrument is asynchronous and read by one callback at collection
// (Pool.Stat, Pool.NodeStats, Pool.ClusterStat): nothing is added to the
// pool's hot path and no goroutine is started. It uses only the
// MeterProvider it is given, never the global one. Every measurement carries
// a "pool" attribute with the name given to Register, so several pools can
// share a provider.
//
// It is a module of its own (github.com/clusterpool/clusterpool/clusterotel)
// so that clusterpool itself does not depend on OpenTelemetry.
//
// # Metrics
//
// The figures are those of clusterprom, under OpenTelemetry names (no
// _total suffix, units as instrument units). pgxpool's own (Pool.Stat):
//
//	clusterpool.acquires                     counter   {acquire}    successful acquires
//	clusterpool.acquire.duration             counter   s            total time of successful acquires
//	clusterpool.empty_acquires               counter   {acquire}    acquires that waited for a connection
//	clusterpool.empty_acquire.wait_time      counter   s
//	clusterpool.canceled_acquires            counter   {acquire}
//	clusterpool.conns                        updown    {connection} state=idle|acquired|constructing
//	clusterpool.max_conns                    updown    {connection}
//	clusterpool.new_conns                    counter   {connection}
//	clusterpool.max_lifetime_destroys        counter   {connection}
//	clusterpool.max_idle_destroys            counter   {connection}
//
// Per node (attribute node is the node ID; a node's series end when the pool
// forgets the node):
//
//	clusterpool.node.connections             updown    {connection} node, state=idle|in_use
//	clusterpool.node.healthy                 gauge     1 or 0 (evicted)
//	clusterpool.node.draining                gauge     1 or 0
//	clusterpool.node.pruned_connections      counter   {connection}
//	clusterpool.node.retries                 counter   {attempt}
//	clusterpool.node.evictions               counter   {eviction}
//	clusterpool.node.locality                gauge     1, attribute locality, once the locality is known
//
// Per pool (Pool.ClusterStat):
//
//	clusterpool.nodes                        updown    {node}       state=healthy|unhealthy|draining
//	clusterpool.retries                      counter   {call}       outcome=succeeded|gave_up|outcome_unknown|interrupted
//	clusterpool.retry_attempts               counter   {attempt}
//	clusterpool.evictions                    counter   {eviction}
//	clusterpool.probes                       counter   {probe}
//	clusterpool.probe_failures               counter   {probe}
//	clusterpool.probe_sessions               counter   {connection}
//	clusterpool.redials                      counter   {connection}
//	clusterpool.connects_throttled           counter   {connection}
//	clusterpool.connect_throttle.wait_time   counter   s
//	clusterpool.nodes_added                  counter   {node}
//	clusterpool.nodes_removed                counter   {node}
//	clusterpool.hook_panics                  counter   {panic}
//	clusterpool.locality_fallbacks           counter   {fallback}
//
// The runtime limits (see clusterpool's "Runtime limits"):
//
//	clusterpool.limit.max_conns              updown    {connection} the size in force
//	clusterpool.limit.min_conns              updown    {connection}
//	clusterpool.limit.max_conns_per_node     updown    {connection} 0: no cap
//	clusterpool.effective_max_conns          updown    {connection} within caps and full nodes
//	clusterpool.full_nodes                   updown    {node}       nodes refusing new connections (53300)
//	clusterpool.acquire_timeouts             counter   {call}
//	clusterpool.node.full                    gauge     1 or 0
//
// Per workload (attribute workload is the name given to WithWorkload; only
// workloads that have or had a limit):
//
//	clusterpool.workload.limit               updown    {connection} 0: none any more
//	clusterpool.workload.in_use              updown    {connection}
//	clusterpool.workload.waiting             updown    {call}
//	clusterpool.workload.acquires            counter   {call}
//	clusterpool.workload.waits               counter   {call}
//	clusterpool.workload.wait_time           counter   s
//
// pgxpool's TotalConns is the sum of clusterpool.conns over its states and is
// not exported again. In clusterpool.nodes a node counts once: unhealthy if
// evicted, else draining if draining, else healthy.
package clusterotel

import (
	"context"
	"errors"
	"strconv"

	"github.com/clusterpool/clusterpool"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
)

// ScopeName is the instrumentation scope of the Meter that Register asks
// the MeterProvider for.
const ScopeName = "github.com/clusterpool/clusterpool/clusterotel"

// Registration is the callback Register installed; Unregister removes it.
type Registration struct {
	reg metric.Registration
}

// Unregister stops the pool's metrics from being read at collection. Call
// it before or after closing the pool; the instruments stay with the
// provider but report nothing more.
func (r *Registration) Unregister() error { return r.reg.Unregister() }

type instruments struct {
	acquires, emptyAcquires, canceledAcquires, newConns, lifetimeDestroys, idleDestroys metric.Int64ObservableCounter
	acquireDuration, emptyAcquireWait                                                   metric.Float64ObservableCounter
	conns, maxConns                                                                     metric.Int64ObservableUpDownCounter

	nodeConns                                 metric.Int64ObservableUpDownCounter
	nodeHealthy, nodeDraining, nodeLocality   metric.Int64ObservableGauge
	nodePruned, nodeRetries, nodeEvictions    metric.Int64ObservableCounter
	nodes                                     metric.Int64ObservableUpDownCounter
	retries, retryAttempts, evictions, probes metric.Int64ObservableCounter
	probeFailures, probeSessions, redials     metric.Int64ObservableCounter
	connectsThrottled                         metric.Int64ObservableCounter
	nodesAdded, nodesRemoved, hookPanics      metric.Int64ObservableCounter
	localityFallbacks                         metric.Int64ObservableCounter
	connectWait                               metric.Float64ObservableCounter

	limitMaxConns, limitMinConns, limitPerNode, effectiveMaxConns, fullNodes metric.Int64ObservableUpDownCounter
	acquireTimeouts                                                          metric.Int64ObservableCounter
	nodeFull                                                                 metric.Int64ObservableGauge
	workloadLimit, workloadInUse, workloadWaiting                            metric.Int64ObservableUpDownCounter
	workloadAcquires, workloadWaits                                          metric.Int64ObservableCounter
	workloadWait                                                             metric.Float64ObservableCounter
}

// Register creates the instruments on a Meter from mp and registers one
// callback that reads pool at each collection; name is the value of the
// "pool" attribute on every measurement.
func Register(mp metric.MeterProvider, name string, pool *clusterpool.Pool) (*Registration, error) {
	if mp == nil || pool == nil {
		return nil, errors.New("clusterotel: Register needs a MeterProvider and a Pool")
	}
	m := mp.Meter(ScopeName)
	var in instruments
	var errs []error
	ic := func(n, unit, desc string) metric.Int64ObservableCounter {
		i, err := m.Int64ObservableCounter(n, metric.WithUnit(unit), metric.WithDescription(desc))
		errs = append(errs, err)
		return i
	}
	fc := func(n, desc string) metric.Float64ObservableCounter {
		i, err := m.Float64ObservableCounter(n, metric.WithUnit("s"), metric.WithDescription(desc))
		errs = append(errs, err)
		return i
	}
	ud := func(n, unit, desc string) metric.Int64ObservableUpDownCounter {
		i, err := m.Int64ObservableUpDownCounter(n, metric.WithUnit(unit), metric.WithDescription(desc))
		errs = append(errs, err)
		return i
	}
	g := func(n, desc string) metric.Int64ObservableGauge {
		i, err := m.Int64ObservableGauge(n, metric.WithUnit("1"), metric.WithDescription(desc))
		errs = append(errs, err)
		return i
	}
	in.acquires = ic("clusterpool.acquires", "{acquire}", "Successful acquires from the pool (pgxpool.Stat.AcquireCount).")
	in.acquireDuration = fc("clusterpool.acquire.duration", "Total time of successful acquires (pgxpool.Stat.AcquireDuration).")
	in.emptyAcquires = ic("clusterpool.empty_acquires", "{acquire}", "Successful acquires that waited because the pool had no idle connection (pgxpool.Stat.EmptyAcquireCount).")
	in.emptyAcquireWait = fc("clusterpool.empty_acquire.wait_time", "Total time successful acquires waited because the pool had no idle connection (pgxpool.Stat.EmptyAcquireWaitTime).")
	in.canceledAcquires = ic("clusterpool.canceled_acquires", "{acquire}", "Acquires ended by their context (pgxpool.Stat.CanceledAcquireCount).")
	in.conns = ud("clusterpool.conns", "{connection}", "Connections held by pgxpool by state: idle, acquired, or being established.")
	in.maxConns = ud("clusterpool.max_conns", "{connection}", "Maximum size of the pool (pgxpool.Stat.MaxConns).")
	in.newConns = ic("clusterpool.new_conns", "{connection}", "New connections opened (pgxpool.Stat.NewConnsCount).")
	in.lifetimeDestroys = ic("clusterpool.max_lifetime_destroys", "{connection}", "Connections closed because they exceeded MaxConnLifetime.")
	in.idleDestroys = ic("clusterpool.max_idle_destroys", "{connection}", "Connections closed because they exceeded MaxConnIdleTime.")

	in.nodeConns = ud("clusterpool.node.connections", "{connection}", "Open connections of the pool per node, idle or in use.")
	in.nodeHealthy = g("clusterpool.node.healthy", "1 if the node is healthy, 0 while it is evicted after failures or a drain signal.")
	in.nodeDraining = g("clusterpool.node.draining", "1 if the node reported that it is draining.")
	in.nodePruned = ic("clusterpool.node.pruned_connections", "{connection}", "Connections of the node retired by the balancer.")
	in.nodeRetries = ic("clusterpool.node.retries", "{attempt}", "Attempts retried after a failure on the node.")
	in.nodeEvictions = ic("clusterpool.node.evictions", "{eviction}", "Times the node was evicted.")
	in.nodeLocality = g("clusterpool.node.locality", "1 for the node's locality (CockroachDB's --locality form), once the pool knows it.")

	in.nodes = ud("clusterpool.nodes", "{node}", "Nodes known to the pool by state; each node counts once: unhealthy, else draining, else healthy.")
	in.retries = ic("clusterpool.retries", "{call}", "Calls that involved the retry logic, by how they ended.")
	in.retryAttempts = ic("clusterpool.retry_attempts", "{attempt}", "Failed attempts that were retried.")
	in.evictions = ic("clusterpool.evictions", "{eviction}", "Times a node was evicted.")
	in.probes = ic("clusterpool.probes", "{probe}", "Probes made to discover nodes.")
	in.probeFailures = ic("clusterpool.probe_failures", "{probe}", "Probes that failed to connect or identify a node.")
	in.probeSessions = ic("clusterpool.probe_sessions", "{connection}", "Connections the probes opened (none when gossip is read over an idle pool connection).")
	in.redials = ic("clusterpool.redials", "{connection}", "New connections refused and dialled again because they reached a node above its target.")
	in.connectsThrottled = ic("clusterpool.connects_throttled", "{connection}", "New connections that waited for the connect rate limit.")
	in.connectWait = fc("clusterpool.connect_throttle.wait_time", "Total time new connections waited for the connect rate limit.")
	in.nodesAdded = ic("clusterpool.nodes_added", "{node}", "Times the pool learned of a node.")
	in.nodesRemoved = ic("clusterpool.nodes_removed", "{node}", "Times the pool forgot a node that expired.")
	in.hookPanics = ic("clusterpool.hook_panics", "{panic}", "Panics in the caller's connection hooks that the pool recovered.")
	in.limitMaxConns = ud("clusterpool.limit.max_conns", "{connection}", "The pool's size in force (MaxConns, or SetMaxConns).")
	in.limitMinConns = ud("clusterpool.limit.min_conns", "{connection}", "The MinConns in force (SetMinConns), within the size.")
	in.limitPerNode = ud("clusterpool.limit.max_conns_per_node", "{connection}", "The per-node cap in force; 0 means none.")
	in.effectiveMaxConns = ud("clusterpool.effective_max_conns", "{connection}", "How many connections the pool may hold now, within the per-node cap and full nodes.")
	in.fullNodes = ud("clusterpool.full_nodes", "{node}", "Healthy nodes that take no new connection (they refused one with 53300).")
	in.acquireTimeouts = ic("clusterpool.acquire_timeouts", "{call}", "Calls that got no connection within the acquire timeout.")
	in.nodeFull = g("clusterpool.node.full", "1 while the node takes no new connection (it refused one with 53300).")
	in.workloadLimit = ud("clusterpool.workload.limit", "{connection}", "The workload's connection limit; 0 when it has none any more.")
	in.workloadInUse = ud("clusterpool.workload.in_use", "{connection}", "Connections the workload's calls hold.")
	in.workloadWaiting = ud("clusterpool.workload.waiting", "{call}", "The workload's calls waiting for a slot.")
	in.workloadAcquires = ic("clusterpool.workload.acquires", "{call}", "Slots the workload's calls took.")
	in.workloadWaits = ic("clusterpool.workload.waits", "{call}", "The workload's calls that waited for a slot.")
	in.workloadWait = fc("clusterpool.workload.wait_time", "Time the workload's calls waited for a slot.")
	in.localityFallbacks = ic("clusterpool.locality_fallbacks", "{fallback}", "Times the pool moved to a less preferred locality level because no node of the level in use was healthy.")
	if err := errors.Join(errs...); err != nil {
		return nil, errors.Join(errors.New("clusterotel: creating instruments"), err)
	}

	poolAttr := attribute.String("pool", name)
	reg, err := m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		observe(o, &in, pool, poolAttr)
		return nil
	},
		in.acquires, in.acquireDuration, in.emptyAcquires, in.emptyAcquireWait, in.canceledAcquires,
		in.conns, in.maxConns, in.newConns, in.lifetimeDestroys, in.idleDestroys,
		in.nodeConns, in.nodeHealthy, in.nodeDraining, in.nodePruned, in.nodeRetries, in.nodeEvictions, in.nodeLocality,
		in.nodes, in.retries, in.retryAttempts, in.evictions, in.probes, in.probeFailures, in.probeSessions, in.redials,
		in.limitMaxConns, in.limitMinConns, in.limitPerNode, in.effectiveMaxConns, in.fullNodes, in.acquireTimeouts, in.nodeFull,
		in.workloadLimit, in.workloadInUse, in.workloadWaiting, in.workloadAcquires, in.workloadWaits, in.workloadWait,
		in.connectsThrottled, in.connectWait, in.nodesAdded, in.nodesRemoved, in.hookPanics, in.localityFallbacks,
	)
	if err != nil {
		return nil, errors.Join(errors.New("clusterotel: registering the callback"), err)
	}
	return &Registration{reg: reg}, nil
}

// observe takes one Stat, one NodeStats and one ClusterStat snapshot.
func observe(o metric.Observer, in *instruments, pool *clusterpool.Pool, poolAttr attribute.KeyValue) {
	only := metric.WithAttributes(poolAttr)
	state := func(s string) metric.ObserveOption {
		return metric.WithAttributes(poolAttr, attribute.String("state", s))
	}

	ps := pool.Stat()
	o.ObserveInt64(in.acquires, ps.AcquireCount(), only)
	o.ObserveFloat64(in.acquireDuration, ps.AcquireDuration().Seconds(), only)
	o.ObserveInt64(in.emptyAcquires, ps.EmptyAcquireCount(), only)
	o.ObserveFloat64(in.emptyAcquireWait, ps.EmptyAcquireWaitTime().Seconds(), only)
	o.ObserveInt64(in.canceledAcquires, ps.CanceledAcquireCount(), only)
	o.ObserveInt64(in.conns, int64(ps.IdleConns()), state("idle"))
	o.ObserveInt64(in.conns, int64(ps.AcquiredConns()), state("acquired"))
	o.ObserveInt64(in.conns, int64(ps.ConstructingConns()), state("constructing"))
	o.ObserveInt64(in.maxConns, int64(ps.MaxConns()), only)
	o.ObserveInt64(in.newConns, ps.NewConnsCount(), only)
	o.ObserveInt64(in.lifetimeDestroys, ps.MaxLifetimeDestroyCount(), only)
	o.ObserveInt64(in.idleDestroys, ps.MaxIdleDestroyCount(), only)

	var healthy, unhealthy, draining int64
	for _, s := range pool.NodeStats() {
		node := attribute.String("node", strconv.FormatInt(int64(s.ID), 10))
		onNode := metric.WithAttributes(poolAttr, node)
		o.ObserveInt64(in.nodeConns, int64(s.IdleConns), metric.WithAttributes(poolAttr, node, attribute.String("state", "idle")))
		o.ObserveInt64(in.nodeConns, int64(s.AcquiredConns), metric.WithAttributes(poolAttr, node, attribute.String("state", "in_use")))
		o.ObserveInt64(in.nodeHealthy, boolValue(s.Healthy), onNode)
		o.ObserveInt64(in.nodeDraining, boolValue(s.Draining), onNode)
		o.ObserveInt64(in.nodePruned, s.Pruned, onNode)
		o.ObserveInt64(in.nodeRetries, s.Retries, onNode)
		o.ObserveInt64(in.nodeEvictions, s.Evictions, onNode)
		o.ObserveInt64(in.nodeFull, boolValue(s.Full), onNode)
		if s.Locality != "" {
			o.ObserveInt64(in.nodeLocality, 1, metric.WithAttributes(poolAttr, node, attribute.String("locality", s.Locality)))
		}
		switch {
		case !s.Healthy:
			unhealthy++
		case s.Draining:
			draining++
		default:
			healthy++
		}
	}
	o.ObserveInt64(in.nodes, healthy, state("healthy"))
	o.ObserveInt64(in.nodes, unhealthy, state("unhealthy"))
	o.ObserveInt64(in.nodes, draining, state("draining"))

	st := pool.ClusterStat()
	for _, oc := range clusterpool.RetryOutcomes() {
		o.ObserveInt64(in.retries, st.RetryOutcome(oc), metric.WithAttributes(poolAttr, attribute.String("outcome", oc.String())))
	}
	o.ObserveInt64(in.retryAttempts, st.RetryAttempts(), only)
	o.ObserveInt64(in.evictions, st.Evictions(), only)
	o.ObserveInt64(in.probes, st.Probes(), only)
	o.ObserveInt64(in.probeFailures, st.ProbeFailures(), only)
	o.ObserveInt64(in.probeSessions, st.ProbeSessions(), only)
	o.ObserveInt64(in.redials, st.Redials(), only)
	o.ObserveInt64(in.connectsThrottled, st.ThrottledConnects(), only)
	o.ObserveFloat64(in.connectWait, st.ConnectWaitDuration().Seconds(), only)
	o.ObserveInt64(in.nodesAdded, st.NodesAdded(), only)
	o.ObserveInt64(in.nodesRemoved, st.NodesRemoved(), only)
	o.ObserveInt64(in.hookPanics, st.HookPanics(), only)
	o.ObserveInt64(in.limitMaxConns, int64(st.MaxConns()), only)
	o.ObserveInt64(in.limitMinConns, int64(st.MinConns()), only)
	o.ObserveInt64(in.limitPerNode, int64(st.MaxConnsPerNode()), only)
	o.ObserveInt64(in.effectiveMaxConns, int64(st.EffectiveMaxConns()), only)
	o.ObserveInt64(in.fullNodes, int64(st.FullNodes()), only)
	o.ObserveInt64(in.acquireTimeouts, st.AcquireTimeouts(), only)
	for _, w := range st.Workloads() {
		onWorkload := metric.WithAttributes(poolAttr, attribute.String("workload", w.Name))
		o.ObserveInt64(in.workloadLimit, int64(w.Limit), onWorkload)
		o.ObserveInt64(in.workloadInUse, int64(w.InUse), onWorkload)
		o.ObserveInt64(in.workloadWaiting, int64(w.Waiting), onWorkload)
		o.ObserveInt64(in.workloadAcquires, w.Acquires, onWorkload)
		o.ObserveInt64(in.workloadWaits, w.Waits, onWorkload)
		o.ObserveFloat64(in.workloadWait, w.WaitDuration.Seconds(), onWorkload)
	}
	o.ObserveInt64(in.localityFallbacks, st.LocalityFallbacks(), only)
}

func boolValue(b bool) int64 {
	if b {
		return 1
	}
	return 0
}
