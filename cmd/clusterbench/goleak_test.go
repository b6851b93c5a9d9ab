package main

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the test binary if any goroutine is still running once all
// tests have finished: a run must close its pools and clusters.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
