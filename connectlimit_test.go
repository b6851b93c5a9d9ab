package clusterpool

import (
	"context"
	"strings"
	"testing"
	"time"
)

// Every connect of the pool's own goes through the connect rate limiter:
// the BeforeConnect hook that pgxpool runs lets MaxConns connects (the
// burst) start at once and holds the next one for the rate. At 1 per 1000 h
// nothing refills within the test, so the next connect's wait would outlast
// its context, and the limiter refuses it at once. No server is needed: a
// pool with MinConns 0 dials nothing until asked, and the hook only decides.
func TestBeforeConnectTakesALimiterToken(t *testing.T) {
	const maxConns = 3
	p := startPool(t, "postgres://u@127.0.0.1:1/db?sslmode=disable", func(cfg *Config) {
		cfg.MinConns, cfg.MaxConns = 0, maxConns
		cfg.ConnectRate = 1 / (1000 * time.Hour).Seconds()
	})
	cfg := p.PgxPool().Config()
	for i := range maxConns {
		ctx, cancel := context.WithTimeout(context.Background(), condTimeout)
		err := cfg.BeforeConnect(ctx, cfg.ConnConfig.Copy())
		cancel()
		if err != nil {
			t.Fatalf("connect %d of a burst of %d: %v", i+1, maxConns, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), condTimeout)
	defer cancel()
	err := cfg.BeforeConnect(ctx, cfg.ConnConfig.Copy())
	if err == nil || !strings.Contains(err.Error(), "connect rate limit") {
		t.Fatalf("connect %d, past the burst with no token due for 1000 h: %v, want the limiter's refusal", maxConns+1, err)
	}
	if n := p.ClusterStat().ThrottledConnects(); n != 1 {
		t.Errorf("ClusterStat.ThrottledConnects = %d, want 1", n)
	}
}
