package fakepg

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

func startServer(t *testing.T) *Server {
	t.Helper()
	s, err := Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func dsn(s *Server) string {
	return "postgres://postgres@" + s.Addr() + "/postgres?sslmode=prefer&connect_timeout=10"
}

// execModes are the ways pgx sends a statement: the default statement cache
// (Parse with a name, Describe statement, Bind, Execute), the description
// cache, unnamed statements, and the simple protocol.
var execModes = []pgx.QueryExecMode{
	pgx.QueryExecModeCacheStatement,
	pgx.QueryExecModeCacheDescribe,
	pgx.QueryExecModeDescribeExec,
	pgx.QueryExecModeExec,
	pgx.QueryExecModeSimpleProtocol,
}

func connect(t *testing.T, s *Server, mode pgx.QueryExecMode) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn(s))
	if err != nil {
		t.Fatal(err)
	}
	cfg.DefaultQueryExecMode = mode
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func sqlState(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

func TestStartup(t *testing.T) {
	s := startServer(t)
	c := connect(t, s, pgx.QueryExecModeCacheStatement)
	pc := c.PgConn()
	for name, want := range map[string]string{
		"server_version":              "15.0",
		"server_encoding":             "UTF8",
		"client_encoding":             "UTF8",
		"DateStyle":                   "ISO, MDY",
		"integer_datetimes":           "on",
		"standard_conforming_strings": "on",
		"TimeZone":                    "UTC",
	} {
		if got := pc.ParameterStatus(name); got != want {
			t.Errorf("ParameterStatus(%q) = %q, want %q", name, got, want)
		}
	}
	if pc.PID() == 0 || len(pc.SecretKey()) != 4 {
		t.Errorf("BackendKeyData: pid %d, secret %x", pc.PID(), pc.SecretKey())
	}
	if pc.ParameterStatus("crdb_version") != "" {
		t.Error("fakepg must look like PostgreSQL, not CockroachDB")
	}
	c2 := connect(t, s, pgx.QueryExecModeCacheStatement)
	if c2.PgConn().PID() == pc.PID() {
		t.Error("two sessions share a process ID")
	}
}

func TestQueriesInEveryExecMode(t *testing.T) {
	s := startServer(t)
	ctx := testCtx(t)
	for _, mode := range execModes {
		t.Run(mode.String(), func(t *testing.T) {
			c := connect(t, s, mode)
			var one int
			if err := c.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
				t.Fatalf("SELECT 1: %d, %v", one, err)
			}
			var n int32
			if err := c.QueryRow(ctx, "select $1::int", 42).Scan(&n); err != nil || n != 42 {
				t.Fatalf("SELECT $1::int: %d, %v", n, err)
			}
			var str string
			if err := c.QueryRow(ctx, "SELECT $1::text", "it's").Scan(&str); err != nil || str != "it's" {
				t.Fatalf("SELECT $1::text: %q, %v", str, err)
			}
			if _, err := c.Exec(ctx, "SELECT pg_sleep($1)", 0.01); err != nil {
				t.Fatalf("pg_sleep($1): %v", err)
			}
			if _, err := c.Exec(ctx, "SELECT pg_sleep(0.01)"); err != nil {
				t.Fatalf("pg_sleep(0.01): %v", err)
			}
			if err := c.Ping(ctx); err != nil {
				t.Fatalf("Ping: %v", err)
			}

			table := "kv_" + strconv.Itoa(int(mode))
			if _, err := c.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+table+" (k INT8 PRIMARY KEY, v STRING NOT NULL)"); err != nil {
				t.Fatalf("create: %v", err)
			}
			if _, err := c.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+table+" (k INT8 PRIMARY KEY, v STRING NOT NULL)"); err != nil {
				t.Fatalf("create again: %v", err)
			}
			upsert := "INSERT INTO " + table + " (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
			for _, v := range []string{"a", "b"} {
				tag, err := c.Exec(ctx, upsert, 7, v)
				if err != nil || tag.String() != "INSERT 0 1" {
					t.Fatalf("upsert %q: %q, %v", v, tag, err)
				}
			}
			var v string
			if err := c.QueryRow(ctx, "SELECT v FROM "+table+" WHERE k = $1", 7).Scan(&v); err != nil || v != "b" {
				t.Fatalf("select: %q, %v", v, err)
			}
			if err := c.QueryRow(ctx, "SELECT v FROM "+table+" WHERE k = $1", 8).Scan(&v); !errors.Is(err, pgx.ErrNoRows) {
				t.Fatalf("select missing key: %v, want ErrNoRows", err)
			}
			if _, err := c.Exec(ctx, "INSERT INTO "+table+" (k, v) VALUES ($1, $2)", 7, "c"); sqlState(err) != "23505" {
				t.Fatalf("insert duplicate: %v, want 23505", err)
			}
			var addr string
			var port int32
			if err := c.QueryRow(ctx, "SELECT inet_server_addr()::text, inet_server_port()").Scan(&addr, &port); err != nil {
				t.Fatalf("inet_server_addr: %v", err)
			}
			if _, p, _ := net.SplitHostPort(s.Addr()); addr != "127.0.0.1/32" || strconv.Itoa(int(port)) != p {
				t.Fatalf("inet_server_addr, port = %q, %d; server at %s", addr, port, s.Addr())
			}
			var ip netip.Prefix
			if err := c.QueryRow(ctx, "SELECT inet_server_addr(), inet_server_port()").Scan(&ip, &port); err != nil || ip.Addr().String() != "127.0.0.1" {
				t.Fatalf("inet_server_addr as inet: %v, %v", ip, err)
			}
		})
	}
}

