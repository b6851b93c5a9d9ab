package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// progress shows which scenario runs and how far it is: one line rewritten
// in place (\r) on a terminal, plain lines otherwise (logs, CI, pipes).
type progress struct {
	w        io.Writer
	terminal bool
	total    time.Duration // load time of the whole benchmark

	mu   sync.Mutex // protects the fields below
	done time.Duration
	cur  string
}

func newProgress(w io.Writer, total time.Duration) *progress {
	return &progress{w: w, terminal: isTerminal(w), total: total}
}

// isTerminal reports whether w is a character device (a terminal).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func (p *progress) begin(scenario, label string, d time.Duration) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cur = fmt.Sprintf("%-15s %s", scenario, label)
	if !p.terminal {
		fmt.Fprintf(p.w, "%s: running for %v\n", p.cur, d.Round(10*time.Millisecond))
	}
}

// run rewrites the terminal line until ctx ends.
func (p *progress) run(ctx context.Context, start time.Time, d time.Duration) {
	if p == nil || !p.terminal {
		return
	}
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		el := min(time.Since(start), d)
		p.mu.Lock()
		left := p.total - p.done - el
		fmt.Fprintf(p.w, "\r\033[K%s  %4.1fs/%.1fs  (load time left: %s)", p.cur, el.Seconds(), d.Seconds(), left.Round(time.Second))
		p.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (p *progress) end(d time.Duration, ops, errs int64) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done += d
	if p.terminal {
		fmt.Fprint(p.w, "\r\033[K") // clear the progress line
	}
	fmt.Fprintf(p.w, "%s: %d ops, %d errors\n", p.cur, ops, errs)
}
