package clusterpool

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

func TestParseConfigDefaults(t *testing.T) {
	cfg, err := ParseConfig("postgres://u:pw@127.0.0.1:5432/db?sslmode=disable")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.BalanceInterval != DefaultBalanceInterval || cfg.ProbeInterval != DefaultProbeInterval ||
		cfg.MaxRetries != DefaultMaxRetries || cfg.ConnectRate != DefaultConnectRate ||
		cfg.NodeIdentity != NodeIdentityAuto {
		t.Errorf("defaults not applied: %+v", cfg)
	}
}

func TestParseConfigClusterParams(t *testing.T) {
	tests := []struct {
		name     string
		conn     string
		check    func(*Config) bool
		wantRest string // the connection string pgx was given
	}{
		{
			name:     "url",
			conn:     "postgres://u:pw@h:5432/db?sslmode=disable&cluster_balance_interval=2s&application_name=x&cluster_max_retries=3",
			check:    func(c *Config) bool { return c.BalanceInterval == 2*time.Second && c.MaxRetries == 3 },
			wantRest: "postgres://u:pw@h:5432/db?sslmode=disable&application_name=x",
		},
		{
			name:     "url only cluster params",
			conn:     "postgresql://u@h/db?cluster_node_identity=query&cluster_connect_rate=2.5",
			check:    func(c *Config) bool { return c.NodeIdentity == NodeIdentityQuery && c.ConnectRate == 2.5 },
			wantRest: "postgresql://u@h/db",
		},
		{
			name:     "url escaped value",
			conn:     "postgres://u@h/db?cluster_probe_interval=1m%2030s&sslmode=disable",
			check:    func(c *Config) bool { return false },
			wantRest: "",
		},
		{
			name:     "url escaped key",
			conn:     "postgres://u@h/db?cluster%5Fprobe_interval=90s&sslmode=disable",
			check:    func(c *Config) bool { return c.ProbeInterval == 90*time.Second },
			wantRest: "postgres://u@h/db?sslmode=disable",
		},
		{
			name:     "url password with ?",
			conn:     "postgres://u:p?w@h:5432/db?cluster_max_retries=2&sslmode=disable",
			check:    func(c *Config) bool { return c.MaxRetries == 2 && c.ConnConfig.Password == "p?w" },
			wantRest: "postgres://u:p?w@h:5432/db?sslmode=disable",
		},
		{
			name:     "url multiple hosts",
			conn:     "postgres://u@h1:1,h2:2/db?cluster_max_retries=0",
			check:    func(c *Config) bool { return c.MaxRetries == -1 && len(c.ConnConfig.Fallbacks) > 0 },
			wantRest: "postgres://u@h1:1,h2:2/db",
		},
		{
			name:     "keyword/value",
			conn:     "host=h user=u cluster_max_retries=7 dbname=db cluster_node_identity=none",
			check:    func(c *Config) bool { return c.MaxRetries == 7 && c.NodeIdentity == NodeIdentityNone },
			wantRest: "host=h user=u dbname=db",
		},
		{
			name:     "keyword/value spaces around =",
			conn:     "host = h cluster_balance_interval = 3s  user=u",
			check:    func(c *Config) bool { return c.BalanceInterval == 3*time.Second },
			wantRest: "host = h user=u",
		},
		{
			name: "keyword/value quoted",
			conn: `password='a b\'c cluster_max_retries=9' cluster_node_identity='BackendKey' host=h`,
			check: func(c *Config) bool {
				return c.MaxRetries == DefaultMaxRetries && c.NodeIdentity == NodeIdentityBackendKey
			},
			wantRest: `password='a b\'c cluster_max_retries=9' host=h`,
		},
		{
			name:     "keyword/value quoted cluster value with spaces",
			conn:     `host=h cluster_balance_interval='1m 30s'`,
			check:    func(c *Config) bool { return false },
			wantRest: "",
		},
		{
			name:     "connect rate inf",
			conn:     "host=h cluster_connect_rate=inf",
			check:    func(c *Config) bool { return math.IsInf(c.ConnectRate, 1) },
			wantRest: "host=h",
		},
		{
			// A 0 spelt out keeps its meaning: no limit, the default
			// interval, no retries. In the Config, off is negative.
			name:     "zero values",
			conn:     "host=h cluster_connect_rate=0 cluster_balance_interval=0s cluster_max_retries=0",
			check:    func(c *Config) bool { return c.ConnectRate == -1 && c.BalanceInterval == 0 && c.MaxRetries == -1 },
			wantRest: "host=h",
		},
		{
			name:     "off",
			conn:     "postgres://u@h/db?cluster_connect_rate=off&cluster_max_retries=OFF&cluster_probe_max_interval=off",
			check:    func(c *Config) bool { return c.ConnectRate == -1 && c.MaxRetries == -1 && c.ProbeMaxInterval < 0 },
			wantRest: "postgres://u@h/db",
		},
		{
			name: "probe max interval",
			conn: "host=h cluster_probe_interval=500ms cluster_probe_max_interval=2s",
			check: func(c *Config) bool {
				return c.ProbeInterval == 500*time.Millisecond && c.ProbeMaxInterval == 2*time.Second
			},
			wantRest: "host=h",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rest, _, err := extractClusterParams(tt.conn)
			if err != nil {
				t.Fatalf("extractClusterParams: %v", err)
			}
			cfg, err := ParseConfig(tt.conn)
			if tt.wantRest == "" { // expected to fail: the value is not a duration
				if err == nil {
					t.Fatalf("ParseConfig succeeded, want an error")
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseConfig: %v", err)
			}
			if rest != tt.wantRest {
				t.Errorf("rest = %q, want %q", rest, tt.wantRest)
			}
			if !tt.check(cfg) {
				t.Errorf("config not as expected: %+v", cfg)
			}
			if _, ok := cfg.ConnConfig.RuntimeParams["cluster_max_retries"]; ok {
				t.Errorf("cluster parameter left in RuntimeParams")
			}
			for k := range cfg.ConnConfig.RuntimeParams {
				if strings.HasPrefix(k, "cluster_") {
					t.Errorf("cluster parameter %q left in RuntimeParams", k)
				}
			}
		})
	}
}

