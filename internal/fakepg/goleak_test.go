package fakepg

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the test binary if any goroutine is still running once all
// tests have finished: a Server's goroutines must stop on Close.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
