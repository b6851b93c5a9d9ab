package clustersql_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the test binary if any goroutine is still running once all
// tests have finished: the pools, databases and clusters tests use must be closed.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
