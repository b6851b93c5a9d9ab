package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/url"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
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

// Config is the configuration for a Pool. It must be created by ParseConfig
// and can then be modified, like pgxpool.Config, which it embeds: every
// pgxpool setting and hook (MaxConns, AfterConnect, ...) is set as usual.
//
// NewWithConfig checks the Config and returns an error naming the field and
// the value, where pgxpool would panic or misbehave: a nil Config, a
// Config, pgxpool.Config or pgx.ConnConfig not made by a ParseConfig (pgx
// panics on those, for the connection config in a background goroutine),
// MaxConns below 1, a HealthCheckPeriod that is not positive, and invalid
// cluster settings below. The zero value of each cluster setting means its
// default, as documented on the field.
//
// A panic in one of the caller's hooks that the pool wraps (BeforeConnect,
// AfterConnect, IdentifyNode, PrepareConn or BeforeAcquire, BeforeClose) is
// recovered, counted, reported to a HookTracer, and taken as the hook
// failing; see "Hooks" in the Pool documentation.
type Config struct {
	*pgxpool.Config

	// BalanceInterval is how often the balancer compares each node's
	// connections with its target and retires the excess. ParseConfig sets
	// DefaultBalanceInterval (5 s); zero also means the default. Negative, or
	// below MinInterval (1 ms), is an error.
	BalanceInterval time.Duration

	// ProbeInterval is how often the pool opens one short-lived connection to
	// discover nodes and their health. ParseConfig sets DefaultProbeInterval
	// (5 s); zero also means the default. Negative, or below MinInterval
	// (1 ms), is an error.
	ProbeInterval time.Duration

	// MaxRetries is how many times a failed query may be retried (so a call
	// makes at most MaxRetries+1 attempts). ParseConfig sets DefaultMaxRetries
	// (5). Zero means no retries: errors are returned as pgxpool returns them.
	// Negative is an error.
	MaxRetries int

	// ConnectRate limits how many new connections per second the pool opens.
	// The burst is the pool's MaxConns, so a cold start or a full refill is not
	// slowed; a reconnect storm after a node restart is. ParseConfig sets
	// DefaultConnectRate (10 per second). Zero (or +Inf) means no limit, as in
	// pgxpool. Negative or NaN is an error.
	ConnectRate float64

	// NodeIdentity says how connections are mapped to nodes; see the
	// NodeIdentity constants. The zero value "" means NodeIdentityAuto. It is
	// ignored when IdentifyNode is set.
	NodeIdentity NodeIdentity

	// IdentifyNode, when set, replaces NodeIdentity: it is called once per new
	// connection, before the user's AfterConnect. Its outcomes:
	//
	//	- (id, addr, nil) with id != 0: the connection is counted on node id;
	//	  addr (may be empty) is shown in NodeStats.Addr.
	//	- (0, _, nil): the connection is not assigned to any node.
	//	- (_, _, err): the connection is closed and the connect fails with err.
	IdentifyNode func(ctx context.Context, params IdentifyNodeParams) (id NodeID, addr string, err error)

	// RetryPolicy decides whether a failed attempt is retried, within
	// MaxRetries and the caller's context. Nil means DefaultRetryPolicy; wrap
	// that to retry less. See the Pool documentation for the policy.
	RetryPolicy RetryPolicy

	// Tracer receives the pool's own events (nodes added, removed, evicted
	// or draining, pruning, retries, probes, connect throttling). It is
	// inspected once, by NewWithConfig, for NodeTracer, PruneTracer,
	// RetryTracer, ProbeTracer, ConnectTracer and HookTracer;
	// CombineTracers joins several. Nil means no tracing, at no cost. A
	// value that implements none of them is an error. It is not installed as ConnConfig.Tracer:
	// to trace queries too, set the same value there.
	Tracer any
}

