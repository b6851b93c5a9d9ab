package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"
)

func TestCappedTargets(t *testing.T) {
	ids := []NodeID{1, 2, 3}
	tests := []struct {
		name string
		size int
		caps map[NodeID]int
		want int // sum of the targets
	}{
		{"no caps is balanceTargets", 30, nil, 30},
		{"cap above the share changes nothing", 30, map[NodeID]int{1: 12, 2: 12, 3: 12}, 30},
		{"every node capped below the share", 30, map[NodeID]int{1: 6, 2: 6, 3: 6}, 18},
		{"one full node keeps what it holds", 30, map[NodeID]int{2: 4}, 30},
		{"full node with nothing", 10, map[NodeID]int{3: 0}, 10},
		{"caps and a full node", 30, map[NodeID]int{1: 8, 2: 3, 3: 8}, 19},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := cappedTargets(tt.size, ids, 7, tt.caps)
			sum := 0
			lo, hi := 1<<30, -1
			for _, id := range ids {
				n := got[id]
				sum += n
				if c, ok := tt.caps[id]; ok && n > c {
					t.Errorf("node %d target %d above its cap %d", id, n, c)
				}
				if c, ok := tt.caps[id]; !ok || n < c {
					lo, hi = min(lo, n), max(hi, n)
				}
			}
			if sum != tt.want {
				t.Errorf("targets %v sum to %d, want %d", got, sum, tt.want)
			}
			if hi-lo > 1 && hi >= 0 {
				t.Errorf("uncapped targets %v differ by more than one", got)
			}
			if tt.caps == nil && !maps.Equal(got, balanceTargets(tt.size, ids, 7)) {
				t.Errorf("without caps %v, balanceTargets %v", got, balanceTargets(tt.size, ids, 7))
			}
		})
	}
	if got := cappedTargets(5, nil, 1, map[NodeID]int{1: 1}); got != nil {
		t.Errorf("no nodes: %v, want nil", got)
	}
}

func TestPlanBalanceRespectsCaps(t *testing.T) {
	// Node 1 is full at 4: its target is 4, so nothing is pruned elsewhere
	// to move connections to it (the churn a 53300 refusal caused).
	views := []nodeView{
		{ID: 1, Conns: 4, Eligible: true, Refillable: true, Full: true},
		{ID: 2, Conns: 13, Eligible: true, Refillable: true},
		{ID: 3, Conns: 13, Eligible: true, Refillable: true},
	}
	plan := planBalance(views, 3, false)
	if plan.Targets[1] != 4 || len(plan.Prune) != 0 {
		t.Errorf("full node: targets %v, prune %v; want node 1 at 4 and nothing pruned", plan.Targets, plan.Prune)
	}
	// Without the full mark the round prunes nodes 2 and 3 for node 1.
	views[0].Full = false
	if plan := planBalance(views, 3, false); len(plan.Prune) == 0 {
		t.Errorf("not full: nothing pruned for an under-filled node: %v", plan)
	}
	// A per-node cap of 8: a node at 12 goes down to the cap.
	capped := []nodeView{
		{ID: 1, Conns: 12, Eligible: true, Refillable: true, Cap: 8},
		{ID: 2, Conns: 2, Eligible: true, Refillable: true, Cap: 8},
		{ID: 3, Conns: 2, Eligible: true, Refillable: true, Cap: 8},
	}
	if plan := planBalance(capped, 3, false); plan.Targets[1] > 8 || plan.Prune[1] == 0 {
		t.Errorf("capped: %+v", plan)
	}
}

