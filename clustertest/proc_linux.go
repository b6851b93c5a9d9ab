package clustertest

import "syscall"

// sysProcAttr puts PostgreSQL in its own process group (so a lingering server
// and its children can be killed together) and has the kernel kill it if the
// test process dies first, so no orphaned server outlives a crashed test.
func sysProcAttr(cred *syscall.Credential) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL, Credential: cred}
}

func killGroup(pid int) { _ = syscall.Kill(-pid, syscall.SIGKILL) }
