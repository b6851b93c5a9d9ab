package clusterpool

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ErrOutcomeUnknown is matched (with errors.Is) by an error returned when a
// statement or COMMIT may or may not have been applied: SQLSTATE 40003, a
// connection that broke after a write was sent, a COMMIT whose answer never
// arrived, or a write or COMMIT that the caller's own context interrupted
// after it was sent (the error then matches the context error too). The
// pool never re-runs such work unless the caller marked it with
// WithIdempotent; the caller has to find out what happened. Reads, and work
// that certainly was not sent (pgconn.SafeToRetry), never match it.
var ErrOutcomeUnknown = errors.New("clusterpool: outcome unknown")

// ErrorClass says what an error means for a retry. Classify computes it.
type ErrorClass uint8

const (
	// ClassNone is the class of a nil error.
	ClassNone ErrorClass = iota
	// ClassPermanent is every error not listed below: a constraint
	// violation, a syntax error, a closed pool. It is returned at once.
	ClassPermanent
	// ClassCanceled is a context error (context.Canceled or
	// context.DeadlineExceeded, however wrapped). When the caller's context
	// is done it is the caller's and is returned at once; the pool never
	// counts it against a node. A context error while the caller's context
	// is still live (a connect_timeout, say) is treated as ClassConnection.
	ClassCanceled
	// ClassNotSent is an error that pgconn guarantees happened before
	// anything was sent to the server (pgconn.SafeToRetry) and that says
	// nothing about the node. The work can be retried anywhere.
	ClassNotSent
	// ClassRestartTxn is SQLSTATE 40001 (serialization failure, CockroachDB's
	// "restart transaction"): the server aborted the transaction, so nothing
	// of it was applied. Retried after a backoff.
	ClassRestartTxn
	// ClassConnection is a failure of the connection or of the node behind
	// it: connection closed, EOF, reset, refused, a network error, a failed
	// connect, SQLSTATE 57P01 (admin shutdown, also CockroachDB's "server is
	// not accepting clients"), 57P02, 57P03 and class 08. The connection is
	// retired and the work is retried on a different node when that is safe:
	// nothing was sent, or the work is read-only or idempotent.
	ClassConnection
	// ClassAmbiguous is SQLSTATE 40003 (statement completion unknown,
	// CockroachDB's "result is ambiguous"): the work may have been applied.
	// Retried only when the caller marked it idempotent.
	ClassAmbiguous
)

func (c ErrorClass) String() string {
	switch c {
	case ClassNone:
		return "none"
	case ClassPermanent:
		return "permanent"
	case ClassCanceled:
		return "canceled"
	case ClassNotSent:
		return "not-sent"
	case ClassRestartTxn:
		return "restart-txn"
	case ClassConnection:
		return "connection"
	case ClassAmbiguous:
		return "ambiguous"
	}
	return fmt.Sprintf("ErrorClass(%d)", uint8(c))
}

// Classify tells what err means for a retry, by error type and SQLSTATE,
// never by message text. Wrapped errors (fmt.Errorf with %w, errors.Join)
// are looked through. The order matters: a context error wins over
// everything (pgconn wraps the caller's cancellation in timeout errors), a
// server's SQLSTATE wins over the transport error around it, and a
// connection failure wins over pgconn.SafeToRetry, because a connection that
// failed before sending still says the node may be gone.
func Classify(err error) ErrorClass {
	if err == nil {
		return ClassNone
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return ClassCanceled
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr != nil {
		return classifySQLState(pgErr.Code)
	}
	if isCertificateError(err) {
		return ClassPermanent
	}
	if isConnectionFailure(err) {
		return ClassConnection
	}
	if pgconn.SafeToRetry(err) {
		return ClassNotSent
	}
	return ClassPermanent
}

func classifySQLState(code string) ErrorClass {
	switch code {
	case "40001": // serialization_failure
		return ClassRestartTxn
	case "40003": // statement_completion_unknown
		return ClassAmbiguous
	case "57P01", // admin_shutdown: drain, "server is not accepting clients"
		"57P02", // crash_shutdown
		"57P03": // cannot_connect_now: starting up or shutting down
		return ClassConnection
	}
	if strings.HasPrefix(code, "08") { // connection_exception
		return ClassConnection
	}
	return ClassPermanent
}

// notSent reports whether err proves that the work never reached the server.
// pgconn.SafeToRetry says so, except for pgconn.ErrConnClosed: pgx drops the
// read error of a simple-protocol statement (a COMMIT, an Exec without
// arguments) whose connection broke after the statement was written and
// reports "conn closed", marked safe to retry, instead. A connection the pool
// hands out is never already closed (pgxpool destroys closed connections at
// release), so "conn closed" during an attempt means it closed under the
// statement, and the statement may have been applied.
func notSent(err error) bool {
	return pgconn.SafeToRetry(err) && !errors.Is(err, pgconn.ErrConnClosed)
}

// isCertificateError reports whether the client could not verify the
// server's certificate (unknown authority, wrong host name, expired). Like a
// failed authentication it is a configuration error that every attempt would
// meet again, and pgconn's one attempt already tried every host it could.
func isCertificateError(err error) bool {
	var verify *tls.CertificateVerificationError
	var unknown x509.UnknownAuthorityError
	var hostname x509.HostnameError
	var invalid x509.CertificateInvalidError
	return errors.As(err, &verify) || errors.As(err, &unknown) || errors.As(err, &hostname) || errors.As(err, &invalid)
}

// isConnectionFailure reports whether err says the connection (or the way to
// the node) failed rather than the statement.
func isConnectionFailure(err error) bool {
	if errors.Is(err, pgconn.ErrConnClosed) ||
		errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ECONNABORTED) ||
		errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, syscall.ETIMEDOUT) ||
		errors.Is(err, syscall.EHOSTUNREACH) ||
		errors.Is(err, syscall.ENETUNREACH) {
		return true
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		return true
	}
	// A failed connect never sent a statement; what failed is the way to
	// the node (an authentication failure carries a SQLSTATE and was
	// classified before this).
	var connectErr *pgconn.ConnectError
	return errors.As(err, &connectErr)
}

