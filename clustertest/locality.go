package clustertest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"
)

// NodeOptions configures one node added with Cluster.AddNodeWith. The zero
// value is what AddNode uses.
type NodeOptions struct {
	// Locality is the node's locality in CockroachDB's --locality form,
	// tiers from the most to the least inclusive, such as
	// "region=us-east1,zone=us-east1-b"; empty means none. See
	// Options.Localities.
	Locality string
}

// localityTier is one key=value tier of a locality.
type localityTier struct{ key, value string }

// parseLocality splits a locality into its tiers, or says what is wrong with
// it. Like CockroachDB's --locality flag, each comma-separated tier is one
// key=value pair with both sides non-empty; keys must be distinct.
func parseLocality(s string) ([]localityTier, error) {
	if s == "" {
		return nil, nil
	}
	if strings.IndexByte(s, 0) >= 0 {
		return nil, fmt.Errorf("contains a NUL byte, which the wire protocol cannot carry")
	}
	var tiers []localityTier
	seen := make(map[string]bool)
	for _, tier := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(tier, "=")
		if !ok || k == "" || v == "" || strings.Contains(v, "=") {
			return nil, fmt.Errorf("tier %q is not key=value", tier)
		}
		if seen[k] {
			return nil, fmt.Errorf("key %q appears twice", k)
		}
		seen[k] = true
		tiers = append(tiers, localityTier{k, v})
	}
	return tiers, nil
}

// localityFunctionSQL defines crdb_internal.locality_value(key) on a node's
// server to answer as CockroachDB's builtin does on that node: the value of
// the node's locality tier named key, NULL when it has no such tier
// (cockroachdb/cockroach pkg/sql/logictest/testdata/logic_test/locality).
func localityFunctionSQL(tiers []localityTier) string {
	body := "SELECT NULL::text"
	if len(tiers) > 0 {
		rows := make([]string, len(tiers))
		for i, t := range tiers {
			rows[i] = "(" + quoteLiteral(t.key) + ", " + quoteLiteral(t.value) + ")"
		}
		body = "SELECT v FROM (VALUES " + strings.Join(rows, ", ") + ") AS tiers (k, v) WHERE k = key"
	}
	return `CREATE SCHEMA IF NOT EXISTS crdb_internal;
CREATE OR REPLACE FUNCTION crdb_internal.locality_value(key text) RETURNS text
LANGUAGE sql STABLE STRICT AS ` + quoteLiteral(body) + `;`
}

// quoteLiteral quotes s as an SQL string literal (standard_conforming_strings
// is on, PostgreSQL's default, so backslashes are plain characters).
func quoteLiteral(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}

// showLocality is how a node answers SHOW LOCALITY: one row, one text column
// named locality, holding the node's locality ("" when it has none, as
// CockroachDB's docs for SHOW LOCALITY say).
func showLocality(locality string) string {
	return "SELECT " + quoteLiteral(locality) + "::text AS locality"
}

// isShowLocality reports whether query is SHOW LOCALITY, in any case, with
// any whitespace and an optional trailing semicolon.
func isShowLocality(query []byte) bool {
	if len(query) > 64 { // the common case, decided without scanning
		return false
	}
	q := strings.TrimSpace(string(query))
	q = strings.TrimSpace(strings.TrimSuffix(q, ";"))
	f := strings.Fields(q)
	return len(f) == 2 && strings.EqualFold(f[0], "show") && strings.EqualFold(f[1], "locality")
}

// rewriteShowLocality returns msg, a client's Query or Parse message, with
// SHOW LOCALITY replaced by a SELECT that PostgreSQL answers the way
// CockroachDB answers it (PostgreSQL's SHOW only reads settings); any other
// message is returned as it is.
func rewriteShowLocality(msg []byte, locality string) []byte {
	body := msg[5:]
	var head, query, tail []byte
	switch msg[0] {
	case 'Q': // query\0
		i := bytes.IndexByte(body, 0)
		if i < 0 {
			return msg
		}
		query, tail = body[:i], body[i:]
	case 'P': // name\0 query\0 int16 count, int32 OIDs
		i := bytes.IndexByte(body, 0)
		if i < 0 {
			return msg
		}
		j := bytes.IndexByte(body[i+1:], 0)
		if j < 0 {
			return msg
		}
		head, query, tail = body[:i+1], body[i+1:i+1+j], body[i+1+j:]
	default:
		return msg
	}
	if !isShowLocality(query) {
		return msg
	}
	q := showLocality(locality)
	out := make([]byte, 5, 5+len(head)+len(q)+len(tail))
	out[0] = msg[0]
	out = append(out, head...)
	out = append(out, q...)
	out = append(out, tail...)
	binary.BigEndian.PutUint32(out[1:5], uint32(len(out)-1))
	return out
}
