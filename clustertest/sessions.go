package clustertest

import (
	"bytes"
	"encoding/binary"
	"sort"
	"sync"
	"time"
)

// acceptLogSize bounds a node's accept log: the times of its last 65,536
// accepted sessions (512 KiB at most), far more than a test opens, so that a
// fleet's reconnect storm can be measured without the log growing forever.
const acceptLogSize = 1 << 16

// sessionLog is a node's server-side record of client sessions, as a
// gateway sees them: the sessions open now per application_name (what
// CockroachDB's SHOW SESSIONS groups by), and when each session was
// accepted. It counts what Node.OpenConns and Node.TotalConns count.
type sessionLog struct {
	// epoch is the cluster's start: accept times are stored as durations
	// since it, which keeps the monotonic clock and takes 8 bytes each.
	epoch time.Time

	mu sync.Mutex // protects the fields below
	// openByApp counts open sessions per application_name; absent means 0.
	openByApp map[string]int
	// open holds each open session's application_name and accept time
	// (since epoch), by the ID accepted returned.
	open   map[uint64]openSession
	lastID uint64
	// accepts is a ring of accept times (since epoch), in order: it grows up
	// to acceptLogSize, then next is the oldest entry and is overwritten.
	accepts []time.Duration
	next    int
}

// openSession is one open session: its application_name and when it was
// accepted (since epoch).
type openSession struct {
	app string
	at  time.Duration
}

func newSessionLog(epoch time.Time) *sessionLog {
	return &sessionLog{epoch: epoch, openByApp: make(map[string]int), open: make(map[uint64]openSession)}
}

// accepted records a session accepted now for app, open until closed(id)
// with the ID it returns, unless it was refused at once (open false: ID 0).
func (l *sessionLog) accepted(app string, open bool) (id uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	// Read the clock under the lock so the ring stays in time order.
	at := time.Since(l.epoch)
	if open {
		l.openByApp[app]++
		l.lastID++
		id = l.lastID
		l.open[id] = openSession{app: app, at: at}
	}
	if len(l.accepts) < acceptLogSize {
		l.accepts = append(l.accepts, at)
		return
	}
	l.accepts[l.next] = at
	l.next = (l.next + 1) % acceptLogSize
	return id
}

// closed records the end of the session accepted gave id, opened for app.
func (l *sessionLog) closed(app string, id uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.open, id)
	if l.openByApp[app] <= 1 {
		delete(l.openByApp, app)
		return
	}
	l.openByApp[app]--
}

// sessions returns the open sessions with their accept times, oldest
// first.
func (l *sessionLog) sessions() []Session {
	l.mu.Lock()
	out := make([]Session, 0, len(l.open))
	for _, s := range l.open {
		out = append(out, Session{App: s.app, Start: l.epoch.Add(s.at)})
	}
	l.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Start.Before(out[j].Start) })
	return out
}

func (l *sessionLog) byApp() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	m := make(map[string]int, len(l.openByApp))
	for app, n := range l.openByApp {
		m[app] = n
	}
	return m
}

// between returns the accept times in [from, to], oldest first, as
// durations since epoch.
func (l *sessionLog) between(from, to time.Time) []time.Duration {
	lo, hi := from.Sub(l.epoch), to.Sub(l.epoch)
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []time.Duration
	for _, part := range [][]time.Duration{l.accepts[l.next:], l.accepts[:l.next]} {
		i := sort.Search(len(part), func(i int) bool { return part[i] >= lo })
		for ; i < len(part) && part[i] <= hi; i++ {
			out = append(out, part[i])
		}
	}
	return out
}

// peakInWindow returns the largest number of times (sorted) that fall within
// one half-open interval [t, t+window).
func peakInWindow(times []time.Duration, window time.Duration) int {
	peak, start := 0, 0
	for end, t := range times {
		for t-times[start] >= window {
			start++
		}
		if n := end - start + 1; n > peak {
			peak = n
		}
	}
	return peak
}

// startupParam returns the value of parameter name in a StartupMessage
// (length, protocol version, then name\0value\0 pairs ending in \0), or ""
// if it is absent or the message is malformed.
func startupParam(pkt []byte, name string) string {
	if len(pkt) < 8 || int(binary.BigEndian.Uint32(pkt)) != len(pkt) {
		return ""
	}
	rest := pkt[8:]
	for {
		k, after, ok := cutNUL(rest)
		if !ok || k == "" {
			return ""
		}
		v, after, ok := cutNUL(after)
		if !ok {
			return ""
		}
		if k == name {
			return v
		}
		rest = after
	}
}

func cutNUL(b []byte) (string, []byte, bool) {
	before, after, ok := bytes.Cut(b, []byte{0})
	return string(before), after, ok
}
