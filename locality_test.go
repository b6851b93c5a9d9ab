package clusterpool

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseLocality(t *testing.T) {
	tests := []struct {
		in   string
		want []localityTier
		err  string
	}{
		{"", nil, ""},
		{"  ", nil, ""},
		{"region=us-east1", []localityTier{{"region", "us-east1"}}, ""},
		{"region=us-east1,zone=us-east1-b", []localityTier{{"region", "us-east1"}, {"zone", "us-east1-b"}}, ""},
		{" region = r , zone=z ", []localityTier{{"region", "r"}, {"zone", "z"}}, ""},
		{"region", nil, `tier "region" is not key=value`},
		{"region=", nil, "not key=value"},
		{"=r", nil, "not key=value"},
		{"region=r,", nil, "not key=value"},
		{"region=a=b", nil, "not key=value"},
		{"region=r,region=s", nil, `key "region" appears twice`},
	}
	for _, tt := range tests {
		got, err := parseLocality(tt.in)
		switch {
		case tt.err != "":
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("parseLocality(%q) error %v, want %q", tt.in, err, tt.err)
			}
		case err != nil:
			t.Errorf("parseLocality(%q): %v", tt.in, err)
		case !slices.Equal(got, tt.want):
			t.Errorf("parseLocality(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestLocalityLevels(t *testing.T) {
	const three = "cloud=gce,region=us-east1,zone=us-east1-b"
	tests := []struct {
		locality string
		fallback []string
		levels   []int // nil: no preferences
		err      string
	}{
		{"", nil, nil, ""},
		{"region=r", nil, []int{1}, ""},
		{"region=r,zone=z", nil, []int{2, 1}, ""},
		{three, nil, []int{3, 2, 1}, ""},
		{three, []string{"region"}, []int{3, 2}, ""},
		{three, []string{"region", "cloud"}, []int{3, 2, 1}, ""},
		{three, []string{" cloud "}, []int{3, 1}, ""},
		{three, []string{"zone"}, nil, `"zone" is not wider`},
		{three, []string{"cloud", "region"}, nil, `"region" is not wider`},
		{three, []string{"region", "region"}, nil, `"region" is not wider`},
		{three, []string{"rack"}, nil, `"rack" is not a tier`},
		{"", []string{"region"}, nil, "needs a locality"},
		{"region", nil, nil, "not key=value"},
	}
	for _, tt := range tests {
		lp, err := newLocalityPrefs(tt.locality, tt.fallback)
		switch {
		case tt.err != "":
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("newLocalityPrefs(%q, %q) error %v, want %q", tt.locality, tt.fallback, err, tt.err)
			}
		case err != nil:
			t.Errorf("newLocalityPrefs(%q, %q): %v", tt.locality, tt.fallback, err)
		case tt.levels == nil && lp != nil:
			t.Errorf("newLocalityPrefs(%q, %q) = %+v, want nil", tt.locality, tt.fallback, lp)
		case tt.levels != nil && (lp == nil || !slices.Equal(lp.levels, tt.levels)):
			t.Errorf("newLocalityPrefs(%q, %q) = %+v, want levels %v", tt.locality, tt.fallback, lp, tt.levels)
		}
	}
}

func TestLocalityShared(t *testing.T) {
	lp, err := newLocalityPrefs("region=us-east1,zone=us-east1-b", nil)
	if err != nil {
		t.Fatal(err)
	}
	for node, want := range map[string]int{
		"region=us-east1,zone=us-east1-b":            2,
		"zone=us-east1-b,region=us-east1":            2, // by key, wherever listed
		"region=us-east1,zone=us-east1-c":            1,
		"cloud=gce,region=us-east1,zone=us-east1-b":  2,
		"region=eu-west1,zone=us-east1-b":            0, // the zone alone is no match
		"zone=us-east1-b":                            0,
		"":                                           0,
		"region=us-east1":                            1,
		"region=us-east1,zone=us-east1-b,rack=7":     2,
		"region=US-EAST1,zone=us-east1-b":            0, // values are compared exactly
		"region=us-east1,zone=us-east1-b,zone=again": 0, // malformed: shares nothing
	} {
		nl := &nodeLocality{raw: node}
		nl.setShared(lp)
		if nl.shared != want {
			t.Errorf("shared(%q) = %d, want %d", node, nl.shared, want)
		}
	}
}

// The level in use is the most preferred one that some healthy node
// reaches; with none, the whole cluster.
func TestPreferredShare(t *testing.T) {
	tests := []struct {
		levels []int
		best   int
		want   int
	}{
		{[]int{2, 1}, 2, 2},
		{[]int{2, 1}, 1, 1},
		{[]int{2, 1}, 0, 0},
		{[]int{3, 1}, 2, 1}, // a skipped level is never used
		{[]int{3}, 2, 0},
		{nil, 5, 0},
	}
	for _, tt := range tests {
		if got := preferredShare(tt.levels, tt.best); got != tt.want {
			t.Errorf("preferredShare(%v, %d) = %d, want %d", tt.levels, tt.best, got, tt.want)
		}
	}
}

// localityPool is a pool, never started, with the given locality and nodes
// 1..len(localities) in its tracker, each holding one connection.
func localityPool(t *testing.T, locality string, localities ...string) *Pool {
	t.Helper()
	cfg, err := ParseConfig("host=h cluster_locality='" + locality + "'")
	if err != nil {
		t.Fatal(err)
	}
	p := newPool(cfg)
	now := time.Now()
	for i, l := range localities {
		id := NodeID(i + 1)
		p.tracker.track(id, "", "", nil, now)
		if l != "?" {
			p.tracker.node(id).setLocality(l, p.settings.locality)
		}
	}
	return p
}

type levelTracer struct{ events []TraceLocalityLevelData }

func (l *levelTracer) TraceNodeLocality(context.Context, *Pool, TraceNodeLocalityData) {}
func (l *levelTracer) TraceLocalityLevel(_ context.Context, _ *Pool, d TraceLocalityLevelData) {
	l.events = append(l.events, d)
}

// The scope follows the nodes' health: down a level when the last node of
// the level in use fails, back up when one returns, with one event and one
// fallback counted per move.
func TestLocalityScopeFallsBackAndReturns(t *testing.T) {
	p := localityPool(t, "region=a,zone=a1", "region=a,zone=a1", "region=a,zone=a2", "region=b,zone=b1", "?")
	tr := &levelTracer{}
	p.obs.locality = tr
	now := time.Now()
	in := func() []NodeID {
		nodes := p.tracker.nodeList()
		s := p.localityScope(nodes, now)
		var ids []NodeID
		for _, n := range nodes {
			if s.in(n) {
				ids = append(ids, n.id)
			}
		}
		return ids
	}
	check := func(step string, want ...NodeID) {
		t.Helper()
		if got := in(); !slices.Equal(got, want) {
			t.Errorf("%s: in scope %v, want %v", step, got, want)
		}
	}
	check("all healthy", 1)
	p.tracker.evict(1, now)
	check("zone a1 evicted", 1, 2) // node 1 stays in scope; its health keeps it out
	p.tracker.node(2).draining.Store(true)
	check("region a gone", 1, 2, 3, 4)
	p.tracker.node(2).draining.Store(false)
	check("node 2 back", 1, 2)
	p.tracker.markHealthy(1, now)
	check("node 1 back", 1)

	want := []TraceLocalityLevelData{
		{Level: "region", Previous: "zone", Fallback: true},
		{Level: "", Previous: "region", Fallback: true},
		{Level: "region", Previous: "", Fallback: false},
		{Level: "zone", Previous: "region", Fallback: false},
	}
	if !slices.Equal(tr.events, want) {
		t.Errorf("events %+v, want %+v", tr.events, want)
	}
	if n := p.ClusterStat().LocalityFallbacks(); n != 2 {
		t.Errorf("LocalityFallbacks %d, want 2", n)
	}
}

// A node of the preferred level with no connection counts only while it
// was seen within the refill window: a level that went away silently is
// left before its nodes expire.
func TestLocalityScopeNeedsLiveNode(t *testing.T) {
	p := localityPool(t, "region=a", "region=a", "region=b")
	now := time.Now()
	n1 := p.tracker.node(1)
	for cs := range n1.connSet {
		p.tracker.untrack(cs, false)
	}
	nodes := p.tracker.nodeList()
	if s := p.localityScope(nodes, now); s.need != 1 {
		t.Fatalf("just seen: need %d, want 1", s.need)
	}
	later := now.Add(p.refillWindow() + time.Second)
	if s := p.localityScope(nodes, later); s.need != 0 {
		t.Errorf("unseen for the refill window: need %d, want 0 (the whole cluster)", s.need)
	}
	p.tracker.seen(1, later)
	if s := p.localityScope(nodes, later); s.need != 1 {
		t.Errorf("seen again: need %d, want 1", s.need)
	}
}

// Without Locality the scope is every node and nothing is computed.
func TestLocalityScopeOff(t *testing.T) {
	cfg, err := ParseConfig("host=h")
	if err != nil {
		t.Fatal(err)
	}
	p := newPool(cfg)
	p.tracker.track(1, "", "", nil, time.Now())
	p.tracker.node(1).setLocality("region=b", nil)
	if s := p.localityScope(p.tracker.nodeList(), time.Now()); s.need != 0 || !s.in(p.tracker.node(1)) {
		t.Errorf("scope %+v without Locality, want every node", s)
	}
	if s := p.tracker.snapshot(); s[0].Locality != "region=b" {
		t.Errorf("NodeStat.Locality %q, want region=b", s[0].Locality)
	}
}

// A healthy node outside the level sheds half its connections per round
// (not all at once, as an unhealthy node does), and only while a node of
// the level can take them.
func TestPlanPruneOutside(t *testing.T) {
	views := []nodeView{
		{ID: 1, Conns: 0, Eligible: true, Refillable: true},
		{ID: 2, Conns: 1, Eligible: true, Refillable: true},
		{ID: 3, Conns: 5, Outside: true, Refillable: true},
		{ID: 4, Conns: 4, Refillable: true}, // unhealthy
		{ID: 5, Conns: 1, Outside: true, Refillable: true},
	}
	plan := planBalance(views, 1, false)
	if got := fmt.Sprint(plan.Targets); got != "map[1:6 2:5]" && got != "map[1:5 2:6]" {
		t.Errorf("targets %v, want 11 over nodes 1 and 2", got)
	}
	if got, want := fmt.Sprint(plan.Prune), "map[3:3 4:4 5:1]"; got != want {
		t.Errorf("prune %v, want %v", got, want)
	}
	// Nowhere to go: nothing moves.
	views[0].Refillable, views[1].Refillable = false, false
	if plan := planBalance(views, 1, false); len(plan.Prune) != 0 {
		t.Errorf("prune %v with no node of the level below target", plan.Prune)
	}
}

// Hosts outside the level come after every in-level host, at target or
// not yet mapped, and before unhealthy or avoided ones.
func TestPlacementOrderOutside(t *testing.T) {
	hosts := []NodeID{4, 3, 0, 2, 1}
	nodes := map[NodeID]placementNode{
		1: {Conns: 5, Target: 5, Eligible: true},
		2: {Conns: 0, Target: 5, Eligible: true},
		3: {Conns: 0, Outside: true},
		4: {Conns: 0},
	}
	got := placementOrder(hosts, nil, nil, nodes, 7)
	if want := []int{3, 2, 4, 1, 0}; !slices.Equal(got, want) {
		t.Errorf("order %v, want %v (under target, unmapped, at target, outside, unhealthy)", got, want)
	}
	n := nodes[3]
	n.Avoid = true
	nodes[3] = n
	got = placementOrder(hosts, nil, nil, nodes, 7)
	if last := slices.Sorted(slices.Values(got[3:])); !slices.Equal(got[:3], []int{3, 2, 4}) || !slices.Equal(last, []int{0, 1}) {
		t.Errorf("order %v with the outside node avoided, want [3 2 4] then 0 and 1", got)
	}
}

func TestLocalityConfig(t *testing.T) {
	cfg, err := ParseConfig("postgres://h/db?cluster_locality=region%3Dr%2Czone%3Dz&cluster_locality_fallback=region")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Locality != "region=r,zone=z" || !slices.Equal(cfg.LocalityFallback, []string{"region"}) {
		t.Errorf("Locality %q, LocalityFallback %q", cfg.Locality, cfg.LocalityFallback)
	}
	cfg, err = ParseConfig("host=h cluster_locality='region=r,zone=z' cluster_locality_fallback=region")
	if err != nil {
		t.Fatal(err)
	}
	if s := cfg.settings(); s.locality == nil || !slices.Equal(s.locality.levels, []int{2, 1}) {
		t.Errorf("settings.locality %+v", s.locality)
	}
	c := cfg.Copy()
	c.LocalityFallback[0] = "zone"
	if cfg.LocalityFallback[0] != "region" {
		t.Error("Copy shares LocalityFallback")
	}

	for conn, want := range map[string][]string{
		"host=h cluster_locality=region":                                    {"cluster_locality", `"region"`, "key=value"},
		"host=h cluster_locality='region=r' cluster_locality_fallback=zone": {"cluster_locality_fallback", `"zone"`, "not a tier"},
		"host=h cluster_locality_fallback=region":                           {"cluster_locality_fallback", `"region"`, "needs a locality"},
		"host=h cluster_locality='region=r' cluster_locality_fallback=":     {"cluster_locality_fallback", `""`},
		"host=h cluster_localty=x":                                          {"did you mean cluster_locality"},
	} {
		_, err := ParseConfig(conn)
		for _, w := range want {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("ParseConfig(%q) error %v, want %q in it", conn, err, w)
			}
		}
	}

	base, err := ParseConfig("host=h")
	if err != nil {
		t.Fatal(err)
	}
	bad := base.Copy()
	bad.Locality = "region"
	if err := bad.validate(); err == nil || !strings.Contains(err.Error(), `Config.Locality: invalid value "region"`) {
		t.Errorf("validate: %v", err)
	}
	bad = base.Copy()
	bad.Locality, bad.LocalityFallback = "region=r,zone=z", []string{"rack"}
	if err := bad.validate(); err == nil || !strings.Contains(err.Error(), `Config.LocalityFallback: invalid value ["rack"]`) {
		t.Errorf("validate: %v", err)
	}
}

