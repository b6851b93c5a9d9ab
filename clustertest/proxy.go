package clustertest

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Codes of the untyped packets a client may send first.
const (
	cancelRequestCode = 80877102
	sslRequestCode    = 80877103
	gssEncRequestCode = 80877104
)

// maxStartupPacket is PostgreSQL's own limit on a startup packet.
const maxStartupPacket = 10000

const (
	msgNotAccepting = "server is not accepting clients, try another node"
	msgShuttingDown = "server is shutting down"
)

// CockroachDB's refusal of a session beyond server.max_connections_per_gateway
// ((*Server).IncrementConnectionCount in pkg/sql/conn_executor.go, sent by
// checkMaxConnections in pkg/sql/pgwire/conn.go): pgcode.TooManyConnections,
// "sorry, too many clients already" (PostgreSQL's words for its own
// max_connections), with this hint.
const (
	sqlStateTooManyConnections = "53300"
	msgTooManyConnections      = "sorry, too many clients already"
	hintTooManyConnections     = "the maximum number of allowed connections is %d and can be modified using the server.max_connections_per_gateway config key"
)

// proxyConn is one client connection on a node proxy. The proxy forwards
// whole protocol messages (type byte, int32 length, body) and decodes only
// what it needs: BackendKeyData to rewrite, ReadyForQuery to know where the
// startup and each query round trip end, and the client's message types to
// know where round trips start.
type proxyConn struct {
	n *Node
	// raw is the accepted TCP connection. Closing it ends everything, and,
	// unlike closing a TLS connection, sends nothing (no close_notify that
	// could block on a client not reading): a Kill stays a crash.
	raw  net.Conn
	done chan struct{} // closed by close

	// startupDone is set by the server-to-client pump at the first
	// ReadyForQuery, before the client sees it; from then on client messages
	// are queries subject to latency and capacity.
	startupDone atomic.Bool

	mu sync.Mutex // protects the fields below
	// server is the connection to the node's server; nil until dialled.
	server   net.Conn
	closed   bool
	counted  bool       // counted in the node's OpenConns
	admitted bool       // holds one of the node's session slots
	app      string     // the StartupMessage's application_name, once counted
	sid      uint64     // the session's ID in the node's session log, once counted
	key      *cancelKey // the key given to the client, while registered

	// wmu serialises writes to the client, so that a shutdown message is
	// written between two relayed messages, never inside one. It also
	// protects client and cw, which switch to TLS once it is negotiated.
	wmu    sync.Mutex
	client net.Conn // raw, or the TLS connection over it
	cw     *bufio.Writer
	// shut is set (under wmu) once the connection was told to go away; the
	// pump writes nothing after it.
	shut bool

	cyc sync.Mutex // protects the round-trip state below
	// held: this connection holds one of the node's capacity slots.
	held bool
	// outstanding counts the ReadyForQuery messages still expected: one per
	// Query, FunctionCall and Sync sent.
	outstanding int
	// openExt: extended-protocol messages were sent after the last Sync, so
	// the round trip they belong to has not ended yet.
	openExt bool
}

func newProxyConn(n *Node, client net.Conn) *proxyConn {
	return &proxyConn{n: n, raw: client, client: client, done: make(chan struct{}), cw: bufio.NewWriterSize(client, 16<<10)}
}

// close closes both sockets at once and releases everything the connection
// holds. It is idempotent and safe from any goroutine.
func (pc *proxyConn) close() {
	pc.mu.Lock()
	if pc.closed {
		pc.mu.Unlock()
		return
	}
	pc.closed = true
	server, counted, admitted, key, app, sid := pc.server, pc.counted, pc.admitted, pc.key, pc.app, pc.sid
	pc.key = nil
	pc.mu.Unlock()

	close(pc.done)
	pc.raw.Close()
	if server != nil {
		server.Close()
	}
	if counted {
		pc.n.open.Add(-1)
		pc.n.sessions.closed(app, sid)
	}
	if admitted {
		pc.n.admitted.Add(-1)
	}
	if key != nil {
		pc.n.c.keys.remove(*key)
	}
	pc.cyc.Lock()
	if pc.held {
		pc.held = false
		pc.n.queries.release()
	}
	pc.cyc.Unlock()
	pc.n.unregister(pc)
}

