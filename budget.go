package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// connectBudget is how many new connections the pool may open, and how fast
// (Config.ConnectRate). The burst is at least the pool's MaxConns, so a cold
// start fills the pool at once; what it slows are reconnect storms, such as a
// whole pool reconnecting after a node restart. Besides, the balancer has a
// start allowance of half that burst (startAllowance), for the moves and
// redials that even out where the cold start's connects landed: a cold start
// through a random load balancer leaves the pool uneven and the bucket
// empty, and at the limiter's rate alone the moves would take seconds. It
// is spent by balancing only, never by refills, its moves only once the
// pool holds MinConns (a pool still opening places its refills where it is
// short), and it lapses the first time a balance round finds the pool
// steady with nothing to move. From the pool's
// creation on, it never opens more than MaxConns + ⌈MaxConns/2⌉ + rate ×
// (time since), redials included; refills alone never more than MaxConns +
// rate × (time since).
//
// Two kinds of connect draw on it. Refills replace connections the pool lost
// without meaning to (a drain, a crash, an eviction, a broken connection)
// and take their token in BeforeConnect, under the context pgxpool connects
// with, before dialling and with no lock held; without one they wait, a
// caller's connect ahead of the pool's background refills. Moves are the
// balancer's own: a connection retired only to be opened on another node,
// and the redials that steer the replacement there. A move never waits and
// never takes what refills need: the balance round takes the tokens for the
// replacement and its expected redials before it retires anything (prepay),
// only from tokens above the refill reserve, and the replacement's connect
// then finds them paid. So balancing can delay balancing, never a refill.
type connectBudget struct {
	limiter *rate.Limiter // nil: no limit
	obs     *observer

	mu sync.Mutex // protects the fields below
	// start is what is left of the start allowance (0 once it lapsed).
	start int
	// replacements and redials hold, oldest first, until when each token a
	// balance round took for a move's replacement, or for the redials that
	// steer it, waits to be used. A connect uses a replacement token before
	// asking the limiter; a redial uses a redial token first.
	replacements, redials []time.Time
}

// prepaidTTL bounds how long a token taken for a move waits to be used. An
// in-use connection retired at its release may come back much later, a pool
// above MinConns may not replace it at all, and a replacement may land where
// it should at the first dial; the token is then spent for nothing, which
// only ever slows the pool.
const prepaidTTL = 10 * time.Second

func newConnectBudget(perSecond float64, burst int, obs *observer) *connectBudget {
	return &connectBudget{limiter: newConnectLimiter(perSecond, burst), obs: obs, start: startAllowance(burst)}
}

// startAllowance is the balancer's start allowance for a burst: half of
// it, rounded up. With it a cold start opens at most 1.5 × the pool's size
// before the limiter's rate adds to it.
func startAllowance(burst int) int {
	return (max(burst, 0) + 1) / 2
}

// endStart ends the start allowance: the pool was found balanced.
func (b *connectBudget) endStart() {
	b.mu.Lock()
	b.start = 0
	b.mu.Unlock()
}

// spareLocked is what balancing may spend at now: the limiter's tokens
// above reserve, and allowance tokens of the start allowance.
func (b *connectBudget) spareLocked(now time.Time, reserve, allowance int) float64 {
	return max(b.limiter.TokensAt(now)-float64(reserve), 0) + float64(allowance)
}

// spendLocked takes n tokens at now for balancing, up to allowance of them
// from the start allowance and the rest from the limiter, and reports
// whether it could: all or nothing.
func (b *connectBudget) spendLocked(now time.Time, n, allowance int) bool {
	fromStart := min(n, allowance, b.start)
	if n > fromStart && !b.limiter.AllowN(now, n-fromStart) {
		return false
	}
	b.start -= fromStart
	return true
}

// newConnectLimiter returns the limiter for new connections, or nil when
// perSecond is 0 or +Inf (no limit).
func newConnectLimiter(perSecond float64, burst int) *rate.Limiter {
	if perSecond <= 0 || math.IsInf(perSecond, 1) || math.IsNaN(perSecond) {
		return nil
	}
	burst = max(burst, int(math.Ceil(perSecond)), 1)
	return rate.NewLimiter(rate.Limit(perSecond), burst)
}

// refillReserve is how many tokens balancing leaves in the bucket for
// refills: what losing any one node costs, i.e. the connections the
// busiest of the nodes holds now (busiest), and never less than one node's
// share when poolSize connections are spread over nodes. A pool that is
// uneven (refills land at random behind one address) keeps more back until
// its moves have evened it out, so the next drain or crash of its busiest
// node finds its refills paid. With one node nothing can move, and the
// whole bucket is the refills'.
func refillReserve(poolSize, nodes, busiest int) int {
	poolSize = max(poolSize, 0)
	if nodes <= 1 {
		return poolSize
	}
	return min(max((poolSize+nodes-1)/nodes, busiest), poolSize)
}

