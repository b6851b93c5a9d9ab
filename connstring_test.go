package clusterpool

import (
	"maps"
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
