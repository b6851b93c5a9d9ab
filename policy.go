package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
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
	// caller's context is live (a connect_timeout, say) counts as
	// ClassConnection, and a connection error that a BeginFunc function
	// returns while its transaction's connection is still open counts as
	// ClassPermanent: it came from something else the function talked to.
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
	// documentation for what counts. It is false at StageConnect, where no
	// work was sent.
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
	// without repeats; attempts on an unknown node (a failed connect, or
	// balancing off) are not listed, so Nodes may be empty.
	Nodes []NodeID
	// Err is the last attempt's error; when the caller's context ended an
	// attempt, the error of the attempt before it, which says more.
	Err error
	// OutcomeUnknown is true when an attempt may have been applied: its
	// outcome was unknown (only idempotent work is retried after that).
	OutcomeUnknown bool
	// Interrupted is set when the caller's context ended the retries: the
	// context's error when it ended during an attempt or a backoff, or an
	// error matching context.DeadlineExceeded when the deadline was too near
	// to back off and try again. Nil otherwise.
	Interrupted error
}

func (e *RetryError) Error() string {
	var b strings.Builder
	b.WriteString("clusterpool: ")
	switch {
	case e.OutcomeUnknown:
		b.WriteString("outcome unknown")
	case e.Interrupted != nil:
		b.WriteString(e.Interrupted.Error())
	default:
		b.WriteString("gave up")
	}
	fmt.Fprintf(&b, " after %d attempt", e.Attempts)
	if e.Attempts != 1 {
		b.WriteString("s")
	}
	if len(e.Nodes) > 0 {
		fmt.Fprintf(&b, " on nodes %v", e.Nodes)
	}
	fmt.Fprintf(&b, ": %v", e.Err)
	return b.String()
}

// errDeadlineTooNear ends the retries when the caller's deadline would pass
// during the backoff before the next attempt: sleeping into it would only
// trade the last attempt's error for a bare context error.
var errDeadlineTooNear error = deadlineTooNearError{}

type deadlineTooNearError struct{}

func (deadlineTooNearError) Error() string { return "context deadline too near to retry" }
func (deadlineTooNearError) Unwrap() error { return context.DeadlineExceeded }

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