// dialsPerMove is how many dials a move is expected to take: its
// replacement's first dial and the redials that steer it. Behind one
// load-balancer address each dial reaches one of takers nodes of nodes with
// probability takers/nodes, and the connect dials at most moveRedials+1
// times; with the nodes' own hosts listed (placed) the first dial goes where
// it should.
func dialsPerMove(placed bool, takers, nodes int) int {
	if placed || takers <= 0 || nodes <= takers {
		return 1
	}
	return min(moveRedials+1, (nodes+takers-1)/takers)
}

// movesAffordable is how many of want moves, each costing dials tokens (its
// replacement's and its redials'), the tokens in the bucket pay for while
// leaving reserve of them to refills, when redials tokens paid earlier for
// redials are still unused.
func movesAffordable(tokens float64, reserve, want, dials, redials int) int {
	if want <= 0 || math.IsNaN(tokens) {
		return 0
	}
	dials = max(dials, 1)
	spare := int(math.Floor(tokens)) - reserve
	k := 0
	for k < want && movesCost(k+1, dials, redials) <= spare {
		k++
	}
	return k
}

// movesCost is how many tokens k moves of dials tokens each take from the
// limiter when redials tokens for redials are already paid.
func movesCost(k, dials, redials int) int {
	return k + max(0, k*(max(dials, 1)-1)-redials)
}

// errNoToken refuses, in BeforeConnect, a caller's connect that would wait
// for the connect rate limit while the pool refills the same connection in
// the background; the pool's own acquirers wait for a connection to come
// back instead of seeing it (limits.go's acquireConn).
var errNoToken = errors.New("clusterpool: no connect token now, and the pool is refilling in the background; waiting for a connection instead")

// take takes a token for a connect: one a move prepaid for its replacement
// if there is one (move is then true), else the limiter's, waiting for it if
// needed, and reports a wait. caller says an acquire waits for this connect
// (it is not one of the pool's background refills). A caller's connect
// that finds no token and for which yield (nil: never) says that the pool
// refills in the background anyway is refused with errNoToken: its caller
// waits for the first connection released rather than for the limiter. A
// token that is there at once costs one limiter call, as Wait alone would.
func (b *connectBudget) take(ctx context.Context, caller bool, yield func() bool) (move bool, err error) {
	if b.takePrepaid(time.Now(), &b.replacements) {
		if b.limiter != nil {
			b.obs.connectPrepaid()
		}
		return true, nil
	}
	if b.limiter == nil {
		return false, nil
	}
	if b.limiter.Allow() {
		return false, nil
	}
	if caller && yield != nil && yield() {
		return false, errNoToken
	}
	start := time.Now()
	if caller {
		err = b.limiter.Wait(ctx)
	} else {
		err = b.waitBehindCallers(ctx)
	}
	b.obs.connectThrottled(ctx, time.Since(start), float64(b.limiter.Limit()), caller, err)
	if err != nil {
		return false, fmt.Errorf("clusterpool: waiting for the connect rate limit (%g/s): %w", float64(b.limiter.Limit()), err)
	}
	return false, nil
}

// errTokenPastDeadline: the next token comes after the connect's deadline.
var errTokenPastDeadline = errors.New("no token before the context's deadline")

// waitBehindCallers waits for a token for a background connect. Unlike
// Wait, it books no future token: it takes one only when one is there, so a
// caller's connect, which books its token as it starts waiting, is served
// first, and a background refill waits behind every caller. Like Wait, it
// gives up at once when the token would come past the context's deadline.
func (b *connectBudget) waitBehindCallers(ctx context.Context) error {
	return b.waitForToken(ctx, 0, time.Time{}, func(now time.Time) bool { return b.limiter.AllowN(now, 1) })
}

