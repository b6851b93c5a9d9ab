package clusterpool

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Pool is a cluster-aware connection pool. It has every method of
// *pgxpool.Pool with the same signature, so code written against
// *pgxpool.Pool compiles against *Pool by changing the constructor.
//
// # Hooks
//
// Hooks set on the Config are chained with the pool's own, never replaced:
//
//   - BeforeConnect: the pool's hook (with runtime limits in force, the
//     check that the pool has room for another connection; a connect-rate
//     token, then host
//     placement; and DefaultConnectTimeout per host when connect_timeout is
//     not set) runs first, then the user's, on the same per-attempt copy of
//     the connection config.
//   - ValidateConnect: the pool's check (behind one address, refusing a
//     connection on a node above its target so that pgconn dials again)
//     runs first, then the one on the connection config, such as
//     target_session_attrs'.
//   - AfterConnect: the pool identifies the node first (and, with
//     Config.Locality, asks a node whose locality it does not know yet for
//     it, once per node), then the user's hook runs; if the user's hook
//     fails, the connection is forgotten and closed.
//   - PrepareConn (or the deprecated BeforeAcquire): the pool first refuses
//     connections marked for retirement or on an evicted node, returning
//     (false, nil) so pgxpool destroys them and tries another; otherwise the
//     user's hook decides.
//   - ShouldPing: the user's hook (or pgxpool's default, ping a connection
//     idle for more than a second) decides; the pool notes which connection
//     is pinged, so that a failed ping gets its node checked (below).
//   - BeforeClose: the user's hook runs first, while the connection is still
//     counted on its node; then the pool forgets it.
//
// A panic in one of these hooks, or in IdentifyNode, is recovered: most of
// them run on pgxpool's background goroutines, where a panic would end the
// program, and a panic in PrepareConn would leave its connection acquired
// for good. The panic is counted (ClusterStat.HookPanics) and reported to a
// HookTracer, and the hook counts as failed: BeforeConnect, AfterConnect
// and IdentifyNode as returning an error (the connect fails with an error
// naming the hook and the panic value, and the connection is closed),
// PrepareConn and BeforeAcquire as returning (false, that error) (the
// connection is destroyed and Acquire returns the error). After a panic in
// BeforeClose the connection is still closed and forgotten. The pool's
// node counts stay right in every case.
//
// AfterRelease is never set by the pool: pgxpool runs every release in a new
// goroutine when it is. The pool learns of releases through a
// pgxpool.ReleaseTracer on ConnConfig.Tracer, combined with the user's tracer
// (if any) through pgx's multitracer.
//
// A connection taken out of the pool with pgxpool.Conn.Hijack stays counted
// on its node (the server still sees it) until the caller closes it; the
// next NodeStats notices the close.
//
// # Retries
//
// Exec, Query, QueryRow, SendBatch, CopyFrom, Begin, BeginTx, BeginFunc and
// BeginTxFunc retry a failed attempt when, and only when, repeating it cannot
// apply work twice. Errors are classified by type and SQLSTATE (Classify),
// never by message text:
//
//   - Not sent (pgconn.SafeToRetry, or a failed connect): retried. pgx's
//     "conn closed" is the exception: although marked SafeToRetry, it is
//     what a simple-protocol statement (a COMMIT, an Exec without
//     arguments) returns when its connection breaks after it was sent, so
//     it counts as sent.
//   - 40001 (serialization failure, "restart transaction"): the server
//     aborted the work; retried after a backoff.
//   - Connection failures (closed, EOF, reset, refused, network errors,
//     57P01 including CockroachDB's "server is not accepting clients",
//     57P02, 57P03, class 08): the connection is destroyed and the node is
//     evicted (below); the work is retried on a different node if it was not
//     sent, is read-only, or is marked with WithIdempotent.
//   - Outcome unknown (40003, a connection lost after a write was sent, a
//     COMMIT whose answer was lost, or a write or COMMIT already sent when
//     the caller's own context ended it): never retried unless marked with
//     WithIdempotent; the error matches ErrOutcomeUnknown (and, in the last
//     case, the context error too).
//   - Anything else, and the caller's own context errors on reads or on
//     work not yet sent: returned at once, unchanged.
//
// A call makes at most Config.MaxRetries+1 attempts (cluster_max_retries,
// default 5; cluster_max_retries=0 or a negative MaxRetries turns retries
// off, as does WithoutRetry for one call). Retries on another node go at
// once; retries on the same node (only one healthy node left) and after
// 40001 back off exponentially with jitter, 25 ms doubling to at most 1 s,
// and never sleep past the context's deadline: the call returns instead. A
// retry prefers a connection on a node that has not failed; new connections
// it opens are placed away from failed nodes when the connection string
// lists several hosts. When retries do not hide a failure, the error is a
// *RetryError naming the attempts (and the nodes, when known) and wrapping
// the last error, so errors.Is and errors.As still find the
// *pgconn.PgError; when the caller's context ended the retries (or its
// deadline left no time for the next one) it matches the context error too.
// A single attempt's ordinary error is returned unchanged. Config.RetryPolicy
// replaces DefaultRetryPolicy within these bounds.
//
// What each method retries: Exec the whole statement; QueryRow the whole
// statement too (it sends the query when called, as pgxpool does, and a
// failure that Scan meets is retried there with the arguments of the call);
// Query until its first row, or the end of an empty result, has arrived
// (Query reads it before returning; later errors are reported by Rows, as
// with pgxpool); Begin and BeginTx the BEGIN; SendBatch until the first
// result has been read; CopyFrom only getting a connection (a
// CopyFromSource cannot be rewound); BeginFunc and BeginTxFunc the whole
// transaction, on 40001 or a connection lost before COMMIT, like
// CockroachDB's client-side retry loop. pgx.BeginFunc(ctx, pool, fn) calls
// Begin once, so it retries only the BEGIN.
//
// Read-only work is: a transaction begun with pgx.ReadOnly access mode, and
// a statement that a deliberately narrow textual rule accepts — a single
// SELECT, SHOW or VALUES with no INTO, FOR, INSERT, UPDATE, DELETE, UPSERT,
// MERGE, nextval or setval, calling no function other than a few known
// built-ins (count, max, coalesce, now, ...). "SELECT f()" and WITH queries
// are not read-only by this rule, since they may write; mark such work with
// WithIdempotent if it is safe to repeat.
//
// Drain-aware eviction: on the first connection failure on node N (57P01
// from a draining CockroachDB node, or a lost connection) the pool evicts N:
// its idle connections are destroyed at once, its in-use ones when they are
// released, and none of N's connections is handed out until N proves healthy
// again (a successful connect or probe). A caller's own cancellation or
// deadline never counts against a node.
//
// Silent nodes (a network partition, a hung server) show up only as callers'
// deadlines. Instead of counting those, the pool checks the node in the
// background when a call on node N is cut by its deadline, an acquire-time
// ping on N fails, or a connect to N's host fails over to another host: it
// pings one of N's idle connections, dials N's address when the connection
// string lists the hosts, or else watches the calls in flight on N (one
// check per node at a time, at most one a second, bounded by
// min(connect timeout, 5 s)). If N does not answer, it is evicted as above;
// a node busy with slow queries still answers the ping.
type Pool struct {
	pool     *pgxpool.Pool
	config   *Config // the caller's config, copied; returned by ClusterConfig
	settings settings
	seed     uint64 // chosen once per pool; see balanceTargets
	// swaps are the pool's corrections to where its seed puts its
	// remainder, made to even out the cluster (fleetSwap); nil: none.
	swaps    atomic.Pointer[[]remainderSwap]
	swapRead atomic.Int64 // unix nanoseconds of the fleet read last decided on
	// swapMove is the last swap while its move may be under way
	// (cancelSwap); nil: none.
	swapMove atomic.Pointer[swapMove]
	obs      *observer

	tracker   *tracker       // which connection is on which node
	budget    *connectBudget // new connections' rate
	placement *placement     // connect-time placement
	health    *healthChecker // nil when no node is tracked
	limits    *limits        // runtime limits (limits.go)
	sweeps    atomic.Int32   // sweeps of idle connections under way (sweepIdle)
	lastPrune atomic.Int64   // unix nanoseconds of the last round that pruned
	keeper    keeper         // the background refill (refill.go)
	balance   balanceState   // the balance rounds' memory (prune.go)
	pace      probePace      // the probe's pace and what it aims at (probe.go)

	localityState // the locality level in use (locality.go)

	// The caller's hooks, chained behind the pool's own (hooks.go).
	// userBeforeConnect recovers the hook's panics; the probe and health
	// checks call it too.
	userBeforeConnect func(context.Context, *pgx.ConnConfig) error
	userAfterConnect  func(context.Context, *pgx.Conn) error
	userPrepareConn   func(context.Context, *pgx.Conn) (bool, error)
	prepareConnHook   string // hookPrepareConn or hookBeforeAcquire: which one the user set
	userBeforeClose   func(*pgx.Conn)

	// Background goroutines (the balance rounds, the probe, the health
	// checks) run under bgCtx; Close cancels it and waits on bgWG.
	bgCtx    context.Context
	bgCancel context.CancelFunc
	bgWG     sync.WaitGroup
	// loopsStarted is set once the loops run (startLoops, startOnTracked).
	loopsStarted atomic.Bool
	// bgMu orders starting the loops late (startOnTracked, from
	// AfterConnect) with Close: no goroutine starts once Close has begun.
	bgMu sync.Mutex // protects the fields below
	// loopsReady: the pgxpool exists, so the loops may run; loopsWanted: a
	// connection was tracked before that.
	loopsReady, loopsWanted bool
	bgClosed                bool

	closeOnce sync.Once
}