func TestParseConfigErrors(t *testing.T) {
	const secret = "s3cr3tpw"
	tests := []struct {
		conn string
		want []string // substrings of the error
	}{
		{"postgres://u:" + secret + "@h/db?cluster_max_retries=abc", []string{"cluster_max_retries", `"abc"`}},
		{"postgres://u:" + secret + "@h/db?cluster_max_retries=-1", []string{"cluster_max_retries", `"-1"`, "negative"}},
		{"postgres://u:" + secret + "@h/db?cluster_balance_interval=-5s", []string{"cluster_balance_interval", `"-5s"`, "negative"}},
		{"postgres://u:" + secret + "@h/db?cluster_probe_interval=soon", []string{"cluster_probe_interval", `"soon"`}},
		{"postgres://u:" + secret + "@h/db?cluster_connect_rate=-2", []string{"cluster_connect_rate", `"-2"`}},
		{"postgres://u:" + secret + "@h/db?cluster_connect_rate=NaN", []string{"cluster_connect_rate", `"NaN"`}},
		{"postgres://u:" + secret + "@h/db?cluster_connect_rate=-Inf", []string{"cluster_connect_rate", `"-Inf"`}},
		{"postgres://u:" + secret + "@h/db?cluster_connect_rate=1e999", []string{"cluster_connect_rate", `"1e999"`, "range"}},
		{"postgres://u:" + secret + "@h/db?cluster_balance_interval=1ns", []string{"cluster_balance_interval", `"1ns"`, "at least 1ms"}},
		{"postgres://u:" + secret + "@h/db?cluster_probe_interval=999us", []string{"cluster_probe_interval", `"999us"`, "at least 1ms"}},
		{"postgres://u:" + secret + "@h/db?cluster_probe_interval=5", []string{"cluster_probe_interval", `"5"`, "missing unit"}},
		{"postgres://u:" + secret + "@h/db?cluster_probe_max_interval=-1s", []string{"cluster_probe_max_interval", `"-1s"`, "negative", "off"}},
		{"postgres://u:" + secret + "@h/db?cluster_probe_max_interval=soon", []string{"cluster_probe_max_interval", `"soon"`}},
		{"postgres://u:" + secret + "@h/db?cluster_max_retries=99999999999", []string{"cluster_max_retries", `"99999999999"`, "range"}},
		{"postgres://u:" + secret + "@h/db?cluster_max_retries=", []string{"cluster_max_retries", `""`}},
		{"postgres://u:" + secret + "@h/db?cluster_node_identity=", []string{"cluster_node_identity", `""`}},
		{"postgres://u:" + secret + "@h/db?cluster_node_identity=magic", []string{"cluster_node_identity", `"magic"`}},
		{"postgres://u:" + secret + "@h/db?cluster_max_retires=3", []string{"unknown", "cluster_max_retires"}},
		{"host=h password=" + secret + " cluster_max_retries=x", []string{"cluster_max_retries", `"x"`}},
		{"host=h password='" + secret + "' cluster_bogus=1", []string{"cluster_bogus"}},
		// A cluster setting is checked before the rest of the string.
		{"postgres://u:" + secret + "@h:x/db?cluster_max_retries=x", []string{"cluster_max_retries", `"x"`}},
		// pgx's own errors, with every password masked.
		{"postgres://u:" + secret + "@h/db?pool_max_conns=zz&cluster_max_retries=1", []string{"clusterpool: cannot parse", "pool_max_conns", "u:xxxxx@h"}},
		{"host=h password=" + secret + " pool_max_conns=zz", []string{"pool_max_conns", "password=xxxxx"}},
		{"postgres://u@h/db?sslpassword=" + secret + "&password=" + secret + "&port=x", []string{"sslpassword=xxxxx&password=xxxxx"}},
		{"postgres://u:pass/" + secret + "@h:x/db", []string{"invalid port"}},
		{"postgres://u:" + secret + "%zz@h/db", []string{"cannot parse"}},
		// pgx masks a quoted password only up to an escaped quote in it;
		// found by FuzzParseConfig.
		{`host=h password='` + secret + `\' ` + secret + `' port=x`, []string{"invalid port", "password=xxxxx port=x"}},
		{`0 password='` + secret + `\' ` + secret + `'`, []string{"missing", "password=xxxxx"}},
		{`host=h password='` + secret + ` unterminated`, []string{"unterminated"}},
		{`host=h sslpassword=` + secret + `\ ` + secret + ` port=x`, []string{"invalid port"}},
	}
	for _, tt := range tests {
		_, err := ParseConfig(tt.conn)
		if err == nil {
			t.Errorf("ParseConfig(%q) succeeded, want an error", tt.conn)
			continue
		}
		msg := err.Error()
		for _, w := range tt.want {
			if !strings.Contains(msg, w) {
				t.Errorf("ParseConfig(%q) error %q does not contain %q", tt.conn, msg, w)
			}
		}
		if strings.Contains(msg, secret) {
			t.Errorf("ParseConfig error leaks the password: %q", msg)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	base, err := ParseConfig("host=h")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		modify func(*Config)
		want   string // "" means valid
	}{
		{"defaults", func(*Config) {}, ""},
		{"zeros", func(c *Config) {
			c.BalanceInterval, c.ProbeInterval, c.MaxRetries, c.ConnectRate, c.NodeIdentity = 0, 0, 0, 0, ""
		}, ""},
		{"smallest intervals", func(c *Config) { c.BalanceInterval, c.ProbeInterval = MinInterval, MinInterval }, ""},
		{"no connect limit", func(c *Config) { c.ConnectRate = math.Inf(1) }, ""},
		{"tracer", func(c *Config) { c.Tracer = retryOnly{new(int)} }, ""},
		{"hook tracer", func(c *Config) { c.Tracer = &hookRecorder{} }, ""},
		{"negative balance", func(c *Config) { c.BalanceInterval = -time.Second }, "Config.BalanceInterval: invalid value -1s"},
		{"1ns balance", func(c *Config) { c.BalanceInterval = 1 }, "Config.BalanceInterval: invalid value 1ns: must be 0 (the default) or at least 1ms"},
		{"negative probe", func(c *Config) { c.ProbeInterval = -1 }, "Config.ProbeInterval: invalid value -1ns"},
		{"5ns probe (a missing unit)", func(c *Config) { c.ProbeInterval = 5 }, "Config.ProbeInterval: invalid value 5ns"},
		{"probe max below the probe interval", func(c *Config) { c.ProbeMaxInterval = time.Second }, "Config.ProbeMaxInterval: invalid value 1s: must be 0 (the default), negative (no back-off) or at least ProbeInterval (5s)"},
		{"probe max off", func(c *Config) { c.ProbeMaxInterval = -1 }, ""},
		{"probe max at the probe interval", func(c *Config) { c.ProbeInterval, c.ProbeMaxInterval = time.Second, time.Second }, ""},
		{"negative retries: off", func(c *Config) { c.MaxRetries = -1 }, ""},
		{"negative rate: no limit", func(c *Config) { c.ConnectRate = -1 }, ""},
		{"-Inf rate: no limit", func(c *Config) { c.ConnectRate = math.Inf(-1) }, ""},
		{"NaN rate", func(c *Config) { c.ConnectRate = math.NaN() }, "Config.ConnectRate: invalid value NaN: must be a number"},
		{"bad identity", func(c *Config) { c.NodeIdentity = "nope" }, `Config.NodeIdentity: invalid value "nope"`},
		{"identity not lower case", func(c *Config) { c.NodeIdentity = "BackendKey" }, `Config.NodeIdentity: invalid value "BackendKey"`},
		{"tracer implementing nothing", func(c *Config) { c.Tracer = "log" }, "Config.Tracer: invalid value of type string: implements none of"},
		{"query tracer only", func(c *Config) { c.Tracer = releaseTracer{} }, "Config.Tracer: invalid value of type clusterpool.releaseTracer"},
		{"nil fallback", func(c *Config) { c.ConnConfig.Fallbacks = append(c.ConnConfig.Fallbacks, nil) }, "Config.ConnConfig.Fallbacks: invalid value with a nil element"},
		{"MaxConns 0", func(c *Config) { c.MaxConns = 0 }, "Config.MaxConns: invalid value 0: must be at least 1"},
		{"MaxConns negative", func(c *Config) { c.MaxConns = -3 }, "Config.MaxConns: invalid value -3"},
		{"HealthCheckPeriod 0", func(c *Config) { c.HealthCheckPeriod = 0 }, "Config.HealthCheckPeriod: invalid value 0s: must be positive"},
		{"nil pgxpool config", func(c *Config) { c.Config = nil }, "Config.Config (nil) was not created by ParseConfig"},
		{"hand-built pgxpool config", func(c *Config) { c.Config = &pgxpool.Config{ConnConfig: c.ConnConfig, MaxConns: 4} }, "Config.Config (a *pgxpool.Config) was not created by ParseConfig"},
		{"nil ConnConfig", func(c *Config) { c.ConnConfig = nil }, "Config.ConnConfig (nil) was not created by ParseConfig"},
		{"hand-built ConnConfig", func(c *Config) { c.ConnConfig = &pgx.ConnConfig{} }, "Config.ConnConfig (a *pgx.ConnConfig) was not created by ParseConfig"},
		{"hand-built ConnConfig around a parsed pgconn.Config", func(c *Config) { c.ConnConfig = &pgx.ConnConfig{Config: c.ConnConfig.Config} }, "Config.ConnConfig"},
		{"parsed ConnConfig around a hand-built pgconn.Config", func(c *Config) { c.ConnConfig.Config = pgconn.Config{Host: "h", Port: 5432} }, "Config.ConnConfig"},
		{"ConnConfig from pgx.ParseConfig", func(c *Config) {
			cc, err := pgx.ParseConfig("host=other")
			if err != nil {
				t.Fatal(err)
			}
			c.ConnConfig = cc
		}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base.Copy()
			tt.modify(c)
			err := c.validate()
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("validate() = %v, want nil", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Errorf("validate() = %v, want error containing %q", err, tt.want)
			}
			// NewWithConfig gives the same answer, and never panics.
			if tt.want == "" {
				return
			}
			p, err := NewWithConfig(context.Background(), c)
			if err == nil {
				p.Close()
				t.Fatalf("NewWithConfig succeeded, want an error containing %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("NewWithConfig: %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

// A hand-built Config gets a clear error from NewWithConfig, never a panic
// (pgxpool panics on a config not made by ParseConfig, and pgx does so in
// a background goroutine for a hand-built connection config); the zero
// cluster settings of a parsed Config are the documented defaults.
func TestNewWithConfigHandBuilt(t *testing.T) {
	poolCfg, err := pgxpool.ParseConfig("host=127.0.0.1 port=1")
	if err != nil {
		t.Fatal(err)
	}
	handConn := poolCfg.Copy()
	handConn.ConnConfig = &pgx.ConnConfig{}
	tests := []struct {
		name   string
		config *Config
		want   string
	}{
		{"nil", nil, "clusterpool: nil Config"},
		{"zero Config", &Config{}, "Config.Config (nil) was not created by ParseConfig"},
		{"zero pgxpool.Config", &Config{Config: &pgxpool.Config{}}, "Config.ConnConfig (nil) was not created by ParseConfig"},
		{"zero pgxpool.Config with a parsed ConnConfig", &Config{Config: &pgxpool.Config{ConnConfig: poolCfg.ConnConfig}}, "Config.Config (a *pgxpool.Config)"},
		{"parsed pgxpool.Config with a hand-built ConnConfig", &Config{Config: handConn}, "Config.ConnConfig (a *pgx.ConnConfig)"},
		{"parsed pgxpool.Config, zero cluster settings", &Config{Config: poolCfg.Copy()}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := NewWithConfig(context.Background(), tt.config)
			if tt.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				defer p.Close()
				s := p.settings
				if s.balanceInterval != DefaultBalanceInterval || s.probeInterval != DefaultProbeInterval ||
					s.maxRetries != DefaultMaxRetries || s.connectRate != DefaultConnectRate || s.identity != NodeIdentityAuto {
					t.Errorf("zero cluster settings: %+v", s)
				}
				return
			}
			if err == nil {
				p.Close()
				t.Fatalf("NewWithConfig succeeded, want an error containing %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("NewWithConfig: %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

// Copy of a hand-built Config does not panic either.
func TestConfigCopyHandBuilt(t *testing.T) {
	for _, c := range []*Config{{}, {Config: &pgxpool.Config{}}} {
		n := c.Copy()
		if (n.Config == nil) != (c.Config == nil) || (n.Config != nil && n.Config == c.Config) {
			t.Errorf("Copy(%+v) = %+v", c, n)
		}
	}
}

func TestConfigSettingsDefaults(t *testing.T) {
	cfg, err := ParseConfig("host=h pool_max_conns=7")
	if err != nil {
		t.Fatal(err)
	}
	cfg.BalanceInterval, cfg.ProbeInterval, cfg.MaxRetries, cfg.ConnectRate, cfg.NodeIdentity = 0, 0, 0, 0, ""
	s := cfg.settings()
	if s.balanceInterval != DefaultBalanceInterval || s.probeInterval != DefaultProbeInterval || s.maxRetries != DefaultMaxRetries ||
		s.connectRate != DefaultConnectRate || s.connectBurst != 7 || s.identity != NodeIdentityAuto || s.multiHost {
		t.Errorf("settings() from zeros = %+v", s)
	}
	// Off is negative.
	cfg.MaxRetries, cfg.ConnectRate = -1, -1
	if s := cfg.settings(); s.maxRetries != 0 || !math.IsInf(s.connectRate, 1) {
		t.Errorf("settings() from -1 = %+v", s)
	}
	cfg.MaxRetries, cfg.ConnectRate = -7, math.Inf(1)
	if s := cfg.settings(); s.maxRetries != 0 || !math.IsInf(s.connectRate, 1) {
		t.Errorf("settings() from -7, +Inf = %+v", s)
	}
}

// A Config wrapping pgxpool.ParseConfig's config means what ParseConfig of
// the same string means, and ClusterConfig reports the values in effect.
// A 0 spelt out in the string keeps its meaning (no retries, no limit);
// the defaults are what a zero in the struct means.
func TestConfigWrappedPgxpoolConfig(t *testing.T) {
	addr := "127.0.0.1:1"
	for _, conn := range []string{
		"postgres://u@" + addr + "/db?sslmode=disable",
		"host=127.0.0.1 port=1 pool_max_conns=3",
	} {
		pc, err := pgxpool.ParseConfig(conn)
		if err != nil {
			t.Fatal(err)
		}
		parsed, err := ParseConfig(conn)
		if err != nil {
			t.Fatal(err)
		}
		for name, cfg := range map[string]*Config{"wrapped": {Config: pc}, "parsed": parsed} {
			p, err := NewWithConfig(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			got := p.ClusterConfig()
			s := p.settings
			p.Close()
			if got.BalanceInterval != DefaultBalanceInterval || got.ProbeInterval != DefaultProbeInterval ||
				got.MaxRetries != DefaultMaxRetries || got.ConnectRate != DefaultConnectRate || got.NodeIdentity != NodeIdentityAuto {
				t.Errorf("%s %q: ClusterConfig() = %+v, want the defaults", name, conn, got)
			}
			if s.maxRetries != DefaultMaxRetries || s.connectRate != DefaultConnectRate || s.connectBurst != int(pc.MaxConns) {
				t.Errorf("%s %q: settings %+v, want the defaults", name, conn, s)
			}
		}
	}

	off, err := ParseConfig("host=127.0.0.1 port=1 cluster_max_retries=0 cluster_connect_rate=0")
	if err != nil {
		t.Fatal(err)
	}
	p, err := NewWithConfig(context.Background(), off)
	if err != nil {
		t.Fatal(err)
	}
	got, s := p.ClusterConfig(), p.settings
	p.Close()
	if got.MaxRetries >= 0 || got.ConnectRate >= 0 || s.maxRetries != 0 || !math.IsInf(s.connectRate, 1) {
		t.Errorf("=0 in the string: ClusterConfig() MaxRetries %d, ConnectRate %v; settings %+v; want off", got.MaxRetries, got.ConnectRate, s)
	}
}

func TestDistinctHosts(t *testing.T) {
	tests := []struct {
		conn string
		want int
	}{
		{"host=h", 1},
		{"host=h sslmode=prefer", 1}, // TLS and plain fallbacks to the same host
		{"postgres://u@h1:1,h2:2/db", 2},
		{"postgres://u@h1:1,h1:1/db", 1},
		{"postgres://u@h1:1,h1:2,h2:1/db?sslmode=prefer", 3},
	}
	for _, tt := range tests {
		cfg, err := ParseConfig(tt.conn)
		if err != nil {
			t.Fatal(err)
		}
		if got := distinctHosts(cfg.ConnConfig); got != tt.want {
			t.Errorf("distinctHosts(%q) = %d, want %d", tt.conn, got, tt.want)
		}
	}
}

func TestConfigCopy(t *testing.T) {
	cfg, err := ParseConfig("host=h")
	if err != nil {
		t.Fatal(err)
	}
	c := cfg.Copy()
	c.MaxConns = 99
	c.MaxRetries = 1
	c.ConnConfig.Host = "other"
	if cfg.MaxConns == 99 || cfg.MaxRetries == 1 || cfg.ConnConfig.Host == "other" {
		t.Error("Copy shares state with the original")
	}
}

// pgx's parse error is still there for errors.As, with the password masked
// in its ConnString too.
func TestParseConfigErrorUnwraps(t *testing.T) {
	_, err := ParseConfig("postgres://u:s3cr3tpw@h:x/db?cluster_max_retries=1")
	var pce *pgconn.ParseConfigError
	if !errors.As(err, &pce) {
		t.Fatalf("ParseConfig error %v does not unwrap to a *pgconn.ParseConfigError", err)
	}
	if strings.Contains(pce.ConnString, "s3cr3tpw") || strings.Contains(pce.Error(), "s3cr3tpw") {
		t.Errorf("unwrapped error leaks the password: %q, %v", pce.ConnString, pce)
	}
	if !strings.Contains(pce.ConnString, "cluster_max_retries=1") {
		t.Errorf("unwrapped ConnString %q is not the caller's string", pce.ConnString)
	}
}

// A parameter that looks like a cluster setting but is none is an error
// naming it and its value, in both forms, whatever its case; it never
// reaches the server as a run-time parameter. Names are case-sensitive.
func TestParseConfigUnknownClusterParam(t *testing.T) {
	tests := []struct {
		param string
		want  string // in the error, after the name and value
	}{
		{"Cluster_Balance_Interval=1s", "cluster parameter names are case-sensitive; write cluster_balance_interval"},
		{"CLUSTER_MAX_RETRIES=3", "cluster parameter names are case-sensitive; write cluster_max_retries"},
		{"cluster_max_retry=3", "did you mean cluster_max_retries?"},
		{"cluster_max_retires=3", "did you mean cluster_max_retries?"},
		{"Cluster_Conect_Rate=3", "did you mean cluster_connect_rate?"},
		{"cluster_nodeidentity=none", "did you mean cluster_node_identity?"},
		{"cluster_bogus=3", "known ones are cluster_balance_interval, "},
	}
	for _, tt := range tests {
		key, value, _ := strings.Cut(tt.param, "=")
		for _, conn := range []string{
			"postgres://u:pw@h/db?sslmode=disable&" + tt.param,
			"host=h password=pw " + tt.param + " sslmode=disable",
		} {
			cfg, err := ParseConfig(conn)
			if err == nil {
				t.Errorf("ParseConfig(%q) succeeded (RuntimeParams %v), want an error", conn, cfg.ConnConfig.RuntimeParams)
				continue
			}
			want := fmt.Sprintf("clusterpool: unknown connection parameter %q (value %q): %s", key, value, tt.want)
			if !strings.HasPrefix(err.Error(), want) {
				t.Errorf("ParseConfig(%q) = %v, want an error starting %q", conn, err, want)
			}
		}
	}
}

// An IPv6 host's key reads back with net.SplitHostPort, as placement does
// before marking a host down, and equals the key of the address a
// connection reports.
func TestHostPortIPv6(t *testing.T) {
	for _, tt := range []struct {
		host   string
		remote string
	}{
		{"::1", "[::1]:5432"},
		{"fe80::1%eth0", "[fe80::1%eth0]:5432"},
		{"127.0.0.1", "127.0.0.1:5432"},
		{"db.example.com", "db.example.com:5432"},
	} {
		key := hostPort(tt.host, 5432)
		host, port, err := net.SplitHostPort(key)
		if err != nil || host != tt.host || port != "5432" {
			t.Errorf("hostPort(%q, 5432) = %q: SplitHostPort gives %q, %q, %v", tt.host, key, host, port, err)
		}
		if got := addrKey(tt.remote); got != key {
			t.Errorf("addrKey(%q) = %q, want %q (the host's key)", tt.remote, got, key)
		}
	}
}
