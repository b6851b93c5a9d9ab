package clustertest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

func TestBackendKeyAndVersion(t *testing.T) {
	c := New(t, Options{Nodes: 2})
	ctx := testCtx(t)
	for _, n := range c.Nodes() {
		conn := connect(t, ctx, n.DSN())
		pid := conn.PgConn().PID()
		if got := int(pid >> 20); got != n.ID() || pid&0x80000000 != 0 {
			t.Errorf("node %d: PID %#x decodes to %d", n.ID(), pid, got)
		}
		if v := conn.PgConn().ParameterStatus("crdb_version"); v != DefaultCrdbVersion {
			t.Errorf("node %d: crdb_version %q", n.ID(), v)
		}
		var one int
		if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
			t.Fatalf("SELECT 1: %v %d", err, one)
		}
	}
}

func TestPostgresMode(t *testing.T) {
	c := New(t, Options{Nodes: 1, Postgres: true})
	ctx := testCtx(t)
	n := c.Nodes()[0]
	conn := connect(t, ctx, n.DSN())
	if v := conn.PgConn().ParameterStatus("crdb_version"); v != "" {
		t.Errorf("crdb_version %q in Postgres mode", v)
	}
	var backendPID uint32
	if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&backendPID); err != nil {
		t.Fatal(err)
	}
	if got := conn.PgConn().PID(); got != backendPID {
		t.Errorf("PID %d through the proxy, server says %d: key was rewritten", got, backendPID)
	}
}

func TestLongIDs(t *testing.T) {
	c := New(t, Options{Nodes: 1, LongIDs: true, FirstID: 5000})
	ctx := testCtx(t)
	for _, n := range c.Nodes() {
		conn := connect(t, ctx, n.DSN())
		pid := conn.PgConn().PID()
		if pid&0x80000000 == 0 || int(pid&0x7FFFFFFF) != n.ID() {
			t.Errorf("node %d: PID %#x is not its long ID", n.ID(), pid)
		}
	}
	if got := c.Nodes()[0].ID(); got != 5000 {
		t.Errorf("first ID %d, want 5000", got)
	}
}

func TestEncodeProcessID(t *testing.T) {
	for _, tc := range []struct {
		id     uint32
		long   bool
		random uint32
		want   uint32
	}{
		{1, false, 0, 1 << 20},
		{1, false, 0xFFFFFFFF, 1<<20 | 0xFFFFF},
		{2047, false, 0x12345, 2047<<20 | 0x12345},
		{1, true, 0xFFFFFFFF, 0x80000001},
		{1<<31 - 1, true, 0, 0xFFFFFFFF},
	} {
		got := EncodeProcessID(tc.id, tc.long, tc.random)
		if got != tc.want {
			t.Errorf("EncodeProcessID(%d, %v, %#x) = %#x, want %#x", tc.id, tc.long, tc.random, got, tc.want)
		}
		if !tc.long && got>>20 != tc.id {
			t.Errorf("short %d decodes to %d", tc.id, got>>20)
		}
	}
}

func TestOpenConnsUpAndDown(t *testing.T) {
	c := New(t, Options{Nodes: 1})
	ctx := testCtx(t)
	n := c.Node(1)
	var conns []*pgx.Conn
	for i := 0; i < 5; i++ {
		conns = append(conns, connect(t, ctx, n.DSN()))
	}
	if got := n.OpenConns(); got != 5 {
		t.Fatalf("OpenConns %d, want 5", got)
	}
	if got := c.OpenConns(); got[1] != 5 || len(got) != 1 {
		t.Fatalf("Cluster.OpenConns %v", got)
	}
	for _, conn := range conns[:3] {
		conn.Close(ctx)
	}
	eventually(t, "2 open connections", func() bool { return n.OpenConns() == 2 })
	if got := n.TotalConns(); got != 5 {
		t.Errorf("TotalConns %d, want 5", got)
	}
	// Through the load balancer too: the count follows the client's close.
	lbConn := connect(t, ctx, c.DSN())
	eventually(t, "3 open in total", func() bool { m := c.OpenConns(); return m[1]+m[2] == 3 })
	lbConn.Close(ctx)
	eventually(t, "2 open in total", func() bool { m := c.OpenConns(); return m[1]+m[2] == 2 })
}

