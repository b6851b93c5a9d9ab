// Package clusterslog logs a clusterpool.Pool's events with log/slog.
//
//	cfg, err := clusterpool.ParseConfig(connString)
//	...
//	cfg.Tracer = clusterslog.New(logger)
//	pool, err := clusterpool.NewWithConfig(ctx, cfg)
//
// Each event is one record with structured attributes (node IDs, counts,
// durations, error classes). Levels follow how much an operator wants to
// see them:
//
//   - Debug: balancing (connections pruned to rebalance, throttled
//     connects), probes, each retried attempt, a call that waited for
//     its workload's limit, and a discovery table the server does not
//     have (plain PostgreSQL).
//   - Info: nodes added, removed, healthy again, draining; a node's
//     locality learned; connections pruned from an unavailable node or
//     outside the locality level in use; the pool back on a more
//     preferred locality level; a call that succeeded after retries or
//     whose context ended between attempts; runtime limits changed.
//   - Warn: a node evicted (unhealthy), the pool falling back to a less
//     preferred locality level, a call that gave up after retries, one not
//     retried because its outcome is unknown, a call that gave up waiting
//     for its workload's limit, and a discovery table the server refused
//     for lack of a privilege (grant VIEWCLUSTERMETADATA).
//   - Error: a panic in one of the caller's hooks, which the pool recovered;
//     the record carries the hook, the panic value and the stack.
//
// Records never carry a password or a connection string: the events hold
// node IDs, addresses (host:port) and driver errors, which pgx writes
// without secrets.
//
// The handler's Enabled is asked first, so events below the logger's level
// cost no attribute building. The context passed to the logger is the one
// the pool passed to the tracer: the caller's for retries and throttled
// connects, so a handler can add request attributes from it.
package clusterslog

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/clusterpool/clusterpool"
)

// Tracer logs a pool's events. It implements every tracer interface of
// clusterpool; set it as clusterpool.Config.Tracer, alone or with
// clusterpool.CombineTracers.
type Tracer struct {
	logger *slog.Logger
}

// New returns a Tracer that logs to logger. A nil logger is an error of
// the caller's: there is no default logger.
func New(logger *slog.Logger) *Tracer {
	return &Tracer{logger: logger}
}

var (
	_ clusterpool.NodeTracer    = (*Tracer)(nil)
	_ clusterpool.PruneTracer   = (*Tracer)(nil)
	_ clusterpool.RetryTracer   = (*Tracer)(nil)
	_ clusterpool.ProbeTracer   = (*Tracer)(nil)
	_ clusterpool.ConnectTracer = (*Tracer)(nil)
	_ clusterpool.HookTracer    = (*Tracer)(nil)

	_ clusterpool.LocalityTracer  = (*Tracer)(nil)
	_ clusterpool.LimitTracer     = (*Tracer)(nil)
	_ clusterpool.DiscoveryTracer = (*Tracer)(nil)
)

// Attribute keys.
const (
	keyNode            = "node"
	keyAddr            = "addr"
	keyCount           = "count"
	keyReason          = "reason"
	keyAttempt         = "attempt"
	keyAttempts        = "attempts"
	keyNodes           = "nodes"
	keyClass           = "error_class"
	keyStage           = "stage"
	keyDelay           = "delay"
	keyOutcome         = "outcome"
	keyWaited          = "waited"
	keyLimit           = "limit_per_second"
	keyErr             = "err"
	keyHook            = "hook"
	keyPanic           = "panic"
	keyStack           = "stack"
	keyMaxConns        = "max_conns"
	keyMinConns        = "min_conns"
	keyMaxConnsPerNode = "max_conns_per_node"
	keyAcquireTimeout  = "acquire_timeout"
	keyWorkloads       = "workload_limits"
	keyWorkload        = "workload"

	keyLocality = "locality"
	keyLevel    = "locality_level"
	keyPrevious = "previous_level"

	keyTable = "table"
	keyUntil = "until"
)

func (t *Tracer) log(ctx context.Context, level slog.Level, msg string, attrs ...slog.Attr) {
	t.logger.LogAttrs(ctx, level, msg, attrs...)
}

func (t *Tracer) enabled(ctx context.Context, level slog.Level) bool {
	return t.logger.Enabled(ctx, level)
}

func nodeAttr(id clusterpool.NodeID) slog.Attr { return slog.Int64(keyNode, int64(id)) }

func errAttr(err error) slog.Attr { return slog.String(keyErr, err.Error()) }