// New creates a Pool from a connection string. See ParseConfig for the format
// and NewWithConfig for how connections are established.
func New(ctx context.Context, connString string) (*Pool, error) {
	config, err := ParseConfig(connString)
	if err != nil {
		return nil, err
	}
	return NewWithConfig(ctx, config)
}

// NewWithConfig creates a Pool. config must have been created by ParseConfig;
// it is copied, so later changes to it have no effect. As with pgxpool, the
// connections for MinConns are established in the background and connection
// errors are not returned here: acquire a connection to check.
func NewWithConfig(ctx context.Context, config *Config) (*Pool, error) {
	if config == nil {
		return nil, errors.New("clusterpool: nil Config: create it with ParseConfig")
	}
	if err := config.validate(); err != nil {
		return nil, err
	}
	p := newPool(config)
	pgxCfg := config.Config.Copy()
	p.installHooks(pgxCfg)
	if p.limits.on() {
		// With limits from the start the limits loop opens MinConns,
		// within them (pgxpool would open them before it can check).
		pgxCfg.MinConns = 0
	}
	pool, err := pgxpool.NewWithConfig(ctx, pgxCfg)
	if err != nil {
		p.bgCancel()
		return nil, err
	}
	p.pool = pool
	p.limits.poolReady()
	p.startLoops()
	return p, nil
}