func TestTransactions(t *testing.T) {
	s := startServer(t)
	ctx := testCtx(t)
	c := connect(t, s, pgx.QueryExecModeCacheStatement)
	mustExec := func(sql string, args ...any) {
		t.Helper()
		if _, err := c.Exec(ctx, sql, args...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	count := func() int64 {
		t.Helper()
		var n int64
		if err := c.QueryRow(ctx, "SELECT count(*) FROM counters").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	mustExec("CREATE TABLE counters (id INT PRIMARY KEY, n INT8)")
	mustExec("INSERT INTO counters (id, n) VALUES (1, 0)")

	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if c.PgConn().TxStatus() != 'T' {
		t.Fatalf("TxStatus after BEGIN = %c", c.PgConn().TxStatus())
	}
	if _, err := tx.Exec(ctx, "UPDATE counters SET n = n + $1 WHERE id = $2", 5, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "INSERT INTO counters (id, n) VALUES ($1, $2)", 2, 1); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	var n int64
	if err := c.QueryRow(ctx, "SELECT n FROM counters WHERE id = 1").Scan(&n); err != nil || n != 0 || count() != 1 {
		t.Fatalf("after rollback: n=%d count=%d err=%v", n, count(), err)
	}

	// An error aborts the transaction; COMMIT then rolls back.
	tx, err = c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "UPDATE counters SET n = n + 1 WHERE id = 1"); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "SELECT nope FROM counters"); sqlState(err) != "42703" {
		t.Fatalf("bad column: %v", err)
	}
	if _, err := tx.Exec(ctx, "SELECT 1"); sqlState(err) != "25P02" {
		t.Fatalf("statement in aborted transaction: %v, want 25P02", err)
	}
	if err := tx.Commit(ctx); !errors.Is(err, pgx.ErrTxCommitRollback) {
		t.Fatalf("commit of aborted transaction: %v", err)
	}
	if err := c.QueryRow(ctx, "SELECT n FROM counters WHERE id = 1").Scan(&n); err != nil || n != 0 {
		t.Fatalf("after failed commit: n=%d err=%v", n, err)
	}

	err = pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "UPDATE counters SET n = n + 1 WHERE id = 1")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.QueryRow(ctx, "SELECT n FROM counters WHERE id = 1").Scan(&n); err != nil || n != 1 {
		t.Fatalf("after commit: n=%d err=%v", n, err)
	}
	if c.PgConn().TxStatus() != 'I' {
		t.Fatalf("TxStatus after COMMIT = %c", c.PgConn().TxStatus())
	}
}

func TestErrors(t *testing.T) {
	s := startServer(t)
	ctx := testCtx(t)
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeCacheStatement, pgx.QueryExecModeSimpleProtocol} {
		c := connect(t, s, mode)
		for _, tc := range []struct {
			sql, code string
		}{
			{"SELEKT 1", "42601"},
			{"SELECT 'unterminated", "42601"},
			{"EXPLAIN SELECT 1", "0A000"},
			{"SELECT 1, 2", "0A000"},
			{"SELECT v FROM missing WHERE k = 1", "42P01"},
			{"SELECT 'x'::int", "22P02"},
			{"SELECT * FROM crdb_internal.gossip_liveness", "42P01"},
		} {
			_, err := c.Exec(ctx, tc.sql)
			if got := sqlState(err); got != tc.code {
				t.Errorf("%v %q: %v (SQLSTATE %q), want %s", mode, tc.sql, err, got, tc.code)
			}
			var one int
			if err := c.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
				t.Fatalf("%v: connection unusable after %q: %v", mode, tc.sql, err)
			}
		}
	}
}

