// Command mutate checks that the root package's tests can fail: it applies
// one-line breaks of the library (mutants) one at a time, each in a
// temporary copy of the repository, and runs the tests expected to kill
// each one. A mutant counts as killed when at least one unit test and at
// least one integration test (on clustertest) fail on it.
//
// Run it from anywhere in the repository (PostgreSQL binaries on PATH, as
// for the integration tests):
//
//	go run ./internal/mutate              # every mutant
//	go run ./internal/mutate -run eviction # mutants whose name matches
//
// Each mutation site is found by a code snippet searched across the root
// package's non-test .go files (runs of white space match any white space),
// never by file name or line, so moving code between files does not break
// the check; a snippet that matches nothing, or more than one place, stops
// the run with "mutation site not found" (or "ambiguous"): update the
// mutant next to the code it breaks.
//
// Before the mutants, the same tests run on the unmodified copy (skip with
// -nobaseline): a test that fails there proves nothing.
//
// It prints one line per mutant with the tests that killed it, and exits 1
// if a mutant survived either kind of test, did not compile, or its site was
// not found.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"
)

// kind of a test: a unit test runs on pure functions or fakes of its own;
// an integration test on a clustertest cluster.
type kind string

const (
	unit        kind = "unit"
	integration kind = "integration"
)

type killer struct {
	test string // TestName or TestName/Subtest
	kind kind
}

type mutant struct {
	name    string
	snippet string // unique code in a non-test .go file of the root package
	replace string
	// helper, if set, is added to the package as a file of its own (for
	// mutants that need an import the file they change lacks).
	helper string
	tests  []killer
}

var mutants = []mutant{
	{
		name: "40003-retryable",
		snippet: `case "40003": // statement_completion_unknown
		return ClassAmbiguous`,
		replace: `case "40003": // statement_completion_unknown
		return ClassRestartTxn`,
		tests: []killer{
			{"TestClassify", unit},
			{"TestAmbiguousResultNotRetried", unit},
			{"TestRetry/SQLSTATE", integration},
		},
	},
	{
		name:    "planner-never-prunes",
		snippet: `func planPrune(nodes []nodeView, targets map[NodeID]int, exact bool) map[NodeID]int {`,
		replace: `func planPrune(nodes []nodeView, targets map[NodeID]int, exact bool) map[NodeID]int {
	return nil`,
		tests: []killer{
			{"TestPlanPrune", unit},
			{"TestPlanConvergesBehindRandomBalancer", unit},
			{"TestTraceNodeLifecycleAndPruning", integration},
			{"TestBalanceScaleOutWithGossip", integration},
		},
	},
	{
		name: "no-eviction-on-57P01",
		// settle evicts the node (and avoids it for the rest of the call)
		// after a connection-level failure; the mutant hides a 57P01 from
		// it, while the retry decision still sees the real class.
		snippet: `n := l.settle(c, class, callerErr != nil)`,
		replace: `n := l.settle(c, mutantNoEvict(class, err), callerErr != nil)`,
		helper: `package clusterpool

import (
	"errors"

	"github.com/jackc/pgx/v5/pgconn"
)

func mutantNoEvict(class ErrorClass, err error) ErrorClass {
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "57P01" {
		return ClassPermanent
	}
	return class
}
`,
		tests: []killer{
			{"TestDrainErrorEvictsNode", unit},
			{"TestTraceDrainedNode", integration},
		},
	},
	{
		name:    "long-id-bit-ignored",
		snippet: `if pid&longIDFlag != 0 {`,
		replace: `if false {`,
		tests: []killer{
			{"TestDecodeProcessID", unit},
			{"TestNodeIDs/long", integration},
		},
	},
	{
		name:    "conn-closed-not-sent",
		snippet: `return pgconn.SafeToRetry(err) && !errors.Is(err, pgconn.ErrConnClosed)`,
		replace: `return pgconn.SafeToRetry(err)`,
		tests: []killer{
			{"TestLostAnswerNotResent", unit},
			{"TestLostCommitIsNotRetried", integration},
		},
	},
	{
		name:    "max-retries-ignored",
		snippet: `s.attempts > f.MaxRetries`,
		replace: `s.attempts > 50`,
		tests: []killer{
			{"TestMaxRetriesCapsAttempts", unit},
			{"TestRetry/SQLSTATE", integration},
		},
	},
	{
		name:    "connect-limiter-bypassed",
		snippet: `return true, nil } if b.limiter == nil { return false, nil } if b.limiter.Allow() {`,
		replace: `return true, nil }; if true { return false, nil }; if b.limiter.Allow() {`,
		tests: []killer{
			{"TestBeforeConnectTakesALimiterToken", unit},
			// TestBalanceConnectRateAfterRestart also kills it when the
			// reconnect storms outrun its 20/s limit, which a loaded
			// machine may not do: it is not listed.
			{"TestTraceConnectThrottled", integration},
		},
	},
	{
		name:    "locality-ignored",
		snippet: `s := localityScope{need: preferredShare(lp.levels, best)}`,
		replace: `s := localityScope{need: 0 * preferredShare(lp.levels, best)}`,
		tests: []killer{
			{"TestLocalityScopeFallsBackAndReturns", unit},
			{"TestLocalityRegionBehindLoadBalancer", integration},
		},
	},
	{
		name:    "gossip-hosts-any-region",
		snippet: `if inScope != nil && !inScope(id) {`,
		replace: `if false && inScope != nil && !inScope(id) {`,
		tests: []killer{
			{"TestGroupsForGossipHostsByLocality", unit},
			{"TestLocalityGossipHostsStayInRegion", integration},
		},
	},
	{
		name:    "probe-aims-every-tick",
		snippet: `return since+1 >= min(1<<min(missed, 3), maxAimEvery)`,
		replace: `return since+1 >= 0*min(1<<min(missed, 3), maxAimEvery)`,
		tests: []killer{
			{"TestProbeAimSpacing", unit},
			{"TestProbeSpacesAimsAtDownNode", integration},
		},
	},
	{
		name:    "fleet-probes-alone",
		snippet: `return u < max(math.Sqrt(share), 1.0/maxAimEvery)`,
		replace: `return u < 1+0*max(math.Sqrt(share), 1.0/maxAimEvery)`,
		tests: []killer{
			{"TestFleetTurn", unit},
			{"TestFleetProbesForLostNodeTogether", integration},
		},
	},
}