// newPool builds a Pool's parts from a valid config; it opens nothing.
func newPool(config *Config) *Pool {
	p := &Pool{
		config:   config.Copy(),
		settings: config.settings(),
		seed:     rand.Uint64(),
		tracker:  newTracker(),
	}
	p.obs = newObserver(p, config.Tracer)
	p.tracker.obs = p.obs
	p.budget = newConnectBudget(p.settings.connectRate, p.settings.connectBurst, p.obs)
	p.placement = newPlacement(p)
	p.limits = newLimits(p, config)
	if p.tracking() {
		p.health = newHealthChecker(p)
		p.tracker.suspect = p.callCut
	}
	p.bgCtx, p.bgCancel = context.WithCancel(context.Background())
	return p
}

// tracking reports whether the pool assigns connections to nodes at all.
// Without it the pool is pgxpool plus retries: no hooks, no tracer.
func (p *Pool) tracking() bool {
	return p.settings.identifyNode != nil || p.settings.identity != NodeIdentityNone
}

// startLoops runs the balance rounds, the probe and the health checks until
// the pool closes; called once the pgxpool exists. With one host and an
// identity read from the BackendKey (auto, backendkey) the server may be
// plain PostgreSQL, which identifies no node: the pool is then pgxpool, with
// no goroutine and no sweep of its idle connections, so the loops wait for
// the first connection tracked on a node (startOnTracked).
func (p *Pool) startLoops() {
	if !p.tracking() {
		return
	}
	p.bgMu.Lock()
	defer p.bgMu.Unlock()
	p.loopsReady = true
	if lazy := !p.settings.multiHost && p.cockroachIDs(); lazy && !p.loopsWanted {
		return
	}
	p.startLoopsLocked()
}

