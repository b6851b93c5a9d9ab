package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/clusterpool/clusterpool/clustertest"
)

// The differential test: the same operations on pgxpool and on clusterpool
// against one real server, with equal results and equal errors (type,
// SQLSTATE, message) except for the differences listed in diffAllowed,
// which the README's "Differences from pgxpool" documents.

// diffDB is what the operations use: methods *pgxpool.Pool and *Pool share.
type diffDB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
	CopyFrom(ctx context.Context, tableName pgx.Identifier, columnNames []string, rowSrc pgx.CopyFromSource) (int64, error)
	Begin(ctx context.Context) (pgx.Tx, error)
	BeginTx(ctx context.Context, txOptions pgx.TxOptions) (pgx.Tx, error)
	Ping(ctx context.Context) error
	Close()
}

var (
	_ diffDB = (*pgxpool.Pool)(nil)
	_ diffDB = (*Pool)(nil)
)

// diffEvent is one observable step of an operation: a value, an error, or
// both.
type diffEvent struct {
	step  string
	value string
	err   error
}

// diffErr is how two errors are compared: type, SQLSTATE, message.
func diffErr(err error) string {
	if err == nil {
		return "<nil>"
	}
	code := ""
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		code = pe.Code
	}
	return fmt.Sprintf("%T [%s] %s", err, code, err.Error())
}

func (e diffEvent) String() string {
	return fmt.Sprintf("%s: %s / %s", e.step, e.value, diffErr(e.err))
}

// diffRecord collects an operation's events.
type diffRecord struct{ events []diffEvent }

func (r *diffRecord) val(step string, v any) {
	r.events = append(r.events, diffEvent{step: step, value: fmt.Sprint(v)})
}
func (r *diffRecord) err(step string, err error) {
	r.events = append(r.events, diffEvent{step: step, err: err})
}

// A difference is a documented way clusterpool differs from pgxpool. Its
// normalizer turns each side's events into what they would be without the
// difference; an operation that names it is compared after normalizing.
type difference struct {
	// readme is how the README's "Differences from pgxpool" names it.
	readme string
	// normalize rewrites the events of one side (ours is true for
	// clusterpool's) and reports whether it found the difference there.
	normalize func(ours bool, events []diffEvent) ([]diffEvent, bool)
}

// The differences allowed, by name: this is the whole list.
const (
	diffTxType        = "txType"
	diffRetryError    = "retryError"
	diffQueryFirstRow = "queryReadsFirstRow"
)

var diffAllowed = map[string]difference{
	// Begin returns the pool's own pgx.Tx, not a *pgxpool.Tx.
	diffTxType: {
		readme: "`tx.(*pgxpool.Tx)` fails",
		normalize: func(ours bool, events []diffEvent) ([]diffEvent, bool) {
			found := false
			for i, e := range events {
				if ours && e.step == "tx type" && e.value == "*clusterpool.poolTx" {
					events[i].value, found = "*pgxpool.Tx", true
				}
			}
			return events, found || !ours
		},
	},
	// An error that retries did not hide is a *RetryError wrapping the last
	// attempt's error, which reads "clusterpool: gave up after N attempts"
	// (and "on nodes [...]" when nodes were reached) before that error.
	diffRetryError: {
		readme: "`*RetryError`",
		normalize: func(ours bool, events []diffEvent) ([]diffEvent, bool) {
			found := false
			for i, e := range events {
				re, ok := e.err.(*RetryError)
				if !ours || !ok || re.Attempts < 2 {
					continue
				}
				want := fmt.Sprintf("clusterpool: gave up after %d attempts", re.Attempts)
				if len(re.Nodes) > 0 {
					want += fmt.Sprintf(" on nodes %v", re.Nodes)
				}
				if re.Error() == want+": "+re.Err.Error() {
					events[i].err, found = re.Err, true
				}
			}
			return events, found || !ours
		},
	},
	// Query reads the first row before it returns: an error that comes
	// with it is returned by Query (and Rows.Err), not only by Rows.Err.
	diffQueryFirstRow: {
		readme: "`Query` reads the first row before returning",
		normalize: func(ours bool, events []diffEvent) ([]diffEvent, bool) {
			found := false
			for i, e := range events {
				if ours && e.step == "Query" && e.err != nil {
					j := slices.IndexFunc(events, func(x diffEvent) bool { return x.step == "rows.Err" })
					if j > i && diffErr(events[j].err) == diffErr(e.err) {
						events[i].err, found = nil, true
					}
				}
			}
			return events, found || !ours
		},
	},
}

