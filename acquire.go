package clusterpool

// Acquiring under runtime limits: the pool size (SetMaxConns), the acquire
// timeout and workload limits bound what an acquire may take; connections
// above the size are closed as they come back.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// acquireConn is how every method of the pool gets a connection. Without
// limits it is pgxpool's Acquire, plus another try when a full node
// refused the connect (53300).
func (p *Pool) acquireConn(ctx context.Context) (*pgxpool.Conn, error) {
	if p.limits.on() {
		return p.limits.acquire(ctx)
	}
	c, err := p.pool.Acquire(ctx)
	if err != nil {
		return p.acquireFailed(ctx, err)
	}
	return c, nil
}

// acquireFailed is acquireConn's path after pgxpool's Acquire failed
// without limits: a connect refused by a full node, or for the cap, is
// tried again within the limits' loop; any other error is returned.
func (p *Pool) acquireFailed(ctx context.Context, err error) (*pgxpool.Conn, error) {
	// errNoRoom: a limit was set while this acquire was under way.
	if ownRefusal(err) {
		if ctx.Err() != nil {
			// The caller's context ended just as the pool refused the
			// connect: the caller sees its own context's error, as with
			// pgxpool, never the pool's internal refusal.
			return nil, ctx.Err()
		}
		return p.limits.acquire(ctx)
	}
	if isTooManyConns(err) && ctx.Err() == nil {
		return p.limits.acquire(ctx)
	}
	return nil, err
}

// ownRefusal reports whether err is one of the pool's own refusals of a
// connect in BeforeConnect, which callers never see: they wait instead.
func ownRefusal(err error) bool {
	return errors.Is(err, errNoRoom) || errors.Is(err, errNodeAtCap) || errors.Is(err, errNoToken)
}

// acquire gets a connection within the limits: a slot of the call's
// workload, then a connection within the pool's size, all within
// AcquireTimeout.
func (l *limits) acquire(ctx context.Context) (*pgxpool.Conn, error) {
	actx := context.WithValue(ctx, acquiringKey{}, l)
	timeout := time.Duration(l.acquireTimeout.Load())
	if timeout > 0 {
		var cancel context.CancelFunc
		actx, cancel = context.WithTimeout(actx, timeout)
		defer cancel()
	}
	var w *workload
	if name := workloadFrom(ctx); name != "" {
		w = (*l.workloads.Load())[name]
	}
	if w != nil {
		start := time.Now()
		waited, err := w.acquire(actx)
		if waited {
			l.p.obs.workloadWaited(ctx, w.name, time.Since(start), err)
		}
		if err != nil {
			return nil, l.acquireError(ctx, actx, err, timeout, w)
		}
	}
	c, err := l.acquireConn(actx)
	if err != nil {
		if w != nil {
			w.release()
		}
		return nil, l.acquireError(ctx, actx, err, timeout, nil)
	}
	if w != nil {
		c.Conn().PgConn().CustomData()[workloadDataKey] = w
	}
	return c, nil
}

// acquireConn is pgxpool's Acquire, waiting while the pool is at its
// runtime size and trying again after a full node's refusal.
func (l *limits) acquireConn(ctx context.Context) (*pgxpool.Conn, error) {
	wait := minRoomWait
	refused := 0
	for try := 0; ; try++ {
		if try > 0 && !l.roomNow() {
			// Still no idle connection and no room: wait again rather
			// than have pgxpool start a connect only to see it refused.
			if err := l.waitRoom(ctx, wait); err != nil {
				return nil, err
			}
			wait = min(2*wait, maxRoomWait)
			continue
		}
		c, err := l.p.pool.Acquire(ctx)
		switch {
		case err == nil:
			return c, nil
		case ctx.Err() != nil && ownRefusal(err):
			return nil, ctx.Err()
		case ctx.Err() != nil:
			return nil, err
		case ownRefusal(err):
		case isTooManyConns(err) && refused < maxFullRetries:
			refused++
			l.p.noteTooMany(err)
		default:
			return nil, err
		}
		if err := l.waitRoom(ctx, wait); err != nil {
			return nil, err
		}
		wait = min(2*wait, maxRoomWait)
	}
}

