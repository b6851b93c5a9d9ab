package main

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the test binary if a goroutine outlives the tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
