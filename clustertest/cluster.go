package clustertest

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// Cluster is a local multi-node cluster: each node a server behind its own
// node proxy, and one load balancer in front of them all. Start it with
// Start or, in tests, New. All methods are safe for concurrent use.
type Cluster struct {
	opts Options
	bins binaries
	run  runAs
	tmpl string // initdb template, "" for InProcess
	dir  string // this cluster's directory under BaseDir
	// owner stays locked while the cluster is open (see sweepStale).
	owner *os.File
	seed  uint64
	// epoch is when the cluster started; the nodes' accept logs count from it.
	epoch time.Time

	lb   *balancer
	keys cancelKeys

	// serverTLS is what every node proxy presents in TLS mode; nil without
	// Options.TLS. caFile is where the CA that signed it is, "" without.
	serverTLS *tls.Config
	caFile    string

	// wg counts every goroutine the cluster starts; Close waits for it.
	wg sync.WaitGroup

	rngMu sync.Mutex // protects rng
	// rng makes the random bits of rewritten BackendKeyData (the load
	// balancer has its own, so its sequence does not depend on connects).
	rng *rand.Rand

	// internalMu serializes SetGossip and SetSessions with AddNode's copy
	// of the crdb_internal tables they write, so a node added meanwhile
	// gets the latest rows or is listed in them.
	internalMu sync.Mutex
	// gossip and sessions are the SQL of the last SetGossip and
	// SetSessions, "" before the first; under internalMu.
	gossip, sessions string

	mu     sync.Mutex // protects the fields below
	nodes  map[int]*Node
	nextID int
	closed bool

	closeOnce sync.Once
	closeErr  error
}

// New starts a cluster for a test and closes it when the test ends. Without
// PostgreSQL binaries (and without Options.InProcess) it skips the test with
// a message naming what to install, or fails it if the environment variable
// CLUSTERTEST_REQUIRE=1 (as CI sets). Any other start error fails the test.
// Cluster events go to t.Logf unless opts.Logf is set.
func New(t testing.TB, opts Options) *Cluster {
	t.Helper()
	if !opts.InProcess {
		skipUnlessRequired(t, Available())
	}
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	})
	return c
}

// skipUnlessRequired is the one place where clustertest lets a test skip: it
// skips t for the reason err (what to install) if err is not nil, and fails
// it instead when CLUSTERTEST_REQUIRE=1.
func skipUnlessRequired(t testing.TB, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if os.Getenv("CLUSTERTEST_REQUIRE") == "1" {
		t.Fatalf("%v (CLUSTERTEST_REQUIRE=1)", err)
		return
	}
	t.Skip(err)
}

// Start starts a cluster of opts.Nodes nodes in parallel and its load
// balancer, and returns once every node accepts connections. Each node's
// data directory is a copy of a template made by initdb once and kept under
// BaseDir for later runs. The caller must Close the cluster.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	seed := uint64(opts.Seed)
	if opts.Seed == 0 {
		seed = rand.Uint64()
	}
	c := &Cluster{
		opts:   opts,
		seed:   seed,
		epoch:  time.Now(),
		rng:    rand.New(rand.NewPCG(seed, 0x6b657973)), // "keys"
		nodes:  make(map[int]*Node),
		nextID: opts.FirstID,
		keys:   cancelKeys{m: make(map[cancelKey]cancelTarget)},
	}
	if !opts.InProcess {
		if c.bins, err = findBinaries(); err != nil {
			return nil, err
		}
		if c.run, err = lookupRunAs(); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(opts.BaseDir, 0o755); err != nil {
		return nil, fmt.Errorf("clustertest: cannot create BaseDir: %w", err)
	}
	sweepStale(opts.BaseDir)
	if c.dir, err = os.MkdirTemp(opts.BaseDir, "clustertest-"); err != nil {
		return nil, fmt.Errorf("clustertest: cannot create a directory in BaseDir: %w", err)
	}
	if c.owner, err = lockOwner(c.dir); err != nil {
		os.RemoveAll(c.dir)
		return nil, fmt.Errorf("clustertest: %w", err)
	}
	if opts.TLS {
		if err := c.makeTLS(); err != nil {
			c.owner.Close()
			os.RemoveAll(c.dir)
			return nil, err
		}
	}
	if err := c.prepare(ctx); err != nil {
		c.owner.Close()
		os.RemoveAll(c.dir)
		return nil, err
	}

	ids := make([]int, opts.Nodes)
	for i := range ids {
		ids[i] = c.nextID
		c.nextID++
	}
	nodes := make([]*Node, len(ids))
	errs := make([]error, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		var locality string
		if i < len(opts.Localities) {
			locality = opts.Localities[i]
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			nodes[i], errs[i] = c.startNode(ctx, id, locality)
		}()
	}
	wg.Wait()
	c.mu.Lock()
	for _, n := range nodes {
		if n != nil {
			c.nodes[n.id] = n
		}
	}
	c.mu.Unlock()
	if err := errors.Join(errs...); err != nil {
		c.Close()
		return nil, err
	}
	c.logf("cluster started: load balancer %s, nodes %s", c.lb.addr(), c.hostList())
	return c, nil
}

