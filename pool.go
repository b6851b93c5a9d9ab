package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/multitracer"
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
//   - BeforeConnect: the pool's hook (a connect-rate token, then host
//     placement; and DefaultConnectTimeout per host when connect_timeout is
//     not set) runs first, then the user's, on the same per-attempt copy of
//     the connection config.
//   - AfterConnect: the pool identifies the node first, then the user's hook
//     runs; if the user's hook fails, the connection is forgotten and closed.
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
	tracker  *tracker
	balancer *balancer // connect rate, placement, pruning (balancer.go)
	obs      *observer // events and cluster-wide counters (tracer.go)

	// The caller's hooks, chained behind the pool's own. userBeforeConnect
	// recovers the hook's panics; the probe and health checks call it too.
	userBeforeConnect func(context.Context, *pgx.ConnConfig) error
	userAfterConnect  func(context.Context, *pgx.Conn) error
	userPrepareConn   func(context.Context, *pgx.Conn) (bool, error)
	prepareConnHook   string // hookPrepareConn or hookBeforeAcquire: which one the user set
	userBeforeClose   func(*pgx.Conn)

	// Background goroutines (balancer, probe) run under bgCtx; Close cancels
	// it and waits on bgWG.
	bgCtx    context.Context
	bgCancel context.CancelFunc
	bgWG     sync.WaitGroup
	// bgMu orders starting the loops late (balancer.startOnTracked, from
	// AfterConnect) with Close: no goroutine starts once Close has begun.
	bgMu     sync.Mutex
	bgClosed bool

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
	p := &Pool{
		config:   config.Copy(),
		settings: config.settings(),
		tracker:  newTracker(),
	}
	p.obs = newObserver(p, config.Tracer)
	p.tracker.obs = p.obs
	p.bgCtx, p.bgCancel = context.WithCancel(context.Background())

	// pgxCfg is what pgxpool gets: the caller's config with our hooks chained in.
	pgxCfg := config.Config.Copy()
	p.userAfterConnect = pgxCfg.AfterConnect
	p.userBeforeClose = pgxCfg.BeforeClose
	p.userPrepareConn, p.prepareConnHook = pgxCfg.PrepareConn, hookPrepareConn
	if p.userPrepareConn == nil && pgxCfg.BeforeAcquire != nil {
		beforeAcquire := pgxCfg.BeforeAcquire
		p.userPrepareConn = func(ctx context.Context, conn *pgx.Conn) (bool, error) {
			return beforeAcquire(ctx, conn), nil
		}
		p.prepareConnHook = hookBeforeAcquire
	}
	pgxCfg.BeforeAcquire = nil
	if user := pgxCfg.BeforeConnect; user != nil {
		guarded := func(ctx context.Context, cc *pgx.ConnConfig) (err error) {
			defer p.recoverHook(ctx, hookBeforeConnect, &err)
			return user(ctx, cc)
		}
		pgxCfg.BeforeConnect = guarded
		p.userBeforeConnect = guarded
	}
	if p.tracking() {
		pgxCfg.AfterConnect = p.afterConnect
		pgxCfg.PrepareConn = p.prepareConn
		pgxCfg.BeforeClose = p.beforeClose
		pgxCfg.ConnConfig.Tracer = withReleaseTracer(pgxCfg.ConnConfig.Tracer, releaseTracer{p})
	} else {
		// Nothing to track: the pool's wrappers are there only to recover
		// the user's panics, and only around hooks the user set.
		pgxCfg.AfterConnect, pgxCfg.PrepareConn, pgxCfg.BeforeClose = nil, nil, nil
		if p.userAfterConnect != nil {
			pgxCfg.AfterConnect = p.afterConnect
		}
		if p.userPrepareConn != nil {
			pgxCfg.PrepareConn = p.prepareConn
		}
		if p.userBeforeClose != nil {
			pgxCfg.BeforeClose = p.beforeClose
		}
	}
	// BeforeConnect: the balancer's hook (rate limit, placement) runs first,
	// then the user's, on the same per-attempt copy.
	p.balancer = newBalancer(p)
	p.balancer.install(pgxCfg)

	pool, err := pgxpool.NewWithConfig(ctx, pgxCfg)
	if err != nil {
		p.bgCancel()
		return nil, err
	}
	p.pool = pool

	p.balancer.start() // the balancing loop and the probe, now or at the first tracked connection

	return p, nil
}