// diffOp is one row of the table.
type diffOp struct {
	name  string
	allow []string // names in diffAllowed
	// pool says which pools the operation gets: "" the shared ones on the
	// server, made by New; "fresh" new ones on the server, the clusterpool
	// wrapping the pgxpool config; "dead" new ones made by New on an
	// address nobody listens on, and "dead wrapped" such with the
	// clusterpool wrapping the pgxpool config.
	pool string
	run  func(ctx context.Context, db diffDB, r *diffRecord)
}

func diffOps() []diffOp {
	const byKey = "SELECT v FROM diff_kv WHERE k = $1"
	scanRows := func(r *diffRecord, rows pgx.Rows) {
		n := 0
		for rows.Next() {
			v, err := rows.Values()
			r.val(fmt.Sprintf("row %d", n), v)
			if err != nil {
				r.err("Values", err)
			}
			n++
		}
		r.err("rows.Err", rows.Err())
		rows.Close()
		r.val("CommandTag", rows.CommandTag())
	}
	canceled := func(ctx context.Context) context.Context {
		ctx, cancel := context.WithCancel(ctx)
		cancel()
		return ctx
	}
	return []diffOp{
		{name: "Exec insert", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			tag, err := db.Exec(ctx, "INSERT INTO diff_kv VALUES (4, 'four')")
			r.val("tag", tag)
			r.err("Exec", err)
		}},
		{name: "Exec with arguments", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			tag, err := db.Exec(ctx, "UPDATE diff_kv SET v = $2 WHERE k >= $1", 2, "big")
			r.val("tag", tag)
			r.err("Exec", err)
		}},
		{name: "Query", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			rows, err := db.Query(ctx, "SELECT k, v FROM diff_kv ORDER BY k")
			r.err("Query", err)
			scanRows(r, rows)
		}},
		{name: "Query error with the first row", allow: []string{diffQueryFirstRow}, run: func(ctx context.Context, db diffDB, r *diffRecord) {
			rows, err := db.Query(ctx, "SELECT 1 / (k - 1) FROM diff_kv ORDER BY k")
			r.err("Query", err)
			scanRows(r, rows)
		}},
		{name: "Query error after the first row", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			rows, err := db.Query(ctx, "SELECT 1 / (k - 2) FROM diff_kv ORDER BY k")
			r.err("Query", err)
			scanRows(r, rows)
		}},
		{name: "Query syntax error", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			rows, err := db.Query(ctx, "SELEC k FROM diff_kv")
			r.err("Query", err)
			scanRows(r, rows)
		}},
		{name: "QueryRow", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			var v string
			err := db.QueryRow(ctx, byKey, 2).Scan(&v)
			r.val("v", v)
			r.err("Scan", err)
		}},
		{name: "QueryRow ErrNoRows", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			var v string
			err := db.QueryRow(ctx, byKey, 99).Scan(&v)
			r.val("ErrNoRows", errors.Is(err, pgx.ErrNoRows))
			r.err("Scan", err)
		}},
		{name: "QueryRow context canceled before Scan", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			// A helper's defer cancel() ends the context between the two.
			for k := 1; k <= 3; k++ {
				cctx, cancel := context.WithCancel(ctx)
				row := db.QueryRow(cctx, byKey, k)
				cancel()
				var v string
				err := row.Scan(&v)
				r.val("v", v)
				r.err("Scan", err)
			}
		}},
		{name: "QueryRow arguments changed before Scan", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			args := []any{1}
			row := db.QueryRow(ctx, byKey, args...)
			args[0] = 3
			var v string
			err := row.Scan(&v)
			r.val("v", v)
			r.err("Scan", err)
		}},
		{name: "QueryRow scan error", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			var v int
			err := db.QueryRow(ctx, byKey, 1).Scan(&v)
			r.err("Scan", err)
		}},
		{name: "CopyFrom", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			n, err := db.CopyFrom(ctx, pgx.Identifier{"diff_kv"}, []string{"k", "v"},
				pgx.CopyFromRows([][]any{{10, "ten"}, {11, "eleven"}, {12, "twelve"}}))
			r.val("copied", n)
			r.err("CopyFrom", err)
		}},
		{name: "CopyFrom unique violation", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			n, err := db.CopyFrom(ctx, pgx.Identifier{"diff_kv"}, []string{"k", "v"},
				pgx.CopyFromRows([][]any{{10, "ten"}, {1, "one again"}}))
			r.val("copied", n)
			r.err("CopyFrom", err)
		}},
		{name: "SendBatch", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			b := &pgx.Batch{}
			b.Queue("INSERT INTO diff_kv VALUES (5, 'five')")
			b.Queue(byKey, 1)
			b.Queue("SELECT k FROM diff_kv ORDER BY k")
			b.Queue("SELECT 1 / 0")
			br := db.SendBatch(ctx, b)
			tag, err := br.Exec()
			r.val("tag", tag)
			r.err("Exec", err)
			var v string
			err = br.QueryRow().Scan(&v)
			r.val("v", v)
			r.err("QueryRow", err)
			rows, err := br.Query()
			r.err("Query", err)
			scanRows(r, rows)
			_, err = br.Exec()
			r.err("Exec 1/0", err)
			r.err("Close", br.Close())
		}},
		{name: "SendBatch error in the first result", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			b := &pgx.Batch{}
			b.Queue("INSERT INTO diff_kv VALUES (1, 'dup')")
			b.Queue("INSERT INTO diff_kv VALUES (6, 'six')")
			br := db.SendBatch(ctx, b)
			_, err := br.Exec()
			r.err("Exec", err)
			_, err = br.Exec()
			r.err("Exec", err)
			r.err("Close", br.Close())
		}},
		{name: "Begin type", allow: []string{diffTxType}, run: func(ctx context.Context, db diffDB, r *diffRecord) {
			tx, err := db.Begin(ctx)
			r.err("Begin", err)
			r.val("tx type", fmt.Sprintf("%T", tx))
			r.err("Rollback", tx.Rollback(ctx))
		}},
		{name: "Begin Commit", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			tx, err := db.Begin(ctx)
			r.err("Begin", err)
			tag, err := tx.Exec(ctx, "INSERT INTO diff_kv VALUES (7, 'seven')")
			r.val("tag", tag)
			r.err("Exec", err)
			r.err("Commit", tx.Commit(ctx))
			r.err("Commit again", tx.Commit(ctx))
			r.err("Rollback after Commit", tx.Rollback(ctx))
		}},
		{name: "Begin Rollback", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			tx, err := db.Begin(ctx)
			r.err("Begin", err)
			_, err = tx.Exec(ctx, "INSERT INTO diff_kv VALUES (8, 'eight')")
			r.err("Exec", err)
			r.err("Rollback", tx.Rollback(ctx))
		}},
		{name: "BeginTx read only", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			tx, err := db.BeginTx(ctx, pgx.TxOptions{AccessMode: pgx.ReadOnly})
			r.err("BeginTx", err)
			_, err = tx.Exec(ctx, "INSERT INTO diff_kv VALUES (8, 'eight')")
			r.err("Exec", err)
			r.err("Commit", tx.Commit(ctx))
		}},
		{name: "Begin statement error aborts", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			tx, err := db.Begin(ctx)
			r.err("Begin", err)
			_, err = tx.Exec(ctx, "INSERT INTO diff_kv VALUES (1, 'dup')")
			r.err("Exec", err)
			_, err = tx.Exec(ctx, "SELECT 1")
			r.err("Exec after error", err)
			r.err("Commit", tx.Commit(ctx))
		}},
		{name: "pgx.BeginFunc", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
				_, err := tx.Exec(ctx, "INSERT INTO diff_kv VALUES (9, 'nine')")
				return err
			})
			r.err("BeginFunc", err)
		}},
		{name: "pgx.BeginFunc function error", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			boom := errors.New("boom")
			err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
				if _, err := tx.Exec(ctx, "INSERT INTO diff_kv VALUES (9, 'nine')"); err != nil {
					return err
				}
				return boom
			})
			r.val("is boom", errors.Is(err, boom))
			r.err("BeginFunc", err)
		}},
		{name: "pgx.BeginFunc statement error", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
				_, err := tx.Exec(ctx, "INSERT INTO diff_kv VALUES (1, 'dup')")
				return err
			})
			r.err("BeginFunc", err)
		}},
		{name: "syntax error", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			_, err := db.Exec(ctx, "SELEC 1")
			r.err("Exec", err)
			var v int
			r.err("QueryRow", db.QueryRow(ctx, "SELEC 1").Scan(&v))
		}},
		{name: "unique violation", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			_, err := db.Exec(ctx, "INSERT INTO diff_kv VALUES ($1, $2)", 1, "dup")
			r.err("Exec", err)
			var k int
			r.err("QueryRow", db.QueryRow(ctx, "INSERT INTO diff_kv VALUES (2, 'dup') RETURNING k").Scan(&k))
		}},
		{name: "canceled context", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			ctx = canceled(ctx)
			_, err := db.Exec(ctx, "SELECT 1")
			r.err("Exec", err)
			var v int
			r.err("QueryRow", db.QueryRow(ctx, "SELECT 1").Scan(&v))
			rows, err := db.Query(ctx, "SELECT 1")
			r.err("Query", err)
			scanRows(r, rows)
			_, err = db.Begin(ctx)
			r.err("Begin", err)
			r.err("BeginFunc", pgx.BeginFunc(ctx, db, func(pgx.Tx) error { return nil }))
			br := db.SendBatch(ctx, &pgx.Batch{QueuedQueries: []*pgx.QueuedQuery{{SQL: "SELECT 1"}}})
			_, err = br.Exec()
			r.err("batch Exec", err)
			r.err("batch Close", br.Close())
			_, err = db.CopyFrom(ctx, pgx.Identifier{"diff_kv"}, []string{"k", "v"}, pgx.CopyFromRows([][]any{{20, "x"}}))
			r.err("CopyFrom", err)
			r.err("Ping", db.Ping(ctx))
		}},
		{name: "closed pool", pool: "fresh", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			r.err("Ping before Close", db.Ping(ctx))
			db.Close()
			_, err := db.Exec(ctx, "SELECT 1")
			r.err("Exec", err)
			var v int
			r.err("QueryRow", db.QueryRow(ctx, "SELECT 1").Scan(&v))
			_, err = db.Query(ctx, "SELECT 1")
			r.err("Query", err)
			_, err = db.Begin(ctx)
			r.err("Begin", err)
			r.err("Ping", db.Ping(ctx))
		}},
		{name: "dead address Ping", pool: "dead", run: func(ctx context.Context, db diffDB, r *diffRecord) {
			err := db.Ping(ctx)
			var ce *pgconn.ConnectError
			r.val("ConnectError", errors.As(err, &ce))
			r.err("Ping", err)
		}},
		{name: "dead address Exec", pool: "dead", allow: []string{diffRetryError}, run: deadExec},
		{name: "dead address Exec, wrapped pgxpool config", pool: "dead wrapped", allow: []string{diffRetryError}, run: deadExec},
	}
}

