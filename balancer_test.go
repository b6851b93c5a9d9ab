package clusterpool

import (
	"context"
	"crypto/tls"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

func TestBalanceTargets(t *testing.T) {
	ids := func(n int) []NodeID {
		s := make([]NodeID, n)
		for i := range s {
			s[i] = NodeID(i + 1)
		}
		return s
	}
	for _, tc := range []struct {
		size  int
		nodes []NodeID
	}{
		{30, ids(3)}, {30, ids(4)}, {31, ids(4)}, {2, ids(5)}, {0, ids(3)},
		{12, ids(1)}, {7, []NodeID{5, 900, 1 << 40}}, {100, ids(7)},
	} {
		for seed := range uint64(20) {
			got := balanceTargets(tc.size, tc.nodes, seed)
			sum, lo, hi := 0, tc.size, 0
			for _, id := range tc.nodes {
				v, ok := got[id]
				if !ok {
					t.Fatalf("size %d nodes %v seed %d: node %d has no target", tc.size, tc.nodes, seed, id)
				}
				sum, lo, hi = sum+v, min(lo, v), max(hi, v)
			}
			if sum != tc.size || hi-lo > 1 || len(got) != len(tc.nodes) {
				t.Fatalf("size %d nodes %v seed %d: targets %v: sum %d, spread %d", tc.size, tc.nodes, seed, got, sum, hi-lo)
			}
			// Stable: the same inputs, in any order, give the same targets.
			shuffled := slices.Clone(tc.nodes)
			rand.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
			if again := balanceTargets(tc.size, shuffled, seed); !maps.Equal(got, again) {
				t.Fatalf("targets depend on node order: %v vs %v", got, again)
			}
		}
	}
	if balanceTargets(10, nil, 1) != nil {
		t.Fatal("no nodes: want nil targets")
	}
}

// The remainder must not go to the same node for every pool: across many
// pools (seeds), each node gets the extra connection about equally often.
func TestBalanceTargetsRemainderSpreadsAcrossPools(t *testing.T) {
	nodes := []NodeID{1, 2, 3, 4}
	extra := map[NodeID]int{}
	const pools = 4000
	for seed := range uint64(pools) {
		for id, v := range balanceTargets(31, nodes, seed*0x9e3779b97f4a7c15+7) {
			if v == 8 {
				extra[id]++
			}
		}
	}
	for _, id := range nodes {
		// 3 of 4 nodes get the extra: expect 3000 each; allow a wide margin.
		if extra[id] < 2700 || extra[id] > 3300 {
			t.Fatalf("node %d got the remainder in %d of %d pools: %v", id, extra[id], pools, extra)
		}
	}
}

// Adding a node moves the remainder only where it must: nodes that had the
// extra connection and still get one keep it (rendezvous hashing).
func TestBalanceTargetsStableWhenNodesChange(t *testing.T) {
	for seed := range uint64(50) {
		before := balanceTargets(14, []NodeID{1, 2, 3, 4, 5}, seed) // 2 each, 4 get an extra
		after := balanceTargets(16, []NodeID{1, 2, 3, 4, 5}, seed)  // 3 each, 1 gets an extra
		// The node with the extra at size 16 is the top-ranked one, which also
		// had an extra at size 14.
		for id, v := range after {
			if v == 4 && before[id] != 3 {
				t.Fatalf("seed %d: top-ranked node %d lost its extra: before %v after %v", seed, id, before, after)
			}
		}
	}
}

func views(conns map[NodeID]int, ineligible ...NodeID) []nodeView {
	var vs []nodeView
	for _, id := range slices.Sorted(maps.Keys(conns)) {
		vs = append(vs, nodeView{ID: id, Conns: conns[id], Eligible: !slices.Contains(ineligible, id), Refillable: true})
	}
	return vs
}

func TestPlanPrune(t *testing.T) {
	for _, tc := range []struct {
		name    string
		nodes   []nodeView
		targets map[NodeID]int
		exact   bool
		want    map[NodeID]int
	}{
		{
			name:    "balanced: nothing",
			nodes:   views(map[NodeID]int{1: 10, 2: 10, 3: 10}),
			targets: map[NodeID]int{1: 10, 2: 10, 3: 10},
		},
		{
			name:    "off by one, remainder elsewhere, size moving: nothing (counts lag)",
			nodes:   views(map[NodeID]int{1: 8, 2: 8, 3: 7, 4: 7}),
			targets: map[NodeID]int{1: 7, 2: 8, 3: 8, 4: 7},
		},
		{
			name:    "off by one, remainder elsewhere, steady: the extra moves where the hash says",
			nodes:   views(map[NodeID]int{1: 8, 2: 8, 3: 7, 4: 7}),
			targets: map[NodeID]int{1: 7, 2: 8, 3: 8, 4: 7},
			exact:   true,
			want:    map[NodeID]int{1: 1},
		},
		{
			name:    "steady and at the targets: nothing",
			nodes:   views(map[NodeID]int{1: 7, 2: 8, 3: 8, 4: 7}),
			targets: map[NodeID]int{1: 7, 2: 8, 3: 8, 4: 7},
			exact:   true,
		},
		{
			name: "steady, two extras misplaced, one slot refillable: one moves",
			nodes: []nodeView{
				{ID: 1, Conns: 3, Eligible: true, Refillable: true},
				{ID: 2, Conns: 3, Eligible: true, Refillable: true},
				{ID: 3, Conns: 2, Eligible: true, Refillable: true},
				{ID: 4, Conns: 2, Eligible: true, Refillable: false},
			},
			targets: map[NodeID]int{1: 2, 2: 2, 3: 3, 4: 3},
			exact:   true,
			want:    map[NodeID]int{1: 1},
		},
		{
			name:    "new node: each old node sheds half its excess, rounded up",
			nodes:   views(map[NodeID]int{1: 10, 2: 10, 3: 10, 4: 0}),
			targets: map[NodeID]int{1: 8, 2: 7, 3: 8, 4: 7},
			want:    map[NodeID]int{1: 1, 2: 2, 3: 1},
		},
		{
			name:    "large excess halves",
			nodes:   views(map[NodeID]int{1: 30, 2: 0, 3: 0}),
			targets: map[NodeID]int{1: 10, 2: 10, 3: 10},
			want:    map[NodeID]int{1: 10},
		},
		{
			name:    "excess one but two above the emptiest node: sheds one",
			nodes:   views(map[NodeID]int{1: 9, 2: 7, 3: 7, 4: 7}),
			targets: map[NodeID]int{1: 8, 2: 7, 3: 8, 4: 7},
			want:    map[NodeID]int{1: 1},
		},
		{
			name:    "over target but nobody under: nothing (pruning would churn)",
			nodes:   views(map[NodeID]int{1: 11, 2: 10, 3: 9}),
			targets: map[NodeID]int{1: 10, 2: 10},
		},
		{
			name:    "ineligible node sheds everything",
			nodes:   views(map[NodeID]int{1: 5, 2: 5, 3: 5}, 3),
			targets: map[NodeID]int{1: 8, 2: 7},
			want:    map[NodeID]int{3: 5},
		},
		{
			name: "under-target node not refillable: nothing",
			nodes: []nodeView{
				{ID: 1, Conns: 10, Eligible: true, Refillable: true},
				{ID: 2, Conns: 10, Eligible: true, Refillable: true},
				{ID: 3, Conns: 0, Eligible: true, Refillable: false},
			},
			targets: map[NodeID]int{1: 7, 2: 7, 3: 6},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := planPrune(tc.nodes, tc.targets, tc.exact)
			if !maps.Equal(got, tc.want) {
				t.Fatalf("planPrune = %v, want %v", got, tc.want)
			}
		})
	}
}

