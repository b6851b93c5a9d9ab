package clusterpool

import (
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// fleetPlace says where a replacement connection lands in fleetSim: the
// node it reached, and how many connections it opened to get there.
type fleetPlace func(r *rand.Rand, counts, targets map[NodeID]int, nodes []NodeID) (NodeID, int)

// placeDirect is placement with the nodes' hosts listed: the connection
// goes to the node most below its target.
func placeDirect(_ *rand.Rand, counts, targets map[NodeID]int, nodes []NodeID) (NodeID, int) {
	best := nodes[0]
	for _, id := range nodes {
		if targets[id]-counts[id] > targets[best]-counts[best] {
			best = id
		}
	}
	return best, 1
}

// placeRandom is one load-balancer address with redials: each dial
// reaches a random node, and one landing where it is not wanted is refused
// (by the rule placement.overTarget applies when the pool is back at its
// steady size) and dialled again, up to moveRedials times (a move's
// replacement in the background).
func placeRandom(r *rand.Rand, counts, targets map[NodeID]int, nodes []NodeID) (NodeID, int) {
	for dials := 1; ; dials++ {
		id := nodes[r.IntN(len(nodes))]
		if dials > moveRedials || counts[id] < targets[id] {
			return id, dials
		}
		wanted := false
		for _, o := range nodes {
			wanted = wanted || (counts[o] < targets[o] && worthMoving(counts[id], counts[o], true))
		}
		if !wanted {
			return id, dials
		}
	}
}

// fleetPool is one pool's outcome in fleetSim.
type fleetPool struct {
	seed        uint64
	counts      map[NodeID]int
	moves       int // connections pruned
	opened      int // connections opened to replace them
	minMoves    int // the fewest moves from where it started to its targets
	laxMoves    int // moves the planner makes when it never enforces the remainder
	rounds      int
	quietRounds bool // the rounds ended with a plan that prunes nothing
}

// fleetSim runs P pools of size conns through the pure planner, no cluster:
// every pool starts over nodes 1..from with its remainder where history put
// it (random), or with node `rejoin` (≤ from) just back from a restart and
// holding nothing; then nodes up to `to` join, and each pool runs steady
// rounds (the pool is at its full size, so the remainder is enforced) until
// a round prunes nothing. A pruned connection is replaced where place puts
// it. The pools' seeds come from seeds, everything else from r: a change to
// the placement model leaves the fleet's hashing as it was.
func fleetSim(r, seeds *rand.Rand, pools, conns, from, to, rejoin int, place fleetPlace) []fleetPool {
	var nodes []NodeID
	for i := 1; i <= to; i++ {
		nodes = append(nodes, NodeID(i))
	}
	var out []fleetPool
	for range pools {
		fp := fleetPool{seed: seeds.Uint64(), counts: make(map[NodeID]int)}
		start := make(map[NodeID]int)
		var held []NodeID // the nodes that held the pool before
		for i := 1; i <= from; i++ {
			if i != rejoin {
				held = append(held, NodeID(i))
			}
		}
		for _, id := range held {
			start[id] = conns / len(held)
		}
		for _, i := range r.Perm(len(held))[:conns%len(held)] {
			start[held[i]]++
		}
		targets := balanceTargets(conns, nodes, fp.seed)
		for _, id := range nodes {
			fp.minMoves += max(0, start[id]-targets[id])
		}
		for _, exact := range []bool{false, true} {
			counts := maps.Clone(start)
			moves, opened, rounds := 0, 0, 0
			quiet := false
			for rounds = 0; rounds < 100; rounds++ {
				var views []nodeView
				for _, id := range nodes {
					views = append(views, nodeView{ID: id, Conns: counts[id], Eligible: true, Refillable: true})
				}
				plan := planBalance(views, fp.seed, exact)
				if len(plan.Prune) == 0 {
					quiet = true
					break
				}
				for _, id := range slices.Sorted(maps.Keys(plan.Prune)) {
					counts[id] -= plan.Prune[id]
					moves += plan.Prune[id]
				}
				for _, id := range slices.Sorted(maps.Keys(plan.Prune)) {
					for range plan.Prune[id] {
						to, dials := place(r, counts, plan.Targets, nodes)
						counts[to]++
						opened += dials
					}
				}
			}
			if !exact {
				fp.laxMoves = moves
				continue
			}
			fp.counts, fp.moves, fp.opened, fp.rounds, fp.quietRounds = counts, moves, opened, rounds, quiet
		}
		out = append(out, fp)
	}
	return out
}

// fleetOutcome sums a fleet's pools per node and returns the cluster-wide
// spread (max-min) and the count on node id.
func fleetOutcome(pools []fleetPool, nodes int, id NodeID) (spread, onNode int) {
	cluster := make(map[NodeID]int)
	for _, fp := range pools {
		for n, c := range fp.counts {
			cluster[n] += c
		}
	}
	lo, hi := 1<<30, 0
	for i := 1; i <= nodes; i++ {
		c := cluster[NodeID(i)]
		lo, hi = min(lo, c), max(hi, c)
	}
	return hi - lo, cluster[id]
}

// TestFleetSimulation is issue 13's fleet outcome on the pure planner: 16
// pools × 10 connections over 3 nodes, then a 4th joins (scale-out), or node
// 1 comes back from a restart to 4 nodes; 200 fleets each, with the hosts
// listed and behind one random load balancer. Every pool ends exactly at
// its hashed targets (so the cluster is as even as independent fair hashing
// of remainders makes it), in a round that prunes nothing, with few moves
// beyond the fewest it needs; and over the fleets the cluster-wide spread
// is at most 7 at p90, and the joining node holds at least 95% of its fair
// share (40) as often as hashing allows, all of it at p50.
func TestFleetSimulation(t *testing.T) {
	const pools, conns, fleets = 16, 10, 200
	for _, tc := range []struct {
		name           string
		from, rejoin   int
		joining        NodeID
		place          fleetPlace
		maxExtraPerRun float64 // mean moves per pool beyond the lax planner's
	}{
		{"scale-out, hosts", 3, 0, 4, placeDirect, 1},
		{"scale-out, load balancer", 3, 0, 4, placeRandom, 1},
		{"restart, hosts", 4, 1, 1, placeDirect, 1},
		{"restart, load balancer", 4, 1, 1, placeRandom, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var spreads, joined []int
			extra, opened, moves := 0, 0, 0
			for s := range fleets {
				r := rand.New(rand.NewPCG(uint64(s), 1))
				seeds := rand.New(rand.NewPCG(uint64(s), 2))
				fleet := fleetSim(r, seeds, pools, conns, tc.from, 4, tc.rejoin, tc.place)
				for i, fp := range fleet {
					want := balanceTargets(conns, []NodeID{1, 2, 3, 4}, fp.seed)
					if !maps.Equal(fp.counts, want) || !fp.quietRounds {
						t.Fatalf("fleet %d pool %d: ended at %v after %d rounds (quiet %v), want its targets %v", s, i, fp.counts, fp.rounds, fp.quietRounds, want)
					}
					if tc.place != nil && fp.moves < fp.minMoves {
						t.Fatalf("fleet %d pool %d: %d moves, fewer than the %d needed", s, i, fp.moves, fp.minMoves)
					}
					extra += fp.moves - fp.laxMoves
					opened += fp.opened
					moves += fp.moves
				}
				spread, on := fleetOutcome(fleet, 4, tc.joining)
				spreads = append(spreads, spread)
				joined = append(joined, on)
			}
			slices.Sort(spreads)
			slices.Sort(joined)
			p90, p10, p50 := spreads[fleets*9/10], joined[fleets/10], joined[fleets/2]
			meanExtra := float64(extra) / float64(fleets*pools)
			t.Logf("%d fleets: cluster spread p50 %d p90 %d max %d; node %d p10 %d p50 %d (fair 40); moves per pool %.2f (%.2f beyond the lax planner's), %.2f opened per move",
				fleets, spreads[fleets/2], p90, spreads[fleets-1], tc.joining, p10, p50,
				float64(moves)/float64(fleets*pools), meanExtra, float64(opened)/float64(max(moves, 1)))
			// Hashing alone gives a spread ≤ 7 with probability 0.91 (16
			// pools each putting their 2 extras on 2 of 4 nodes), so the
			// p90 of a sample sits at 7 or 8: the seeds are drawn apart
			// from the placement's randomness, so this sample's hashing
			// stays the same whatever placement model runs.
			if p90 > 7 {
				t.Errorf("cluster spread p90 %d, want ≤ 7", p90)
			}
			// Independent fair hashing gives the joining node 32 + X, X
			// binomial(16, 1/2): below 38 (95% of 40) with probability
			// 0.105, and that is the floor for pools that do not talk to
			// each other.
			fair := 0
			for _, on := range joined {
				if on >= 38 {
					fair++
				}
			}
			if share := float64(fair) / fleets; share < 0.85 || p10 < 37 || p50 < 40 {
				t.Errorf("joining node ≥ 38 in %.0f%% of fleets (hashing: 89.5%%), p10 %d p50 %d; want ≥ 85%%, ≥ 37, ≥ 40", 100*share, p10, p50)
			}
			if meanExtra > tc.maxExtraPerRun {
				t.Errorf("%.2f moves per pool beyond the lax planner's, want ≤ %v", meanExtra, tc.maxExtraPerRun)
			}
		})
	}
}

