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
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/clusterpool/clusterpool/clustertest"
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
	if got, want := interrupted.Error(), "clusterpool: context deadline exceeded after 2 attempts on nodes [1]: EOF"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}

	// Attempts on no known node (every connect failed): no empty list.
	refused := fmt.Errorf("failed to connect: %w", sysErr(syscall.ECONNREFUSED))
	noNodes := error(&RetryError{Attempts: 6, Err: refused})
	if got, want := noNodes.Error(), "clusterpool: gave up after 6 attempts: failed to connect: read tcp: read: connection refused"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}

	// The deadline too near for the next attempt's backoff ended the
	// retries: the error matches the deadline and says so.
	near := error(&RetryError{Attempts: 3, Nodes: []NodeID{2}, Err: refused, Interrupted: errDeadlineTooNear})
	if !errors.Is(near, context.DeadlineExceeded) || !errors.Is(near, syscall.ECONNREFUSED) {
		t.Errorf("deadline-ended error does not match: %v", near)
	}
	if got, want := near.Error(), "clusterpool: context deadline too near to retry after 3 attempts on nodes [2]: failed to connect: read tcp: read: connection refused"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
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

// TestDecide runs the retry decision over a table, without a cluster or a
// clock: what follows a failed attempt given what the call saw before it,
// the time and the caller's deadline.
func TestDecide(t *testing.T) {
	now := time.Unix(1000, 0)
	refused := sysErr(syscall.ECONNREFUSED)
	conflict := pgErr("40001")
	unique := pgErr("23505")
	cut := fmt.Errorf("timeout: %w", context.DeadlineExceeded)
	type want struct {
		retry       bool
		delay       time.Duration
		raw         bool         // the caller gets the attempt's error unchanged
		cause       error        // the error the call ends with (RetryError.Err)
		class       ErrorClass   // cause's class, as traced
		attempts    int          // RetryError.Attempts
		unknown     bool         // RetryError.OutcomeUnknown
		interrupted error        // RetryError.Interrupted
		outcome     RetryOutcome // the trace event; 0 for none
	}
	tests := []struct {
		name        string
		state       retryState // attempts already counts the failed one
		f           failure
		deadline    time.Duration // from now; 0: none
		otherNode   bool
		policy      bool
		backoff     time.Duration
		want        want
		askedOther  bool // whether decide may ask for another node
		askedPolicy bool // whether decide may ask the policy
	}{
		{
			name:  "permanent error at the first attempt: unchanged, as pgxpool returns it",
			state: retryState{attempts: 1},
			f:     failure{RetryParams: RetryParams{Err: unique, Class: ClassPermanent, Attempt: 1, MaxRetries: 5, Stage: StageStatement, Sent: true}},
			want:  want{raw: true, cause: unique, class: ClassPermanent},
			// DefaultRetryPolicy would say no; here the policy is asked.
			askedPolicy: true,
		},
		{
			name:      "connect refused, another healthy node known: at once",
			state:     retryState{attempts: 1},
			f:         failure{RetryParams: RetryParams{Err: refused, Class: ClassConnection, Attempt: 1, MaxRetries: 5, Stage: StageConnect}},
			otherNode: true, policy: true, backoff: 40 * time.Millisecond,
			want:       want{retry: true},
			askedOther: true, askedPolicy: true,
		},
		{
			name:      "connect refused, no other node: back off",
			state:     retryState{attempts: 2},
			f:         failure{RetryParams: RetryParams{Err: refused, Class: ClassConnection, Attempt: 2, MaxRetries: 5, Stage: StageConnect}},
			otherNode: false, policy: true, backoff: 40 * time.Millisecond,
			want:       want{retry: true, delay: 40 * time.Millisecond},
			askedOther: true, askedPolicy: true,
		},
		{
			name:   "40001 backs off even with another node",
			state:  retryState{attempts: 1},
			f:      failure{RetryParams: RetryParams{Err: conflict, Class: ClassRestartTxn, Attempt: 1, MaxRetries: 5, Stage: StageStatement, Sent: true}},
			policy: true, otherNode: true, backoff: 5 * time.Second,
			want:        want{retry: true, delay: backoffMax},
			askedPolicy: true,
		},
		{
			name:     "backoff fits before the deadline",
			state:    retryState{attempts: 1},
			f:        failure{RetryParams: RetryParams{Err: conflict, Class: ClassRestartTxn, Attempt: 1, MaxRetries: 5, Stage: StageStatement, Sent: true}},
			deadline: time.Second, policy: true, backoff: 40 * time.Millisecond,
			want:        want{retry: true, delay: 40 * time.Millisecond},
			askedPolicy: true,
		},
		{
			name:     "the deadline leaves no time for the backoff: the deadline ends the call",
			state:    retryState{attempts: 3, nodes: []NodeID{2}},
			f:        failure{RetryParams: RetryParams{Err: conflict, Class: ClassRestartTxn, Attempt: 3, MaxRetries: 5, Stage: StageStatement, Sent: true}},
			deadline: 30 * time.Millisecond, policy: true, backoff: 40 * time.Millisecond,
			want:        want{cause: conflict, class: ClassRestartTxn, attempts: 3, interrupted: errDeadlineTooNear, outcome: RetryInterrupted},
			askedPolicy: true,
		},
		{
			name:     "the deadline leaves no time even at the first attempt",
			state:    retryState{attempts: 1},
			f:        failure{RetryParams: RetryParams{Err: refused, Class: ClassConnection, Attempt: 1, MaxRetries: 5, Stage: StageConnect}},
			deadline: 10 * time.Millisecond, policy: true, backoff: 25 * time.Millisecond,
			want:       want{cause: refused, class: ClassConnection, attempts: 1, interrupted: errDeadlineTooNear, outcome: RetryInterrupted},
			askedOther: true, askedPolicy: true,
		},
		{
			name:  "attempts used up",
			state: retryState{attempts: 6},
			f:     failure{RetryParams: RetryParams{Err: refused, Class: ClassConnection, Attempt: 6, MaxRetries: 5, Stage: StageConnect}},
			want:  want{cause: refused, class: ClassConnection, attempts: 6, outcome: RetryGaveUp},
		},
		{
			name:  "retries off: the first error unchanged",
			state: retryState{attempts: 1},
			f:     failure{RetryParams: RetryParams{Err: refused, Class: ClassConnection, Attempt: 1, MaxRetries: 0, Stage: StageConnect}},
			want:  want{raw: true, cause: refused, class: ClassConnection},
		},
		{
			name:  "WithoutRetry, outcome unknown: still says so",
			state: retryState{attempts: 1, nodes: []NodeID{1}},
			f:     failure{RetryParams: RetryParams{Err: io.ErrUnexpectedEOF, Class: ClassConnection, Attempt: 1, MaxRetries: 5, Stage: StageStatement, Sent: true}, noRetry: true},
			want:  want{cause: io.ErrUnexpectedEOF, class: ClassConnection, attempts: 1, unknown: true, outcome: RetryOutcomeUnknown},
		},
		{
			name:        "policy declines",
			state:       retryState{attempts: 2},
			f:           failure{RetryParams: RetryParams{Err: refused, Class: ClassConnection, Attempt: 2, MaxRetries: 5, Stage: StageConnect}},
			policy:      false,
			want:        want{cause: refused, class: ClassConnection, attempts: 2, outcome: RetryGaveUp},
			askedPolicy: true,
		},
		{
			name:  "an earlier unknown outcome sticks",
			state: retryState{attempts: 2, unknown: true, lastErr: io.EOF, lastClass: ClassConnection},
			f:     failure{RetryParams: RetryParams{Err: unique, Class: ClassPermanent, Attempt: 2, MaxRetries: 5, Stage: StageStatement, Sent: true}},
			want:  want{cause: unique, class: ClassPermanent, attempts: 2, unknown: true, outcome: RetryOutcomeUnknown},
			// The policy is asked and says no.
			askedPolicy: true,
		},
		{
			name:  "caller's context ends the first attempt: its error unchanged",
			state: retryState{attempts: 1},
			f:     failure{RetryParams: RetryParams{Err: cut, Class: ClassCanceled, Attempt: 1, MaxRetries: 5, Stage: StageStatement, Sent: true, ReadOnly: true}, callerErr: context.DeadlineExceeded},
			want:  want{raw: true, cause: cut, class: ClassCanceled},
		},
		{
			name:  "caller's context cuts a write after it was sent",
			state: retryState{attempts: 1, nodes: []NodeID{3}},
			f:     failure{RetryParams: RetryParams{Err: cut, Class: ClassCanceled, Attempt: 1, MaxRetries: 5, Stage: StageStatement, Sent: true}, callerErr: context.DeadlineExceeded},
			want:  want{cause: cut, class: ClassCanceled, attempts: 1, unknown: true, interrupted: context.DeadlineExceeded, outcome: RetryOutcomeUnknown},
		},
		{
			name:  "caller's deadline after retries: the earlier error, which says more",
			state: retryState{attempts: 3, nodes: []NodeID{1, 2}, lastErr: refused, lastClass: ClassConnection},
			f:     failure{RetryParams: RetryParams{Err: cut, Class: ClassCanceled, Attempt: 3, MaxRetries: 5, Stage: StageConnect}, callerErr: context.DeadlineExceeded},
			want:  want{cause: refused, class: ClassConnection, attempts: 3, interrupted: context.DeadlineExceeded, outcome: RetryInterrupted},
		},
		{
			name:      "idempotent write lost with its connection: retried, unknown remembered",
			state:     retryState{attempts: 1, nodes: []NodeID{1}},
			f:         failure{RetryParams: RetryParams{Err: io.EOF, Class: ClassConnection, Attempt: 1, MaxRetries: 5, Stage: StageStatement, Sent: true, Idempotent: true}},
			otherNode: true, policy: true,
			want:       want{retry: true},
			askedOther: true, askedPolicy: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var askedOther, askedPolicy, askedBackoff bool
			deadline, has := time.Time{}, tt.deadline != 0
			if has {
				deadline = now.Add(tt.deadline)
			}
			v := decide(tt.state, tt.f, now, deadline, has, retryEnv{
				allow:     func(RetryParams) bool { askedPolicy = true; return tt.policy },
				otherNode: func() bool { askedOther = true; return tt.otherNode },
				backoff:   func() time.Duration { askedBackoff = true; return tt.backoff },
			})
			w := tt.want
			if askedOther && !tt.askedOther || askedPolicy != tt.askedPolicy {
				t.Errorf("asked for another node %v (allowed %v), the policy %v (want %v)", askedOther, tt.askedOther, askedPolicy, tt.askedPolicy)
			}
			if askedBackoff && w.retry && w.delay == 0 {
				t.Errorf("drew a backoff for a retry that goes at once")
			}
			if v.retry != w.retry || v.delay != w.delay {
				t.Fatalf("retry %v after %v, want %v after %v (err %v)", v.retry, v.delay, w.retry, w.delay, v.err)
			}
			if w.retry {
				if v.state.attempts != tt.state.attempts || v.state.lastErr != tt.f.Err {
					t.Errorf("state %+v does not record the attempt", v.state)
				}
				if v.state.unknown != tt.f.OutcomeUnknown() {
					t.Errorf("state.unknown = %v", v.state.unknown)
				}
				return
			}
			if v.cause != w.cause || v.class != w.class || v.outcome != w.outcome {
				t.Errorf("ends with %v (%v), outcome %v; want %v (%v), outcome %v", v.cause, v.class, v.outcome, w.cause, w.class, w.outcome)
			}
			if w.raw {
				if v.err != tt.f.Err {
					t.Errorf("err = %v, want the attempt's error unchanged", v.err)
				}
				return
			}
			var re *RetryError
			if !errors.As(v.err, &re) {
				t.Fatalf("err = %v (%T), want a *RetryError", v.err, v.err)
			}
			if re.Attempts != w.attempts || re.Err != w.cause || re.OutcomeUnknown != w.unknown || re.Interrupted != w.interrupted {
				t.Errorf("RetryError %+v, want attempts %d, err %v, unknown %v, interrupted %v", re, w.attempts, w.cause, w.unknown, w.interrupted)
			}
			if !slices.Equal(re.Nodes, tt.state.nodes) {
				t.Errorf("RetryError.Nodes = %v, want %v", re.Nodes, tt.state.nodes)
			}
			if w.interrupted != nil {
				if !errors.Is(v.err, context.DeadlineExceeded) || !strings.Contains(v.err.Error(), "deadline") {
					t.Errorf("err = %q: the caller's deadline ended the call but it does not say so", v.err)
				}
			}
		})
	}
}

