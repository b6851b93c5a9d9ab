// Package clusterprom exports a clusterpool.Pool's statistics to Prometheus.
//
//	pool, err := clusterpool.New(ctx, connString)
//	...
//	reg.MustRegister(clusterprom.NewCollector("orders", pool))
//
// The Collector reads the pool's statistics at each scrape (Pool.Stat,
// Pool.NodeStats, Pool.ClusterStat); it needs no tracer and adds nothing to the pool's hot
// path. It registers nothing by itself: the caller registers it in the
// registry of their choice. Every metric carries a constant "pool" label with
// the name given to NewCollector, so several pools can be registered in one
// registry.
//
// It is a module of its own (github.com/clusterpool/clusterpool/clusterprom)
// so that clusterpool itself does not depend on the Prometheus client.
//
// # Metrics
//
// Per node (the node label is the node ID; a node's series go away when the
// pool forgets the node):
//
//	clusterpool_connections{pool,node,state="idle"|"in_use"}   gauge
//	clusterpool_node_healthy{pool,node}                         gauge, 1 or 0 (evicted)
//	clusterpool_node_draining{pool,node}                        gauge, 1 or 0
//	clusterpool_pruned_connections_total{pool,node}             counter
//	clusterpool_node_retries_total{pool,node}                   counter
//	clusterpool_node_evictions_total{pool,node}                 counter
//	clusterpool_node_locality{pool,node,locality}               gauge, 1 (info), once the locality is known
//
// Per pool (counters never go back, even when nodes are forgotten):
//
//	clusterpool_nodes{pool,state="healthy"|"unhealthy"|"draining"} gauge
//	clusterpool_retries_total{pool,outcome}                     counter
//	clusterpool_retry_attempts_total{pool}                      counter
//	clusterpool_evictions_total{pool}                           counter
//	clusterpool_probes_total{pool}                              counter
//	clusterpool_probe_failures_total{pool}                      counter
//	clusterpool_probe_sessions_total{pool}                      counter
//	clusterpool_redials_total{pool}                             counter
//	clusterpool_connects_throttled_total{pool}                  counter
//	clusterpool_connect_throttle_wait_seconds_total{pool}       counter
//	clusterpool_nodes_added_total{pool}                         counter
//	clusterpool_nodes_removed_total{pool}                       counter
//	clusterpool_hook_panics_total{pool}                         counter
//	clusterpool_locality_fallbacks_total{pool}                  counter
//
// Per pool, the runtime limits (see clusterpool's "Runtime limits"):
//
//	clusterpool_limit_max_conns{pool}                           gauge, the size in force
//	clusterpool_limit_min_conns{pool}                           gauge
//	clusterpool_limit_max_conns_per_node{pool}                  gauge, 0: no cap
//	clusterpool_effective_max_conns{pool}                       gauge, within caps and full nodes
//	clusterpool_full_nodes{pool}                                gauge, nodes refusing new connections (53300)
//	clusterpool_acquire_timeouts_total{pool}                    counter
//	clusterpool_node_full{pool,node}                            gauge, 1 or 0
//
// Per workload (the workload label is the name given to WithWorkload; only
// workloads that have or had a limit):
//
//	clusterpool_workload_limit{pool,workload}                   gauge, 0: none any more
//	clusterpool_workload_in_use{pool,workload}                  gauge
//	clusterpool_workload_waiting{pool,workload}                 gauge
//	clusterpool_workload_acquires_total{pool,workload}          counter
//	clusterpool_workload_waits_total{pool,workload}             counter
//	clusterpool_workload_wait_seconds_total{pool,workload}      counter
//
// Per pool, pgxpool's own figures (Pool.Stat, which reads pgxpool.Stat):
//
//	clusterpool_acquire_total{pool}                             counter, successful acquires
//	clusterpool_acquire_duration_seconds_total{pool}            counter
//	clusterpool_empty_acquire_total{pool}                       counter, acquires that waited
//	clusterpool_empty_acquire_wait_seconds_total{pool}          counter
//	clusterpool_canceled_acquire_total{pool}                    counter
//	clusterpool_conns{pool,state="idle"|"acquired"|"constructing"} gauge
//	clusterpool_max_conns{pool}                                 gauge
//	clusterpool_new_conns_total{pool}                           counter
//	clusterpool_max_lifetime_destroy_total{pool}                counter
//	clusterpool_max_idle_destroy_total{pool}                    counter
//
// pgxpool's TotalConns is the sum of the three states of clusterpool_conns
// (sum by (pool) (clusterpool_conns)); it is not exported again, so that a
// sum over the metric does not count it twice. clusterpool_conns counts what
// pgxpool holds, including connections being dialled; clusterpool_connections
// counts established connections per node.
//
// clusterpool_node_locality carries each node's locality (NodeStat.Locality,
// CockroachDB's --locality form, "region=us-east1,zone=us-east1-b") as a
// label, so other per-node series can be grouped by it, for instance the
// connections per locality:
//
//	sum by (pool, locality) (clusterpool_connections * on (pool, node) group_left (locality) clusterpool_node_locality)
//
// clusterpool_locality_fallbacks_total counts moves to a less preferred
// level of the pool's locality preference (cluster_locality) because no
// node of the level in use was healthy.
//
// The outcome label of clusterpool_retries_total is a
// clusterpool.RetryOutcome: succeeded, gave_up, outcome_unknown or
// interrupted; every outcome is always exported, so a rate over a label
// that has not happened yet is 0, not absent. In clusterpool_nodes a node
// counts once: unhealthy if evicted, else draining if draining, else
// healthy.
package clusterprom

