package clusterpool

import (
	"context"
	"maps"
	"math"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/time/rate"
)

func TestRefillReserve(t *testing.T) {
	for _, tc := range []struct{ size, nodes, busiest, want int }{
		{24, 3, 8, 8},   // one node of a balanced pool
		{30, 4, 8, 8},   // 8/8/7/7: the largest share
		{24, 3, 0, 8},   // nothing counted yet: one node's share
		{24, 3, 15, 15}, // 15/5/4: losing the busiest node costs 15
		{24, 3, 30, 24}, // never more than the pool
		{10, 1, 3, 10},  // nothing can move: all of it
		{10, 0, 0, 10},
		{0, 3, 0, 0},
		{-1, 3, 2, 0},
	} {
		if got := refillReserve(tc.size, tc.nodes, tc.busiest); got != tc.want {
			t.Errorf("refillReserve(%d, %d, %d) = %d, want %d", tc.size, tc.nodes, tc.busiest, got, tc.want)
		}
	}
}

// A balance round leaves the busiest node's connections to refills: in a
// pool at 15/5/4 the next loss of node 1 costs 15 refills, not a third of
// the pool, so 12 tokens pay for no move (a reserve of 8 would pay 4).
func TestPayMovesReservesBusiestNode(t *testing.T) {
	now := time.Now()
	round := func(prune int, conns ...int) map[NodeID]int {
		p := &Pool{
			config:    &Config{Config: &pgxpool.Config{MaxConns: 24}},
			tracker:   newTracker(),
			placement: &placement{mode: connectPlaced},
			budget:    newConnectBudget(10, 24, nil),
		}
		p.budget.endStart()
		p.budget.limiter.AllowN(now, 12) // 12 tokens left
		plan := balancePlan{Prune: map[NodeID]int{1: prune}, Targets: map[NodeID]int{}}
		var views []nodeView
		for i, k := range conns {
			id := NodeID(i + 1)
			p.tracker.seen(id, now)
			plan.Targets[id] = 8
			views = append(views, nodeView{ID: id, Conns: k, Eligible: true, Refillable: true})
		}
		return p.payMoves(plan, views, now)
	}
	if got := round(7, 15, 5, 4); got[1] != 0 {
		t.Errorf("15/5/4, 12 tokens: paid %d moves off node 1, want 0 (reserve 15)", got[1])
	}
	if got := round(1, 9, 8, 7); got[1] != 1 {
		t.Errorf("9/8/7, 12 tokens: paid %d moves off node 1, want 1 (reserve 9)", got[1])
	}
}

func TestDialsPerMove(t *testing.T) {
	for _, tc := range []struct {
		placed        bool
		takers, nodes int
		want          int
	}{
		{true, 1, 4, 1},                 // hosts listed: the first dial goes there
		{false, 1, 3, 3},                // one node of three takes it
		{false, 1, 4, 4},                // one of four: N dials on average
		{false, 1, 10, moveRedials + 1}, // never more than the move's replacement dials
		{false, 2, 3, 2},
		{false, 3, 3, 1},
		{false, 0, 3, 1}, // no taker: no redial, one dial
	} {
		if got := dialsPerMove(tc.placed, tc.takers, tc.nodes); got != tc.want {
			t.Errorf("dialsPerMove(%v, %d, %d) = %d, want %d", tc.placed, tc.takers, tc.nodes, got, tc.want)
		}
	}
}

func TestMovesAffordable(t *testing.T) {
	for _, tc := range []struct {
		tokens                        float64
		reserve, want, dials, redials int
		affordable                    int
	}{
		{24, 8, 4, 3, 0, 4},   // 16 above the reserve: 5 moves of 3, 4 wanted
		{24, 8, 10, 3, 0, 5},  // 16 above the reserve: 5 moves of 3
		{10.9, 8, 4, 3, 0, 0}, // 2.9 above: not one whole move
		{11, 8, 4, 3, 0, 1},
		{10, 8, 4, 3, 2, 1}, // 2 redials paid: 1 move costs 1 token, 2 would cost 2 + 2
		{10, 8, 4, 3, 9, 2}, // redials to spare: a token a move
		{5, 8, 4, 1, 0, 0},  // below the reserve: nothing
		{-3, 0, 4, 1, 0, 0}, // callers booked future tokens
		{30, 0, 0, 1, 0, 0},
		{30, 0, 4, 0, 0, 4}, // dials < 1 counts as 1
		{math.NaN(), 0, 4, 1, 0, 0},
	} {
		if got := movesAffordable(tc.tokens, tc.reserve, tc.want, tc.dials, tc.redials); got != tc.affordable {
			t.Errorf("movesAffordable(%v, reserve %d, want %d, dials %d, redials %d) = %d, want %d",
				tc.tokens, tc.reserve, tc.want, tc.dials, tc.redials, got, tc.affordable)
		}
	}
}

