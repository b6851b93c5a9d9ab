package clustertest

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
)

func TestParseLocality(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    []localityTier
		wantErr string
	}{
		{"", nil, ""},
		{"region=us-east1", []localityTier{{"region", "us-east1"}}, ""},
		{"region=us-east1,zone=us-east1-b", []localityTier{{"region", "us-east1"}, {"zone", "us-east1-b"}}, ""},
		{"cloud=gce,region=o'hare", []localityTier{{"cloud", "gce"}, {"region", "o'hare"}}, ""},
		{"region", nil, `tier "region" is not key=value`},
		{"region=", nil, "not key=value"},
		{"=us", nil, "not key=value"},
		{"region=a=b", nil, "not key=value"},
		{"region=a,,zone=b", nil, `tier "" is not key=value`},
		{"region=a,", nil, "not key=value"},
		{"region=a,region=b", nil, `key "region" appears twice`},
		{"region=a\x00", nil, "NUL"},
	} {
		got, err := parseLocality(tc.in)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: error %v, want one containing %q", tc.in, err, tc.wantErr)
			}
			continue
		}
		if err != nil || fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%q: %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
}

func TestIsShowLocality(t *testing.T) {
	for q, want := range map[string]bool{
		"SHOW LOCALITY":          true,
		"show locality":          true,
		"  Show\n\tLocality ;  ": true,
		"SHOW LOCALITY;":         true,
		"SHOW LOCALITIES":        false,
		"SHOW LOCALITY x":        false,
		"SHOW search_path":       false,
		"SELECT 'SHOW LOCALITY'": false,
		"SHOW LOCALITY;;":        false,
		"":                       false,
		strings.Repeat(" ", 60) + "SHOW LOCALITY": false,
	} {
		if got := isShowLocality([]byte(q)); got != want {
			t.Errorf("%q: %t, want %t", q, got, want)
		}
	}
}

func TestRewriteShowLocality(t *testing.T) {
	msg := func(typ byte, parts ...[]byte) []byte {
		b := []byte{typ, 0, 0, 0, 0}
		for _, p := range parts {
			b = append(b, p...)
		}
		binary.BigEndian.PutUint32(b[1:], uint32(len(b)-1))
		return b
	}
	cstr := func(s string) []byte { return append([]byte(s), 0) }
	oids := []byte{0, 1, 0, 0, 0, 25} // one parameter, text
	const loc = "region=o'hare"
	want := "SELECT 'region=o''hare'::text AS locality"

	q := rewriteShowLocality(msg('Q', cstr("show locality")), loc)
	if !bytes.Equal(q, msg('Q', cstr(want))) {
		t.Errorf("Query rewritten to %q", q)
	}
	p := rewriteShowLocality(msg('P', cstr("stmt_1"), cstr("SHOW LOCALITY"), oids), loc)
	if !bytes.Equal(p, msg('P', cstr("stmt_1"), cstr(want), oids)) {
		t.Errorf("Parse rewritten to %q", p)
	}
	for _, m := range [][]byte{
		msg('Q', cstr("SELECT 1")),
		msg('P', cstr(""), cstr("SELECT $1"), oids),
		msg('B', cstr(""), cstr("SHOW LOCALITY")),
		msg('Q', []byte("SHOW LOCALITY")),               // no terminator
		msg('P', cstr("stmt"), []byte("SHOW LOCALITY")), // no terminator
	} {
		if got := rewriteShowLocality(m, loc); !bytes.Equal(got, m) {
			t.Errorf("%q rewritten to %q", m, got)
		}
	}
}

