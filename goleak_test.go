package clusterpool

import (
	"flag"
	"testing"

	"go.uber.org/goleak"
)

// clusterTestParallel is how many parallel tests run at once unless
// -parallel says otherwise. The cluster tests spend their time waiting on
// servers, proxies and the pool's timers rather than on the CPU, so more of
// them than go test's default (GOMAXPROCS) fit at once.
const clusterTestParallel = "4"

// TestMain fails the test binary if any goroutine is still running once all
// tests have finished: every goroutine a Pool starts must stop on Close, and every cluster a test starts must be closed.
func TestMain(m *testing.M) {
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		if err := flag.Set("test.parallel", clusterTestParallel); err != nil {
			panic(err)
		}
	}
	goleak.VerifyTestMain(m)
}
