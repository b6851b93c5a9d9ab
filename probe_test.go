package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// runBackoff drives the session probe's back-off as the loop does, ticking
// every base from t0 to end, with the pool's change count bumped at the
// given offsets, and returns when the session probes ran (offsets from t0).
func runBackoff(base, end time.Duration, changesAt ...time.Duration) []time.Duration {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	b := probeBackoff{}.observe(0, 3, 100, t0)
	var changes uint64
	var probes []time.Duration
	for at := base; at <= end; at += base {
		for _, c := range changesAt {
			if c > at-base && c <= at {
				changes++
			}
		}
		now := t0.Add(at)
		b = b.observe(changes, 3, 100, now)
		if b.due(now, base, probeWaitCap(base), false) {
			b = b.probed(now)
			probes = append(probes, at)
		}
	}
	return probes
}

func countIn(ts []time.Duration, from, to time.Duration) int {
	n := 0
	for _, t := range ts {
		if t > from && t <= to {
			n++
		}
	}
	return n
}

func TestProbeBackoff(t *testing.T) {
	const base = 500 * time.Millisecond
	// At rest: after the first few intervals the probes back off to the cap
	// (8 intervals); over a minute at rest that is under 25% of the probes
	// a fixed interval makes (120).
	probes := runBackoff(base, 80*time.Second)
	if got := countIn(probes, 20*time.Second, 80*time.Second); got > 120/4 {
		t.Errorf("%d session probes in a minute at rest, want ≤ 30 (a quarter of the fixed-interval count)", got)
	}
	for i := 1; i < len(probes); i++ {
		if gap := probes[i] - probes[i-1]; gap > jitter(probeWaitCap(base), 1)+base {
			t.Fatalf("gap %v between probes, beyond the cap %v", gap, probeWaitCap(base))
		}
	}
	// The first probes after the start come every interval.
	if got := countIn(probes, 0, 2*base); got != 2 {
		t.Errorf("%d probes in the first two intervals, want 2: %v", got, probes)
	}

	// A change at 60 s snaps the probe back: the next probe comes within
	// one interval of it, and the next two intervals have one each.
	probes = runBackoff(base, 80*time.Second, 60*time.Second)
	if got := countIn(probes, 60*time.Second, 60*time.Second+base); got != 1 {
		t.Errorf("%d probes in the interval after a change, want 1: %v", got, probes)
	}
	if got := countIn(probes, 60*time.Second, 60*time.Second+3*base); got < 3 {
		t.Errorf("%d probes in three intervals after a change, want 3: %v", got, probes)
	}
	// ...and backs off again while nothing changes.
	if got := countIn(probes, 70*time.Second, 80*time.Second); got > 4 {
		t.Errorf("%d probes 10-20 s after the change, want ≤ 4: %v", got, probes)
	}
}

func TestProbeWaitCap(t *testing.T) {
	for _, tc := range []struct{ base, want time.Duration }{
		{500 * time.Millisecond, 4 * time.Second},
		{5 * time.Second, 40 * time.Second},
		{10 * time.Second, time.Minute},
		{2 * time.Minute, 2 * time.Minute},
	} {
		if got := probeWaitCap(tc.base); got != tc.want {
			t.Errorf("probeWaitCap(%v) = %v, want %v", tc.base, got, tc.want)
		}
	}
}

