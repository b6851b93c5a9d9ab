package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// acquireCounter is a user tracer that counts the acquires it sees.
type acquireCounter struct{ starts atomic.Int64 }

func (a *acquireCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceQueryStartData) context.Context {
	return ctx
}
func (a *acquireCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}
func (a *acquireCounter) TraceAcquireStart(ctx context.Context, _ *pgxpool.Pool, _ pgxpool.TraceAcquireStartData) context.Context {
	a.starts.Add(1)
	return ctx
}
func (a *acquireCounter) TraceAcquireEnd(context.Context, *pgxpool.Pool, pgxpool.TraceAcquireEndData) {
}

// refilledTo waits until the pool holds want connections, none of them
// being opened, and the servers count as many.
func refilledTo(t *testing.T, c *clustertest.Cluster, p *Pool, want int32) {
	t.Helper()
	waitCond(t, func() string {
		st := p.Stat()
		open := 0
		for _, n := range c.OpenConns() {
			open += n
		}
		if st.TotalConns() != want || st.ConstructingConns() != 0 || open != int(want) {
			return fmt.Sprintf("pool %d (%d opening), servers %d; want %d", st.TotalConns(), st.ConstructingConns(), open, want)
		}
		return ""
	})
}

// Connections the pool loses without pgxpool's health check noticing come
// back at once, in the background, not a HealthCheckPeriod later: Reset
// destroys the idle connections and triggers no check, as a connection
// PrepareConn refuses, a failed acquire-time ping or a failed top-up do
// not. No caller acquires meanwhile, and the user's AcquireTracer sees no
// acquire of the refill's.
func TestRefillAfterReset(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 3, InProcess: true})
	tracer := &acquireCounter{}
	p := startPool(t, c.DSN(), func(cfg *Config) {
		balancedConfig(6, 6)(cfg)
		cfg.HealthCheckPeriod = time.Hour
		cfg.ConnConfig.Tracer = tracer
	})
	refilledTo(t, c, p, 6)
	opened := p.Stat().NewConnsCount()
	p.Reset()
	// Reset destroys the idle connections at once, and one that is in use
	// when it is put back, as pgxpool does. The balance round and the probe
	// take every idle connection out for a moment (sweepIdle): a Reset then
	// takes effect at their release, so the pool may still hold its six old
	// ones just after Reset. Wait for six new ones: pgxpool's own top-up
	// would come only at the health check, an hour away.
	waitCond(t, func() string {
		if n := p.Stat().NewConnsCount() - opened; n < 6 {
			return fmt.Sprintf("%d connections opened after Reset, want at least 6", n)
		}
		return ""
	})
	refilledTo(t, c, p, 6)
	if n := tracer.starts.Load(); n != 0 {
		t.Errorf("the user's AcquireTracer saw %d acquires; the refill's are not the user's", n)
	}
}

// A connection retired while in use (a balance move, an eviction) is
// closed when its caller releases it, and replaced in the background: the
// next caller finds a connection ready and opens none itself. Before, it
// went back to the pool and was refused at the next acquire, whose caller
// then waited for a connect of its own (and pgxpool's health check did not
// notice the loss).
func TestRefillRetiredOnRelease(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true})
	p := startPool(t, c.DSN(), func(cfg *Config) {
		balancedConfig(4, 4)(cfg)
		cfg.HealthCheckPeriod = time.Hour
		cfg.BalanceInterval = time.Hour // no round moves anything here
	})
	refilledTo(t, c, p, 4)
	ctx := testCtx(t)
	var held []*pgxpool.Conn
	for range 4 {
		conn, err := p.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, conn)
	}
	for _, conn := range held {
		connStateOf(conn.Conn()).retire.Store(true)
	}
	opened := p.Stat().NewConnsCount()
	for _, conn := range held {
		conn.Release()
	}
	waitCond(t, func() string {
		if n := p.Stat().NewConnsCount() - opened; n < 4 {
			return fmt.Sprintf("%d connections opened to replace 4 retired", n)
		}
		return ""
	})
	refilledTo(t, c, p, 4)
	if n := p.Stat().NewConnsCount() - opened; n != 4 {
		t.Fatalf("%d connections opened to replace 4 retired, want 4", n)
	}
	before := p.Stat().NewConnsCount()
	for range 4 {
		conn, err := p.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if connStateOf(conn.Conn()).retire.Load() {
			t.Error("a retired connection was handed out")
		}
		defer conn.Release()
	}
	if n := p.Stat().NewConnsCount() - before; n != 0 {
		t.Errorf("callers opened %d connections after the refill", n)
	}
}