// prepare readies what the nodes need: the template, a directory the
// postgres user can reach, and the load balancer.
func (c *Cluster) prepare(ctx context.Context) error {
	var err error
	if !c.opts.InProcess {
		if err := c.run.checkTraversable(c.opts.BaseDir); err != nil {
			return err
		}
		if c.run.cred != nil {
			// Let the postgres user reach its data directories (not list them).
			if err := os.Chmod(c.dir, 0o711); err != nil {
				return fmt.Errorf("clustertest: %w", err)
			}
		}
		if c.tmpl, err = ensureTemplate(ctx, c.bins, c.opts.BaseDir, c.run); err != nil {
			return err
		}
	}
	c.lb, err = newBalancer(c, c.seed)
	return err
}

func (c *Cluster) logf(format string, args ...any) {
	if c.opts.Logf != nil {
		c.opts.Logf("clustertest: "+format, args...)
	}
}

// startNode starts node id's server and proxy, with a locality already
// validated. On error nothing is left running.
func (c *Cluster) startNode(ctx context.Context, id int, locality string) (*Node, error) {
	n := &Node{c: c, id: id, locality: locality, queries: newLimiter(), sessions: newSessionLog(c.epoch), conns: make(map[*proxyConn]struct{})}
	var err error
	if c.opts.InProcess {
		n.backend, err = startFake()
	} else {
		n.dir = filepath.Join(c.dir, fmt.Sprintf("node%d", id))
		n.backend, err = startPostgres(ctx, c.bins, c.tmpl, n.dir, n.dir+".log", c.run)
	}
	if err != nil {
		if n.dir != "" {
			os.RemoveAll(n.dir)
		}
		return nil, fmt.Errorf("clustertest: node %d: %w", id, err)
	}
	// Defining the function costs a start some 50 ms (the DDL, and the
	// catalog files the spare must then reset), so only clusters that use
	// localities pay it.
	if !c.opts.InProcess && !c.opts.Postgres && (c.opts.Localities != nil || locality != "") {
		tiers, _ := parseLocality(locality)
		if err := n.ExecDirect(ctx, localityFunctionSQL(tiers)); err != nil {
			n.remove()
			return nil, err
		}
	}
	if err := n.listen(ctx); err != nil {
		n.remove()
		return nil, err
	}
	return n, nil
}

// makeTLS generates the cluster's CA and server certificate and writes the
// CA certificate to the cluster's directory, where clients find it.
func (c *Cluster) makeTLS() error {
	cfg, caPEM, err := newServerTLS(time.Now())
	if err != nil {
		return err
	}
	caFile := filepath.Join(c.dir, "ca.pem")
	if err := os.WriteFile(caFile, caPEM, 0o644); err != nil {
		return fmt.Errorf("clustertest: writing the CA certificate: %w", err)
	}
	c.serverTLS, c.caFile = cfg, caFile
	return nil
}

// CAFile returns the path of the PEM file holding the certificate of the CA
// that signed the nodes' certificate in TLS mode (see Options.TLS), for a
// client's sslrootcert; "" without TLS. The file goes away with Close.
func (c *Cluster) CAFile() string { return c.caFile }

