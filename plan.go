package clusterpool

import (
	"cmp"
	"maps"
	"math"
	"slices"
	"time"
)

// The balancing decisions: how many connections each node should hold, which
// nodes shed connections in a round, the order in which a new connection
// tries the listed hosts, and how long a node may go unseen. They are pure
// functions of their inputs (counts, health, seeds, now), with no clock and
// no I/O; prune.go and placement.go apply them.

// nodeView is what one balancing decision knows about a node.
type nodeView struct {
	ID NodeID
	// Conns is the number of the pool's connections open on the node, in
	// use or idle, not counting those already marked to retire.
	Conns int
	// Eligible means the node may hold connections: it is healthy, not
	// draining, and has been seen within the expiry window.
	Eligible bool
	// Refillable means a new connection can be expected to reach the node
	// soon: it holds connections or something saw it recently. A node that
	// is eligible but not refillable (it may have just gone away, and only
	// expiry will tell) counts in the targets but never causes pruning,
	// because pruning for it would only move connections between the others.
	Refillable bool
	// Cap, when above zero, is the most connections the node may hold
	// (the per-node cap); Full means it takes none beyond Conns (it refused
	// a new connection). Either way its target never exceeds that, and
	// the rest goes to the other nodes (see cappedTargets).
	Cap  int
	Full bool
	// Outside means the node is healthy but outside the locality level the
	// pool uses (Config.Locality); it is then not Eligible.
	Outside bool
}

// balanceTargets spreads poolSize connections over the nodes: every node gets
// poolSize/len(nodes) and the remainder goes to the nodes that rank first by a
// hash of (seed, node ID). The seed is chosen once per pool, so the choice is
// stable over time (no rotation that keeps moving connections) and stable when
// other nodes join or leave (rendezvous hashing), yet many client pools with
// different seeds do not all give the extra connection to the same node, which
// would make that node hot cluster-wide.
//
// Targets sum to poolSize and differ by at most one. The result is nil when
// nodes is empty. swaps, the pool's fleet-aware corrections (fleetSwap),
// then move remainder connections from node to node, in order, each only
// where it still applies (its From holds one, its To none).
func balanceTargets(poolSize int, nodes []NodeID, seed uint64, swaps ...remainderSwap) map[NodeID]int {
	if len(nodes) == 0 {
		return nil
	}
	poolSize = max(poolSize, 0)
	base, rem := poolSize/len(nodes), poolSize%len(nodes)
	targets := make(map[NodeID]int, len(nodes))
	for _, id := range nodes {
		targets[id] = base
	}
	if rem == 0 {
		return targets
	}
	ranked := slices.Clone(nodes)
	slices.SortFunc(ranked, func(a, b NodeID) int {
		if c := cmp.Compare(nodeRank(seed, b), nodeRank(seed, a)); c != 0 {
			return c
		}
		return cmp.Compare(a, b)
	})
	for _, id := range ranked[:rem] {
		targets[id]++
	}
	for _, s := range swaps {
		if f, ok := targets[s.From]; ok && f == base+1 {
			if t, ok := targets[s.To]; ok && t == base {
				targets[s.From]--
				targets[s.To]++
			}
		}
	}
	return targets
}

// remainderSwap moves one of a pool's remainder connections from node From,
// where its hash puts it, to node To.
type remainderSwap struct{ From, To NodeID }

