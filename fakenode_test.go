package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/clusterpool/clusterpool/clustertest"
)

// Unit tests of the retry loop and of eviction against a fake node: a
// Postgres-wire server of the test's own that says it is CockroachDB node 1
// (crdb_version, and the ID in its BackendKey) and answers each statement
// as the test tells it. Each test sees exactly what reached the server, so
// attempts are counted where they land, not as the pool reports them.

// fakeReply is how the fake node answers a statement: success when Code is
// empty and HangUp is false.
type fakeReply struct {
	Code   string // SQLSTATE of an ErrorResponse
	Fatal  bool   // FATAL severity: the server closes the connection after it
	HangUp bool   // close the connection without answering
}

type fakeNode struct {
	ln net.Listener
	wg sync.WaitGroup

	mu sync.Mutex // protects the fields below
	// reply answers a statement (not a ping); nil means success.
	reply func(sql string) fakeReply
	// statements received, pings excluded, in order.
	statements []string
	// conns are the connections the server still holds open, by the
	// order in which it accepted them (from 1).
	conns  map[net.Conn]int
	opened int
	closed bool
}

// startFakeNode starts a fake node that is closed when the test ends.
func startFakeNode(t *testing.T) *fakeNode {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeNode{ln: ln, conns: make(map[net.Conn]int)}
	f.wg.Add(1)
	go f.accept()
	t.Cleanup(f.close)
	return f
}

// dsn is a connection string for the fake node: the simple protocol, so that
// each statement is one Query message.
func (f *fakeNode) dsn() string {
	return "postgres://u@" + f.ln.Addr().String() + "/db?sslmode=disable&default_query_exec_mode=simple_protocol"
}

func (f *fakeNode) setReply(reply func(sql string) fakeReply) {
	f.mu.Lock()
	f.reply = reply
	f.mu.Unlock()
}

// received returns the statements that reached the server and contain s.
func (f *fakeNode) received(s string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := 0
	for _, st := range f.statements {
		if strings.Contains(st, s) {
			k++
		}
	}
	return k
}

// open returns how many of the first n connections the server accepted it
// still holds open.
func (f *fakeNode) open(n int) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := 0
	for _, i := range f.conns {
		if i <= n {
			k++
		}
	}
	return k
}

func (f *fakeNode) close() {
	f.mu.Lock()
	f.closed = true
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.ln.Close()
	f.wg.Wait()
}

func (f *fakeNode) accept() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.mu.Lock()
		if f.closed {
			f.mu.Unlock()
			c.Close()
			return
		}
		f.opened++
		f.conns[c] = f.opened
		f.mu.Unlock()
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer func() {
				f.mu.Lock()
				delete(f.conns, c)
				f.mu.Unlock()
				c.Close()
			}()
			f.serve(c)
		}()
	}
}

// serve runs one connection: a trust startup as CockroachDB node 1, then
// each simple Query answered by reply. It returns when the client goes or
// the reply hangs up.
func (f *fakeNode) serve(c net.Conn) {
	be := pgproto3.NewBackend(c, c)
	for {
		msg, err := be.ReceiveStartupMessage()
		if err != nil {
			return
		}
		if _, ok := msg.(*pgproto3.SSLRequest); ok {
			if _, err := c.Write([]byte("N")); err != nil {
				return
			}
			continue
		}
		if _, ok := msg.(*pgproto3.StartupMessage); !ok {
			return
		}
		break
	}
	be.Send(&pgproto3.AuthenticationOk{})
	be.Send(&pgproto3.ParameterStatus{Name: "crdb_version", Value: "CockroachDB CCL v24.1.0 (fake node)"})
	be.Send(&pgproto3.ParameterStatus{Name: "server_version", Value: "13.0.0"})
	be.Send(&pgproto3.ParameterStatus{Name: "client_encoding", Value: "UTF8"})
	be.Send(&pgproto3.ParameterStatus{Name: "standard_conforming_strings", Value: "on"})
	be.Send(&pgproto3.BackendKeyData{ProcessID: clustertest.EncodeProcessID(1, false, 0x1234), SecretKey: []byte{1, 2, 3, 4}})
	be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
	if be.Flush() != nil {
		return
	}
	for {
		msg, err := be.Receive()
		if err != nil {
			return
		}
		var sql string
		switch m := msg.(type) {
		case *pgproto3.Query:
			sql = m.String
		case *pgproto3.Terminate:
			return
		default:
			be.Send(&pgproto3.ErrorResponse{Severity: "FATAL", Code: "08P01", Message: fmt.Sprintf("fake node: unexpected %T", msg)})
			_ = be.Flush()
			return
		}
		if strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(sql), "-- ping")) == "" {
			be.Send(&pgproto3.EmptyQueryResponse{})
			be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
			if be.Flush() != nil {
				return
			}
			continue
		}
		f.mu.Lock()
		f.statements = append(f.statements, sql)
		reply := f.reply
		f.mu.Unlock()
		var r fakeReply
		if reply != nil {
			r = reply(sql)
		}
		switch {
		case r.HangUp:
			return
		case r.Code != "":
			severity := "ERROR"
			if r.Fatal {
				severity = "FATAL"
			}
			be.Send(&pgproto3.ErrorResponse{Severity: severity, SeverityUnlocalized: severity, Code: r.Code, Message: "fake node: " + r.Code})
			if r.Fatal {
				_ = be.Flush()
				return
			}
		default:
			be.Send(&pgproto3.CommandComplete{CommandTag: []byte("INSERT 0 1")})
		}
		be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
		if be.Flush() != nil {
			return
		}
	}
}

