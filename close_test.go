package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/clusterpool/clusterpool/clustertest"
)

// Close under way: during load, during a probe, during a retry backoff, twice
// and from two goroutines at once. Each test takes a goroutine baseline once
// its cluster has started, so every goroutine the pool (or a proxy relay for
// one of its connections) starts must be gone after Close. The tests log how
// long Close took; they assert only that it returned before closeDeadline.

// closeDeadline is how long Close, and a call that Close interrupts, may take
// before the test fails: generous, because the machine may be loaded. A
// prompt Close takes milliseconds (the tests log it).
const closeDeadline = 15 * time.Second

// noLeaks waits up to condTimeout for every goroutine started since base (a
// goleak.IgnoreCurrent taken at the test's start) to exit, then fails the
// test with the stacks of those still running. goleak's own retries last
// about a second, too short when the machine is loaded and a proxy relay
// is still noticing that its client went away.
func noLeaks(t *testing.T, base goleak.Option) {
	t.Helper()
	deadline := time.Now().Add(condTimeout)
	for goleak.Find(base) != nil && time.Now().Before(deadline) {
		time.Sleep(condPoll)
	}
	goleak.VerifyNone(t, base)
}

// closeWithin closes p, fails the test if Close has not returned within
// closeDeadline, and returns how long it took.
func closeWithin(t *testing.T, p *Pool) time.Duration {
	t.Helper()
	return closeWithinDeadline(t, p, closeDeadline)
}

// waitGroupWithin waits up to closeDeadline for wg, and otherwise fails the
// test saying what is stuck, with every goroutine's stack.
func waitGroupWithin(t *testing.T, wg *sync.WaitGroup, what string) {
	t.Helper()
	finished := make(chan struct{})
	go func() {
		wg.Wait()
		close(finished)
	}()
	select {
	case <-finished:
	case <-time.After(closeDeadline):
		t.Fatalf("%s after %v; goroutines:\n%s", what, closeDeadline, allStacks())
	}
}

func closeWithinDeadline(t *testing.T, p *Pool, deadline time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	done := make(chan struct{})
	go func() {
		p.Close()
		close(done)
	}()
	select {
	case <-done:
		return time.Since(start)
	case <-time.After(deadline):
		t.Fatalf("Close has not returned after %v; goroutines:\n%s", deadline, allStacks())
		return 0
	}
}

// poolGoroutinesGone waits for the pool's goroutines (and pgxpool's) to
// exit. Close has waited for them, but a goroutine that has just called
// WaitGroup.Done still shows in a stack dump until it is scheduled again.
func poolGoroutinesGone(t *testing.T) {
	t.Helper()
	waitCond(t, func() string {
		if s := poolStacks(); s != "" {
			return "pool goroutines still running after Close:\n" + s
		}
		return ""
	})
}

// allStacks returns every goroutine's stack, to show where a Close hangs.
func allStacks() string {
	buf := make([]byte, 1<<22)
	return string(buf[:runtime.Stack(buf, true)])
}