// The wait grows with the quiet time before the last probe, and a change
// makes it the base interval again.
func TestProbeBackoffWait(t *testing.T) {
	const base = time.Second
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	b := probeBackoff{}.observe(7, 3, 100, t0)
	for _, tc := range []struct {
		quiet, want time.Duration
	}{
		{0, base}, {base, base}, {2 * base, base}, {3 * base, 1500 * time.Millisecond},
		{10 * base, 5 * base}, {16 * base, 8 * base}, {time.Hour, 8 * base},
	} {
		if got := b.probed(t0.Add(tc.quiet)).wait(base, probeWaitCap(base), false); got != tc.want {
			t.Errorf("quiet %v: wait %v, want %v", tc.quiet, got, tc.want)
		}
	}
	// While the pool misses a node the wait grows four times slower.
	for _, tc := range []struct {
		quiet, want time.Duration
	}{
		{2 * base, base}, {8 * base, base}, {16 * base, 2 * base}, {64 * base, 8 * base},
	} {
		if got := b.probed(t0.Add(tc.quiet)).wait(base, probeWaitCap(base), true); got != tc.want {
			t.Errorf("missing, quiet %v: wait %v, want %v", tc.quiet, got, tc.want)
		}
	}
	late := b.probed(t0.Add(time.Hour))
	if late.due(t0.Add(time.Hour+2*base), base, probeWaitCap(base), false) {
		t.Error("backed off: due two intervals after the last probe")
	}
	changed := late.observe(8, 3, 100, t0.Add(time.Hour+base))
	if !changed.due(t0.Add(time.Hour+base), base, probeWaitCap(base), false) {
		t.Error("a change an interval after the last probe: not due at once")
	}
	if same := late.observe(7, 3, 100, t0.Add(time.Hour+base)); same.lastChange != t0 {
		t.Error("an unchanged count moved the last change")
	}
	// ProbeMaxInterval off (the limit is the interval): a probe at every
	// tick, even ticks that the jitter brings 20% early.
	off := probeBackoff{}.observe(1, 3, 100, t0).probed(t0)
	for i := 1; i <= 20; i++ {
		now := t0.Add(time.Duration(i) * base * 4 / 5)
		if !off.due(now, base, base, false) {
			t.Fatalf("back-off off: tick %d (%v after the last probe) not due", i, base*4/5)
		}
		off = off.probed(now)
	}
	// ProbeMaxInterval off (the limit is the interval): no back-off.
	if got := b.probed(t0.Add(time.Hour)).wait(base, base, false); got != base {
		t.Errorf("no back-off: wait %v, want %v", got, base)
	}
}

func TestCoverLandings(t *testing.T) {
	for k, want := range map[int]int{0: 0, 1: 7, 2: 12, 3: 17, 4: 21, 9: 44} {
		if got := coverLandings(k); got != want {
			t.Errorf("coverLandings(%d) = %d, want %d", k, got, want)
		}
	}
}

// A pool that may not have met every node yet (too few landings on the
// nodes it knows) probes every interval, and backs off once enough have
// landed.
func TestProbeBackoffExplores(t *testing.T) {
	const base = time.Second
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	quiet := t0.Add(time.Hour)
	for _, tc := range []struct {
		known  int
		landed uint64
		want   time.Duration
	}{
		{2, 6, base}, {2, 11, base}, {2, 12, probeWaitCap(base)},
		{3, 16, base}, {3, 17, probeWaitCap(base)},
		{0, 0, probeWaitCap(base)}, // nothing identified: nothing to count
	} {
		b := probeBackoff{}.observe(0, tc.known, tc.landed, t0).probed(quiet)
		if got := b.wait(base, probeWaitCap(base), false); got != tc.want {
			t.Errorf("%d nodes known, %d landed: wait %v, want %v", tc.known, tc.landed, got, tc.want)
		}
	}
}

// The fleet's sessions are read only when gossip cannot be (it says more),
// with CockroachDB's node IDs, and twice per session-probe wait: every tick
// after a change, further apart at rest; a refusal stops them.
func TestSessionsDue(t *testing.T) {
	const base = time.Second
	limit := probeWaitCap(base)
	p := &Pool{settings: settings{probeInterval: base, probeMaxInterval: limit, identity: NodeIdentityAuto}}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	refused := probeState{gossipAfter: t0.Add(gossipBackoff)}
	atRest := func(st probeState, lastRead time.Time) probeState {
		st.backoff = probeBackoff{}.observe(0, 3, 100, t0).probed(t0.Add(5 * time.Minute))
		st.sessionsRead = lastRead
		return st
	}
	now := t0.Add(5*time.Minute + time.Second) // gossip still refused
	for _, tc := range []struct {
		name string
		st   probeState
		now  time.Time
		want bool
	}{
		{"gossip readable", probeState{}, t0, false},
		{"gossip refused, never read", refused, t0, true},
		{"at rest, read a quarter wait ago", atRest(refused, now.Add(-limit/4)), now, false},
		{"at rest, read half a wait ago", atRest(refused, now.Add(-limit/2)), now, true},
		{"after a change, read a tick ago", func() probeState {
			st := refused
			st.backoff = probeBackoff{}.observe(0, 3, 100, t0).probed(t0)
			st.sessionsRead = t0
			return st
		}(), t0.Add(base), true},
		{"sessions refused", probeState{gossipAfter: t0.Add(gossipBackoff), sessionsAfter: t0.Add(gossipBackoff)}, t0, false},
	} {
		if got := p.sessionsDue(&tc.st, tc.now); got != tc.want {
			t.Errorf("%s: sessionsDue = %v, want %v", tc.name, got, tc.want)
		}
	}
	// Node IDs that are not CockroachDB's cannot be matched to the list.
	q := &Pool{settings: p.settings}
	q.settings.identity = NodeIdentityQuery
	if q.sessionsDue(&refused, t0) {
		t.Error("sessionsDue with the query identity: true, want false")
	}
}

