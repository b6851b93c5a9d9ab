package clusterpool

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// notSentError stands for the pgconn errors that implement SafeToRetry.
type notSentError struct{}

func (notSentError) Error() string     { return "not sent" }
func (notSentError) SafeToRetry() bool { return true }

type timeoutError struct{}

func (timeoutError) Error() string   { return "i/o timeout" }
func (timeoutError) Timeout() bool   { return true }
func (timeoutError) Temporary() bool { return true }

func pgErr(code string) error {
	return &pgconn.PgError{Severity: "ERROR", Code: code, Message: "m"}
}

func sysErr(errno syscall.Errno) error {
	return &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", errno)}
}

func TestClassify(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want ErrorClass
	}{
		{"nil", nil, ClassNone},
		{"plain error", errors.New("boom"), ClassPermanent},
		// Message text never decides: this is CockroachDB's drain message
		// without its SQLSTATE.
		{"drain text without code", errors.New("server is not accepting clients, try another node"), ClassPermanent},

		{"canceled", context.Canceled, ClassCanceled},
		{"deadline", context.DeadlineExceeded, ClassCanceled},
		{"wrapped canceled", fmt.Errorf("query: %w", context.Canceled), ClassCanceled},
		{"canceled wins over EOF", errors.Join(io.EOF, context.Canceled), ClassCanceled},
		{"canceled wins over 57P01", errors.Join(pgErr("57P01"), context.DeadlineExceeded), ClassCanceled},

		{"40001", pgErr("40001"), ClassRestartTxn},
		{"wrapped 40001", fmt.Errorf("exec: %w", pgErr("40001")), ClassRestartTxn},
		{"40003", pgErr("40003"), ClassAmbiguous},
		{"wrapped 40003", fmt.Errorf("commit: %w", pgErr("40003")), ClassAmbiguous},
		{"57P01 admin shutdown / not accepting clients", pgErr("57P01"), ClassConnection},
		{"57P02 crash shutdown", pgErr("57P02"), ClassConnection},
		{"57P03 cannot connect now", pgErr("57P03"), ClassConnection},
		{"08000 connection exception", pgErr("08000"), ClassConnection},
		{"08001 cannot establish", pgErr("08001"), ClassConnection},
		{"08003 connection does not exist", pgErr("08003"), ClassConnection},
		{"08004 connection rejected", pgErr("08004"), ClassConnection},
		{"08006 connection failure", pgErr("08006"), ClassConnection},
		{"08007 transaction resolution unknown", pgErr("08007"), ClassConnection},
		{"08P01 protocol violation", pgErr("08P01"), ClassConnection},
		{"wrapped 57P01", fmt.Errorf("a: %w", fmt.Errorf("b: %w", pgErr("57P01"))), ClassConnection},
		{"SQLSTATE wins over transport", errors.Join(io.EOF, pgErr("23505")), ClassPermanent},
		{"typed nil PgError", fmt.Errorf("x: %w", (*pgconn.PgError)(nil)), ClassPermanent},
		{"typed nil PgError beside EOF", errors.Join((*pgconn.PgError)(nil), io.EOF), ClassConnection},
		{"23505 unique violation", pgErr("23505"), ClassPermanent},
		{"42601 syntax error", pgErr("42601"), ClassPermanent},
		{"40P01 deadlock", pgErr("40P01"), ClassPermanent},
		{"57014 query canceled", pgErr("57014"), ClassPermanent},
		{"28P01 bad password", pgErr("28P01"), ClassPermanent},

		{"EOF", io.EOF, ClassConnection},
		{"unexpected EOF", io.ErrUnexpectedEOF, ClassConnection},
		{"wrapped unexpected EOF", fmt.Errorf("receive message failed: %w", io.ErrUnexpectedEOF), ClassConnection},
		{"net.ErrClosed", net.ErrClosed, ClassConnection},
		{"pgconn conn closed", fmt.Errorf("x: %w", pgconn.ErrConnClosed), ClassConnection},
		{"ECONNRESET", sysErr(syscall.ECONNRESET), ClassConnection},
		{"ECONNREFUSED", sysErr(syscall.ECONNREFUSED), ClassConnection},
		{"EPIPE", sysErr(syscall.EPIPE), ClassConnection},
		{"bare EPIPE", fmt.Errorf("write: %w", syscall.EPIPE), ClassConnection},
		{"net timeout", timeoutError{}, ClassConnection},
		{"connect error", &pgconn.ConnectError{Config: &pgconn.Config{}}, ClassConnection},

		// A certificate that does not verify is a configuration error:
		// every attempt would fail the same way.
		{"unknown authority", fmt.Errorf("tls error: %w", &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}), ClassPermanent},
		{"wrong host name", fmt.Errorf("tls error: %w", x509.HostnameError{Host: "db"}), ClassPermanent},
		{"expired certificate", x509.CertificateInvalidError{Reason: x509.Expired}, ClassPermanent},

		{"safe to retry", notSentError{}, ClassNotSent},
		{"wrapped safe to retry", fmt.Errorf("x: %w", notSentError{}), ClassNotSent},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Classify(tt.err); got != tt.want {
				t.Errorf("Classify(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

// TestClassifyDriverErrors classifies errors produced by pgconn itself rather
// than built by hand.
func TestClassifyDriverErrors(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	// Refused: nothing listens on a port we just closed.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refusedAddr := ln.Addr().String()
	ln.Close()
	_, err = pgconn.Connect(ctx, "postgres://u@"+refusedAddr+"/db?sslmode=disable")
	if err == nil || Classify(err) != ClassConnection {
		t.Errorf("refused connect: Classify(%v) = %v, want connection", err, Classify(err))
	}

	// Closed by the server right after accept: EOF during startup.
	ln, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	_, err = pgconn.Connect(ctx, "postgres://u@"+ln.Addr().String()+"/db?sslmode=disable")
	if err == nil || Classify(err) != ClassConnection {
		t.Errorf("closed at startup: Classify(%v) = %v, want connection", err, Classify(err))
	}

	// The caller's own cancellation while connecting.
	cctx, ccancel := context.WithCancel(ctx)
	ccancel()
	_, err = pgconn.Connect(cctx, "postgres://u@"+ln.Addr().String()+"/db?sslmode=disable")
	if err == nil || Classify(err) != ClassCanceled {
		t.Errorf("canceled connect: Classify(%v) = %v, want canceled", err, Classify(err))
	}
}

func TestErrorClassString(t *testing.T) {
	for c := ClassNone; c <= ClassAmbiguous; c++ {
		if s := c.String(); s == "" || strings.HasPrefix(s, "ErrorClass(") {
			t.Errorf("class %d has no name: %q", c, s)
		}
	}
	if s := ErrorClass(200).String(); s != "ErrorClass(200)" {
		t.Errorf("unknown class: %q", s)
	}
}

func TestDefaultRetryPolicy(t *testing.T) {
	live := context.Background()
	done, cancel := context.WithCancel(live)
	cancel()
	tests := []struct {
		name        string
		ctx         context.Context
		p           RetryParams
		want        bool
		wantUnknown bool
	}{
		{"not sent", live, RetryParams{Class: ClassNotSent}, true, false},
		{"40001 statement", live, RetryParams{Class: ClassRestartTxn, Sent: true, Stage: StageStatement}, true, false},
		{"40001 at commit", live, RetryParams{Class: ClassRestartTxn, Sent: true, Stage: StageCommit}, true, false},
		{"connect failure", live, RetryParams{Class: ClassConnection, Stage: StageConnect}, true, false},
		{"connection, not sent", live, RetryParams{Class: ClassConnection, Stage: StageStatement}, true, false},
		{"connection, write sent", live, RetryParams{Class: ClassConnection, Sent: true, Stage: StageStatement}, false, true},
		{"connection, write sent, idempotent", live, RetryParams{Class: ClassConnection, Sent: true, Stage: StageStatement, Idempotent: true}, true, true},
		{"connection, read sent", live, RetryParams{Class: ClassConnection, Sent: true, Stage: StageStatement, ReadOnly: true}, true, false},
		{"connection inside tx function", live, RetryParams{Class: ClassConnection, Sent: true, Stage: StageTx}, true, false},
		{"connection during commit", live, RetryParams{Class: ClassConnection, Sent: true, Stage: StageCommit}, false, true},
		{"connection during commit, idempotent", live, RetryParams{Class: ClassConnection, Sent: true, Stage: StageCommit, Idempotent: true}, true, true},
		{"connection during read-only commit", live, RetryParams{Class: ClassConnection, Sent: true, Stage: StageCommit, ReadOnly: true}, true, false},
		{"40003", live, RetryParams{Class: ClassAmbiguous, Sent: true, Stage: StageStatement}, false, true},
		{"40003 read-only still ambiguous", live, RetryParams{Class: ClassAmbiguous, Sent: true, ReadOnly: true}, false, true},
		{"40003 idempotent", live, RetryParams{Class: ClassAmbiguous, Sent: true, Idempotent: true}, true, true},
		{"permanent", live, RetryParams{Class: ClassPermanent, Sent: true}, false, false},
		{"permanent idempotent", live, RetryParams{Class: ClassPermanent, Sent: true, Idempotent: true}, false, false},
		{"canceled", live, RetryParams{Class: ClassCanceled, Sent: true, Idempotent: true}, false, false},
		// The caller's context cut the attempt (the policy is not asked
		// then, but OutcomeUnknown decides the error).
		{"caller's deadline, write sent", done, RetryParams{Class: ClassCanceled, Sent: true, Stage: StageStatement}, false, true},
		{"caller's deadline, commit sent", done, RetryParams{Class: ClassCanceled, Sent: true, Stage: StageCommit}, false, true},
		{"caller's deadline, read sent", done, RetryParams{Class: ClassCanceled, Sent: true, Stage: StageStatement, ReadOnly: true}, false, false},
		{"caller's deadline, write not sent", done, RetryParams{Class: ClassCanceled, Stage: StageStatement}, false, false},
		{"caller's deadline inside tx function", done, RetryParams{Class: ClassCanceled, Sent: true, Stage: StageTx}, false, false},
		{"caller's deadline while connecting", done, RetryParams{Class: ClassCanceled, Stage: StageConnect}, false, false},
		{"caller's context done", done, RetryParams{Class: ClassNotSent}, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := DefaultRetryPolicy(tt.ctx, tt.p); got != tt.want {
				t.Errorf("DefaultRetryPolicy(%+v) = %v, want %v", tt.p, got, tt.want)
			}
			if got := tt.p.OutcomeUnknown(); got != tt.wantUnknown {
				t.Errorf("OutcomeUnknown(%+v) = %v, want %v", tt.p, got, tt.wantUnknown)
			}
		})
	}
}

func TestRetryError(t *testing.T) {
	last := fmt.Errorf("exec: %w", pgErr("57P01"))
	err := error(&RetryError{Attempts: 3, Nodes: []NodeID{1, 3}, Err: last})
	if got, want := err.Error(), "clusterpool: gave up after 3 attempts on nodes [1 3]: exec: ERROR: m (SQLSTATE 57P01)"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57P01" {
		t.Errorf("errors.As does not find the PgError in %v", err)
	}
	if errors.Is(err, ErrOutcomeUnknown) {
		t.Errorf("errors.Is(%v, ErrOutcomeUnknown) = true", err)
	}

	unknown := error(&RetryError{Attempts: 1, Nodes: []NodeID{2}, Err: io.ErrUnexpectedEOF, OutcomeUnknown: true})
	if !errors.Is(unknown, ErrOutcomeUnknown) || !errors.Is(unknown, io.ErrUnexpectedEOF) {
		t.Errorf("outcome-unknown error does not match: %v", unknown)
	}
	if got := unknown.Error(); !strings.Contains(got, "outcome unknown after 1 attempt on nodes [2]") {
		t.Errorf("Error() = %q", got)
	}

	interrupted := error(&RetryError{Attempts: 2, Nodes: []NodeID{1}, Err: io.EOF, Interrupted: context.DeadlineExceeded})
	if !errors.Is(interrupted, context.DeadlineExceeded) || !errors.Is(interrupted, io.EOF) {
		t.Errorf("interrupted error does not match: %v", interrupted)
	}
	if got := interrupted.Error(); !strings.Contains(got, "after 2 attempts on nodes [1]") {
		t.Errorf("Error() = %q", got)
	}

	// A write the caller's deadline cut after it was sent: one attempt,
	// matching both the context error and ErrOutcomeUnknown.
	cut := error(&RetryError{Attempts: 1, Nodes: []NodeID{3}, Err: fmt.Errorf("timeout: %w", context.DeadlineExceeded), OutcomeUnknown: true, Interrupted: context.DeadlineExceeded})
	if !errors.Is(cut, context.DeadlineExceeded) || !errors.Is(cut, ErrOutcomeUnknown) {
		t.Errorf("interrupted write does not match both: %v", cut)
	}
	if got := cut.Error(); !strings.Contains(got, "outcome unknown after 1 attempt on nodes [3]") {
		t.Errorf("Error() = %q", got)
	}
}