// The balancer does not look at the servers, so in-process nodes do here:
// 300 PostgreSQL backend forks would only make the test slow.
func TestLoadBalancerSpread(t *testing.T) {
	c := New(t, Options{Nodes: 3, Seed: 42, InProcess: true})
	ctx := testCtx(t)
	const total = 300
	for i := 0; i < total; i++ {
		conn, err := pgconn.Connect(ctx, c.DSN())
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conn.Close(ctx)
	}
	// Each node's count is Binomial(300, 1/3): mean 100, sd 8.2. 70..130 is
	// more than 3.6 sd either side, so a fair balancer fails this about once
	// in 3000 seeds; with the fixed seed the outcome is deterministic anyway.
	for _, n := range c.Nodes() {
		if got := n.TotalConns(); got < 70 || got > 130 {
			t.Errorf("node %d got %d of %d connections, want 70..130", n.ID(), got, total)
		}
	}
}

func TestRoundRobin(t *testing.T) {
	c := New(t, Options{Nodes: 3, Balancing: RoundRobin, InProcess: true})
	ctx := testCtx(t)
	for i := 0; i < 6; i++ {
		conn := connect(t, ctx, c.DSN())
		want := i%3 + 1
		if got := int(conn.PgConn().PID() >> 20); got != want {
			t.Errorf("connection %d went to node %d, want %d", i, got, want)
		}
	}
}

func TestInProcess(t *testing.T) {
	c, err := Start(testCtx(t), Options{Nodes: 3, InProcess: true, Seed: 1, CrdbVersion: "CockroachDB CCL v23.2.0"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := testCtx(t)
	for _, n := range c.Nodes() {
		conn := connect(t, ctx, n.DSN())
		if got := int(conn.PgConn().PID() >> 20); got != n.ID() {
			t.Errorf("node %d: PID decodes to %d", n.ID(), got)
		}
		if v := conn.PgConn().ParameterStatus("crdb_version"); v != "CockroachDB CCL v23.2.0" {
			t.Errorf("crdb_version %q, want the one in Options", v)
		}
		var one int
		if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
			t.Fatalf("SELECT 1: %v %d", err, one)
		}
	}
}

func TestSweepStale(t *testing.T) {
	base := t.TempDir()
	dead, live, foreign := filepath.Join(base, "clustertest-1"), filepath.Join(base, "clustertest-2"), filepath.Join(base, "clustertest-3")
	for _, dir := range []string{dead, live, foreign} {
		os.Mkdir(dir, 0o700)
	}
	// dead's owner exited: its file is there, nobody holds the lock.
	os.WriteFile(filepath.Join(dead, ownerFile), []byte("12345\n"), 0o644)
	lock, err := lockOwner(live)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()

	c, err := Start(testCtx(t), Options{Nodes: 1, InProcess: true, BaseDir: base})
	if err != nil {
		t.Fatal(err)
	}
	if abandoned(c.dir) {
		t.Error("an open cluster's directory looks abandoned")
	}
	c.Close()
	if _, err := os.Stat(dead); !os.IsNotExist(err) {
		t.Errorf("abandoned directory kept: %v", err)
	}
	for _, dir := range []string{live, foreign} {
		if _, err := os.Stat(dir); err != nil {
			t.Errorf("%s removed: %v", dir, err)
		}
	}
}

// ExecDirect reaches the node's own server (each node is a separate
// database) without going through the proxy, so it is not counted and not
// subject to the node's faults; its errors name the node.
func TestExecDirect(t *testing.T) {
	c := New(t, Options{Nodes: 2})
	ctx := testCtx(t)
	if err := c.Node(1).ExecDirect(ctx, "CREATE TABLE direct (x int); INSERT INTO direct VALUES (7)"); err != nil {
		t.Fatal(err)
	}
	if open := c.OpenConns(); open[1] != 0 || open[2] != 0 {
		t.Errorf("ExecDirect counted on the proxies: %v", open)
	}
	var x int
	if err := connect(t, ctx, c.Node(1).DSN()).QueryRow(ctx, "SELECT x FROM direct").Scan(&x); err != nil || x != 7 {
		t.Fatalf("node 1 through its proxy: %d, %v; want 7", x, err)
	}
	err := c.Node(2).ExecDirect(ctx, "INSERT INTO direct VALUES (8)")
	if sqlState(err) != "42P01" || !strings.Contains(err.Error(), "node 2") {
		t.Fatalf("node 2 has no table direct: got %v, want 42P01 naming node 2", err)
	}
	c.Node(1).Partition()
	defer c.Node(1).Heal()
	if err := c.Node(1).ExecDirect(ctx, "INSERT INTO direct VALUES (9)"); err != nil {
		t.Fatalf("ExecDirect on a partitioned node: %v; want it to bypass the proxy", err)
	}
}
