package main

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/clusterpool/clusterpool"
	"github.com/clusterpool/clusterpool/clustertest"
)

// defaultClusterParams are given to clusterpool unless -cluster overrides
// them. The library's defaults (5 s) suit services; the benchmark's runs
// last seconds, so it asks for shorter intervals to let each scenario
// converge within its duration.
var defaultClusterParams = []string{"cluster_balance_interval=250ms", "cluster_probe_interval=250ms"}

// clusterParams merges the defaults with the user's -cluster settings
// (which win), in a stable order.
func clusterParams(user []string) []string { return mergeParams(defaultClusterParams, user) }

// mergeParams merges key=value defaults with the user's settings (which
// win), in a stable order.
func mergeParams(defaults, user []string) []string {
	merged := make(map[string]string)
	var keys []string
	for _, kv := range append(append([]string{}, defaults...), user...) {
		k, v, _ := strings.Cut(kv, "=")
		if _, ok := merged[k]; !ok {
			keys = append(keys, k)
		}
		merged[k] = v
	}
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = k + "=" + merged[k]
	}
	return out
}

// withParams adds key=value parameters to a connection string in either
// form (URL or keyword/value).
func withParams(dsn string, params []string) string {
	if len(params) == 0 {
		return dsn
	}
	if strings.Contains(dsn, "://") {
		sep := "?"
		if strings.Contains(dsn, "?") {
			sep = "&"
		}
		return dsn + sep + strings.Join(params, "&")
	}
	return dsn + " " + strings.Join(params, " ")
}

const (
	pgxpoolKind     = "pgxpool"
	clusterpoolKind = "clusterpool"
)

var poolKinds = []string{pgxpoolKind, clusterpoolKind}

// connCounter reports connections per node and how many were opened.
type connCounter interface {
	openConns() map[int]int
	opened() int64
	// seesProbes is true when opened counts clusterpool's short-lived probe
	// connections too (the servers see them; the pools' hooks do not).
	seesProbes() bool
}

// clusterCounter reads the servers' own counts from the embedded cluster:
// the ground truth, independent of what either pool believes.
type clusterCounter struct{ c *clustertest.Cluster }

func (cc clusterCounter) openConns() map[int]int { return cc.c.OpenConns() }

func (cc clusterCounter) seesProbes() bool { return true }

func (cc clusterCounter) opened() int64 {
	var t int64
	for _, n := range cc.c.Nodes() {
		t += n.TotalConns()
	}
	return t
}

// hookCounter counts connections per node from the pool's AfterConnect and
// BeforeClose hooks, for a real cluster (-dsn) whose servers the benchmark
// cannot ask. The node is read from CockroachDB's BackendKey, or else from
// the server's address (one query per new connection, for both pools alike).
type hookCounter struct {
	total atomic.Int64

	mu     sync.Mutex // protects the fields below
	byConn map[*pgx.Conn]int
	ids    map[string]int // server address → node number
}

func newHookCounter() *hookCounter {
	return &hookCounter{byConn: make(map[*pgx.Conn]int), ids: make(map[string]int)}
}

func (h *hookCounter) install(cfg *pgxpool.Config) {
	after, before := cfg.AfterConnect, cfg.BeforeClose
	cfg.AfterConnect = func(ctx context.Context, conn *pgx.Conn) error {
		id, err := h.identify(ctx, conn)
		if err != nil {
			return err
		}
		h.total.Add(1)
		h.mu.Lock()
		h.byConn[conn] = id
		h.mu.Unlock()
		if after != nil {
			return after(ctx, conn)
		}
		return nil
	}
	cfg.BeforeClose = func(conn *pgx.Conn) {
		h.mu.Lock()
		delete(h.byConn, conn)
		h.mu.Unlock()
		if before != nil {
			before(conn)
		}
	}
}

func (h *hookCounter) identify(ctx context.Context, conn *pgx.Conn) (int, error) {
	pc := conn.PgConn()
	if pc.ParameterStatus("crdb_version") != "" {
		if id := clusterpool.DecodeProcessID(pc.PID()); id != 0 {
			return int(id), nil
		}
	}
	var host string
	var port int32
	if err := conn.QueryRow(ctx, "SELECT host(inet_server_addr()), inet_server_port()").Scan(&host, &port); err != nil {
		return 0, fmt.Errorf("clusterbench: identifying the server: %w", err)
	}
	addr := net.JoinHostPort(host, strconv.Itoa(int(port)))
	h.mu.Lock()
	defer h.mu.Unlock()
	id, ok := h.ids[addr]
	if !ok {
		id = len(h.ids) + 1
		h.ids[addr] = id
	}
	return id, nil
}

func (h *hookCounter) openConns() map[int]int {
	h.mu.Lock()
	defer h.mu.Unlock()
	m := make(map[int]int)
	for _, id := range h.byConn {
		m[id]++
	}
	return m
}