// Copy returns a deep copy of the config that is safe to use and modify, with
// the same exception as pgxpool.Config.Copy (the tls.Config is shared).
func (c *Config) Copy() *Config {
	n := *c
	switch {
	case c.Config == nil:
	case c.ConnConfig == nil: // hand-built: NewWithConfig rejects it, Copy need not panic
		pc := *c.Config
		n.Config = &pc
	default:
		n.Config = c.Config.Copy()
	}
	return &n
}

// Connection-string parameters read by ParseConfig.
const (
	paramPrefix          = "cluster_"
	paramBalanceInterval = "cluster_balance_interval"
	paramProbeInterval   = "cluster_probe_interval"
	paramMaxRetries      = "cluster_max_retries"
	paramConnectRate     = "cluster_connect_rate"
	paramNodeIdentity    = "cluster_node_identity"
)

// ParseConfig builds a Config from connString. It accepts everything
// pgxpool.ParseConfig accepts, plus these parameters, which are removed from
// the string before pgx parses the rest (so they are never sent to the server
// as run-time parameters):
//
//   - cluster_balance_interval: duration, 0 (the default, 5s) or at least 1ms
//   - cluster_probe_interval: duration, 0 (the default, 5s) or at least 1ms
//   - cluster_max_retries: integer, 0 or more (default 5; 0 turns retries off)
//   - cluster_connect_rate: new connections per second, 0 or more (default 10;
//     0 or "inf" means no limit)
//   - cluster_node_identity: auto, backendkey, query or none (default auto)
//
// pgx's connect_timeout keeps its meaning; when it is not set the pool's own
// connects use DefaultConnectTimeout (10 s) per host rather than pgxpool's
// 2 minutes.
//
// Any other parameter starting with "cluster_" is an error, so a misspelt
// setting is not silently ignored. Cluster parameters are checked before the
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
	config.Config, err = pgxpool.ParseConfig(rest)
	if err != nil {
		return nil, redactParseError(connString, err)
	}
	return config, nil
}

// redactMask replaces a password in an error.
const redactMask = "xxxxx"

// parseError is pgx's error for a connection string that does not parse,
// with every password in it masked. It unwraps to a copy of pgx's
// *pgconn.ParseConfigError whose ConnString is masked the same way.
type parseError struct {
	msg string
	err error
}

func (e *parseError) Error() string { return e.msg }
func (e *parseError) Unwrap() error { return e.err }

// redactParseError masks every password of connString in pgx's parse error
// for it. pgx masks the passwords it recognizes too, but on a best-effort
// basis: a keyword/value password holding an escaped quote, for one, leaks
// its tail. Here the string is masked by a tokenizer that reads pairs as
// pgconn does and carries on where pgconn stops with an error, and any
// spelling of a password left in pgx's own message is masked as well.
func redactParseError(connString string, err error) error {
	masked, secrets := redactConnString(connString)
	var pce *pgconn.ParseConfigError
	if !errors.As(err, &pce) || error(pce) != err {
		return errors.New("clusterpool: " + maskSecrets(err.Error(), secrets))
	}
	// pgx's message is "cannot parse `<string>`: <detail>"; the detail
	// alone comes from a copy without the string.
	safe := *pce
	safe.ConnString = ""
	detail := strings.TrimPrefix(safe.Error(), "cannot parse ``: ")
	safe.ConnString = masked
	return &parseError{
		msg: fmt.Sprintf("clusterpool: cannot parse `%s`: %s", masked, maskSecrets(detail, secrets)),
		err: &safe,
	}
}

// maskSecrets replaces each secret in s. Secrets shorter than 3 bytes are
// left alone: masking every "a" of a message would destroy it and hide
// nothing.
func maskSecrets(s string, secrets []string) string {
	for _, secret := range secrets {
		if len(secret) >= 3 {
			s = strings.ReplaceAll(s, secret, redactMask)
		}
	}
	return s
}