func TestAttemptClass(t *testing.T) {
	tests := []struct {
		class            ErrorClass
		stage            Stage
		callerDone, open bool
		want             ErrorClass
	}{
		{ClassCanceled, StageConnect, false, false, ClassConnection}, // a connect_timeout
		{ClassCanceled, StageStatement, true, false, ClassCanceled},  // the caller's
		{ClassConnection, StageTx, false, true, ClassPermanent},      // fn's own network error
		{ClassConnection, StageTx, false, false, ClassConnection},    // the transaction's connection broke
		{ClassCanceled, StageTx, false, true, ClassPermanent},        // fn's own timeout
		{ClassConnection, StageStatement, false, true, ClassConnection},
		{ClassRestartTxn, StageTx, false, true, ClassRestartTxn},
	}
	for _, tt := range tests {
		if got := attemptClass(tt.class, tt.stage, tt.callerDone, tt.open); got != tt.want {
			t.Errorf("attemptClass(%v, %v, callerDone %v, open %v) = %v, want %v", tt.class, tt.stage, tt.callerDone, tt.open, got, tt.want)
		}
	}
}

// retryEvents records a pool's retry events.
type retryEvents struct {
	mu      sync.Mutex
	retries []TraceRetryData
	ends    []TraceRetryEndData
}