// With the remainder enforced only while the pool is steady, the old rule
// (nodes two apart) still holds the line while it is not: a pool one apart
// everywhere prunes nothing unless steady.
func TestSteadiness(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	hold := 250 * time.Millisecond
	var s steadiness
	var ok bool
	for _, step := range []struct {
		at       int // ms
		size     int
		settling bool
		want     bool
	}{
		{0, 30, false, false},    // first look
		{150, 30, false, false},  // not held long enough
		{300, 30, false, true},   // held 300 ms ≥ 250 ms
		{600, 30, true, false},   // connects under way
		{800, 30, false, false},  // held only since 600 ms
		{1200, 30, false, true},  // held
		{1500, 29, false, false}, // size moved
		{1800, 29, false, true},
		{2100, 11, false, false}, // below MinConns (12)
		{2400, 11, false, false},
	} {
		s, ok = s.observe(step.size, 12, step.settling, t0.Add(time.Duration(step.at)*time.Millisecond), hold)
		if ok != step.want {
			t.Fatalf("at %d ms size %d settling %v: steady %v, want %v", step.at, step.size, step.settling, ok, step.want)
		}
	}
}

// A node that joins while the pool is steady receives moves only after the
// delay drawn for it; during a cold start (not steady) at once; a node that
// leaves the eligible set and comes back is held back again.
func TestSpreadJoins(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ready := make(map[NodeID]time.Time)
	vs := func(eligible4 bool) []nodeView {
		return []nodeView{
			{ID: 1, Conns: 5, Eligible: true, Refillable: true},
			{ID: 2, Conns: 5, Eligible: true, Refillable: true},
			{ID: 4, Conns: 0, Eligible: eligible4, Refillable: true},
		}
	}
	refillable := func(v []nodeView) (ids []NodeID) {
		for _, n := range v {
			if n.Refillable {
				ids = append(ids, n.ID)
			}
		}
		return ids
	}
	// A cold start: nothing held back.
	v := vs(true)
	spreadJoins(v, ready, false, t0, time.Second)
	if got := refillable(v); !slices.Equal(got, []NodeID{1, 2, 4}) {
		t.Fatalf("cold start: refillable %v", got)
	}
	// Node 4 is evicted, then back while the pool is steady: held back for
	// the delay, then refillable.
	v = vs(false)
	spreadJoins(v, ready, true, t0.Add(time.Minute), time.Second)
	back := t0.Add(2 * time.Minute)
	for _, tc := range []struct {
		at   time.Duration
		want []NodeID
	}{
		{0, []NodeID{1, 2}},
		{999 * time.Millisecond, []NodeID{1, 2}},
		{time.Second, []NodeID{1, 2, 4}},
	} {
		v = vs(true)
		delay := time.Second // drawn at the first round back; later draws do not move it
		if tc.at > 0 {
			delay = 5 * time.Second
		}
		spreadJoins(v, ready, true, back.Add(tc.at), delay)
		if got := refillable(v); !slices.Equal(got, tc.want) {
			t.Fatalf("%v after node 4 is back: refillable %v, want %v", tc.at, got, tc.want)
		}
	}
	// A node gone from the views leaves the map.
	spreadJoins(vs(true)[:2], ready, true, back, time.Second)
	if _, ok := ready[4]; ok {
		t.Fatal("node 4 gone from the views but still in ready")
	}
}