// DSN returns a connection string to the cluster's load balancer:
// postgres://postgres@127.0.0.1:PORT/postgres?sslmode=disable, or, in TLS
// mode, ...?sslmode=verify-full&sslrootcert=CAFILE.
func (c *Cluster) DSN() string {
	return "postgres://postgres@" + c.lb.addr() + "/postgres?" + c.sslParams()
}

// HostsDSN returns a multi-host connection string listing every node's proxy
// in ID order, for clients that spread connections themselves. Its SSL
// parameters are DSN's.
func (c *Cluster) HostsDSN() string {
	return "postgres://postgres@" + c.hostList() + "/postgres?" + c.sslParams()
}

// sslParams are the query parameters with which a client reaches the proxies.
func (c *Cluster) sslParams() string {
	if c.caFile == "" {
		return "sslmode=disable"
	}
	return "sslmode=verify-full&sslrootcert=" + url.QueryEscape(c.caFile)
}

func (c *Cluster) hostList() string {
	nodes := c.Nodes()
	addrs := make([]string, len(nodes))
	for i, n := range nodes {
		addrs[i] = n.Addr()
	}
	return strings.Join(addrs, ",")
}

// Nodes returns the cluster's nodes sorted by ID, whatever their state;
// removed nodes are gone.
func (c *Cluster) Nodes() []*Node {
	c.mu.Lock()
	nodes := make([]*Node, 0, len(c.nodes))
	for _, n := range c.nodes {
		nodes = append(nodes, n)
	}
	c.mu.Unlock()
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].id < nodes[j].id })
	return nodes
}

// Node returns the node with the given ID, or nil if there is none.
func (c *Cluster) Node(id int) *Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[id]
}

// AddNode starts a new node with the next ID (one more than the largest ID
// the cluster ever had) and adds it to the load balancer. The node has no
// locality; AddNodeWith gives it one.
func (c *Cluster) AddNode(ctx context.Context) (*Node, error) {
	return c.AddNodeWith(ctx, NodeOptions{})
}

// AddNodeWith is AddNode for a node configured by opts.
func (c *Cluster) AddNodeWith(ctx context.Context, opts NodeOptions) (*Node, error) {
	if _, err := parseLocality(opts.Locality); err != nil {
		return nil, fmt.Errorf("clustertest: NodeOptions.Locality %q: %w", opts.Locality, err)
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, errors.New("clustertest: AddNode on a closed cluster")
	}
	id := c.nextID
	if err := checkID(id, c.opts.LongIDs); err != nil {
		c.mu.Unlock()
		return nil, err
	}
	c.nextID++
	// Counted like a goroutine so that Close, waiting for them, cannot miss
	// the goroutines this node is about to start.
	c.wg.Add(1)
	defer c.wg.Done()
	c.mu.Unlock()

	n, err := c.startNode(ctx, id, opts.Locality)
	if err != nil {
		return nil, err
	}
	// On CockroachDB crdb_internal is on every node from its start: a
	// client reading gossip or sessions from a node just added finds the
	// tables, never an error that says the cluster has none. The rows are
	// the last SetGossip's and SetSessions', which do not list the new
	// node yet.
	c.internalMu.Lock()
	defer c.internalMu.Unlock()
	for _, sql := range []string{c.gossip, c.sessions} {
		if sql == "" {
			continue
		}
		if err := n.ExecDirect(ctx, sql); err != nil {
			n.remove()
			return nil, fmt.Errorf("clustertest: AddNode: copying the crdb_internal tables to node %d: %w", id, err)
		}
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		n.remove()
		return nil, errors.New("clustertest: cluster closed during AddNode")
	}
	c.nodes[id] = n
	c.mu.Unlock()
	c.logf("node %d: added on %s", id, n.addr)
	return n, nil
}

// RemoveNode stops node id like Kill, stops its server and deletes its data.
func (c *Cluster) RemoveNode(ctx context.Context, id int) error {
	c.mu.Lock()
	n := c.nodes[id]
	delete(c.nodes, id)
	c.mu.Unlock()
	if n == nil {
		return fmt.Errorf("clustertest: RemoveNode: no node %d", id)
	}
	n.remove()
	c.logf("node %d: removed", id)
	return nil
}

// OpenConns returns, for each node, the client connections open on its proxy
// now (see Node.OpenConns).
func (c *Cluster) OpenConns() map[int]int {
	m := make(map[int]int)
	for _, n := range c.Nodes() {
		m[n.id] = n.OpenConns()
	}
	return m
}