// startOnTracked starts the loops if they wait for a tracked connection,
// which AfterConnect has just counted. After the first time it costs an
// atomic load.
func (p *Pool) startOnTracked() {
	if p.loopsStarted.Load() {
		return
	}
	p.bgMu.Lock()
	defer p.bgMu.Unlock()
	p.loopsWanted = true
	if p.loopsReady { // else startLoops, under way in NewWithConfig, sees loopsWanted
		p.startLoopsLocked()
	}
}

func (p *Pool) startLoopsLocked() {
	if p.bgClosed || p.loopsStarted.Load() {
		return
	}
	p.loopsStarted.Store(true)
	p.goBackground(p.runBalance)
	p.goBackground(p.runProbe)
	p.goBackground(p.health.run)
}

// goBackgroundIfOpen runs f as goBackground does, unless Close has begun
// (or the background work was stopped), and reports whether it did.
func (p *Pool) goBackgroundIfOpen(f func(ctx context.Context)) bool {
	p.bgMu.Lock()
	defer p.bgMu.Unlock()
	if p.bgClosed || p.bgCtx.Err() != nil {
		return false
	}
	p.goBackground(f)
	return true
}

// goBackground runs f in a goroutine that Close cancels (through ctx) and
// waits for. The caller holds bgMu and has checked bgClosed.
func (p *Pool) goBackground(f func(ctx context.Context)) {
	p.bgWG.Add(1)
	go func() {
		defer p.bgWG.Done()
		f(p.bgCtx)
	}()
}

// NodeStats returns a snapshot of every known node's connections and health,
// sorted by ID. It is empty when nodes are not identified (plain PostgreSQL
// with a single host, or NodeIdentityNone): the pool never reports an
// operating-system process ID as a node.
func (p *Pool) NodeStats() []NodeStat {
	return p.tracker.snapshot()
}

// PgxPool returns the underlying pgxpool.Pool, for code that needs the
// concrete pgxpool type. Connections acquired through it are still tracked,
// but it neither retries nor balances on its own, nor waits within the
// runtime limits (a new connection it would open beyond the runtime MinConns
// is refused while a limit is in force); do not Close it directly.
func (p *Pool) PgxPool() *pgxpool.Pool { return p.pool }

// ClusterConfig returns a copy of the Config used to create the pool, with
// the cluster settings in effect: a zero setting reads as its default.
// Limits changed at run time (SetMaxConns and the other setters) are not
// in it: ClusterStat reports them.
func (p *Pool) ClusterConfig() *Config { return p.config.withDefaults() }

// Close stops the pool's background work and waits for it to exit, then
// closes all connections as pgxpool.Pool.Close does: it blocks until every
// acquired connection is released and closed. Unlike pgxpool's, it does not
// wait for pgx's background cleanup of connections that a deadline cut (a
// CancelRequest on a new connection, then draining the old one, for up to
// 15 s on a node that has stopped answering): Close ends those dials and
// closes their sockets. It is safe to call more than once.
func (p *Pool) Close() {
	p.closeOnce.Do(func() {
		p.bgMu.Lock()
		p.bgClosed = true
		p.bgMu.Unlock()
		p.bgCancel()
		p.bgWG.Wait()
		p.pool.Close()
	})
}

// Acquire returns a connection from the pool, within the runtime limits
// (SetMaxConns, SetAcquireTimeout, SetWorkloadLimits with WithWorkload).
func (p *Pool) Acquire(ctx context.Context) (*pgxpool.Conn, error) {
	// acquireConn, written out: this is the hot path.
	if p.limits.on() {
		return p.limits.acquire(ctx)
	}
	c, err := p.pool.Acquire(ctx)
	if err != nil {
		return p.acquireFailed(ctx, err)
	}
	return c, nil
}