// A move pays first and never takes what refills need: the round's tokens
// come from above the reserve, the replacement and its redials find theirs
// paid, and a refill after all that still has the reserve.
func TestBudgetMovesPayFirst(t *testing.T) {
	now := time.Now()
	b := &connectBudget{limiter: rate.NewLimiter(rate.Limit(10), 24)}
	if got := b.prepay(now, 5, 3, 8, true); got != 5 {
		t.Fatalf("prepay 5 moves of 3 with 24 tokens above a reserve of 8: paid %d", got)
	}
	if tokens := b.limiter.TokensAt(now); tokens != 9 {
		t.Fatalf("tokens after prepaying 15: %v, want 9", tokens)
	}
	if got := b.prepay(now, 5, 3, 8, true); got != 1 {
		t.Fatalf("prepay again with 9 tokens, reserve 8, 3 per move, 10 redials paid: paid %d, want 1", got)
	}
	// That one cost a token: its redials were paid already.
	if got := b.replacementsOwed(now); got != 6 {
		t.Fatalf("replacements owed %d, want 6", got)
	}
	for i := range 6 {
		if !b.takePrepaid(now, &b.replacements) {
			t.Fatalf("replacement %d found no prepaid token", i)
		}
	}
	if b.takePrepaid(now, &b.replacements) {
		t.Fatal("a seventh replacement found a prepaid token")
	}
	// The redials were paid too: 10 of them; the reserve is all that is
	// left in the limiter.
	for i := range 10 {
		if !b.takeForRedial(now, 8) {
			t.Fatalf("redial %d: no token", i)
		}
	}
	if b.takeForRedial(now, 8) {
		t.Fatal("a redial took the refill reserve")
	}
	// Refills take what is left: the reserve.
	for i := range 8 {
		if !b.limiter.AllowN(now, 1) {
			t.Fatalf("refill %d: no token; the reserve was spent", i)
		}
	}
}

// A round whose spare tokens pay for one replacement but not for its
// expected redials pays for that replacement alone, and the reserve stays
// whole: the redials then find no token until more come.
func TestBudgetReplacementAlone(t *testing.T) {
	now := time.Now()
	b := &connectBudget{limiter: rate.NewLimiter(rate.Limit(10), 24)}
	b.limiter.AllowN(now, 15) // 9 left: one above a reserve of 8
	if got := b.prepay(now, 2, 3, 8, false); got != 1 {
		t.Fatalf("prepay with one token above the reserve, 3 dials per move: paid %d, want 1 (the replacement alone)", got)
	}
	if tokens := b.limiter.TokensAt(now); tokens != 8 {
		t.Fatalf("tokens after paying one replacement: %v, want the reserve, 8", tokens)
	}
	if !b.takePrepaid(now, &b.replacements) {
		t.Fatal("the replacement found no prepaid token")
	}
	if b.takeForRedial(now, 8) {
		t.Fatal("a redial found a token: none was paid, and the rest is the reserve")
	}
	// Less than one token above the reserve: nothing.
	c := &connectBudget{limiter: rate.NewLimiter(rate.Limit(10), 24)}
	c.limiter.AllowN(now, 16)
	if got := c.prepay(now, 2, 3, 8, false); got != 0 {
		t.Fatalf("prepay with no token above the reserve: paid %d, want 0", got)
	}
}

// The start allowance pays the moves that even out a cold start while the
// limiter's bucket is empty, and only them: it never lends to refills, the
// refill reserve stays the limiter's, and it lapses when the pool is found
// balanced.
func TestBudgetStartAllowance(t *testing.T) {
	for burst, want := range map[int]int{0: 0, 1: 1, 24: 12, 25: 13} {
		if got := startAllowance(burst); got != want {
			t.Errorf("startAllowance(%d) = %d, want %d", burst, got, want)
		}
	}
	now := time.Now()
	b := newConnectBudget(10, 24, nil)
	if !b.limiter.AllowN(now, 24) { // the cold start
		t.Fatal("the cold start found no burst")
	}
	// 12 allowed, 3 per move: four moves, though the limiter is empty and
	// its reserve is 8.
	if got := b.prepay(now, 7, 3, 8, true); got != 4 {
		t.Fatalf("moves paid from the start allowance: %d, want 4", got)
	}
	if got := b.prepay(now, 3, 3, 8, true); got != 0 {
		t.Fatalf("moves paid once the allowance is spent and the bucket is empty: %d, want 0", got)
	}
	// A pool below MinConns does not spend it (start false).
	c := newConnectBudget(10, 24, nil)
	c.limiter.AllowN(now, 24)
	if got := c.prepay(now, 7, 3, 8, false); got != 0 || c.start != 12 {
		t.Fatalf("a pool below MinConns: %d moves paid, allowance left %d; want 0 and 12", got, c.start)
	}
	// Refills wait for the limiter: the allowance lent them nothing.
	if b.limiter.AllowN(now, 1) {
		t.Fatal("a refill found a token in an empty bucket")
	}

	// A redial may spend the allowance; endStart ends it.
	b = newConnectBudget(10, 24, nil)
	b.limiter.AllowN(now, 24)
	if !b.takeForRedial(now, 8) {
		t.Fatal("a cold start's redial found no token in the start allowance")
	}
	b.endStart()
	if b.takeForRedial(now, 8) || b.prepay(now, 1, 1, 0, true) != 0 {
		t.Fatal("the start allowance paid after it lapsed")
	}
}