// simulate runs balancing rounds where every pruned connection is replaced by
// one placed by place (direct placement or a random load balancer) and
// returns the rounds and the connections opened until max-min <= 1.
func simulate(t *testing.T, counts map[NodeID]int, place func(counts, targets map[NodeID]int) NodeID) (rounds, opened int) {
	t.Helper()
	ids := slices.Sorted(maps.Keys(counts))
	for rounds = 0; rounds < 200; rounds++ {
		if isBalanced(counts, ids) {
			return rounds, opened
		}
		plan := planBalance(views(counts), 42, false)
		for id, k := range plan.Prune {
			counts[id] -= k
		}
		for _, k := range plan.Prune {
			for range k {
				counts[place(counts, plan.Targets)]++
				opened++
			}
		}
	}
	t.Fatalf("not balanced after %d rounds: %v", rounds, counts)
	return
}

func TestPlanConvergesWithPlacement(t *testing.T) {
	// Direct placement: the new connection goes to the node most below target.
	place := func(counts, targets map[NodeID]int) NodeID {
		best, bestGap := NodeID(0), 1<<30
		for _, id := range slices.Sorted(maps.Keys(counts)) {
			if gap := counts[id] - targets[id]; gap < bestGap {
				best, bestGap = id, gap
			}
		}
		return best
	}
	for _, tc := range []struct {
		counts    map[NodeID]int
		maxRounds int
		minMoves  int
	}{
		{map[NodeID]int{1: 10, 2: 10, 3: 10, 4: 0}, 5, 7},
		{map[NodeID]int{1: 30, 2: 0, 3: 0}, 5, 20},
		{map[NodeID]int{1: 8, 2: 8, 3: 8, 4: 8, 5: 0}, 5, 6},
	} {
		name := fmt.Sprint(tc.counts)
		rounds, opened := simulate(t, tc.counts, place)
		t.Logf("%s: %d rounds, %d opened (min %d)", name, rounds, opened, tc.minMoves)
		if rounds > tc.maxRounds || opened > 2*tc.minMoves {
			t.Errorf("%s: %d rounds (max %d), %d opened (min moves %d)", name, rounds, tc.maxRounds, opened, tc.minMoves)
		}
	}
}