// redactConnString returns connString with the values of its password and
// sslpassword parameters (and a URL's userinfo password) masked, and those
// values as written and as decoded.
func redactConnString(connString string) (string, []string) {
	for _, prefix := range []string{"postgres://", "postgresql://"} {
		if rest, ok := strings.CutPrefix(connString, prefix); ok {
			masked, secrets := redactURL(rest)
			return prefix + masked, secrets
		}
	}
	return redactKeywordValue(connString)
}

func isPasswordKey(key string) bool { return key == "password" || key == "sslpassword" }

// redactURL masks the passwords of a URL without its scheme.
func redactURL(s string) (string, []string) {
	var b strings.Builder
	var secrets []string
	if i := strings.IndexAny(s, "@/"); i >= 0 && s[i] == '@' {
		user, pw, ok := strings.Cut(s[:i], ":")
		b.WriteString(user)
		if ok {
			b.WriteString(":" + redactMask)
			secrets = append(secrets, pw, decodeLenient(pw))
		}
		b.WriteByte('@')
		s = s[i+1:]
	} else if at := strings.LastIndexByte(s, '@'); at >= 0 {
		// An unescaped '/' in the password ends the userinfo before its '@'
		// (postgres://u:pass/word@h): everything from the first ':' to the
		// last '@' may be password.
		if colon := strings.IndexByte(s[:at], ':'); colon >= 0 {
			secrets = append(secrets, s[colon+1:at])
			b.WriteString(s[:colon+1] + redactMask)
			s = s[at:]
		}
	}
	base, query, ok := strings.Cut(s, "?")
	b.WriteString(base)
	if !ok {
		return b.String(), secrets
	}
	b.WriteByte('?')
	for i, item := range strings.Split(query, "&") {
		if i > 0 {
			b.WriteByte('&')
		}
		rawKey, rawValue, ok := strings.Cut(item, "=")
		if !ok || !isPasswordKey(strings.TrimSpace(decodeLenient(rawKey))) {
			b.WriteString(item)
			continue
		}
		b.WriteString(rawKey + "=" + redactMask)
		secrets = append(secrets, rawValue, decodeLenient(rawValue))
	}
	return b.String(), secrets
}