// The connect wait is split: a background refill that waits for the rate
// limit counts in ConnectWaitDuration only, a caller's connect in
// CallerConnectWaitDuration too.
//
// A connect waits only if it finds the bucket empty, and the bucket
// refills with time: however slowly the machine runs, a round (empty the
// bucket, close the connections, open them again) waits at least once
// unless that round took as long as the tokens it needs take to come
// back. Each round is checked, and rounds go on until one has waited.
func TestCallerConnectWait(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 2, InProcess: true})
	kept := startPool(t, c.DSN(), func(cfg *Config) {
		balancedConfig(3, 3)(cfg)
		cfg.HealthCheckPeriod = time.Hour
		cfg.ConnectRate = 5 // burst 5
	})
	// The pool's own refills after Reset wait for their tokens in the
	// background.
	waitCond(t, func() string {
		if st := kept.Stat(); st.TotalConns() != 3 || st.ConstructingConns() != 0 {
			return fmt.Sprintf("pool %d (%d opening)", st.TotalConns(), st.ConstructingConns())
		}
		if kept.ClusterStat().ConnectWaitDuration() > 0 {
			return ""
		}
		emptyBucket(kept.budget.limiter)
		kept.Reset()
		return "no refill waited yet"
	})
	if st := kept.ClusterStat(); st.CallerConnectWaitDuration() != 0 {
		t.Errorf("after a background refill: callers' wait %v, want none (total %v)", st.CallerConnectWaitDuration(), st.ConnectWaitDuration())
	}

	// Callers that open connections themselves, the bucket empty.
	p := startPool(t, c.DSN(), func(cfg *Config) {
		balancedConfig(0, 3)(cfg)
		cfg.ConnectRate = 4 // burst 4
	})
	ctx := testCtx(t)
	acquire3 := func() {
		var held []*pgxpool.Conn
		for range 3 {
			conn, err := p.Acquire(ctx)
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, conn)
		}
		for _, conn := range held {
			conn.Release()
		}
	}
	waitCond(t, func() string {
		emptyBucket(p.budget.limiter)
		p.Reset()
		acquire3()
		st := p.ClusterStat()
		if st.CallerConnectWaitDuration() != st.ConnectWaitDuration() {
			t.Fatalf("callers' connects only: callers' wait %v, total %v; want the same", st.CallerConnectWaitDuration(), st.ConnectWaitDuration())
		}
		if st.CallerConnectWaitDuration() <= 0 {
			return "no caller's connect waited yet"
		}
		return ""
	})
}

// A caller's connect that finds no token while the pool is below MinConns
// does not wait for the limiter: the pool refills that connection in the
// background anyway, so the connect is refused (errNoToken) and its
// acquirer waits for a connection to come back instead. With nothing to
// refill (MinConns 0) the caller's connect waits for the limiter as
// before. No server is needed: the hook only decides.
func TestCallerYieldsToRefill(t *testing.T) {
	for _, tc := range []struct {
		minConns int32
		want     error
	}{
		{3, errNoToken},
		{0, nil}, // the limiter's wait
	} {
		p := startPool(t, "postgres://u@127.0.0.1:1/db?sslmode=disable", func(cfg *Config) {
			cfg.MinConns, cfg.MaxConns = tc.minConns, 3
			cfg.ConnectRate = 1 / (1000 * time.Hour).Seconds()
		})
		// The burst spent, whatever the pool's first connects to MinConns
		// took before (they fail: nothing listens). However many of them
		// are still under way (at most MaxConns), the hook takes one for
		// the caller's own connect, and the pool counts at most
		// MaxConns-1 = MinConns-1 connections open or opening: below
		// MinConns whatever the timing.
		emptyBucket(p.budget.limiter)
		cfg := p.PgxPool().Config()
		// An acquire's connect: puddle's context has no deadline. The
		// limiter's wait ends when it is cancelled.
		ctx, cancel := context.WithCancel(context.Background())
		stop := time.AfterFunc(50*time.Millisecond, cancel)
		err := cfg.BeforeConnect(ctx, cfg.ConnConfig.Copy())
		stop.Stop()
		cancel()
		switch {
		case tc.want != nil && !errors.Is(err, tc.want):
			t.Errorf("MinConns %d: %v, want %v", tc.minConns, err, tc.want)
		case tc.want == nil && !errors.Is(err, context.Canceled):
			t.Errorf("MinConns %d: %v, want the limiter's wait, cancelled", tc.minConns, err)
		}
		// The acquirer waits for a connection rather than fail with it.
		actx, acancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		_, err = p.Acquire(actx)
		acancel()
		if errors.Is(err, errNoToken) {
			t.Errorf("MinConns %d: Acquire returned %v", tc.minConns, err)
		}
	}
}

