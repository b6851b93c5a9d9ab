package clusterpool

import (
	"context"
	"slices"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

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