// Behind one random load-balancer address every dial reaches each of the
// N = 4 nodes with probability 1/N, whatever the client does. The bounds
// below follow from that, not from a measurement:
//
//   - Opened: by Wald's identity the mean number of dials is N times the
//     mean number that reach the new node, and the new node ends with its
//     share (7 or 8 of 30), so the mean is N×7 to N×8 dials when no
//     connection that reached the new node is ever moved away again (which
//     is asserted run by run). Redials do not change this (each is a dial),
//     which is why docs/balancing.md says "alike".
//   - Rounds: a refused connection dials again, so with r redials a
//     replacement reaches the new node with probability 1-(3/4)^(r+1):
//     0.25, 0.44 and 0.68 for 0, 1 and 3. More moves land per round, so
//     the rounds fall; with 3 redials at least twice as fast as with none
//     (the probability ratio is 2.7).
//
// The run is seeded, so the figures are the same on every machine; the
// tolerance on the means is four standard errors of the sample.
func TestPlanConvergesBehindRandomBalancer(t *testing.T) {
	const nodes, runs = 4, 500
	const minShare, maxShare = 7, 8 // the new node's share of 30 over 4
	meanRounds := map[int]float64{}
	for _, redials := range []int{0, 1, 3} {
		rng := rand.New(rand.NewPCG(1, 2))
		var opened []float64
		totalRounds := 0
		for run := range runs {
			counts := map[NodeID]int{1: 10, 2: 10, 3: 10, 4: 0}
			dials, reachedNew := 0, 0
			place := func(counts, targets map[NodeID]int) NodeID {
				for i := 0; ; i++ {
					id := NodeID(rng.IntN(nodes) + 1)
					dials++
					if i == redials || counts[id] < targets[id] {
						if id == 4 {
							reachedNew++
						}
						return id
					}
				}
			}
			r, _ := simulate(t, counts, place)
			totalRounds += r
			opened = append(opened, float64(dials))
			if counts[4] != reachedNew || counts[4] < minShare || counts[4] > maxShare {
				t.Fatalf("%d redials, run %d: %d connections placed on the new node, %d left there (want %d to %d, none moved away): %v",
					redials, run, reachedNew, counts[4], minShare, maxShare, counts)
			}
		}
		mean, se := meanAndStdErr(opened)
		meanRounds[redials] = float64(totalRounds) / runs
		t.Logf("random LB, 3+1 nodes, pool 30, %d redials: mean %.1f rounds, %.1f±%.1f opened (min %d)",
			redials, meanRounds[redials], mean, se, minShare)
		if lo, hi := nodes*minShare-4*se, nodes*maxShare+4*se; mean < lo || mean > hi {
			t.Errorf("%d redials: mean %.1f opened, want N × the new node's share: %.1f to %.1f", redials, mean, lo, hi)
		}
	}
	if !(meanRounds[3]*2 <= meanRounds[0] && meanRounds[3] < meanRounds[1] && meanRounds[1] < meanRounds[0]) {
		t.Errorf("redials must cut the rounds (3 redials at least twice as fast as none): mean rounds %v", meanRounds)
	}
}

