package clustertest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// templateBuildPrefix names a template while initdb builds it.
const templateBuildPrefix = "clustertest-template-building-"

// installHint ends every error about missing PostgreSQL binaries.
const installHint = "install the PostgreSQL server binaries (initdb, postgres), e.g. apt-get install postgresql, or set CLUSTERTEST_PGBIN to their directory"

// binaries are the PostgreSQL programs clustertest runs. pg_ctl is not needed:
// starting postgres directly as a child process is faster and lets Close kill
// its whole process group.
type binaries struct {
	dir      string
	initdb   string
	postgres string
}

// Available reports whether PostgreSQL clusters can run here: the server
// binaries are installed and, for a root process, the "postgres" OS user
// exists. It looks for the binaries in $CLUSTERTEST_PGBIN if set, then on
// PATH, then in the highest version of /usr/lib/postgresql/*/bin (where
// Debian and Ubuntu put them). The error says what to install.
func Available() error {
	if _, err := findBinaries(); err != nil {
		return err
	}
	_, err := lookupRunAs()
	return err
}

func findBinaries() (binaries, error) {
	if dir := os.Getenv("CLUSTERTEST_PGBIN"); dir != "" {
		b, ok := binariesIn(dir)
		if !ok {
			return b, fmt.Errorf("clustertest: CLUSTERTEST_PGBIN=%s does not hold initdb and postgres; %s", dir, installHint)
		}
		return b, nil
	}
	if p, err := exec.LookPath("postgres"); err == nil {
		if b, ok := binariesIn(filepath.Dir(p)); ok {
			return b, nil
		}
		if initdb, err := exec.LookPath("initdb"); err == nil {
			return binaries{dir: filepath.Dir(p), initdb: initdb, postgres: p}, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	// Highest major version first: "9.6" < "15" needs a numeric sort.
	sort.Slice(dirs, func(i, j int) bool {
		return versionOf(dirs[i]) > versionOf(dirs[j])
	})
	for _, dir := range dirs {
		if b, ok := binariesIn(dir); ok {
			return b, nil
		}
	}
	return binaries{}, errors.New("clustertest: PostgreSQL not found on PATH or in /usr/lib/postgresql/*/bin; " + installHint)
}

func versionOf(binDir string) float64 {
	v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(binDir)), 64)
	return v
}

func binariesIn(dir string) (binaries, bool) {
	b := binaries{dir: dir, initdb: filepath.Join(dir, "initdb"), postgres: filepath.Join(dir, "postgres")}
	for _, p := range []string{b.initdb, b.postgres} {
		if fi, err := os.Stat(p); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			return b, false
		}
	}
	return b, true
}

// runAs is the OS user PostgreSQL runs as. PostgreSQL refuses to run as root,
// so a root process runs it as "postgres"; otherwise cred is nil and it runs
// as the current user.
type runAs struct {
	cred *syscall.Credential
}

func lookupRunAs() (runAs, error) {
	if os.Geteuid() != 0 {
		return runAs{}, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return runAs{}, fmt.Errorf("clustertest: running as root, PostgreSQL must run as the \"postgres\" OS user, but it does not exist (%v); create it or run the tests as another user", err)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return runAs{}, fmt.Errorf("clustertest: cannot parse uid %q / gid %q of user postgres", u.Uid, u.Gid)
	}
	return runAs{cred: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}, nil
}

// chown gives path to the PostgreSQL user (no-op when not root).
func (r runAs) chown(path string) error {
	if r.cred == nil {
		return nil
	}
	return os.Lchown(path, int(r.cred.Uid), int(r.cred.Gid))
}

