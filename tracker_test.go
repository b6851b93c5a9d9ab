package clusterpool

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func statsByID(stats []NodeStat) map[NodeID]NodeStat {
	m := make(map[NodeID]NodeStat)
	for _, s := range stats {
		m[s.ID] = s
	}
	return m
}

func TestTrackerCounts(t *testing.T) {
	tr := newTracker()
	a1 := tr.track(1, "", "h1", nil, t0)
	a2 := tr.track(1, "", "h1", nil, t0)
	b1 := tr.track(2, "10.0.0.2:26257", "h2", nil, t0)

	a1.acquired()
	a1.acquired() // idempotent
	b1.acquired()

	got := statsByID(tr.snapshot())
	if s := got[1]; s.TotalConns != 2 || s.AcquiredConns != 1 || s.IdleConns != 1 || !s.Healthy {
		t.Errorf("node 1: %+v", s)
	}
	if s := got[2]; s.TotalConns != 1 || s.AcquiredConns != 1 || s.IdleConns != 0 || s.Addr != "10.0.0.2:26257" {
		t.Errorf("node 2: %+v", s)
	}

	a1.released()
	a1.released()         // idempotent
	tr.untrack(b1, false) // closed while in use: leaves both counts
	tr.untrack(b1, false)
	b1.released() // a release after the close changes nothing
	tr.untrack(a2, false)
	tr.untrack(nil, false)

	got = statsByID(tr.snapshot())
	if s := got[1]; s.TotalConns != 1 || s.AcquiredConns != 0 || s.IdleConns != 1 {
		t.Errorf("node 1 after release: %+v", s)
	}
	if s := got[2]; s.TotalConns != 0 || s.AcquiredConns != 0 {
		t.Errorf("node 2 after close: %+v", s)
	}
}

func TestTrackerSnapshotSorted(t *testing.T) {
	tr := newTracker()
	for _, id := range []NodeID{5, 1, 3000, 2} {
		tr.track(id, "", "", nil, t0)
	}
	var ids []NodeID
	for _, s := range tr.snapshot() {
		ids = append(ids, s.ID)
	}
	if want := []NodeID{1, 2, 5, 3000}; !slices.Equal(ids, want) {
		t.Errorf("snapshot IDs = %v, want %v", ids, want)
	}
}

func TestTrackerEvict(t *testing.T) {
	tr := newTracker()
	busy := tr.track(1, "", "", nil, t0)
	idle := tr.track(1, "", "", nil, t0)
	other := tr.track(2, "", "", nil, t0)
	busy.acquired()

	retired := tr.evict(1, t0)
	if len(retired) != 1 || retired[0] != idle || !idle.retire.Load() {
		t.Fatalf("evict returned %v, want only the idle connection, marked retire", retired)
	}
	if !busy.refused() || !idle.refused() || other.refused() {
		t.Errorf("refused: busy %v idle %v other %v", busy.refused(), idle.refused(), other.refused())
	}
	if busy.retire.Load() {
		t.Error("in-use connection marked retire")
	}
	tr.evict(1, t0) // already evicted: not counted again
	s := statsByID(tr.snapshot())[1]
	if s.Healthy || s.Evictions != 1 {
		t.Errorf("after evict: %+v", s)
	}

	tr.markHealthy(1, t0)
	if busy.refused() {
		t.Error("in-use connection still refused after markHealthy")
	}
	if !idle.refused() {
		t.Error("retired connection no longer refused after markHealthy")
	}
	if tr.evict(99, t0) != nil {
		t.Error("evict of an unknown node returned connections")
	}
}

func TestTrackerConnectMarksHealthy(t *testing.T) {
	tr := newTracker()
	tr.track(1, "", "", nil, t0)
	tr.evict(1, t0)
	tr.track(1, "", "", nil, t0.Add(time.Second))
	if s := statsByID(tr.snapshot())[1]; !s.Healthy || !s.LastSeen.Equal(t0.Add(time.Second)) {
		t.Errorf("after a new connect: %+v", s)
	}
}