// AcquireFunc acquires a connection and calls f with it, then releases it.
// ctx only affects the acquire. See pgxpool.Pool.AcquireFunc.
func (p *Pool) AcquireFunc(ctx context.Context, f func(*pgxpool.Conn) error) error {
	c, err := p.acquireConn(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	return f(c)
}

// AcquireAllIdle atomically acquires all currently idle connections, except
// those the pool is retiring. See pgxpool.Pool.AcquireAllIdle.
func (p *Pool) AcquireAllIdle(ctx context.Context) []*pgxpool.Conn {
	return p.pool.AcquireAllIdle(ctx)
}

// Reset closes all connections but leaves the pool open. See
// pgxpool.Pool.Reset.
func (p *Pool) Reset() { p.pool.Reset() }

// Config returns a copy of the pgxpool part of the config used to create the
// pool, with the caller's own hooks and tracer (not the pool's chained ones),
// as pgxpool.Pool.Config does. ClusterConfig returns the whole Config.
func (p *Pool) Config() *pgxpool.Config { return p.config.Config.Copy() }

// Stat returns pgxpool's statistics for the whole pool. NodeStats has them
// per node.
func (p *Pool) Stat() *pgxpool.Stat { return p.pool.Stat() }

// Exec acquires a connection, executes sql and releases the connection.
// See pgxpool.Pool.Exec.
func (p *Pool) Exec(ctx context.Context, sql string, arguments ...any) (pgconn.CommandTag, error) {
	l := p.newRetryLoop(ctx)
	for {
		c, err := l.conn()
		if err != nil {
			return pgconn.CommandTag{}, err
		}
		tag, err := c.Exec(ctx, sql, arguments...)
		if err == nil {
			c.Release()
			l.traceSuccess()
			return tag, nil
		}
		if err := l.failed(c, err, StageStatement, readOnlySQL(sql)); err != nil {
			return tag, err
		}
	}
}

// Query acquires a connection and executes a query that returns rows; the
// connection is released when the rows are closed. See pgxpool.Pool.Query.
func (p *Pool) Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error) {
	return p.query(ctx, sql, args)
}

// QueryRow acquires a connection and executes a query expected to return at
// most one row; the connection is released by Scan. See pgxpool.Pool.QueryRow.
func (p *Pool) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	return p.queryRow(ctx, sql, args)
}

// SendBatch acquires a connection and sends the batch on it. See
// pgxpool.Pool.SendBatch.
func (p *Pool) SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults {
	return p.sendBatch(ctx, b)
}

// Begin acquires a connection and starts a transaction. See
// pgxpool.Pool.Begin.
func (p *Pool) Begin(ctx context.Context) (pgx.Tx, error) {
	return p.beginTx(ctx, pgx.TxOptions{})
}

// BeginTx acquires a connection and starts a transaction with txOptions. See
// pgxpool.Pool.BeginTx.
func (p *Pool) BeginTx(ctx context.Context, txOptions pgx.TxOptions) (pgx.Tx, error) {
	return p.beginTx(ctx, txOptions)
}

// CopyFrom acquires a connection and copies rows into tableName. See
// pgxpool.Pool.CopyFrom.
func (p *Pool) CopyFrom(ctx context.Context, tableName pgx.Identifier, columnNames []string, rowSrc pgx.CopyFromSource) (int64, error) {
	l := p.newRetryLoop(ctx)
	c, err := l.conn()
	if err != nil {
		return 0, err
	}
	defer c.Release()
	l.traceSuccess() // the retried part, getting a connection, succeeded
	return c.Conn().CopyFrom(ctx, tableName, columnNames, rowSrc)
}

// Ping acquires a connection and checks that the server answers. See
// pgxpool.Pool.Ping.
func (p *Pool) Ping(ctx context.Context) error {
	c, err := p.acquireConn(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	return c.Ping(ctx)
}