import (
	"strconv"

	"github.com/clusterpool/clusterpool"
	"github.com/prometheus/client_golang/prometheus"
)

// Collector is a prometheus.Collector over one pool's statistics.
type Collector struct {
	pool *clusterpool.Pool

	connections   *prometheus.Desc
	nodeHealthy   *prometheus.Desc
	nodeDraining  *prometheus.Desc
	nodePruned    *prometheus.Desc
	nodeRetries   *prometheus.Desc
	nodeEvictions *prometheus.Desc
	nodeLocality  *prometheus.Desc

	nodes             *prometheus.Desc
	retries           *prometheus.Desc
	retryAttempts     *prometheus.Desc
	evictions         *prometheus.Desc
	probes            *prometheus.Desc
	probeFailures     *prometheus.Desc
	probeSessions     *prometheus.Desc
	redials           *prometheus.Desc
	connectsThrottled *prometheus.Desc
	connectWait       *prometheus.Desc
	nodesAdded        *prometheus.Desc
	nodesRemoved      *prometheus.Desc
	hookPanics        *prometheus.Desc
	localityFallbacks *prometheus.Desc

	limitMaxConns, limitMinConns, limitPerNode, effectiveMaxConns *prometheus.Desc
	fullNodes, acquireTimeouts, nodeFull                          *prometheus.Desc
	workloadLimit, workloadInUse, workloadWaiting                 *prometheus.Desc
	workloadAcquires, workloadWaits, workloadWait                 *prometheus.Desc

	acquires          *prometheus.Desc
	acquireDuration   *prometheus.Desc
	emptyAcquires     *prometheus.Desc
	emptyAcquireWait  *prometheus.Desc
	canceledAcquires  *prometheus.Desc
	conns             *prometheus.Desc
	maxConns          *prometheus.Desc
	newConns          *prometheus.Desc
	lifetimeDestroyed *prometheus.Desc
	idleDestroyed     *prometheus.Desc
}

var _ prometheus.Collector = (*Collector)(nil)