// meanAndStdErr returns the mean of xs and its standard error.
func meanAndStdErr(xs []float64) (mean, se float64) {
	for _, x := range xs {
		mean += x
	}
	mean /= float64(len(xs))
	var ss float64
	for _, x := range xs {
		ss += (x - mean) * (x - mean)
	}
	return mean, math.Sqrt(ss/float64(len(xs)-1)) / math.Sqrt(float64(len(xs)))
}

func TestPlacementOrder(t *testing.T) {
	nodes := map[NodeID]placementNode{
		1: {Conns: 10, Target: 8, Eligible: true},
		2: {Conns: 5, Target: 8, Eligible: true},
		3: {Conns: 7, Target: 7, Eligible: true},
		4: {Conns: 0, Target: 7, Eligible: false},
		5: {Conns: 1, Target: 7, Eligible: true, Avoid: true},
		6: {Conns: 6, Target: 7, Eligible: true},
	}
	// Hosts: node 1, unknown, node 2, node 3, node 4, node 5, node 6.
	hosts := []NodeID{1, 0, 2, 3, 4, 5, 6}
	got := placementOrder(hosts, nil, nil, nodes, 9)
	// Under target, most under first: node 2 (-3), node 6 (-1); unknown host;
	// at/over target, least over first: node 3 (0), node 1 (+2); then the
	// ineligible and avoided ones in connection-string order (rotated by seed).
	wantPrefix := []int{2, 6, 1, 3, 0}
	if !slices.Equal(got[:5], wantPrefix) {
		t.Fatalf("placementOrder = %v, want prefix %v", got, wantPrefix)
	}
	rest := slices.Sorted(slices.Values(got[5:]))
	if !slices.Equal(rest, []int{4, 5}) {
		t.Fatalf("placementOrder = %v: want hosts 4 and 5 last", got)
	}
	if len(placementOrder(nil, nil, nil, nodes, 1)) != 0 {
		t.Fatal("no hosts: want empty order")
	}
}

// Connects placed on a host before any connection had mapped it count
// towards the node the host turns out to lead to, once one connect has
// learned it. Otherwise, during a cold start, that node looks under-filled
// while its first connects are still under way, and gets more than its
// share (35 connections for a pool of 30 were seen under CPU load).
func TestLiveNodesCountsUnmappedReservations(t *testing.T) {
	p := &Pool{tracker: newTracker()}
	b := newPlacement(p)
	now := time.Now()
	p.tracker.seen(1, now)
	p.tracker.seen(2, now)
	until := now.Add(reservationTTL)
	for range 4 {
		b.reservations = append(b.reservations, &reservation{host: "10.0.0.1:26257", until: until})
	}
	b.hostNodes["10.0.0.2:26257"] = 2
	b.reservations = append(b.reservations, &reservation{host: "10.0.0.2:26257", until: until})

	info, total := b.liveNodes(now, 1, 0)
	if total != 6 || info[1].Conns != 0 || info[2].Conns != 1 {
		t.Fatalf("host not mapped yet: total %d, nodes %+v; want total 6, node 1 with 0, node 2 with 1", total, info)
	}
	b.hostNodes["10.0.0.1:26257"] = 1
	info, total = b.liveNodes(now, 1, 0)
	if total != 6 || info[1].Conns != 4 || info[2].Conns != 1 {
		t.Fatalf("host mapped to node 1: total %d, nodes %+v; want total 6, node 1 with 4, node 2 with 1", total, info)
	}
}

func TestConnectLimiter(t *testing.T) {
	if newConnectLimiter(0, 30) != nil {
		t.Fatal("rate 0: want no limiter")
	}
	lim := newConnectLimiter(5, 30)
	now := time.Now()
	// A cold start of a 30-connection pool is not slowed...
	if !lim.AllowN(now, 30) {
		t.Fatal("burst must cover MaxConns")
	}
	// ...but the next connections are.
	if lim.AllowN(now, 1) {
		t.Fatal("after the burst, connections must wait for the rate")
	}
	if !lim.AllowN(now.Add(time.Second), 5) || lim.AllowN(now.Add(time.Second), 1) {
		t.Fatal("after 1 s at 5/s, exactly 5 more connections may start")
	}
}

