package clustertest

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// testCtx is a generous deadline for one test's operations on a loaded
// machine.
func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func connect(t testing.TB, ctx context.Context, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect %s: %v", dsn, err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// eventually polls cond every 20 ms for up to 20 s.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// requirePostgres skips or fails a test that starts clusters with Start
// instead of New, exactly as New would.
func requirePostgres(t testing.TB) {
	t.Helper()
	skipUnlessRequired(t, Available())
}

func sqlState(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

// recordingTB records how a test would have ended.
type recordingTB struct {
	testing.TB
	skipped, failed string
}

func (r *recordingTB) Helper()                        {}
func (r *recordingTB) Skip(args ...any)               { r.skipped = fmt.Sprint(args...) }
func (r *recordingTB) Fatalf(format string, a ...any) { r.failed = fmt.Sprintf(format, a...) }

// Without PostgreSQL a test skips, naming what to install, unless
// CLUSTERTEST_REQUIRE=1, which makes it fail instead.
func TestSkipUnlessRequired(t *testing.T) {
	missing := errors.New("clustertest: install PostgreSQL")
	for _, tc := range []struct {
		require       string
		err           error
		skip, failure string
	}{
		{"", nil, "", ""},
		{"1", nil, "", ""},
		{"", missing, missing.Error(), ""},
		{"0", missing, missing.Error(), ""},
		{"1", missing, "", missing.Error() + " (CLUSTERTEST_REQUIRE=1)"},
	} {
		t.Setenv("CLUSTERTEST_REQUIRE", tc.require)
		r := &recordingTB{TB: t}
		skipUnlessRequired(r, tc.err)
		if r.skipped != tc.skip || r.failed != tc.failure {
			t.Errorf("REQUIRE=%q, %v: skipped %q, failed %q; want %q, %q", tc.require, tc.err, r.skipped, r.failed, tc.skip, tc.failure)
		}
	}
}
