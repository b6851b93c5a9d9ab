package clusterpool

import (
	"context"
	"fmt"
	"maps"
	"math"
	"net"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Defaults that ParseConfig fills in.
const (
	DefaultBalanceInterval = 5 * time.Second
	DefaultProbeInterval   = 5 * time.Second
	DefaultMaxRetries      = 5
	DefaultConnectRate     = 10.0

	// DefaultConnectTimeout bounds each of the pool's connection attempts,
	// per host, when the connection string sets no connect_timeout
	// (pgxpool's default is 2 minutes). A node that accepts TCP but never
	// answers (a network partition, a hung server) would otherwise hold a
	// pool slot, counted against MaxConns, that long; and with several
	// hosts listed pgconn tries the next host only when the timeout ends the
	// attempt. The same value, capped at 5 s, bounds the pool's health
	// check of a node. Set connect_timeout to choose another bound.
	DefaultConnectTimeout = 10 * time.Second

	// MinInterval is the shortest BalanceInterval and ProbeInterval
	// accepted (other than 0, the default). Shorter is almost surely a
	// missing unit (BalanceInterval = 5 is 5ns), and would run the balancer
	// or open probe connections back to back.
	MinInterval = time.Millisecond
)

// NodeIdentity says how the pool learns which node a connection reached.
type NodeIdentity string

const (
	// NodeIdentityAuto (also the zero value "") reads the BackendKey on
	// CockroachDB. On PostgreSQL it identifies nodes with one query at connect
	// (as NodeIdentityQuery) when the connection string lists several distinct
	// hosts, and otherwise tracks nothing: balancing is off and the pool behaves
	// exactly as pgxpool.
	NodeIdentityAuto NodeIdentity = "auto"

	// NodeIdentityBackendKey decodes the node ID from the BackendKeyData that
	// CockroachDB sends at connect: no round trip. A connection to a server that
	// is not CockroachDB (no crdb_version parameter) is left untracked, because
	// its BackendKey carries an operating-system process ID, not a node.
	NodeIdentityBackendKey NodeIdentity = "backendkey"

	// NodeIdentityQuery runs one query on each new connection,
	//	SELECT host(inet_server_addr()), inet_server_port()
	// and maps each distinct server address to a NodeID local to the pool
	// (1, 2, 3... in discovery order). It costs one round trip per connection,
	// never per acquire.
	NodeIdentityQuery NodeIdentity = "query"

	// NodeIdentityNone tracks no node: no balancing, no per-node stats; retries
	// still apply.
	NodeIdentityNone NodeIdentity = "none"
)

// IdentifyNodeParams are the parameters passed to Config.IdentifyNode.
type IdentifyNodeParams struct {
	// Conn is the new connection. It is not yet in the pool.
	Conn *pgx.Conn
}

// Config is the configuration for a Pool. Create it with ParseConfig, or
// wrap a config from pgxpool.ParseConfig (&Config{Config: pgxpoolConfig}),
// and modify it as needed, like pgxpool.Config, which it embeds: every
// pgxpool setting and hook (MaxConns, AfterConnect, ...) is set as usual.
//
// The zero value of each cluster setting means its default, as documented
// on the field, so a wrapped pgxpool config means what ParseConfig of the
// same connection string means; Pool.ClusterConfig reports the values in
// effect. A setting that can be turned off (MaxRetries, ConnectRate) is
// turned off by a negative value, never by zero.
//
// NewWithConfig checks the Config and returns an error naming the field and
// the value, where pgxpool would panic or misbehave: a nil Config, a
// Config, pgxpool.Config or pgx.ConnConfig not made by a ParseConfig (pgx
// panics on those, for the connection config in a background goroutine),
// MaxConns below 1, a HealthCheckPeriod that is not positive, and invalid
// cluster settings below.
//
// The hooks it holds are chained with the pool's; see "Hooks" in the Pool
// documentation.
type Config struct {
	*pgxpool.Config

	// BalanceInterval is how often the balancer compares each node's
	// connections with its target and retires the excess. ParseConfig sets
	// DefaultBalanceInterval (5 s); zero also means the default. Negative, or
	// below MinInterval (1 ms), is an error.
	BalanceInterval time.Duration

	// ProbeInterval is how often the pool looks for nodes and their health:
	// it reads CockroachDB's gossip tables over an idle pool connection when
	// allowed, and otherwise opens one short-lived connection, at most this
	// often (see ProbeMaxInterval). ParseConfig sets DefaultProbeInterval
	// (5 s); zero also means the default. Negative, or below MinInterval
	// (1 ms), is an error.
	ProbeInterval time.Duration

	// ProbeMaxInterval is the longest wait between the probe's short-lived
	// connections while nothing changes: the probe opens one every
	// ProbeInterval after a change (a node seen, lost, evicted, draining, a
	// connection lost, a move), and backs off towards ProbeMaxInterval while
	// nothing does. Zero means the default: 8 × ProbeInterval, at most a
	// minute (but never below ProbeInterval). Negative means no back-off
	// (cluster_probe_max_interval=off): a probe every ProbeInterval, as
	// before, for pools behind one address without gossip that must find new
	// nodes quickly (see docs/balancing.md). A positive value below
	// ProbeInterval (with its default applied) is an error. When CockroachDB's
	// gossip tables are readable the probe reads them over an idle pool
	// connection every ProbeInterval instead, and opens no connection unless
	// the pool misses a node.
	ProbeMaxInterval time.Duration

	// MaxRetries is how many times a failed call may be retried (so a call
	// makes at most MaxRetries+1 attempts). Zero means DefaultMaxRetries (5),
	// which ParseConfig also sets. Negative means no retries: errors are
	// returned as pgxpool returns them; cluster_max_retries=0 (or off) in a
	// connection string sets -1. (Before, a zero MaxRetries meant no
	// retries, so a Config wrapping a pgxpool config retried nothing.)
	MaxRetries int

	// ConnectRate limits how many new connections per second the pool opens.
	// The burst is the pool's MaxConns, so a cold start or a full refill is not
	// slowed; a reconnect storm after a node restart is. The balancer may open
	// half a burst more once, to even out where the cold start's connections
	// landed, so a pool opens at most MaxConns + ⌈MaxConns/2⌉ + rate × t in
	// its first t seconds. Zero means
	// DefaultConnectRate (10 per second), which ParseConfig also sets.
	// Negative or +Inf means no limit, as in pgxpool; cluster_connect_rate=0
	// (or off) in a connection string sets -1. NaN is an error. (Before, a
	// zero ConnectRate meant no limit.)
	ConnectRate float64

	// Locality is the pool's own locality in CockroachDB's --locality form,
	// tiers from the most to the least inclusive, such as
	// "region=us-east1,zone=us-east1-b". When set, the pool keeps its
	// connections on the nodes of the most preferred level that has a
	// healthy node: first the nodes sharing the whole locality, then each
	// fallback level (LocalityFallback), then the whole cluster. It moves
	// down a level when no node of the level in use is healthy, and back up
	// when one is again, through the balancer at its usual pace, with no
	// error for callers. A node's locality is read from
	// crdb_internal.gossip_nodes when the probe may read it, otherwise with
	// one SHOW LOCALITY on the first connection that reaches the node. Empty
	// (the default) means no preference: every node is used alike and no
	// locality is read but gossip's. A malformed locality is an error.
	Locality string

	// LocalityFallback lists the tiers of Locality the pool falls back to,
	// in order, when no healthy node shares the whole Locality: "region"
	// means the nodes whose tiers up to and including region are the
	// pool's. Tiers go from the most to the least specific and exclude
	// Locality's last tier (the first level). The whole cluster is always
	// the last level. Nil (the default) means every shorter prefix of
	// Locality, most specific first: for "region=r,zone=z", zone then
	// region then the whole cluster. It needs Locality.
	LocalityFallback []string

	// NodeIdentity says how connections are mapped to nodes; see the
	// NodeIdentity constants. The zero value "" means NodeIdentityAuto. It is
	// ignored when IdentifyNode is set.
	NodeIdentity NodeIdentity

	// IdentifyNode, when set, replaces NodeIdentity: it is called once per new
	// connection, before the user's AfterConnect. Its outcomes:
	//
	//	- (id, addr, nil) with id != 0: the connection is counted on node id;
	//	  addr (may be empty) is shown in NodeStat.Addr.
	//	- (0, _, nil): the connection is not assigned to any node.
	//	- (_, _, err): the connection is closed and the connect fails with err.
	IdentifyNode func(ctx context.Context, params IdentifyNodeParams) (id NodeID, addr string, err error)

	// RetryPolicy decides whether a failed attempt is retried, within
	// MaxRetries and the caller's context. Nil means DefaultRetryPolicy; wrap
	// that to retry less. See the Pool documentation for the policy.
	RetryPolicy RetryPolicy

	// MaxConnsPerNode is the most connections the pool holds on one node
	// (cluster_max_conns_per_node): placement, redials and balancing never
	// put more there, and when MaxConnsPerNode × the healthy nodes is below
	// the pool's size the pool works with that smaller size
	// (ClusterStat.EffectiveMaxConns). Zero, the default, means no cap; so
	// does a negative value. Pool.SetMaxConnsPerNode changes it at run time.
	//
	// Whatever the cap, a node that refuses a new connection with SQLSTATE
	// 53300 (too many connections: CockroachDB's
	// server.max_connections_per_gateway) is full, not unhealthy: it is
	// never evicted for it, its connections keep working, the connect goes
	// to another node, and callers see no error while another node has room
	// (NodeStat.Full).
	MaxConnsPerNode int32

	// AcquireTimeout is the longest a call waits for a connection
	// (cluster_acquire_timeout), whatever its context allows: past it the
	// call fails with an error that matches ErrPoolExhausted (every
	// connection was handed out) or ErrPoolConnecting (connections were
	// still being opened). The query itself runs under the caller's
	// context only. Zero, the default, means no timeout: a call waits as
	// long as its context lets it, as with pgxpool; so does a negative
	// value. Pool.SetAcquireTimeout changes it at run time.
	AcquireTimeout time.Duration

	// WorkloadLimits bounds how many connections each named workload holds
	// at once; a call names its workload with WithWorkload. A call of a
	// workload at its limit waits, in arrival order, for one of the
	// workload's connections to come back (or for its context, or
	// AcquireTimeout). Work with no workload, or one not listed, is bounded
	// only by the pool's size. Each limit must be at least 1 and each name
	// non-empty. Nil, the default, means no workload limit.
	// Pool.SetWorkloadLimits changes them at run time.
	WorkloadLimits map[string]int

	// Tracer receives the pool's own events (nodes added, removed, evicted
	// or draining, pruning, retries, probes, connect throttling, ...). It is
	// inspected once, by NewWithConfig, for NodeTracer, PruneTracer,
	// RetryTracer, ProbeTracer, ConnectTracer, HookTracer, LocalityTracer,
	// LimitTracer and DiscoveryTracer;
	// CombineTracers joins several. Nil means no tracing, at no cost. A
	// value that implements none of them is an error. It is not installed as ConnConfig.Tracer:
	// to trace queries too, set the same value there.
	Tracer any
}

// Copy returns a deep copy of the config that is safe to use and modify, with
// the same exception as pgxpool.Config.Copy (the tls.Config is shared).
func (c *Config) Copy() *Config {
	n := *c
	n.LocalityFallback = slices.Clone(c.LocalityFallback)
	switch {
	case c.Config == nil:
	case c.ConnConfig == nil: // hand-built: NewWithConfig rejects it, Copy need not panic
		pc := *c.Config
		n.Config = &pc
	default:
		n.Config = c.Config.Copy()
	}
	n.WorkloadLimits = maps.Clone(c.WorkloadLimits)
	return &n
}

// Connection-string parameters read by ParseConfig.
const (
	paramPrefix          = "cluster_"
	paramBalanceInterval = "cluster_balance_interval"
	paramProbeInterval   = "cluster_probe_interval"
	paramProbeMax        = "cluster_probe_max_interval"
	paramMaxRetries      = "cluster_max_retries"
	paramConnectRate     = "cluster_connect_rate"
	paramNodeIdentity    = "cluster_node_identity"
	paramMaxConnsPerNode = "cluster_max_conns_per_node"
	paramAcquireTimeout  = "cluster_acquire_timeout"
	paramLocality        = "cluster_locality"
	paramLocalityFall    = "cluster_locality_fallback"

	// paramOff turns a setting off, as 0 does.
	paramOff = "off"
)

// The values that turn a setting off in a Config; any negative value does.
const (
	offMaxRetries  = -1
	offConnectRate = -1.0
	offProbeMax    = -1 * time.Nanosecond
)

// ParseConfig builds a Config from connString. It accepts everything
// pgxpool.ParseConfig accepts, plus these parameters, which are removed from
// the string before pgx parses the rest (so they are never sent to the server
// as run-time parameters):
//
//   - cluster_balance_interval: duration, 0 (the default, 5s) or at least 1ms
//   - cluster_probe_interval: duration, 0 (the default, 5s) or at least 1ms
//   - cluster_probe_max_interval: duration, 0 (the default: 8 ×
//     cluster_probe_interval, at most 1m) or at least cluster_probe_interval;
//     "off" turns the probe's back-off off (Config.ProbeMaxInterval -1ns)
//   - cluster_max_retries: integer, 0 or more (default 5); 0 or "off" turns
//     retries off (Config.MaxRetries -1)
//   - cluster_connect_rate: new connections per second, 0 or more (default
//     10); 0 or "off" means no limit (Config.ConnectRate -1), as does "inf"
//   - cluster_node_identity: auto, backendkey, query or none (default auto)
//   - cluster_max_conns_per_node: integer, 0 or more (default 0, no cap); 0
//     or "off" means no cap
//   - cluster_acquire_timeout: duration, 0 or more (default 0, none); 0 or
//     "off" means none
//   - cluster_locality: the pool's locality, such as
//     region=us-east1,zone=us-east1-b (default none); see Config.Locality
//   - cluster_locality_fallback: comma-separated tiers of cluster_locality
//     to fall back to, such as region (default: every shorter prefix)
//
// pgx's connect_timeout keeps its meaning; when it is not set the pool's own
// connects use DefaultConnectTimeout (10 s) per host rather than pgxpool's
// 2 minutes.
//
// Any other parameter whose name, lower-cased, starts with "cluster_" is an
// error naming it (with "did you mean" for a near miss), so a misspelt
// setting is neither ignored nor sent to the server. Names are
// case-sensitive, as pgx's are: CLUSTER_MAX_RETRIES is an error that names
// cluster_max_retries, not a synonym. Cluster parameters are checked before the
// rest of the string; their errors name the parameter and its value, never
// the rest of the connection string. pgx's errors for the rest quote the
// string with every password masked (pgx masks them on a best-effort basis;
// ParseConfig masks them again by reading the string as pgx does).
//
//	# Example URL
//	postgres://app:secret@lb.example.com:26257/db?sslmode=verify-full&pool_max_conns=20&cluster_max_retries=3
//
//	# Example Keyword/Value
//	host=lb.example.com port=26257 user=app dbname=db pool_max_conns=20 cluster_node_identity='backendkey'
func ParseConfig(connString string) (*Config, error) {
	rest, params, err := extractClusterParams(connString)
	if err != nil {
		return nil, err
	}
	config := &Config{
		BalanceInterval: DefaultBalanceInterval,
		ProbeInterval:   DefaultProbeInterval,
		MaxRetries:      DefaultMaxRetries,
		ConnectRate:     DefaultConnectRate,
		NodeIdentity:    NodeIdentityAuto,
	}
	// The cluster settings go first, so that an invalid one is reported
	// whatever else is wrong with the string.
	for _, p := range params {
		if err := config.setParam(p.key, p.value); err != nil {
			return nil, err
		}
	}
	if _, err := newLocalityPrefs(config.Locality, config.LocalityFallback); err != nil {
		// cluster_locality alone was checked by setParam.
		return nil, fmt.Errorf("clusterpool: %s: invalid value %q: %v", paramLocalityFall, strings.Join(config.LocalityFallback, ","), err)
	}
	config.Config, err = pgxpool.ParseConfig(rest)
	if err != nil {
		return nil, redactParseError(connString, err)
	}
	return config, nil
}

func (id NodeIdentity) valid() bool {
	switch id {
	case "", NodeIdentityAuto, NodeIdentityBackendKey, NodeIdentityQuery, NodeIdentityNone:
		return true
	}
	return false
}

// validate checks what NewWithConfig needs of a Config: one made by
// ParseConfig (pgx panics on a hand-built one, in a background goroutine
// for the connection config) and valid cluster settings. Errors name the
// field and its value.
func (c *Config) validate() error {
	invalid := func(field string, value any, why string) error {
		return fmt.Errorf("clusterpool: Config.%s: invalid value %v: %s", field, value, why)
	}
	notParsed := func(what string) error {
		return fmt.Errorf("clusterpool: %s was not created by ParseConfig: create the Config with clusterpool.ParseConfig and modify it", what)
	}
	switch {
	case c.Config == nil:
		return notParsed("Config.Config (nil)")
	case c.Config.ConnConfig == nil:
		return notParsed("Config.ConnConfig (nil)")
	case !createdByParseConfig(c.Config):
		return notParsed("Config.Config (a *pgxpool.Config)")
	case !createdByParseConfig(c.Config.ConnConfig), !createdByParseConfig(&c.Config.ConnConfig.Config):
		return notParsed("Config.ConnConfig (a *pgx.ConnConfig)")
	case slices.Contains(c.ConnConfig.Fallbacks, nil):
		return invalid("ConnConfig.Fallbacks", "with a nil element", "pgx dials each fallback")
	case c.MaxConns < 1:
		return invalid("MaxConns", c.MaxConns, "must be at least 1")
	case c.HealthCheckPeriod <= 0:
		return invalid("HealthCheckPeriod", c.HealthCheckPeriod, "must be positive")
	case checkInterval(c.BalanceInterval) != "":
		return invalid("BalanceInterval", c.BalanceInterval, checkInterval(c.BalanceInterval))
	case checkInterval(c.ProbeInterval) != "":
		return invalid("ProbeInterval", c.ProbeInterval, checkInterval(c.ProbeInterval))
	case c.ProbeMaxInterval > 0 && c.ProbeMaxInterval < c.withDefaults().ProbeInterval:
		return invalid("ProbeMaxInterval", c.ProbeMaxInterval, fmt.Sprintf("must be 0 (the default), negative (no back-off) or at least ProbeInterval (%v)", c.withDefaults().ProbeInterval))
	case math.IsNaN(c.ConnectRate):
		return invalid("ConnectRate", c.ConnectRate, "must be a number: 0 for the default, negative or +Inf for no limit")
	case c.Tracer != nil && !implementsTracer(c.Tracer):
		return invalid("Tracer", fmt.Sprintf("of type %T", c.Tracer), "implements none of "+tracerInterfaces)
	case !c.NodeIdentity.valid():
		return invalid("NodeIdentity", strconv.Quote(string(c.NodeIdentity)), "must be auto, backendkey, query or none")
	}
	if _, err := newLocalityPrefs(c.Locality, c.LocalityFallback); err != nil {
		field, value := "Locality", strconv.Quote(c.Locality)
		if _, lerr := parseLocality(c.Locality); lerr == nil {
			field, value = "LocalityFallback", fmt.Sprintf("%q", c.LocalityFallback)
		}
		return invalid(field, value, err.Error())
	}
	return checkWorkloadLimits("Config.WorkloadLimits", c.WorkloadLimits)
}

// checkInterval says what is wrong with d as a BalanceInterval or
// ProbeInterval, or returns "".
func checkInterval(d time.Duration) string {
	switch {
	case d < 0:
		return "must not be negative"
	case d > 0 && d < MinInterval:
		return "must be 0 (the default) or at least 1ms"
	}
	return ""
}

// createdByParseConfig reads the unexported flag that pgx's ParseConfig
// functions set and its constructors panic without: pgxpool.NewWithConfig
// at once, pgx.ConnectConfig and pgconn.ConnectConfig in the pool's
// background goroutine, which would end the program. cfg is a pointer to
// one of those config structs. Should a pgx version drop the flag, every
// config passes and pgx's own checks are all that is left.
func createdByParseConfig(cfg any) bool {
	v := reflect.ValueOf(cfg)
	if v.Kind() != reflect.Pointer || v.IsNil() {
		return false
	}
	f := v.Elem().FieldByName("createdByParseConfig")
	if !f.IsValid() || f.Kind() != reflect.Bool {
		return true
	}
	return f.Bool()
}

// settings are a Config's cluster settings with the defaults applied, fixed
// when the pool is created. Code in the package reads these, not Config.
type settings struct {
	balanceInterval time.Duration
	probeInterval   time.Duration
	// probeMaxInterval is the probe's longest wait at rest: probeInterval
	// when its back-off is off.
	probeMaxInterval time.Duration
	maxRetries       int     // 0: no retries
	connectRate      float64 // connections per second; +Inf: no limit
	connectBurst     int     // tokens for a cold start: MaxConns
	identity         NodeIdentity
	maxConnsPerNode  int32         // 0: no cap
	acquireTimeout   time.Duration // 0: none
	identifyNode     func(context.Context, IdentifyNodeParams) (NodeID, string, error)
	// multiHost is true when the connection string lists several distinct
	// host:port pairs, i.e. the pool dials nodes directly and can place
	// connections by reordering hosts.
	multiHost bool
	// locality is the pool's locality preference; nil: none.
	locality *localityPrefs
}

func (c *Config) settings() settings {
	c = c.withDefaults()
	s := settings{
		balanceInterval:  c.BalanceInterval,
		probeInterval:    c.ProbeInterval,
		probeMaxInterval: max(c.ProbeMaxInterval, c.ProbeInterval),
		maxRetries:       c.MaxRetries,
		connectRate:      c.ConnectRate,
		connectBurst:     max(int(c.MaxConns), 1),
		identity:         c.NodeIdentity,
		maxConnsPerNode:  max(c.MaxConnsPerNode, 0),
		acquireTimeout:   max(c.AcquireTimeout, 0),
		identifyNode:     c.IdentifyNode,
		multiHost:        distinctHosts(c.ConnConfig) > 1,
	}
	s.locality, _ = newLocalityPrefs(c.Locality, c.LocalityFallback) // validate checked it
	if s.maxRetries < 0 {
		s.maxRetries = 0
	}
	if s.connectRate < 0 {
		s.connectRate = math.Inf(1)
	}
	return s
}

// withDefaults returns a copy of c with each zero cluster setting replaced
// by its default: the values a pool made from c works with.
func (c *Config) withDefaults() *Config {
	n := c.Copy()
	if n.BalanceInterval == 0 {
		n.BalanceInterval = DefaultBalanceInterval
	}
	if n.ProbeInterval == 0 {
		n.ProbeInterval = DefaultProbeInterval
	}
	if n.ProbeMaxInterval == 0 {
		n.ProbeMaxInterval = probeWaitCap(n.ProbeInterval)
	}
	if n.MaxRetries == 0 {
		n.MaxRetries = DefaultMaxRetries
	}
	if n.ConnectRate == 0 {
		n.ConnectRate = DefaultConnectRate
	}
	if n.NodeIdentity == "" {
		n.NodeIdentity = NodeIdentityAuto
	}
	return n
}

// distinctHosts counts the distinct host:port pairs pgx may dial. Fallbacks
// also hold TLS/plain variants of the same host (sslmode=prefer), which must
// not count as other nodes.
func distinctHosts(cc *pgx.ConnConfig) int {
	return len(hostGroups(cc))
}

// hostPort is the key the pool gives a host: "host:port", with an IPv6
// literal bracketed ("[::1]:5432"), so that net.SplitHostPort reads it
// back. Placement splits the key to tell an IP from a name before marking
// a host down.
func hostPort(host string, port uint16) string {
	return net.JoinHostPort(host, strconv.Itoa(int(port)))
}