func TestJitter(t *testing.T) {
	for _, u := range []float64{0, 0.5, 0.999} {
		d := jitter(time.Second, u)
		if d < 800*time.Millisecond || d >= 1200*time.Millisecond {
			t.Fatalf("jitter(1s, %v) = %v", u, d)
		}
	}
}

func TestExpiryWindow(t *testing.T) {
	for _, tc := range []struct {
		n    int
		want time.Duration // at 5 s intervals
	}{
		{1, 15 * time.Second}, // 3 balance intervals
		{3, 144 * time.Second},
		{10, 534 * time.Second},
	} {
		if got := expiryWindow(5*time.Second, 5*time.Second, tc.n); got != tc.want {
			t.Errorf("expiryWindow(5s, 5s, %d) = %v, want %v", tc.n, got, tc.want)
		}
		// The probability that a live node is missed by every probe in the
		// window (at the slowest jittered interval) is below 1e-4.
		probes := float64(expiryWindow(5*time.Second, 5*time.Second, tc.n)) / float64(6*time.Second)
		if miss := pow(1-1/float64(tc.n), probes); tc.n > 1 && miss >= expiryProbability {
			t.Errorf("n=%d: miss probability %g", tc.n, miss)
		}
	}
}

func pow(x, y float64) float64 {
	r := 1.0
	for range int(y) {
		r *= x
	}
	return r
}

func TestInstallRedialRepeatsAllAttempts(t *testing.T) {
	cc, err := pgx.ParseConfig("postgres://u@lb.example:26257/db?sslmode=prefer")
	if err != nil {
		t.Fatal(err)
	}
	if len(cc.Fallbacks) != 1 { // prefer: TLS first, then plain
		t.Fatalf("sslmode=prefer fallbacks: %d", len(cc.Fallbacks))
	}
	b := &placement{}
	b.reached.Store(true) // a connect reached a node: redials are worth it
	check := b.installRedial(cc, nil, true, false, &dialTokens{})
	// The original plain attempt, then maxRedials copies of (TLS, plain).
	if want := 1 + maxRedials*2; len(cc.Fallbacks) != want {
		t.Fatalf("fallbacks after installRedial: %d, want %d", len(cc.Fallbacks), want)
	}
	for i, fb := range cc.Fallbacks {
		if fb.Host != "lb.example" || fb.Port != 26257 {
			t.Fatalf("fallback %d: %s:%d", i, fb.Host, fb.Port)
		}
		if tls := fb.TLSConfig != nil; tls != (i%2 == 1) {
			t.Fatalf("fallback %d: TLS %v; want TLS and plain attempts alternating", i, tls)
		}
	}
	if check == nil {
		t.Fatal("no ValidateConnect check returned")
	}
}

func TestHostGroupsKeepsVariantsTogether(t *testing.T) {
	cc, err := pgx.ParseConfig("postgres://u@10.0.0.1:26257,10.0.0.2:26257,10.0.0.3:26258/db?sslmode=prefer")
	if err != nil {
		t.Fatal(err)
	}
	groups := hostGroups(cc)
	if len(groups) != 3 {
		t.Fatalf("groups: %d", len(groups))
	}
	for _, g := range groups {
		if len(g.entries) != 2 {
			t.Fatalf("group %s: %d entries, want TLS and plain", g.key, len(g.entries))
		}
	}
	setHosts(cc, groups, []int{2, 0, 1})
	if cc.Host != "10.0.0.3" || cc.Port != 26258 || cc.TLSConfig == nil {
		t.Fatalf("first host %s:%d (TLS %v), want 10.0.0.3:26258 with TLS", cc.Host, cc.Port, cc.TLSConfig != nil)
	}
	if got := cc.Fallbacks[0]; got.Host != "10.0.0.3" || got.TLSConfig != nil {
		t.Fatalf("second attempt %s (TLS %v), want 10.0.0.3 plain", got.Host, got.TLSConfig != nil)
	}
	if len(cc.Fallbacks) != 5 || cc.Fallbacks[1].Host != "10.0.0.1" || cc.Fallbacks[3].Host != "10.0.0.2" {
		t.Fatalf("order after setHosts: %v", cc.Fallbacks)
	}
}