// checkTraversable fails early, with a clear message, when PostgreSQL running
// as another user could not reach dir (e.g. a 0700 t.TempDir() of root).
func (r runAs) checkTraversable(dir string) error {
	if r.cred == nil {
		return nil
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	for p := abs; ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("clustertest: %w", err)
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if fi.Mode().Perm()&0o001 == 0 && !(ok && st.Uid == r.cred.Uid) {
			return fmt.Errorf("clustertest: the postgres user (uid %d) cannot traverse %s (mode %v) on the way to BaseDir %s; chmod o+x it or choose another BaseDir", r.cred.Uid, p, fi.Mode().Perm(), dir)
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

func (r runAs) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	var cmd *exec.Cmd
	if ctx != nil {
		cmd = exec.CommandContext(ctx, name, args...)
	} else {
		cmd = exec.Command(name, args...)
	}
	cmd.SysProcAttr = sysProcAttr(r.cred)
	// A clean, C-locale environment: initdb and postgres must not depend on
	// the caller's LANG, and must not see PG* variables meant for clients.
	cmd.Env = []string{"LC_ALL=C", "LANG=C", "PATH=" + os.Getenv("PATH")}
	return cmd
}

// ensureTemplate returns a data directory made by initdb once and reused by
// every cluster in this and later processes: clustertest keeps no global
// state, so the cache lives on disk, keyed by the PostgreSQL version, the
// binaries' directory and the uid. It is built under a temporary name and
// renamed into place, so a directory with the final name is always complete,
// even when several test processes race to build it.
func ensureTemplate(ctx context.Context, bins binaries, baseDir string, ra runAs) (string, error) {
	out, err := exec.CommandContext(ctx, bins.postgres, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("clustertest: %s --version: %w", bins.postgres, err)
	}
	h := fnv.New32a()
	h.Write(out)
	h.Write([]byte(bins.dir))
	final := filepath.Join(baseDir, fmt.Sprintf("clustertest-template-%08x-uid%d", h.Sum32(), os.Getuid()))
	if _, err := os.Stat(filepath.Join(final, "PG_VERSION")); err == nil {
		return final, nil
	}
	if err := os.MkdirAll(baseDir, 0o755); err != nil {
		return "", fmt.Errorf("clustertest: cannot create BaseDir: %w", err)
	}
	tmp, err := os.MkdirTemp(baseDir, templateBuildPrefix)
	if err != nil {
		return "", fmt.Errorf("clustertest: cannot create the template directory: %w", err)
	}
	defer os.RemoveAll(tmp) // a no-op once renamed
	if err := ra.chown(tmp); err != nil {
		return "", fmt.Errorf("clustertest: %w", err)
	}
	// A 1 MB WAL segment instead of 16 MB makes each node's copy smaller.
	cmd := ra.command(ctx, bins.initdb, "-D", tmp, "-U", "postgres", "-A", "trust", "-E", "UTF8",
		"--no-locale", "--no-sync", "--no-instructions", "--wal-segsize=1")
	cmd.Dir = tmp
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("clustertest: initdb failed: %w\n%s", err, tail(log.Bytes(), 20))
	}
	if err := os.Rename(tmp, final); err != nil {
		// Another process won the race; its template is as good as ours.
		if _, statErr := os.Stat(filepath.Join(final, "PG_VERSION")); statErr == nil {
			return final, nil
		}
		return "", fmt.Errorf("clustertest: %w", err)
	}
	return final, nil
}

// makeDataDir makes dir a copy of the template: a spare if there is one (see
// spares.go), else a fresh copy.
func makeDataDir(tmpl, dir string, ra runAs) error {
	if claimSpare(tmpl, dir) {
		return nil
	}
	return copyDir(tmpl, dir, ra)
}

// copyDir copies the template to a new data directory owned by the
// PostgreSQL user. A plain copy (no hard links): PostgreSQL writes its files
// in place and would corrupt a shared template.
func copyDir(src, dst string, ra runAs) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			if err := os.Mkdir(target, 0o700); err != nil {
				return err
			}
		case d.Type().IsRegular():
			if err := copyFile(path, target, info.Mode().Perm()); err != nil {
				return err
			}
		default:
			return nil // no symlinks or sockets in a fresh data directory
		}
		return ra.chown(target)
	})
}