// errClosedPool returns the error pgxpool gives for an acquire on a closed
// pool (puddle's ErrClosedPool), found by asking a closed pgxpool.Pool, so
// the tests match it with errors.Is without importing puddle.
func errClosedPool(t *testing.T) error {
	t.Helper()
	p, err := pgxpool.New(context.Background(), "postgres://u@127.0.0.1:1/db?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	p.Close()
	_, err = p.Acquire(context.Background())
	if err == nil {
		t.Fatal("Acquire on a closed pgxpool.Pool succeeded")
	}
	return err
}

// TestCloseDuringLoad closes the pool while many goroutines run every kind
// of call. Close waits for acquired connections, as pgxpool's does, so the
// load stops starting calls once Close starts; a call then gets its result or
// the closed-pool error, and never hangs.
func TestCloseDuringLoad(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	base := goleak.IgnoreCurrent()
	closedErr := errClosedPool(t)
	p := startPool(t, c.DSN(), func(cfg *Config) { cfg.MaxConns = 8 })
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	calls := []func(i int) error{
		func(int) error {
			_, err := p.Exec(ctx, "SELECT pg_sleep(0.005)")
			return err
		},
		func(int) error {
			rows, err := p.Query(ctx, "SELECT generate_series(1, 100)")
			if err != nil {
				return err
			}
			n := 0
			for rows.Next() {
				n++
			}
			if err := rows.Err(); err != nil {
				return err
			}
			if n != 100 {
				return fmt.Errorf("Query: %d rows, want 100", n)
			}
			return nil
		},
		func(i int) error {
			var got int
			if err := p.QueryRow(ctx, "SELECT $1::int + 1", i).Scan(&got); err != nil {
				return err
			}
			if got != i+1 {
				return fmt.Errorf("QueryRow: %d, want %d", got, i+1)
			}
			return nil
		},
		func(int) error {
			b := &pgx.Batch{}
			b.Queue("SELECT 1")
			b.Queue("SELECT pg_sleep(0.002)")
			b.Queue("SELECT 3")
			br := p.SendBatch(ctx, b)
			for range b.Len() {
				if _, err := br.Exec(); err != nil {
					br.Close()
					return err
				}
			}
			return br.Close()
		},
		func(i int) error {
			return p.BeginFunc(ctx, func(tx pgx.Tx) error {
				if _, err := tx.Exec(ctx, "SET LOCAL statement_timeout = '10s'"); err != nil {
					return err
				}
				var got int
				return tx.QueryRow(ctx, "SELECT $1::int", i).Scan(&got)
			})
		},
	}

	var (
		stopping atomic.Bool
		done     atomic.Int64
		wg       sync.WaitGroup
		mu       sync.Mutex
		results  = map[string]int{}
	)
	for w := range 16 {
		wg.Go(func() {
			for i := w; !stopping.Load(); i++ {
				err := calls[i%len(calls)](i)
				stopped := stopping.Load()
				switch {
				case err == nil:
					done.Add(1)
				case stopped && errors.Is(err, closedErr):
					mu.Lock()
					results["closed pool"]++
					mu.Unlock()
				default:
					mu.Lock()
					results[err.Error()]++
					mu.Unlock()
					if !stopped {
						t.Errorf("call %d failed before Close: %v", i%len(calls), err)
					}
				}
			}
		})
	}
	waitCond(t, func() string {
		if n := done.Load(); n < 200 {
			return fmt.Sprintf("%d calls done", n)
		}
		return ""
	})
	inUse := p.Stat().AcquiredConns()

	stopping.Store(true)
	took := closeWithin(t, p)
	waitGroupWithin(t, &wg, "callers still running after Close returned")
	t.Logf("Close during load (%d connections in use, %d calls done): %v; errors after Close: %v", inUse, done.Load(), took, results)
	for msg := range results {
		if msg != "closed pool" {
			t.Errorf("a call failed with %q, want its result or the closed-pool error", msg)
		}
	}
	noLeaks(t, base)
}

// TestCloseDuringProbe closes the pool while the probe is in the user's
// BeforeConnect, which the probe calls with its own context: Close must end
// that context, and the probe goroutine must be gone when Close returns.
func TestCloseDuringProbe(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	base := goleak.IgnoreCurrent()
	var armed atomic.Bool
	inProbe := make(chan struct{}, 1)
	probeEnded := make(chan error, 1)
	p := startPool(t, c.DSN(), func(cfg *Config) {
		// The probe times out after min(ProbeInterval, 5 s): long enough
		// that it is still waiting when Close comes.
		cfg.ProbeInterval = 3 * time.Second
		// No connect of the pool's own once armed (no load, no MinConns),
		// so the connect that blocks is the probe's.
		cfg.MinConns = 0
		cfg.BeforeConnect = func(ctx context.Context, _ *pgx.ConnConfig) error {
			if !armed.Load() {
				return nil
			}
			select {
			case inProbe <- struct{}{}:
			default:
			}
			<-ctx.Done()
			select {
			case probeEnded <- ctx.Err():
			default:
			}
			return ctx.Err()
		}
	})
	ctx := testCtx(t)
	if _, err := p.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	armed.Store(true)
	select {
	case <-inProbe:
	case <-time.After(condTimeout):
		t.Fatalf("no probe reached BeforeConnect in %v", condTimeout)
	}

	took := closeWithin(t, p)
	t.Logf("Close during a probe: %v", took)
	select {
	case err := <-probeEnded:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("the probe's context ended with %v, want context.Canceled (ended by Close)", err)
		}
	default:
		t.Error("Close returned while the probe was still in BeforeConnect")
	}
	poolGoroutinesGone(t)
	noLeaks(t, base)
}

