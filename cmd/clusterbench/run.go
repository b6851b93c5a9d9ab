package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
)

// options are the command's flags.
type options struct {
	scenarios []string
	duration  time.Duration
	nodes     int
	workers   int
	seed      int64
	outDir    string
	json      bool
	dsn       string
	backend   string
	cluster   []string // cluster_* settings for clusterpool, defaults merged in
	// userCluster are the -cluster settings as given.
	userCluster []string
	// The fleet scenario's: pools, connections per pool, phase length,
	// and whether the servers show CockroachDB's gossip tables.
	pools, poolConns int
	fleetPhase       time.Duration
	fleetGossip      bool
	// pgxpoolChurn: pgxpool's turn also opens and closes a connection this
	// often (0: never), see startChurn.
	pgxpoolChurn time.Duration
	// repeat is how many times each scenario's pair of runs is made (see
	// Repeats).
	repeat int
	// warmup is how long a warm scenario's pool (runPlan.warm) has been up
	// before its load and its faults start.
	warmup time.Duration
}

const (
	backendAuto      = "auto"
	backendPostgres  = "postgres"
	backendInProcess = "inprocess"
)

const usageText = `usage: clusterbench [flags]

Runs each scenario with plain pgxpool and with clusterpool on a local
cluster (PostgreSQL servers behind CockroachDB-like node proxies and a
random TCP load balancer, from the clustertest package), started afresh
with the same seed for each pool; prints a table of results with ratios to
pgxpool and writes an HTML report with plots. Without PostgreSQL on the
machine it uses an in-process Postgres-wire backend instead, and says so.

Scenarios: %s (all), and %s, which run only when named
(-scenario fleet, or -scenario all,fleet,limits); fleet takes about two
minutes.

Flags:
`

// run is the whole command; it returns the process exit code: 0 on success,
// 1 on failure, 2 on bad usage, 130 when interrupted.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, code := parseFlags(args, stderr)
	if o == nil {
		return code
	}
	ccfg, settings, err := clusterpoolSettings(o.cluster)
	if err != nil { // parseFlags checked them
		fmt.Fprintf(stderr, "clusterbench: -cluster: %v\n", err)
		return 2
	}

	// Notes and progress go where the results do not.
	log := stdout
	if o.json {
		log = stderr
	}
	res := &Results{
		Date:     time.Now().UTC().Format(time.RFC3339),
		Args:     append([]string{}, args...),
		Seed:     o.seed,
		Nodes:    o.nodes,
		Workers:  o.workers,
		Duration: o.duration.String(),
		Warmup:   o.warmup.String(),
		Settings: settings,
	}
	h := &harness{opts: *o, cluster: o.cluster, balanceInterval: ccfg.BalanceInterval, userCluster: o.userCluster}

	// The first line says what the benchmark runs on.
	switch {
	case o.dsn != "":
		res.Backend = "dsn"
		h.counterIsHooks = true
		var run []string
		for _, n := range o.scenarios {
			if s, _ := scenarioByName(n); s.destructive {
				res.Skipped = append(res.Skipped, n)
			} else {
				run = append(run, n)
			}
		}
		o.scenarios, h.opts.scenarios = run, run
		fmt.Fprintf(log, "clusterbench: real cluster from -dsn; per-node counts from the pools' own hooks; seed %d\n", o.seed)
		if len(res.Skipped) > 0 {
			fmt.Fprintf(log, "clusterbench: skipped %s: they kill, drain or add nodes, which only the embedded cluster allows\n", strings.Join(res.Skipped, ", "))
		}
		if len(o.scenarios) == 0 {
			fmt.Fprintln(stderr, "clusterbench: nothing left to run against -dsn (only balance and overhead can)")
			return 2
		}
		if err := checkDSN(ctx, o.dsn); err != nil {
			fmt.Fprintf(stderr, "clusterbench: %v\n", err)
			return 1
		}
	case o.backend == backendInProcess:
		res.Backend = "in-process"
		h.inProcess = true
		fmt.Fprintf(log, "clusterbench: embedded %d-node cluster on the in-process Postgres-wire backend (internal/fakepg, -backend inprocess), not PostgreSQL; seed %d\n", o.nodes, o.seed)
	default:
		if err := clustertest.Available(); err != nil {
			if o.backend == backendPostgres {
				fmt.Fprintf(stderr, "clusterbench: %v\n", err)
				return 1
			}
			res.Backend = "in-process"
			h.inProcess = true
			fmt.Fprintf(log, "clusterbench: PostgreSQL not found, so the embedded %d-node cluster runs on the in-process Postgres-wire backend (internal/fakepg) instead; seed %d\n", o.nodes, o.seed)
			fmt.Fprintf(log, "clusterbench: (%v)\n", err)
		} else {
			res.Backend = "postgres"
			fmt.Fprintf(log, "clusterbench: embedded %d-node cluster of PostgreSQL servers behind CockroachDB-like proxies and a random load balancer (clustertest); seed %d\n", o.nodes, o.seed)
		}
	}
	var loadTime time.Duration
	for _, name := range o.scenarios {
		if name == fleetName {
			loadTime += 2 * time.Duration(o.repeat) * newFleetTimeline(o.fleetPhase).end
			_, fs, _ := clusterpoolSettings(mergeParams(fleetClusterDefaults, o.userCluster))
			fmt.Fprintf(log, "clusterbench: fleet: %d pools × %d conns (MinConns = MaxConns), each its own application_name, %d callers each, phase %v; clusterpool with balance interval %s and probe interval %s (as issue 13's harness)\n",
				o.pools, o.poolConns, fleetWorkersPerPool, o.fleetPhase, fs["cluster_balance_interval"], fs["cluster_probe_interval"])
			continue
		}
		if s, _ := scenarioByName(name); s.alternate {
			loadTime += 2 * o.duration
			continue
		}
		loadTime += 2 * time.Duration(o.repeat) * o.duration
	}
	if slices.ContainsFunc(o.scenarios, func(n string) bool { return n != fleetName }) {
		warm := ""
		if names := warmNames(o.scenarios); len(names) > 0 {
			warm = fmt.Sprintf(" (%s on a pool up for %v)", strings.Join(names, ", "), o.warmup)
		}
		fmt.Fprintf(log, "clusterbench: %d workers, pool size %d, %v per scenario per pool%s; clusterpool with %s\n",
			o.workers, o.workers, o.duration, warm, settingsLine(res.Settings))
	}

	h.prog = newProgress(log, loadTime)
	for _, name := range o.scenarios {
		s, _ := scenarioByName(name)
		sr, err := h.runScenario(ctx, s)
		if err != nil {
			if ctx.Err() != nil {
				fmt.Fprintln(stderr, "\nclusterbench: interrupted; the embedded cluster is closed")
				return 130
			}
			fmt.Fprintf(stderr, "clusterbench: %v\n", err)
			return 1
		}
		res.Scenarios = append(res.Scenarios, sr)
	}

	path, err := writeReport(o.outDir, res)
	if err != nil {
		fmt.Fprintf(stderr, "clusterbench: writing the report: %v\n", err)
		return 1
	}
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	res.Report = path
	if o.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			fmt.Fprintf(stderr, "clusterbench: %v\n", err)
			return 1
		}
	} else {
		fmt.Fprintln(stdout)
		writeTable(stdout, res)
		fmt.Fprintln(stdout)
	}
	fmt.Fprintf(log, "report: %s\n", path)
	fmt.Fprintf(log, "same cluster decisions and workload again: add -seed %d\n", o.seed)
	return 0
}

