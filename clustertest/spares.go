package clustertest

import (
	"bytes"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
)

// Spare data directories.
//
// Copying the template means creating about a thousand files per node, and
// on some filesystems creating a file costs a millisecond (0.85 ms on the
// ext4 of the machine this was written on), so a 3-node cluster took seconds
// to start. Overwriting a file that exists costs some 40 µs. So a node's data
// directory is not deleted when its node is removed: once its server has
// shut down cleanly, it is reset to the template's exact content (same
// files, same bytes, nothing else; only the few files that changed are
// rewritten) and moved to a spares directory next to the template. A later
// node, in this process or another, claims a spare with an atomic rename and
// starts on it at once. A process that dies mid-reset leaves the directory
// in its cluster's directory, where sweepStale removes it: a spare is always
// complete.

// maxSpares bounds the disk the spares use (under 30 MB each) while leaving
// enough for two test processes (go test -p 2) running 4-node clusters plus
// AddNode.
const maxSpares = 12

func sparesDir(tmpl string) string { return tmpl + "-spares" }

// claimSpare moves a spare data directory to dir and reports whether there
// was one. Several processes may claim at once; the rename decides.
func claimSpare(tmpl, dir string) bool {
	entries, err := os.ReadDir(sparesDir(tmpl))
	if err != nil {
		return false
	}
	for _, e := range entries {
		if os.Rename(filepath.Join(sparesDir(tmpl), e.Name()), dir) == nil {
			return true
		}
	}
	return false
}

// recycle resets the data directory of a cleanly stopped server to the
// template and moves it to the spares, or deletes it when there are enough.
func recycle(tmpl, dir string, ra runAs) {
	spares := sparesDir(tmpl)
	if err := os.MkdirAll(spares, 0o700); err == nil {
		if entries, err := os.ReadDir(spares); err == nil && len(entries) < maxSpares && resetDir(tmpl, dir, ra) == nil {
			if os.Rename(dir, filepath.Join(spares, fmt.Sprintf("spare-%016x", rand.Uint64()))) == nil {
				return
			}
		}
	}
	os.RemoveAll(dir)
}

// resetDir makes dir an exact copy of tmpl, writing only the files that
// differ and creating only the ones that are missing; everything not in the
// template (new relations, postmaster.pid, statistics) is removed.
func resetDir(tmpl, dir string, ra runAs) error {
	want := make(map[string]bool)
	err := filepath.WalkDir(tmpl, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(tmpl, path)
		if err != nil {
			return err
		}
		want[rel] = true
		target := filepath.Join(dir, rel)
		fi, statErr := os.Lstat(target)
		switch {
		case d.IsDir():
			if statErr == nil && fi.IsDir() {
				return nil
			}
			if statErr == nil {
				os.RemoveAll(target)
			}
			if err := os.Mkdir(target, 0o700); err != nil {
				return err
			}
			return ra.chown(target)
		case d.Type().IsRegular():
			info, err := d.Info()
			if err != nil {
				return err
			}
			if statErr == nil && !fi.Mode().IsRegular() {
				os.RemoveAll(target)
				statErr = fs.ErrNotExist
			}
			if statErr == nil && fi.Size() == info.Size() && sameContent(path, target) {
				return nil
			}
			if statErr == nil {
				return overwriteFile(path, target)
			}
			if err := copyFile(path, target, info.Mode().Perm()); err != nil {
				return err
			}
			return ra.chown(target)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		if !want[rel] {
			if err := os.RemoveAll(path); err != nil {
				return err
			}
			if d.IsDir() {
				return filepath.SkipDir
			}
		}
		return nil
	})
}

func sameContent(a, b string) bool {
	x, err := os.ReadFile(a)
	if err != nil {
		return false
	}
	y, err := os.ReadFile(b)
	return err == nil && bytes.Equal(x, y)
}

// overwriteFile replaces the content of the existing file dst with src's,
// keeping dst's inode, owner and mode.
func overwriteFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