func (r *retryEvents) TraceRetry(_ context.Context, _ *Pool, d TraceRetryData) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.retries = append(r.retries, d)
}

func (r *retryEvents) TraceRetryEnd(_ context.Context, _ *Pool, d TraceRetryEndData) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ends = append(r.ends, d)
}

// silentServer accepts connections and never answers, like a partitioned
// node; it returns the address.
func silentServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String()
}

// A connect that times out on the pool's own connect_timeout is a context
// error while the caller's context is live: the retry policy sees it as a
// connection failure. Both retry events name that class, the one the
// policy decided on; TraceRetryEnd used to carry the raw class (canceled).
func TestRetryTraceClassesAgree(t *testing.T) {
	cfg, err := ParseConfig("postgres://u@" + silentServer(t) + "/db?sslmode=disable&cluster_max_retries=1")
	if err != nil {
		t.Fatal(err)
	}
	cfg.ConnConfig.ConnectTimeout = 50 * time.Millisecond
	events := &retryEvents{}
	cfg.Tracer = events
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	p, err := NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	_, err = p.Exec(ctx, "SELECT 1")
	var re *RetryError
	if !errors.As(err, &re) || re.Attempts != 2 {
		t.Fatalf("Exec = %v, want a *RetryError after 2 attempts", err)
	}
	if errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, ErrOutcomeUnknown) && strings.Contains(err.Error(), "context deadline exceeded after") {
		t.Errorf("the pool's own connect timeout reads as the caller's deadline: %v", err)
	}
	events.mu.Lock()
	defer events.mu.Unlock()
	if len(events.retries) != 1 || len(events.ends) != 1 {
		t.Fatalf("events: %d retries, %d ends; want 1 and 1", len(events.retries), len(events.ends))
	}
	if r, e := events.retries[0].Class, events.ends[0].Class; r != ClassConnection || e != r {
		t.Errorf("TraceRetryData.Class = %v, TraceRetryEndData.Class = %v; want both %v", r, e, ClassConnection)
	}
}

