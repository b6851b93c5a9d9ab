package clustertest

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ownerFile, in a cluster's directory, holds the PID of the process that
// made it.
const ownerFile = "clustertest.pid"

func writeOwner(dir string) error {
	return os.WriteFile(filepath.Join(dir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644)
}

// sweepStale removes the directories of clusters whose process died without
// Close (a test binary killed by its timeout, say); its servers died with it
// (see sysProcAttr). Directories without an owner file, or whose owner may
// still run, are left alone. Abandoned template builds go too.
func sweepStale(baseDir string) {
	entries, err := os.ReadDir(baseDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		dir := filepath.Join(baseDir, e.Name())
		if strings.HasPrefix(e.Name(), templateBuildPrefix) {
			// initdb takes about a second; an hour-old build was abandoned.
			if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > time.Hour {
				os.RemoveAll(dir)
			}
			continue
		}
		if !e.IsDir() || !strings.HasPrefix(e.Name(), "clustertest-") || strings.HasPrefix(e.Name(), "clustertest-template-") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, ownerFile))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 0 || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			os.RemoveAll(dir)
		}
	}
}