// Stage says how far a unit of work had got when it failed.
type Stage uint8

const (
	// StageConnect is acquiring or opening a connection: nothing was sent.
	StageConnect Stage = iota
	// StageStatement is a single statement, query, batch or BEGIN outside
	// of a transaction function.
	StageStatement
	// StageTx is inside a BeginFunc function, before COMMIT was sent: a
	// failure here means the transaction did not commit.
	StageTx
	// StageCommit is the COMMIT of a BeginFunc transaction.
	StageCommit
)

func (s Stage) String() string {
	switch s {
	case StageConnect:
		return "connect"
	case StageStatement:
		return "statement"
	case StageTx:
		return "transaction"
	case StageCommit:
		return "commit"
	}
	return fmt.Sprintf("Stage(%d)", uint8(s))
}

// RetryParams describes a failed attempt to a RetryPolicy.
type RetryParams struct {
	// Err is the attempt's error, as the driver returned it.
	Err error
	// Class is Classify(Err), except that a context error while the
	// caller's context is live counts as ClassConnection.
	Class ErrorClass
	// Attempt is the number of the attempt that failed, from 1.
	Attempt int
	// MaxRetries is the pool's Config.MaxRetries. The pool never makes more
	// than MaxRetries+1 attempts, whatever the policy says.
	MaxRetries int
	// Node is the node the attempt ran on; 0 when it is not known (a failed
	// connect, or balancing is off).
	Node NodeID
	// Stage is how far the work had got.
	Stage Stage
	// Sent is false when the work certainly did not reach the server
	// (pgconn.SafeToRetry, or a failure while connecting). pgconn's "conn
	// closed" error counts as sent although it claims SafeToRetry: pgx
	// returns it when a simple-protocol statement (a COMMIT, an Exec
	// without arguments) loses its connection after it was written.
	Sent bool
	// ReadOnly is true when the work cannot have changed data; see the Pool
	// documentation for what counts.
	ReadOnly bool
	// Idempotent is true when the caller marked the work with WithIdempotent.
	Idempotent bool
}

// OutcomeUnknown reports whether the failed attempt may have been applied,
// which is what makes a retry unsafe: a 40003, or a broken connection (or
// the caller's context ending) after a write or a COMMIT was sent. A failure
// inside a BeginFunc function before COMMIT is not unknown: the transaction
// did not commit.
func (p RetryParams) OutcomeUnknown() bool {
	switch p.Class {
	case ClassAmbiguous:
		return true
	case ClassConnection, ClassCanceled:
		if !p.Sent || p.ReadOnly {
			return false
		}
		return p.Stage == StageStatement || p.Stage == StageCommit
	}
	return false
}

// RetryPolicy decides whether the pool makes another attempt after a failed
// one. It is called only while attempts remain, the caller's context is live
// and the work was not marked with WithoutRetry; it must not block. Returning
// false returns the error to the caller.
type RetryPolicy func(ctx context.Context, p RetryParams) bool

// DefaultRetryPolicy is the policy a Pool uses when Config.RetryPolicy is nil.
// Wrap it to retry less (or more); for example, to never retry on 40001:
//
//	cfg.RetryPolicy = func(ctx context.Context, p clusterpool.RetryParams) bool {
//		return p.Class != clusterpool.ClassRestartTxn && clusterpool.DefaultRetryPolicy(ctx, p)
//	}
//
// It retries work that was not sent, 40001, and connection failures when the
// work was not sent, is read-only or idempotent, or was inside a BeginFunc
// function before COMMIT; 40003 only when idempotent; never a permanent error
// or the caller's own context error.
func DefaultRetryPolicy(ctx context.Context, p RetryParams) bool {
	if ctx.Err() != nil {
		return false
	}
	switch p.Class {
	case ClassNotSent, ClassRestartTxn:
		return true
	case ClassConnection:
		return p.Idempotent || !p.OutcomeUnknown()
	case ClassAmbiguous:
		return p.Idempotent
	}
	return false
}

