// Package clusterpool is a cluster-aware, drop-in replacement for pgxpool.
//
// A Go service that talks to a CockroachDB cluster (or any cluster of
// Postgres-wire servers) swaps one line,
//
//	pool, err := pgxpool.New(ctx, connString)      // before
//	pool, err := clusterpool.New(ctx, connString)  // after
//
// and the rest of its code compiles unchanged: *Pool has every method of
// *pgxpool.Pool with the same signature.
//
// # Node identity
//
// The pool learns which node each connection reached without an extra round
// trip: CockroachDB encodes its SQL instance ID in the BackendKeyData it sends
// at connect (see DecodeProcessID) and announces itself with the crdb_version
// parameter. On plain PostgreSQL the ProcessID is an operating-system process
// ID, so the pool never decodes it: with several hosts in the connection
// string it asks each new connection for the server's address (one query per
// connection, never per acquire); with a single host it tracks nothing and
// behaves exactly as pgxpool. Config.NodeIdentity and Config.IdentifyNode
// choose another way.
//
// # Tracking
//
// Each connection's node is recorded when it connects and forgotten when it
// closes; Pool.NodeStats reports, per node, the open, idle and acquired
// connections and the node's health. Acquire and release take no pool-wide
// lock and allocate nothing extra: the pool's per-connection state lives in
// the connection itself (pgconn's CustomData), and releases are seen through a
// pgxpool.ReleaseTracer rather than the AfterRelease hook, which would cost a
// goroutine per release.
//
// # Balancing and discovery
//
// Every Config.BalanceInterval the pool spreads its current size over the
// healthy nodes (targets differ by at most one) and retires about half of
// each over-target node's excess, idle connections only. New connections are
// rate-limited (Config.ConnectRate) and, when the connection string lists the
// nodes' own hosts, placed on the least-connected node. Once the pool's
// size holds still, its remainder connections go where a per-pool hash
// says, so many pools add up to an even cluster. Every Config.ProbeInterval
// the probe reads CockroachDB's gossip tables over an idle connection when
// allowed, or opens a short-lived connection, backing off to
// Config.ProbeMaxInterval while nothing changes, to find new nodes and
// nodes that came back; nodes nothing has seen for a while leave the
// targets. A node that stops answering (a network
// partition, a hung server) is checked in the background when calls on it
// time out and evicted if it stays silent; pool connects get
// DefaultConnectTimeout (10 s) per host unless connect_timeout is set.
//
// With Config.Locality (cluster_locality, such as
// "region=us-east1,zone=us-east1-b") the targets and placement use only the
// nodes of the most preferred level (the whole locality, then the fallback
// tiers of Config.LocalityFallback, then the whole cluster) that has a live
// node: the pool falls back a level when none is, and moves back through the
// balancer when one is again. Gossip-learned hosts outside that level are
// never dialled. Nodes' localities come from CockroachDB's gossip tables, or
// from one SHOW LOCALITY per node.
//
// # Retries
//
// Exec, Query, QueryRow, Begin and the other query methods retry work that a
// failed node could not have applied (not sent, 40001, read-only, or marked
// with WithIdempotent) on another node, at most Config.MaxRetries times, and
// never re-run work whose outcome is unknown. The Pool documentation gives the
// whole policy.
//
// # Runtime limits
//
// pgxpool's MaxConns is fixed when it is built; clusterpool keeps it as the
// ceiling and enforces limits below it while the pool runs, each with its
// default:
//
//   - Pool.SetMaxConns(n), 1 to MaxConns (default: MaxConns): the pool's
//     size. Shrinking closes idle connections above it at once and in-use
//     ones when released, never under a query, within one balance interval;
//     callers beyond the size wait (within their context) rather than fail.
//     Growing opens connections through the connect rate limit.
//   - Pool.SetMinConns(n), 0 to MaxConns (default: MinConns): the pool opens
//     what is missing in the background, through placement, and holds
//     pgxpool's own top-ups to the new value. Pool.WaitReady blocks until
//     MinConns connections are open and spread over the healthy nodes as the
//     balancer would have them, or its context ends.
//   - Config.MaxConnsPerNode, cluster_max_conns_per_node (default 0: no
//     cap), and Pool.SetMaxConnsPerNode: placement, redials and balancing
//     never put more on one node; when the cap times the healthy nodes is
//     below the size, the pool works with that (ClusterStat.EffectiveMaxConns).
//   - Config.WorkloadLimits (default: none) and Pool.SetWorkloadLimits bound
//     how many connections the calls of each workload, named with
//     WithWorkload, hold at once; calls beyond wait in arrival order. Work
//     with no workload is bounded only by the pool.
//   - Config.AcquireTimeout, cluster_acquire_timeout (default 0: none), and
//     Pool.SetAcquireTimeout: the longest a call waits for a connection,
//     apart from the query's context; the error matches ErrPoolExhausted when
//     every connection was handed out and ErrPoolConnecting when connections
//     were still being opened.
//
// A node that refuses a new connection with SQLSTATE 53300 (too many
// connections: CockroachDB's server.max_connections_per_gateway) is full,
// not unhealthy: it is never evicted for it, its connections keep working,
// the connect goes to another node and the caller sees no error while
// another node has room (NodeStat.Full). Until a limit is set acquire and
// release cost what they did; with limits in force, acquire through the
// Pool: PgxPool's Acquire is not held to them, and a new connection it would
// open beyond the runtime MinConns is refused. A connection taken out with Hijack keeps its
// workload slot.
//
// # Observability
//
// Pool.NodeStats (per node) and Pool.ClusterStat (pool-wide counters: retries
// by outcome, pruned connections, evictions, probes) are always available.
// Events (nodes added, removed, evicted, draining; connections pruned; retry
// attempts and outcomes; probes; throttled connects; recovered hook panics)
// go to Config.Tracer, which the pool inspects once for NodeTracer,
// PruneTracer, RetryTracer, ProbeTracer, ConnectTracer, HookTracer,
// LocalityTracer and LimitTracer;
// CombineTracers joins several. Adapters live
// in their own packages and are registered by the caller: clusterslog
// (log/slog), clusterprom (a Prometheus collector, in a module of its own) and
// clustersql (a *sql.DB on the pool for database/sql code).
//
// # Configuration
//
// ParseConfig accepts every pgxpool connection string plus cluster_*
// parameters (cluster_balance_interval, cluster_probe_interval,
// cluster_probe_max_interval, cluster_max_retries, cluster_connect_rate,
// cluster_node_identity, cluster_max_conns_per_node, cluster_acquire_timeout,
// cluster_locality, cluster_locality_fallback). Config
// embeds *pgxpool.Config, so pgxpool settings and hooks are set as usual; the
// pool chains its own hooks with the caller's, never replacing them.
//
// Bad input gets an error, not a panic: ParseConfig rejects an invalid or
// unknown cluster_* value with an error naming the parameter and the value,
// and masks every password in the errors pgx gives for the rest of the
// string. NewWithConfig rejects, naming the field and the value, invalid
// cluster settings (negative, or below MinInterval, 1 ms, for the intervals;
// a NaN rate; an unknown NodeIdentity; a Tracer that implements no tracer
// interface) and the configs pgx would panic on: nil, hand-built rather
// than made by ParseConfig, MaxConns below 1, a HealthCheckPeriod that is
// not positive. Zero cluster settings mean their documented defaults, so
// &Config{Config: pgxpoolConfig} means what ParseConfig of the same string
// means; a negative MaxRetries or ConnectRate turns retries or the connect
// limit off.
//
// # Hooks
//
// The caller's pgxpool hooks are chained with the pool's, never replaced,
// and a panic in one of them is recovered; "Hooks" in the Pool
// documentation says in which order they run and what a panic means.
//
// # Lifecycle
//
// New starts the pool's background work; Close stops it, waits for it to
// exit, and then closes the connections as pgxpool does, without waiting for
// pgx's background cleanup of connections cut on a node that has stopped
// answering. Every goroutine the pool starts has ended when Close returns.
package clusterpool