// fleetSwapSim runs P pools of size conns on n nodes, each at its hashed
// targets, through rounds in which about half of them read the fleet's
// counts as they were at the round's start (reads are asynchronous and
// stale) and apply fleetSwap. It returns the cluster spread at the end, the
// swaps made, and the last round that made one.
func fleetSwapSim(r *rand.Rand, pools, conns, n, rounds int, landsBack bool) (spread, swaps, cancelled, last int) {
	var nodes []NodeID
	for i := 1; i <= n; i++ {
		nodes = append(nodes, NodeID(i))
	}
	seeds := make([]uint64, pools)
	own := make([][]remainderSwap, pools)
	targets := make([]map[NodeID]int, pools)
	for i := range seeds {
		seeds[i] = r.Uint64()
		targets[i] = balanceTargets(conns, nodes, seeds[i])
	}
	count := func() map[NodeID]int {
		c := make(map[NodeID]int)
		for _, t := range targets {
			for id, k := range t {
				c[id] += k
			}
		}
		return c
	}
	for round := 1; round <= rounds; round++ {
		fleet := count()
		for _, i := range r.Perm(pools) {
			if r.IntN(2) == 0 {
				continue
			}
			s, ok := fleetSwap(targets[i], fleet, conns, r.Float64(), landsBack)
			if !ok {
				continue
			}
			last = round
			if landsBack && r.IntN(2) == 0 {
				cancelled++ // the replacement landed back on From first: cancelSwap
				continue
			}
			swaps++
			own[i] = append(own[i], s)
			targets[i] = balanceTargets(conns, nodes, seeds[i], own[i]...)
		}
	}
	c := count()
	lo, hi := math.MaxInt, 0
	for _, id := range nodes {
		lo, hi = min(lo, c[id]), max(hi, c[id])
	}
	return hi - lo, swaps, cancelled, last
}

