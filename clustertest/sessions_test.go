package clustertest

import (
	"encoding/binary"
	"maps"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func startupPacket(params ...string) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint32(b[4:], 196608) // protocol 3.0
	for _, p := range params {
		b = append(b, p...)
		b = append(b, 0)
	}
	b = append(b, 0)
	binary.BigEndian.PutUint32(b, uint32(len(b)))
	return b
}

func TestStartupParam(t *testing.T) {
	full := startupPacket("user", "postgres", "database", "postgres", "application_name", "pool-7")
	for _, tc := range []struct {
		name string
		pkt  []byte
		want string
	}{
		{"present", full, "pool-7"},
		{"first", startupPacket("application_name", "a", "user", "u"), "a"},
		{"absent", startupPacket("user", "postgres"), ""},
		{"empty value", startupPacket("application_name", "", "user", "u"), ""},
		{"a value named like the key", startupPacket("user", "application_name", "application_name", "x"), "x"},
		{"truncated", full[:len(full)-5], ""},
		{"no terminator", func() []byte {
			b := append([]byte(nil), full[:len(full)-1]...)
			binary.BigEndian.PutUint32(b, uint32(len(b)))
			return b
		}(), "pool-7"},
		{"cut inside the value", func() []byte {
			b := append([]byte(nil), full[:len(full)-3]...)
			binary.BigEndian.PutUint32(b, uint32(len(b)))
			return b
		}(), ""},
		{"short", []byte{0, 0, 0, 4}, ""},
	} {
		if got := startupParam(tc.pkt, "application_name"); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestPeakInWindow(t *testing.T) {
	ms := func(v ...int) []time.Duration {
		out := make([]time.Duration, len(v))
		for i, x := range v {
			out[i] = time.Duration(x) * time.Millisecond
		}
		return out
	}
	for _, tc := range []struct {
		name   string
		times  []time.Duration
		window time.Duration
		want   int
	}{
		{"none", nil, time.Second, 0},
		{"one", ms(5), time.Second, 1},
		// A burst that straddles a second boundary is one burst.
		{"straddling", ms(900, 950, 1000, 1050, 1100, 2500), time.Second, 5},
		{"half-open", ms(0, 1000), time.Second, 1},
		{"just inside", ms(0, 999), time.Second, 2},
		{"two bursts", ms(0, 10, 20, 3000, 3001, 3002, 3003), time.Second, 4},
		{"same instant", ms(7, 7, 7), time.Millisecond, 3},
	} {
		if got := peakInWindow(tc.times, tc.window); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
}

// The log keeps the last acceptLogSize accepts in order, and between finds
// the ones in range across the ring's wrap.
func TestSessionLogRing(t *testing.T) {
	epoch := time.Now()
	l := newSessionLog(epoch)
	const extra = 1000
	ids := make([]uint64, 0, acceptLogSize+extra)
	for i := 0; i < acceptLogSize+extra; i++ {
		ids = append(ids, l.accepted("a", true))
	}
	if open := l.sessions(); len(open) != acceptLogSize+extra || open[0].Start.After(open[len(open)-1].Start) {
		t.Fatalf("%d open sessions, want %d, oldest first", len(open), acceptLogSize+extra)
	}
	all := l.between(epoch, epoch.Add(time.Hour))
	if len(all) != acceptLogSize {
		t.Fatalf("%d accepts kept, want %d", len(all), acceptLogSize)
	}
	for i := 1; i < len(all); i++ {
		if all[i] < all[i-1] {
			t.Fatalf("accept %d at %v before accept %d at %v", i, all[i], i-1, all[i-1])
		}
	}
	// A range that starts in the older part of the ring and ends in the newer.
	mid := all[acceptLogSize-extra-10]
	part := l.between(epoch.Add(mid), epoch.Add(all[len(all)-1]))
	if len(part) < extra+10 || part[0] != mid {
		t.Fatalf("range from the older part into the newer: %d accepts from %v, want at least %d from %v", len(part), part[0], extra+10, mid)
	}
	if got := l.between(epoch.Add(-time.Hour), epoch.Add(-time.Minute)); len(got) != 0 {
		t.Errorf("%d accepts before the epoch", len(got))
	}
	if got := l.byApp(); got["a"] != acceptLogSize+extra {
		t.Errorf("open by app %v", got)
	}
	for _, id := range ids {
		l.closed("a", id)
	}
	if got := l.byApp(); len(got) != 0 {
		t.Errorf("after every close: %v, want empty", got)
	}
	if got := l.sessions(); len(got) != 0 {
		t.Errorf("after every close: %d sessions open, want none", len(got))
	}
}

// Each node counts its open sessions by the application_name of their
// StartupMessage, as CockroachDB's SHOW SESSIONS groups them, and logs when
// it accepted each one.
func TestOpenConnsByAppAndAccepts(t *testing.T) {
	c := New(t, Options{Nodes: 2})
	ctx := testCtx(t)
	n1, n2 := c.Node(1), c.Node(2)
	withApp := func(dsn, app string) string {
		if app == "" {
			return dsn
		}
		return dsn + "&application_name=" + app
	}
	from := time.Now()
	var conns []*pgx.Conn
	for _, o := range []struct {
		n   *Node
		app string
	}{{n1, "pool-a"}, {n1, "pool-a"}, {n1, "pool-b"}, {n2, "pool-a"}, {n2, ""}} {
		conns = append(conns, connect(t, ctx, withApp(o.n.DSN(), o.app)))
	}
	to := time.Now()
	if got, want := n1.OpenConnsByApp(), map[string]int{"pool-a": 2, "pool-b": 1}; !maps.Equal(got, want) {
		t.Errorf("node 1: %v, want %v", got, want)
	}
	if got, want := n2.OpenConnsByApp(), map[string]int{"pool-a": 1, "": 1}; !maps.Equal(got, want) {
		t.Errorf("node 2: %v, want %v", got, want)
	}
	check := func(want map[string]map[int]int) bool {
		got := c.OpenConnsByApp()
		return maps.EqualFunc(got, want, func(a, b map[int]int) bool { return maps.Equal(a, b) })
	}
	if want := map[string]map[int]int{"pool-a": {1: 2, 2: 1}, "pool-b": {1: 1, 2: 0}, "": {1: 0, 2: 1}}; !check(want) {
		t.Errorf("cluster: %v, want %v", c.OpenConnsByApp(), want)
	}
	// The server sees the same name: the proxy forwards the StartupMessage
	// unchanged.
	var app string
	if err := conns[2].QueryRow(ctx, "SELECT current_setting('application_name')").Scan(&app); err != nil || app != "pool-b" {
		t.Errorf("server's application_name %q, %v; want pool-b", app, err)
	}
	conns[0].Close(ctx)
	conns[2].Close(ctx)
	eventually(t, "pool-b gone and one pool-a left on node 1", func() bool {
		return check(map[string]map[int]int{"pool-a": {1: 1, 2: 1}, "": {1: 0, 2: 1}})
	})

	if got := len(n1.AcceptTimes(from, to)); got != 3 {
		t.Errorf("node 1 accepted %d sessions in the window, want 3", got)
	}
	times := n2.AcceptTimes(from, to)
	if len(times) != 2 || times[0].Before(from) || times[1].After(to) || times[1].Before(times[0]) {
		t.Errorf("node 2's accept times %v, want 2 in order within [%v, %v]", times, from, to)
	}
	if got := n1.AcceptTimes(to.Add(time.Nanosecond), time.Now()); len(got) != 0 {
		t.Errorf("node 1 accepted %d sessions after the window", len(got))
	}
	if got := n1.PeakAcceptRate(from, to, to.Sub(from)+time.Nanosecond); got != 3 {
		t.Errorf("node 1's peak over the whole window: %d, want 3", got)
	}
	if got := n1.PeakAcceptRate(from, to, 0); got != 0 {
		t.Errorf("peak with a zero window: %d, want 0", got)
	}
	// The log survives a restart: it is the node's, not the listener's.
	n1.Kill()
	if err := n1.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	connect(t, ctx, withApp(n1.DSN(), "pool-c"))
	if got := len(n1.AcceptTimes(from, time.Now())); got != 4 || n1.TotalConns() != 4 {
		t.Errorf("after a restart: %d accepts logged, TotalConns %d; want 4 and 4", got, n1.TotalConns())
	}
	if got, want := n1.OpenConnsByApp(), map[string]int{"pool-c": 1}; !maps.Equal(got, want) {
		t.Errorf("node 1 after a restart: %v, want %v (the kill closed the others)", got, want)
	}
}