func TestContextMarks(t *testing.T) {
	ctx := context.Background()
	if isIdempotent(ctx) || retryDisabled(ctx) {
		t.Fatal("a plain context is marked")
	}
	if !isIdempotent(WithIdempotent(ctx)) || retryDisabled(WithIdempotent(ctx)) {
		t.Error("WithIdempotent")
	}
	if !retryDisabled(WithoutRetry(ctx)) || isIdempotent(WithoutRetry(ctx)) {
		t.Error("WithoutRetry")
	}
	both := WithoutRetry(WithIdempotent(ctx))
	if !retryDisabled(both) || !isIdempotent(both) {
		t.Error("marks do not stack")
	}
}

func TestBackoffBounds(t *testing.T) {
	// The jittered sequence never exceeds the cap and starts near 25 ms.
	for range 100 {
		b := newBackoff()
		now := time.Unix(1000, 0)
		for i := range 30 {
			d, ok := nextBackoff(b.NextBackOff(), now, time.Time{}, false)
			if !ok {
				t.Fatalf("step %d: backoff stopped without a deadline", i)
			}
			if d <= 0 || d > backoffMax {
				t.Fatalf("step %d: backoff %v outside (0, %v]", i, d, backoffMax)
			}
			if i == 0 && (d < backoffInitial/2 || d > backoffInitial*3/2) {
				t.Fatalf("first backoff %v, want 25 ms ± 50%%", d)
			}
		}
	}

	now := time.Unix(1000, 0)
	tests := []struct {
		name     string
		next     time.Duration
		deadline time.Time
		has      bool
		want     time.Duration
		wantOK   bool
	}{
		{"no deadline", 40 * time.Millisecond, time.Time{}, false, 40 * time.Millisecond, true},
		{"capped", 5 * time.Second, time.Time{}, false, backoffMax, true},
		{"fits before deadline", 40 * time.Millisecond, now.Add(time.Second), true, 40 * time.Millisecond, true},
		{"would reach deadline", 40 * time.Millisecond, now.Add(40 * time.Millisecond), true, 0, false},
		{"would pass deadline", 40 * time.Millisecond, now.Add(10 * time.Millisecond), true, 0, false},
		{"deadline passed", 40 * time.Millisecond, now.Add(-time.Second), true, 0, false},
		{"capped then past deadline", 5 * time.Second, now.Add(999 * time.Millisecond), true, 0, false},
		{"backoff stopped", -1, time.Time{}, false, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, ok := nextBackoff(tt.next, now, tt.deadline, tt.has)
			if d != tt.want || ok != tt.wantOK {
				t.Errorf("nextBackoff = %v, %v; want %v, %v", d, ok, tt.want, tt.wantOK)
			}
			if ok && tt.has && !now.Add(d).Before(tt.deadline) {
				t.Errorf("sleep of %v passes the deadline", d)
			}
		})
	}
}