// TraceNodeAdded logs at Info.
func (t *Tracer) TraceNodeAdded(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceNodeAddedData) {
	if !t.enabled(ctx, slog.LevelInfo) {
		return
	}
	attrs := []slog.Attr{nodeAttr(data.Node)}
	if data.Addr != "" {
		attrs = append(attrs, slog.String(keyAddr, data.Addr))
	}
	t.log(ctx, slog.LevelInfo, "clusterpool: node added", attrs...)
}

// TraceNodeRemoved logs at Info.
func (t *Tracer) TraceNodeRemoved(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceNodeRemovedData) {
	t.log(ctx, slog.LevelInfo, "clusterpool: node removed (expired)", nodeAttr(data.Node))
}

// TraceNodeHealth logs an eviction at Warn and a recovery at Info.
func (t *Tracer) TraceNodeHealth(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceNodeHealthData) {
	if data.Healthy {
		t.log(ctx, slog.LevelInfo, "clusterpool: node healthy again", nodeAttr(data.Node))
		return
	}
	t.log(ctx, slog.LevelWarn, "clusterpool: node evicted", nodeAttr(data.Node))
}

// TraceNodeDraining logs at Info.
func (t *Tracer) TraceNodeDraining(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceNodeDrainingData) {
	msg := "clusterpool: node draining"
	if !data.Draining {
		msg = "clusterpool: node no longer draining"
	}
	t.log(ctx, slog.LevelInfo, msg, nodeAttr(data.Node))
}

// TracePrune logs a rebalance at Debug and pruning from an unavailable node
// at Info.
func (t *Tracer) TracePrune(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TracePruneData) {
	level := slog.LevelDebug
	if data.Reason == clusterpool.PruneNodeUnavailable || data.Reason == clusterpool.PruneOutsideLocality {
		level = slog.LevelInfo
	}
	if !t.enabled(ctx, level) {
		return
	}
	t.log(ctx, level, "clusterpool: connections pruned",
		nodeAttr(data.Node), slog.Int(keyCount, data.Count), slog.String(keyReason, data.Reason.String()))
}

// TraceRetry logs at Debug.
func (t *Tracer) TraceRetry(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceRetryData) {
	if !t.enabled(ctx, slog.LevelDebug) {
		return
	}
	attrs := []slog.Attr{
		slog.Int(keyAttempt, data.Attempt),
		nodeAttr(data.Node),
		slog.String(keyClass, data.Class.String()),
		slog.String(keyStage, data.Stage.String()),
		slog.Duration(keyDelay, data.Delay),
	}
	if data.Err != nil {
		attrs = append(attrs, errAttr(data.Err))
	}
	t.log(ctx, slog.LevelDebug, "clusterpool: retrying", attrs...)
}

// TraceRetryEnd logs a success or an interruption at Info and a give-up or
// an unknown outcome at Warn.
func (t *Tracer) TraceRetryEnd(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceRetryEndData) {
	level, msg := slog.LevelWarn, "clusterpool: gave up retrying"
	switch data.Outcome {
	case clusterpool.RetrySucceeded:
		level, msg = slog.LevelInfo, "clusterpool: succeeded after retries"
	case clusterpool.RetryInterrupted:
		level, msg = slog.LevelInfo, "clusterpool: retries interrupted by the caller's context"
	case clusterpool.RetryOutcomeUnknown:
		msg = "clusterpool: not retried, outcome unknown"
	}
	if !t.enabled(ctx, level) {
		return
	}
	nodes := make([]int64, len(data.Nodes))
	for i, id := range data.Nodes {
		nodes[i] = int64(id)
	}
	attrs := []slog.Attr{
		slog.String(keyOutcome, data.Outcome.String()),
		slog.Int(keyAttempts, data.Attempts),
		slog.Any(keyNodes, nodes),
	}
	if data.Err != nil {
		attrs = append(attrs, slog.String(keyClass, data.Class.String()), errAttr(data.Err))
	}
	t.log(ctx, level, msg, attrs...)
}

// TraceProbe logs at Debug.
func (t *Tracer) TraceProbe(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceProbeData) {
	if !t.enabled(ctx, slog.LevelDebug) {
		return
	}
	if data.Err != nil {
		t.log(ctx, slog.LevelDebug, "clusterpool: probe failed", errAttr(data.Err))
		return
	}
	t.log(ctx, slog.LevelDebug, "clusterpool: probe", nodeAttr(data.Node))
}

