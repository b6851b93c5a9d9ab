package clusterpool

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Refills: the pool's own connects, in the background.
//
// pgxpool tops the pool up to MinConns only from its health check: every
// HealthCheckPeriod (a minute by default), or 500 ms after a Release that
// destroyed a connection. A connection destroyed any other way (refused by
// PrepareConn, a failed acquire-time ping, a connect that failed during a
// top-up) leaves the pool short until the next period, and meanwhile the
// next Acquire that finds no idle connection opens one itself and waits for
// that connect. So the pool refills itself, at once: every connection that
// closes, and every balance round, asks the keeper (keep) whether the pool
// holds fewer than it should, and the keeper opens the difference in the
// background (refill).

// refillStartWait bounds how long a refill holds the idle connections it
// took aside while its acquires start their connects.
const refillStartWait = 100 * time.Millisecond

// A refill that started fewer connects than it wanted is tried again
// refillRetries times, refillRetry apart.
const (
	refillRetries = 3
	refillRetry   = 20 * time.Millisecond
)

// refillKey marks the context of a refill's acquire; the value is the
// *refillTicket of that acquire.
type refillKey struct{}

// refillTicket is closed (started) by BeforeConnect when the acquire it
// belongs to has started a connect.
type refillTicket struct {
	once    sync.Once
	started chan struct{}
}

func (t *refillTicket) start() { t.once.Do(func() { close(t.started) }) }

// refillTicketOf returns the ticket of the refill ctx belongs to, or nil.
func refillTicketOf(ctx context.Context) *refillTicket {
	t, _ := ctx.Value(refillKey{}).(*refillTicket)
	return t
}

// keeper is the state of the background refill (keep): one runs at a time.
type keeper struct {
	running atomic.Bool
	again   atomic.Bool // asked again while running: look once more
}

// keep asks for a background look at whether the pool holds fewer
// connections than it should, and refills it if so. It never blocks; while a
// look is under way, that one looks again when it ends.
func (p *Pool) keep() {
	p.keeper.again.Store(true)
	if !p.keeper.running.CompareAndSwap(false, true) {
		return
	}
	if !p.goBackgroundIfOpen(p.runKeep) {
		p.keeper.running.Store(false)
	}
}

// runKeep refills the pool until no one has asked again. A refill that
// could not start every connect it wanted (the pool still counted a
// connection that was closing) is tried again a few times, refillRetry
// apart; after that the next close or balance round asks again.
func (p *Pool) runKeep(ctx context.Context) {
	for {
		tries := 0
		for p.keeper.again.Swap(false) && ctx.Err() == nil {
			k := p.refillNeed(time.Now())
			if k <= 0 {
				tries = 0
				continue
			}
			if p.refill(ctx, k) < k && tries < refillRetries {
				tries++
				timer := time.NewTimer(refillRetry)
				select {
				case <-ctx.Done():
				case <-timer.C:
				}
				timer.Stop()
				p.keeper.again.Store(true)
			}
		}
		p.keeper.running.Store(false)
		// Asked between the last look and the store above: look again,
		// unless a new keeper has taken over.
		if ctx.Err() != nil || !p.keeper.again.Load() || !p.keeper.running.CompareAndSwap(false, true) {
			return
		}
	}
}

// refillNeed is how many connections the pool should open now: MinConns
// and MaxConns are the runtime ones when limits are in force (limits.go).
func (p *Pool) refillNeed(now time.Time) int {
	maxConns := int(p.config.MaxConns)
	if p.limits.on() {
		maxConns = p.limits.effectiveMax(now)
	}
	return refillCount(p.minConnsNow(now), maxConns, p.openConns(), int(p.pool.Stat().ConstructingConns()), p.budget.replacementsOwed(now))
}

// minConnsNow is MinConns, the runtime one when limits are in force.
func (p *Pool) minConnsNow(now time.Time) int {
	if p.limits.on() {
		return p.limits.effectiveMin(now)
	}
	return int(p.config.MinConns)
}

