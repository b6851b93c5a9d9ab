package clustertest

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ownerFile, in a cluster's directory, is locked (flock) by the process that
// made the directory for as long as the cluster is open. The kernel drops
// the lock when the process dies, however it dies, which tells a later
// process that the directory is abandoned, even across PID namespaces.
const ownerFile = "clustertest.lock"

// lockOwner creates and locks dir's owner file; closing the file unlocks it.
// The file is locked under another name and then renamed (the lock stays
// with it), so no sweeper ever finds it unlocked.
func lockOwner(dir string) (*os.File, error) {
	tmp := filepath.Join(dir, ownerFile+".new")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, err
	}
	f.WriteString(strconv.Itoa(os.Getpid()) + "\n") // for people looking
	if err := os.Rename(tmp, filepath.Join(dir, ownerFile)); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// abandoned reports whether no process holds dir's owner file locked.
func abandoned(dir string) bool {
	f, err := os.Open(filepath.Join(dir, ownerFile))
	if err != nil {
		return false // not ours, or still being set up
	}
	defer f.Close()
	return syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) == nil
}

// sweepStale removes the directories of clusters whose process died without
// Close (a test binary killed by its timeout, say); their servers died with
// it (see sysProcAttr). Abandoned template builds go too.
func sweepStale(baseDir string) {
	entries, err := os.ReadDir(baseDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		dir := filepath.Join(baseDir, e.Name())
		switch {
		case !e.IsDir():
		case strings.HasPrefix(e.Name(), templateBuildPrefix):
			// initdb takes about a second; an hour-old build was abandoned.
			if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > time.Hour {
				os.RemoveAll(dir)
			}
		case strings.HasPrefix(e.Name(), "clustertest-template-"):
		case strings.HasPrefix(e.Name(), "clustertest-") && abandoned(dir):
			os.RemoveAll(dir)
		}
	}
}