// OpenConnsByApp returns, for each application_name with at least one
// connection open on some node, the connections open with it on every node of
// the cluster, 0 included (see Node.OpenConnsByApp): a fleet's pools, each
// with its own application_name, as the servers see them.
func (c *Cluster) OpenConnsByApp() map[string]map[int]int {
	nodes := c.Nodes()
	m := make(map[string]map[int]int)
	for _, n := range nodes {
		for app, count := range n.OpenConnsByApp() {
			if m[app] == nil {
				m[app] = make(map[int]int, len(nodes))
				for _, other := range nodes {
					m[app][other.id] = 0
				}
			}
			m[app][n.id] = count
		}
	}
	return m
}

// Close stops the load balancer, every node and every server, removes the
// cluster's directory (the initdb template and a few spare data directories
// stay in BaseDir for the next run, see the package doc) and returns once every goroutine the cluster started has exited. It is
// idempotent.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed = true
		nodes := make([]*Node, 0, len(c.nodes))
		for _, n := range c.nodes {
			nodes = append(nodes, n)
		}
		c.nodes = map[int]*Node{}
		c.mu.Unlock()

		if c.lb != nil {
			c.lb.close()
		}
		var wg sync.WaitGroup
		for _, n := range nodes {
			wg.Add(1)
			go func() {
				defer wg.Done()
				n.remove()
			}()
		}
		wg.Wait()
		c.wg.Wait()
		c.owner.Close()
		if err := os.RemoveAll(c.dir); err != nil {
			c.closeErr = fmt.Errorf("clustertest: %w", err)
		}
	})
	return c.closeErr
}

// randomBytes returns n bytes from the cluster's seeded generator.
func (c *Cluster) randomBytes(n int) []byte {
	b := make([]byte, (n+7)/8*8)
	c.rngMu.Lock()
	for i := 0; i < len(b); i += 8 {
		binary.BigEndian.PutUint64(b[i:], c.rng.Uint64())
	}
	c.rngMu.Unlock()
	return b[:n]
}

// cancelKey is a BackendKeyData: the ProcessID and the secret key.
type cancelKey struct {
	pid    uint32
	secret string
}

type cancelTarget struct {
	node *Node
	key  cancelKey // the server's real key
}

// cancelKeys maps the keys the proxies hand out to the servers' real keys.
// It is cluster-wide because, as in CockroachDB, a CancelRequest may reach
// any node (through the load balancer) and is forwarded to the right one.
type cancelKeys struct {
	mu sync.Mutex // protects m
	m  map[cancelKey]cancelTarget
}

func (k *cancelKeys) add(key cancelKey, t cancelTarget) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, dup := k.m[key]; dup {
		return false
	}
	k.m[key] = t
	return true
}

func (k *cancelKeys) remove(key cancelKey) {
	k.mu.Lock()
	delete(k.m, key)
	k.mu.Unlock()
}

func (k *cancelKeys) lookup(key cancelKey) (cancelTarget, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	t, ok := k.m[key]
	return t, ok
}

// forwardCancel sends a CancelRequest, translated to the real key, to the
// server it names. Unknown keys are dropped silently, as servers do. A
// partitioned target gets it after Heal, unless done closes first.
func (c *Cluster) forwardCancel(pkt []byte, done <-chan struct{}) {
	if len(pkt) < 16 {
		return
	}
	t, ok := c.keys.lookup(cancelKey{pid: binary.BigEndian.Uint32(pkt[8:12]), secret: string(pkt[12:])})
	if !ok || !t.node.waitHealed(done) {
		return
	}
	out := make([]byte, 12, 12+len(t.key.secret))
	binary.BigEndian.PutUint32(out[0:], uint32(12+len(t.key.secret)))
	binary.BigEndian.PutUint32(out[4:], cancelRequestCode)
	binary.BigEndian.PutUint32(out[8:], t.key.pid)
	out = append(out, t.key.secret...)
	conn, err := net.DialTimeout("tcp", t.node.backendAddr(), 5*time.Second)
	if err != nil {
		return
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write(out); err != nil {
		return
	}
	// The server closes the connection once it has read the request.
	var b [1]byte
	conn.Read(b[:])
}