// shutdown sends a FATAL 57P01 ErrorResponse between two messages and closes
// the connection. A client that does not read its socket cannot hold the
// drain up for long: after a second the connection is closed without the
// message.
func (pc *proxyConn) shutdown(msg string) {
	deadline := time.Now().Add(time.Second)
	for !pc.wmu.TryLock() {
		if time.Now().After(deadline) {
			pc.close()
			return
		}
		select {
		case <-pc.done:
			return
		case <-time.After(time.Millisecond):
		}
	}
	if !pc.shut {
		pc.shut = true
		pc.client.SetWriteDeadline(time.Now().Add(time.Second))
		pc.cw.Write(errorMessage(sqlStateAdminShutdown, msg))
		pc.cw.Flush()
	}
	pc.wmu.Unlock()
	pc.close()
}

// writeClient writes b to the client, flushing when flush is set.
func (pc *proxyConn) writeClient(flush bool, bs ...[]byte) error {
	pc.wmu.Lock()
	defer pc.wmu.Unlock()
	if pc.shut {
		return net.ErrClosed
	}
	for _, b := range bs {
		if _, err := pc.cw.Write(b); err != nil {
			return err
		}
	}
	if flush {
		return pc.cw.Flush()
	}
	return nil
}

// count counts the connection as a session of application app on the node,
// once.
func (pc *proxyConn) count(app string) {
	pc.mu.Lock()
	if !pc.closed && !pc.counted {
		pc.counted = true
		pc.app = app
		pc.n.open.Add(1)
		pc.n.total.Add(1)
		pc.sid = pc.n.sessions.accepted(app, true)
	}
	pc.mu.Unlock()
}

// admit takes one of the node's session slots (Node.SetMaxConnections) and
// reports whether there was one. CockroachDB counts a session against
// server.max_connections_per_gateway from its admission until it closes,
// and never counts a refused one; so does the proxy.
func (pc *proxyConn) admit() bool {
	n := pc.n
	for {
		cur := n.admitted.Load()
		if max := n.maxConns.Load(); max > 0 && cur >= max {
			return false
		}
		if n.admitted.CompareAndSwap(cur, cur+1) {
			break
		}
	}
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.closed {
		n.admitted.Add(-1)
		return false
	}
	pc.admitted = true
	return true
}

// refuse sends a FATAL ErrorResponse that ends the startup and counts the
// refusal.
func (pc *proxyConn) refuse(code, msg, hint string) {
	pc.n.refused.Add(1)
	pc.writeClient(true, errorResponse(code, msg, hint))
}

func (pc *proxyConn) dialServer() (net.Conn, error) {
	pc.mu.Lock()
	if pc.server != nil {
		defer pc.mu.Unlock()
		return pc.server, nil
	}
	pc.mu.Unlock()
	server, err := net.DialTimeout("tcp", pc.n.backendAddr(), 10*time.Second)
	if err != nil {
		pc.n.c.logf("node %d: proxy cannot reach its server: %v", pc.n.id, err)
		return nil, err
	}
	if tc, ok := server.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	pc.mu.Lock()
	defer pc.mu.Unlock()
	if pc.closed {
		server.Close()
		return nil, net.ErrClosed
	}
	pc.server = server
	return server, nil
}