func TestTrackerRecordFailure(t *testing.T) {
	tr := newTracker()
	tr.track(1, "", "", nil, t0)
	now := t0
	for i := 1; i < failureBurst; i++ {
		if tr.recordFailure(1, now) {
			t.Fatalf("unhealthy after %d failures", i)
		}
		now = now.Add(time.Second)
	}
	if !tr.recordFailure(1, now) {
		t.Fatalf("not unhealthy after %d failures", failureBurst)
	}
	if tr.recordFailure(1, now) {
		t.Error("reported unhealthy twice")
	}
	if statsByID(tr.snapshot())[1].Healthy {
		t.Error("node still healthy")
	}

	// Failures spread wider than the window never trip.
	tr.markHealthy(1, now)
	for i := range 3 * failureBurst {
		now = now.Add(failureWindow/time.Duration(failureBurst-1) + time.Millisecond)
		if tr.recordFailure(1, now) {
			t.Fatalf("tripped on spread failure %d", i)
		}
	}
	if tr.recordFailure(99, now) {
		t.Error("unknown node tripped")
	}
}

func TestTrackerExpire(t *testing.T) {
	tr := newTracker()
	withConn := tr.track(1, "", "", nil, t0)
	tr.track(2, "", "", nil, t0)
	tr.untrack(tr.track(3, "", "", nil, t0), false)
	tr.seen(3, t0.Add(50*time.Second))
	_ = withConn
	gone := tr.expire(t0.Add(60*time.Second), 30*time.Second)
	if len(gone) != 0 {
		t.Fatalf("expired %v, want none (node 2 has a connection)", gone)
	}
	// Node 2 has a connection: it stays however old.
	two := tr.nodes[2]
	for cs := range two.connSet {
		tr.untrack(cs, false)
	}
	gone = tr.expire(t0.Add(60*time.Second), 30*time.Second)
	if !slices.Equal(gone, []NodeID{2}) {
		t.Fatalf("expired %v, want [2]", gone)
	}
	gone = tr.expire(t0.Add(200*time.Second), 30*time.Second)
	if !slices.Equal(gone, []NodeID{3}) {
		t.Fatalf("expired %v, want [3]", gone)
	}
	if len(tr.snapshot()) != 1 {
		t.Errorf("snapshot after expiry: %+v", tr.snapshot())
	}
}

func TestTrackerLocalIDs(t *testing.T) {
	tr := newTracker()
	a, b := tr.localID("10.0.0.1:5432"), tr.localID("10.0.0.2:5432")
	if a != 1 || b != 2 || tr.localID("10.0.0.1:5432") != 1 {
		t.Fatalf("local IDs %d %d", a, b)
	}
	// Once a node expires its address is forgotten; it comes back with a new ID.
	tr.seen(a, t0)
	tr.seen(b, t0.Add(time.Hour))
	tr.expire(t0.Add(time.Hour), time.Minute)
	if id := tr.localID("10.0.0.1:5432"); id != 3 {
		t.Errorf("re-discovered address got ID %d, want 3", id)
	}
	if id := tr.localID("10.0.0.2:5432"); id != 2 {
		t.Errorf("kept address got ID %d, want 2", id)
	}
}

func TestAvoidNodes(t *testing.T) {
	ctx := context.Background()
	if avoidNodesFrom(ctx) != nil || withAvoidNodes(ctx) != ctx {
		t.Fatal("empty context names nodes")
	}
	c1 := withAvoidNodes(ctx, 1)
	c2 := withAvoidNodes(c1, 2, 3)
	if !slices.Equal(avoidNodesFrom(c1), []NodeID{1}) || !slices.Equal(avoidNodesFrom(c2), []NodeID{1, 2, 3}) {
		t.Errorf("avoid nodes: %v %v", avoidNodesFrom(c1), avoidNodesFrom(c2))
	}
}

// TestTrackerConcurrent runs acquire/release against connects, closes,
// evictions and snapshots under the race detector; the counts must settle
// exactly.
func TestTrackerConcurrent(t *testing.T) {
	tr := newTracker()
	var conns []*connState
	for i := range 16 {
		conns = append(conns, tr.track(NodeID(i%3+1), "", "", nil, t0))
	}
	var wg sync.WaitGroup
	for _, cs := range conns {
		wg.Go(func() {
			for range 1000 {
				cs.acquired()
				cs.released()
			}
		})
	}
	wg.Go(func() {
		for i := range 200 {
			tr.untrack(tr.track(4, "", "", nil, t0), false)
			tr.evict(NodeID(i%3+1), t0)
			tr.markHealthy(NodeID(i%3+1), t0)
			tr.snapshot()
		}
	})
	wg.Wait()
	var total, inUse int32
	for _, s := range tr.snapshot() {
		total += s.TotalConns
		inUse += s.AcquiredConns
	}
	if total != 16 || inUse != 0 {
		t.Errorf("total %d in use %d, want 16 and 0", total, inUse)
	}
}