// fakePool is a pool on the fake node with no background work of its own
// that could touch the node: no balancing round, probe, refill or ping.
func fakePool(t *testing.T, f *fakeNode, conns int32, mutate func(*Config)) *Pool {
	t.Helper()
	return startPool(t, f.dsn(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = conns, conns
		cfg.BalanceInterval, cfg.ProbeInterval = time.Hour, time.Hour
		cfg.HealthCheckPeriod = time.Hour
		cfg.ConnectRate = -1 // no limit
		cfg.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { return false }
		if mutate != nil {
			mutate(cfg)
		}
	})
}

// The pool never makes more than MaxRetries+1 attempts, however retryable
// the error: here 40001 on every attempt, which DefaultRetryPolicy would
// retry for ever. Counted on the server. An attempt past the cap cancels
// the call, so a pool that ignores the cap fails the test at once rather
// than by a timeout.
func TestMaxRetriesCapsAttempts(t *testing.T) {
	for _, maxRetries := range []int{-1, 1, 3} { // -1: retries off
		attempts := max(maxRetries, 0) + 1
		t.Run(fmt.Sprint(maxRetries), func(t *testing.T) {
			f := startFakeNode(t)
			p := fakePool(t, f, 1, func(cfg *Config) { cfg.MaxRetries = maxRetries })
			ctx, cancel := context.WithCancel(testCtx(t))
			defer cancel()
			f.setReply(func(sql string) fakeReply {
				if f.received("restart") > attempts {
					cancel()
				}
				return fakeReply{Code: "40001"}
			})
			_, err := p.Exec(ctx, "UPDATE t SET v = 1 -- restart")
			if got := f.received("restart"); got != attempts {
				t.Fatalf("MaxRetries %d: the server saw %d attempts, want %d: %v", maxRetries, got, attempts, err)
			}
			var pe *pgconn.PgError
			if !errors.As(err, &pe) || pe.Code != "40001" {
				t.Fatalf("error %v does not carry 40001", err)
			}
			var re *RetryError
			if maxRetries > 0 && (!errors.As(err, &re) || re.Attempts != attempts) {
				t.Fatalf("error %v: want a *RetryError after %d attempts", err, attempts)
			}
		})
	}
}

// A 40003 (result is ambiguous) may have been applied: one attempt, and the
// error says the outcome is unknown; marked idempotent, it is retried up to
// the cap.
func TestAmbiguousResultNotRetried(t *testing.T) {
	f := startFakeNode(t)
	p := fakePool(t, f, 1, func(cfg *Config) { cfg.MaxRetries = 2 })
	f.setReply(func(string) fakeReply { return fakeReply{Code: "40003"} })
	ctx := testCtx(t)
	_, err := p.Exec(ctx, "INSERT INTO t VALUES (1) -- once")
	if got := f.received("once"); got != 1 || !errors.Is(err, ErrOutcomeUnknown) {
		t.Fatalf("40003 on a plain write: %d attempts reached the server, error %v; want 1 and ErrOutcomeUnknown", got, err)
	}
	_, err = p.Exec(WithIdempotent(ctx), "INSERT INTO t VALUES (1) -- idempotent")
	if got := f.received("idempotent"); got != 3 || !errors.Is(err, ErrOutcomeUnknown) {
		t.Fatalf("40003 on idempotent work: %d attempts reached the server, error %v; want 3 and ErrOutcomeUnknown", got, err)
	}
}

// A write whose connection breaks after it reached the server may have been
// applied. pgx reports the break of a simple-protocol statement as "conn
// closed", which claims SafeToRetry; the pool must not believe it: one
// attempt, and the error says the outcome is unknown.
func TestLostAnswerNotResent(t *testing.T) {
	f := startFakeNode(t)
	p := fakePool(t, f, 2, nil)
	f.setReply(func(string) fakeReply { return fakeReply{HangUp: true} })
	_, err := p.Exec(testCtx(t), "INSERT INTO t VALUES (1)")
	if got := f.received("INSERT"); got != 1 {
		t.Fatalf("a write whose answer was lost reached the server %d times: %v", got, err)
	}
	if !errors.Is(err, ErrOutcomeUnknown) {
		t.Fatalf("a write whose answer was lost: %v, want ErrOutcomeUnknown", err)
	}
}

// Drain-aware eviction: the first 57P01 on a node evicts it at once, and
// its idle connections are closed then, not when they are next used. One
// attempt (WithoutRetry), so nothing but the 57P01 itself can have done it.
func TestDrainErrorEvictsNode(t *testing.T) {
	f := startFakeNode(t)
	p := fakePool(t, f, 2, nil)
	waitCond(t, func() string {
		if open := f.open(2); open != 2 || p.Stat().IdleConns() != 2 {
			return fmt.Sprintf("server holds %d connections, pool %d idle; want 2", open, p.Stat().IdleConns())
		}
		return ""
	})
	f.setReply(func(string) fakeReply { return fakeReply{Code: "57P01", Fatal: true} })
	_, err := p.Exec(WithoutRetry(testCtx(t)), "SELECT 1")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57P01" {
		t.Fatalf("error %v, want 57P01", err)
	}
	s, _ := nodeStat(p, 1)
	if s.Evictions != 1 {
		t.Fatalf("node 1 after a 57P01: %+v, want one eviction", s)
	}
	// The connection that met the 57P01 is gone; the idle one is closed
	// by the pool without being used. (pgxpool may open new ones to keep
	// MinConns; they are not the two that were there.)
	waitCond(t, func() string {
		if open := f.open(2); open != 0 {
			return fmt.Sprintf("server still holds %d of the evicted node's two connections", open)
		}
		return ""
	})
	if got := f.received("SELECT"); got != 1 {
		t.Fatalf("%d statements reached the server, want the one that met the 57P01", got)
	}
}
