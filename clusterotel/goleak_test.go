package clusterotel_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the test binary if any goroutine is still running once all
// tests have finished: Register starts none, and the pools and clusters the
// tests use must be closed.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