// tracking reports whether the pool assigns connections to nodes at all.
// Without it the pool is pgxpool plus retries: no hooks, no tracer.
func (p *Pool) tracking() bool {
	return p.settings.identifyNode != nil || p.settings.identity != NodeIdentityNone
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

// afterConnect identifies the new connection's node, then runs the user's
// AfterConnect.
func (p *Pool) afterConnect(ctx context.Context, conn *pgx.Conn) error {
	// The connect's reservation (placement) counts the connection until
	// it is tracked on its node, or until it fails.
	id, addr, err := p.identify(ctx, conn)
	if err != nil {
		p.balancer.counted(conn.PgConn())
		return err
	}
	var cs *connState
	if id != 0 {
		host := ""
		if nc := conn.PgConn().Conn(); nc != nil && nc.RemoteAddr() != nil {
			host = nc.RemoteAddr().String()
		}
		if addr == "" && p.settings.multiHost {
			addr = host
		}
		cs = p.tracker.trackDialled(id, addr, host, conn, connectStart(conn), time.Now())
		p.balancer.startOnTracked()
	}
	p.balancer.counted(conn.PgConn())
	if p.userAfterConnect != nil {
		if err := p.callAfterConnect(ctx, conn); err != nil {
			p.tracker.untrack(cs) // pgxpool closes conn without BeforeClose
			return err
		}
	}
	return nil
}

// Names of the caller's hooks, as TraceHookPanicData.Hook gives them.
const (
	hookBeforeConnect = "BeforeConnect"
	hookAfterConnect  = "AfterConnect"
	hookIdentifyNode  = "IdentifyNode"
	hookPrepareConn   = "PrepareConn"
	hookBeforeAcquire = "BeforeAcquire"
	hookBeforeClose   = "BeforeClose"
)

// recoverHook is deferred around each call of a hook of the caller's. It
// recovers a panic, reports it, and sets *err (when err is not nil) to an
// error naming the hook and the panic value. It costs nothing measurable
// when the hook returns.
func (p *Pool) recoverHook(ctx context.Context, hook string, err *error) {
	v := recover()
	if v == nil {
		return
	}
	p.obs.hookPanicked(ctx, hook, v, debug.Stack())
	if err != nil {
		*err = hookPanicError(hook, v)
	}
}

func hookPanicError(hook string, v any) error {
	if e, ok := v.(error); ok {
		return fmt.Errorf("clusterpool: %s hook panicked: %w", hook, e)
	}
	return fmt.Errorf("clusterpool: %s hook panicked: %v", hook, v)
}

func (p *Pool) callAfterConnect(ctx context.Context, conn *pgx.Conn) (err error) {
	defer p.recoverHook(ctx, hookAfterConnect, &err)
	return p.userAfterConnect(ctx, conn)
}

func (p *Pool) callIdentifyNode(ctx context.Context, conn *pgx.Conn) (id NodeID, addr string, err error) {
	defer p.recoverHook(ctx, hookIdentifyNode, &err)
	return p.settings.identifyNode(ctx, IdentifyNodeParams{Conn: conn})
}

// callPrepareConn returns (false, err) after a panic: pgxpool destroys the
// connection, whose state the hook may have left half changed, and Acquire
// returns err.
func (p *Pool) callPrepareConn(ctx context.Context, conn *pgx.Conn) (ok bool, err error) {
	defer p.recoverHook(ctx, p.prepareConnHook, &err)
	return p.userPrepareConn(ctx, conn)
}

func (p *Pool) callBeforeClose(conn *pgx.Conn) {
	defer p.recoverHook(context.Background(), hookBeforeClose, nil)
	p.userBeforeClose(conn)
}

// cockroachIDs reports whether the pool's node IDs are CockroachDB's own
// (from the BackendKey) whenever the server is CockroachDB. With the query
// identity or IdentifyNode they are the pool's or the user's, a different ID
// space: CockroachDB's IDs (gossip, a BackendKey) must not be matched against
// them.
func (p *Pool) cockroachIDs() bool {
	return p.settings.identifyNode == nil && p.settings.identity != NodeIdentityQuery
}

// identify returns the node conn reached, or 0 if it is not to be tracked.
func (p *Pool) identify(ctx context.Context, conn *pgx.Conn) (NodeID, string, error) {
	if p.settings.identifyNode != nil {
		return p.callIdentifyNode(ctx, conn)
	}
	crdb := isCockroachDB(conn.PgConn())
	switch p.settings.identity {
	case NodeIdentityBackendKey:
		if crdb {
			return DecodeProcessID(conn.PgConn().PID()), "", nil
		}
	case NodeIdentityAuto:
		if crdb {
			return DecodeProcessID(conn.PgConn().PID()), "", nil
		}
		if p.settings.multiHost {
			return p.identifyByQuery(ctx, conn)
		}
	case NodeIdentityQuery:
		return p.identifyByQuery(ctx, conn)
	}
	return 0, "", nil
}

// identifyQuery asks the server for its own address: one round trip, once
// per connection. COALESCE covers Unix-socket connections, where both are NULL.
// It runs with the simple protocol so it takes no slot in the connection's
// statement cache.
const identifyQuery = "SELECT COALESCE(host(inet_server_addr()), ''), COALESCE(inet_server_port(), 0)"

func (p *Pool) identifyByQuery(ctx context.Context, conn *pgx.Conn) (NodeID, string, error) {
	var host string
	var port int
	if err := conn.QueryRow(ctx, identifyQuery, pgx.QueryExecModeSimpleProtocol).Scan(&host, &port); err != nil {
		return 0, "", fmt.Errorf("clusterpool: identifying the node of a new connection: %w", err)
	}
	if host == "" {
		// A Unix socket: the server is the one at the socket path we dialled.
		cfg := conn.Config()
		host = cfg.Host
		if port == 0 {
			port = int(cfg.Port)
		}
	}
	addr := hostPort(host, uint16(port))
	return p.tracker.localID(addr), addr, nil
}

// prepareConn refuses connections to retire and connections on evicted
// nodes, then asks the user's hook. Hot path: a map read from the
// connection's own CustomData and two atomic loads, no lock.
func (p *Pool) prepareConn(ctx context.Context, conn *pgx.Conn) (bool, error) {
	cs := connStateOf(conn)
	if cs != nil && cs.refused() {
		if sweeping(ctx) {
			// Hand it to the sweep, which closes it before releasing it:
			// pgxpool then destroys it and starts its health check, which
			// refills MinConns. Refused here, it would be destroyed with no
			// refill until the next health check period.
			return true, nil
		}
		return false, nil
	}
	if p.userPrepareConn != nil {
		if sweeping(ctx) {
			return true, nil // retireIdle releases it at once; the user's hook is for real acquires
		}
		ok, err := p.callPrepareConn(ctx, conn)
		if !ok || err != nil {
			return ok, err
		}
	}
	if cs != nil {
		cs.acquired()
	}
	return true, nil
}

// beforeClose runs the user's BeforeClose, then forgets the connection,
// whatever the user's hook did: pgxpool closes the connection next.
func (p *Pool) beforeClose(conn *pgx.Conn) {
	defer p.tracker.untrack(connStateOf(conn))
	if p.userBeforeClose != nil {
		p.callBeforeClose(conn)
	}
}

type sweepKey struct{}

func sweeping(ctx context.Context) bool { return ctx.Value(sweepKey{}) != nil }

// sweepIdle takes every idle connection out of the pool for a sweep (the
// balancer's pruning and alive check, retireIdle, a health check's ping):
// under the sweep's context PrepareConn hands each over without the user's
// hook, refused ones included. Each goes back through releaseSwept or
// Release.
func (p *Pool) sweepIdle(ctx context.Context) []*pgxpool.Conn {
	return p.pool.AcquireAllIdle(context.WithValue(ctx, sweepKey{}, true))
}

// retireIdle destroys the idle connections that are marked for retirement or
// sit on an evicted node, now rather than at their next acquire, and returns
// how many it destroyed. It briefly takes every idle connection out of the
// pool (pgxpool.AcquireAllIdle) and puts the others back untouched; an
// Acquire racing with it may open a new connection.
func (p *Pool) retireIdle(ctx context.Context) int {
	n := 0
	for _, c := range p.sweepIdle(ctx) {
		if releaseSwept(c) {
			n++
		}
	}
	return n
}

// releaseSwept puts back a connection taken by a sweep. A refused one
// (retiring, or on an evicted node) is closed first, so that the release
// destroys it and starts pgxpool's refill through placement; it reports
// whether it did that.
func releaseSwept(c *pgxpool.Conn) bool {
	cs := connStateOf(c.Conn())
	if cs != nil && cs.refused() {
		closeQuietly(c.Conn())
		c.Release()
		return true
	}
	c.Release()
	return false
}

// releaseTracer learns of every Release synchronously, with the *pgx.Conn,
// without pgxpool's AfterRelease goroutine. It has to be a pgx.QueryTracer to
// sit in ConnConfig.Tracer; its query methods do nothing.
type releaseTracer struct{ p *Pool }

func (releaseTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (releaseTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (releaseTracer) TraceRelease(_ *pgxpool.Pool, data pgxpool.TraceReleaseData) {
	if cs := connStateOf(data.Conn); cs != nil {
		cs.released()
	}
}

// withReleaseTracer installs rt next to the user's tracer, which keeps every
// interface it implements (multitracer forwards each one).
func withReleaseTracer(user pgx.QueryTracer, rt releaseTracer) pgx.QueryTracer {
	if user == nil {
		return rt
	}
	mt := multitracer.New(user)
	mt.PoolReleaseTracers = append(mt.PoolReleaseTracers, rt)
	return mt
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
// but it neither retries nor balances on its own; do not Close it directly.
func (p *Pool) PgxPool() *pgxpool.Pool { return p.pool }

// ClusterConfig returns a copy of the Config used to create the pool, with
// the cluster settings in effect: a zero setting reads as its default.
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

// Acquire returns a connection from the pool.
func (p *Pool) Acquire(ctx context.Context) (*pgxpool.Conn, error) {
	return p.pool.Acquire(ctx)
}

// AcquireFunc acquires a connection and calls f with it, then releases it.
// ctx only affects the acquire. See pgxpool.Pool.AcquireFunc.
func (p *Pool) AcquireFunc(ctx context.Context, f func(*pgxpool.Conn) error) error {
	return p.pool.AcquireFunc(ctx, f)
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
	return p.pool.Ping(ctx)
}