// decodeLenient decodes %XX escapes and keeps malformed ones as they are.
func decodeLenient(s string) string {
	if v, err := url.PathUnescape(s); err == nil {
		return v
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+3], 16, 8); err == nil {
				b.WriteByte(byte(v))
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// redactKeywordValue masks the password values of a keyword/value string.
// It reads pairs as extractFromKeywordValue does, but a malformed pair does
// not stop it: the keyword is the last word before each '=', and an
// unterminated quote runs to the end of the string.
func redactKeywordValue(s string) (string, []string) {
	var b strings.Builder
	var secrets []string
	for {
		eq := strings.IndexByte(s, '=')
		if eq < 0 {
			b.WriteString(s)
			return b.String(), secrets
		}
		var key string
		if words := strings.Fields(s[:eq]); len(words) > 0 {
			key = words[len(words)-1]
		}
		b.WriteString(s[:eq+1])
		s = s[eq+1:]
		spaces := len(s) - len(strings.TrimLeft(s, asciiSpace))
		b.WriteString(s[:spaces])
		s = s[spaces:]
		raw, value, _ := readKeywordValue(s)
		s = s[len(raw):]
		if isPasswordKey(key) {
			b.WriteString(redactMask)
			secrets = append(secrets, raw, value)
		} else {
			b.WriteString(raw)
		}
	}
}

// readKeywordValue reads the value at the start of s as pgconn does:
// single-quoted (to the closing quote) or up to the next space, with
// backslash escapes either way. It returns the value as written and its
// meaning; closed is false for a quote that never closes, whose raw value
// runs to the end of s.
func readKeywordValue(s string) (raw, value string, closed bool) {
	var v strings.Builder
	quoted := strings.HasPrefix(s, "'")
	i := 0
	if quoted {
		i = 1
	}
	for ; i < len(s); i++ {
		c := s[i]
		if quoted && c == '\'' {
			return s[:i+1], v.String(), true
		}
		if !quoted && strings.IndexByte(asciiSpace, c) >= 0 {
			break
		}
		if c == '\\' && i+1 < len(s) {
			i++
			c = s[i]
		}
		v.WriteByte(c)
	}
	return s[:i], v.String(), !quoted
}

// setParam applies one cluster_* connection-string parameter.
func (c *Config) setParam(key, value string) error {
	invalid := func(why any) error {
		return fmt.Errorf("clusterpool: %s: invalid value %q: %v", key, value, why)
	}
	switch key {
	case paramBalanceInterval, paramProbeInterval:
		d, err := time.ParseDuration(value)
		if err != nil {
			return invalid(err)
		}
		if why := checkInterval(d); why != "" {
			return invalid(why)
		}
		if key == paramBalanceInterval {
			c.BalanceInterval = d
		} else {
			c.ProbeInterval = d
		}
	case paramMaxRetries:
		n, err := strconv.ParseInt(value, 10, 32)
		if err != nil {
			return invalid(err)
		}
		if n < 0 {
			return invalid("must not be negative")
		}
		c.MaxRetries = int(n)
	case paramConnectRate:
		r, err := strconv.ParseFloat(value, 64)
		if err != nil {
			return invalid(err)
		}
		if r < 0 || math.IsNaN(r) {
			return invalid("must be 0 (no limit) or more")
		}
		c.ConnectRate = r
	case paramNodeIdentity:
		id := NodeIdentity(strings.ToLower(value))
		if id == "" || !id.valid() {
			return invalid("must be auto, backendkey, query or none")
		}
		c.NodeIdentity = id
	default:
		return fmt.Errorf("clusterpool: unknown connection parameter %q", key)
	}
	return nil
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
	case c.MaxRetries < 0:
		return invalid("MaxRetries", c.MaxRetries, "must not be negative")
	case c.ConnectRate < 0 || math.IsNaN(c.ConnectRate):
		return invalid("ConnectRate", c.ConnectRate, "must be 0 (no limit) or more")
	case c.Tracer != nil && !implementsTracer(c.Tracer):
		return invalid("Tracer", fmt.Sprintf("of type %T", c.Tracer), "implements none of "+tracerInterfaces)
	case !c.NodeIdentity.valid():
		return invalid("NodeIdentity", strconv.Quote(string(c.NodeIdentity)), "must be auto, backendkey, query or none")
	}
	return nil
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
	maxRetries      int     // 0: no retries
	connectRate     float64 // connections per second; +Inf: no limit
	connectBurst    int     // tokens for a cold start: MaxConns
	identity        NodeIdentity
	identifyNode    func(context.Context, IdentifyNodeParams) (NodeID, string, error)
	// multiHost is true when the connection string lists several distinct
	// host:port pairs, i.e. the pool dials nodes directly and can place
	// connections by reordering hosts.
	multiHost bool
}

func (c *Config) settings() settings {
	s := settings{
		balanceInterval: c.BalanceInterval,
		probeInterval:   c.ProbeInterval,
		maxRetries:      c.MaxRetries,
		connectRate:     c.ConnectRate,
		connectBurst:    max(int(c.MaxConns), 1),
		identity:        c.NodeIdentity,
		identifyNode:    c.IdentifyNode,
		multiHost:       distinctHosts(c.ConnConfig) > 1,
	}
	if s.balanceInterval == 0 {
		s.balanceInterval = DefaultBalanceInterval
	}
	if s.probeInterval == 0 {
		s.probeInterval = DefaultProbeInterval
	}
	if s.connectRate == 0 {
		s.connectRate = math.Inf(1)
	}
	if s.identity == "" {
		s.identity = NodeIdentityAuto
	}
	return s
}