// deadAddr returns an address nobody listens on.
func deadAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// Exec on a dead address gives up after its attempts with an error that
// names them, and no empty node list: no node was ever reached.
func TestRetryDeadAddressError(t *testing.T) {
	p := startPool(t, "postgres://u@"+deadAddr(t)+"/db?sslmode=disable", nil)
	_, err := p.Exec(testCtx(t), "SELECT 1")
	var re *RetryError
	if !errors.As(err, &re) || re.Attempts != DefaultMaxRetries+1 || len(re.Nodes) != 0 {
		t.Fatalf("Exec = %v, want a *RetryError after %d attempts on no node", err, DefaultMaxRetries+1)
	}
	if want := fmt.Sprintf("clusterpool: gave up after %d attempts: failed to connect to ", DefaultMaxRetries+1); !strings.HasPrefix(err.Error(), want) {
		t.Errorf("Exec error %q does not start %q", err, want)
	}
	if strings.Contains(err.Error(), "nodes") || !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("Exec error %q", err)
	}
}

// When the caller's deadline ends the retries, whether it passes during an
// attempt or a backoff or is too near for the next backoff, the error
// matches context.DeadlineExceeded and says so. MaxRetries is high, so only
// the deadline can end these calls.
func TestRetryDeadlineEndsRetries(t *testing.T) {
	p := startPool(t, "postgres://u@"+deadAddr(t)+"/db?sslmode=disable&cluster_max_retries=1000", nil)
	for _, timeout := range []time.Duration{30 * time.Millisecond, 300 * time.Millisecond, time.Second} {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		_, err := p.Exec(ctx, "SELECT 1")
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "deadline") {
			t.Errorf("Exec with a %v deadline = %v, want an error matching and naming the deadline", timeout, err)
		}
	}
}