func main() {
	runFlag := flag.String("run", "", "only the mutants whose name matches this regexp")
	noBaseline := flag.Bool("nobaseline", false, "do not run the tests on the unmodified copy first")
	keep := flag.Bool("keep", false, "keep the temporary copy (its path is printed)")
	verbose := flag.Bool("v", false, "print the output of every test that failed")
	timeout := flag.Duration("timeout", 5*time.Minute, "per test run")
	flag.Parse()
	if err := run(*runFlag, !*noBaseline, *keep, *verbose, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "mutate:", err)
		os.Exit(1)
	}
}

func run(only string, baseline, keep, verbose bool, timeout time.Duration) error {
	selected := mutants
	if only != "" {
		re, err := regexp.Compile(only)
		if err != nil {
			return fmt.Errorf("-run: %w", err)
		}
		selected = slices.DeleteFunc(slices.Clone(mutants), func(m mutant) bool { return !re.MatchString(m.name) })
		if len(selected) == 0 {
			return fmt.Errorf("no mutant matches %q", only)
		}
	}
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "clusterpool-mutate-")
	if err != nil {
		return err
	}
	if keep {
		fmt.Println("copy:", tmp)
	} else {
		defer os.RemoveAll(tmp)
	}
	src := filepath.Join(tmp, "src")
	if err := copyTree(root, src); err != nil {
		return err
	}
	// Every site first: a stale snippet stops the run before any test.
	files := make([]string, len(selected))
	for i, m := range selected {
		if files[i], err = findSite(src, m); err != nil {
			return err
		}
	}
	r := runner{dir: src, bin: filepath.Join(tmp, "pkg.test"), timeout: timeout, verbose: verbose}

	if baseline {
		if err := r.build(); err != nil {
			return fmt.Errorf("the unmodified copy does not build: %w", err)
		}
		var seen []string
		for _, m := range selected {
			for _, k := range m.tests {
				if slices.Contains(seen, k.test) {
					continue
				}
				seen = append(seen, k.test)
				failed, out, err := r.test(k.test)
				if err != nil {
					return err
				}
				if failed {
					return fmt.Errorf("baseline: %s fails without any mutant, so it proves nothing:\n%s", k.test, tail(out, 40))
				}
			}
		}
		fmt.Printf("baseline: %d tests pass on the unmodified copy\n", len(seen))
	}

	ok := true
	for i, m := range selected {
		line, good, err := r.mutant(m, files[i])
		if err != nil {
			return fmt.Errorf("%s: %w", m.name, err)
		}
		fmt.Println(line)
		ok = ok && good
	}
	if !ok {
		return errors.New("some mutant was not killed by both a unit and an integration test")
	}
	return nil
}

type runner struct {
	dir, bin string
	timeout  time.Duration
	verbose  bool
}

