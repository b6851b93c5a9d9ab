package clusterpool

import (
	"context"
	"errors"
	"slices"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// queryRow is QueryRow with retries. As with pgxpool, the query is sent
// now, with the arguments as they are now, and the row is read by Scan; a
// failure that Scan meets is retried there, with the same arguments.
func (p *Pool) queryRow(ctx context.Context, sql string, args []any) pgx.Row {
	l := p.newRetryLoop(ctx)
	c, err := l.conn()
	if err != nil {
		return errRows{err: err}
	}
	return &retryRow{
		l:    l,
		sql:  sql,
		args: slices.Clone(args), // a retry sends what this call was given
		c:    c,
		row:  c.QueryRow(ctx, sql, args...),
	}
}

// retryRow is QueryRow's pgx.Row: the first attempt's row, whose Scan runs
// the next attempts when it fails in a way the policy retries.
type retryRow struct {
	l    retryLoop
	sql  string
	args []any
	c    *pgxpool.Conn // released by Scan
	row  pgx.Row
}

func (r *retryRow) Scan(dest ...any) error {
	if r.c == nil {
		return r.row.Scan(dest...) // scanned before: pgx's answer for a second Scan
	}
	for {
		err := r.scan(dest)
		if err == nil || errors.Is(err, pgx.ErrNoRows) {
			r.l.traceSuccess()
			return err
		}
		if err := r.l.failed(r.c, err, StageStatement, readOnlySQL(r.sql)); err != nil {
			r.c = nil
			return err
		}
		c, err := r.l.conn()
		if err != nil {
			r.c = nil
			return err
		}
		r.c, r.row = c, c.QueryRow(r.l.ctx, r.sql, r.args...)
	}
}

// scan scans the current attempt's row. On success its connection goes back
// to the pool; on failure the connection stays for the retry loop to settle.
// A panic in a scanner releases it, as pgxpool's row does.
func (r *retryRow) scan(dest []any) error {
	panicked := true
	defer func() {
		if panicked {
			r.c.Release()
			r.c = nil
		}
	}()
	err := r.row.Scan(dest...)
	panicked = false
	if err == nil || errors.Is(err, pgx.ErrNoRows) {
		r.c.Release()
		r.c = nil
	}
	return err
}

// query is Query with retries until the first row (or the end of an empty
// result) has arrived; later errors are reported by the Rows as usual.
func (p *Pool) query(ctx context.Context, sql string, args []any) (pgx.Rows, error) {
	l := p.newRetryLoop(ctx)
	for {
		c, err := l.conn()
		if err != nil {
			return errRows{err: err}, err
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
		if err := l.failed(c, err, StageStatement, readOnlySQL(sql)); err != nil {
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