// Prepaid tokens a move never used are dropped after prepaidTTL, spent: the
// pool never opens more than the limiter allows.
func TestBudgetPrepaidExpire(t *testing.T) {
	now := time.Now()
	b := &connectBudget{limiter: rate.NewLimiter(rate.Limit(0.1), 10)}
	if got := b.prepay(now, 2, 2, 0, true); got != 2 {
		t.Fatalf("paid %d, want 2", got)
	}
	if got := b.replacementsOwed(now.Add(prepaidTTL)); got != 2 {
		t.Fatalf("owed at the deadline: %d, want 2", got)
	}
	later := now.Add(prepaidTTL + time.Millisecond)
	if got := b.replacementsOwed(later); got != 0 || len(b.redials) != 0 {
		t.Fatalf("after the deadline: owed %d, redial tokens %d; want none", got, len(b.redials))
	}
	// 6 tokens left at now, plus one every ten seconds.
	if want := 6 + 0.1*(prepaidTTL+time.Millisecond).Seconds(); math.Abs(b.limiter.TokensAt(later)-want) > 1e-6 {
		t.Fatalf("tokens %v, want %v: expiry must not give tokens back", b.limiter.TokensAt(later), want)
	}
}

// Without a limit every move is paid for and every redial allowed, and a
// replacement's connect is still known as a move's: it gets a move's
// redials and is judged by moveLanding, as with a limit.
func TestBudgetNoLimit(t *testing.T) {
	b := &connectBudget{}
	now := time.Now()
	if got := b.prepay(now, 7, 4, 100, true); got != 7 {
		t.Fatalf("no limit: paid %d of 7", got)
	}
	if got := b.replacementsOwed(now); got != 7 {
		t.Fatalf("no limit: %d replacements owed, want 7", got)
	}
	if !b.takeForRedial(now, 100) {
		t.Fatal("no limit: redial refused")
	}
	for i := range 8 {
		move, err := b.take(context.Background(), true, nil)
		if want := i < 7; move != want || err != nil {
			t.Fatalf("no limit: take %d = %v, %v; want move %v", i+1, move, err, want)
		}
	}
	if got := b.prepay(now, 0, 4, 100, true); got != 0 || b.replacementsOwed(now) != 0 {
		t.Fatalf("no limit: prepay of 0 paid %d, owes %d", got, b.replacementsOwed(now))
	}
}

// A background refill books no future token, so a caller's connect that
// waits (rate.Limiter.Wait books its token as it starts) is served first:
// the token a caller booked is not there for the refill when it comes due.
func TestBudgetCallersFirst(t *testing.T) {
	t0 := time.Now()
	lim := rate.NewLimiter(rate.Limit(10), 1)
	lim.AllowN(t0, 1) // empty
	if r := lim.ReserveN(t0, 1); !r.OK() || r.DelayFrom(t0) != 100*time.Millisecond {
		t.Fatalf("the caller's booking: ok %v, delay %v", r.OK(), r.DelayFrom(t0))
	}
	if lim.AllowN(t0.Add(100*time.Millisecond), 1) {
		t.Fatal("a background refill took the token the caller booked")
	}
	if !lim.AllowN(t0.Add(200*time.Millisecond), 1) {
		t.Fatal("the next token is the background refill's")
	}

	// waitBehindCallers returns once a token is there, and when its
	// context ends.
	b := &connectBudget{limiter: rate.NewLimiter(rate.Limit(1000), 1)}
	b.limiter.Allow()
	if err := b.waitBehindCallers(context.Background()); err != nil {
		t.Fatal(err)
	}
	b.limiter.SetLimit(rate.Limit(1e-6))
	b.limiter.Allow()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := b.waitBehindCallers(ctx); err != context.Canceled {
		t.Fatalf("cancelled: %v", err)
	}
	// As Wait does, it gives up at once when the next token comes after
	// the context's deadline (pgxpool's top-ups have a minute).
	ctx, cancel = context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	if err := b.waitBehindCallers(ctx); err != errTokenPastDeadline {
		t.Fatalf("next token in 11 days, deadline in an hour: %v", err)
	}
}