// parseFlags reads the command line; on bad usage it prints why and the
// usage and returns nil with the exit code (0 for -h).
func parseFlags(args []string, stderr io.Writer) (*options, int) {
	var names, separate []string
	for _, s := range allScenarios() {
		if s.separate {
			separate = append(separate, s.name)
		} else {
			names = append(names, s.name)
		}
	}
	fs := flag.NewFlagSet("clusterbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), usageText, strings.Join(names, ", "), strings.Join(separate, ", "))
		fs.PrintDefaults()
	}
	var o options
	scenarioFlag := fs.String("scenario", "all", "comma-separated scenarios to run: all (every scenario but fleet and limits), or names")
	fs.StringVar(scenarioFlag, "scenarios", "all", "the same as -scenario")
	fs.IntVar(&o.pools, "pools", 16, "fleet: how many pools, each with its own application_name")
	fs.IntVar(&o.poolConns, "pool-conns", 10, "fleet: connections per pool (MinConns = MaxConns)")
	fs.BoolVar(&o.fleetGossip, "fleet-gossip", false, "fleet: the servers show CockroachDB's gossip tables (crdb_internal.gossip_liveness, gossip_nodes), kept up to date as nodes join, drain and come back, as for a user with VIEWCLUSTERMETADATA; needs the postgres backend")
	fs.DurationVar(&o.fleetPhase, "fleet-phase", 10*time.Second, "fleet: phase length: the quiet start lasts 2.5 phases (the at-rest window is its last fifth), a phase follows the scale-out, a fifth of one the drain and restart, a phase the restart")
	fs.DurationVar(&o.duration, "duration", 5*time.Second, "how long each scenario runs, for each pool")
	fs.IntVar(&o.nodes, "nodes", 3, "nodes in the embedded cluster")
	fs.IntVar(&o.workers, "workers", 24, "concurrent callers; the pool size is the same (MinConns = MaxConns)")
	fs.Int64Var(&o.seed, "seed", 0, "seed for the load balancer and the workload; 0 picks one (always printed)")
	fs.StringVar(&o.outDir, "out", "clusterbench-report", "directory for the report: index.html, one SVG per scenario, results.json")
	fs.BoolVar(&o.json, "json", false, "print results as JSON on stdout; progress goes to stderr")
	fs.StringVar(&o.dsn, "dsn", "", "run against a real cluster at this connection string instead: only the non-destructive scenarios (balance, overhead) run, and table kv is created if missing")
	clusterFlag := fs.String("cluster", "", "clusterpool settings as comma-separated cluster_* connection-string parameters, e.g. cluster_connect_rate=0,cluster_balance_interval=1s (default: balance and probe intervals 250ms, the rest the library's defaults)")
	fs.IntVar(&o.repeat, "repeat", 1, "run each scenario's pair (pgxpool and clusterpool, each on a fresh cluster with the same seed; pgxpool first in odd pairs, clusterpool first in even ones) this many times, and give the median and range of their p99, max and throughput ratios; the first pair's figures are the table's and the report's (not overhead, whose turns alternate already)")
	fs.DurationVar(&o.pgxpoolChurn, "pgxpool-churn", 0, "pgxpool's turn also opens and closes one connection through the cluster's address this often (0: never), to price connection set-ups on this machine against clusterpool's probes and moves; not in overhead, fleet or limits")
	fs.DurationVar(&o.warmup, "warmup", 3*time.Second, strings.Join(warmNames(names), ", ")+": the load and the faults start once the pool holds its size and has been up this long, as for a service that was running before the fault (0: as soon as it holds its size)")
	fs.StringVar(&o.backend, "backend", backendAuto, "embedded cluster backend: auto (PostgreSQL if installed, else in-process), postgres, or inprocess")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, 0
		}
		return nil, 2
	}
	usageErr := func(format string, a ...any) (*options, int) {
		fmt.Fprintf(stderr, "clusterbench: "+format+"\n", a...)
		fs.Usage()
		return nil, 2
	}
	if fs.NArg() > 0 {
		return usageErr("unexpected argument %q", fs.Arg(0))
	}
	switch {
	case o.duration <= 0:
		return usageErr("-duration must be positive")
	case o.nodes < 2 || o.nodes > 100:
		return usageErr("-nodes must be between 2 and 100")
	case o.workers < 1 || o.workers > 10000:
		return usageErr("-workers must be between 1 and 10000")
	case o.backend != backendAuto && o.backend != backendPostgres && o.backend != backendInProcess:
		return usageErr("-backend must be auto, postgres or inprocess, not %q", o.backend)
	case o.pools < 1 || o.pools > 1000:
		return usageErr("-pools must be between 1 and 1000")
	case o.poolConns < 1 || o.poolConns > 1000:
		return usageErr("-pool-conns must be between 1 and 1000")
	case o.fleetPhase < time.Second:
		return usageErr("-fleet-phase must be at least 1s")
	case o.repeat < 1 || o.repeat > 20:
		return usageErr("-repeat must be between 1 and 20, not %d", o.repeat)
	case o.pgxpoolChurn < 0 || (o.pgxpoolChurn > 0 && o.pgxpoolChurn < time.Millisecond):
		return usageErr("-pgxpool-churn must be 0 (off) or at least 1ms, not %v", o.pgxpoolChurn)
	case o.warmup < 0 || o.warmup > 10*time.Minute:
		return usageErr("-warmup must be between 0 and 10m, not %v", o.warmup)
	}
	for _, n := range strings.Split(*scenarioFlag, ",") {
		n = strings.TrimSpace(n)
		switch {
		case n == "all":
			o.scenarios = append(o.scenarios, names...)
		case n == "":
		case slices.Contains(names, n) || slices.Contains(separate, n):
			o.scenarios = append(o.scenarios, n)
		default:
			return usageErr("unknown scenario %q", n)
		}
	}
	for _, kv := range strings.Split(*clusterFlag, ",") {
		if kv = strings.TrimSpace(kv); kv == "" {
			continue
		}
		if k, _, ok := strings.Cut(kv, "="); !ok || !strings.HasPrefix(k, "cluster_") || strings.ContainsAny(kv, "&? ") {
			return usageErr("-cluster takes cluster_name=value pairs separated by commas, not %q", kv)
		}
		o.cluster = append(o.cluster, kv)
	}
	o.userCluster = o.cluster
	o.cluster = clusterParams(o.cluster)
	if _, _, err := clusterpoolSettings(o.cluster); err != nil {
		return usageErr("-cluster: %v", err)
	}
	o.scenarios = dedupe(o.scenarios)
	if len(o.scenarios) == 0 {
		return usageErr("no scenario given")
	}
	if o.seed == 0 {
		o.seed = rand.Int64N(1<<31-1) + 1
	}
	return &o, 0
}

func settingsLine(s map[string]string) string {
	var parts []string
	for k, v := range s {
		parts = append(parts, k+"="+v)
	}
	slices.Sort(parts)
	return strings.Join(parts, " ")
}

func dedupe(s []string) []string {
	var out []string
	for _, x := range s {
		if !slices.Contains(out, x) {
			out = append(out, x)
		}
	}
	return out
}