// TestTrackerConnectDialledBeforeEviction: a connection whose connect began
// before its node was evicted (its handshake raced the failure) does not mark
// the node healthy and is itself retired; one dialled after the eviction does.
func TestTrackerConnectDialledBeforeEviction(t *testing.T) {
	tr := newTracker()
	tr.track(1, "", "", nil, t0)
	evictedAt := t0.Add(time.Second)
	tr.evict(1, evictedAt)

	stale := tr.trackDialled(1, "", "", nil, evictedAt.Add(-time.Millisecond), evictedAt.Add(time.Millisecond))
	if n := tr.node(1); !n.evicted.Load() {
		t.Fatal("a connection dialled before the eviction marked the node healthy")
	}
	if !stale.retire.Load() {
		t.Fatal("a connection dialled before the eviction is not marked to retire")
	}

	fresh := tr.trackDialled(1, "", "", nil, evictedAt.Add(time.Millisecond), evictedAt.Add(2*time.Millisecond))
	if n := tr.node(1); n.evicted.Load() {
		t.Fatal("a connection dialled after the eviction did not mark the node healthy")
	}
	if fresh.retire.Load() {
		t.Fatal("a connection dialled after the eviction is marked to retire")
	}
}

// TestTrackerPingFailed: a connection that pgconn had already closed (the
// ping broke it) when it is closed while marked as being pinged at acquire
// names its node to the tracker's suspect hook; one whose ping succeeded
// (PrepareConn ran, clearing the mark), or one still working when the pool
// closes it (a ping its acquirer gave up on, which then succeeded, leaves the
// mark), does not.
func TestTrackerPingFailed(t *testing.T) {
	tr := newTracker()
	var suspects []NodeID
	tr.suspect = func(n *node) { suspects = append(suspects, n.id) }

	ok := tr.track(1, "", "", nil, t0)
	ok.pinging.Store(true)
	if ok.refused() {
		t.Fatal("refused a healthy connection")
	}
	tr.untrack(ok, true)

	abandoned := tr.track(3, "", "", nil, t0)
	abandoned.pinging.Store(true)
	tr.untrack(abandoned, false)
	if abandoned.pinging.Load() {
		t.Error("a working connection closed with a stale ping mark still looks pinged: a health check would count it as a failed ping")
	}

	failed := tr.track(2, "", "", nil, t0)
	failed.pinging.Store(true)
	tr.untrack(failed, true)
	tr.untrack(failed, true) // idempotent: one signal

	if !slices.Equal(suspects, []NodeID{2}) {
		t.Errorf("suspects = %v, want [2]", suspects)
	}
}

// TestHealthSuspect: at most one check per node is queued or running, a
// node is not checked again within checkSpacing of the last check's end, an
// evicted node is not checked, and a full queue drops the request without
// leaving the node marked.
func TestHealthSuspect(t *testing.T) {
	h := &healthChecker{requests: make(chan *node, 1)}
	n1, n2, n3 := &node{id: 1}, &node{id: 2}, &node{id: 3}

	h.suspect(n1, t0)
	h.suspect(n1, t0) // already queued
	if len(h.requests) != 1 || !n1.checking.Load() {
		t.Fatalf("queued %d, checking %v; want 1, true", len(h.requests), n1.checking.Load())
	}
	h.suspect(n2, t0) // queue full: dropped
	if n2.checking.Load() {
		t.Fatal("a dropped request left the node marked as checking")
	}

	<-h.requests // the check runs and ends at t0
	n1.checkedAt.Store(t0.UnixNano())
	n1.checking.Store(false)
	h.suspect(n1, t0.Add(checkSpacing/2))
	if len(h.requests) != 0 {
		t.Fatal("checked again within checkSpacing")
	}
	h.suspect(n1, t0.Add(checkSpacing))
	if len(h.requests) != 1 {
		t.Fatal("not checked again after checkSpacing")
	}
	<-h.requests
	n1.checking.Store(false)

	n3.evicted.Store(true)
	h.suspect(n3, t0)
	if len(h.requests) != 0 {
		t.Fatal("an evicted node was checked")
	}
}
