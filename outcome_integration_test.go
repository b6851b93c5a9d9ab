package clusterpool

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/clusterpool/clusterpool/clustertest"
)

// TestLostCommitIsNotRetried kills the node while it is committing a write,
// so the connection breaks after the statement (or COMMIT) was sent. The
// caller must see either success with the write applied once, or an error;
// an error that does not match ErrOutcomeUnknown must mean nothing was
// applied. pgx reports such a break as "conn closed" (marked SafeToRetry)
// for the simple protocol, which COMMIT and an Exec without arguments use:
// the soak test found the pool re-running those on the other node.
func TestLostCommitIsNotRetried(t *testing.T) {
	c := clustertest.New(t, clustertest.Options{Nodes: 2, Seed: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, n := range c.Nodes() {
		// A deferred trigger makes every COMMIT that inserted into r take
		// a second on the server, long enough to kill the node under it.
		if err := n.ExecDirect(ctx, `
			CREATE TABLE r (op int NOT NULL);
			CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$;
			CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON r DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();`); err != nil {
			t.Fatal(err)
		}
	}
	// One connection: the statement runs on the connection whose node the
	// test kills.
	pool, err := New(ctx, c.DSN()+"&pool_max_conns=1&cluster_probe_interval=200ms")
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()

	applied := func(op int) int {
		total := 0
		for _, n := range c.Nodes() {
			conn, err := pgx.Connect(ctx, n.PostgresDSN())
			if err != nil {
				t.Fatal(err)
			}
			var k int
			err = conn.QueryRow(ctx, "SELECT count(*) FROM r WHERE op = $1", op).Scan(&k)
			conn.Close(ctx)
			if err != nil {
				t.Fatal(err)
			}
			total += k
		}
		return total
	}

	cases := []struct {
		name string
		run  func(op int, kill func(*pgx.Conn)) error
	}{
		{"BeginFunc", func(op int, kill func(*pgx.Conn)) error {
			return pool.BeginFunc(ctx, func(tx pgx.Tx) error {
				kill(tx.Conn())
				_, err := tx.Exec(ctx, "INSERT INTO r (op) VALUES ($1)", op)
				return err
			})
		}},
		{"ExecWithoutArguments", func(op int, kill func(*pgx.Conn)) error {
			conn, err := pool.Acquire(ctx)
			if err != nil {
				return err
			}
			kill(conn.Conn())
			conn.Release()
			_, err = pool.Exec(ctx, "INSERT INTO r (op) VALUES ("+string(rune('0'+op))+")")
			return err
		}},
		{"ExecWithArguments", func(op int, kill func(*pgx.Conn)) error {
			conn, err := pool.Acquire(ctx)
			if err != nil {
				return err
			}
			kill(conn.Conn())
			conn.Release()
			_, err = pool.Exec(ctx, "INSERT INTO r (op) VALUES ($1)", op)
			return err
		}},
	}
	for i, tc := range cases {
		op := i + 1
		t.Run(tc.name, func(t *testing.T) {
			var killed *clustertest.Node
			done := make(chan struct{})
			kill := func(conn *pgx.Conn) {
				if killed != nil {
					return // a retry: the node is already being killed
				}
				id := DecodeProcessID(conn.PgConn().PID())
				killed = c.Node(int(id))
				go func() {
					defer close(done)
					time.Sleep(300 * time.Millisecond) // the COMMIT is in its 1 s trigger
					killed.Kill()
				}()
			}
			callErr := tc.run(op, kill)
			<-done
			// The killed node's server finishes its commit on its own.
			time.Sleep(1500 * time.Millisecond)
			n := applied(op)
			t.Logf("caller saw %v; applied %d times", callErr, n)
			switch {
			case n > 1:
				t.Errorf("applied %d times", n)
			case callErr == nil && n != 1:
				t.Errorf("success reported, applied %d times", n)
			case callErr != nil && n == 1 && !errors.Is(callErr, ErrOutcomeUnknown):
				t.Errorf("error %v does not match ErrOutcomeUnknown, but the write was applied", callErr)
			}
			if err := killed.Restart(ctx); err != nil {
				t.Fatal(err)
			}
		})
	}
}