func deadExec(ctx context.Context, db diffDB, r *diffRecord) {
	_, err := db.Exec(ctx, "SELECT 1")
	var ce *pgconn.ConnectError
	r.val("ConnectError", errors.As(err, &ce))
	r.err("Exec", err)
}

// TestDiff runs diffOps on pgxpool and on clusterpool, on plain PostgreSQL
// (one address, straight to the server) and through a CockroachDB-like
// node proxy, and compares what each operation observed.
func TestDiff(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 1})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "postgres://postgres@" + ln.Addr().String() + "/postgres" // sslmode=prefer, pgx's default
	ln.Close()
	node := c.Nodes()[0]
	ctx := testCtx(t)
	if err := node.ExecDirect(ctx, "CREATE TABLE diff_kv (k int PRIMARY KEY, v text NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	for _, target := range []struct{ name, dsn string }{
		{"postgres", node.PostgresDSN()},
		{"cockroach-like proxy", node.DSN()},
	} {
		t.Run(target.name, func(t *testing.T) {
			pools := diffPools(t, target.dsn, false)
			for _, op := range diffOps() {
				t.Run(op.name, func(t *testing.T) {
					var got [2][]diffEvent
					for i, name := range []string{"pgxpool", "clusterpool"} {
						if _, err := pools[0].Exec(ctx, "TRUNCATE diff_kv; INSERT INTO diff_kv VALUES (1, 'one'), (2, 'two'), (3, 'three')"); err != nil {
							t.Fatal(err)
						}
						db := pools[i]
						switch op.pool {
						case "fresh":
							db = diffPools(t, target.dsn, true)[i]
						case "dead":
							db = diffPools(t, dead, false)[i]
						case "dead wrapped":
							db = diffPools(t, dead, true)[i]
						}
						r := &diffRecord{}
						opCtx, cancel := context.WithTimeout(ctx, condTimeout)
						op.run(opCtx, db, r)
						cancel()
						var state string
						if err := pools[0].QueryRow(ctx, "SELECT COALESCE(string_agg(k || '=' || v, ',' ORDER BY k), '') FROM diff_kv").Scan(&state); err != nil {
							t.Fatalf("%s: reading the table after the operation: %v", name, err)
						}
						r.val("table after", state)
						got[i] = r.events
					}
					compareDiff(t, op, got[0], got[1])
				})
			}
		})
	}
}