func TestSleepCtx(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := sleepCtx(ctx, nil, time.Hour); !errors.Is(err, context.Canceled) {
		t.Errorf("sleepCtx on a canceled context = %v", err)
	}
	if err := sleepCtx(context.Background(), nil, time.Millisecond); err != nil {
		t.Errorf("sleepCtx = %v", err)
	}
	wake := make(chan struct{})
	close(wake)
	if err := sleepCtx(context.Background(), wake, time.Hour); err != nil {
		t.Errorf("sleepCtx woken = %v, want nil (the next attempt reports the closed pool)", err)
	}
}

func TestReadOnlySQL(t *testing.T) {
	tests := []struct {
		sql  string
		want bool
	}{
		{"SELECT 1", true},
		{"select v from kv where k = $1", true},
		{"  \n\t-- leading comment\n/* block */ SELECT v FROM kv", true},
		{"SELECT count(*), max(v) FROM kv WHERE k IN (SELECT k FROM other)", true},
		{"SELECT v FROM kv WHERE EXISTS (SELECT 1 FROM t WHERE (a = b))", true},
		{"SELECT pg_sleep(0.1)", true},
		{"SELECT 1;", true},
		{"SHOW transaction_isolation", true},
		{"VALUES (1), (2)", true},
		{"SELECT * FROM (SELECT 1) AS s", true},

		{"", false},
		{"-- only a comment", false},
		{"INSERT INTO kv VALUES (1, 2)", false},
		{"UPDATE kv SET v = 1", false},
		{"DELETE FROM kv", false},
		{"UPSERT INTO kv VALUES (1, 2)", false},
		{"WITH x AS (DELETE FROM kv RETURNING *) SELECT * FROM x", false},
		{"WITH x AS (SELECT 1) SELECT * FROM x", false},
		{"SELECT nextval('seq')", false},
		{"SELECT setval('seq', 1)", false},
		{"SELECT my_func(1)", false},
		{"SELECT public.my_func(1)", false},
		{"SELECT v FROM kv FOR UPDATE", false},
		{"SELECT * INTO newtable FROM kv", false},
		{"SELECT 1; DELETE FROM kv", false},
		{"SELECT 1; SELECT 2", false},
		{"EXPLAIN ANALYZE DELETE FROM kv", false},
		{"EXPLAIN SELECT 1", false},
		{"selectx FROM t", false},
		{"select_stmt", false}, // a prepared statement's name
		{"CALL proc()", false},
		{"SELECT CAST(v AS numeric(10, 2)) FROM kv", false},
		{`SELECT "writeStuff"()`, false},
		{`SELECT "my schema".count(1)`, false},
		{"SELECT myschema.count(1)", false},
		{"SELECT myschema . count (1)", false},
		{`SELECT "Name", t.v FROM "Users" AS t WHERE t.k = $1`, true},
		{"SELECT count (*) FROM kv", true},
		{`SELECT "unterminated`, false},
	}
	for _, tt := range tests {
		if got := readOnlySQL(tt.sql); got != tt.want {
			t.Errorf("readOnlySQL(%q) = %v, want %v", tt.sql, got, tt.want)
		}
	}
}

// FuzzReadOnlySQL: the textual rule never panics, and never calls a
// statement read-only that does not start with SELECT, SHOW or VALUES.
func FuzzReadOnlySQL(f *testing.F) {
	for _, s := range []string{"SELECT 1", `SELECT "a"(`, "SELECT x.count(1)", "/* c */ SHOW x;", "--\n", "SELECT 1; DELETE", "VALUES ($1)"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, sql string) {
		if !readOnlySQL(sql) {
			return
		}
		first, _ := nextWord(skipSpaceAndComments(sql))
		switch strings.ToLower(first) {
		case "select", "show", "values":
		default:
			t.Errorf("readOnlySQL(%q) = true", sql)
		}
	})
}
