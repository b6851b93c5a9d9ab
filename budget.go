package clusterpool

import (
	"context"
	"fmt"
	"math"
	"time"

	"golang.org/x/time/rate"
)

// connectBudget is how many new connections the pool may open, and how fast
// (Config.ConnectRate). The burst is at least the pool's MaxConns, so a cold
// start fills the pool at once; what it slows are reconnect storms, such as a
// whole pool reconnecting after a node restart. A connect takes its token in
// BeforeConnect, under the context pgxpool connects with, before dialling and
// with no lock held, so a connect that waits delays only itself.
type connectBudget struct {
	limiter *rate.Limiter // nil: no limit
	obs     *observer
}

func newConnectBudget(perSecond float64, burst int, obs *observer) *connectBudget {
	return &connectBudget{limiter: newConnectLimiter(perSecond, burst), obs: obs}
}

// newConnectLimiter returns the limiter for new connections, or nil when
// perSecond is 0 or +Inf (no limit).
func newConnectLimiter(perSecond float64, burst int) *rate.Limiter {
	if perSecond <= 0 || math.IsInf(perSecond, 1) || math.IsNaN(perSecond) {
		return nil
	}
	burst = max(burst, int(math.Ceil(perSecond)), 1)
	return rate.NewLimiter(rate.Limit(perSecond), burst)
}

// take takes a token for a connect, waiting for one if needed, and reports
// a wait. A token that is there at once costs one limiter call, as Wait
// alone would.
func (b *connectBudget) take(ctx context.Context) error {
	if b.limiter == nil || b.limiter.Allow() {
		return nil
	}
	start := time.Now()
	err := b.limiter.Wait(ctx)
	b.obs.connectThrottled(ctx, time.Since(start), float64(b.limiter.Limit()), err)
	if err != nil {
		return fmt.Errorf("clusterpool: waiting for the connect rate limit (%g/s): %w", float64(b.limiter.Limit()), err)
	}
	return nil
}

// tryTake takes a token only if one is there at now. A redial is a new
// connection for the server too: without a token of its own the connection
// in hand is kept.
func (b *connectBudget) tryTake(now time.Time) bool {
	return b.limiter == nil || b.limiter.AllowN(now, 1)
}