// waitForToken calls take whenever the bucket may hold a whole token above
// reserve, until it succeeds, booking none ahead. It gives up with
// errTokenPastDeadline when that would be after deadline (zero: none) or
// the context's deadline.
func (b *connectBudget) waitForToken(ctx context.Context, reserve int, deadline time.Time, take func(now time.Time) bool) error {
	if d, ok := ctx.Deadline(); ok && (deadline.IsZero() || d.Before(deadline)) {
		deadline = d
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	<-timer.C
	for {
		now := time.Now()
		if take(now) {
			return nil
		}
		// Until then; at least a millisecond, so the loop never spins.
		missing := float64(reserve) + 1 - b.limiter.TokensAt(now)
		wait := max(time.Duration(missing/float64(b.limiter.Limit())*float64(time.Second)), time.Millisecond)
		if !deadline.IsZero() && now.Add(wait).After(deadline) {
			return errTokenPastDeadline
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C:
		}
	}
}

// takePrepaid takes one of the tokens in pool (replacements or redials),
// if one is left.
func (b *connectBudget) takePrepaid(now time.Time, pool *[]time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.expireLocked(now)
	if len(*pool) == 0 {
		return false
	}
	*pool = (*pool)[1:]
	return true
}

// prepay takes from the limiter, at now, the tokens for up to want moves of
// dials tokens each (see dialsPerMove; redial tokens paid earlier and still
// unused count), from the tokens above reserve and, when start says so,
// the start allowance, and returns how many moves it paid for: the balance
// round retires that many connections, no more, so it asks only for moves
// it can make.
//
// When the spare tokens pay for no whole move but for one replacement, it
// pays for that replacement alone: its redials then take tokens above the
// reserve as they come (takeForRedial, awaitRedial), and without one it
// stays where it landed. Waiting until a whole move's dials had gathered
// above the reserve held a pool one or two moves from even for rounds
// after a cold start had spent the start allowance (clusterbench balance,
// seed 1: 6–7 rounds, 4–5 with this), while its replacement's first dial
// alone lands right one time in takers/nodes.
func (b *connectBudget) prepay(now time.Time, want, dials, reserve int, start bool) int {
	if want <= 0 {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.expireLocked(now)
	// No limit: every move is paid for, and its replacement is still
	// marked, so its connect is known as a move's (moveRedials,
	// moveLanding) and is opened even in a pool above MinConns.
	k, cost := want, want
	if b.limiter != nil {
		dials = max(dials, 1)
		// The start allowance is balancing's own; the reserve is limiter
		// tokens that refills need.
		allowance := 0
		if start {
			allowance = b.start
		}
		spare := b.spareLocked(now, reserve, allowance)
		k = movesAffordable(spare, 0, want, dials, len(b.redials))
		cost = movesCost(k, dials, len(b.redials))
		if k == 0 && spare >= 1 {
			// No whole move, but one replacement: see the comment above.
			k, cost = 1, 1
		}
		if k == 0 {
			return 0
		}
		if !b.spendLocked(now, cost, allowance) {
			return 0 // a refill took tokens meanwhile: next round
		}
	}
	until := now.Add(prepaidTTL)
	for range k {
		b.replacements = append(b.replacements, until)
	}
	for range cost - k {
		b.redials = append(b.redials, until)
	}
	return k
}

// takeForRedial takes a token for a redial at now without waiting: one a
// move prepaid, or one of the start allowance and the limiter's above
// reserve. Without one the
// connection in hand is kept: a redial is a new connection for the server
// too.
func (b *connectBudget) takeForRedial(now time.Time, reserve int) bool {
	if b.limiter == nil {
		return true
	}
	if b.takePrepaid(now, &b.redials) {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return movesAffordable(b.spareLocked(now, reserve, b.start), 0, 1, 1, 0) == 1 && b.spendLocked(now, 1, b.start)
}

// awaitRedial waits, until deadline at most, for a token takeForRedial
// would give, and takes it; it reports whether it did. It is for a move's
// replacement that no caller waits for and that landed on the wrong node
// when the bucket held no token above reserve: kept there, the connection
// costs another move (a connection retired and its replacement's dials,
// about as many as nodes behind the address), where waiting costs the
// redial alone, at the limiter's rate, while the pool is one connection
// short. It books no token ahead, as waitBehindCallers does not, so a
// refill waiting for the reserve is never passed.
func (b *connectBudget) awaitRedial(ctx context.Context, reserve int, deadline time.Time) bool {
	if b.limiter == nil {
		return true
	}
	return b.waitForToken(ctx, reserve, deadline, func(now time.Time) bool { return b.takeForRedial(now, reserve) }) == nil
}

// replacementsOwed is how many moves' replacements no connect has started
// yet.
func (b *connectBudget) replacementsOwed(now time.Time) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.expireLocked(now)
	return len(b.replacements)
}

// expireLocked drops the prepaid tokens whose time is up.
func (b *connectBudget) expireLocked(now time.Time) {
	expire := func(pool []time.Time) []time.Time {
		i := slices.IndexFunc(pool, func(until time.Time) bool { return !now.After(until) })
		if i < 0 {
			return pool[:0]
		}
		return pool[i:]
	}
	b.replacements = expire(b.replacements)
	b.redials = expire(b.redials)
}
