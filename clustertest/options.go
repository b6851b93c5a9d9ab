package clustertest

import (
	"errors"
	"fmt"
	"os"
	"strings"
)

// Balancing is the load balancer's policy for choosing a node for each new
// connection.
type Balancing int

const (
	// Random picks a node uniformly at random among the nodes that are Up, like
	// a cloud TCP load balancer. It is the default.
	Random Balancing = iota
	// RoundRobin cycles through the nodes that are Up in ID order.
	RoundRobin
)

// String returns "Random" or "RoundRobin".
func (b Balancing) String() string {
	switch b {
	case Random:
		return "Random"
	case RoundRobin:
		return "RoundRobin"
	}
	return fmt.Sprintf("Balancing(%d)", int(b))
}

// DefaultCrdbVersion is the crdb_version ParameterStatus the node proxies send
// when Options.CrdbVersion is empty.
const DefaultCrdbVersion = "CockroachDB CCL v24.1.0 (x86_64-pc-linux-gnu, built 2024/05/15 21:28:29, go1.22.3) (clustertest)"

// Largest node IDs each encoding can carry (see EncodeProcessID).
const (
	MaxShortID = 1<<11 - 1 // 2047
	MaxLongID  = 1<<31 - 1
)

// Options configures a Cluster. The zero value (apart from Nodes) is a usable
// default: short node IDs from 1, CockroachDB-like proxies, a random load
// balancer, real PostgreSQL servers under os.TempDir().
type Options struct {
	// Nodes is the number of nodes to start; it must be at least 1.
	Nodes int
	// FirstID is the ID of the first node; 0 means 1. IDs are consecutive and
	// AddNode takes the next one. With short IDs the last ID must be at most
	// MaxShortID (2047); with LongIDs at most MaxLongID.
	FirstID int
	// LongIDs encodes IDs in CockroachDB's long form (top bit 1, 31-bit ID), as
	// a multi-tenant SQL instance does.
	LongIDs bool
	// Postgres makes the nodes look like plain PostgreSQL: BackendKeyData is
	// relayed unchanged (the ProcessID is the server's OS PID) and no
	// crdb_version ParameterStatus is sent.
	Postgres bool
	// Balancing is the load balancer's policy; Random by default.
	Balancing Balancing
	// Seed seeds the load balancer and the random bits of the rewritten
	// BackendKeyData, so a test's spread of connections is reproducible. 0
	// means a random seed.
	Seed int64
	// CrdbVersion is the value of the crdb_version ParameterStatus; empty
	// means DefaultCrdbVersion.
	CrdbVersion string
	// InProcess runs each node as an in-process Postgres-wire server
	// (internal/fakepg) instead of PostgreSQL: no binaries needed, much
	// faster, but it only understands the statements fakepg documents.
	InProcess bool
	// TLS makes every node require TLS, as CockroachDB in secure mode does.
	// Start generates, in memory, a CA (ECDSA P-256) and a server
	// certificate it signs for 127.0.0.1, ::1 and localhost, valid for a
	// week, and writes the CA certificate to a file (Cluster.CAFile) in the
	// cluster's directory. The node proxies terminate TLS, after an
	// SSLRequest or directly (sslnegotiation=direct); their leg to the server
	// stays plain, so it works with InProcess too. A startup message without
	// TLS gets FATAL 28000 "node is running secure mode, SSL connection
	// required"; a CancelRequest is accepted with or without TLS. DSN,
	// HostsDSN and Node.DSN then carry sslmode=verify-full and sslrootcert.
	TLS bool
	// Localities gives node i (in ID order, from FirstID) the locality
	// Localities[i], in CockroachDB's --locality form: tiers from the most to
	// the least inclusive, such as "region=us-east1,zone=us-east1-b". An
	// empty string, or a list shorter than Nodes (nil by default), leaves a
	// node without locality; a longer list is an error. Nodes added later
	// take theirs from Cluster.AddNodeWith. Each node answers SHOW LOCALITY
	// with its own locality, and Cluster.SetGossip writes them into
	// crdb_internal.gossip_nodes. With Localities non-nil (even all empty),
	// every PostgreSQL node also answers crdb_internal.locality_value(key)
	// as CockroachDB does (NULL for a key its locality lacks); without, only
	// nodes added with a locality do, which keeps the start of clusters that
	// do not use localities some 50 ms per node faster. Neither Postgres nor
	// InProcess nodes have the function.
	Localities []string
	// BaseDir is the parent directory of the cluster's directory (data
	// directories, server logs) and of the initdb template that is reused
	// across clusters and processes. Empty means os.TempDir(). When the
	// process runs as root, PostgreSQL runs as the "postgres" OS user, which
	// must be able to traverse BaseDir.
	BaseDir string
	// Logf, if set, receives one line per cluster event (node started,
	// draining, killed, ...). t.Logf fits.
	Logf func(format string, args ...any)
}

// withDefaults returns opts with zero fields replaced by their defaults, or an
// error naming the first invalid field.
func (opts Options) withDefaults() (Options, error) {
	if opts.Nodes < 1 {
		return opts, fmt.Errorf("clustertest: Options.Nodes is %d; a cluster needs at least 1 node", opts.Nodes)
	}
	if opts.FirstID == 0 {
		opts.FirstID = 1
	}
	if opts.FirstID < 1 {
		return opts, fmt.Errorf("clustertest: Options.FirstID is %d; node IDs start at 1", opts.FirstID)
	}
	if err := checkID(opts.FirstID+opts.Nodes-1, opts.LongIDs); err != nil {
		return opts, err
	}
	if opts.Balancing != Random && opts.Balancing != RoundRobin {
		return opts, fmt.Errorf("clustertest: unknown Options.Balancing %v", opts.Balancing)
	}
	if opts.CrdbVersion == "" {
		opts.CrdbVersion = DefaultCrdbVersion
	}
	if strings.IndexByte(opts.CrdbVersion, 0) >= 0 {
		return opts, errors.New("clustertest: Options.CrdbVersion contains a NUL byte, which the wire protocol cannot carry")
	}
	if len(opts.Localities) > opts.Nodes {
		return opts, fmt.Errorf("clustertest: Options.Localities has %d entries for %d nodes", len(opts.Localities), opts.Nodes)
	}
	for i, l := range opts.Localities {
		if _, err := parseLocality(l); err != nil {
			return opts, fmt.Errorf("clustertest: Options.Localities[%d] %q: %w", i, l, err)
		}
	}
	if opts.BaseDir == "" {
		opts.BaseDir = os.TempDir()
	}
	return opts, nil
}

// errIDRange is wrapped by every error about a node ID out of range.
var errIDRange = errors.New("node ID out of range")

func checkID(id int, long bool) error {
	if long && id > MaxLongID {
		return fmt.Errorf("clustertest: node ID %d is above %d, the largest long ID: %w", id, MaxLongID, errIDRange)
	}
	if !long && id > MaxShortID {
		return fmt.Errorf("clustertest: node ID %d is above %d, the largest short ID (set Options.LongIDs for larger IDs): %w", id, MaxShortID, errIDRange)
	}
	return nil
}
