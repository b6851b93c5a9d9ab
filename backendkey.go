package clusterpool

import (
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
