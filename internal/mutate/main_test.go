package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestMutantsCurrent keeps the mutation check in step with the library
// without running it (it takes minutes): every mutant's site is found once
// in the root package, its replacement changes the code, and every test
// named to kill it exists. A refactor that renames a function, changes a
// signature or a test's name fails here, in the ordinary test run.
func TestMutantsCurrent(t *testing.T) {
	root, err := moduleRoot()
	if err != nil {
		t.Fatal(err)
	}
	tests, err := testNames(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mutants {
		if _, err := findSite(root, m); err != nil {
			t.Error(err)
		}
		if strings.TrimSpace(m.replace) == strings.TrimSpace(m.snippet) {
			t.Errorf("%s: the replacement is the snippet itself", m.name)
		}
		var hasUnit, hasInteg bool
		for _, k := range m.tests {
			top, _, _ := strings.Cut(k.test, "/")
			if !tests[top] {
				t.Errorf("%s: no test %s in the root package", m.name, top)
			}
			hasUnit = hasUnit || k.kind == unit
			hasInteg = hasInteg || k.kind == integration
		}
		if !hasUnit || !hasInteg {
			t.Errorf("%s: needs a unit and an integration test to kill it", m.name)
		}
	}
}

// testNames returns the names of the Test functions in dir's _test.go files.
func testNames(dir string) (map[string]bool, error) {
	names, err := filepath.Glob(filepath.Join(dir, "*_test.go"))
	if err != nil {
		return nil, err
	}
	re := regexp.MustCompile(`(?m)^func (Test\w+)\(t \*testing\.T\)`)
	tests := map[string]bool{}
	for _, name := range names {
		b, err := os.ReadFile(name)
		if err != nil {
			return nil, err
		}
		for _, m := range re.FindAllSubmatch(b, -1) {
			tests[string(m[1])] = true
		}
	}
	return tests, nil
}