// fleetSwap decides whether a pool at its targets moves one of its
// remainder connections to even out the cluster, from the fleet's sessions
// per node (fleet, the pool's own included) and a uniform draw in [0, 1).
//
// Independent hashes leave the cluster as uneven as chance makes it: over
// 16 pools of 10 on 4 nodes a node ends below 95% of its share one time in
// ten, and the spread above 7 as often. A pool that holds an extra
// connection on the node with the most sessions (H, among its extras) and
// none on the one with the fewest (L, among the others) may move that extra
// from H to L, which narrows the gap by 2. Every pool sees the same counts,
// so each moves only with the probability that makes the expected number of
// movers about what closes the gap, (gap-1)/2, among the pools that could:
// those with an extra on H and none on L, at least gap of them, about
// P × r/N × (N-r)/(N-1) for P pools of this size. Nothing moves for a gap
// under 3: one move would only turn it around. landsBack says the pool is
// behind one random load-balancer address, where half the swaps end where
// they began (cancelSwap): it draws with twice the odds. Pure.
func fleetSwap(targets, fleet map[NodeID]int, size int, draw float64, landsBack bool) (remainderSwap, bool) {
	n := len(targets)
	if n < 2 || size <= 0 || size%n == 0 {
		return remainderSwap{}, false
	}
	base, r := size/n, size%n
	heavy, light := NodeID(0), NodeID(0)
	total := 0
	for _, id := range slices.Sorted(maps.Keys(targets)) {
		c := fleet[id]
		total += c
		switch targets[id] {
		case base + 1:
			if heavy == 0 || c > fleet[heavy] {
				heavy = id
			}
		case base:
			if light == 0 || c < fleet[light] {
				light = id
			}
		}
	}
	if heavy == 0 || light == 0 {
		return remainderSwap{}, false
	}
	gap := fleet[heavy] - fleet[light]
	if gap < 3 {
		return remainderSwap{}, false
	}
	pools := max(1, float64(total)/float64(size))
	movers := max(float64(gap), pools*float64(r)/float64(n)*float64(n-r)/float64(n-1))
	odds := float64((gap-1)/2) / movers
	if landsBack {
		odds *= 2
	}
	if draw >= odds {
		return remainderSwap{}, false
	}
	return remainderSwap{From: heavy, To: light}, true
}