// roomNow reports whether an acquire may succeed now: an idle connection,
// or room for a new one.
func (l *limits) roomNow() bool {
	st := l.p.pool.Stat()
	return st.IdleConns() > 0 || int(st.TotalConns()) < l.effectiveMax(time.Now())
}

// acquireError is the caller's error for err, which ended an acquire
// under actx: AcquireTimeout's own expiry becomes ErrPoolExhausted or
// ErrPoolConnecting; anything else is returned as it is.
func (l *limits) acquireError(ctx, actx context.Context, err error, timeout time.Duration, w *workload) error {
	if timeout <= 0 || ctx.Err() != nil || !errors.Is(actx.Err(), context.DeadlineExceeded) {
		return err
	}
	l.timeouts.Add(1)
	if w != nil {
		return fmt.Errorf("clusterpool: no connection within cluster_acquire_timeout (%v): workload %q holds its limit of %d: %w", timeout, w.name, w.currentLimit(), ErrPoolExhausted)
	}
	// Still being opened: connects under way while the pool has fewer
	// connections open than it may hold.
	st := l.p.pool.Stat()
	if open := st.TotalConns() - st.ConstructingConns(); st.ConstructingConns() > 0 && int(open) < l.effectiveMax(time.Now()) {
		return fmt.Errorf("clusterpool: no connection within cluster_acquire_timeout (%v): %d connections still being opened: %w", timeout, st.ConstructingConns(), ErrPoolConnecting)
	}
	return fmt.Errorf("clusterpool: no connection within cluster_acquire_timeout (%v): all %d connections in use: %w", timeout, st.AcquiredConns(), ErrPoolExhausted)
}

// waitRoom waits until a connection comes back (or d passes, or ctx ends).
func (l *limits) waitRoom(ctx context.Context, d time.Duration) error {
	ch := make(chan struct{}, 1)
	l.roomWaiting.Add(1)
	defer l.roomWaiting.Add(-1)
	l.roomMu.Lock()
	l.room = append(l.room, ch)
	l.roomMu.Unlock()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
		return nil
	case <-t.C:
	case <-ctx.Done():
	case <-l.p.bgCtx.Done(): // closing: pgxpool's next Acquire says so
	}
	l.roomMu.Lock()
	i := slices.Index(l.room, ch)
	if i >= 0 {
		l.room = slices.Delete(l.room, i, i+1)
	}
	l.roomMu.Unlock()
	if i < 0 {
		l.wakeRoom() // woken meanwhile: pass it on
	}
	return ctx.Err()
}

// wakeRoom wakes the longest waiting caller, if any.
func (l *limits) wakeRoom() {
	if l.roomWaiting.Load() == 0 {
		return
	}
	l.roomMu.Lock()
	defer l.roomMu.Unlock()
	if len(l.room) > 0 {
		l.room[0] <- struct{}{}
		l.room = l.room[1:]
	}
}

func (l *limits) wakeAllRoom() {
	l.roomMu.Lock()
	defer l.roomMu.Unlock()
	for _, ch := range l.room {
		ch <- struct{}{}
	}
	l.room = nil
}

// released is the release tracer's part under limits: the connection's
// workload slot is freed, it is closed (so that pgxpool destroys it) if the
// pool is above its size or the connection is retiring, and a waiting
// caller is woken.
func (l *limits) released(conn *pgx.Conn) {
	cd := conn.PgConn().CustomData()
	if w, ok := cd[workloadDataKey].(*workload); ok {
		delete(cd, workloadDataKey)
		w.release()
	}
	retiring := false
	if cs := connStateOf(conn); cs != nil && cs.retire.Load() {
		retiring = true
	}
	if retiring || l.takeExcess() {
		closeNow(conn)
	}
	l.wakeRoom()
}

// takeExcess takes one of the connections to close at release, if any.
func (l *limits) takeExcess() bool {
	for {
		n := l.excess.Load()
		if n <= 0 {
			return false
		}
		if l.excess.CompareAndSwap(n, n-1) {
			return true
		}
	}
}

// closeNow closes conn without a Terminate message (a done context), so
// that pgxpool destroys it on release; nothing is waited for.
func closeNow(conn *pgx.Conn) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_ = conn.Close(ctx)
}