func (h *hookCounter) opened() int64 { return h.total.Load() }

func (h *hookCounter) seesProbes() bool { return false }

// clusterStats returns clusterpool's own counters, nil for pgxpool.
func clusterStats(d db) *clusterpool.ClusterStat {
	if cp, ok := d.(*clusterpool.Pool); ok {
		return cp.ClusterStat()
	}
	return nil
}

// probeConns is how many probe connections clusterpool has opened (0 for
// pgxpool): the servers count them, but they are not the pool's.
func probeConns(d db) int64 {
	if s := clusterStats(d); s != nil {
		return s.ProbeSessions()
	}
	return 0
}

// libraryStats are clusterpool's counters worth showing next to the results.
func libraryStats(d db) map[string]float64 {
	s := clusterStats(d)
	if s == nil {
		return nil
	}
	return map[string]float64{
		"retry_attempts":     float64(s.RetryAttempts()),
		"pruned_conns":       float64(s.PrunedConns()),
		"evictions":          float64(s.Evictions()),
		"probes":             float64(s.Probes()),
		"redials":            float64(s.Redials()),
		"throttled_connects": float64(s.ThrottledConnects()),
		"connect_wait_ms":    float64(s.ConnectWaitDuration().Milliseconds()),
		"caller_wait_ms":     float64(s.CallerConnectWaitDuration().Milliseconds()),
		"prepaid_connects":   float64(s.PrepaidConnects()),
	}
}

// poolParams is the pool both sides get, so the comparison is fair.
type poolParams struct {
	dsn string
	// cluster are clusterpool's cluster_* settings (clusterParams).
	cluster []string
	size    int // MinConns = MaxConns: the pool opens all its connections at start
	// hooks, when set, counts connections per node (-dsn runs only).
	hooks *hookCounter
}

// newPool opens a pool of the given kind.
func newPool(ctx context.Context, kind string, p poolParams) (db, error) {
	size := int32(p.size)
	switch kind {
	case pgxpoolKind:
		cfg, err := pgxpool.ParseConfig(p.dsn)
		if err != nil {
			return nil, err
		}
		cfg.MaxConns, cfg.MinConns = size, size
		if p.hooks != nil {
			p.hooks.install(cfg)
		}
		return pgxpool.NewWithConfig(ctx, cfg)
	case clusterpoolKind:
		cfg, err := clusterpool.ParseConfig(withParams(p.dsn, p.cluster))
		if err != nil {
			return nil, err
		}
		cfg.MaxConns, cfg.MinConns = size, size
		if p.hooks != nil {
			p.hooks.install(cfg.Config)
		}
		return clusterpool.NewWithConfig(ctx, cfg)
	}
	return nil, fmt.Errorf("clusterbench: unknown pool kind %q", kind)
}

// clusterpoolSettings checks the cluster_* settings and returns what
// clusterpool runs with, defaults included, for the output.
func clusterpoolSettings(params []string) (*clusterpool.Config, map[string]string, error) {
	cfg, err := clusterpool.ParseConfig(withParams("postgres://localhost/", params))
	if err != nil {
		return nil, nil, err
	}
	return cfg, map[string]string{
		"cluster_balance_interval": cfg.BalanceInterval.String(),
		"cluster_probe_interval":   cfg.ProbeInterval.String(),
		"cluster_max_retries":      offIfNegative(strconv.Itoa(cfg.MaxRetries), cfg.MaxRetries < 0),
		"cluster_connect_rate":     offIfNegative(strconv.FormatFloat(cfg.ConnectRate, 'g', -1, 64), cfg.ConnectRate < 0),
		"cluster_node_identity":    string(cfg.NodeIdentity),
	}, nil
}

// offIfNegative writes a setting that a negative value turns off as "off",
// the spelling the connection string accepts for it.
func offIfNegative(v string, off bool) string {
	if off {
		return "off"
	}
	return v
}

// ensureKV creates the benchmark's table on one node, straight to its
// server so the proxy's connection counts are not disturbed. Every node is a
// separate database, so each needs it.
func ensureKV(ctx context.Context, n *clustertest.Node) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := n.ExecDirect(ctx, createKV); err != nil {
		return fmt.Errorf("clusterbench: %w", err)
	}
	return nil
}

// checkDSN connects once to a user's cluster, within its connect timeout
// (10 s if the DSN sets none), so that an unreachable address fails fast with
// a clear message.
func checkDSN(ctx context.Context, dsn string) error {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return fmt.Errorf("invalid -dsn: %w", err)
	}
	timeout := cfg.ConnectTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
		cfg.ConnectTimeout = timeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout+time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("cannot connect to -dsn host %s port %d within %v: %w", cfg.Host, cfg.Port, timeout, err)
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, createKV)
	if err != nil {
		return fmt.Errorf("creating the benchmark's table kv on -dsn: %w", err)
	}
	return nil
}