// mutant applies m to file, runs m's tests, restores file, and returns the
// report line and whether both kinds of test killed m.
func (r runner) mutant(m mutant, file string) (string, bool, error) {
	orig, err := os.ReadFile(file)
	if err != nil {
		return "", false, err
	}
	defer os.WriteFile(file, orig, 0o644)
	loc := siteRegexp(m.snippet).FindIndex(orig)
	mutated := slices.Concat(orig[:loc[0]], []byte(m.replace), orig[loc[1]:])
	if err := os.WriteFile(file, mutated, 0o644); err != nil {
		return "", false, err
	}
	if m.helper != "" {
		helper := filepath.Join(r.dir, "zz_mutant_helper.go")
		if err := os.WriteFile(helper, []byte(m.helper), 0o644); err != nil {
			return "", false, err
		}
		defer os.Remove(helper)
	}
	if err := r.build(); err != nil {
		return "", false, fmt.Errorf("the mutant does not compile; update it (site in %s): %w", filepath.Base(file), err)
	}
	var killed, survived []string
	kinds := map[kind]bool{}
	start := time.Now()
	for _, k := range m.tests {
		failed, out, err := r.test(k.test)
		if err != nil {
			return "", false, err
		}
		if !failed {
			survived = append(survived, k.test)
			continue
		}
		kinds[k.kind] = true
		killed = append(killed, fmt.Sprintf("%s (%s)", k.test, k.kind))
		if r.verbose {
			fmt.Printf("--- %s killed by %s:\n%s\n", m.name, k.test, tail(out, 20))
		}
	}
	good := kinds[unit] && kinds[integration]
	verdict := "killed"
	if !good {
		verdict = "NOT KILLED BY BOTH KINDS"
	}
	line := fmt.Sprintf("%-26s %s in %s: %s", m.name, verdict, time.Since(start).Round(time.Second), strings.Join(killed, ", "))
	if len(killed) == 0 {
		line = fmt.Sprintf("%-26s SURVIVED in %s", m.name, time.Since(start).Round(time.Second))
	}
	if len(survived) > 0 {
		line += "; survived: " + strings.Join(survived, ", ")
	}
	return line, good, nil
}

func (r runner) build() error {
	cmd := exec.Command("go", "test", "-c", "-o", r.bin, ".")
	cmd.Dir = r.dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	return nil
}

// test runs one test (TestName or TestName/Subtest) of the built binary and
// reports whether it failed. A name that matches no test is an error, not a
// pass.
func (r runner) test(name string) (failed bool, out []byte, err error) {
	parts := strings.Split(name, "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.timeout+time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, r.bin, "-test.run", strings.Join(parts, "/"), "-test.count=1", "-test.v",
		"-test.timeout", r.timeout.String())
	cmd.Dir = r.dir
	cmd.Env = append(os.Environ(), "CLUSTERTEST_REQUIRE=1")
	out, runErr := cmd.CombinedOutput()
	if !bytes.Contains(out, []byte("=== RUN   "+name+"\n")) {
		return false, out, fmt.Errorf("test %s did not run (renamed?):\n%s", name, tail(out, 20))
	}
	var exitErr *exec.ExitError
	switch {
	case runErr == nil:
		return false, out, nil
	case errors.As(runErr, &exitErr):
		return true, out, nil
	}
	return false, out, fmt.Errorf("running %s: %w", name, runErr)
}

// findSite returns the one non-test .go file of the root package in dir
// that holds m's snippet.
func findSite(dir string, m mutant) (string, error) {
	re := siteRegexp(m.snippet)
	names, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		return "", err
	}
	var found []string
	for _, name := range names {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		b, err := os.ReadFile(name)
		if err != nil {
			return "", err
		}
		for range re.FindAllIndex(b, -1) {
			found = append(found, filepath.Base(name))
		}
	}
	switch len(found) {
	case 0:
		return "", fmt.Errorf("%s: mutation site not found: no non-test .go file of the root package holds %q; update the mutant in internal/mutate", m.name, m.snippet)
	case 1:
		for _, name := range names {
			if filepath.Base(name) == found[0] {
				return name, nil
			}
		}
	}
	return "", fmt.Errorf("%s: mutation site ambiguous: %q occurs %d times (%v); make the snippet longer", m.name, m.snippet, len(found), found)
}

// siteRegexp matches snippet with any run of white space standing for any
// other, so that reformatting does not lose a site.
func siteRegexp(snippet string) *regexp.Regexp {
	fields := strings.Fields(snippet)
	for i, f := range fields {
		fields[i] = regexp.QuoteMeta(f)
	}
	return regexp.MustCompile(strings.Join(fields, `\s+`))
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the clusterpool module")
	}
	return filepath.Dir(gomod), nil
}

// copyTree copies the repository's files (not .git) from src to dst.
func copyTree(src, dst string) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		switch {
		case d.Name() == ".git" && d.IsDir():
			return filepath.SkipDir
		case d.Name() == ".git":
			return nil
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case !d.Type().IsRegular():
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, 0o644)
	})
}

// tail returns the last n lines of out.
func tail(out []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
