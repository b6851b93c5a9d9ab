// Package clustertest runs a real local multi-node cluster for tests, with
// fault injection, so that code written for a CockroachDB cluster behind a
// load balancer can be tested on one machine in seconds.
//
// # Nodes
//
// Each node is a PostgreSQL server (its own data directory and port on
// 127.0.0.1, durability off) behind a node proxy written in Go. The proxy
// relays the Postgres wire protocol unchanged except for what makes the node
// look like a CockroachDB gateway:
//
//   - BackendKeyData carries the node's ID in CockroachDB's encoding (see
//     EncodeProcessID), so pgx's PgConn().PID() tells which node a connection
//     reached;
//   - a crdb_version ParameterStatus is sent before the first ReadyForQuery;
//   - a CancelRequest with the rewritten key, reaching any node, is forwarded
//     to the right server with its real key, so context cancellation works.
//
// Options.Postgres turns both off: the cluster then looks like plain
// PostgreSQL servers behind a load balancer. Each proxy counts the client
// connections open on it (Node.OpenConns), the server-side truth against
// which a client pool's own bookkeeping can be checked; it also groups them
// by the application_name of their StartupMessage (Node.OpenConnsByApp,
// Cluster.OpenConnsByApp: a fleet of pools, one name each) and logs when it
// accepted each session (Node.AcceptTimes, Node.PeakAcceptRate: the new
// sessions per second a reconnect storm puts on one gateway). Node.PostgresDSN
// and Node.ExecDirect reach the server past the proxy, for setup and checks
// that should be neither counted nor faulted; each node is a separate
// database, so a table every node needs is created on each.
//
// # Load balancer
//
// Cluster.DSN is one TCP address for the whole cluster. Each new connection
// goes to a node that is Up, at random (seeded by Options.Seed) or round
// robin. Cluster.HostsDSN lists every node's proxy instead.
//
// # TLS
//
// With Options.TLS the nodes require TLS, like CockroachDB in secure mode.
// Start generates a CA and a server certificate for 127.0.0.1, ::1 and
// localhost (ECDSA P-256, in memory, valid for a week) and writes the CA
// certificate to Cluster.CAFile; DSN, HostsDSN and Node.DSN then carry
// sslmode=verify-full&sslrootcert=CAFILE, so pgx checks the chain and the
// host name on every connection, through the load balancer (which still
// forwards bytes) and straight to each node. Each node proxy terminates TLS,
// after an SSLRequest or at once (sslnegotiation=direct, with ALPN
// "postgresql"), and keeps reading the protocol behind it: the BackendKey
// rewrite, crdb_version, drains, partitions, latency and capacity work as
// without TLS. Its leg to the server stays plain, so InProcess nodes get TLS
// too, and Node.PostgresDSN is unencrypted. A startup without TLS is refused
// with FATAL 28000 "node is running secure mode, SSL connection required";
// a CancelRequest is accepted with or without TLS (pgx sends it over TLS
// when the connection it cancels is encrypted).
//
// # Faults
//
// Node.Drain follows CockroachDB's node shutdown (57P01 for new connections,
// then for existing ones after the connection wait), Node.Kill is a crash,
// Node.Restart brings the node back with the same ID and address,
// Node.Partition holds all bytes until Node.Heal, Node.SetLatency delays
// each query round trip and Node.SetCapacity bounds the queries in flight,
// which makes an over-connected node a real bottleneck. Node.SetMaxConnections
// is CockroachDB's server.max_connections_per_gateway: beyond it a new
// session is refused with FATAL 53300 while the node stays healthy.
//
// # Gossip
//
// CockroachDB shows its view of the cluster in crdb_internal.gossip_liveness
// (draining, membership) and crdb_internal.gossip_nodes (addresses, localities).
// Cluster.SetGossip writes those tables into every node's server, with the
// cluster's current nodes at their proxy addresses and the draining flags
// given, so a client that reads them (to discover nodes, or to notice a
// drain before it starts refusing connections) can be tested. The tables do
// not follow AddNode, RemoveNode or Drain: call SetGossip again.
// Cluster.SetSessions writes a snapshot of the sessions open on every node as
// crdb_internal.cluster_sessions (node_id, session_id, application_name,
// active_queries), which every CockroachDB user can read for its own
// sessions; a Down node is one row with a NULL session_id and the error in
// active_queries, as CockroachDB lists a node its fan-out cannot reach.
//
// # Localities
//
// Options.Localities gives each node a locality in CockroachDB's --locality
// form ("region=us-east1,zone=us-east1-b"), and Cluster.AddNodeWith gives
// one to a node added later. Each node answers SHOW LOCALITY with one row in
// a column named locality ("" for none): the proxy rewrites the statement,
// in the simple and the extended protocol, into a SELECT of the node's
// locality. With Options.Localities set, each PostgreSQL node also has a
// function crdb_internal.locality_value(key) returning its tier's value, NULL
// for a key it lacks, as CockroachDB's builtin does; and SetGossip writes
// every node's locality into crdb_internal.gossip_nodes.locality.
//
// # Speed
//
// initdb runs once per machine (per PostgreSQL version and user): its data
// directory is kept under Options.BaseDir and copied for each node, and
// nodes start in parallel. Copying means creating about a thousand small
// files, slow on filesystems where creating a file costs a millisecond, so
// when a node goes away its data directory is reset to the template's exact
// content (rewriting only the few files that changed) and kept as one of up
// to twelve spares next to the template, which later nodes take instead of a
// copy. A 3-node cluster then starts and stops in a few hundred
// milliseconds.
// When the process runs as root, PostgreSQL runs as the "postgres" OS user.
//
// Tests use New, which skips without PostgreSQL unless CLUSTERTEST_REQUIRE=1.
package clustertest