// serve runs the connection: the startup phase here, then the
// client-to-server pump here and the server-to-client pump in a second
// goroutine. Both are tracked by the cluster's WaitGroup.
func (pc *proxyConn) serve() {
	defer pc.n.c.wg.Done()
	defer pc.close()
	cr := bufio.NewReaderSize(pc.raw, 16<<10)
	secure := pc.n.c.serverTLS != nil
	encrypted := false
	if secure {
		// A client may start TLS at once, without an SSLRequest
		// (sslnegotiation=direct).
		if b, err := cr.Peek(1); err != nil {
			return
		} else if b[0] == tlsRecordHandshake {
			if !pc.n.waitHealed(pc.done) {
				return
			}
			if cr = pc.startTLS(cr); cr == nil {
				return
			}
			if !pc.alpnAgreed() {
				return // as PostgreSQL, which insists on ALPN for direct TLS
			}
			encrypted = true
		}
	}
	var startup []byte
	for startup == nil {
		pkt, err := readStartupPacket(cr)
		if err != nil {
			return
		}
		switch code := binary.BigEndian.Uint32(pkt[4:8]); {
		case code == cancelRequestCode:
			pc.n.c.forwardCancel(pkt, pc.done)
			return
		case secure && code == sslRequestCode:
			// A second SSLRequest, or bytes sent after it before the answer
			// (which a man in the middle could have injected), end the
			// connection, as in PostgreSQL.
			if encrypted || cr.Buffered() > 0 || !pc.n.waitHealed(pc.done) {
				return
			}
			// Even a draining node accepts TLS: its refusal must reach the
			// client, which only reads it encrypted.
			if pc.writeClient(true, []byte{'S'}) != nil {
				return
			}
			if cr = pc.startTLS(cr); cr == nil {
				return
			}
			encrypted = true
		case secure && code == gssEncRequestCode:
			if pc.writeClient(true, []byte{'N'}) != nil {
				return
			}
		case code == sslRequestCode || code == gssEncRequestCode:
			if pc.n.State() != Up {
				// The refusal that follows is sent in plain text.
				if pc.writeClient(true, []byte{'N'}) != nil {
					return
				}
				continue
			}
			if !pc.negotiate(pkt, cr) {
				return
			}
		default:
			startup = pkt
		}
	}
	app := startupParam(startup, "application_name")
	switch {
	case secure && !encrypted:
		pc.count(app)
		pc.refuse(sqlStateInvalidAuthorization, msgSSLRequired, "")
		return
	case pc.n.State() != Up:
		pc.count(app)
		pc.refuse(sqlStateAdminShutdown, msgNotAccepting, "")
		return
	case !pc.admit():
		// A refusal for a full node never counts as open, so OpenConns
		// stays within the limit.
		pc.n.total.Add(1)
		pc.n.sessions.accepted(app, false)
		pc.refuse(sqlStateTooManyConnections, msgTooManyConnections,
			fmt.Sprintf(hintTooManyConnections, pc.n.maxConns.Load()))
		return
	}
	pc.count(app)
	server, err := pc.dialServer()
	if err != nil {
		return
	}
	if !pc.n.waitHealed(pc.done) {
		return
	}
	if _, err := server.Write(startup); err != nil {
		return
	}
	pc.n.c.wg.Add(1)
	go pc.serverToClient(server)
	pc.clientToServer(cr, server)
}

// negotiate relays an SSLRequest or GSSENCRequest to the server and its
// one-byte answer back. It returns false when the connection must end. If the
// server accepts encryption the proxy can no longer read the messages, so it
// falls back to relaying bytes blindly (no rewrite, no fault injection but
// Kill and Drain's final close).
func (pc *proxyConn) negotiate(pkt []byte, cr *bufio.Reader) bool {
	server, err := pc.dialServer()
	if err != nil || !pc.n.waitHealed(pc.done) {
		return false
	}
	if _, err := server.Write(pkt); err != nil {
		return false
	}
	var answer [1]byte
	if _, err := io.ReadFull(server, answer[:]); err != nil {
		return false
	}
	if pc.writeClient(true, answer[:]) != nil {
		return false
	}
	if answer[0] == 'N' {
		return true
	}
	pc.count("")
	pc.n.c.wg.Add(1)
	go func() {
		defer pc.n.c.wg.Done()
		defer pc.close()
		io.Copy(pc.client, server)
	}()
	io.Copy(server, cr)
	return false
}

func readStartupPacket(r *bufio.Reader) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n < 8 || n > maxStartupPacket {
		return nil, errors.New("invalid startup packet length")
	}
	pkt := make([]byte, n)
	copy(pkt, hdr[:])
	_, err := io.ReadFull(r, pkt[4:])
	return pkt, err
}