// RetryError is returned when the pool retried and gave up, or when it did
// not retry because the outcome of the work is unknown, including a single
// write or COMMIT that the caller's context interrupted after it was sent.
// It wraps the last attempt's error, so errors.As still finds the
// *pgconn.PgError, and errors.Is finds ErrOutcomeUnknown when OutcomeUnknown
// is set and the caller's context error when that ended the call.
type RetryError struct {
	// Attempts is the number of attempts made.
	Attempts int
	// Nodes are the nodes the attempts ran on, in order of first use,
	// without repeats; attempts on an unknown node are not listed.
	Nodes []NodeID
	// Err is the last attempt's error; when the caller's context ended an
	// attempt, the error of the attempt before it, which says more.
	Err error
	// OutcomeUnknown is true when an attempt may have been applied: its
	// outcome was unknown (only idempotent work is retried after that).
	OutcomeUnknown bool
	// Interrupted is the caller's context error when the context ended the
	// call (during an attempt or a backoff) after a retry or with the
	// outcome unknown; nil otherwise.
	Interrupted error
}

func (e *RetryError) Error() string {
	var b strings.Builder
	b.WriteString("clusterpool: ")
	switch {
	case e.OutcomeUnknown:
		b.WriteString("outcome unknown")
	case e.Interrupted != nil:
		b.WriteString("context done (")
		b.WriteString(e.Interrupted.Error())
		b.WriteString(")")
	default:
		b.WriteString("gave up")
	}
	fmt.Fprintf(&b, " after %d attempt", e.Attempts)
	if e.Attempts != 1 {
		b.WriteString("s")
	}
	fmt.Fprintf(&b, " on nodes %v: %v", e.Nodes, e.Err)
	return b.String()
}

// Unwrap returns the last attempt's error and, when set, the context error
// that ended the retries.
func (e *RetryError) Unwrap() []error {
	if e.Interrupted != nil {
		return []error{e.Err, e.Interrupted}
	}
	return []error{e.Err}
}

// Is makes errors.Is(err, ErrOutcomeUnknown) true for an ambiguous result.
func (e *RetryError) Is(target error) bool {
	return target == ErrOutcomeUnknown && e.OutcomeUnknown
}

type retryKey uint8

const (
	idempotentKey retryKey = iota + 1
	withoutRetryKey
)

// WithIdempotent marks the work done with ctx as safe to run more than once:
// the pool may retry it even when its outcome is unknown (40003, or a
// connection that broke after it was sent). Use it for reads and for writes
// such as UPSERT or INSERT ... ON CONFLICT DO NOTHING.
func WithIdempotent(ctx context.Context) context.Context {
	return context.WithValue(ctx, idempotentKey, true)
}

// WithoutRetry turns retries off for the work done with ctx: each call makes
// one attempt and returns its error as the driver reported it, wrapped in a
// *RetryError only when the outcome is unknown, so that errors.Is(err,
// ErrOutcomeUnknown) still says so.
func WithoutRetry(ctx context.Context) context.Context {
	return context.WithValue(ctx, withoutRetryKey, true)
}

func isIdempotent(ctx context.Context) bool {
	v, _ := ctx.Value(idempotentKey).(bool)
	return v
}

func retryDisabled(ctx context.Context) bool {
	v, _ := ctx.Value(withoutRetryKey).(bool)
	return v
}

// Backoff between attempts that go back to a node that just failed, or that
// wait for the server to resolve a conflict (40001).
const (
	backoffInitial = 25 * time.Millisecond
	backoffMax     = time.Second
)

// newBackoff returns the backoff for one call's retries: exponential, 25 ms
// doubling, ±50% jitter, capped at 1 s (the cap applies to the jittered
// value too, see nextBackoff), with no elapsed-time limit of its own because
// the attempt count and the context bound the loop.
func newBackoff() *backoff.ExponentialBackOff {
	return backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(backoffInitial),
		backoff.WithMultiplier(2),
		backoff.WithRandomizationFactor(0.5),
		backoff.WithMaxInterval(backoffMax),
		backoff.WithMaxElapsedTime(0),
	)
}

// nextBackoff returns how long to sleep before the next attempt, given the
// backoff's next interval, the current time and the context's deadline. It
// returns false when sleeping would reach the deadline: the next attempt
// could not finish in time, so the caller should give up now rather than
// sleep into a context error.
func nextBackoff(next time.Duration, now, deadline time.Time, hasDeadline bool) (time.Duration, bool) {
	if next < 0 || next == backoff.Stop {
		return 0, false
	}
	next = min(next, backoffMax)
	if hasDeadline && !now.Add(next).Before(deadline) {
		return 0, false
	}
	return next, true
}

