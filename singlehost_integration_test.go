package clusterpool

import (
	"testing"
	"time"

	"github.com/clusterpool/clusterpool/clustertest"
)

// A single-host pool on plain PostgreSQL with the default (auto) identity
// tracks no node, so it is pgxpool: no balancing round, no probe, no sweep
// of its idle connections. On CockroachDB the same pool does balance.
func TestSingleHostPostgresRunsNoLoops(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 1, Postgres: true, InProcess: true})
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 2, 2
		cfg.BalanceInterval = 2 * time.Millisecond
		cfg.ProbeInterval = 2 * time.Millisecond
	})
	if _, err := p.Exec(testCtx(t), "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	waitCond(t, func() string {
		if n := p.Stat().TotalConns(); n < 2 {
			return "pool not filled"
		}
		return ""
	})
	// Many intervals: today's loops would have run hundreds of rounds.
	time.Sleep(200 * time.Millisecond)
	if n := p.ClusterStat().Probes(); n != 0 {
		t.Errorf("plain PostgreSQL, one host: %d probes, want none", n)
	}
	if p.loopsStarted.Load() {
		t.Error("background loops started for a pool that tracks no node")
	}
}

func TestSingleHostCockroachStartsLoops(t *testing.T) {
	t.Parallel()
	c := clustertest.New(t, clustertest.Options{Nodes: 1, InProcess: true})
	p := startPool(t, c.DSN(), func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 2, 2
		cfg.BalanceInterval = 2 * time.Millisecond
		cfg.ProbeInterval = 2 * time.Millisecond
	})
	waitCond(t, func() string {
		if p.ClusterStat().Probes() == 0 {
			return "no probe yet"
		}
		return ""
	})
}