func TestGossipErrorsThatStopQuerying(t *testing.T) {
	for code, transient := range map[string]bool{"42501": false, "42P01": false, "3F000": false, "42703": false, "57P01": true, "40001": true} {
		if got := isTransient(&pgconn.PgError{Code: code}); got != transient {
			t.Errorf("isTransient(%s) = %v, want %v", code, got, transient)
		}
	}
	if !isTransient(context.DeadlineExceeded) {
		t.Error("a timeout must not stop gossip queries")
	}
}

func TestTLSForNamesTheDialledHost(t *testing.T) {
	if got := tlsFor(nil, "10.0.0.2"); got != nil {
		t.Errorf("tlsFor(nil) = %v, want nil", got)
	}
	verifyCA := &tls.Config{InsecureSkipVerify: true}
	if got := tlsFor(verifyCA, "10.0.0.2"); got != verifyCA {
		t.Errorf("tlsFor without ServerName made a copy; want the shared config")
	}
	full := &tls.Config{ServerName: "lb.example.com"}
	got := tlsFor(full, "node2.example.com")
	if got == full || got.ServerName != "node2.example.com" {
		t.Errorf("tlsFor(verify-full) ServerName = %q (same pointer %v), want a copy naming node2.example.com", got.ServerName, got == full)
	}
	if full.ServerName != "lb.example.com" {
		t.Errorf("tlsFor changed the original config's ServerName to %q", full.ServerName)
	}
}

// TestChainShouldPing: the user's ShouldPing (or pgxpool's default, idle
// over a second) still decides. (That a pinged connection is marked needs a
// real connection: TestPartition checks that its node gets checked.)
func TestChainShouldPing(t *testing.T) {
	def := chainShouldPing(nil)
	if def(context.Background(), pgxpool.ShouldPingParams{IdleDuration: time.Millisecond}) {
		t.Error("default pings a connection idle for 1 ms")
	}
	if !def(context.Background(), pgxpool.ShouldPingParams{IdleDuration: 2 * time.Second}) {
		t.Error("default does not ping a connection idle for 2 s")
	}
	calls := 0
	user := chainShouldPing(func(context.Context, pgxpool.ShouldPingParams) bool { calls++; return false })
	if user(context.Background(), pgxpool.ShouldPingParams{IdleDuration: time.Hour}) || calls != 1 {
		t.Error("the user's ShouldPing did not decide")
	}
}

// TestBeforeConnectDefaultConnectTimeout: each pool connect gets
// DefaultConnectTimeout per host when the connection string sets none
// (pgxpool would use 2 minutes), and the user's connect_timeout otherwise.
func TestBeforeConnectDefaultConnectTimeout(t *testing.T) {
	for _, tt := range []struct {
		connString string
		want       time.Duration
	}{
		{"postgres://u@127.0.0.1:1/db", DefaultConnectTimeout},
		{"postgres://u@127.0.0.1:1/db?connect_timeout=3", 3 * time.Second},
		{"postgres://u@127.0.0.1:1/db?cluster_node_identity=none", DefaultConnectTimeout},
	} {
		cfg, err := ParseConfig(tt.connString)
		if err != nil {
			t.Fatal(err)
		}
		p := newPool(cfg)
		cc := cfg.ConnConfig.Copy()
		cc.ConnectTimeout = 2 * time.Minute // what pgxpool sets when the user set none
		if cfg.ConnConfig.ConnectTimeout != 0 {
			cc.ConnectTimeout = cfg.ConnConfig.ConnectTimeout
		}
		if err := p.beforeConnect(context.Background(), cc); err != nil {
			t.Fatal(err)
		}
		if cc.ConnectTimeout != tt.want {
			t.Errorf("%s: ConnectTimeout %v, want %v", tt.connString, cc.ConnectTimeout, tt.want)
		}
		if got := min(tt.want, maxCheckTimeout); p.checkTimeout() != got {
			t.Errorf("%s: checkTimeout %v, want %v", tt.connString, p.checkTimeout(), got)
		}
	}
}
