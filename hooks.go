package clusterpool

import (
	"context"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/multitracer"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The pool's pgxpool hooks, in the order pgxpool and pgconn call them for a
// connection, each chained with the caller's hook of the same name as the
// Pool documentation ("Hooks") describes:
//
//  1. BeforeConnect (beforeConnect): connect budget, connect timeout,
//     placement; it also sets, for this connect only,
//  2. ValidateConnect (chainValidateConnect): the redial check, the node
//     behind the host, the connect's start time;
//  3. AfterConnect (afterConnect): identify the node, track the connection;
//  4. ShouldPing (chainShouldPing) and PrepareConn (prepareConn) at each
//     acquire: mark a pinged connection, refuse retired ones;
//  5. the release tracer at each release: the connection is idle again;
//  6. BeforeClose (beforeClose): forget the connection.
//
// Without node tracking only the wrappers that recover the caller's panics
// are installed, and only around hooks the caller set.

// installHooks puts the pool's hooks into cfg, the config pgxpool gets, and
// keeps the caller's, which it finds there, to chain behind them.
func (p *Pool) installHooks(cfg *pgxpool.Config) {
	tracking := p.tracking()

	if user := cfg.BeforeConnect; user != nil {
		p.userBeforeConnect = func(ctx context.Context, cc *pgx.ConnConfig) (err error) {
			defer p.recoverHook(ctx, hookBeforeConnect, &err)
			return user(ctx, cc)
		}
	}
	// The user's runs last, on the same per-attempt copy, and so may still
	// override the host order and the connect timeout.
	cfg.BeforeConnect = func(ctx context.Context, cc *pgx.ConnConfig) error {
		if err := p.beforeConnect(ctx, cc); err != nil {
			return err
		}
		if p.userBeforeConnect != nil {
			return p.userBeforeConnect(ctx, cc)
		}
		return nil
	}

	p.userAfterConnect, cfg.AfterConnect = cfg.AfterConnect, nil
	if tracking || p.userAfterConnect != nil {
		cfg.AfterConnect = p.afterConnect
	}

	p.userPrepareConn, p.prepareConnHook = cfg.PrepareConn, hookPrepareConn
	if p.userPrepareConn == nil && cfg.BeforeAcquire != nil {
		beforeAcquire := cfg.BeforeAcquire
		p.userPrepareConn = func(ctx context.Context, conn *pgx.Conn) (bool, error) {
			return beforeAcquire(ctx, conn), nil
		}
		p.prepareConnHook = hookBeforeAcquire
	}
	cfg.BeforeAcquire, cfg.PrepareConn = nil, nil
	if tracking || p.userPrepareConn != nil {
		cfg.PrepareConn = p.prepareConn
	}

	if tracking {
		cfg.ShouldPing = chainShouldPing(cfg.ShouldPing)
	}

	p.userBeforeClose, cfg.BeforeClose = cfg.BeforeClose, nil
	if tracking || p.userBeforeClose != nil {
		cfg.BeforeClose = p.beforeClose
	}

	// AfterRelease is never set: pgxpool runs every release in a goroutine
	// of its own when it is. The release tracer is installed even without
	// tracking, for the runtime limits, which may be set at any time.
	cfg.ConnConfig.Tracer = withReleaseTracer(cfg.ConnConfig.Tracer, releaseTracer{p})
}

// beforeConnect takes a connect token, without any lock held, then places
// the connection. Without a connect_timeout of the user's, each host gets
// DefaultConnectTimeout: pgxpool runs connects under its own context, not
// the acquirer's, so a connect to a node that accepts TCP and never answers
// would otherwise hold a pool slot for pgxpool's 2 minutes, and with hosts
// listed pgconn moves on to the next host only when the timeout ends the
// attempt.
func (p *Pool) beforeConnect(ctx context.Context, cc *pgx.ConnConfig) error {
	if t := refillTicketOf(ctx); t != nil {
		t.start() // the refill's acquire may go: the connect goes on without it
	}
	if err := p.limits.admitConnect(ctx); err != nil {
		return err // before the budget: a refused connect costs no token
	}
	if p.config.ConnConfig.ConnectTimeout <= 0 {
		cc.ConnectTimeout = DefaultConnectTimeout
	}
	caller := !backgroundConnect(ctx)
	var yield func() bool
	if p.tracking() {
		yield = p.refillInstead
	}
	move, err := p.budget.take(ctx, caller, yield)
	if err != nil {
		return err
	}
	var started time.Time
	if p.tracking() {
		started = time.Now() // after the budget's wait: the dial starts now
	}
	place := p.placement.place(ctx, cc, time.Now(), caller, move)
	chainValidateConnect(cc, place, started, p.bindCancelDials(cc))
	return nil
}

// backgroundConnect reports whether no acquire waits for the connect ctx
// belongs to: it is a refill of the pool's own (refill), or one of pgxpool's
// MinConns top-ups, which run with pgxpool's 60-second timeout (see
// pgxpool.Config.MinConns). An acquire's connect runs under puddle's context,
// which has no deadline (the caller's own deadline only ends the wait).
func backgroundConnect(ctx context.Context) bool {
	if refillTicketOf(ctx) != nil {
		return true
	}
	_, ok := ctx.Deadline()
	return ok
}

// connectStartKey is where a new connection's CustomData holds the time its
// connect began, for the tracker's welcome.
const connectStartKey = "clusterpool.connectStart"

// chainValidateConnect sets cc.ValidateConnect, which pgconn calls with each
// connection it establishes (after authentication, before AfterConnect;
// once per host or fallback it reaches), to run in order:
//
//  1. place, placement's check (nil: none): a redial refuses a connection
//     on an over-target node; host placement learns the node behind the host;
//  2. the stamp of started (zero: none) on the connection;
//  3. the ValidateConnect already on cc (target_session_attrs');
//  4. established (nil: none), once the connection is accepted.
func chainValidateConnect(cc *pgx.ConnConfig, place pgconn.ValidateConnectFunc, started time.Time, established func()) {
	prev := cc.ValidateConnect
	cc.ValidateConnect = func(ctx context.Context, pgConn *pgconn.PgConn) error {
		if place != nil {
			if err := place(ctx, pgConn); err != nil {
				return err
			}
		}
		if !started.IsZero() {
			pgConn.CustomData()[connectStartKey] = started
		}
		if prev != nil {
			if err := prev(ctx, pgConn); err != nil {
				return err
			}
		}
		if established != nil {
			established()
		}
		return nil
	}
}

// connectStart returns the time chainValidateConnect left in conn, or zero.
func connectStart(conn *pgx.Conn) time.Time {
	started, _ := conn.PgConn().CustomData()[connectStartKey].(time.Time)
	return started
}

// afterConnect identifies the new connection's node and tracks it there,
// then runs the user's AfterConnect.
func (p *Pool) afterConnect(ctx context.Context, conn *pgx.Conn) error {
	// The connect's reservation (placement) counts the connection until
	// it is tracked on its node, or until it fails.
	id, addr, err := p.identify(ctx, conn)
	if err != nil {
		p.placement.counted(conn.PgConn(), 0)
		return err
	}
	var cs *connState
	if id != 0 {
		host := remoteAddr(conn.PgConn())
		if addr == "" && p.settings.multiHost {
			addr = host
		}
		// Counted on its node and no longer reserved in one step, as a
		// placement sees it: in between, a connect placed meanwhile would
		// count it twice and pick another host. No tracer runs under the
		// lock (a tracer may use the pool); welcome calls them after.
		now := time.Now()
		p.placement.placeMu.Lock()
		cs = p.tracker.countConn(id, addr, host, conn, now)
		p.placement.counted(conn.PgConn(), id)
		p.placement.placeMu.Unlock()
		p.tracker.welcome(cs, addr, connectStart(conn), now)
		p.startOnTracked()
		if err := p.learnLocality(ctx, conn, cs.node); err != nil {
			p.tracker.untrack(cs, false) // pgxpool closes conn without BeforeClose
			return err
		}
	} else {
		p.placement.counted(conn.PgConn(), 0)
	}
	if p.userAfterConnect != nil {
		if err := p.callAfterConnect(ctx, conn); err != nil {
			p.tracker.untrack(cs, false) // pgxpool closes conn without BeforeClose
			return err
		}
	}
	return nil
}

// prepareConn refuses connections to retire and connections on evicted
// nodes, then asks the user's hook. Hot path: a map read from the
// connection's own CustomData and a few atomic loads, no lock.
func (p *Pool) prepareConn(ctx context.Context, conn *pgx.Conn) (bool, error) {
	cs := connStateOf(conn)
	if p.sweeps.Load() != 0 && sweeping(ctx) {
		// A sweep takes the connection, not a caller. The sweep closes a
		// refused one before releasing it, so pgxpool destroys it and
		// starts its refill of MinConns at once (refused here, it would be
		// destroyed with no refill until the next health check period),
		// and puts the others back at once: neither the user's hook nor a
		// health check (connState.acquired) is to see an acquire.
		if cs != nil {
			cs.endPing()
		}
		return true, nil
	}
	if cs != nil && cs.refused() {
		return false, nil
	}
	if p.userPrepareConn != nil {
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

// chainShouldPing wraps pgxpool's ShouldPing decision (the user's hook, or
// pgxpool's default: ping a connection idle for over a second) so that a
// connection about to be pinged is marked: if the ping fails, the connection
// is closed while still marked and its node is checked (see
// connState.pinging). Without this, an acquire whose ping hangs on a
// partitioned node ends in the caller's deadline with no node named.
func chainShouldPing(user func(context.Context, pgxpool.ShouldPingParams) bool) func(context.Context, pgxpool.ShouldPingParams) bool {
	if user == nil {
		// pgxpool's default, inline: this runs on every acquire.
		return func(_ context.Context, params pgxpool.ShouldPingParams) bool {
			if params.IdleDuration <= time.Second {
				return false
			}
			markPinging(params.Conn)
			return true
		}
	}
	return func(ctx context.Context, params pgxpool.ShouldPingParams) bool {
		if !user(ctx, params) {
			return false
		}
		markPinging(params.Conn)
		return true
	}
}

// markPinging marks conn as about to be pinged at acquire.
func markPinging(conn *pgx.Conn) {
	if cs := connStateOf(conn); cs != nil {
		cs.pinging.Store(true)
	}
}

// beforeClose runs the user's BeforeClose, then forgets the connection,
// whatever the user's hook did: pgxpool closes the connection next.
func (p *Pool) beforeClose(conn *pgx.Conn) {
	// Already closed, pgconn found the connection broken; otherwise the
	// pool is closing a working one. Read before the user's hook runs.
	broken := conn.PgConn().IsClosed()
	cs := connStateOf(conn)
	defer func() {
		p.tracker.untrack(cs, broken)
		if cs != nil {
			p.keep() // the pool may now hold fewer than it should
		}
	}()
	if p.userBeforeClose != nil {
		p.callBeforeClose(conn)
	}
}

// releaseTracer learns of every Release synchronously, with the *pgx.Conn,
// without pgxpool's AfterRelease goroutine. It has to be a pgx.QueryTracer to
// sit in ConnConfig.Tracer; its query methods do nothing.
type releaseTracer struct{ p *Pool }

func (releaseTracer) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}

func (releaseTracer) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (rt releaseTracer) TraceRelease(_ *pgxpool.Pool, data pgxpool.TraceReleaseData) {
	// Hot path: the checks inline, a call only for what is rare.
	if cs := connStateOf(data.Conn); cs != nil {
		cs.released()
		if data.Conn.IsClosed() || cs.retire.Load() || cs.node.evicted.Load() {
			rt.releasedClosing(cs, data.Conn)
		}
	}
	if l := rt.p.limits; l != nil {
		if l.active.Load() {
			l.released(data.Conn)
		} else if l.roomWaiting.Load() != 0 {
			l.wakeRoom() // an acquirer refused a connect for want of a token (errNoToken)
		}
	}
}

// releasedClosing sees to a tracked connection released as it goes away
// (broken, retired, or on an evicted node): one still open is closed now,
// so pgxpool destroys it on this release, and the pool refills in the
// background.
func (rt releaseTracer) releasedClosing(cs *connState, conn *pgx.Conn) {
	broken := conn.IsClosed() // pgxpool destroys it on this release
	if !broken {
		// Back in the pool, it would be refused at a caller's acquire,
		// which would then wait for a connect of its own.
		closeQuietly(conn)
	}
	// Forgotten and refilled before the destroy frees the connection's
	// place in the pool, so the refill is first in line for it: the
	// caller that released it (a retry, say) would otherwise take the
	// place and wait for the connect itself.
	rt.p.tracker.untrack(cs, broken)
	rt.p.keep()
}

// withReleaseTracer installs rt next to the user's tracer, which keeps every
// interface it implements (multitracer forwards each one), except that the
// acquires of the pool's own refills do not reach its AcquireTracer.
func withReleaseTracer(user pgx.QueryTracer, rt releaseTracer) pgx.QueryTracer {
	if user == nil {
		return rt
	}
	mt := multitracer.New(user)
	mt.PoolReleaseTracers = append(mt.PoolReleaseTracers, rt)
	for i, at := range mt.PoolAcquireTracers {
		mt.PoolAcquireTracers[i] = userAcquireTracer{p: rt.p, user: at}
	}
	return mt
}

// userAcquireTracer passes the user's AcquireTracer every acquire but a
// refill's (refill.go), which is not one of the user's.
type userAcquireTracer struct {
	p    *Pool
	user pgxpool.AcquireTracer
}

func (t userAcquireTracer) TraceAcquireStart(ctx context.Context, pool *pgxpool.Pool, data pgxpool.TraceAcquireStartData) context.Context {
	if t.p.sweeps.Load() != 0 && refillTicketOf(ctx) != nil {
		return ctx
	}
	return t.user.TraceAcquireStart(ctx, pool, data)
}

func (t userAcquireTracer) TraceAcquireEnd(ctx context.Context, pool *pgxpool.Pool, data pgxpool.TraceAcquireEndData) {
	if t.p.sweeps.Load() != 0 && refillTicketOf(ctx) != nil {
		return
	}
	t.user.TraceAcquireEnd(ctx, pool, data)
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

// recoverHook is deferred around each call of a hook of the caller's, to
// apply the hook-panic policy of the Pool documentation: it recovers a
// panic, reports it, and sets *err (when err is not nil) to an error naming
// the hook and the panic value. It costs nothing measurable when the hook
// returns.
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
