package clusterpool

// NodeID identifies one gateway node of the cluster. On CockroachDB it is the
// SQL instance ID the node encodes in its BackendKeyData. The zero value means
// the node is not known.
type NodeID int64