// cancelAtAcquireEnd is a user tracer that ends the acquirer's context as
// pgxpool's Acquire returns an error: the caller's deadline falling just
// after the pool refused a connect in its own BeforeConnect.
type cancelAtAcquireEnd struct{ acquireCounter }

type cancelKey struct{}

func (*cancelAtAcquireEnd) TraceAcquireEnd(ctx context.Context, _ *pgxpool.Pool, d pgxpool.TraceAcquireEndData) {
	if cancel, ok := ctx.Value(cancelKey{}).(context.CancelFunc); ok && d.Err != nil {
		cancel()
	}
}

// TestOwnRefusalNeverReturned: when the caller's context ends just as the
// pool refused a connect for want of a token (errNoToken), the caller
// gets its context's error, as with pgxpool, with and without runtime
// limits. Seen once in CI as "unexpected error: clusterpool: no connect
// token now..." from a caller whose 0-30 ms deadline fell there.
func TestOwnRefusalNeverReturned(t *testing.T) {
	for _, limited := range []bool{false, true} {
		var dials atomic.Int64
		p := startPool(t, "postgres://u@127.0.0.1:1/db?sslmode=disable", func(cfg *Config) {
			cfg.MinConns, cfg.MaxConns = 2, 3
			cfg.ConnectRate = 1 / (1000 * time.Hour).Seconds()
			cfg.ConnConfig.Tracer = &cancelAtAcquireEnd{}
			// No balance round, probe or health check to start connects.
			cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
			cfg.HealthCheckPeriod = time.Hour
			dial := cfg.ConnConfig.DialFunc
			cfg.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
				dials.Add(1)
				return dial(ctx, network, addr)
			}
		})
		// The refusal is for a caller that finds the pool below MinConns
		// before its refills have started. Once started, they wait for
		// tokens that never come here, in the pool's slots, and count
		// towards MinConns: the caller's connect then rightly waits for
		// the limiter, and only the refusal cancels ctx. So the keeper is
		// held off (as if one were running), before anything asked it,
		// and pgxpool's first connects to MinConns have ended: each
		// either dialled (and was refused) or found no token before its
		// one-minute deadline.
		p.keeper.running.Store(true)
		waitCond(t, func() string {
			started := dials.Load() + p.ClusterStat().ThrottledConnects()
			if n := p.PgxPool().Stat().ConstructingConns(); started < 2 || n > 0 {
				return fmt.Sprintf("%d of pgxpool's 2 first connects started, %d under way", started, n)
			}
			return ""
		})
		if limited {
			p.SetAcquireTimeout(time.Hour)
		}
		emptyBucket(p.budget.limiter)
		// A deadline far off, so that a connect that waits for the
		// limiter after all fails the test rather than hanging it.
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		ctx = context.WithValue(ctx, cancelKey{}, cancel)
		_, err := p.Acquire(ctx)
		cancel()
		if !errors.Is(err, context.Canceled) || errors.Is(err, errNoToken) {
			t.Errorf("limits %v: Acquire returned %v, want context.Canceled", limited, err)
		}
	}
}