// nodeRank is the rendezvous-hash score of a node for one pool's seed.
func nodeRank(seed uint64, id NodeID) uint64 {
	// splitmix64 finaliser: cheap, well mixed, no allocation.
	z := seed ^ (uint64(id) * 0x9e3779b97f4a7c15)
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// balancePlan is the outcome of one balancing round.
type balancePlan struct {
	// Targets holds the target of every eligible node.
	Targets map[NodeID]int
	// Prune says how many connections to retire per node this round.
	Prune map[NodeID]int
}

// cappedTargets is balanceTargets where caps[id] (when present) is the most
// node id may hold: a node whose share would exceed its cap gets the cap,
// and the rest is spread over the others as balanceTargets spreads it, so
// the targets sum to min(poolSize, the sum of the caps when every node is
// capped), and uncapped nodes differ by at most one. With no caps it is
// balanceTargets.
func cappedTargets(poolSize int, nodes []NodeID, seed uint64, caps map[NodeID]int, swaps ...remainderSwap) map[NodeID]int {
	if len(caps) == 0 {
		return balanceTargets(poolSize, nodes, seed, swaps...)
	}
	fixed := make(map[NodeID]int)
	free := slices.Clone(nodes)
	size := max(poolSize, 0)
	for {
		targets := balanceTargets(size, free, seed)
		capped := false
		for _, id := range free {
			if c, ok := caps[id]; ok && targets[id] > c {
				fixed[id] = max(c, 0)
				size -= max(c, 0)
				capped = true
			}
		}
		if !capped {
			if targets == nil {
				targets = make(map[NodeID]int, len(fixed))
			}
			for id, c := range fixed {
				targets[id] = c
			}
			if len(targets) == 0 {
				return nil
			}
			return targets
		}
		free = slices.DeleteFunc(free, func(id NodeID) bool { _, ok := fixed[id]; return ok })
	}
}

// viewCaps returns the caps of nodes as cappedTargets takes them: Cap, or
// Conns for a full node; nil when no node is capped or full.
func viewCaps(nodes []nodeView) map[NodeID]int {
	var caps map[NodeID]int
	for _, n := range nodes {
		c, ok := n.Cap, n.Cap > 0
		if n.Full && (!ok || n.Conns < c) {
			c, ok = n.Conns, true
		}
		if !ok {
			continue
		}
		if caps == nil {
			caps = make(map[NodeID]int)
		}
		caps[n.ID] = c
	}
	return caps
}

// planBalance decides one round. The pool's current size (the sum of Conns)
// is spread over the eligible nodes, within their caps; see
// [cappedTargets] and [planPrune]. exact says the pool is steady (see
// [steadiness]): its remainder is then placed where its hash says.
func planBalance(nodes []nodeView, seed uint64, exact bool, swaps ...remainderSwap) balancePlan {
	size := 0
	var eligible []NodeID
	for _, n := range nodes {
		size += n.Conns
		if n.Eligible {
			eligible = append(eligible, n.ID)
		}
	}
	targets := cappedTargets(size, eligible, seed, viewCaps(nodes), swaps...)
	return balancePlan{Targets: targets, Prune: planPrune(nodes, targets, exact)}
}

// worthMoving reports whether one connection should move from a node
// holding from connections, above its target, to a refillable node holding
// to, below its target; or, at connect time, whether a new connection that
// would make a node hold from+1 should go to that node instead. It is the
// one meaning of "over target" for pruning (planPrune) and for refusing a
// connection behind a load balancer (placement.overTarget).
//
// While the pool is steady (exact), every such move counts: it puts the
// pool's remainder connections on the nodes its hash names, so that many
// pools, each with its own hash, add up to an even cluster and a node that
// joins or rejoins gets its share of the fleet's remainders. Otherwise
// (the pool's size is moving: a cold start, a refill) only a move between
// nodes two or more apart counts: moving one connection between nodes one
// apart only swaps which holds the extra one, and the counts lag behind the
// connects under way, so enforcing the remainder then would open
// connections for nothing.
func worthMoving(from, to int, exact bool) bool {
	return exact || from-to >= 2
}

// planPrune says how many connections each node sheds this round. nodes must
// list every eligible node, with Conns 0 where it holds none.
//
// An eligible node above its target sheds about half of its excess,
// ceil(excess/2) and at least one: a multiplicative decrease of the distance
// to the target, so a large imbalance closes in a few rounds while the last
// connection or two, where overshooting would oscillate, move one at a time.
// A node that is not eligible (unhealthy, draining or expired) sheds all its
// connections: no target keeps them there. A healthy node outside the
// locality level in use sheds half of them, ceil(conns/2), as an over-target
// node would with a target of zero: a pool moving back to its preferred
// level after a fallback leaves the fallback's nodes in a few rounds, not
// in one burst of reconnects.
//
// Pruning only moves connections if the replacement can land on a node below
// its target, so nothing is pruned unless some refillable node is below its
// target, an eligible node sheds only if worthMoving says a connection should
// go from it to the emptiest such node, and eligible nodes together shed no
// more than the refillable nodes lack (the most loaded first): more would
// only move connections between nodes at their targets.
func planPrune(nodes []nodeView, targets map[NodeID]int, exact bool) map[NodeID]int {
	minUnder, deficit := math.MaxInt, 0
	for _, n := range nodes {
		t, ok := targets[n.ID]
		if !ok || !n.Eligible || !n.Refillable || n.Conns >= t {
			continue
		}
		minUnder = min(minUnder, n.Conns)
		deficit += t - n.Conns
	}
	if deficit == 0 {
		return nil
	}
	var prune map[NodeID]int
	add := func(id NodeID, k int) {
		if k <= 0 {
			return
		}
		if prune == nil {
			prune = make(map[NodeID]int)
		}
		prune[id] = k
	}
	type shed struct {
		id             NodeID
		excess, wanted int
	}
	var over []shed
	for _, n := range nodes {
		if n.Conns == 0 {
			continue
		}
		t, ok := targets[n.ID]
		if !n.Eligible || !ok {
			k := n.Conns
			if n.Outside {
				k = (k + 1) / 2
			}
			add(n.ID, k)
			continue
		}
		excess := n.Conns - t
		if excess <= 0 || !worthMoving(n.Conns, minUnder, exact) {
			continue
		}
		over = append(over, shed{n.ID, excess, (excess + 1) / 2})
	}
	slices.SortFunc(over, func(a, b shed) int {
		if c := cmp.Compare(b.excess, a.excess); c != 0 {
			return c
		}
		return cmp.Compare(a.id, b.id)
	})
	for _, s := range over {
		k := min(s.wanted, deficit)
		add(s.id, k)
		deficit -= k
	}
	return prune
}

// spreadJoins holds back moves towards nodes that just joined the eligible
// set (a new node, one back from a restart or an eviction) while the pool
// is steady: such a node stays not refillable until its time in ready,
// which it gets, now+delay, when it first shows up eligible. The caller
// draws delay at random for each round (up to a balance interval), so
// many pools that learn of a node at the same moment (gossip, a restart
// they all see) move their connections to it over a few rounds rather than
// in the same second; a cold start, whose size is still moving, is not
// held back. ready is updated in place: nodes no longer eligible leave it.
func spreadJoins(views []nodeView, ready map[NodeID]time.Time, steady bool, now time.Time, delay time.Duration) {
	for i, v := range views {
		if !v.Eligible {
			delete(ready, v.ID)
			continue
		}
		at, ok := ready[v.ID]
		if !ok {
			at = now
			if steady {
				at = now.Add(delay)
			}
			ready[v.ID] = at
		}
		if now.Before(at) {
			views[i].Refillable = false
		}
	}
	for id := range ready {
		if !slices.ContainsFunc(views, func(v nodeView) bool { return v.ID == id }) {
			delete(ready, id)
		}
	}
}

// steadiness is what the balance rounds remember of the pool's size, to
// tell a pool that holds still from one whose size is moving.
type steadiness struct {
	size  int       // the pool's size at the last round
	since time.Time // since when it has held still; zero: not yet
}

// observe returns the steadiness after a round that found the pool at size
// (settling: connections are being opened), and whether the pool is steady:
// at least minConns (below, pgxpool is about to refill it), nothing being
// opened, and the same size for at least hold (the rounds before saw it
// too). Only a steady pool enforces its remainder placement (worthMoving).
func (s steadiness) observe(size, minConns int, settling bool, now time.Time, hold time.Duration) (steadiness, bool) {
	if settling || size < minConns || size != s.size || s.since.IsZero() {
		return steadiness{size: size, since: now}, false
	}
	return s, now.Sub(s.since) >= hold
}

// placementNode is what ordering the hosts of a new connection knows about
// the node behind one host.
type placementNode struct {
	Conns    int  // the pool's connections on the node, including dials under way
	Target   int  // the node's balancing target
	Eligible bool // healthy, not draining, not expired, within the locality level
	Avoid    bool // the caller asked to stay away (a retry after a failure there)
	Full     bool // at its per-node cap, or refusing new connections
	Outside  bool // healthy, but outside the locality level in use
}

// placementOrder returns the order in which a new connection tries the hosts
// of the connection string. hostNodes[i] is the node last seen behind host i,
// or 0 if no connection has reached that host yet.
//
// First come hosts whose node is below target, most under-filled first; then
// hosts not mapped yet (trying them is how a node listed in the connection
// string is learned); then hosts whose node is at or above target, least
// loaded first; then hosts whose node is healthy but outside the locality
// level in use; last, hosts whose node is unhealthy, draining, expired, full
// (or at its per-node cap) or to be avoided. No host is dropped: when
// everything better fails, pgconn still falls back to them. Ties are broken by a per-pool hash of the host's
// position, so different pools do not all prefer the same host.
//
// hostPending[i] (may be nil) counts connects under way to host i; unmapped
// hosts with fewer of them come first, so a cold start spreads over the hosts
// before any of them is mapped.
//
// hostDown[i] (may be nil) marks a host whose last dial failed recently; it
// goes last, with the unhealthy ones.
func placementOrder(hostNodes []NodeID, hostPending []int, hostDown []bool, nodes map[NodeID]placementNode, seed uint64) []int {
	order := make([]int, len(hostNodes))
	for i := range order {
		order[i] = i
	}
	class := func(i int) int {
		if hostDown != nil && hostDown[i] {
			return 4
		}
		id := hostNodes[i]
		if id == 0 {
			return 1
		}
		n, ok := nodes[id]
		switch {
		case ok && n.Outside && !n.Avoid && !n.Full:
			return 3
		case !ok || !n.Eligible || n.Avoid || n.Full:
			return 4
		case n.Conns < n.Target:
			return 0
		default:
			return 2
		}
	}
	slices.SortStableFunc(order, func(a, b int) int {
		ca, cb := class(a), class(b)
		if c := cmp.Compare(ca, cb); c != 0 {
			return c
		}
		if ca == 1 && hostPending != nil {
			if c := cmp.Compare(hostPending[a], hostPending[b]); c != 0 {
				return c
			}
		}
		if ca == 0 || ca == 2 {
			na, nb := nodes[hostNodes[a]], nodes[hostNodes[b]]
			if c := cmp.Compare(na.Conns-na.Target, nb.Conns-nb.Target); c != 0 {
				return c
			}
			if c := cmp.Compare(na.Conns, nb.Conns); c != 0 {
				return c
			}
		}
		return cmp.Compare(nodeRank(seed, NodeID(a+1)), nodeRank(seed, NodeID(b+1)))
	})
	return order
}

// jitter returns d scaled by a factor in [0.8, 1.2) chosen by u in [0, 1), so
// that many clients started together do not balance or probe in lockstep.
func jitter(d time.Duration, u float64) time.Duration {
	return time.Duration(float64(d) * (0.8 + 0.4*u))
}

// expiryProbability is the chance we accept that a healthy node, reachable
// only through a random load balancer, is missed by every probe in the
// expiry window and leaves the target set for a while.
const expiryProbability = 1e-4

// expiryWindow is how long a node may go unseen (no connection open on it, no
// probe or connect reaching it) before it leaves the target set.
//
// Behind a random load balancer each probe reaches a given node of N with
// probability 1/N, so a live node without connections is missed by m probes
// in a row with probability (1-1/N)^m. The window covers the m that makes
// this below expiryProbability,
//
//	m = ceil(ln(1e-4) / ln(1-1/N))   (N=1: 1, N=3: 23, N=4: 33, N=10: 88)
//
// probes at the slowest jittered interval (1.2 × ProbeInterval), plus one
// interval of slack, and at least three balance intervals:
//
//	W = max(3 × BalanceInterval, (m+1) × 1.2 × ProbeInterval)
//
// With the 5 s defaults that is 2m24s for 3 nodes and 8m54s for 10. A node
// holding at least one connection never expires: the connection is proof of
// life, and if it dies the connection's failure says so sooner; a node
// gossip lists as live counts as seen at every read. At rest the probes
// back off (probeBackoff), so a live node that holds none of the pool's
// connections may expire; it joins again at the next probe that reaches it
// (a change, which snaps the probes back), and while it holds none of the
// pool's connections its target was zero or it was not refillable.
func expiryWindow(balanceInterval, probeInterval time.Duration, nodes int) time.Duration {
	m := 1.0
	if nodes > 1 {
		m = math.Ceil(math.Log(expiryProbability) / math.Log(1-1/float64(nodes)))
	}
	probes := time.Duration((m + 1) * 1.2 * float64(probeInterval))
	return max(3*balanceInterval, probes)
}