// A sessions read that the server refused or that ran out of time waits
// before the next; one whose connection broke under it does not.
func TestSlowFanOut(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&pgconn.PgError{Code: "XX000", Message: "rpc error"}, true},
		{fmt.Errorf("read: %w", context.DeadlineExceeded), true},
		{io.ErrUnexpectedEOF, false},
		{&net.OpError{Op: "read", Err: errors.New("connection reset by peer")}, false},
	} {
		if got := slowFanOut(tc.err); got != tc.want {
			t.Errorf("slowFanOut(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

// The fleet holds still when the same nodes hold the same sessions.
func TestFleetStill(t *testing.T) {
	was := map[NodeID]int{1: 40, 2: 41, 3: 39}
	for _, tc := range []struct {
		now  map[NodeID]int
		want bool
	}{
		{map[NodeID]int{1: 40, 2: 41, 3: 39}, true},
		{map[NodeID]int{1: 41, 2: 40, 3: 39}, false}, // a connection moved
		{map[NodeID]int{1: 42, 2: 41, 3: 39}, false},
		{map[NodeID]int{1: 40, 2: 41}, false},
		{map[NodeID]int{1: 40, 2: 41, 4: 39}, false},
		{map[NodeID]int{1: 40, 2: 41, 3: 39, 4: 1}, false},
	} {
		if got := fleetStill(was, tc.now); got != tc.want {
			t.Errorf("fleetStill(%v, %v) = %v, want %v", was, tc.now, got, tc.want)
		}
	}
	if fleetStill(nil, was) {
		t.Error("a first read holds still")
	}
}

// Aimed probes at nodes the pool lost come every probe at first, then every
// second, fourth and eighth while each misses; a probe that reaches one, or
// a node newly missed, starts over; a node only heard of is aimed at by
// every probe.
func TestProbeAimSpacing(t *testing.T) {
	var st probeState
	lost := []NodeID{3}
	var pattern []bool
	for range 20 {
		aim := st.aim(lost, true)
		pattern = append(pattern, aim != nil)
		if aim != nil {
			st.aimed(aim, 1) // reached node 1, not node 3
		}
	}
	// Aimed at probes 1, 3, 7 and 15: each aimed miss doubles the spacing,
	// up to 8.
	want := []int{0, 2, 6, 14}
	var got []int
	for i, a := range pattern {
		if a {
			got = append(got, i)
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("aimed at probes %v, want %v", got, want)
	}
	// Spaced at 8: probe 23, the eighth after probe 15, aims again.
	for i := range 8 {
		if aim := st.aim(lost, true); (aim != nil) != (i == 2) {
			t.Fatalf("probe %d after probe 20: aimed %v", i+21, aim != nil)
		} else if aim != nil {
			st.aimed(aim, 2)
		}
	}

	// Another node lost: every probe aims again.
	if aim := st.aim([]NodeID{2, 3}, true); !slices.Equal(aim, []NodeID{2, 3}) {
		t.Fatalf("a newly lost node: aim %v, want [2 3]", aim)
	}
	st.aimed([]NodeID{2, 3}, 2) // reached node 2
	if aim := st.aim([]NodeID{3}, true); aim == nil {
		t.Fatal("after an aimed probe that reached a lost node, the next probe does not aim")
	}

	// Not spaced (hosts listed, or a node only heard of): always aimed.
	st = probeState{aimMissed: 3, sinceAim: 0, aimedAt: lost}
	if aim := st.aim(lost, false); !slices.Equal(aim, lost) || st.aimMissed != 0 {
		t.Fatalf("unspaced: aim %v, missed %d", aim, st.aimMissed)
	}
	// Nothing missing: nothing aimed, the spacing forgotten.
	st = probeState{aimMissed: 3, aimedAt: lost}
	if aim := st.aim(nil, true); aim != nil || st.aimMissed != 0 || st.aimedAt != nil {
		t.Fatalf("nothing missing: aim %v, state %+v", aim, st)
	}
}

// The fleet's sessions that started after the number of nodes the pool
// knows last changed count as draws toward meeting every node: the larger
// of them and the pool's own landings. Draws read before the last change
// do not count.
func TestFleetCoverage(t *testing.T) {
	p := &Pool{tracker: newTracker()}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for id := range NodeID(3) {
		p.tracker.seen(id+1, t0)
	}
	p.tracker.landings.Add(5)
	met := p.tracker.met()
	if !met.Equal(t0) {
		t.Fatalf("met at %v, want %v", met, t0)
	}
	check := func(what string, wantKnown int, wantLanded uint64) {
		t.Helper()
		if known, landed := p.fleetCoverage(); known != wantKnown || landed != wantLanded {
			t.Errorf("%s: coverage %d nodes, %d draws; want %d, %d", what, known, landed, wantKnown, wantLanded)
		}
	}
	check("no read", 3, 5)
	p.pace.fleetDraws, p.pace.drawsMark = 30, met
	check("30 of the fleet's sessions since", 3, 30)
	p.pace.fleetDraws = 2
	check("fewer than its own landings", 3, 5)

	// A fourth node: the read counted sessions since the last change, not
	// this one.
	p.pace.fleetDraws = 30
	p.tracker.seen(4, t0.Add(time.Second))
	check("read before the node count changed", 4, 0)
	met = p.tracker.met()
	p.pace.drawsMark = met
	check("read after", 4, 30)
}

// A pool probes for a node it lost with probability √(its share of the
// fleet's sessions), and never less often than one time in maxAimEvery.
func TestFleetTurn(t *testing.T) {
	for _, c := range []struct {
		share, u float64
		want     bool
	}{
		{1, 0.999, true},       // a lone pool: every due probe
		{1.0 / 16, 0.24, true}, // one of sixteen equal pools: a quarter
		{1.0 / 16, 0.26, false},
		{1.0 / 1000, 0.12, true}, // the floor, 1/8
		{1.0 / 1000, 0.13, false},
	} {
		if got := fleetTurn(c.share, c.u); got != c.want {
			t.Errorf("fleetTurn(%v, %v) = %v, want %v", c.share, c.u, got, c.want)
		}
	}
}

// The pool's share counts the fleet's sessions on the nodes it knows, from
// a read sent after since; without one it is 1.
func TestFleetShare(t *testing.T) {
	p := &Pool{tracker: newTracker()}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for id := range NodeID(3) {
		p.tracker.seen(id+1, t0)
	}
	p.tracker.node(1).conns.Add(5)
	p.tracker.node(3).conns.Add(5) // node 2 lost: none there
	check := func(what string, since time.Time, want float64) {
		t.Helper()
		if got := p.fleetShare(since); math.Abs(got-want) > 1e-9 {
			t.Errorf("%s: share %v, want %v", what, got, want)
		}
	}
	check("no read", t0, 1)
	// Sixteen pools of ten on nodes 1 and 3, and a region away the same
	// user's sessions on nodes 7 and 8, which this pool does not know.
	p.pace.fleet, p.pace.fleetRead = map[NodeID]int{1: 80, 3: 80, 7: 500, 8: 500}, t0.Add(time.Second)
	check("sixteen pools", t0, 10.0/160)
	check("a read from before since", t0.Add(time.Second), 1)
	p.pace.fleet = map[NodeID]int{1: 5, 3: 5}
	check("the pool alone", t0, 1)
	p.pace.fleet = map[NodeID]int{1: 4}
	check("fewer listed than the pool holds (a read racing its connects)", t0, 1)
}
