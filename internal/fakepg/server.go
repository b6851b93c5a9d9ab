// Package fakepg is a small in-process server that speaks the PostgreSQL wire
// protocol (version 3.0, trust authentication) and answers the handful of
// statements that clusterbench and the clustertest package's own tests send.
//
// It exists so that the benchmark and the demo run on a machine without
// PostgreSQL. It is not a database: there is no planner, no isolation and no
// persistence. What it does answer, it answers the way PostgreSQL 15 does
// (message flow, SQLSTATEs, type OIDs, command tags), so that pgx and pgxpool
// behave against it exactly as they do against a real server:
//
//   - SELECT 1 and other literals or parameters (SELECT $1::int),
//   - SELECT pg_sleep(x), cancellable with a CancelRequest (57014),
//   - SELECT inet_server_addr()::text, inet_server_port(), SELECT version(),
//   - CREATE TABLE [IF NOT EXISTS], DROP TABLE [IF EXISTS], TRUNCATE,
//   - INSERT ... VALUES (...) [ON CONFLICT (k) DO UPDATE SET ... | DO NOTHING],
//     UPSERT INTO (CockroachDB), UPDATE ... SET c = $1 | c = c + $1 WHERE k = $2,
//     DELETE ... [WHERE k = $1], SELECT cols | * | count(*) FROM t [WHERE k = $1]
//     on tables keyed by their first (or PRIMARY KEY) column,
//   - BEGIN/COMMIT/ROLLBACK, with the transaction status in ReadyForQuery and
//     ROLLBACK undoing the writes of the transaction,
//   - SET, DISCARD ALL, DEALLOCATE, and the empty query pgx uses as a ping.
//
// Anything else gets an ErrorResponse: 42601 for text it cannot parse, 0A000
// for a statement it does not support, 42P01 for an unknown table.
package fakepg

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
)

// Server is one in-process Postgres-wire server. Each Server has its own
// tables, so several Servers behave like separate database nodes.
type Server struct {
	ln     net.Listener
	ctx    context.Context // cancelled by Close; ends every running statement
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// mu protects the fields below.
	mu       sync.Mutex
	closed   bool
	conns    map[net.Conn]struct{}
	sessions map[uint32]*session // by BackendKeyData ProcessID, for CancelRequest
	nextPID  uint32

	// dataMu protects tables. Statements hold it only while reading or
	// writing rows, never while sleeping or writing to a socket.
	dataMu sync.Mutex
	tables map[string]*table
}

// Start listens on addr ("127.0.0.1:0" for any free port) and serves
// connections until Close.
func Start(addr string) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("fakepg: listen on %s: %w", addr, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		ln:       ln,
		ctx:      ctx,
		cancel:   cancel,
		conns:    make(map[net.Conn]struct{}),
		sessions: make(map[uint32]*session),
		// Start process IDs at a random point, as OS PIDs would be, so two
		// servers seldom hand out the same one.
		nextPID: 1000 + randomUint32()%100000,
		tables:  make(map[string]*table),
	}
	s.wg.Add(1)
	go s.acceptLoop()
	return s, nil
}

// Addr returns the host:port the server listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Close stops listening, ends every running statement, closes every
// connection and waits for all of the server's goroutines to return. It is
// safe to call more than once.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.closed = true
	conns := make([]net.Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()

	s.cancel()
	err := s.ln.Close()
	for _, c := range conns {
		c.Close()
	}
	s.wg.Wait()
	return err
}

func (s *Server) acceptLoop() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return // listener closed
		}
		if !s.track(c) {
			c.Close()
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.untrack(c)
			serveConn(s, c)
		}()
	}
}

// track registers c so that Close can close it; false if the server is closing.
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn) {
	c.Close()
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// register gives sess a process ID and secret key for its BackendKeyData.
func (s *Server) register(sess *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextPID++
	sess.pid = s.nextPID
	binary.BigEndian.PutUint32(sess.secret[:], randomUint32())
	s.sessions[sess.pid] = sess
}

func (s *Server) unregister(sess *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.sessions, sess.pid)
}

// cancelRequest cancels the statement running on the session with this key,
// if any. Like PostgreSQL, a wrong key or an idle session is silently ignored.
func (s *Server) cancelRequest(pid uint32, secret []byte) {
	s.mu.Lock()
	sess := s.sessions[pid]
	s.mu.Unlock()
	if sess == nil || len(secret) != len(sess.secret) || string(secret) != string(sess.secret[:]) {
		return
	}
	sess.cancelRunning()
}

func randomUint32() uint32 {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	return binary.BigEndian.Uint32(b[:])
}
