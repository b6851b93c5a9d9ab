package clustertest

import (
	"os"
	"path/filepath"
	"testing"
)

// TestSpareIsReset checks that a data directory reused from a closed
// cluster holds nothing of what that cluster wrote.
func TestSpareIsReset(t *testing.T) {
	requirePostgres(t)
	ctx := testCtx(t)
	base := t.TempDir()
	// PostgreSQL may run as another user (when the test runs as root).
	for p := base; p != filepath.Dir(p) && p != os.TempDir(); p = filepath.Dir(p) {
		os.Chmod(p, 0o755)
	}
	c1, err := Start(ctx, Options{Nodes: 1, BaseDir: base})
	if err != nil {
		t.Fatal(err)
	}
	conn := connect(t, ctx, c1.Node(1).PostgresDSN())
	for _, sql := range []string{
		"CREATE TABLE left_behind (k int PRIMARY KEY)",
		"INSERT INTO left_behind SELECT generate_series(1, 10000)",
		"CREATE DATABASE extra",
		"CHECKPOINT",
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	conn.Close(ctx)
	if err := c1.Close(); err != nil {
		t.Fatal(err)
	}
	spares, _ := filepath.Glob(filepath.Join(base, "clustertest-template-*-spares", "*"))
	if len(spares) != 1 {
		t.Fatalf("%d spare data directories after Close, want 1", len(spares))
	}

	c2, err := Start(ctx, Options{Nodes: 1, BaseDir: base})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if left, _ := filepath.Glob(filepath.Join(base, "clustertest-template-*-spares", "*")); len(left) != 0 {
		t.Fatalf("the spare was not reused: %v", left)
	}
	conn = connect(t, ctx, c2.Node(1).DSN())
	var table, db any
	if err := conn.QueryRow(ctx, "SELECT to_regclass('left_behind'), (SELECT datname FROM pg_database WHERE datname = 'extra')").Scan(&table, &db); err != nil {
		t.Fatal(err)
	}
	if table != nil || db != nil {
		t.Fatalf("reused data directory still has table %v, database %v", table, db)
	}
	// It is a working server: it can write.
	if _, err := conn.Exec(ctx, "CREATE TABLE left_behind (k int)"); err != nil {
		t.Fatal(err)
	}
}
