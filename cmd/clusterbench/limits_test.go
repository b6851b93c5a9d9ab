package main

import (
	"context"
	"path/filepath"
	"testing"
	"time"
)

// TestLimitsInProcess runs the limits scenario end to end on the in-process
// backend: clusterpool ends at the shrunk size with its noisy work within
// the workload limit; pgxpool keeps its size and lets the noisy work take
// more; nobody sees an error.
func TestLimitsInProcess(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	out := filepath.Join(t.TempDir(), "report")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, stderr, code := runJSON(t, ctx, "-backend", "inprocess", "-scenario", "limits", "-workers", "12", "-duration", "2s", "-seed", "5", "-out", out)
	if code != 0 {
		t.Fatalf("exit code %d\n%s", code, stderr)
	}
	checkSane(t, res, []string{limitsName})
	checkReport(t, res, out)
	figure := func(pool, name string) float64 {
		t.Helper()
		for _, p := range res.Scenarios[0].Pools {
			if p.Pool != pool {
				continue
			}
			if p.Errors != 0 {
				t.Errorf("%s: %d errors: %v", pool, p.Errors, p.ErrorExamples)
			}
			if m := p.metric(name); m != nil && m.Value != nil {
				return *m.Value
			}
		}
		t.Fatalf("%s: no figure %s", pool, name)
		return 0
	}
	if got := figure(clusterpoolKind, "conns_end"); got != 4 {
		t.Errorf("clusterpool ends with %v connections, want the shrunk size 4", got)
	}
	if got := figure(pgxpoolKind, "conns_end"); got != 12 {
		t.Errorf("pgxpool ends with %v connections, want its size 12", got)
	}
	if got := figure(clusterpoolKind, "noisy_peak"); got > limitsBatchLimit || got == 0 {
		t.Errorf("clusterpool's noisy work peaked at %v connections, limit %d", got, limitsBatchLimit)
	}
	if got := figure(pgxpoolKind, "noisy_peak"); got <= limitsBatchLimit {
		t.Errorf("pgxpool's noisy work peaked at %v connections: the scenario shows no difference", got)
	}
}
