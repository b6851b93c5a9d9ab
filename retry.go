package clusterpool

import (
	"context"
	"slices"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The retry loop of one call: get a connection, run an attempt, and after a
// failed one settle its connection and node, then decide (a pure function of
// what the call has seen, the time and the deadline) whether to retry now,
// back off first, or give up with which error.

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
	p   *Pool
	ctx context.Context
	retryState
	avoid []NodeID // nodes that failed at the connection level
	bo    *backoff.ExponentialBackOff
}

// retryState is what a call has learnt from its failed attempts: decide
// reads it and returns the next one.
type retryState struct {
	attempts int      // attempts made, the failed one included
	nodes    []NodeID // nodes tried, in order of first use
	// lastErr (and lastClass) is the last error that was not the caller's
	// context ending: it says more about why the call failed than
	// "deadline exceeded".
	lastErr   error
	lastClass ErrorClass
	// unknown is set once an attempt may have been applied (idempotent work
	// is retried anyway); the call's error then says so whatever follows.
	unknown bool
}

func (p *Pool) newRetryLoop(ctx context.Context) retryLoop {
	return retryLoop{p: p, ctx: ctx}
}

// conn returns a connection for the next attempt. Failing to get one is an
// attempt of its own, at StageConnect, retried like any other; conn returns
// the error for the caller once the loop gives up.
func (l *retryLoop) conn() (*pgxpool.Conn, error) {
	for {
		c, err := l.acquire()
		if err == nil {
			return c, nil
		}
		if err := l.failed(nil, err, StageConnect, false); err != nil {
			return nil, err
		}
	}
}