func TestPlanLimits(t *testing.T) {
	node := func(id NodeID, conns int) nodeView {
		return nodeView{ID: id, Conns: conns, Eligible: true, Refillable: true}
	}
	tests := []struct {
		name  string
		nodes []nodeView
		size  int
		want  map[NodeID]int
	}{
		{"within size", []nodeView{node(1, 5), node(2, 5)}, 10, nil},
		{"shrink 30 to 10", []nodeView{node(1, 10), node(2, 10), node(3, 10)}, 10, map[NodeID]int{1: 7, 2: 7, 3: 6}},
		{"shrink takes from the fullest first", []nodeView{node(1, 8), node(2, 2)}, 8, map[NodeID]int{1: 2}},
		{"an unavailable node's connections go first", []nodeView{node(1, 4), {ID: 2, Conns: 3}}, 5, map[NodeID]int{2: 2}},
		{"over the per-node cap", []nodeView{{ID: 1, Conns: 9, Eligible: true, Cap: 6}, {ID: 2, Conns: 3, Eligible: true, Cap: 6}}, 30, map[NodeID]int{1: 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := planLimits(tt.nodes, tt.size, 1)
			left := 0
			for _, n := range tt.nodes {
				left += n.Conns - got[n.ID]
			}
			if left > tt.size {
				t.Errorf("%v leaves %d connections, above %d", got, left, tt.size)
			}
			if tt.want != nil && sumOf(got) != sumOf(tt.want) {
				t.Errorf("got %v, want %v", got, tt.want)
			}
			if tt.want == nil && got != nil {
				t.Errorf("got %v, want nothing", got)
			}
			for id, k := range tt.want {
				if tt.name != "shrink 30 to 10" && got[id] != k {
					t.Errorf("node %d: %d, want %d (%v)", id, got[id], k, got)
				}
			}
		})
	}
}

func sumOf(m map[NodeID]int) int {
	s := 0
	for _, v := range m {
		s += v
	}
	return s
}

// A workload at its limit lets its waiting calls in one at a time, in
// arrival order, as slots come back; a call whose context ends leaves the
// line without taking a slot; raising the limit lets waiters in at once.
func TestWorkloadFIFO(t *testing.T) {
	w := &workload{name: "batch", limit: 1}
	ctx := context.Background()
	if waited, err := w.acquire(ctx); waited || err != nil {
		t.Fatalf("first slot: waited %v, %v", waited, err)
	}
	order := make(chan int, 3)
	for i := range 3 {
		go func() {
			if _, err := w.acquire(ctx); err == nil {
				order <- i
			}
		}()
		waitCond(t, func() string {
			if s := w.stat(); s.Waiting != i+1 {
				return "waiter not queued yet"
			}
			return ""
		})
	}
	gone, cancel := context.WithCancel(ctx)
	cancelled := make(chan error, 1)
	go func() { _, err := w.acquire(gone); cancelled <- err }()
	waitCond(t, func() string {
		if w.stat().Waiting != 4 {
			return "fourth waiter not queued"
		}
		return ""
	})
	cancel()
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled waiter: %v", err)
	}
	for want := range 3 {
		w.release()
		if got := <-order; got != want {
			t.Fatalf("slot %d went to waiter %d", want, got)
		}
	}
	if s := w.stat(); s.InUse != 1 || s.Waiting != 0 || s.Waits != 4 || s.Acquires != 4 {
		t.Errorf("stat %+v, want 1 in use, 0 waiting, 4 waits, 4 acquires", s)
	}
	// Lowered below what it holds: nobody new gets in until it is below.
	w.setLimit(1)
	w.release()
	if s := w.stat(); s.InUse != 0 {
		t.Errorf("in use %d after the last release", s.InUse)
	}
}