// Pools that read the fleet's sessions per node and move a remainder
// connection now and then (fleetSwap) bring the cluster far closer to even
// than independent hashing (spread ≤ 7 in 91% of 16-pool fleets of 10 on 4
// nodes), for a small fleet and a large one, with stale reads, and then
// stop: no oscillation, and few swaps per pool.
func TestFleetSwapSimulation(t *testing.T) {
	const rounds = 40
	for _, tc := range []struct {
		pools, conns, nodes int
		maxP90              int
		fleets              int
		landsBack           bool // behind one address: half the swaps end where they began
	}{
		{16, 10, 4, 2, 200, false},
		{16, 10, 3, 2, 200, false},
		{200, 10, 4, 2, 50, false},
		{1000, 10, 4, 2, 20, false},
		{16, 10, 4, 2, 200, true},
		{16, 10, 3, 2, 200, true},
		{200, 10, 4, 2, 50, true},
		{1000, 10, 4, 2, 20, true},
	} {
		fleets := tc.fleets
		var spreads []int
		swaps, cancelled, late := 0, 0, 0
		for s := range fleets {
			r := rand.New(rand.NewPCG(uint64(s), 3))
			spread, n, c, last := fleetSwapSim(r, tc.pools, tc.conns, tc.nodes, rounds, tc.landsBack)
			spreads = append(spreads, spread)
			swaps += n
			cancelled += c
			if last > rounds/2 {
				late++
			}
		}
		slices.Sort(spreads)
		p90 := spreads[fleets*9/10]
		perPool := float64(swaps) / float64(fleets*tc.pools)
		t.Logf("%d pools × %d on %d nodes (lands back %v): spread p50 %d p90 %d max %d; %.2f swaps per pool (%.2f more ended where they began); %d fleets still swapping after round %d",
			tc.pools, tc.conns, tc.nodes, tc.landsBack, spreads[fleets/2], p90, spreads[fleets-1], perPool, float64(cancelled)/float64(fleets*tc.pools), late, rounds/2)
		if p90 > tc.maxP90 {
			t.Errorf("%d pools: cluster spread p90 %d, want ≤ %d", tc.pools, p90, tc.maxP90)
		}
		if perPool > 0.25 {
			t.Errorf("%d pools: %.2f swaps per pool, want ≤ 0.25", tc.pools, perPool)
		}
		if late > fleets/50 {
			t.Errorf("%d pools: %d of %d fleets still swapping after round %d, want ≤ 2%%", tc.pools, late, fleets, rounds/2)
		}
	}
}

