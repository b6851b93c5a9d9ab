package clusterpool

import (
	"context"
	"errors"
	"net"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Behind one address, the redial copies of the address are added only once
// a connect has reached a node (or a retry asks to avoid nodes), and no
// longer after a dial fails: copies of an address that does not answer
// would repeat its error.
func TestInstallRedialOnlyOnceReached(t *testing.T) {
	parse := func() *pgx.ConnConfig {
		cc, err := pgx.ParseConfig("postgres://u@lb.example:26257/db?sslmode=disable")
		if err != nil {
			t.Fatal(err)
		}
		cc.DialFunc = func(context.Context, string, string) (net.Conn, error) {
			return nil, errors.New("refused")
		}
		return cc
	}
	pl := &placement{}
	cc := parse()
	check := pl.installRedial(cc, nil)
	if len(cc.Fallbacks) != 0 {
		t.Fatalf("no connect reached a node yet: %d fallbacks added, want none", len(cc.Fallbacks))
	}
	if err := check(context.Background(), nil); err != nil || !pl.reached.Load() {
		t.Fatalf("a connection that reached a server: check %v, reached %v", err, pl.reached.Load())
	}

	cc = parse()
	pl.installRedial(cc, nil)
	if len(cc.Fallbacks) != maxRedials {
		t.Fatalf("after a connect reached a node: %d fallbacks, want %d", len(cc.Fallbacks), maxRedials)
	}
	if _, err := cc.DialFunc(context.Background(), "tcp", "lb.example:26257"); err == nil || pl.reached.Load() {
		t.Fatalf("a failed dial (%v) left reached %v", err, pl.reached.Load())
	}
	cc = parse()
	pl.installRedial(cc, nil)
	if len(cc.Fallbacks) != 0 {
		t.Fatalf("after a failed dial: %d fallbacks added, want none", len(cc.Fallbacks))
	}

	cc = parse()
	pl.installRedial(cc, []NodeID{1})
	if len(cc.Fallbacks) != maxRedials {
		t.Fatalf("a retry avoiding node 1: %d fallbacks, want %d", len(cc.Fallbacks), maxRedials)
	}
}

// A connect that fails reads as pgxpool's: one line per attempt pgconn
// makes (sslmode=prefer makes two per host), none repeated for the pool's
// own redial copies of the address. With several hosts the pool may try
// them in another order.
func TestConnectErrorLikePgxpool(t *testing.T) {
	ctx := testCtx(t)
	for _, dsn := range []string{
		"postgres://u@127.0.0.1:1/db?sslmode=disable",
		"postgres://u@127.0.0.1:1/db?sslmode=prefer",
		"postgres://u@127.0.0.1:1,127.0.0.1:2/db?sslmode=prefer",
	} {
		ref, err := pgxpool.New(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		want := ref.Ping(ctx)
		ref.Close()
		p, err := New(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 2 {
			got := p.Ping(ctx)
			if got == nil || want == nil {
				t.Fatalf("%s: Ping %d: clusterpool %v, pgxpool %v; want both to fail", dsn, i, got, want)
			}
			lines := func(err error) []string { return slices.Sorted(slices.Values(strings.Split(err.Error(), "\n"))) }
			if !slices.Equal(lines(got), lines(want)) {
				t.Errorf("%s: Ping %d:\n%v\nwant as pgxpool:\n%v", dsn, i, got, want)
			}
		}
		p.Close()
	}
}