func TestLocalityOptions(t *testing.T) {
	ctx := testCtx(t)
	for _, tc := range []struct {
		name string
		opts Options
		want string
	}{
		{"more localities than nodes", Options{Nodes: 1, InProcess: true, Localities: []string{"region=a", "region=b"}}, "Options.Localities has 2 entries for 1 nodes"},
		{"bad tier", Options{Nodes: 2, InProcess: true, Localities: []string{"region=a", "zone"}}, `Options.Localities[1] "zone": tier "zone" is not key=value`},
	} {
		c, err := Start(ctx, tc.opts)
		if err == nil {
			c.Close()
			t.Errorf("%s: Start succeeded", tc.name)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "clustertest: ") {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
	c := New(t, Options{Nodes: 1, InProcess: true})
	if _, err := c.AddNodeWith(ctx, NodeOptions{Locality: "region"}); err == nil || !strings.Contains(err.Error(), `NodeOptions.Locality "region"`) {
		t.Errorf("AddNodeWith a bad locality: %v", err)
	}
	n, err := c.AddNodeWith(ctx, NodeOptions{Locality: "region=b"})
	if err != nil {
		t.Fatal(err)
	}
	if n.ID() != 2 || n.Locality() != "region=b" {
		t.Errorf("added node %d with locality %q, want node 2 (a refused locality takes no ID) with region=b", n.ID(), n.Locality())
	}
}

// localityOf reads what node's server says about its locality through the
// node's proxy, as a client does: SHOW LOCALITY in every query mode pgx has
// (they must agree), and crdb_internal.locality_value for each key (NULL
// as "<nil>").
func localityOf(t *testing.T, n *Node, keys ...string) string {
	t.Helper()
	ctx := testCtx(t)
	conn := connect(t, ctx, n.DSN())
	var show string
	for i, mode := range []pgx.QueryExecMode{pgx.QueryExecModeCacheStatement, pgx.QueryExecModeCacheDescribe, pgx.QueryExecModeDescribeExec, pgx.QueryExecModeExec, pgx.QueryExecModeSimpleProtocol} {
		rows, err := conn.Query(ctx, "SHOW LOCALITY", mode)
		if err != nil {
			t.Fatalf("node %d: SHOW LOCALITY (%v): %v", n.ID(), mode, err)
		}
		var got []string
		for rows.Next() {
			var s string
			if err := rows.Scan(&s); err != nil {
				t.Fatalf("node %d: SHOW LOCALITY (%v): %v", n.ID(), mode, err)
			}
			got = append(got, s)
		}
		if err := rows.Err(); err != nil {
			t.Fatalf("node %d: SHOW LOCALITY (%v): %v", n.ID(), mode, err)
		}
		if fields := rows.FieldDescriptions(); len(fields) != 1 || fields[0].Name != "locality" || len(got) != 1 {
			t.Fatalf("node %d: SHOW LOCALITY (%v) gave %d rows %q in columns %v; want one row in one column named locality", n.ID(), mode, len(got), got, fields)
		}
		if i > 0 && got[0] != show {
			t.Errorf("node %d: SHOW LOCALITY %q in mode %v, %q in the default mode", n.ID(), got[0], mode, show)
		}
		show = got[0]
	}
	out := []string{show}
	for _, key := range keys {
		var v *string
		if err := conn.QueryRow(ctx, "SELECT crdb_internal.locality_value($1)", key).Scan(&v); err != nil {
			t.Fatalf("node %d: locality_value(%q): %v", n.ID(), key, err)
		}
		if v == nil {
			out = append(out, key+":<nil>")
		} else {
			out = append(out, key+":"+*v)
		}
	}
	return strings.Join(out, " ")
}

// Each node answers SHOW LOCALITY and crdb_internal.locality_value as
// CockroachDB does on that node, gossip carries every node's locality, and
// a node added with a locality has it too.
func TestLocalities(t *testing.T) {
	c := New(t, Options{Nodes: 3, Localities: []string{"region=us-east1,zone=us-east1-b", "region=eu-west1,zone=eu-west1-a"}})
	ctx := testCtx(t)
	want := map[int]string{
		1: "region=us-east1,zone=us-east1-b region:us-east1 zone:us-east1-b rack:<nil>",
		2: "region=eu-west1,zone=eu-west1-a region:eu-west1 zone:eu-west1-a rack:<nil>",
		3: " region:<nil> zone:<nil> rack:<nil>", // no locality: an empty row, NULLs
	}
	for _, n := range c.Nodes() {
		if got := localityOf(t, n, "region", "zone", "rack"); got != want[n.ID()] {
			t.Errorf("node %d: %q, want %q", n.ID(), got, want[n.ID()])
		}
	}
	if got := c.Node(2).Locality(); got != "region=eu-west1,zone=eu-west1-a" {
		t.Errorf("Node(2).Locality() %q", got)
	}

	n4, err := c.AddNodeWith(ctx, NodeOptions{Locality: "region=ap-south1"})
	if err != nil {
		t.Fatal(err)
	}
	if got, w := localityOf(t, n4, "region", "zone"), "region=ap-south1 region:ap-south1 zone:<nil>"; got != w {
		t.Errorf("added node: %q, want %q", got, w)
	}
	if err := c.SetGossip(ctx, nil); err != nil {
		t.Fatal(err)
	}
	conn := connect(t, ctx, c.Node(3).DSN())
	rows, err := conn.Query(ctx, "SELECT node_id, locality FROM crdb_internal.gossip_nodes ORDER BY node_id")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for rows.Next() {
		var id int
		var loc string
		if err := rows.Scan(&id, &loc); err != nil {
			t.Fatal(err)
		}
		got = append(got, fmt.Sprintf("%d:%s", id, loc))
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if w := "1:region=us-east1,zone=us-east1-b 2:region=eu-west1,zone=eu-west1-a 3: 4:region=ap-south1"; strings.Join(got, " ") != w {
		t.Errorf("gossip_nodes localities %q, want %q", strings.Join(got, " "), w)
	}

	// SHOW LOCALITY inside a transaction, and a query that only mentions it.
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	var s string
	if err := tx.QueryRow(ctx, "show locality").Scan(&s); err != nil || s != "" {
		t.Errorf("SHOW LOCALITY in a transaction on node 3: %q, %v", s, err)
	}
	if err := tx.QueryRow(ctx, "SELECT 'SHOW LOCALITY'").Scan(&s); err != nil || s != "SHOW LOCALITY" {
		t.Errorf("a string literal was rewritten: %q, %v", s, err)
	}
}

// Plain PostgreSQL nodes know neither; in-process nodes answer SHOW LOCALITY
// (the proxy rewrites it) but have no locality_value; nodes of a cluster
// without localities answer SHOW LOCALITY with an empty row.
func TestLocalityModes(t *testing.T) {
	ctx := testCtx(t)
	pg := New(t, Options{Nodes: 1, Postgres: true})
	conn := connect(t, ctx, pg.Node(1).DSN())
	var s string
	if err := conn.QueryRow(ctx, "SHOW LOCALITY").Scan(&s); sqlState(err) != "42704" {
		t.Errorf("SHOW LOCALITY on a Postgres node: %q, %v; want PostgreSQL's 42704", s, err)
	}
	if err := conn.QueryRow(ctx, "SELECT crdb_internal.locality_value('region')").Scan(&s); sqlState(err) == "" {
		t.Errorf("locality_value on a Postgres node: %q, want an error", s)
	}

	fake := New(t, Options{Nodes: 1, InProcess: true, Localities: []string{"region=r1"}})
	conn = connect(t, ctx, fake.Node(1).DSN())
	if err := conn.QueryRow(ctx, "SHOW LOCALITY").Scan(&s); err != nil || s != "region=r1" {
		t.Errorf("SHOW LOCALITY on an in-process node: %q, %v", s, err)
	}

	plain := New(t, Options{Nodes: 1, InProcess: true})
	conn = connect(t, ctx, plain.Node(1).DSN())
	if err := conn.QueryRow(ctx, "SHOW LOCALITY").Scan(&s); err != nil || s != "" {
		t.Errorf("SHOW LOCALITY on a node without locality: %q, %v", s, err)
	}
}
