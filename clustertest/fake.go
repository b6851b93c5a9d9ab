package clustertest

import "errors"

func startFake() (backend, error) {
	return nil, errors.New("clustertest: Options.InProcess is not available yet")
}