// readMessage reads one typed message into buf (reused when large enough)
// and returns it whole: type byte, length, body.
func readMessage(r *bufio.Reader, buf []byte) ([]byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint32(hdr[1:]))
	if n < 4 || n > 1<<30 {
		return nil, errors.New("invalid message length")
	}
	if cap(buf) < n+1 {
		buf = make([]byte, n+1)
	}
	buf = buf[:n+1]
	copy(buf, hdr[:])
	_, err := io.ReadFull(r, buf[5:])
	return buf, err
}

func (pc *proxyConn) clientToServer(cr *bufio.Reader, server net.Conn) {
	sw := bufio.NewWriterSize(server, 16<<10)
	var buf []byte
	for {
		msg, err := readMessage(cr, buf)
		if err != nil {
			return
		}
		buf = msg
		if msg[0] != 'X' && pc.startupDone.Load() {
			if !pc.beginRoundTrip(msg[0]) {
				return
			}
			if (msg[0] == 'Q' || msg[0] == 'P') && !pc.n.c.opts.Postgres {
				msg = rewriteShowLocality(msg, pc.n.locality)
			}
		}
		if !pc.n.waitHealed(pc.done) {
			return
		}
		if _, err := sw.Write(msg); err != nil {
			return
		}
		// Flush only when the client has nothing more buffered, so a
		// pipeline of messages goes out in one write.
		if cr.Buffered() == 0 {
			if err := sw.Flush(); err != nil {
				return
			}
		}
	}
}

// beginRoundTrip accounts a client message of type t: the first message of a
// round trip waits for the node's latency and a capacity slot. It returns
// false if the connection closed while waiting.
func (pc *proxyConn) beginRoundTrip(t byte) bool {
	pc.cyc.Lock()
	if !pc.held {
		pc.cyc.Unlock()
		if d := time.Duration(pc.n.latency.Load()); d > 0 {
			timer := time.NewTimer(d)
			select {
			case <-timer.C:
			case <-pc.done:
				timer.Stop()
				return false
			}
		}
		if !pc.n.queries.acquire(pc.done) {
			return false
		}
		pc.cyc.Lock()
		if pc.held { // cannot happen: only this goroutine acquires
			pc.n.queries.release()
		}
		pc.held = true
	}
	switch t {
	case 'Q', 'F', 'S':
		pc.outstanding++
		pc.openExt = false
	case 'P', 'B', 'E', 'D', 'C', 'H':
		pc.openExt = true
	}
	pc.cyc.Unlock()
	return true
}

// endRoundTrip accounts a ReadyForQuery from the server.
func (pc *proxyConn) endRoundTrip() {
	pc.cyc.Lock()
	if pc.outstanding > 0 {
		pc.outstanding--
	}
	if pc.held && pc.outstanding == 0 && !pc.openExt {
		pc.held = false
		pc.n.queries.release()
	}
	pc.cyc.Unlock()
}

func (pc *proxyConn) serverToClient(server net.Conn) {
	defer pc.n.c.wg.Done()
	defer pc.close()
	sr := bufio.NewReaderSize(server, 32<<10)
	n := pc.n
	var buf []byte
	for {
		msg, err := readMessage(sr, buf)
		if err != nil {
			return
		}
		buf = msg
		var extra []byte
		switch {
		case msg[0] == 'Z' && pc.startupDone.Load():
			// Before the client sees it, so its next query finds the slot free.
			pc.endRoundTrip()
		case msg[0] == 'Z':
			if !n.c.opts.Postgres {
				extra = parameterStatus("crdb_version", n.c.opts.CrdbVersion)
			}
			pc.startupDone.Store(true)
		case msg[0] == 'K' && !pc.startupDone.Load() && len(msg) >= 13:
			pc.rewriteKey(msg)
		}
		if !n.waitHealed(pc.done) {
			return
		}
		flush := sr.Buffered() == 0
		var werr error
		if extra != nil {
			werr = pc.writeClient(flush, extra, msg)
		} else {
			werr = pc.writeClient(flush, msg)
		}
		if werr != nil {
			return
		}
	}
}