// acquire returns a connection for the next attempt: on the first attempt
// (or when no other healthy node is known) any connection, otherwise one away
// from the nodes that failed.
func (l *retryLoop) acquire() (*pgxpool.Conn, error) {
	if len(l.avoid) == 0 || !l.p.otherHealthyNode(l.avoid) {
		return l.p.acquireConn(l.ctx)
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
		c, err := l.p.acquireConn(actx)
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

// failed handles the failure err of one attempt at stage. c is the
// connection the attempt ran on, or nil when getting one failed; failed
// releases it. It returns nil when the caller should make another attempt
// (after sleeping any backoff here), or the error to return to the caller.
func (l *retryLoop) failed(c *pgxpool.Conn, err error, stage Stage, readOnly bool) error {
	l.attempts++
	callerErr := l.ctx.Err()
	class := attemptClass(Classify(err), stage, callerErr != nil, c != nil && !c.Conn().IsClosed())
	n := l.settle(c, class, callerErr != nil)

	f := failure{
		RetryParams: RetryParams{
			Err:        err,
			Class:      class,
			Attempt:    l.attempts,
			MaxRetries: l.p.settings.maxRetries,
			Stage:      stage,
			Sent:       stage != StageConnect && !notSent(err),
			ReadOnly:   readOnly,
			Idempotent: isIdempotent(l.ctx),
		},
		callerErr: callerErr,
		noRetry:   retryDisabled(l.ctx),
	}
	if n != nil {
		f.Node = n.id
	}
	policy := l.p.config.RetryPolicy
	if policy == nil {
		policy = DefaultRetryPolicy
	}
	deadline, hasDeadline := l.ctx.Deadline()
	v := decide(l.retryState, f, time.Now(), deadline, hasDeadline, retryEnv{
		allow:     func(p RetryParams) bool { return policy(l.ctx, p) },
		otherNode: func() bool { return l.p.otherHealthyNode(l.avoid) },
		backoff: func() time.Duration {
			if l.bo == nil {
				l.bo = newBackoff()
			}
			return l.bo.NextBackOff()
		},
	})
	l.retryState = v.state
	if !v.retry {
		l.traceGiveUp(v)
		return v.err
	}
	if n != nil {
		n.retries.Add(1)
	}
	l.p.obs.retrying(l.ctx, f.RetryParams, v.delay)
	if serr := sleepCtx(l.ctx, l.p.bgCtx.Done(), v.delay); serr != nil {
		v := giveUp(l.retryState, l.lastErr, l.lastClass, l.unknown, serr)
		l.traceGiveUp(v)
		return v.err
	}
	return nil
}

// attemptClass is what a failed attempt's error class means for the retry:
// a context error while the caller's context is live is a timeout of the
// pool's own (connect_timeout, a dial deadline), so the node did not answer
// in time; and a network error that a BeginFunc function returns while the
// transaction's own connection is fine came from something else the
// function talked to, not from this node.
func attemptClass(class ErrorClass, stage Stage, callerDone, connOpen bool) ErrorClass {
	if class == ClassCanceled && !callerDone {
		class = ClassConnection
	}
	if class == ClassConnection && stage == StageTx && connOpen {
		class = ClassPermanent
	}
	return class
}

// settle releases the failed attempt's connection c (nil when getting one
// failed) and reports what the failure says about its node, which it
// returns (nil when not known). After a connection-level failure c is
// destroyed rather than pooled, the node is evicted (unless the caller's own
// context ended the attempt, which never counts against a node) and the
// rest of the call avoids it. A call in flight that the caller's deadline
// cut gets its node checked in the background (health.go): a slow query,
// or a node that stopped answering.
func (l *retryLoop) settle(c *pgxpool.Conn, class ErrorClass, callerDone bool) *node {
	if c == nil {
		return nil
	}
	var n *node
	cut := callerDone && class == ClassCanceled && c.Conn().IsClosed() // pgx closed it
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
		// Closed now so that Release destroys it rather than pooling it.
		// A done context makes Close skip the Terminate message.
		closeCtx, cancel := context.WithCancel(context.Background())
		cancel()
		c.Conn().Close(closeCtx)
	}
	c.Release()
	if n == nil {
		return nil
	}
	if class == ClassConnection && !callerDone {
		l.p.nodeFailed(n)
		l.avoid = append(l.avoid, n.id)
	}
	if cut {
		l.p.callCut(n)
	}
	return n
}

// failure is what the loop knows about one failed attempt.
type failure struct {
	RetryParams       // as the policy sees them
	callerErr   error // the caller's context error; nil while it is live
	noRetry     bool  // the work was marked WithoutRetry
}

// retryEnv holds decide's questions to the pool, each asked only when its
// answer matters: whether the policy allows another attempt, whether a
// healthy node that has not failed is known, and the backoff's next
// interval (asking advances the backoff).
type retryEnv struct {
	allow     func(RetryParams) bool
	otherNode func() bool
	backoff   func() time.Duration
}

// verdict is decide's answer.
type verdict struct {
	retry bool
	delay time.Duration // before the next attempt, when retry
	// err is the caller's error when the call ends: the driver's error
	// unchanged after a single attempt with a known outcome, else a
	// *RetryError wrapping cause.
	err     error
	cause   error      // the error the call ends with, unwrapped
	class   ErrorClass // cause's class, as the policy saw it
	outcome RetryOutcome
	state   retryState
}

// decide returns what follows the failed attempt f, given what the call
// learnt before it (s, whose attempts and nodes already count f), the time
// and the caller's deadline. It is pure apart from env's questions.
func decide(s retryState, f failure, now, deadline time.Time, hasDeadline bool, env retryEnv) verdict {
	unknown := f.OutcomeUnknown() || s.unknown
	if f.callerErr != nil {
		// The caller's context ended the call. A write or COMMIT it
		// interrupted after sending may have been applied: the error says
		// so (and still matches the context error).
		if s.attempts == 1 && !unknown {
			return giveUp(s, f.Err, f.Class, false, nil)
		}
		err, class := f.Err, f.Class
		if class == ClassCanceled && s.lastErr != nil {
			err, class = s.lastErr, s.lastClass
		}
		return giveUp(s, err, class, unknown, f.callerErr)
	}
	s.lastErr, s.lastClass, s.unknown = f.Err, f.Class, unknown
	if f.noRetry || s.attempts > f.MaxRetries || !env.allow(f.RetryParams) {
		return giveUp(s, f.Err, f.Class, unknown, nil)
	}
	// A retry on another node goes at once: that node did not fail. Going
	// back to the same node, or waiting out a conflict, backs off.
	var delay time.Duration
	if f.Class == ClassRestartTxn || !env.otherNode() {
		d, ok := nextBackoff(env.backoff(), now, deadline, hasDeadline)
		if !ok {
			// The backoff has no elapsed-time limit: only the deadline
			// stops it.
			return giveUp(s, f.Err, f.Class, unknown, errDeadlineTooNear)
		}
		delay = d
	}
	return verdict{retry: true, delay: delay, state: s}
}

// giveUp is the verdict that ends the call with err (of class class): the
// error unchanged when there was a single attempt with a known outcome and
// no interruption, else a *RetryError.
func giveUp(s retryState, err error, class ErrorClass, unknown bool, interrupted error) verdict {
	v := verdict{
		err:     err,
		cause:   err,
		class:   class,
		outcome: giveUpOutcome(s.attempts, unknown, interrupted),
		state:   s,
	}
	if s.attempts > 1 || unknown || interrupted != nil {
		v.err = &RetryError{
			Attempts:       s.attempts,
			Nodes:          slices.Clone(s.nodes),
			Err:            err,
			OutcomeUnknown: unknown,
			Interrupted:    interrupted,
		}
	}
	return v
}
