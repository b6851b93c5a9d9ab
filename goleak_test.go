package clusterpool

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the test binary if any goroutine is still running once all
// tests have finished: every goroutine a Pool starts must stop on Close, and every cluster a test starts must be closed.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