func TestCancelRunningSleep(t *testing.T) {
	s := startServer(t)
	for _, mode := range []pgx.QueryExecMode{pgx.QueryExecModeCacheStatement, pgx.QueryExecModeSimpleProtocol} {
		c := connect(t, s, mode)
		// Cancel explicitly and check the server's answer.
		done := make(chan error, 1)
		go func() {
			_, err := c.Exec(context.Background(), "SELECT pg_sleep($1)", 60)
			done <- err
		}()
		deadline := time.After(20 * time.Second)
		var err error
	wait:
		for {
			select {
			case err = <-done:
				break wait
			case <-deadline:
				t.Fatal("pg_sleep(60) was not cancelled")
			case <-time.After(20 * time.Millisecond):
				// The request may arrive before the statement starts; then
				// it is ignored, as in PostgreSQL, and we send another.
				cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				c.PgConn().CancelRequest(cctx)
				cancel()
			}
		}
		if sqlState(err) != "57014" {
			t.Fatalf("%v: cancelled pg_sleep: %v, want 57014", mode, err)
		}
		var one int
		if err := c.QueryRow(context.Background(), "SELECT 1").Scan(&one); err != nil {
			t.Fatalf("%v: connection unusable after cancel: %v", mode, err)
		}
	}

	// A context deadline cancels through pgx's own CancelRequest.
	c := connect(t, s, pgx.QueryExecModeCacheStatement)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := c.Exec(ctx, "SELECT pg_sleep(60)")
	if !errors.Is(err, context.DeadlineExceeded) && sqlState(err) != "57014" {
		t.Fatalf("pg_sleep with a deadline: %v", err)
	}
}

func TestPgxpool(t *testing.T) {
	s := startServer(t)
	ctx := testCtx(t)
	pool, err := pgxpool.New(ctx, dsn(s)+"&pool_max_conns=8&pool_min_conns=8")
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, "CREATE TABLE IF NOT EXISTS kv (k STRING PRIMARY KEY, v INT8)"); err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 16)
	for w := range 16 {
		go func() {
			var err error
			for i := 0; i < 50 && err == nil; i++ {
				k := fmt.Sprintf("k%d", (w*50+i)%20)
				_, err = pool.Exec(ctx, "UPSERT INTO kv (k, v) VALUES ($1, $2)", k, i)
				if err == nil {
					var v int64
					err = pool.QueryRow(ctx, "SELECT v FROM kv WHERE k = $1", k).Scan(&v)
				}
			}
			errs <- err
		}()
	}
	for range 16 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	var n int64
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM kv").Scan(&n); err != nil || n != 20 {
		t.Fatalf("count = %d, %v", n, err)
	}
}

func TestCloseEndsEverything(t *testing.T) {
	s, err := Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := connect(t, s, pgx.QueryExecModeCacheStatement)
	done := make(chan error, 1)
	go func() {
		_, err := c.Exec(context.Background(), "SELECT pg_sleep(60)")
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // let the statement start; the test passes either way
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatal("Close did not return")
	}
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("pg_sleep succeeded on a closed server")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("pg_sleep still running after Close")
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := net.DialTimeout("tcp", s.Addr(), time.Second); err == nil {
		t.Fatal("still listening after Close")
	}
}

func TestSplitStatements(t *testing.T) {
	for _, tc := range []struct {
		sql  string
		want int
	}{
		{"", 0},
		{"-- ping", 0},
		{";;", 0},
		{"SELECT 1; SELECT 2", 2},
		{"SELECT ';' /* ; */; -- ;\nSELECT 2;", 2},
	} {
		got, err := splitStatements(tc.sql)
		if err != nil || len(got) != tc.want {
			t.Errorf("splitStatements(%q) = %d statements, %v; want %d", tc.sql, len(got), err, tc.want)
		}
	}
}

func TestBatch(t *testing.T) {
	s := startServer(t)
	ctx := testCtx(t)
	for _, mode := range execModes {
		c := connect(t, s, mode)
		table := "b_" + strconv.Itoa(int(mode))
		if _, err := c.Exec(ctx, "CREATE TABLE "+table+" (k TEXT PRIMARY KEY, n INT8)"); err != nil {
			t.Fatal(err)
		}
		b := &pgx.Batch{}
		b.Queue("INSERT INTO "+table+" (k, n) VALUES ($1, $2)", "a", 1)
		b.Queue("UPDATE "+table+" SET n = n + $1 WHERE k = $2", 41, "a")
		b.Queue("SELECT n FROM "+table+" WHERE k = $1", "a")
		br := c.SendBatch(ctx, b)
		if _, err := br.Exec(); err != nil {
			t.Fatalf("%v: insert: %v", mode, err)
		}
		if tag, err := br.Exec(); err != nil || tag.String() != "UPDATE 1" {
			t.Fatalf("%v: update: %q %v", mode, tag, err)
		}
		var n int64
		if err := br.QueryRow().Scan(&n); err != nil || n != 42 {
			t.Fatalf("%v: select: %d %v", mode, n, err)
		}
		if err := br.Close(); err != nil {
			t.Fatal(err)
		}
		// An error in the middle of a batch fails the rest, and the
		// connection stays usable.
		b = &pgx.Batch{}
		b.Queue("SELECT 1")
		b.Queue("SELECT nope FROM " + table)
		b.Queue("SELECT 2")
		err := c.SendBatch(ctx, b).Close()
		if sqlState(err) != "42703" {
			t.Fatalf("%v: batch with a bad statement: %v", mode, err)
		}
		var one int
		if err := c.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
			t.Fatalf("%v: unusable after a failed batch: %v", mode, err)
		}
	}
}
