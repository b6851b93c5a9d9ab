package clusterpool

import (
	"context"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Behind one address, the redial copies of the address are added only once
// a connect has reached a node (or a retry asks to avoid nodes), and no
// longer after a dial fails: copies of an address that does not answer
// would repeat its error.
func TestInstallRedialOnlyOnceReached(t *testing.T) {
	parse := func() *pgx.ConnConfig {
		cc, err := pgx.ParseConfig("postgres://u@lb.example:26257/db?sslmode=disable")
		if err != nil {
			t.Fatal(err)
		}
		cc.DialFunc = func(context.Context, string, string) (net.Conn, error) {
			return nil, errors.New("refused")
		}
		return cc
	}
	pl := &placement{}
	cc := parse()
	check := pl.installRedial(cc, nil, true, false, &dialTokens{})
	if len(cc.Fallbacks) != 0 {
		t.Fatalf("no connect reached a node yet: %d fallbacks added, want none", len(cc.Fallbacks))
	}
	if err := check(context.Background(), nil); err != nil || !pl.reached.Load() {
		t.Fatalf("a connection that reached a server: check %v, reached %v", err, pl.reached.Load())
	}

	cc = parse()
	pl.installRedial(cc, nil, true, false, &dialTokens{})
	if len(cc.Fallbacks) != maxRedials {
		t.Fatalf("after a connect reached a node: %d fallbacks, want %d", len(cc.Fallbacks), maxRedials)
	}
	if _, err := cc.DialFunc(context.Background(), "tcp", "lb.example:26257"); err == nil || pl.reached.Load() {
		t.Fatalf("a failed dial (%v) left reached %v", err, pl.reached.Load())
	}
	cc = parse()
	pl.installRedial(cc, nil, true, false, &dialTokens{})
	if len(cc.Fallbacks) != 0 {
		t.Fatalf("after a failed dial: %d fallbacks added, want none", len(cc.Fallbacks))
	}

	cc = parse()
	pl.installRedial(cc, []NodeID{1}, true, false, &dialTokens{})
	if len(cc.Fallbacks) != maxRedials {
		t.Fatalf("a retry avoiding node 1: %d fallbacks, want %d", len(cc.Fallbacks), maxRedials)
	}
}

// A connect that fails reads as pgxpool's: one line per attempt pgconn
// makes (sslmode=prefer makes two per host), none repeated for the pool's
// own redial copies of the address. With several hosts the pool may try
// them in another order.
func TestConnectErrorLikePgxpool(t *testing.T) {
	ctx := testCtx(t)
	for _, dsn := range []string{
		"postgres://u@127.0.0.1:1/db?sslmode=disable",
		"postgres://u@127.0.0.1:1/db?sslmode=prefer",
		"postgres://u@127.0.0.1:1,127.0.0.1:2/db?sslmode=prefer",
	} {
		ref, err := pgxpool.New(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		want := ref.Ping(ctx)
		ref.Close()
		p, err := New(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 2 {
			got := p.Ping(ctx)
			if got == nil || want == nil {
				t.Fatalf("%s: Ping %d: clusterpool %v, pgxpool %v; want both to fail", dsn, i, got, want)
			}
			lines := func(err error) []string { return slices.Sorted(slices.Values(strings.Split(err.Error(), "\n"))) }
			if !slices.Equal(lines(got), lines(want)) {
				t.Errorf("%s: Ping %d:\n%v\nwant as pgxpool:\n%v", dsn, i, got, want)
			}
		}
		p.Close()
	}
}

func TestRedialPays(t *testing.T) {
	round := 250 * time.Millisecond
	over := redialCase{Attempt: 1, OverTarget: true, Takers: 1, Nodes: 3, DialTime: 10 * time.Millisecond, Round: round}
	for _, tc := range []struct {
		name string
		edit func(*redialCase)
		want bool
	}{
		{"background refill on an over-target node", func(*redialCase) {}, true},
		{"the last dial is kept", func(c *redialCase) { c.Attempt = maxRedials + 1 }, false},
		{"not over target", func(c *redialCase) { c.OverTarget = false }, false},
		{"no node would take it", func(c *redialCase) { c.Takers = 0 }, false},
		{"a caller waits: the balancer moves it later", func(c *redialCase) { c.Caller = true }, false},
		{"a caller's move replacement: one redial", func(c *redialCase) { c.Caller, c.Move = true, true }, true},
		{"but not two", func(c *redialCase) { c.Caller, c.Move, c.Attempt = true, true, 2 }, false},
		{"a background move's replacement", func(c *redialCase) { c.Move = true }, true},
		{"which redials past maxRedials", func(c *redialCase) { c.Move, c.Attempt = true, maxRedials+1 }, true},
		{"and keeps its last dial", func(c *redialCase) { c.Move, c.Attempt = true, moveRedials+1 }, false},
		{"a caller's move replacement keeps the last of maxRedials+1", func(c *redialCase) { c.Caller, c.Move, c.Attempt = true, true, maxRedials+1 }, false},
		{"a retry must leave the node", func(c *redialCase) { c.Caller, c.OverTarget, c.Avoid = true, false, true }, true},
		{"a draining node closes it", func(c *redialCase) { c.Caller, c.OverTarget, c.Draining = true, false, true }, true},
		{"even the retry keeps the last dial", func(c *redialCase) { c.Avoid, c.Attempt = true, maxRedials+1 }, false},
		// 3 dials expected (1 taker of 3) at 80 ms: 240 ms < a round.
		{"slow dials that fit in a round", func(c *redialCase) { c.DialTime = 80 * time.Millisecond }, true},
		// 3 × 90 ms > 250 ms: the pool would be short longer than the
		// round in which the balancer would have moved it anyway.
		{"slow dials that do not", func(c *redialCase) { c.DialTime = 90 * time.Millisecond }, false},
		// Only 1 dial left: it is what counts, not the 3 expected.
		{"few dials left", func(c *redialCase) { c.Attempt, c.DialTime = maxRedials, 200*time.Millisecond }, true},
		{"one taker of ten, at most the dials left", func(c *redialCase) { c.Nodes, c.DialTime = 10, 60*time.Millisecond }, true},
	} {
		c := over
		tc.edit(&c)
		if got := redialPays(c); got != tc.want {
			t.Errorf("%s: redialPays(%+v) = %v, want %v", tc.name, c, got, tc.want)
		}
	}
}

// A move's replacement is steered to a node below its target, the
// connection it replaces (marked to retire) not counted: landing on a node
// one above the lightest is a move lost, though overTarget would keep it.
func TestMoveLanding(t *testing.T) {
	p := &Pool{tracker: newTracker(), seed: 1}
	pl := newPlacement(p)
	now := time.Now()
	var leaving *connState
	for id, k := range map[NodeID]int{1: 7, 2: 9, 3: 8} {
		for range k {
			cs := p.tracker.track(id, "", "", nil, now)
			if id == 2 {
				leaving = cs
			}
		}
	}
	leaving.retire.Store(true) // 7/8/8 and this connection: 8 each
	for _, tc := range []struct {
		id     NodeID
		over   bool
		takers int
	}{
		{1, false, 0},
		{2, true, 1},
		{3, true, 1},
	} {
		over, takers, nodes := pl.moveLanding(tc.id, now)
		if over != tc.over || takers != tc.takers || nodes != 3 {
			t.Errorf("moveLanding(%d) = %v, %d takers of %d; want %v, %d of 3", tc.id, over, takers, nodes, tc.over, tc.takers)
		}
	}
	if pl.overTarget(3, now) {
		t.Error("overTarget(3): the pool's other connects keep a node one above the lightest")
	}
}

// Every dial of a connect after the first has a connect token: one the
// redial took before refusing a connection, or one payDials takes, waiting
// for it as BeforeConnect does. A server that counted a refused session
// (57P01 while it starts) cannot make the pool dial past its budget.
func TestPayDials(t *testing.T) {
	dials := 0
	cc, err := pgx.ParseConfig("postgres://u@lb.example:26257/db?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	cc.DialFunc = func(context.Context, string, string) (net.Conn, error) {
		dials++
		return nil, errors.New("refused")
	}
	now := time.Now()
	b := newConnectBudget(0.001, 2, nil) // two tokens, then none for 1,000 s
	b.limiter.AllowN(now, 1)             // the first dial's, taken in BeforeConnect
	pl := &placement{p: &Pool{budget: b}}
	pay := &dialTokens{}
	pl.payDials(cc, pay, false)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, _ = cc.DialFunc(ctx, "tcp", "lb.example:26257") // paid in BeforeConnect
	pay.paid.Store(true)                               // as a redial that took its token
	_, _ = cc.DialFunc(ctx, "tcp", "lb.example:26257")
	_, _ = cc.DialFunc(ctx, "tcp", "lb.example:26257") // takes the last token
	if dials != 3 {
		t.Fatalf("%d dials with three tokens, want 3", dials)
	}
	if _, err := cc.DialFunc(ctx, "tcp", "lb.example:26257"); err == nil || dials != 3 {
		t.Fatalf("a fourth dial with no token left: dialled %d times, err %v; want no dial and the limiter's error", dials, err)
	}
	// Once the connect is over, the connection's cancel requests dial
	// freely: they are not sessions.
	pay.done.Store(true)
	if _, _ = cc.DialFunc(ctx, "tcp", "lb.example:26257"); dials != 4 {
		t.Fatalf("a cancel request's dial after the connect: dialled %d times in all, want 4", dials)
	}
}
