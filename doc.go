// Package clusterpool is a cluster-aware, drop-in replacement for pgxpool.
package clusterpool
