package clustertest

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the test binary if any goroutine is still running once all
// tests have finished: every goroutine a Cluster starts must stop on Close.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