func copyFile(src, dst string, perm fs.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// pgServer is one running postgres process.
type pgServer struct {
	dir     string // data directory
	logPath string
	port    int
	cmd     *exec.Cmd
	exited  chan struct{} // closed when the process has exited
	waitErr error         // valid once exited is closed
}

func (s *pgServer) addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// startPostgres copies the template to dir and starts postgres on a free
// port, retrying with another port if one is taken between choosing and
// binding it. It returns once the server accepts connections.
func startPostgres(ctx context.Context, bins binaries, tmpl, dir, logPath string, ra runAs) (*pgServer, error) {
	if err := makeDataDir(tmpl, dir, ra); err != nil {
		return nil, fmt.Errorf("cannot create data directory: %w", err)
	}
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		var s *pgServer
		s, err = launchPostgres(ctx, bins, dir, logPath, ra)
		if err == nil {
			return s, nil
		}
		if !errors.Is(err, errPortTaken) {
			break
		}
	}
	return nil, fmt.Errorf("%w\n(the data directory is a copy of the template %s; delete the template if it is damaged)", err, tmpl)
}

var errPortTaken = errors.New("port taken")

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func launchPostgres(ctx context.Context, bins binaries, dir, logPath string, ra runAs) (*pgServer, error) {
	port, err := freePort()
	if err != nil {
		return nil, fmt.Errorf("no free port: %w", err)
	}
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child keeps its own descriptor
	// Durability is switched off: a test cluster is thrown away, and fsync
	// would make every commit wait on a shared disk.
	cmd := ra.command(nil, bins.postgres, "-D", dir, "-p", strconv.Itoa(port),
		"-c", "listen_addresses=127.0.0.1",
		"-c", "unix_socket_directories=",
		"-c", "fsync=off",
		"-c", "synchronous_commit=off",
		"-c", "full_page_writes=off",
		"-c", "max_connections=300",
		"-c", "shared_buffers=16MB",
		"-c", "max_wal_size=64MB",
		"-c", "logging_collector=off",
		"-c", "log_min_messages=warning",
		"-c", "autovacuum=off",
	)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("cannot start postgres: %w", err)
	}
	s := &pgServer{dir: dir, logPath: logPath, port: port, cmd: cmd, exited: make(chan struct{})}
	go func() {
		s.waitErr = cmd.Wait()
		close(s.exited)
	}()
	if err := s.waitReady(ctx); err != nil {
		s.stop()
		log, _ := os.ReadFile(logPath)
		if bytes.Contains(log, []byte("could not bind")) || bytes.Contains(log, []byte("already in use")) {
			return nil, fmt.Errorf("postgres port %d: %w", port, errPortTaken)
		}
		return nil, fmt.Errorf("postgres did not start (%w); the end of its log:\n%s", err, tail(log, 15))
	}
	return s, nil
}

// waitReady polls postmaster.pid for the "ready" status line postgres writes
// once it accepts connections (this is how pg_ctl -w waits), so no
// connection attempt is wasted on a server that is still starting.
func (s *pgServer) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	pidFile := filepath.Join(s.dir, "postmaster.pid")
	for {
		if b, err := os.ReadFile(pidFile); err == nil {
			lines := strings.Split(string(b), "\n")
			// Line 8 is the status; line 4 the port, to be sure the file is ours.
			if len(lines) >= 8 && strings.TrimSpace(lines[7]) == "ready" && strings.TrimSpace(lines[3]) == strconv.Itoa(s.port) {
				return nil
			}
		}
		select {
		case <-s.exited:
			return fmt.Errorf("postgres exited: %v", s.waitErr)
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// stop shuts the server down at once (SIGQUIT, PostgreSQL's immediate
// shutdown: the data directory is reset or thrown away anyway), then kills
// the whole process group if it lingers. It reports whether the server shut
// down by itself, the condition for reusing its data directory.
func (s *pgServer) stop() bool {
	select {
	case <-s.exited:
		return false // died before: something is wrong with it
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGQUIT)
	select {
	case <-s.exited:
		return true
	case <-time.After(10 * time.Second):
		killGroup(s.cmd.Process.Pid)
		<-s.exited
		return false
	}
}

// tail returns the last n lines of b.
func tail(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
