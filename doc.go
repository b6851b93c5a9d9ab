// Package clusterpool is a cluster-aware, drop-in replacement for pgxpool
// for CockroachDB: swap pgxpool.New for New (or pgxpool.ParseConfig for
// ParseConfig) and the rest of the code compiles unchanged, since *Pool has
// every method of *pgxpool.Pool with the same signature.
//
// # Nodes
//
// The pool learns each connection's node from the BackendKey CockroachDB
// sends at connect (DecodeProcessID), with no extra round trip;
// Config.NodeIdentity and Config.IdentifyNode choose another way. On plain
// PostgreSQL with one host it tracks nothing and is pgxpool plus retries.
// Pool.NodeStats reports each node; Pool.ClusterStat the pool's counters.
//
// # Balancing and discovery
//
// Every Config.BalanceInterval the pool spreads its size over the healthy
// nodes and retires idle connections of over-target nodes, each move paying
// for its replacement's connect first; once its size holds still its
// remainder connections go where a per-pool hash says, so that many pools
// add up to an even cluster; a pool that reads the fleet's sessions per
// node (below) moves a remainder connection now and then to even out what
// independent hashes leave. Connections lost to a drain or crash are
// replaced in the background, never on a caller's connect limit
// (Config.ConnectRate). A probe, every Config.ProbeInterval and backing off
// to Config.ProbeMaxInterval at rest, finds new, drained and returning nodes,
// from CockroachDB's gossip tables over an idle connection when it may read
// them, else from the nodes that hold the fleet's sessions
// (crdb_internal.cluster_sessions, which every user may read for its own).
// Config.Locality keeps connections in the client's zone or region.
//
// # Retries
//
// The query methods retry work that a failed node cannot have applied, on
// another node, and never work whose outcome is unknown (ErrOutcomeUnknown)
// unless marked WithIdempotent: "Retries" in the Pool documentation states
// the policy, DefaultRetryPolicy and RetryError the details.
//
// # Runtime limits
//
// Pool.SetMaxConns, Pool.SetMinConns, Pool.SetMaxConnsPerNode,
// Pool.SetWorkloadLimits (with WithWorkload) and Pool.SetAcquireTimeout
// change the pool's limits while it runs; Pool.WaitReady waits for MinConns.
// Until a limit is set, acquire and release cost what they cost in pgxpool.
//
// # Configuration and hooks
//
// ParseConfig reads pgxpool's connection string plus cluster_* parameters;
// each Config field gives its parameter, its default and what zero and
// negative mean. The caller's pgxpool hooks are chained with the pool's,
// never replaced: "Hooks" in the Pool documentation gives their order and
// what a panic in one means.
//
// # Observability
//
// Config.Tracer receives the pool's own events through the tracer
// interfaces (NodeTracer, PruneTracer, RetryTracer, ...). Adapters live in
// packages of their own: clusterslog (log/slog), clusterprom (Prometheus)
// and clusterotel (OpenTelemetry), and clustersql for database/sql.
//
// # Differences from pgxpool
//
// Begin returns the pool's own pgx.Tx; errors that retries did not hide are
// a *RetryError wrapping the last one; Query reads the first row before
// returning; pgx.BeginFunc retries only the BEGIN, Pool.BeginFunc the whole
// transaction; connects get DefaultConnectTimeout per host. The README lists
// them with what to do, and a differential test holds the list.
package clusterpool
