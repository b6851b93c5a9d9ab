package clustertest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// State is a node's state as the load balancer and clients see it.
type State int

const (
	// Up: the node accepts connections and the load balancer routes to it.
	Up State = iota
	// Draining: the load balancer no longer routes to the node; new
	// connections that reach it are refused with 57P01; existing ones work
	// until the drain's connection wait is over.
	Draining
	// Down: the node's proxy refuses connections (nothing listens on its
	// port) until Restart.
	Down
)

// String returns "Up", "Draining" or "Down".
func (s State) String() string {
	switch s {
	case Up:
		return "Up"
	case Draining:
		return "Draining"
	case Down:
		return "Down"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// backend is the server behind a node's proxy: a PostgreSQL process or an
// in-process fakepg server. It keeps running while the node is Down (the
// proxy is what goes away), so Restart is fast; it stops on RemoveNode and
// Close.
type backend interface {
	addr() string
	// stop stops the server; true means it shut down cleanly.
	stop() bool
}

// Node is one node of a Cluster: a server behind a node proxy on its own
// 127.0.0.1 port. Clients reach it through the proxy (Addr, DSN), directly
// through the cluster's load balancer (Cluster.DSN), or bypass the proxy
// with PostgresDSN. All methods are safe for concurrent use.
type Node struct {
	c        *Cluster
	id       int
	addr     string // the proxy's address, the same across restarts
	dir      string // the data directory, "" for InProcess
	locality string
	backend  backend

	latency   atomic.Int64                  // nanoseconds added to each round trip
	queries   *limiter                      // capacity
	partition atomic.Pointer[chan struct{}] // non-nil while partitioned; closed by Heal
	open      atomic.Int64
	total     atomic.Int64
	refused   atomic.Int64
	sessions  *sessionLog
	// maxConns is the session limit (SetMaxConnections), 0 for none;
	// admitted counts the sessions it has let in that are still open.
	maxConns atomic.Int64
	admitted atomic.Int64

	// life serialises Restart, Kill-for-restart and removal, so two
	// Restarts do not race for the port.
	life sync.Mutex

	mu      sync.Mutex // protects the fields below
	state   State
	gen     int // incremented by each (re)start of the proxy listener
	ln      net.Listener
	conns   map[*proxyConn]struct{}
	drain   *drainOp // non-nil while Draining
	removed bool
}

type drainOp struct {
	stop chan struct{} // closed by Kill to end the drain early
	done chan struct{} // closed when the drain is over
}

// ID returns the node's ID, which its BackendKeyData carries.
func (n *Node) ID() int { return n.id }

// Locality returns the node's locality (Options.Localities,
// NodeOptions.Locality), "" if it has none.
func (n *Node) Locality() string { return n.locality }

// Addr returns the node proxy's host:port. It stays the same across Restart.
func (n *Node) Addr() string { return n.addr }

// DSN returns a connection string straight to this node's proxy, with the
// cluster's SSL parameters (see Cluster.DSN).
func (n *Node) DSN() string {
	return "postgres://postgres@" + n.addr + "/postgres?" + n.c.sslParams()
}

// PostgresDSN returns a connection string straight to the node's server,
// bypassing the proxy: no rewritten key, no faults, not counted, and no TLS
// even in TLS mode.
func (n *Node) PostgresDSN() string {
	return "postgres://postgres@" + n.backend.addr() + "/postgres?sslmode=disable"
}

// ExecDirect runs sql (one or more statements, no arguments) on the node's
// server over a connection of its own, bypassing the proxy as PostgresDSN
// does, and closes the connection: for setting up a test's schema or data
// without faults and without touching the proxy's connection counts. Each
// node is a separate database, so a table every node needs is created on
// each. Errors name the node.
func (n *Node) ExecDirect(ctx context.Context, sql string) error {
	conn, err := pgx.Connect(ctx, n.PostgresDSN())
	if err != nil {
		return fmt.Errorf("clustertest: node %d: %w", n.id, err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, sql); err != nil {
		return fmt.Errorf("clustertest: node %d: %w", n.id, err)
	}
	return nil
}

func (n *Node) backendAddr() string { return n.backend.addr() }

// OpenConns returns the number of client connections open on the node's
// proxy now. A connection counts from its startup message (so CancelRequest
// connections never count) until either side closes it; connections refused
// while draining, or for want of TLS in TLS mode, count for the moment they
// are open, connections refused beyond SetMaxConnections never do.
func (n *Node) OpenConns() int { return int(n.open.Load()) }

// TotalConns returns the number of client connections the proxy has ever
// accepted, counted as OpenConns counts them (refused ones included): the
// sessions the node has had to set up, across restarts.
func (n *Node) TotalConns() int64 { return n.total.Load() }

// RefusedConns returns the number of connections the proxy has refused with
// a FATAL error at startup: while draining (57P01), for want of TLS in TLS
// mode (28000), or beyond SetMaxConnections (53300).
func (n *Node) RefusedConns() int64 { return n.refused.Load() }

// SetMaxConnections makes the node refuse a new session once max sessions
// are open on it, as CockroachDB's server.max_connections_per_gateway does:
// after reading the StartupMessage (so TLS is negotiated first), the proxy
// answers FATAL 53300 "sorry, too many clients already" and closes the
// connection. The node is healthy, only full: sessions already open are not
// affected, even when max is lowered below their number, and one that closes
// frees its slot for the next. Unlike CockroachDB, no user is exempt (every
// clustertest client is the postgres superuser). A refused connection counts
// in TotalConns, RefusedConns and AcceptTimes but never in OpenConns, so
// OpenConns stays within max. It takes effect at once and lasts across
// Restart; max <= 0 (the default) means no limit.
func (n *Node) SetMaxConnections(max int) {
	if max < 0 {
		max = 0
	}
	n.maxConns.Store(int64(max))
}

// OpenConnsByApp returns the client connections open on the node's proxy now
// (counted as OpenConns counts them) by the application_name of their
// StartupMessage, "" for none. A later SET application_name does not move a
// connection. Applications with no connection open are absent.
func (n *Node) OpenConnsByApp() map[string]int { return n.sessions.byApp() }

// Session is one client session open on a node, as its gateway lists it.
type Session struct {
	// App is the session's application_name ("" when the client set none).
	App string
	// Start is when the node accepted the session (its startup message).
	Start time.Time
}

// Sessions returns the sessions open on the node now, oldest first: the
// ones OpenConns counts.
func (n *Node) Sessions() []Session { return n.sessions.sessions() }

// AcceptTimes returns when the node accepted each session (counted as
// TotalConns counts them) from from to to inclusive, oldest first. The node
// remembers its last 65,536 accepts (across restarts); older ones are
// forgotten.
func (n *Node) AcceptTimes(from, to time.Time) []time.Time {
	since := n.sessions.between(from, to)
	out := make([]time.Time, len(since))
	for i, d := range since {
		out[i] = n.c.epoch.Add(d)
	}
	return out
}

// PeakAcceptRate returns the largest number of sessions the node accepted
// within any window-long interval between from and to (of the accepts
// AcceptTimes returns): with window = time.Second, the peak of new sessions
// per second a reconnect storm puts on this gateway, wherever the second
// falls. A window <= 0 returns 0.
func (n *Node) PeakAcceptRate(from, to time.Time, window time.Duration) int {
	if window <= 0 {
		return 0
	}
	return peakInWindow(n.sessions.between(from, to), window)
}

// State returns the node's current state.
func (n *Node) State() State {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.state
}

// SetLatency adds d to each query round trip on this node from now on: the
// proxy holds the first client message of each round trip (a Query, or the
// first extended-protocol message before a Sync) for d before forwarding it.
// Connection start-up is not delayed. 0 turns it off.
func (n *Node) SetLatency(d time.Duration) {
	if d < 0 {
		d = 0
	}
	n.latency.Store(int64(d))
}

// SetCapacity lets at most max query round trips be in flight on this node;
// the others queue in the proxy, in no particular order, until a slot frees.
// A round trip holds its slot from its first message until the server's
// ReadyForQuery, so an open transaction between statements does not. It
// takes effect at once; 0 means unlimited.
func (n *Node) SetCapacity(max int) { n.queries.setMax(max) }

// Partition makes the node stop answering: its proxy holds every byte in
// both directions but keeps the sockets open, so clients see timeouts, not
// errors. New connections are accepted and held too. The load balancer keeps
// routing to a partitioned node, as a cloud load balancer would until its
// health check failed, and the node's State stays Up. Kill, Drain's final
// close and Close still close a partitioned node's sockets at once.
func (n *Node) Partition() {
	ch := make(chan struct{})
	n.partition.CompareAndSwap(nil, &ch)
}

// Heal ends a Partition: the held bytes flow again.
func (n *Node) Heal() {
	if ch := n.partition.Swap(nil); ch != nil {
		close(*ch)
	}
}

// waitHealed returns true at once unless the node is partitioned; then it
// waits for Heal (true) or done (false).
func (n *Node) waitHealed(done <-chan struct{}) bool {
	ch := n.partition.Load()
	if ch == nil {
		return true
	}
	select {
	case <-*ch:
		return true
	case <-done:
		return false
	}
}

// Drain shuts the node down the way CockroachDB drains a node. The load
// balancer stops routing to it at once, and a new connection that still
// reaches it is refused with FATAL 57P01 "server is not accepting clients,
// try another node". Existing connections keep working until connectionWait
// has passed or all of them have closed, whichever comes first; then each
// remaining one receives FATAL 57P01 "server is shutting down" (between two
// messages, never inside one) and is closed, and the node is Down.
//
// Drain blocks until the node is Down, or returns ctx's error if ctx ends
// first (the drain goes on). Draining a node that is already draining waits
// for that drain; draining a Down node returns nil at once.
func (n *Node) Drain(ctx context.Context, connectionWait time.Duration) error {
	n.mu.Lock()
	if n.removed {
		n.mu.Unlock()
		return fmt.Errorf("clustertest: node %d was removed", n.id)
	}
	started := false
	switch n.state {
	case Down:
		n.mu.Unlock()
		return nil
	case Up:
		op := &drainOp{stop: make(chan struct{}), done: make(chan struct{})}
		n.drain = op
		n.state = Draining
		n.c.wg.Add(1)
		go n.runDrain(op, n.gen, connectionWait)
		started = true
	}
	op := n.drain
	n.mu.Unlock()
	if started {
		n.c.logf("node %d: draining (connection wait %v)", n.id, connectionWait)
	}
	select {
	case <-op.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (n *Node) runDrain(op *drainOp, gen int, wait time.Duration) {
	defer n.c.wg.Done()
	defer close(op.done)
	timer := time.NewTimer(wait)
	defer timer.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
wait:
	for n.open.Load() > 0 {
		select {
		case <-timer.C:
			break wait
		case <-op.stop:
			return
		case <-tick.C:
		}
	}
	conns := n.connsIfGen(gen, Draining)
	var wg sync.WaitGroup
	for _, pc := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pc.shutdown(msgShuttingDown)
		}()
	}
	wg.Wait()

	n.mu.Lock()
	if n.gen != gen || n.state != Draining {
		n.mu.Unlock()
		return // killed or restarted meanwhile
	}
	ln, rest := n.downLocked()
	n.mu.Unlock()
	closeAll(ln, rest)
	n.c.logf("node %d: drained, down", n.id)
}

// connsIfGen returns the node's connections if it is still in the given
// generation and state.
func (n *Node) connsIfGen(gen int, state State) []*proxyConn {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.gen != gen || n.state != state {
		return nil
	}
	conns := make([]*proxyConn, 0, len(n.conns))
	for pc := range n.conns {
		conns = append(conns, pc)
	}
	return conns
}

// downLocked marks the node Down and hands back what the caller must close
// once the lock is released.
func (n *Node) downLocked() (net.Listener, []*proxyConn) {
	ln := n.ln
	conns := make([]*proxyConn, 0, len(n.conns))
	for pc := range n.conns {
		conns = append(conns, pc)
	}
	n.ln = nil
	n.conns = make(map[*proxyConn]struct{})
	n.state = Down
	if n.drain != nil {
		close(n.drain.stop)
		n.drain = nil
	}
	return ln, conns
}

func closeAll(ln net.Listener, conns []*proxyConn) {
	if ln != nil {
		ln.Close()
	}
	for _, pc := range conns {
		pc.close()
	}
}

// Kill crashes the node: every socket of its proxy is closed at once
// without a message, and new connections are refused (nothing listens on
// its port) until Restart. The server behind the proxy keeps running but is
// unreachable through the proxy and the load balancer.
func (n *Node) Kill() {
	n.kill()
	n.c.logf("node %d: killed", n.id)
}

func (n *Node) kill() {
	n.mu.Lock()
	if n.state == Down {
		n.mu.Unlock()
		return
	}
	ln, conns := n.downLocked()
	n.mu.Unlock()
	closeAll(ln, conns)
}

// Restart brings a Down node back Up, with the same ID on the same proxy
// address; the load balancer routes to it again. A node that is Up is left
// alone; a Draining one is killed first. It fails if another process took
// the node's port meanwhile. Latency, capacity and partition settings are
// kept.
func (n *Node) Restart(ctx context.Context) error {
	n.life.Lock()
	defer n.life.Unlock()
	n.mu.Lock()
	removed, state := n.removed, n.state
	n.mu.Unlock()
	if removed {
		return fmt.Errorf("clustertest: node %d was removed", n.id)
	}
	if state == Up {
		return nil
	}
	n.kill()
	if err := n.listen(ctx); err != nil {
		return err
	}
	n.c.logf("node %d: restarted on %s", n.id, n.addr)
	return nil
}

// listen opens the proxy listener on n.addr (or a fresh port the first
// time), marks the node Up and starts accepting.
func (n *Node) listen(ctx context.Context) error {
	addr := n.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("clustertest: node %d: cannot listen on %s (port taken by another process?): %w", n.id, addr, err)
	}
	n.mu.Lock()
	if n.removed {
		n.mu.Unlock()
		ln.Close()
		return fmt.Errorf("clustertest: node %d was removed", n.id)
	}
	if n.addr == "" {
		n.addr = ln.Addr().String()
	}
	n.gen++
	n.ln = ln
	n.state = Up
	gen := n.gen
	n.c.wg.Add(1)
	n.mu.Unlock()
	go n.accept(ln, gen)
	return nil
}

func (n *Node) accept(ln net.Listener, gen int) {
	defer n.c.wg.Done()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors or similar: back off, do not spin.
			time.Sleep(5 * time.Millisecond)
			continue
		}
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		pc := newProxyConn(n, conn)
		if !n.register(pc, gen) {
			conn.Close()
			continue
		}
		n.c.wg.Add(1)
		go pc.serve()
	}
}

func (n *Node) register(pc *proxyConn, gen int) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.gen != gen || n.state == Down {
		return false
	}
	n.conns[pc] = struct{}{}
	return true
}

func (n *Node) unregister(pc *proxyConn) {
	n.mu.Lock()
	delete(n.conns, pc)
	n.mu.Unlock()
}

// remove takes the node out for good: Down, server stopped, data deleted.
func (n *Node) remove() {
	n.life.Lock()
	defer n.life.Unlock()
	n.mu.Lock()
	if n.removed {
		n.mu.Unlock()
		return
	}
	n.removed = true
	n.mu.Unlock()
	n.kill()
	clean := n.backend.stop()
	switch {
	case n.dir == "":
	case clean:
		recycle(n.c.tmpl, n.dir, n.c.run)
	default:
		os.RemoveAll(n.dir)
	}
}
