package clustertest_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log"
	"strings"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// A client learns which node it reached from its BackendKeyData, and a
// drained node refuses new connections with 57P01. (In a test, use
// clustertest.New(t, opts), which also closes the cluster. InProcess nodes
// let this example run without PostgreSQL.)
func Example() {
	ctx := context.Background()
	c, err := clustertest.Start(ctx, clustertest.Options{Nodes: 3, InProcess: true, Balancing: clustertest.RoundRobin})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	conn, err := pgx.Connect(ctx, c.DSN()) // through the load balancer
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close(ctx)
	fmt.Println("connected to node", conn.PgConn().PID()>>20)

	node := c.Node(2)
	held, err := pgx.Connect(ctx, node.DSN())
	if err != nil {
		log.Fatal(err)
	}
	// The drain waits up to a minute for held to close.
	drained := make(chan error)
	go func() { drained <- node.Drain(ctx, time.Minute) }()
	for node.State() != clustertest.Draining {
		time.Sleep(time.Millisecond)
	}
	_, err = pgx.Connect(ctx, node.DSN())
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		fmt.Println(pgErr.Code, pgErr.Message)
	}
	held.Close(ctx)
	if err := <-drained; err != nil {
		log.Fatal(err)
	}
	fmt.Println("node 2 is", node.State())
	// Output:
	// connected to node 1
	// 57P01 server is not accepting clients, try another node
	// node 2 is Down
}

// With Options.TLS the nodes require TLS and the cluster's connection strings
// verify their certificate against the CA the cluster made up; a client
// without TLS is refused.
func ExampleOptions_tls() {
	ctx := context.Background()
	c, err := clustertest.Start(ctx, clustertest.Options{Nodes: 2, InProcess: true, TLS: true})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	fmt.Println(strings.Contains(c.DSN(), "sslmode=verify-full&sslrootcert="))
	conn, err := pgx.Connect(ctx, c.DSN())
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close(ctx)
	_, encrypted := conn.PgConn().Conn().(*tls.Conn)
	fmt.Println("encrypted:", encrypted)

	_, err = pgx.Connect(ctx, "postgres://postgres@"+c.Node(1).Addr()+"/postgres?sslmode=disable")
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		fmt.Println(pgErr.Code, pgErr.Message)
	}
	// Output:
	// true
	// encrypted: true
	// 28000 node is running secure mode, SSL connection required
}