// A workload whose limit is lowered below the slots it holds lets no call
// in, waiting or new, until a release takes it below the new limit: the
// holders finish under the old limit, every later slot under the new one.
func TestWorkloadLowered(t *testing.T) {
	w := &workload{name: "batch", limit: 2}
	ctx := context.Background()
	for range 2 {
		if _, err := w.acquire(ctx); err != nil {
			t.Fatal(err)
		}
	}
	granted := make(chan struct{}, 2)
	for i := range 2 {
		go func() {
			if _, err := w.acquire(ctx); err == nil {
				granted <- struct{}{}
			}
		}()
		waitCond(t, func() string {
			if s := w.stat(); s.Waiting != i+1 {
				return fmt.Sprintf("%d waiting, want %d", s.Waiting, i+1)
			}
			return ""
		})
	}
	w.setLimit(1)
	w.release()
	if s := w.stat(); s.InUse != 1 || s.Waiting != 2 {
		t.Fatalf("after one release at limit 1: %+v, want 1 in use, 2 waiting", s)
	}
	w.release()
	<-granted
	if s := w.stat(); s.InUse != 1 || s.Waiting != 1 {
		t.Fatalf("after the second release: %+v, want 1 in use, 1 waiting", s)
	}
	select {
	case <-granted:
		t.Fatal("a second waiter got in at limit 1")
	default:
	}
	w.release()
	<-granted
}

func TestParseConfigLimits(t *testing.T) {
	cfg, err := ParseConfig("host=h cluster_max_conns_per_node=7 cluster_acquire_timeout=250ms")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.MaxConnsPerNode != 7 || cfg.AcquireTimeout != 250*time.Millisecond {
		t.Errorf("MaxConnsPerNode %d, AcquireTimeout %v", cfg.MaxConnsPerNode, cfg.AcquireTimeout)
	}
	cfg, err = ParseConfig("host=h cluster_max_conns_per_node=off cluster_acquire_timeout=0")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.MaxConnsPerNode != 0 || cfg.AcquireTimeout != 0 {
		t.Errorf("off: MaxConnsPerNode %d, AcquireTimeout %v", cfg.MaxConnsPerNode, cfg.AcquireTimeout)
	}
	for conn, want := range map[string]string{
		"host=h cluster_max_conns_per_node=-1":  `cluster_max_conns_per_node: invalid value "-1"`,
		"host=h cluster_max_conns_per_node=two": `cluster_max_conns_per_node: invalid value "two"`,
		"host=h cluster_acquire_timeout=-1s":    `cluster_acquire_timeout: invalid value "-1s"`,
		"host=h cluster_acquire_timeout=5":      `cluster_acquire_timeout: invalid value "5"`,
		"host=h cluster_acquire_timout=1s":      "did you mean cluster_acquire_timeout",
	} {
		if _, err := ParseConfig(conn); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", conn, err, want)
		}
	}
}

func TestConfigValidateWorkloadLimits(t *testing.T) {
	cfg, err := ParseConfig("host=h")
	if err != nil {
		t.Fatal(err)
	}
	for limits, want := range map[*map[string]int]string{
		{"batch": 0}:  `Config.WorkloadLimits: workload "batch": invalid limit 0`,
		{"batch": -2}: `Config.WorkloadLimits: workload "batch": invalid limit -2`,
		{"": 3}:       `Config.WorkloadLimits: invalid workload name "" (limit 3)`,
	} {
		c := cfg.Copy()
		c.WorkloadLimits = *limits
		if err := c.validate(); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%v: %v, want %q", *limits, err, want)
		}
	}
	c := cfg.Copy()
	c.WorkloadLimits = map[string]int{"batch": 2}
	if err := c.validate(); err != nil {
		t.Errorf("valid limits: %v", err)
	}
	d := c.Copy()
	d.WorkloadLimits["batch"] = 5
	if c.WorkloadLimits["batch"] != 2 {
		t.Error("Copy shares WorkloadLimits")
	}
}

func TestIsTooManyConnsClass(t *testing.T) {
	err := pgErr(sqlStateTooManyConnections)
	if !isTooManyConns(err) {
		t.Fatal("53300 not recognised")
	}
	if c := Classify(err); c != ClassNotSent {
		t.Errorf("53300 class %v, want not-sent (never against the node's health)", c)
	}
	if nodeSilent(err) {
		t.Error("a node refusing with 53300 counted as silent")
	}
}