// QueryRow sends its query when called, with the arguments as they are
// then; a failure that Scan meets (here a 40001 on the first execution) is
// retried with those same arguments, not with what the caller's slice holds
// by the time of Scan.
func TestQueryRowRetryKeepsArguments(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 1, Postgres: true})
	if err := c.Nodes()[0].ExecDirect(testCtx(t), `
		CREATE SEQUENCE flaky_calls;
		CREATE FUNCTION flaky(v int) RETURNS int LANGUAGE plpgsql AS $$
		BEGIN
			IF nextval('flaky_calls') = 1 THEN
				RAISE EXCEPTION 'first call fails' USING ERRCODE = '40001';
			END IF;
			RETURN v;
		END $$`); err != nil {
		t.Fatal(err)
	}
	events := &retryEvents{}
	p := startPool(t, c.DSN(), func(cfg *Config) { cfg.Tracer = events })
	args := []any{1}
	row := p.QueryRow(testCtx(t), "SELECT flaky($1)", args...)
	args[0] = 99
	var v int
	if err := row.Scan(&v); err != nil || v != 1 {
		t.Fatalf("Scan = %d, %v; want 1, nil", v, err)
	}
	events.mu.Lock()
	defer events.mu.Unlock()
	if len(events.ends) != 1 || events.ends[0].Outcome != RetrySucceeded || events.ends[0].Attempts != 2 {
		t.Errorf("retry ends %+v, want one success after 2 attempts", events.ends)
	}
}