func TestPaidPrune(t *testing.T) {
	eligible := map[NodeID]bool{1: true, 2: true, 3: true}
	for _, tc := range []struct {
		name  string
		prune map[NodeID]int
		paid  int
		want  map[NodeID]int
	}{
		{"all paid", map[NodeID]int{1: 2, 2: 1}, 3, map[NodeID]int{1: 2, 2: 1}},
		{"widest first", map[NodeID]int{1: 3, 2: 1}, 2, map[NodeID]int{1: 2}},
		{"then evenly", map[NodeID]int{1: 2, 2: 2}, 3, map[NodeID]int{1: 2, 2: 1}},
		{"none paid", map[NodeID]int{1: 2}, 0, nil},
		{"ineligible sheds anyway", map[NodeID]int{4: 5, 1: 1}, 0, map[NodeID]int{4: 5}},
		{"paid beyond the plan", map[NodeID]int{1: 1}, 5, map[NodeID]int{1: 1}},
	} {
		got := paidPrune(tc.prune, eligible, tc.paid)
		if !maps.Equal(got, tc.want) {
			t.Errorf("%s: paidPrune(%v, %d) = %v, want %v", tc.name, tc.prune, tc.paid, got, tc.want)
		}
	}
}

func TestRefillCount(t *testing.T) {
	for _, tc := range []struct {
		name                                    string
		minConns, maxConns, open, opening, owed int
		want                                    int
	}{
		{"full", 24, 24, 24, 0, 0, 0},
		{"lost 8", 24, 24, 16, 0, 0, 8},
		{"lost 8, 3 opening", 24, 24, 16, 3, 0, 5},
		{"move in a full pool waits for the close", 24, 24, 24, 0, 2, 0},
		{"move closed, owed", 24, 24, 23, 0, 1, 1},
		{"above MinConns: moves replaced", 0, 30, 20, 0, 3, 3},
		{"above MinConns, nothing owed", 5, 30, 20, 0, 0, 0},
		{"moves bounded by MaxConns", 0, 30, 29, 0, 3, 1},
		{"opening beyond", 10, 30, 8, 5, 0, 0},
	} {
		if got := refillCount(tc.minConns, tc.maxConns, tc.open, tc.opening, tc.owed); got != tc.want {
			t.Errorf("%s: refillCount(min %d, max %d, open %d, opening %d, owed %d) = %d, want %d",
				tc.name, tc.minConns, tc.maxConns, tc.open, tc.opening, tc.owed, got, tc.want)
		}
	}
}

// A move's replacement that landed on the wrong node may wait for the next
// token above the refill reserve instead of staying there: it gets one as
// soon as the limiter has it, never one of the reserve, and gives up at its
// deadline or when its connect is cancelled.
func TestBudgetAwaitRedial(t *testing.T) {
	ctx := context.Background()
	if !(&connectBudget{}).awaitRedial(ctx, 5, time.Now()) {
		t.Fatal("no limit: a redial waited in vain")
	}

	// Empty bucket, a token every millisecond: one comes well before the
	// deadline.
	fast := &connectBudget{limiter: rate.NewLimiter(1000, 10)}
	fast.limiter.AllowN(time.Now(), 10)
	if !fast.awaitRedial(ctx, 2, time.Now().Add(time.Minute)) {
		t.Fatal("tokens come every millisecond, yet the redial got none within a minute")
	}

	// A token every ten seconds and the bucket at the reserve: nothing
	// before a deadline 10 ms away, and the reserve is left alone.
	slow := &connectBudget{limiter: rate.NewLimiter(0.1, 10)}
	now := time.Now()
	slow.limiter.AllowN(now, 7) // 3 left: the reserve
	if slow.awaitRedial(ctx, 3, time.Now().Add(10*time.Millisecond)) {
		t.Fatal("a redial took a token of the refill reserve")
	}
	if got := slow.limiter.TokensAt(time.Now()); got < 3 {
		t.Fatalf("%.2f tokens left, want the reserve of 3", got)
	}

	// Cancelled: the wait ends at once, without a token.
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if slow.awaitRedial(cancelled, 3, time.Now().Add(time.Hour)) {
		t.Fatal("a cancelled connect got a redial token")
	}
	// The connect's own deadline bounds the wait too.
	short, cancel2 := context.WithTimeout(ctx, 10*time.Millisecond)
	defer cancel2()
	if slow.awaitRedial(short, 3, time.Now().Add(time.Hour)) {
		t.Fatal("a redial got a token after its connect's deadline")
	}
}
