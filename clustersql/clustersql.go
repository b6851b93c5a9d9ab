// Package clustersql opens a database/sql handle on a clusterpool.Pool, so
// code written for database/sql gets the pool's balancing and node tracking.
//
//	pool, err := clusterpool.New(ctx, connString)
//	...
//	db := clustersql.OpenDB(pool)
//	defer db.Close() // before pool.Close
//
// It is a separate package, rather than a function of clusterpool, because
// it imports pgx's stdlib, whose init registers the "pgx" and "pgx/v5"
// database/sql drivers: importing clusterpool itself has no such side
// effect.
//
// # What the pool does for database/sql
//
// Every database/sql connection is a connection acquired from the pool's
// underlying pgxpool.Pool and released when database/sql closes it (the
// *sql.DB keeps no idle connections of its own: pgx's OpenDBFromPool sets
// MaxIdleConns to 0). So everything the pool does at connect and acquire
// applies: node identification and per-node counts (Pool.NodeStats),
// placement and the connect rate limit for new connections, the balancer's
// pruning of idle connections, and refusing connections on evicted nodes or
// marked for retirement when they are acquired.
//
// # Retries
//
// The pool's statement-level retries (Pool.Exec, Query, QueryRow, BeginFunc
// and the rest, with Config.MaxRetries, Config.RetryPolicy, WithIdempotent)
// do not apply to database/sql calls: pgx's stdlib runs the statements
// directly on the acquired *pgx.Conn. A failure there is not reported to the
// pool either, so it neither evicts a node nor counts in ClusterStat; the
// broken connection is closed and forgotten when released, and the
// balancer's idle checks and the probe notice a node that went away.
//
// What retries instead is database/sql's own loop: when the driver returns
// driver.ErrBadConn, database/sql runs the operation again, up to
// maxBadConnRetries (2) times on a pooled or new connection and then once
// more on a new one, three attempts in all. pgx's stdlib returns ErrBadConn
// only when nothing was sent: the connection was already closed, its
// session reset failed (a ping after more than a second idle, or a
// connection left in a transaction), or the error is one pgconn guarantees
// happened before sending (pgconn.SafeToRetry). Each new attempt acquires
// from the pool again, which skips connections on evicted nodes. Errors
// after the statement was sent (57P01 from a draining node, a connection
// lost mid-query, 40001, 40003) are returned to the caller unchanged: retry
// them in the application, or use the Pool's own methods for work that
// should be retried.
package clustersql

import (
	"database/sql"

	"github.com/clusterpool/clusterpool"
	"github.com/jackc/pgx/v5/stdlib"
)

// OpenDB returns a *sql.DB whose connections are acquired from pool. opts
// are pgx's stdlib options; stdlib.OptionBeforeConnect and
// stdlib.OptionAfterConnect have no effect here, since the pool opens the
// connections (use the Config's hooks). Close the *sql.DB before the pool:
// closing it does not close the pool, and Pool.Close waits for the
// connections database/sql still holds.
func OpenDB(pool *clusterpool.Pool, opts ...stdlib.OptionOpenDB) *sql.DB {
	return stdlib.OpenDBFromPool(pool.PgxPool(), opts...)
}