// refillInstead reports whether the pool, not counting a caller's connect
// that found no token (which counts as opening), holds fewer connections
// than MinConns: the keeper refills it in the background then, so the
// caller may wait for a connection released meanwhile instead of for the
// limiter. It asks the keeper to look.
func (p *Pool) refillInstead() bool {
	minConns := p.minConnsNow(time.Now())
	if p.openConns()+max(int(p.pool.Stat().ConstructingConns())-1, 0) >= minConns {
		return false
	}
	p.keep()
	return true
}

// refillCount is how many connections to open for a pool that holds open
// connections (not counting those closing) and has opening more under way:
// enough for minConns, and at least one for each balance move whose
// replacement no connect has started yet (replacements owed), so a move
// never shrinks a pool above MinConns; but never beyond maxConns: a move's
// replacement in a full pool waits for the connection it replaces to close.
func refillCount(minConns, maxConns, open, opening, prepaid int) int {
	return max(0, min(max(minConns-open-opening, prepaid), maxConns-open-opening))
}

// refill opens up to k connections in the background and returns how many
// connects it started; they join the pool as idle connections. Each goes
// through BeforeConnect (the connect budget, placement) like any connect of
// the pool, and nobody waits for it: a caller that needs a connection in the
// meantime gets the first one released, as when the pool is full, instead
// of opening its own.
//
// pgxpool opens a connection only for an Acquire that finds none idle, so a
// refill takes the idle connections aside (as a sweep does), asks pgxpool
// for k connections, and lets each Acquire go as soon as its connect has
// started: puddle finishes a connect whose acquire was cancelled and puts
// the connection in the pool idle. The idle connections are back after
// that, within refillStartWait. An acquire that finds no room in the pool
// (MaxConns) in that time starts nothing. Each one counts in pgxpool's
// Stat().CanceledAcquireCount.
func (p *Pool) refill(ctx context.Context, k int) int {
	if k <= 0 || ctx.Err() != nil {
		return 0
	}
	p.sweeps.Add(1)
	defer p.sweeps.Add(-1)
	ctx = context.WithValue(ctx, sweepKey{}, true)
	// Under runtime limits, admitted up to the runtime size, which
	// refillNeed has kept to.
	ctx = context.WithValue(ctx, acquiringKey{}, p.limits)
	var idle []*pgxpool.Conn
	if st := p.pool.Stat(); st.IdleConns() > 0 {
		// Idle connections are taken aside only for connects that have
		// room; with none idle, an acquire may wait for a connection
		// that is closing to leave.
		if k = min(k, int(st.MaxConns()-st.TotalConns())); k <= 0 {
			return 0
		}
		idle = p.pool.AcquireAllIdle(ctx)
	}
	type attempt struct {
		ticket *refillTicket
		done   chan struct{}
		cancel context.CancelFunc
	}
	attempts := make([]attempt, k)
	for i := range attempts {
		a := attempt{ticket: &refillTicket{started: make(chan struct{})}, done: make(chan struct{})}
		var actx context.Context
		actx, a.cancel = context.WithCancel(context.WithValue(ctx, refillKey{}, a.ticket))
		attempts[i] = a
		go func() {
			defer close(a.done)
			// A connection back here is one an acquire found idle (released
			// meanwhile), or a connect that ended before the cancel: back
			// to the pool either way.
			if c, err := p.pool.Acquire(actx); err == nil {
				releaseSwept(c)
			}
		}()
	}
	deadline := time.NewTimer(refillStartWait)
	defer deadline.Stop()
wait:
	for _, a := range attempts {
		select {
		case <-a.ticket.started:
		case <-a.done:
		case <-deadline.C:
			break wait
		case <-ctx.Done():
			break wait
		}
	}
	started := 0
	for _, a := range attempts {
		a.cancel()
		<-a.done
		select {
		case <-a.ticket.started:
			started++
		default:
		}
	}
	for _, c := range idle {
		releaseSwept(c)
	}
	return started
}
