package clusterpool

import (
	"context"
	"errors"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

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
