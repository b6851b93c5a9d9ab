package clusterpool

import (
	"context"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

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
	c, err := br.l.conn()
	if err != nil {
		return err
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
		if err := br.l.failed(c, err, StageStatement, br.readOnly()); err != nil {
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