// diffPools returns a pgxpool and a clusterpool on dsn, closed when the
// test ends. The clusterpool is made by New, or, when wrapped, from the
// pgxpool config as code migrating from pgxpool.NewWithConfig makes it.
func diffPools(t *testing.T, dsn string, wrapped bool) [2]diffDB {
	t.Helper()
	ctx := testCtx(t)
	pc, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	pp, err := pgxpool.NewWithConfig(ctx, pc.Copy())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pp.Close)
	var cp *Pool
	if wrapped {
		cp, err = NewWithConfig(ctx, &Config{Config: pc})
	} else {
		cp, err = New(ctx, dsn)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cp.Close)
	return [2]diffDB{pp, cp}
}

// compareDiff fails the test unless clusterpool's events equal pgxpool's
// once the differences op allows are normalized away, and each of those
// differences showed.
func compareDiff(t *testing.T, op diffOp, ref, ours []diffEvent) {
	t.Helper()
	rawOurs := slices.Clone(ours)
	for _, name := range op.allow {
		d, ok := diffAllowed[name]
		if !ok {
			t.Fatalf("operation %q allows %q, which diffAllowed does not list", op.name, name)
		}
		ref, _ = d.normalize(false, ref)
		var found bool
		ours, found = d.normalize(true, ours)
		if !found {
			t.Errorf("allowed difference %q did not show: clusterpool matched pgxpool there; remove it from the operation (and the README if no operation needs it)", name)
		}
	}
	if len(ref) != len(ours) {
		t.Fatalf("pgxpool observed %d steps, clusterpool %d:\npgxpool:\n%s\nclusterpool:\n%s", len(ref), len(ours), diffLines(ref), diffLines(rawOurs))
	}
	for i := range ref {
		if ref[i].step != ours[i].step || ref[i].value != ours[i].value || diffErr(ref[i].err) != diffErr(ours[i].err) {
			t.Errorf("step %d differs:\n pgxpool:     %v\n clusterpool: %v (before normalizing: %v)", i, ref[i], ours[i], rawOurs[i])
		}
	}
}

func diffLines(events []diffEvent) string {
	var b strings.Builder
	for _, e := range events {
		fmt.Fprintf(&b, "\t%v\n", e)
	}
	return b.String()
}

// Every allowed difference is documented in the README's "Differences from
// pgxpool" section, and every operation's allowances are listed.
func TestDiffDocumented(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(readme), "\n## Differences from pgxpool\n")
	if !ok {
		t.Fatal(`README.md has no "## Differences from pgxpool" section`)
	}
	section, _, _ = strings.Cut(section, "\n## ")
	for name, d := range diffAllowed {
		if d.readme == "" {
			// A defect being fixed elsewhere, not a documented difference.
			if !strings.Contains(name, "removed when") {
				t.Errorf("difference %q has no README text and is not marked as going away", name)
			}
			continue
		}
		if !strings.Contains(section, d.readme) {
			t.Errorf("difference %q: the README's section does not say %q", name, d.readme)
		}
	}
	for _, op := range diffOps() {
		for _, name := range op.allow {
			if _, ok := diffAllowed[name]; !ok {
				t.Errorf("operation %q allows %q, which diffAllowed does not list", op.name, name)
			}
		}
	}
}