// A swap moves a remainder connection only where it still applies (its
// From holds one, its To none), in order; fleetSwap moves an extra from the
// pool's busiest extra node to its quietest other node, only for a gap of 3
// or more, with the probability that makes the expected movers close it.
func TestFleetSwap(t *testing.T) {
	nodes := []NodeID{1, 2, 3, 4}
	var seed uint64
	for ; ; seed++ { // a seed whose two extras are on nodes 1 and 2
		if maps.Equal(balanceTargets(10, nodes, seed), map[NodeID]int{1: 3, 2: 3, 3: 2, 4: 2}) {
			break
		}
	}
	for _, tc := range []struct {
		swaps []remainderSwap
		want  map[NodeID]int
	}{
		{[]remainderSwap{{1, 3}}, map[NodeID]int{1: 2, 2: 3, 3: 3, 4: 2}},
		{[]remainderSwap{{1, 3}, {3, 4}}, map[NodeID]int{1: 2, 2: 3, 3: 2, 4: 3}},
		{[]remainderSwap{{3, 4}}, map[NodeID]int{1: 3, 2: 3, 3: 2, 4: 2}},         // node 3 holds no extra
		{[]remainderSwap{{1, 2}}, map[NodeID]int{1: 3, 2: 3, 3: 2, 4: 2}},         // node 2 holds one already
		{[]remainderSwap{{1, 9}}, map[NodeID]int{1: 3, 2: 3, 3: 2, 4: 2}},         // no node 9
		{[]remainderSwap{{1, 3}, {1, 4}}, map[NodeID]int{1: 2, 2: 3, 3: 3, 4: 2}}, // node 1's extra is gone
	} {
		if got := balanceTargets(10, nodes, seed, tc.swaps...); !maps.Equal(got, tc.want) {
			t.Errorf("swaps %v: %v, want %v", tc.swaps, got, tc.want)
		}
	}
	targets := balanceTargets(10, nodes, seed)
	// 16 pools of 10: 160 sessions. Node 1 (an extra) is the busiest of the
	// pool's extras, node 4 the quietest of the others: gap 8, 3 movers
	// wanted among max(8, 16 × 2/4 × 2/3) = 8 candidates: q = 3/8.
	fleet := map[NodeID]int{1: 44, 2: 41, 3: 39, 4: 36}
	if s, ok := fleetSwap(targets, fleet, 10, 0.37, false); !ok || s != (remainderSwap{From: 1, To: 4}) {
		t.Errorf("gap 8, draw 0.37 < 3/8: %v %v, want a swap from node 1 to node 4", s, ok)
	}
	if _, ok := fleetSwap(targets, fleet, 10, 0.38, false); ok {
		t.Error("gap 8, draw 0.38 ≥ 3/8: a swap")
	}
	// Behind one random address half the swaps land back where they
	// began (cancelSwap): twice the odds, 3/4.
	if _, ok := fleetSwap(targets, fleet, 10, 0.74, true); !ok {
		t.Error("behind one address, gap 8, draw 0.74 < 3/4: no swap")
	}
	if _, ok := fleetSwap(targets, fleet, 10, 0.76, true); ok {
		t.Error("behind one address, gap 8, draw 0.76 ≥ 3/4: a swap")
	}
	for _, tc := range []struct {
		name  string
		fleet map[NodeID]int
		size  int
	}{
		{"gap 2", map[NodeID]int{1: 41, 2: 40, 3: 40, 4: 39}, 10},
		{"the busiest node is not one of the pool's extras", map[NodeID]int{1: 38, 2: 38, 3: 44, 4: 40}, 10},
		{"no remainder", map[NodeID]int{1: 50, 2: 30, 3: 40, 4: 40}, 8},
	} {
		if s, ok := fleetSwap(balanceTargets(tc.size, nodes, seed), tc.fleet, tc.size, 0, true); ok {
			t.Errorf("%s: swap %v, want none", tc.name, s)
		}
	}
}

