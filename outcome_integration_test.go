package clusterpool

import (
	"context"
	"errors"
	"fmt"
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
	t.Parallel()
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

	// Each node's server is read straight, past the proxy, on connections
	// of the test's own.
	direct := make(map[int]*pgx.Conn)
	for _, n := range c.Nodes() {
		conn, err := pgx.Connect(ctx, n.PostgresDSN())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
		direct[n.ID()] = conn
	}
	// otherBackends counts the client backends on node id's server other
	// than the test's own that are in state (any state if "") and, if
	// waitEvent is set, waiting on it.
	otherBackends := func(id int, state, waitEvent string) (int, error) {
		var k int
		err := direct[id].QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
			AND ($1 = '' OR state = $1) AND ($2 = '' OR wait_event = $2)`, state, waitEvent).Scan(&k)
		return k, err
	}
	// applied waits until no statement runs on any node's server (the
	// killed node's finishes its commit on its own, or is cancelled) and
	// op's row count across the nodes has read the same five polls in a
	// row, and returns that count: a commit that lands late still counts.
	applied := func(op int) int {
		t.Helper()
		last, same := -1, 0
		waitCond(t, func() string {
			total := 0
			for id, conn := range direct {
				if busy, err := otherBackends(id, "active", ""); err != nil || busy > 0 {
					same = 0
					return fmt.Sprintf("node %d: %d statements still running (%v)", id, busy, err)
				}
				var k int
				if err := conn.QueryRow(ctx, "SELECT count(*) FROM r WHERE op = $1", op).Scan(&k); err != nil {
					return fmt.Sprintf("node %d: count rows: %v", id, err)
				}
				total += k
			}
			if total != last {
				last, same = total, 0
			}
			if same++; same < 5 {
				return fmt.Sprintf("row count %d read %d times in a row, want 5", total, same)
			}
			return ""
		})
		return last
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
					defer killed.Kill()
					// Kill once the server is in the commit's 1 s trigger
					// (its pg_sleep), so the COMMIT was sent and is
					// unanswered: the case under test, not luck.
					deadline := time.Now().Add(condTimeout)
					for {
						k, err := otherBackends(killed.ID(), "active", "PgSleep")
						if err != nil {
							t.Errorf("node %d: pg_stat_activity: %v", killed.ID(), err)
							return
						}
						if k > 0 {
							return
						}
						if time.Now().After(deadline) {
							t.Errorf("node %d: no commit in its trigger after %v", killed.ID(), condTimeout)
							return
						}
						time.Sleep(5 * time.Millisecond)
					}
				}()
			}
			callErr := tc.run(op, kill)
			<-done
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
