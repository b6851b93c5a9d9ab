package clusterpool

import (
	"context"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// beginTx is BeginTx with retries of the acquire and the BEGIN itself, which
// changes nothing and so is always safe to repeat.
func (p *Pool) beginTx(ctx context.Context, opts pgx.TxOptions) (pgx.Tx, error) {
	l := p.newRetryLoop(ctx)
	for {
		c, err := l.conn()
		if err != nil {
			return nil, err
		}
		tx, err := c.BeginTx(ctx, opts)
		if err == nil {
			l.traceSuccess()
			return &poolTx{Tx: tx, c: c}, nil
		}
		if err := l.failed(c, err, StageStatement, true); err != nil {
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
		c, err := l.conn()
		if err != nil {
			return err
		}
		tx, err := c.BeginTx(ctx, txOptions)
		if err != nil {
			if err := l.failed(c, err, StageStatement, true); err != nil {
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
			if err := l.failed(c, err, StageTx, readOnly); err != nil {
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
		if err := l.failed(c, err, StageCommit, readOnly); err != nil {
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
