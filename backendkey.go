package clusterpool

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// NodeID identifies one gateway node of the cluster. On CockroachDB it is the
// SQL instance ID the node encodes in its BackendKeyData. The zero value means
// the node is not known.
//
// When nodes are identified by a query (NodeIdentityQuery) the IDs are local to
// the pool: 1, 2, 3... in the order the pool discovered the servers' addresses.
// They are not CockroachDB node IDs; NodeStat.Addr names the server.
type NodeID int64

// crdbVersionParam is the ParameterStatus CockroachDB sends at connect and
// PostgreSQL never does; its presence is how the pool tells the two apart
// without a round trip.
const crdbVersionParam = "crdb_version"

// Layout of the ProcessID half of CockroachDB's BackendKeyData (v22.1+).
const (
	longIDFlag   = 1 << 31   // top bit set: the remaining 31 bits are the ID
	longIDMask   = 1<<31 - 1 // the 31-bit long ID
	shortIDShift = 20        // top bit clear: the ID sits in bits 20..30
	shortIDMask  = 1<<11 - 1 // the 11-bit short ID
)

// DecodeProcessID returns the SQL instance ID that CockroachDB encodes in the
// ProcessID half of its BackendKeyData, or 0 when pid carries no ID.
//
// With the top bit clear, bits 20..30 hold a short ID (below 2048, the node ID
// of a dedicated cluster) and the low 20 bits are random. With the top bit set,
// the low 31 bits hold a long ID (multi-tenant SQL instances).
//
// Only call it for a server that is CockroachDB (it sends the crdb_version
// ParameterStatus): from PostgreSQL, pid is an operating-system process ID and
// decoding it would invent node IDs.
func DecodeProcessID(pid uint32) NodeID {
	if pid&longIDFlag != 0 {
		return NodeID(pid & longIDMask)
	}
	return NodeID(pid >> shortIDShift & shortIDMask)
}

// isCockroachDB reports whether the server behind pgConn is CockroachDB. It
// reads a parameter the server sent at connect: no round trip.
func isCockroachDB(pgConn *pgconn.PgConn) bool {
	return pgConn.ParameterStatus(crdbVersionParam) != ""
}

// cockroachIDs reports whether the pool's node IDs are CockroachDB's own,
// read from the BackendKey, whenever the server is CockroachDB. With the
// query identity or IdentifyNode they are the pool's or the user's, a
// different ID space: CockroachDB's IDs (gossip's, a BackendKey's) must not
// be matched against them.
func (p *Pool) cockroachIDs() bool {
	s := p.settings
	return s.identifyNode == nil && (s.identity == NodeIdentityAuto || s.identity == NodeIdentityBackendKey)
}

// nodeOf returns the node a new connection reached as far as the connect
// itself tells, with no round trip: the ID in the BackendKey when the server
// is CockroachDB and the pool's IDs are CockroachDB's, and 0 otherwise. It is
// the one place the BackendKey is decoded: AfterConnect (identify),
// placement (ValidateConnect) and redial all go through it.
func (p *Pool) nodeOf(pgConn *pgconn.PgConn) NodeID {
	if !p.cockroachIDs() || !isCockroachDB(pgConn) {
		return 0
	}
	return DecodeProcessID(pgConn.PID())
}

// identify returns the node conn reached, or 0 if it is not to be tracked,
// and the node's address when the identity tells it. Where nodeOf cannot
// tell, the user's IdentifyNode or the identifying query decides.
func (p *Pool) identify(ctx context.Context, conn *pgx.Conn) (NodeID, string, error) {
	if id := p.nodeOf(conn.PgConn()); id != 0 {
		return id, "", nil
	}
	switch s := p.settings; {
	case s.identifyNode != nil:
		return p.callIdentifyNode(ctx, conn)
	case s.identity == NodeIdentityQuery,
		s.identity == NodeIdentityAuto && s.multiHost && !isCockroachDB(conn.PgConn()):
		return p.identifyByQuery(ctx, conn)
	}
	return 0, "", nil
}

// identifyQuery asks the server for its own address: one round trip, once
// per connection. COALESCE covers Unix-socket connections, where both are NULL.
// It runs with the simple protocol so it takes no slot in the connection's
// statement cache.
const identifyQuery = "SELECT COALESCE(host(inet_server_addr()), ''), COALESCE(inet_server_port(), 0)"

func (p *Pool) identifyByQuery(ctx context.Context, conn *pgx.Conn) (NodeID, string, error) {
	var host string
	var port int
	if err := conn.QueryRow(ctx, identifyQuery, pgx.QueryExecModeSimpleProtocol).Scan(&host, &port); err != nil {
		return 0, "", fmt.Errorf("clusterpool: identifying the node of a new connection: %w", err)
	}
	if host == "" {
		// A Unix socket: the server is the one at the socket path we dialled.
		cfg := conn.Config()
		host = cfg.Host
		if port == 0 {
			port = int(cfg.Port)
		}
	}
	addr := hostPort(host, uint16(port))
	return p.tracker.localID(addr), addr, nil
}