// rewriteKey replaces the server's BackendKeyData in msg, in place, with one
// that carries the node's ID, and registers the pair so that a CancelRequest
// with the new key reaches this server with its real key. In Postgres mode
// the key is left alone but still registered: a CancelRequest sent through the
// load balancer may land on another node's proxy, which must forward it here.
func (pc *proxyConn) rewriteKey(msg []byte) {
	n := pc.n
	real := cancelKey{pid: binary.BigEndian.Uint32(msg[5:9]), secret: string(msg[9:])}
	given := real
	registered := false
	// A fresh random key collides with a live one about never; the bound only
	// keeps the loop finite.
	for attempt := 0; attempt < 10 && !registered; attempt++ {
		if !n.c.opts.Postgres {
			rnd := n.c.randomBytes(len(msg) - 9 + 4)
			pid := EncodeProcessID(uint32(n.id), n.c.opts.LongIDs, binary.BigEndian.Uint32(rnd))
			given = cancelKey{pid: pid, secret: string(rnd[4:])}
		}
		registered = n.c.keys.add(given, cancelTarget{node: n, key: real})
	}
	binary.BigEndian.PutUint32(msg[5:9], given.pid)
	copy(msg[9:], given.secret)
	if !registered {
		return
	}
	pc.mu.Lock()
	closed := pc.closed
	if !closed {
		pc.key = &given
	}
	pc.mu.Unlock()
	if closed {
		n.c.keys.remove(given)
	}
}

// SQLSTATEs of the proxy's own FATAL errors.
const (
	// sqlStateAdminShutdown is what CockroachDB sends while it drains.
	sqlStateAdminShutdown = "57P01"
	// sqlStateInvalidAuthorization refuses a connection without TLS in TLS
	// mode, as PostgreSQL's hostssl rules do. (CockroachDB sends 08P01 with
	// the same message; 28000 says plainly that retrying will not help.)
	sqlStateInvalidAuthorization = "28000"
)

// errorMessage is an ErrorResponse with severity FATAL.
func errorMessage(code, msg string) []byte { return errorResponse(code, msg, "") }

// errorResponse is an ErrorResponse with severity FATAL and, unless empty, a
// hint.
func errorResponse(code, msg, hint string) []byte {
	b := []byte{'E', 0, 0, 0, 0}
	fields := [][2]string{{"S", "FATAL"}, {"V", "FATAL"}, {"C", code}, {"M", msg}}
	if hint != "" {
		fields = append(fields, [2]string{"H", hint})
	}
	for _, f := range fields {
		b = append(b, f[0][0])
		b = append(b, f[1]...)
		b = append(b, 0)
	}
	b = append(b, 0)
	binary.BigEndian.PutUint32(b[1:5], uint32(len(b)-1))
	return b
}

// startTLS runs the server side of the TLS handshake on the client
// connection, whose first handshake bytes may already sit in cr, and returns
// a reader of the decrypted stream, or nil if the handshake failed. From
// then on writes to the client are encrypted too. The proxy's leg to its
// server stays plain, as behind a TLS-terminating gateway.
func (pc *proxyConn) startTLS(cr *bufio.Reader) *bufio.Reader {
	tc := tls.Server(bufferedConn{Conn: pc.raw, r: cr}, pc.n.c.serverTLS)
	if err := tc.Handshake(); err != nil {
		select {
		case <-pc.done: // closed by Kill, a drain or Close: not worth a line
		default:
			pc.n.c.logf("node %d: TLS handshake with %v failed: %v", pc.n.id, pc.raw.RemoteAddr(), err)
		}
		return nil
	}
	pc.wmu.Lock()
	pc.client = tc
	pc.cw = bufio.NewWriterSize(tc, 16<<10)
	pc.wmu.Unlock()
	return bufio.NewReaderSize(tc, 16<<10)
}

func (pc *proxyConn) alpnAgreed() bool {
	pc.wmu.Lock()
	defer pc.wmu.Unlock()
	tc, ok := pc.client.(*tls.Conn)
	return ok && tc.ConnectionState().NegotiatedProtocol == alpnPostgres
}

func parameterStatus(name, value string) []byte {
	b := []byte{'S', 0, 0, 0, 0}
	b = append(b, name...)
	b = append(b, 0)
	b = append(b, value...)
	b = append(b, 0)
	binary.BigEndian.PutUint32(b[1:5], uint32(len(b)-1))
	return b
}