// TestCloseDuringPartitionedProbe closes the pool while the probe's
// connection waits on a partitioned node, which accepts it and never
// answers. It holds the probe to both halves of what probe.go promises,
// read from the probe's own context (which the probe hands to the user's
// BeforeConnect) rather than from how long anything took:
//
//   - left alone, a probe to a node that never answers ends by its
//     timeout: its context's deadline is at most the probe timeout after it
//     started, it ends with DeadlineExceeded, and the failure is counted;
//   - Close ends a probe in flight: its context ends with Canceled, not by
//     its deadline, and the failure is not counted against anything.
//
// The proxy holds the partitioned sockets until the cluster closes, so the
// pool's goroutines are checked after Close, and every goroutine after the
// cluster's Close.
func TestCloseDuringPartitionedProbe(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 1})
	base := goleak.IgnoreCurrent()
	// The probe times out after min(ProbeInterval, 5 s).
	const probeTimeout = 3 * time.Second
	type probeStart struct {
		ctx context.Context
		at  time.Time
	}
	var armed atomic.Bool
	probes := make(chan probeStart, 8)
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.ProbeInterval = probeTimeout
		// No connect of the pool's own once armed (no load, no MinConns),
		// so the connects BeforeConnect sees are the probe's.
		cfg.MinConns = 0
		cfg.BeforeConnect = func(ctx context.Context, _ *pgx.ConnConfig) error {
			if armed.Load() {
				select {
				case probes <- probeStart{ctx, time.Now()}:
				default:
				}
			}
			return nil
		}
	})
	ctx := testCtx(t)
	if _, err := p.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	n := c.Node(1)
	n.Partition()
	nextProbe := func() probeStart {
		t.Helper()
		select {
		case ps := <-probes:
			return ps
		case <-time.After(condTimeout):
			t.Fatalf("no probe started in %v", condTimeout)
			return probeStart{}
		}
	}
	failures := p.ClusterStat().ProbeFailures()
	armed.Store(true)

	// A probe left alone ends by its own timeout.
	first := nextProbe()
	deadline, ok := first.ctx.Deadline()
	if !ok || deadline.Sub(first.at) > probeTimeout {
		t.Fatalf("the probe's context has deadline %v (set: %v), want at most %v after it started", deadline.Sub(first.at), ok, probeTimeout)
	}
	select {
	case <-first.ctx.Done():
	case <-time.After(condTimeout):
		t.Fatalf("a probe to a partitioned node still running %v after it started", condTimeout)
	}
	if err := first.ctx.Err(); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("the first probe's context ended with %v, want its deadline", err)
	}
	waitCond(t, func() string {
		if got := p.ClusterStat().ProbeFailures(); got == failures {
			return fmt.Sprintf("ProbeFailures still %d after a probe timed out", got)
		}
		return ""
	})

	// The next probe: once its connection has reached the node, it waits
	// there, and Close must end it.
	accepted := n.TotalConns()
	second := nextProbe()
	waitCond(t, func() string {
		if n.TotalConns() == accepted {
			return "no probe connection reached the partitioned node"
		}
		return ""
	})
	failures = p.ClusterStat().ProbeFailures()
	took := closeWithin(t, p)
	t.Logf("Close during a probe to a partitioned node: %v", took)
	if err := second.ctx.Err(); !errors.Is(err, context.Canceled) {
		t.Errorf("after Close the probe's context ended with %v, want context.Canceled (ended by Close, not by its timeout)", err)
	}
	if got := p.ClusterStat().ProbeFailures(); got != failures {
		t.Errorf("ProbeFailures went from %d to %d: the probe Close ended counted as a failure", failures, got)
	}
	poolGoroutinesGone(t)
	if err := c.Close(); err != nil {
		t.Error(err)
	}
	noLeaks(t, base)
}

