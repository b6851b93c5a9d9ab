package clustertest

import (
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"time"
)

// balancer is the cluster's TCP load balancer: for each accepted connection
// it picks a node that is Up and relays bytes both ways to that node's proxy.
// It looks at nothing inside the stream, like a cloud TCP load balancer.
type balancer struct {
	c  *Cluster
	ln net.Listener

	mu     sync.Mutex // protects the fields below
	rng    *rand.Rand
	last   int // round robin: ID of the node picked last
	conns  map[net.Conn]struct{}
	closed bool
}

func newBalancer(c *Cluster, seed uint64) (*balancer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	b := &balancer{c: c, ln: ln, rng: rand.New(rand.NewPCG(seed, 0x6c62)), conns: make(map[net.Conn]struct{})}
	c.wg.Add(1)
	go b.accept()
	return b, nil
}

func (b *balancer) addr() string { return b.ln.Addr().String() }

func (b *balancer) accept() {
	defer b.c.wg.Done()
	for {
		conn, err := b.ln.Accept()
		if err != nil {
			if b.isClosed() {
				return
			}
			time.Sleep(5 * time.Millisecond)
			continue
		}
		if !b.track(conn) {
			conn.Close()
			return
		}
		b.c.wg.Add(1)
		go b.relay(conn)
	}
}

// pick returns the node for a new connection, or nil if none is Up.
// Partitioned nodes are still Up: a real balancer's health check would not
// have noticed yet.
func (b *balancer) pick() *Node {
	var up []*Node
	for _, n := range b.c.Nodes() {
		if n.State() == Up {
			up = append(up, n)
		}
	}
	if len(up) == 0 {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.c.opts.Balancing == RoundRobin {
		for _, n := range up {
			if n.id > b.last {
				b.last = n.id
				return n
			}
		}
		b.last = up[0].id
		return up[0]
	}
	return up[b.rng.IntN(len(up))]
}

func (b *balancer) relay(client net.Conn) {
	defer b.c.wg.Done()
	defer b.untrack(client)
	defer client.Close()
	n := b.pick()
	if n == nil {
		return // no node is up: the client sees the connection closed
	}
	server, err := net.DialTimeout("tcp", n.Addr(), 5*time.Second)
	if err != nil {
		return
	}
	if !b.track(server) {
		server.Close()
		return
	}
	defer b.untrack(server)
	defer server.Close()
	if tc, ok := server.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	if tc, ok := client.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	done := make(chan struct{})
	b.c.wg.Add(1)
	go func() {
		defer b.c.wg.Done()
		defer close(done)
		io.Copy(server, client)
		server.Close() // the client left: so does the connection to the node
	}()
	io.Copy(client, server)
	client.Close()
	server.Close()
	<-done
}

func (b *balancer) track(conn net.Conn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return false
	}
	b.conns[conn] = struct{}{}
	return true
}

func (b *balancer) untrack(conn net.Conn) {
	b.mu.Lock()
	delete(b.conns, conn)
	b.mu.Unlock()
}

func (b *balancer) isClosed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closed
}

func (b *balancer) close() {
	b.mu.Lock()
	b.closed = true
	conns := make([]net.Conn, 0, len(b.conns))
	for conn := range b.conns {
		conns = append(conns, conn)
	}
	b.mu.Unlock()
	b.ln.Close()
	for _, conn := range conns {
		conn.Close()
	}
}