// NewCollector returns a Collector for pool; name is the value of the
// "pool" label on every metric and tells pools apart in one registry.
func NewCollector(name string, pool *clusterpool.Pool) *Collector {
	constLabels := prometheus.Labels{"pool": name}
	desc := func(metric, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("clusterpool_"+metric, help, labels, constLabels)
	}
	return &Collector{
		pool: pool,

		connections:   desc("connections", "Open connections of the pool per node, idle or in use.", "node", "state"),
		nodeHealthy:   desc("node_healthy", "1 if the node is healthy, 0 while it is evicted after failures or a drain signal.", "node"),
		nodeDraining:  desc("node_draining", "1 if the node reported that it is draining.", "node"),
		nodePruned:    desc("pruned_connections_total", "Connections of the node retired by the balancer.", "node"),
		nodeRetries:   desc("node_retries_total", "Attempts retried after a failure on the node.", "node"),
		nodeEvictions: desc("node_evictions_total", "Times the node was evicted.", "node"),
		nodeLocality:  desc("node_locality", "1 for the node's locality (CockroachDB's --locality form), once the pool knows it.", "node", "locality"),

		nodes:             desc("nodes", "Nodes known to the pool by state; each node counts once: unhealthy, else draining, else healthy.", "state"),
		retries:           desc("retries_total", "Calls that involved the retry logic, by how they ended.", "outcome"),
		retryAttempts:     desc("retry_attempts_total", "Failed attempts that were retried."),
		evictions:         desc("evictions_total", "Times a node was evicted."),
		probes:            desc("probes_total", "Probes made to discover nodes."),
		probeFailures:     desc("probe_failures_total", "Probes that failed to connect or identify a node."),
		probeSessions:     desc("probe_sessions_total", "Connections the probes opened (none when gossip is read over an idle pool connection)."),
		redials:           desc("redials_total", "New connections refused and dialled again because they reached a node above its target."),
		connectsThrottled: desc("connects_throttled_total", "New connections that waited for the connect rate limit."),
		connectWait:       desc("connect_throttle_wait_seconds_total", "Total time new connections waited for the connect rate limit."),
		nodesAdded:        desc("nodes_added_total", "Times the pool learned of a node."),
		nodesRemoved:      desc("nodes_removed_total", "Times the pool forgot a node that expired."),
		hookPanics:        desc("hook_panics_total", "Panics in the caller's connection hooks that the pool recovered."),
		localityFallbacks: desc("locality_fallbacks_total", "Times the pool moved to a less preferred locality level because no node of the level in use was healthy."),

		acquires:          desc("acquire_total", "Successful acquires from the pool (pgxpool.Stat.AcquireCount)."),
		acquireDuration:   desc("acquire_duration_seconds_total", "Total time of successful acquires (pgxpool.Stat.AcquireDuration)."),
		emptyAcquires:     desc("empty_acquire_total", "Successful acquires that waited because the pool had no idle connection (pgxpool.Stat.EmptyAcquireCount)."),
		emptyAcquireWait:  desc("empty_acquire_wait_seconds_total", "Total time successful acquires waited because the pool had no idle connection (pgxpool.Stat.EmptyAcquireWaitTime)."),
		limitMaxConns:     desc("limit_max_conns", "The pool's size in force (MaxConns, or SetMaxConns)."),
		limitMinConns:     desc("limit_min_conns", "The MinConns in force (SetMinConns), within the size."),
		limitPerNode:      desc("limit_max_conns_per_node", "The per-node cap in force; 0 means none."),
		effectiveMaxConns: desc("effective_max_conns", "How many connections the pool may hold now, within the per-node cap and full nodes."),
		fullNodes:         desc("full_nodes", "Healthy nodes that take no new connection (they refused one with 53300)."),
		acquireTimeouts:   desc("acquire_timeouts_total", "Calls that got no connection within the acquire timeout."),
		nodeFull:          desc("node_full", "1 while the node takes no new connection (it refused one with 53300).", "node"),
		workloadLimit:     desc("workload_limit", "The workload's connection limit; 0 when it has none any more.", "workload"),
		workloadInUse:     desc("workload_in_use", "Connections the workload's calls hold.", "workload"),
		workloadWaiting:   desc("workload_waiting", "The workload's calls waiting for a slot.", "workload"),
		workloadAcquires:  desc("workload_acquires_total", "Slots the workload's calls took.", "workload"),
		workloadWaits:     desc("workload_waits_total", "The workload's calls that waited for a slot.", "workload"),
		workloadWait:      desc("workload_wait_seconds_total", "Time the workload's calls waited for a slot.", "workload"),

		canceledAcquires:  desc("canceled_acquire_total", "Acquires ended by their context (pgxpool.Stat.CanceledAcquireCount)."),
		conns:             desc("conns", "Connections held by pgxpool by state: idle, acquired, or being established (pgxpool.Stat).", "state"),
		maxConns:          desc("max_conns", "Maximum size of the pool (pgxpool.Stat.MaxConns)."),
		newConns:          desc("new_conns_total", "New connections opened (pgxpool.Stat.NewConnsCount)."),
		lifetimeDestroyed: desc("max_lifetime_destroy_total", "Connections closed because they exceeded MaxConnLifetime (pgxpool.Stat.MaxLifetimeDestroyCount)."),
		idleDestroyed:     desc("max_idle_destroy_total", "Connections closed because they exceeded MaxConnIdleTime (pgxpool.Stat.MaxIdleDestroyCount)."),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.connections, c.nodeHealthy, c.nodeDraining, c.nodePruned, c.nodeRetries, c.nodeEvictions, c.nodeLocality,
		c.nodes, c.retries, c.retryAttempts, c.evictions, c.probes, c.probeFailures, c.probeSessions, c.redials,
		c.connectsThrottled, c.connectWait, c.nodesAdded, c.nodesRemoved, c.hookPanics, c.localityFallbacks,
		c.acquires, c.acquireDuration, c.emptyAcquires, c.emptyAcquireWait, c.canceledAcquires,
		c.conns, c.maxConns, c.newConns, c.lifetimeDestroyed, c.idleDestroyed,
		c.limitMaxConns, c.limitMinConns, c.limitPerNode, c.effectiveMaxConns, c.fullNodes, c.acquireTimeouts, c.nodeFull,
		c.workloadLimit, c.workloadInUse, c.workloadWaiting, c.workloadAcquires, c.workloadWaits, c.workloadWait,
	} {
		ch <- d
	}
}