// A swap's replacement that lands back on the node the swap took it from
// ends the swap there: the pool's swaps are what they were before it. Only
// the last swap, only its From node, only within a balance interval of it.
func TestCancelSwap(t *testing.T) {
	p := &Pool{settings: settings{balanceInterval: time.Second}}
	now := time.Now()
	if p.cancelSwap(1, now) {
		t.Fatal("no swap made, yet one was cancelled")
	}
	before := []remainderSwap{{From: 3, To: 4}}
	after := []remainderSwap{{From: 3, To: 4}, {From: 1, To: 2}}
	p.swaps.Store(&before)
	swapAt := func() {
		p.swaps.Store(&after)
		p.swapMove.Store(&swapMove{swap: remainderSwap{From: 1, To: 2}, before: &before, after: &after, at: now})
	}
	swapAt()
	if p.cancelSwap(2, now) || p.cancelSwap(3, now) {
		t.Fatal("a landing on another node than the swap's From cancelled it")
	}
	if p.cancelSwap(1, now.Add(2*time.Second)) {
		t.Fatal("a landing two balance intervals after the swap cancelled it")
	}
	if !p.cancelSwap(1, now.Add(time.Second/2)) {
		t.Fatal("the swap's replacement landed back on node 1 within the interval, yet the swap stands")
	}
	if got := p.remainderSwaps(); !slices.Equal(got, before) {
		t.Fatalf("swaps after the cancel: %v, want %v", got, before)
	}
	if p.cancelSwap(1, now.Add(time.Second/2)) {
		t.Fatal("one swap cancelled twice")
	}
	// A swap made since (the list changed) is not undone by a late landing.
	swapAt()
	newer := []remainderSwap{{From: 2, To: 1}}
	p.swaps.Store(&newer)
	if p.cancelSwap(1, now) {
		t.Fatal("a landing cancelled a swap list that changed since")
	}
	if got := p.remainderSwaps(); !slices.Equal(got, newer) {
		t.Fatalf("swaps: %v, want %v", got, newer)
	}
}
