package clustertest

import "github.com/clusterpool/clusterpool/internal/fakepg"

// fakeServer is an in-process Postgres-wire server (Options.InProcess).
type fakeServer struct{ s *fakepg.Server }

func startFake() (backend, error) {
	s, err := fakepg.Start("127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return fakeServer{s}, nil
}

func (f fakeServer) addr() string { return f.s.Addr() }
func (f fakeServer) stop() bool   { f.s.Close(); return false }
