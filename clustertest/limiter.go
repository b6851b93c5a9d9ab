package clustertest

import "sync"

// limiter caps the queries in flight on one node (Node.SetCapacity). Waiters
// queue on a channel that is closed and replaced whenever a slot frees or the
// cap changes, so a change of capacity takes effect at once.
type limiter struct {
	mu sync.Mutex // protects the fields below
	// max is the cap; 0 means unlimited.
	max int
	// inFlight counts queries holding a slot, also while unlimited, so a cap
	// set mid-run counts the queries already running.
	inFlight int
	// peak is the largest inFlight seen since the last resetPeak (for tests).
	peak int
	// waiters counts acquires waiting on wake, so that a release with no
	// one waiting (the common case) does not replace the channel.
	waiters int
	wake    chan struct{}
}

func newLimiter() *limiter { return &limiter{wake: make(chan struct{})} }

// acquire takes a slot, waiting while the node is at capacity. It returns
// false, without a slot, if done is closed first.
func (l *limiter) acquire(done <-chan struct{}) bool {
	for {
		l.mu.Lock()
		if l.max == 0 || l.inFlight < l.max {
			l.inFlight++
			if l.inFlight > l.peak {
				l.peak = l.inFlight
			}
			l.mu.Unlock()
			return true
		}
		wake := l.wake
		l.waiters++
		l.mu.Unlock()
		var cancelled bool
		select {
		case <-wake:
		case <-done:
			cancelled = true
		}
		l.mu.Lock()
		l.waiters--
		l.mu.Unlock()
		if cancelled {
			return false
		}
	}
}

func (l *limiter) release() {
	l.mu.Lock()
	l.inFlight--
	if l.waiters > 0 {
		l.wakeAllLocked()
	}
	l.mu.Unlock()
}

func (l *limiter) setMax(n int) {
	if n < 0 {
		n = 0
	}
	l.mu.Lock()
	l.max = n
	l.wakeAllLocked()
	l.mu.Unlock()
}

func (l *limiter) wakeAllLocked() {
	close(l.wake)
	l.wake = make(chan struct{})
}

func (l *limiter) stats() (inFlight, peak int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.inFlight, l.peak
}

func (l *limiter) resetPeak() {
	l.mu.Lock()
	l.peak = l.inFlight
	l.mu.Unlock()
}