// sleepCtx sleeps for d or until ctx is done, whichever comes first. A
// receive from wake also ends the sleep early, without error: the pool's
// Close uses it so that a call backing off does not sleep on after the pool
// is gone, but makes its next attempt at once and gets pgxpool's
// closed-pool error from it.
func sleepCtx(ctx context.Context, wake <-chan struct{}, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-wake:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// readOnlySQL reports whether sql certainly cannot change data, by a
// deliberately conservative textual rule (a false "no" only costs a retry; a
// false "yes" could apply a write twice). It says yes only for one SELECT,
// SHOW or VALUES statement that
//   - has no ';' except trailing ones (one statement),
//   - contains none of the words INTO, FOR (locking clauses), INSERT, UPDATE,
//     DELETE, UPSERT, MERGE, CALL, DO, COPY, LOCK, NEXTVAL, SETVAL (in any case,
//     anywhere, even inside string literals), and
//   - calls no function other than a short list of unqualified built-ins
//     known not to write (count, sum, min, max, avg, coalesce, now, ...): a
//     user function, a schema-qualified or quoted name, or nextval could
//     write, so "SELECT f()" is not read-only.
//
// WITH queries are not read-only by this rule (a CTE may modify data), nor is
// EXPLAIN (EXPLAIN ANALYZE runs the statement). Mark other work with
// WithIdempotent or run it in a BeginTx with pgx.ReadOnly.
func readOnlySQL(sql string) bool {
	s := skipSpaceAndComments(sql)
	first, rest := nextWord(s)
	switch strings.ToLower(first) {
	case "select", "show", "values":
	default:
		return false
	}
	if i := strings.IndexByte(rest, ';'); i >= 0 && strings.TrimRight(rest[i:], "; \t\r\n") != "" {
		return false
	}
	// prevWord is the word (lower case) just before the current position,
	// ignoring white space; qualified is true when it followed a '.'.
	prevWord, qualified, dot := "", false, false
	for i := 0; i < len(rest); {
		c := rest[i]
		switch {
		case isWordByte(c):
			j := i
			for j < len(rest) && isWordByte(rest[j]) {
				j++
			}
			w := strings.ToLower(rest[i:j])
			if isWriteWord(w) {
				return false
			}
			prevWord, qualified, dot = w, dot, false
			i = j
		case c == '"':
			// A quoted identifier: a call of it is never known to be pure.
			j := strings.IndexByte(rest[i+1:], '"')
			if j < 0 {
				return false
			}
			prevWord, qualified, dot = `"`, dot, false
			i += j + 2
		case c == '(':
			// A '(' right after a name is a call (or a type modifier);
			// after anything else it is a subquery or grouping. Only
			// unqualified built-ins pass: schema.count() may be anything.
			if prevWord != "" && (qualified || !isPureCallWord(prevWord)) {
				return false
			}
			prevWord, dot = "", false
			i++
		case c == ' ' || c == '\t' || c == '\r' || c == '\n':
			i++
		default:
			prevWord, dot = "", c == '.'
			i++
		}
	}
	return true
}

// isWriteWord reports whether w makes a statement not read-only wherever it
// appears.
func isWriteWord(w string) bool {
	switch w {
	case "into", "for", "insert", "update", "delete", "upsert", "merge",
		"call", "do", "copy", "lock", "nextval", "setval":
		return true
	}
	return false
}

// isPureCallWord reports whether w may stand right before '(' in a read-only
// statement: a keyword that introduces a subquery or a list, or a built-in
// function that does not write.
func isPureCallWord(w string) bool {
	switch w {
	case "in", "exists", "any", "all", "some", "from", "join", "values",
		"where", "and", "or", "not", "on", "as", "select", "by", "having",
		"array", "row", "over", "filter", "within",
		"count", "sum", "min", "max", "avg", "coalesce", "nullif",
		"greatest", "least", "lower", "upper", "length", "abs", "round",
		"floor", "ceil", "now", "cast", "extract", "substring", "trim",
		"concat", "array_agg", "string_agg", "json_agg", "jsonb_agg",
		"pg_sleep", "version":
		return true
	}
	return false
}

func isWordByte(c byte) bool {
	return c == '_' || c == '$' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= 0x80
}

func nextWord(s string) (word, rest string) {
	i := 0
	for i < len(s) && isWordByte(s[i]) {
		i++
	}
	return s[:i], s[i:]
}

// skipSpaceAndComments drops leading white space and SQL comments.
func skipSpaceAndComments(s string) string {
	for {
		s = strings.TrimLeft(s, " \t\r\n")
		switch {
		case strings.HasPrefix(s, "--"):
			i := strings.IndexByte(s, '\n')
			if i < 0 {
				return ""
			}
			s = s[i+1:]
		case strings.HasPrefix(s, "/*"):
			i := strings.Index(s, "*/")
			if i < 0 {
				return ""
			}
			s = s[i+2:]
		default:
			return s
		}
	}
}

// Acquiring away from failed nodes: at most this many connections on
// avoided nodes are set aside before the pool settles for one of them, and
// each extra acquire waits at most setAsideWait, so a pool whose connections
// are all on avoided nodes (or all busy) does not hold the caller.
const (
	maxSetAside  = 2
	setAsideWait = 100 * time.Millisecond
)

// retryLoop is one call's retry state. It lives on the caller's stack; the
// first attempt allocates nothing for it.
type retryLoop struct {
	p        *Pool
	ctx      context.Context
	attempts int
	nodes    []NodeID // nodes tried, in order of first use
	avoid    []NodeID // nodes that failed at the connection level
	bo       *backoff.ExponentialBackOff
	// lastErr is the last error that was not the caller's context ending:
	// it says more about why the call failed than "deadline exceeded".
	lastErr error
	// unknown is set once an attempt may have been applied (idempotent work
	// is retried anyway); the call's error then says so whatever follows.
	unknown bool
}

func (p *Pool) newRetryLoop(ctx context.Context) retryLoop {
	return retryLoop{p: p, ctx: ctx}
}

// acquire returns a connection for the next attempt: on the first attempt
// (or when no other healthy node is known) any connection, otherwise one away
// from the nodes that failed.
func (l *retryLoop) acquire() (*pgxpool.Conn, error) {
	if len(l.avoid) == 0 || !l.p.otherHealthyNode(l.avoid) {
		return l.p.pool.Acquire(l.ctx)
	}
	// New connections opened for this acquire are placed away from the
	// avoided nodes where placement allows (several hosts listed).
	ctx := withAvoidNodes(l.ctx, l.avoid...)
	var aside []*pgxpool.Conn
	defer func() {
		for _, c := range aside {
			c.Release()
		}
	}()
	for {
		actx, cancel := ctx, context.CancelFunc(func() {})
		if len(aside) > 0 {
			actx, cancel = context.WithTimeout(ctx, setAsideWait)
		}
		c, err := l.p.pool.Acquire(actx)
		cancel()
		if err != nil {
			if len(aside) > 0 && l.ctx.Err() == nil {
				c, aside = aside[0], aside[1:]
				return c, nil
			}
			return nil, err
		}
		cs := connStateOf(c.Conn())
		if cs == nil || !slices.Contains(l.avoid, cs.node.id) || len(aside) == maxSetAside {
			return c, nil
		}
		aside = append(aside, c)
	}
}

// otherHealthyNode reports whether some known node outside avoid is healthy.
// It takes the tracker's lock, so it is only called on the retry path.
func (p *Pool) otherHealthyNode(avoid []NodeID) bool {
	for _, n := range p.tracker.nodeList() {
		if !n.evicted.Load() && !slices.Contains(avoid, n.id) {
			return true
		}
	}
	return false
}

// attemptFailed handles the failure err of one attempt at stage. c is the
// connection the attempt ran on, or nil when acquiring failed; attemptFailed
// releases it (retiring it first after a connection-level failure). It
// returns nil when the caller should make another attempt (after sleeping any
// backoff here), or the error to return to the caller.
func (l *retryLoop) attemptFailed(c *pgxpool.Conn, err error, stage Stage, readOnly bool) error {
	l.attempts++
	ctx := l.ctx
	callerDone := ctx.Err() != nil
	class := Classify(err)
	if class == ClassCanceled && !callerDone {
		// A timeout of the pool's own (connect_timeout, a dial deadline):
		// the node did not answer in time.
		class = ClassConnection
	}

	if class == ClassConnection && stage == StageTx && c != nil && !c.Conn().IsClosed() {
		// A BeginFunc function returned a network error while the
		// transaction's own connection is fine: it came from something
		// else the function talked to, not from this node.
		class = ClassPermanent
	}

	var n *node
	cut := false // the caller's context cut a call in flight (pgx closed the connection)
	if c != nil {
		cut = callerDone && class == ClassCanceled && c.Conn().IsClosed()
		if cs := connStateOf(c.Conn()); cs != nil {
			n = cs.node
			if cut {
				cs.cut.Store(true)
			}
			if !slices.Contains(l.nodes, n.id) {
				l.nodes = append(l.nodes, n.id)
			}
			if class == ClassConnection {
				cs.retire.Store(true)
			}
		}
		if class == ClassConnection && !c.Conn().IsClosed() {
			// Closed now so that Release destroys it rather than pooling
			// it. A done context makes Close skip the Terminate message.
			closeCtx, cancel := context.WithCancel(context.Background())
			cancel()
			c.Conn().Close(closeCtx)
		}
		c.Release()
	}
	// A caller's own cancellation never counts against a node (the
	// connection is gone either way; pgx closed it).
	if class == ClassConnection && !callerDone && n != nil {
		l.p.nodeFailed(n)
		l.avoid = append(l.avoid, n.id)
	}
	if cut && n != nil {
		// The caller's deadline cut a call in flight on n: a slow query, or
		// a node that stopped answering. Not counted against n, but n is
		// asked in the background whether it still answers (health.go).
		l.p.callCut(n)
	}

	params := RetryParams{
		Err:        err,
		Class:      class,
		Attempt:    l.attempts,
		MaxRetries: l.p.settings.maxRetries,
		Stage:      stage,
		Sent:       stage != StageConnect && !notSent(err),
		ReadOnly:   readOnly,
		Idempotent: isIdempotent(ctx),
	}
	if n != nil {
		params.Node = n.id
	}
	unknown := params.OutcomeUnknown() || l.unknown
	if callerDone {
		// The caller's context ended the call. A write or COMMIT it
		// interrupted after sending may have been applied: the error says
		// so (and still matches the context error).
		if l.attempts == 1 && !unknown {
			return err
		}
		if class == ClassCanceled && l.lastErr != nil {
			err = l.lastErr
		}
		return l.giveUp(err, unknown, ctx.Err())
	}
	l.lastErr = err
	l.unknown = unknown
	if retryDisabled(ctx) || l.attempts > l.p.settings.maxRetries {
		return l.giveUp(err, unknown, nil)
	}
	policy := l.p.config.RetryPolicy
	if policy == nil {
		policy = DefaultRetryPolicy
	}
	if !policy(ctx, params) {
		return l.giveUp(err, unknown, nil)
	}

	// A retry on another node goes at once: that node did not fail. Going
	// back to the same node, or waiting out a conflict, backs off.
	var delay time.Duration
	if class == ClassRestartTxn || !l.p.otherHealthyNode(l.avoid) {
		if l.bo == nil {
			l.bo = newBackoff()
		}
		deadline, hasDeadline := ctx.Deadline()
		d, ok := nextBackoff(l.bo.NextBackOff(), time.Now(), deadline, hasDeadline)
		if !ok {
			return l.giveUp(err, unknown, nil)
		}
		delay = d
	}
	if n != nil {
		n.retries.Add(1)
	}
	l.p.obs.retrying(ctx, params, delay)
	if serr := sleepCtx(ctx, l.p.bgCtx.Done(), delay); serr != nil {
		return l.giveUp(err, unknown, serr)
	}
	return nil
}

// giveUp returns the error for the caller: the driver's error unchanged when
// there was a single attempt with a known outcome, else a *RetryError.
func (l *retryLoop) giveUp(err error, unknown bool, interrupted error) error {
	l.traceGiveUp(err, unknown, interrupted)
	if l.attempts == 1 && !unknown && interrupted == nil {
		return err
	}
	return &RetryError{
		Attempts:       l.attempts,
		Nodes:          slices.Clone(l.nodes),
		Err:            err,
		OutcomeUnknown: unknown,
		Interrupted:    interrupted,
	}
}

// nodeFailed is drain-aware eviction: after a connection-level failure on
// node n (57P01, EOF, reset, ...), the node is evicted at once, so its
// connections are refused at acquire until a successful connect or probe
// shows it healthy; its idle connections are destroyed now, and its in-use
// ones are marked to be retired when they come back, even if the node has
// recovered by then (they belong to the server process that failed).
func (p *Pool) nodeFailed(n *node) {
	now := time.Now()
	first := !n.evicted.Load()
	p.tracker.recordFailure(n.id, now)
	p.tracker.evict(n.id, now)
	n.mu.Lock()
	for cs := range n.connSet {
		cs.retire.Store(true)
	}
	n.mu.Unlock()
	if first {
		p.retireIdle(context.Background())
	}
}

// exec is Exec with retries.
func (p *Pool) exec(ctx context.Context, sql string, args []any) (pgconn.CommandTag, error) {
	l := p.newRetryLoop(ctx)
	for {
		c, err := l.acquire()
		if err != nil {
			if err := l.attemptFailed(nil, err, StageConnect, false); err != nil {
				return pgconn.CommandTag{}, err
			}
			continue
		}
		tag, err := c.Exec(ctx, sql, args...)
		if err == nil {
			c.Release()
			l.traceSuccess()
			return tag, nil
		}
		if err := l.attemptFailed(c, err, StageStatement, readOnlySQL(sql)); err != nil {
			return tag, err
		}
	}
}

// retryRow is QueryRow's pgx.Row: Scan runs the query, scans and retries as
// a whole, so a failed Scan re-runs the query.
type retryRow struct {
	p    *Pool
	ctx  context.Context
	sql  string
	args []any
}

func (r *retryRow) Scan(dest ...any) error {
	l := r.p.newRetryLoop(r.ctx)
	for {
		c, err := l.acquire()
		if err != nil {
			if err := l.attemptFailed(nil, err, StageConnect, false); err != nil {
				return err
			}
			continue
		}
		err = c.QueryRow(r.ctx, r.sql, r.args...).Scan(dest...)
		if err == nil || errors.Is(err, pgx.ErrNoRows) {
			c.Release()
			l.traceSuccess()
			return err
		}
		if err := l.attemptFailed(c, err, StageStatement, readOnlySQL(r.sql)); err != nil {
			return err
		}
	}
}

// query is Query with retries until the first row (or the end of an empty
// result) has arrived; later errors are reported by the Rows as usual.
func (p *Pool) query(ctx context.Context, sql string, args []any) (pgx.Rows, error) {
	l := p.newRetryLoop(ctx)
	for {
		c, err := l.acquire()
		if err != nil {
			if err := l.attemptFailed(nil, err, StageConnect, false); err != nil {
				return errRows{err: err}, err
			}
			continue
		}
		rows, err := c.Query(ctx, sql, args...)
		if err == nil {
			// Read the first row now: errors that pgx defers to Next
			// (a connection lost before the first row) are retried here.
			r := &retryRows{Rows: rows, c: c, peeked: true}
			r.first = rows.Next()
			if r.first || rows.Err() == nil {
				l.traceSuccess()
				return r, nil
			}
			err = rows.Err()
			rows.Close()
		}
		if err := l.attemptFailed(c, err, StageStatement, readOnlySQL(sql)); err != nil {
			return errRows{err: err}, err
		}
	}
}

// retryRows is Query's pgx.Rows: the first row was read before Query
// returned, and the connection goes back to the pool when the rows close.
type retryRows struct {
	pgx.Rows
	c      *pgxpool.Conn
	peeked bool // the caller has not called Next yet
	first  bool // what the first Next returned
}

func (r *retryRows) Next() bool {
	next := false
	if r.peeked {
		r.peeked = false
		next = r.first
	} else {
		next = r.Rows.Next()
	}
	if !next {
		r.Close()
	}
	return next
}

func (r *retryRows) Close() {
	r.Rows.Close()
	if r.c != nil {
		r.c.Release()
		r.c = nil
	}
}

func (r *retryRows) Scan(dest ...any) error {
	err := r.Rows.Scan(dest...)
	if err != nil {
		r.Close()
	}
	return err
}

func (r *retryRows) Values() ([]any, error) {
	v, err := r.Rows.Values()
	if err != nil {
		r.Close()
	}
	return v, err
}

// errRows is the pgx.Rows returned with an error, as pgxpool does.
type errRows struct{ err error }

func (errRows) Close()                                       {}
func (e errRows) Err() error                                 { return e.err }
func (errRows) CommandTag() pgconn.CommandTag                { return pgconn.CommandTag{} }
func (errRows) FieldDescriptions() []pgconn.FieldDescription { return nil }
func (errRows) Next() bool                                   { return false }
func (e errRows) Scan(dest ...any) error                     { return e.err }
func (e errRows) Values() ([]any, error)                     { return nil, e.err }
func (e errRows) RawValues() [][]byte                        { return nil }
func (e errRows) Conn() *pgx.Conn                            { return nil }
func (e errRows) TypeMap() *pgtype.Map                       { return nil }

// beginTx is BeginTx with retries of the acquire and the BEGIN itself, which
// changes nothing and so is always safe to repeat.
func (p *Pool) beginTx(ctx context.Context, opts pgx.TxOptions) (pgx.Tx, error) {
	l := p.newRetryLoop(ctx)
	for {
		c, err := l.acquire()
		if err != nil {
			if err := l.attemptFailed(nil, err, StageConnect, false); err != nil {
				return nil, err
			}
			continue
		}
		tx, err := c.BeginTx(ctx, opts)
		if err == nil {
			l.traceSuccess()
			return &poolTx{Tx: tx, c: c}, nil
		}
		if err := l.attemptFailed(c, err, StageStatement, true); err != nil {
			return nil, err
		}
	}
}

// poolTx releases its connection when the transaction ends, as pgxpool.Tx does.
type poolTx struct {
	pgx.Tx
	c *pgxpool.Conn
}

func (tx *poolTx) Commit(ctx context.Context) error {
	err := tx.Tx.Commit(ctx)
	tx.release()
	return err
}

func (tx *poolTx) Rollback(ctx context.Context) error {
	err := tx.Tx.Rollback(ctx)
	tx.release()
	return err
}

func (tx *poolTx) release() {
	if tx.c != nil {
		tx.c.Release()
		tx.c = nil
	}
}

// BeginFunc runs fn in a transaction and commits it, retrying the whole
// transaction (a new BEGIN, fn again, COMMIT) on another node after a
// 40001 or a lost connection before COMMIT, like CockroachDB's client-side
// retry loop; see the Pool documentation for the policy. fn must therefore
// be safe to run more than once: it should only use tx and have no other
// effects, and must not commit or roll back tx itself. If fn returns an
// error that is not retried, the transaction is rolled back and the error
// returned. A failure during COMMIT whose outcome is unknown is not retried
// unless ctx was marked with WithIdempotent; the error then matches
// ErrOutcomeUnknown.
func (p *Pool) BeginFunc(ctx context.Context, fn func(pgx.Tx) error) error {
	return p.BeginTxFunc(ctx, pgx.TxOptions{}, fn)
}

// BeginTxFunc is BeginFunc with transaction options. A transaction with
// AccessMode pgx.ReadOnly counts as read-only work: even a COMMIT lost with
// its connection is retried, since it cannot have changed anything.
func (p *Pool) BeginTxFunc(ctx context.Context, txOptions pgx.TxOptions, fn func(pgx.Tx) error) error {
	readOnly := txOptions.AccessMode == pgx.ReadOnly
	l := p.newRetryLoop(ctx)
	for {
		c, err := l.acquire()
		if err != nil {
			if err := l.attemptFailed(nil, err, StageConnect, readOnly); err != nil {
				return err
			}
			continue
		}
		tx, err := c.BeginTx(ctx, txOptions)
		if err != nil {
			if err := l.attemptFailed(c, err, StageStatement, true); err != nil {
				return err
			}
			continue
		}
		if err := callTxFunc(ctx, c, tx, fn); err != nil {
			if !c.Conn().IsClosed() {
				// The rollback's own error does not matter: a connection
				// left in a transaction is destroyed on release.
				_ = tx.Rollback(ctx)
			}
			if err := l.attemptFailed(c, err, StageTx, readOnly); err != nil {
				return err
			}
			continue
		}
		err = tx.Commit(ctx)
		if err == nil {
			c.Release()
			l.traceSuccess()
			return nil
		}
		if err := l.attemptFailed(c, err, StageCommit, readOnly); err != nil {
			return err
		}
	}
}

// callTxFunc runs fn. If fn panics, the transaction is rolled back and the
// connection released before the panic goes on, as pgx.BeginFunc does.
func callTxFunc(ctx context.Context, c *pgxpool.Conn, tx pgx.Tx, fn func(pgx.Tx) error) error {
	returned := false
	defer func() {
		if !returned {
			_ = tx.Rollback(ctx)
			c.Release()
		}
	}()
	err := fn(tx)
	returned = true
	return err
}

// sendBatch is SendBatch with retries while nothing of the batch has reached
// the caller: failures to get a connection, and a failure of the first result
// read (the batch runs as one implicit transaction, so when its first result
// fails the policy decides as for one statement: retried if not sent, 40001,
// read-only or idempotent). Once a result has been delivered, later errors
// are the caller's. A batch that begins a transaction (pgx.Batch.BeginTx) is
// only retried while getting a connection.
func (p *Pool) sendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults {
	br := &poolBatchResults{l: p.newRetryLoop(ctx), b: b}
	if err := br.send(); err != nil {
		return pgx.FailedBatchResults(b, err)
	}
	return br
}

// poolBatchResults releases its connection on Close, or through Tx when the
// batch began a transaction, as pgxpool's does, and resends the batch when
// its first result fails in a way the retry policy allows.
type poolBatchResults struct {
	pgx.BatchResults
	c  *pgxpool.Conn
	tx *poolTx

	l         retryLoop
	b         *pgx.Batch
	delivered bool // a result reached the caller: no more retries
}

// send acquires a connection and sends the batch on it.
func (br *poolBatchResults) send() error {
	for {
		c, err := br.l.acquire()
		if err != nil {
			if err := br.l.attemptFailed(nil, err, StageConnect, false); err != nil {
				return err
			}
			continue
		}
		batch := br.b
		if br.l.attempts > 0 {
			// pgx stores each query's statement description, prepared
			// on the first connection, in the batch: a resend needs
			// fresh queries.
			batch = &pgx.Batch{}
			for _, q := range br.b.QueuedQueries {
				batch.Queue(q.SQL, q.Arguments...).Fn = q.Fn
			}
		}
		br.BatchResults = c.SendBatch(br.l.ctx, batch)
		if tx := br.BatchResults.Tx(); tx != nil {
			br.tx = &poolTx{Tx: tx, c: c}
			br.delivered = true
		} else {
			br.c = c
		}
		return nil
	}
}

// first runs the caller's first read of the results; while it fails in a
// way the policy retries, the batch is sent again on another connection.
func (br *poolBatchResults) first(read func() error) error {
	for {
		err := read()
		if err == nil || br.delivered {
			if !br.delivered {
				br.l.traceSuccess()
			}
			br.delivered = true
			return err
		}
		switch Classify(err) {
		case ClassNotSent, ClassRestartTxn, ClassConnection, ClassAmbiguous, ClassCanceled:
		default:
			br.l.traceSuccess() // e.g. pgx.ErrNoRows: the batch goes on
			br.delivered = true
			return err
		}
		br.BatchResults.Close()
		c := br.c
		br.c = nil
		if err := br.l.attemptFailed(c, err, StageStatement, br.readOnly()); err != nil {
			br.delivered = true
			br.BatchResults = pgx.FailedBatchResults(br.b, err)
			return err
		}
		if err := br.send(); err != nil {
			br.delivered = true
			br.BatchResults = pgx.FailedBatchResults(br.b, err)
			return err
		}
	}
}

// readOnly reports whether every statement of the batch is read-only.
func (br *poolBatchResults) readOnly() bool {
	for _, q := range br.b.QueuedQueries {
		if !readOnlySQL(q.SQL) {
			return false
		}
	}
	return true
}

func (br *poolBatchResults) Exec() (pgconn.CommandTag, error) {
	if br.delivered {
		return br.BatchResults.Exec()
	}
	var tag pgconn.CommandTag
	err := br.first(func() (err error) {
		tag, err = br.BatchResults.Exec()
		return err
	})
	return tag, err
}

func (br *poolBatchResults) Query() (pgx.Rows, error) {
	if br.delivered {
		return br.BatchResults.Query()
	}
	var rows pgx.Rows
	err := br.first(func() (err error) {
		rows, err = br.BatchResults.Query()
		return err
	})
	return rows, err
}

func (br *poolBatchResults) QueryRow() pgx.Row {
	if br.delivered {
		return br.BatchResults.QueryRow()
	}
	return batchRow{br}
}

// batchRow is the first QueryRow of a batch: its Scan may resend the batch.
type batchRow struct{ br *poolBatchResults }

func (r batchRow) Scan(dest ...any) error {
	return r.br.first(func() error { return r.br.BatchResults.QueryRow().Scan(dest...) })
}

func (br *poolBatchResults) Close() error {
	var err error
	if br.delivered {
		err = br.BatchResults.Close()
	} else {
		err = br.first(func() error { return br.BatchResults.Close() })
	}
	if br.c != nil {
		br.c.Release()
		br.c = nil
	}
	return err
}

func (br *poolBatchResults) Tx() pgx.Tx {
	if br.tx == nil {
		return nil
	}
	return br.tx
}

// copyFrom is CopyFrom with retries of the acquire only: the rows source
// cannot be rewound, so once COPY has started nothing is retried.
func (p *Pool) copyFrom(ctx context.Context, tableName pgx.Identifier, columnNames []string, rowSrc pgx.CopyFromSource) (int64, error) {
	l := p.newRetryLoop(ctx)
	c, err := l.acquire()
	for err != nil {
		if err := l.attemptFailed(nil, err, StageConnect, false); err != nil {
			return 0, err
		}
		c, err = l.acquire()
	}
	defer c.Release()
	l.traceSuccess() // the retried part, getting a connection, succeeded
	return c.Conn().CopyFrom(ctx, tableName, columnNames, rowSrc)
}
