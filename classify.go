package clusterpool

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5/pgconn"
)

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
	// nothing about the node. The work can be retried anywhere. SQLSTATE
	// 53300 (too many connections: CockroachDB's
	// server.max_connections_per_gateway refusing a new session) is of this
	// class: the node is healthy, only full.
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
	case sqlStateTooManyConnections: // a full node refused a new session
		return ClassNotSent
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
