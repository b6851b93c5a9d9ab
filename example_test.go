package clusterpool_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clustertest"
)

// The one-line swap from pgxpool: the rest of the code is unchanged. The
// cluster here is clustertest's in-process one, so the example runs anywhere;
// in production connString names the cluster's load balancer.
func Example() {
	ctx := context.Background()
	cluster, err := clustertest.Start(ctx, clustertest.Options{Nodes: 3, InProcess: true, Balancing: clustertest.RoundRobin})
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Close()
	connString := cluster.DSN() + "&pool_max_conns=6&pool_min_conns=6"

	// Before: pool, err := pgxpool.New(ctx, connString)
	pool, err := clusterpool.New(ctx, connString)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	var n int
	if err := pool.QueryRow(ctx, "SELECT 1").Scan(&n); err != nil {
		log.Fatal(err)
	}
	fmt.Println("SELECT 1 returned", n)

	// MinConns are opened in the background; wait for them, then see where
	// they went.
	nodes, conns := waitForConns(pool, 6)
	fmt.Printf("%d connections on %d nodes\n", conns, nodes)
	// Output:
	// SELECT 1 returned 1
	// 6 connections on 3 nodes
}

// waitForConns polls NodeStats until the pool's connections add up to want.
func waitForConns(pool *clusterpool.Pool, want int32) (nodes int, conns int32) {
	deadline := time.Now().Add(20 * time.Second)
	for {
		nodes, conns = 0, 0
		for _, s := range pool.NodeStats() {
			if s.TotalConns > 0 {
				nodes++
				conns += s.TotalConns
			}
		}
		if conns == want || time.Now().After(deadline) {
			return nodes, conns
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func ExamplePool_NodeStats() {
	ctx := context.Background()
	cluster, err := clustertest.Start(ctx, clustertest.Options{Nodes: 2, FirstID: 7, InProcess: true})
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Close()

	pool, err := clusterpool.New(ctx, cluster.Node(8).DSN())
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	conn, err := pool.Acquire(ctx)
	if err != nil {
		log.Fatal(err)
	}
	for _, s := range pool.NodeStats() {
		fmt.Printf("node %d: %d open, %d acquired, %d idle, healthy %v\n",
			s.ID, s.TotalConns, s.AcquiredConns, s.IdleConns, s.Healthy)
	}
	conn.Release()
	// Output:
	// node 8: 1 open, 1 acquired, 0 idle, healthy true
}

func ExampleParseConfig() {
	cfg, err := clusterpool.ParseConfig("postgres://app:secret@lb.example.com:26257/app?sslmode=disable" +
		"&pool_max_conns=20&cluster_max_retries=3&cluster_node_identity=backendkey")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(cfg.MaxConns, cfg.MaxRetries, cfg.NodeIdentity, cfg.BalanceInterval)
	// The cluster_* parameters never reach the server.
	_, sent := cfg.ConnConfig.RuntimeParams["cluster_max_retries"]
	fmt.Println(sent)

	// Errors name the parameter and the value, not the connection string.
	_, err = clusterpool.ParseConfig("postgres://app:secret@lb.example.com/app?cluster_max_retries=many")
	fmt.Println(err)
	// Output:
	// 20 3 backendkey 5s
	// false
	// clusterpool: cluster_max_retries: invalid value "many": strconv.ParseInt: parsing "many": invalid syntax
}

func ExampleDecodeProcessID() {
	fmt.Println(clusterpool.DecodeProcessID(0x0030_1234)) // short form: node 3, low 20 bits random
	fmt.Println(clusterpool.DecodeProcessID(0x8000_1388)) // long form: instance 5000
	// Output:
	// 3
	// 5000
}

// DB is what a function that took a *pgxpool.Pool needs of it: the methods
// it calls. *pgxpool.Pool and *clusterpool.Pool both have them.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

func selectOne(ctx context.Context, db DB) (int, error) {
	var n int
	err := db.QueryRow(ctx, "SELECT 1").Scan(&n)
	return n, err
}

// Code that took a *pgxpool.Pool takes an interface of the methods it uses,
// and then either pool.
func Example_pgxpoolParameter() {
	ctx := context.Background()
	cluster, err := clustertest.Start(ctx, clustertest.Options{Nodes: 1, InProcess: true})
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Close()

	pgxPool, err := pgxpool.New(ctx, cluster.DSN())
	if err != nil {
		log.Fatal(err)
	}
	defer pgxPool.Close()
	clusterPool, err := clusterpool.New(ctx, cluster.DSN())
	if err != nil {
		log.Fatal(err)
	}
	defer clusterPool.Close()

	for _, db := range []DB{pgxPool, clusterPool} {
		n, err := selectOne(ctx, db)
		fmt.Printf("%T: %d %v\n", db, n, err)
	}
	// Output:
	// *pgxpool.Pool: 1 <nil>
	// *clusterpool.Pool: 1 <nil>
}

// A service in us-east1-b prefers the nodes of its zone, then of its region,
// then any node of the cluster.
func ExampleParseConfig_locality() {
	cfg, err := clusterpool.ParseConfig("host=lb.example.com port=26257 user=app dbname=app" +
		" cluster_locality='region=us-east1,zone=us-east1-b' cluster_locality_fallback=region")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(cfg.Locality, cfg.LocalityFallback)

	_, err = clusterpool.ParseConfig("host=lb.example.com cluster_locality='region=us-east1' cluster_locality_fallback=zone")
	fmt.Println(err)
	// Output:
	// region=us-east1,zone=us-east1-b [region]
	// clusterpool: cluster_locality_fallback: invalid value "zone": "zone" is not a tier of the locality "region=us-east1"
}

// Runtime limits: wait for MinConns before serving, bound a noisy workload,
// and shrink the pool while it runs.
func ExamplePool_SetMaxConns() {
	ctx := context.Background()
	cluster, err := clustertest.Start(ctx, clustertest.Options{Nodes: 3, InProcess: true})
	if err != nil {
		log.Fatal(err)
	}
	defer cluster.Close()

	cfg, err := clusterpool.ParseConfig(cluster.DSN() + "&pool_max_conns=12&pool_min_conns=6&cluster_acquire_timeout=2s")
	if err != nil {
		log.Fatal(err)
	}
	cfg.WorkloadLimits = map[string]int{"reports": 2}
	pool, err := clusterpool.NewWithConfig(ctx, cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	// Gate the service's readiness on the database: MinConns open. (Not
	// exactly: a connect of the cold start, such as a balancer's move,
	// may still be under way.)
	if err := pool.WaitReady(ctx); err != nil {
		log.Fatal(err)
	}
	fmt.Println("ready with at least 6 connections:", pool.Stat().TotalConns() >= 6)

	// Calls of the "reports" workload hold at most 2 connections at once.
	reports := clusterpool.WithWorkload(ctx, "reports")
	if _, err := pool.Exec(reports, "SELECT pg_sleep(0.01)"); err != nil {
		log.Fatal(err)
	}

	// Shrink to 4 connections: idle ones go at once, in-use ones when
	// released; grow again with SetMaxConns(12).
	if err := pool.SetMaxConns(4); err != nil {
		log.Fatal(err)
	}
	st := pool.ClusterStat()
	fmt.Println("size", st.MaxConns(), "min", st.MinConns())
	fmt.Println(pool.SetMaxConns(20))
	// Output:
	// ready with at least 6 connections: true
	// size 4 min 4
	// clusterpool: SetMaxConns: invalid value 20: must be from 1 to MaxConns (12)
}