// distinctHosts counts the distinct host:port pairs pgx may dial. Fallbacks
// also hold TLS/plain variants of the same host (sslmode=prefer), which must
// not count as other nodes.
func distinctHosts(cc *pgx.ConnConfig) int {
	seen := map[string]struct{}{hostPort(cc.Host, cc.Port): {}}
	for _, f := range cc.Fallbacks {
		seen[hostPort(f.Host, f.Port)] = struct{}{}
	}
	return len(seen)
}

func hostPort(host string, port uint16) string {
	return host + ":" + strconv.Itoa(int(port))
}

type clusterParam struct{ key, value string }

// extractClusterParams splits the cluster_* parameters out of connString and
// returns the rest unchanged for pgxpool.ParseConfig. It follows pgconn's two
// forms: a URL (postgres:// or postgresql://) and keyword/value pairs.
func extractClusterParams(connString string) (string, []clusterParam, error) {
	if strings.HasPrefix(connString, "postgres://") || strings.HasPrefix(connString, "postgresql://") {
		return extractFromURL(connString)
	}
	return extractFromKeywordValue(connString)
}

func extractFromURL(connString string) (string, []clusterParam, error) {
	// Like pgx (and libpq), only a '/' ends the search for the userinfo: a
	// '@' before it ends a user:password that may itself contain '?'.
	afterUser := len("postgres://")
	if strings.HasPrefix(connString, "postgresql://") {
		afterUser = len("postgresql://")
	}
	if i := strings.IndexAny(connString[afterUser:], "@/"); i >= 0 && connString[afterUser+i] == '@' {
		afterUser += i + 1
	}
	q := strings.IndexByte(connString[afterUser:], '?')
	if q < 0 {
		return connString, nil, nil
	}
	q += afterUser
	base, query := connString[:q], connString[q+1:]
	var kept []string
	var params []clusterParam
	for _, item := range strings.Split(query, "&") {
		rawKey, rawValue, _ := strings.Cut(item, "=")
		// pgx decodes %XX but not '+', and ignores spaces around a key.
		key, err := url.PathUnescape(rawKey)
		key = strings.TrimSpace(key)
		if err != nil || !strings.HasPrefix(key, paramPrefix) {
			// Not ours (or malformed): pgx reports its own errors.
			kept = append(kept, item)
			continue
		}
		value, err := url.PathUnescape(rawValue)
		if err != nil {
			return "", nil, fmt.Errorf("clusterpool: %s: invalid URL escape in value", key)
		}
		params = append(params, clusterParam{key, strings.TrimSpace(value)})
	}
	if len(params) == 0 {
		return connString, nil, nil
	}
	if len(kept) == 0 {
		return base, params, nil
	}
	return base + "?" + strings.Join(kept, "&"), params, nil
}

// extractFromKeywordValue mirrors pgconn's keyword/value tokenizer: key, '='
// with optional spaces around it, then a value that is either single-quoted
// (backslash escapes, may contain spaces) or runs to the next space
// (backslash escapes). Pairs that are not cluster_* are kept verbatim.
func extractFromKeywordValue(connString string) (string, []clusterParam, error) {
	var kept []string
	var params []clusterParam
	s := connString
	for {
		s = strings.TrimLeft(s, asciiSpace)
		if s == "" {
			break
		}
		start := s
		eq := strings.IndexByte(s, '=')
		if eq < 0 {
			// Malformed: leave it to pgx, which reports it without secrets.
			return connString, nil, nil
		}
		key := strings.TrimRight(s[:eq], asciiSpace)
		s = strings.TrimLeft(s[eq+1:], asciiSpace)
		raw, value, closed := readKeywordValue(s)
		if !closed {
			return connString, nil, nil // unterminated quote: pgx reports it
		}
		s = s[len(raw):]
		pair := start[:len(start)-len(s)]
		if strings.HasPrefix(key, paramPrefix) {
			params = append(params, clusterParam{key, value})
		} else {
			kept = append(kept, pair)
		}
	}
	if len(params) == 0 {
		return connString, nil, nil
	}
	return strings.Join(kept, " "), params, nil
}

const asciiSpace = " \t\n\r\v\f"
