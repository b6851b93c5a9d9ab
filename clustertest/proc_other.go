//go:build unix && !linux

package clustertest

import "syscall"

// sysProcAttr puts PostgreSQL in its own process group so a lingering server
// and its children can be killed together.
func sysProcAttr(cred *syscall.Credential) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Credential: cred}
}

func killGroup(pid int) { _ = syscall.Kill(-pid, syscall.SIGKILL) }