// TraceConnectThrottled logs at Debug.
func (t *Tracer) TraceConnectThrottled(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceConnectThrottledData) {
	if !t.enabled(ctx, slog.LevelDebug) {
		return
	}
	attrs := []slog.Attr{slog.Duration(keyWaited, data.Waited), slog.Float64(keyLimit, data.Limit)}
	if data.Err != nil {
		attrs = append(attrs, errAttr(data.Err))
	}
	t.log(ctx, slog.LevelDebug, "clusterpool: new connection throttled", attrs...)
}

// TraceHookPanic logs at Error, with the hook's name, the panic value and
// the stack of the panic.
func (t *Tracer) TraceHookPanic(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceHookPanicData) {
	if !t.enabled(ctx, slog.LevelError) {
		return
	}
	t.log(ctx, slog.LevelError, "clusterpool: hook panicked (recovered)",
		slog.String(keyHook, data.Hook), slog.String(keyPanic, fmt.Sprint(data.Value)), slog.String(keyStack, string(data.Stack)))
}

// TraceNodeLocality logs at Info.
func (t *Tracer) TraceNodeLocality(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceNodeLocalityData) {
	if !t.enabled(ctx, slog.LevelInfo) {
		return
	}
	t.log(ctx, slog.LevelInfo, "clusterpool: node locality", nodeAttr(data.Node), slog.String(keyLocality, data.Locality))
}

// TraceLocalityLevel logs a fallback at Warn and a return at Info. The
// level is the last tier the nodes in use share with the pool's locality
// ("zone", "region"), or "cluster" for the whole cluster.
func (t *Tracer) TraceLocalityLevel(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceLocalityLevelData) {
	level, msg := slog.LevelInfo, "clusterpool: back on a preferred locality level"
	if data.Fallback {
		level, msg = slog.LevelWarn, "clusterpool: locality fallback: no healthy node in the preferred level"
	}
	if !t.enabled(ctx, level) {
		return
	}
	t.log(ctx, level, msg, slog.String(keyLevel, levelName(data.Level)), slog.String(keyPrevious, levelName(data.Previous)))
}

func levelName(level string) string {
	if level == "" {
		return "cluster"
	}
	return level
}

// TraceLimits logs at Info, with the limits now in force.
func (t *Tracer) TraceLimits(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceLimitsData) {
	if !t.enabled(ctx, slog.LevelInfo) {
		return
	}
	attrs := []slog.Attr{
		slog.Int(keyMaxConns, int(data.MaxConns)),
		slog.Int(keyMinConns, int(data.MinConns)),
		slog.Int(keyMaxConnsPerNode, int(data.MaxConnsPerNode)),
		slog.Duration(keyAcquireTimeout, data.AcquireTimeout),
	}
	if len(data.WorkloadLimits) > 0 {
		attrs = append(attrs, slog.Any(keyWorkloads, data.WorkloadLimits))
	}
	t.log(ctx, slog.LevelInfo, "clusterpool: limits changed", attrs...)
}

// TraceWorkloadWait logs a wait at Debug, and one that ended without a
// slot at Warn.
func (t *Tracer) TraceWorkloadWait(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceWorkloadWaitData) {
	level, msg := slog.LevelDebug, "clusterpool: waited for the workload's limit"
	if data.Err != nil {
		level, msg = slog.LevelWarn, "clusterpool: gave up waiting for the workload's limit"
	}
	if !t.enabled(ctx, level) {
		return
	}
	attrs := []slog.Attr{slog.String(keyWorkload, data.Workload), slog.Duration(keyWaited, data.Waited)}
	if data.Err != nil {
		attrs = append(attrs, errAttr(data.Err))
	}
	t.log(ctx, level, msg, attrs...)
}

// TraceDiscoveryPaused logs at Warn when the server refused the read for
// lack of a privilege (SQLSTATE 42501), and at Debug otherwise (no such
// table: the server is not CockroachDB).
func (t *Tracer) TraceDiscoveryPaused(ctx context.Context, _ *clusterpool.Pool, data clusterpool.TraceDiscoveryPausedData) {
	level, msg := slog.LevelDebug, "clusterpool: discovery table not readable, paused"
	var pgErr *pgconn.PgError
	if errors.As(data.Err, &pgErr) && pgErr.Code == "42501" {
		level, msg = slog.LevelWarn, "clusterpool: discovery table refused (insufficient privilege), paused"
	}
	if !t.enabled(ctx, level) {
		return
	}
	attrs := []slog.Attr{slog.String(keyTable, data.Table), slog.Time(keyUntil, data.Until)}
	if data.Err != nil {
		attrs = append(attrs, errAttr(data.Err))
	}
	t.log(ctx, level, msg, attrs...)
}
