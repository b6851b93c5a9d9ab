package clusterpool

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// FuzzExtractClusterParams checks, for any connection string pgx accepts,
// that removing the cluster_* parameters leaves exactly what pgx would have
// parsed without them: same host, user, password, database and run-time
// parameters, minus the cluster_* ones.
func FuzzExtractClusterParams(f *testing.F) {
	for _, s := range []string{
		"host=h user=u cluster_max_retries=7 dbname=db",
		`password='a b\'c cluster_x=9' cluster_node_identity='none' host=h`,
		"host = h cluster_balance_interval = 3s  user=u application_name=a\\ b",
		"postgres://u:pw@h:5432/db?sslmode=disable&cluster_max_retries=3&application_name=x",
		"postgresql://u@h1:1,h2:2/db?cluster_connect_rate=2&search_path=a%2Cb",
		"postgres://u@h/db?cluster%5Fprobe_interval=90s#frag",
		"postgres://u:pa?ss@h/db?cluster_max_retries=2&sslmode=disable",
		"postgres://u:p%40ss@h/db?cluster_max_retries=+2",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, conn string) {
		rest, params, err := extractClusterParams(conn)
		if err != nil {
			return
		}
		want, err := pgconn.ParseConfig(conn)
		if err != nil {
			return
		}
		got, err := pgconn.ParseConfig(rest)
		if err != nil {
			t.Fatalf("pgx accepts %q but not its remainder %q: %v", conn, rest, err)
		}
		for k := range want.RuntimeParams {
			if isClusterParam(k) {
				delete(want.RuntimeParams, k)
			}
		}
		if got.Host != want.Host || got.Port != want.Port || got.User != want.User ||
			got.Password != want.Password || got.Database != want.Database ||
			!maps.Equal(got.RuntimeParams, want.RuntimeParams) || len(got.Fallbacks) != len(want.Fallbacks) {
			t.Fatalf("remainder %q of %q parses differently:\n got %+v\nwant %+v", rest, conn, got, want)
		}
		for _, p := range params {
			if !isClusterParam(p.key) {
				t.Fatalf("extracted a parameter that is not ours: %q", p.key)
			}
		}
	})
}

// A parse error that is not pgx's *pgconn.ParseConfigError itself (wrapped,
// or another error) keeps its chain for errors.Is and errors.As behind the
// masked message; it used to be flattened to a string.
func TestRedactParseErrorWraps(t *testing.T) {
	const secret = "s3cr3tpw"
	conn := "postgres://u:" + secret + "@h/db"
	pce := pgconn.NewParseConfigError(conn, "invalid port", nil)
	for _, tt := range []struct {
		name   string
		err    error
		target error
	}{
		{"a plain error", fmt.Errorf("reading service file near %s: %w", secret, fs.ErrNotExist), fs.ErrNotExist},
		{"a wrapped ParseConfigError", fmt.Errorf("pool: %w", pce), pce},
	} {
		err := redactParseError(conn, tt.err)
		if !errors.Is(err, tt.target) {
			t.Errorf("%s: errors.Is(%v, %v) = false", tt.name, err, tt.target)
		}
		if msg := err.Error(); !strings.HasPrefix(msg, "clusterpool: ") || strings.Contains(msg, secret) {
			t.Errorf("%s: message %q", tt.name, msg)
		}
	}
	var got *pgconn.ParseConfigError
	if err := redactParseError(conn, fmt.Errorf("pool: %w", pce)); !errors.As(err, &got) {
		t.Errorf("errors.As finds no *pgconn.ParseConfigError in %v", err)
	}
}