// groupsFor adds gossip-learned hosts only within the locality level in
// use: another region's nodes are dialled only once the pool falls back.
func TestGroupsForGossipHostsByLocality(t *testing.T) {
	cfg, err := ParseConfig("host=h1,h2 cluster_locality='region=a'")
	if err != nil {
		t.Fatal(err)
	}
	p := newPool(cfg)
	if p.placement.mode != connectPlaced {
		t.Fatalf("connect mode %v, want connectPlaced", p.placement.mode)
	}
	now := time.Now()
	p.tracker.track(1, "", "", nil, now)
	p.tracker.node(1).setLocality("region=a", p.settings.locality)
	p.placement.gossipHosts = map[NodeID]string{5: "10.0.0.5:26257", 6: "10.0.0.6:26257", 7: "10.0.0.7:26257"}
	p.placement.gossipLocalities = map[NodeID]*nodeLocality{
		5: {raw: "region=a", shared: 1},
		6: {raw: "region=b", shared: 0},
		// 7: gossip gave none
	}
	hosts := func() []string {
		var keys []string
		for _, g := range p.placement.groupsFor(p.config.ConnConfig.Copy()) {
			keys = append(keys, g.key)
		}
		return keys
	}
	if got, want := hosts(), []string{"h1:5432", "h2:5432", "10.0.0.5:26257"}; !slices.Equal(got, want) {
		t.Errorf("region a live: hosts %v, want %v", got, want)
	}
	p.tracker.evict(1, now)
	if got, want := hosts(), []string{"h1:5432", "h2:5432", "10.0.0.5:26257", "10.0.0.6:26257", "10.0.0.7:26257"}; !slices.Equal(got, want) {
		t.Errorf("region a evicted: hosts %v, want %v (the whole cluster)", got, want)
	}
}