// Collect implements prometheus.Collector. It takes one Stat, one NodeStats
// and one ClusterStat snapshot per scrape.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	var healthy, unhealthy, draining int
	for _, s := range c.pool.NodeStats() {
		node := strconv.FormatInt(int64(s.ID), 10)
		gauge(c.connections, float64(s.IdleConns), node, "idle")
		gauge(c.connections, float64(s.AcquiredConns), node, "in_use")
		gauge(c.nodeHealthy, boolValue(s.Healthy), node)
		gauge(c.nodeDraining, boolValue(s.Draining), node)
		counter(c.nodePruned, float64(s.Pruned), node)
		counter(c.nodeRetries, float64(s.Retries), node)
		counter(c.nodeEvictions, float64(s.Evictions), node)
		gauge(c.nodeFull, boolValue(s.Full), node)
		if s.Locality != "" {
			gauge(c.nodeLocality, 1, node, s.Locality)
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
	gauge(c.nodes, float64(healthy), "healthy")
	gauge(c.nodes, float64(unhealthy), "unhealthy")
	gauge(c.nodes, float64(draining), "draining")

	st := c.pool.ClusterStat()
	for _, o := range clusterpool.RetryOutcomes() {
		counter(c.retries, float64(st.RetryOutcome(o)), o.String())
	}
	counter(c.retryAttempts, float64(st.RetryAttempts()))
	counter(c.evictions, float64(st.Evictions()))
	counter(c.probes, float64(st.Probes()))
	counter(c.probeFailures, float64(st.ProbeFailures()))
	counter(c.probeSessions, float64(st.ProbeSessions()))
	counter(c.redials, float64(st.Redials()))
	counter(c.connectsThrottled, float64(st.ThrottledConnects()))
	counter(c.connectWait, st.ConnectWaitDuration().Seconds())
	counter(c.nodesAdded, float64(st.NodesAdded()))
	counter(c.nodesRemoved, float64(st.NodesRemoved()))
	counter(c.hookPanics, float64(st.HookPanics()))
	gauge(c.limitMaxConns, float64(st.MaxConns()))
	gauge(c.limitMinConns, float64(st.MinConns()))
	gauge(c.limitPerNode, float64(st.MaxConnsPerNode()))
	gauge(c.effectiveMaxConns, float64(st.EffectiveMaxConns()))
	gauge(c.fullNodes, float64(st.FullNodes()))
	counter(c.acquireTimeouts, float64(st.AcquireTimeouts()))
	for _, w := range st.Workloads() {
		gauge(c.workloadLimit, float64(w.Limit), w.Name)
		gauge(c.workloadInUse, float64(w.InUse), w.Name)
		gauge(c.workloadWaiting, float64(w.Waiting), w.Name)
		counter(c.workloadAcquires, float64(w.Acquires), w.Name)
		counter(c.workloadWaits, float64(w.Waits), w.Name)
		counter(c.workloadWait, w.WaitDuration.Seconds(), w.Name)
	}
	counter(c.localityFallbacks, float64(st.LocalityFallbacks()))

	ps := c.pool.Stat()
	counter(c.acquires, float64(ps.AcquireCount()))
	counter(c.acquireDuration, ps.AcquireDuration().Seconds())
	counter(c.emptyAcquires, float64(ps.EmptyAcquireCount()))
	counter(c.emptyAcquireWait, ps.EmptyAcquireWaitTime().Seconds())
	counter(c.canceledAcquires, float64(ps.CanceledAcquireCount()))
	gauge(c.conns, float64(ps.IdleConns()), "idle")
	gauge(c.conns, float64(ps.AcquiredConns()), "acquired")
	gauge(c.conns, float64(ps.ConstructingConns()), "constructing")
	gauge(c.maxConns, float64(ps.MaxConns()))
	counter(c.newConns, float64(ps.NewConnsCount()))
	counter(c.lifetimeDestroyed, float64(ps.MaxLifetimeDestroyCount()))
	counter(c.idleDestroyed, float64(ps.MaxIdleDestroyCount()))
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