// TestCloseDuringHealthCheck closes the pool while a background health
// check pings an idle connection on a partitioned node: a call cut by its
// caller's deadline asked for the check, and the ping waits for an answer
// that never comes. Close ends the check; pgx's background close of the cut
// connections (a CancelRequest on a new connection, then draining the old
// one, bounded only by a fixed 15 s deadline in PgConn.asyncClose) would
// hold pgxpool's Close that long on a node that holds both sockets, so the
// pool's Close ends those dials and sockets (canceldial.go).
func TestCloseDuringHealthCheck(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 1})
	base := goleak.IgnoreCurrent()
	p := startPool(t, c.DSN(), func(cfg *Config) { cfg.MaxConns, cfg.MinConns = 2, 2 })
	waitCond(t, func() string {
		if s := p.Stat(); s.IdleConns() < 2 {
			return fmt.Sprintf("%d idle connections, want 2", s.IdleConns())
		}
		return ""
	})
	c.Node(1).Partition()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := p.Exec(ctx, "SELECT 1"); err == nil {
		t.Fatal("a call on a partitioned node succeeded")
	}
	// The call's connection is gone; the one left is acquired by nobody
	// but the check's ping.
	waitCond(t, func() string {
		if n := p.Stat().AcquiredConns(); n != 1 {
			return fmt.Sprintf("%d connections acquired, want the health check's ping on 1", n)
		}
		return ""
	})

	// 10 s: generous, and still short of pgx's 15 s, so the test fails if
	// Close waits for pgx's cleanup.
	took := closeWithinDeadline(t, p, 10*time.Second)
	t.Logf("Close during a health check of a partitioned node: %v", took)
	poolGoroutinesGone(t)
	if err := c.Close(); err != nil {
		t.Error(err)
	}
	noLeaks(t, base)
}

// retrySignal passes on each retry's backoff, for a test to act while the
// call sleeps.
type retrySignal chan time.Duration

func (s retrySignal) TraceRetry(_ context.Context, _ *Pool, data TraceRetryData) {
	select {
	case s <- data.Delay:
	default:
	}
}

func (retrySignal) TraceRetryEnd(context.Context, *Pool, TraceRetryEndData) {}

// TestCloseDuringRetryBackoff closes the pool while a call sleeps between
// attempts at a statement that fails with 40001 every time: the sleep wakes,
// the next attempt meets the closed pool, and the call returns at once.
func TestCloseDuringRetryBackoff(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	base := goleak.IgnoreCurrent()
	closedErr := errClosedPool(t)
	retries := make(retrySignal, 1)
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MaxRetries = 1000
		cfg.Tracer = retries
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	result := make(chan error, 1)
	go func() {
		_, err := p.Exec(ctx, `DO $$ BEGIN RAISE EXCEPTION 'always' USING ERRCODE = '40001'; END $$`)
		result <- err
	}()
	// Backoffs double from 25 ms to at most 1 s: wait for a long one, so
	// the call is certainly asleep when Close comes.
	var delay time.Duration
	deadline := time.After(condTimeout)
	for delay < 300*time.Millisecond {
		select {
		case delay = <-retries:
		case err := <-result:
			t.Fatalf("the call returned before Close: %v", err)
		case <-deadline:
			t.Fatalf("no retry backed off 300 ms or more in %v (last %v)", condTimeout, delay)
		}
	}

	start := time.Now()
	took := closeWithin(t, p)
	var err error
	select {
	case err = <-result:
	case <-time.After(closeDeadline):
		t.Fatalf("the call backing off has not returned %v after Close", closeDeadline)
	}
	t.Logf("Close during a %v backoff: %v; the call returned %v after Close began", delay, took, time.Since(start))
	if !errors.Is(err, closedErr) {
		t.Errorf("the call returned %v, want the closed-pool error", err)
	}
	var re *RetryError
	if !errors.As(err, &re) {
		t.Errorf("the call returned %T, want a *RetryError", err)
	}
	noLeaks(t, base)
}

// TestCloseTwiceAndConcurrently closes a pool with open connections from two
// goroutines at once, then again: every Close returns and nothing is left.
func TestCloseTwiceAndConcurrently(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 3})
	base := goleak.IgnoreCurrent()
	p := startPool(t, c.DSN(), func(cfg *Config) { cfg.MaxConns, cfg.MinConns = 4, 4 })
	ctx := testCtx(t)
	if _, err := p.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	waitCond(t, func() string {
		if n := p.Stat().TotalConns(); n < 4 {
			return fmt.Sprintf("%d connections, want 4", n)
		}
		return ""
	})

	var took [2]time.Duration
	var wg sync.WaitGroup
	for i := range took {
		wg.Go(func() {
			start := time.Now()
			p.Close()
			took[i] = time.Since(start)
		})
	}
	waitGroupWithin(t, &wg, "concurrent Close calls have not returned")
	again := closeWithin(t, p)
	t.Logf("Close from two goroutines: %v and %v; again: %v", took[0], took[1], again)
	if err := p.Ping(ctx); err == nil {
		t.Error("Ping on a closed pool succeeded")
	}
	noLeaks(t, base)
}
