// init_linux.go: the job's init process, and the protocol between it and the
// server that starts it.
//
// Every job runs under its own init: this binary re-executed with initArg,
// cloned by the server into new PID, mount, network, IPC, UTS and cgroup
// namespaces, in its own session, so it outlives the server. The init reads
// its spec from stdin, builds the job's view of the system (read-only host
// filesystem, private /proc, /tmp, /dev and work directory, only loopback),
// drops every privilege, starts the command and reports on fd 3 whether it
// started. From then on it alone owns the job: it copies the command's output
// into the output file (so the command never waits for a client), enforces
// the timeout, turns SIGTERM into TERM-grace-KILL for every process of the
// job, reaps orphans as PID 1, and when the command ends kills what is left
// and writes exit.json. Its death as PID 1 takes every process of the job
// with it.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Paths inside a job.
const (
	jobWorkDir = "/job"
	jobPath    = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// Exit codes of a command that could not start, as a shell would give them.
const (
	exitSetupFailed   = 125
	exitNotExecutable = 126
	exitNotFound      = 127
)

func init() {
	if len(os.Args) > 1 && os.Args[1] == initArg {
		// Capability sets and no_new_privs are per thread: the init does all
		// its privilege work and forks the command on this one thread.
		runtime.LockOSThread()
	}
}

// initSpec is what the server tells a job's init, over its stdin.
type initSpec struct {
	ID           string        `json:"id"`
	Command      string        `json:"command"`
	Args         []string      `json:"args"`
	Env          []string      `json:"env"`
	UID          int           `json:"uid"`
	GID          int           `json:"gid"`
	Hostname     string        `json:"hostname"`
	Timeout      time.Duration `json:"timeout"`
	Grace        time.Duration `json:"grace"`
	OutputCap    int64         `json:"output_cap"`
	ScratchBytes int64         `json:"scratch_bytes"` // size of each of /tmp and the work directory

	// How the command gets into the job's command cgroup, from the files
	// the server passes from fd 4 on (cgroup_linux.go, commandFiles).
	CommandCgroup string `json:"command_cgroup,omitempty"`
	Pids          int64  `json:"pids,omitempty"`
}

const (
	commandCgroupV2 = "clone-into" // fds 4, 5, 6: <id>/init's cgroup.procs, <id>'s subtree_control, the <id>/command directory
	commandCgroupV1 = "move-tid"   // fds 4, 5, 6: <id>/command's tasks and pids.max, <id>'s cgroup.procs
	firstCgroupFD   = 4
)

// startReport is the init's one line on fd 3: the command runs, or why not.
type startReport struct {
	StartedAt time.Time `json:"started_at"`
	Error     string    `json:"error,omitempty"`
	ExitCode  int       `json:"exit_code,omitempty"`
}

// exitRecord is exit.json: how the job ended, as its init saw it.
type exitRecord struct {
	Reason      string    `json:"reason"` // exited, signaled, timeout, stopped or start_failed
	ExitCode    int       `json:"exit_code"`
	Signal      int       `json:"signal,omitempty"`
	Error       string    `json:"error,omitempty"`
	StartedAt   time.Time `json:"started_at,omitzero"`
	EndedAt     time.Time `json:"ended_at"`
	OutputBytes int64     `json:"output_bytes"`
	Truncated   bool      `json:"truncated,omitempty"`
}

// jobInit is the running init: it owns the job's namespaces, its output file
// and the exit record.
type jobInit struct {
	spec   initSpec
	dirFD  int      // the job's directory on the host, reachable after pivot_root
	output *os.File // the job's output file, append-only
	report *os.File // fd 3, closed once the start is reported

	mu     sync.Mutex
	ending string // "stopped" or "timeout" once either began
}

// runInit is the whole life of a job's init; its return is the init's exit code.
func runInit(jobDir string) int {
	// Named for what it is in the job's `ps`, not "exe"; this is the main thread.
	unix.Prctl(unix.PR_SET_NAME, uintptr(unsafe.Pointer(&[]byte("worker-init\x00")[0])), 0, 0, 0)
	ji := &jobInit{report: os.NewFile(3, "start-report"), dirFD: -1}
	// Before anything else, so no descriptor can reach the command: the ones
	// from the server (fds 3 on) and whatever the server itself inherited.
	if err := closeInheritedFDs(); err != nil {
		ji.reportStart(startReport{Error: err.Error(), ExitCode: exitSetupFailed})
		return 1
	}
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, unix.SIGTERM, unix.SIGINT)

	dirFD, err := unix.Open(jobDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		ji.reportStart(startReport{Error: fmt.Sprintf("open job directory: %v", err), ExitCode: exitSetupFailed})
		return 1
	}
	ji.dirFD = dirFD
	if err := json.NewDecoder(os.Stdin).Decode(&ji.spec); err != nil {
		return ji.startFailed(fmt.Errorf("read job spec: %w", err), exitSetupFailed)
	}
	os.Stdin.Close()
	// The spec arrives only after the server put this process in its cgroups
	// (cgroup v1 cannot do that at clone time): a cgroup namespace made now is
	// rooted at the job's cgroup. This thread forks the command, so it is
	// the one that needs it.
	if err := unix.Unshare(unix.CLONE_NEWCGROUP); err != nil {
		return ji.startFailed(fmt.Errorf("cgroup namespace: %w", err), exitSetupFailed)
	}
	if ji.spec.CommandCgroup == commandCgroupV2 {
		if err := ji.prepareCommandCgroupV2(); err != nil {
			return ji.startFailed(err, exitSetupFailed)
		}
	}
	outFD, err := unix.Openat(dirFD, outputFile, unix.O_WRONLY|unix.O_APPEND|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return ji.startFailed(fmt.Errorf("open output file: %w", err), exitSetupFailed)
	}
	ji.output = os.NewFile(uintptr(outFD), outputFile)

	if err := isolate(ji.spec); err != nil {
		return ji.startFailed(err, exitSetupFailed)
	}
	if err := dropPrivileges(); err != nil {
		return ji.startFailed(err, exitSetupFailed)
	}
	return ji.run(signals)
}

func (ji *jobInit) run(signals chan os.Signal) int {
	spec := ji.spec
	// A blocking pipe, not os.Pipe's non-blocking one: the copier then does
	// plain read(2)s instead of a trip through the runtime poller per chunk.
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return ji.startFailed(fmt.Errorf("output pipe: %w", err), exitSetupFailed)
	}
	pr, pw := os.NewFile(uintptr(p[0]), "output-r"), os.NewFile(uintptr(p[1]), "output-w")
	// A bigger pipe means fewer wake-ups of the copier for a chatty job.
	unix.FcntlInt(pw.Fd(), unix.F_SETPIPE_SZ, 1<<20)

	// exec.Command looks the command up in this process's PATH: make it the job's.
	os.Clearenv()
	for _, kv := range spec.Env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			os.Setenv(k, v)
		}
	}
	cmd := exec.Command(spec.Command, spec.Args...)
	cmd.Env = spec.Env
	cmd.Dir = jobWorkDir
	cmd.Stdout = pw
	cmd.Stderr = pw // one fd for both: one ordered stream
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: uint32(spec.UID), Gid: uint32(spec.GID), Groups: []uint32{}},
		Setsid:     true,
	}
	if errors.Is(cmd.Err, exec.ErrDot) {
		cmd.Err = nil // a relative path the user gave is what they meant
	}
	if err := ji.startInCommandCgroup(cmd); err != nil {
		pw.Close()
		pr.Close()
		return ji.startFailed(startError(spec.Command, err))
	}
	pw.Close() // the command's copies are now the only writers
	// The OOM killer must take the job's processes, never its init, which
	// has to live to record the end (memory.oom.group spares -1000). Set
	// after the fork, so the command does not inherit it.
	os.WriteFile("/proc/self/oom_score_adj", []byte("-1000"), 0)
	startedAt := time.Now()
	mainPID := cmd.Process.Pid
	ji.reportStart(startReport{StartedAt: startedAt})

	copied := make(chan copyResult, 1)
	go func() { copied <- copyOutput(ji.output, pr, spec.OutputCap) }()

	// Stop and timeout: TERM to every process of the job, KILL after grace.
	go func() {
		var deadline <-chan time.Time
		if spec.Timeout > 0 {
			t := time.NewTimer(spec.Timeout)
			defer t.Stop()
			deadline = t.C
		}
		select {
		case <-signals:
			ji.beginEnd(reasonStopped)
		case <-deadline:
			ji.beginEnd(reasonTimeout)
		}
	}()

	var status unix.WaitStatus
	mainDone := false
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil { // ECHILD: nothing of the job is left
			break
		}
		if pid == mainPID {
			status, mainDone = ws, true
		}
		if mainDone {
			// The job ends with its command; whatever it left behind goes.
			unix.Kill(-1, unix.SIGKILL)
		}
	}
	cr := <-copied
	pr.Close()
	ji.output.Sync()

	rec := exitRecord{StartedAt: startedAt, EndedAt: time.Now(), OutputBytes: cr.written, Truncated: cr.truncated}
	switch {
	case status.Exited():
		rec.Reason, rec.ExitCode = reasonExited, status.ExitStatus()
	case status.Signaled():
		rec.Reason, rec.Signal, rec.ExitCode = reasonSignaled, int(status.Signal()), 128+int(status.Signal())
	}
	ji.mu.Lock()
	if ji.ending != "" {
		rec.Reason = ji.ending
	}
	ji.mu.Unlock()
	if cr.err != nil {
		rec.Error = cr.err.Error()
	}
	if err := ji.writeExit(rec); err != nil {
		fmt.Fprintln(os.Stderr, "worker init:", err)
		return 1
	}
	return 0
}

// startInCommandCgroup starts the command in the job's command cgroup,
// which holds the pids limit, so the init's own threads never count
// against it.
func (ji *jobInit) startInCommandCgroup(cmd *exec.Cmd) error {
	switch ji.spec.CommandCgroup {
	case commandCgroupV2:
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = firstCgroupFD + 2
		return cmd.Start()
	case commandCgroupV1:
		tasks, pidsMax, jobProcs := firstCgroupFD, firstCgroupFD+1, firstCgroupFD+2
		// Only this thread goes in: the fork below happens on it (the
		// init's main thread is locked), so the command is born inside.
		if err := writeFD(tasks, strconv.Itoa(unix.Gettid())); err != nil {
			return setupError{fmt.Errorf("enter the command cgroup: %w", err)}
		}
		startErr := cmd.Start()
		// Lower pids.max from limit+1 while this thread still counts, then
		// leave with every thread: the job never has more than its limit.
		if ji.spec.Pids > 0 {
			if err := writeFD(pidsMax, strconv.FormatInt(ji.spec.Pids, 10)); err != nil && startErr == nil {
				return setupError{fmt.Errorf("set pids limit: %w", err)}
			}
		}
		if err := writeFD(jobProcs, strconv.Itoa(os.Getpid())); err != nil && startErr == nil {
			return setupError{fmt.Errorf("leave the command cgroup: %w", err)}
		}
		return startErr
	}
	return cmd.Start()
}

// prepareCommandCgroupV2 leaves <id> for <id>/init, so that pids can be
// enabled for <id>'s children (a v2 cgroup with processes cannot), and sets
// the pids limit on <id>/command, where the command will be cloned.
func (ji *jobInit) prepareCommandCgroupV2() error {
	initProcs, subtreeControl, commandDir := firstCgroupFD, firstCgroupFD+1, firstCgroupFD+2
	if err := writeFD(initProcs, strconv.Itoa(os.Getpid())); err != nil {
		return fmt.Errorf("move into the init cgroup: %w", err)
	}
	if err := writeFD(subtreeControl, "+pids"); err != nil {
		return fmt.Errorf("enable pids for the command cgroup: %w", err)
	}
	if ji.spec.Pids > 0 {
		fd, err := unix.Openat(commandDir, "pids.max", unix.O_WRONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open the command cgroup's pids.max: %w", err)
		}
		defer unix.Close(fd)
		if err := writeFD(fd, strconv.FormatInt(ji.spec.Pids, 10)); err != nil {
			return fmt.Errorf("set pids limit: %w", err)
		}
	}
	return nil
}

// setupError is a start failure that is the worker's, not the command's.
type setupError struct{ error }

func (e setupError) Unwrap() error { return e.error }

func writeFD(fd int, s string) error {
	_, err := unix.Pwrite(fd, []byte(s), 0)
	return err
}

// beginEnd sends SIGTERM to every process of the job and SIGKILL after the
// grace period. The first reason wins.
func (ji *jobInit) beginEnd(reason string) {
	ji.mu.Lock()
	first := ji.ending == ""
	if first {
		ji.ending = reason
	}
	ji.mu.Unlock()
	if !first {
		return
	}
	unix.Kill(-1, unix.SIGTERM) // from PID 1: every other process in the namespace
	time.AfterFunc(ji.spec.Grace, func() { unix.Kill(-1, unix.SIGKILL) })
}

func (ji *jobInit) reportStart(r startReport) {
	if ji.report == nil {
		return
	}
	// The server may be gone; the job goes on without it, so errors are moot.
	json.NewEncoder(ji.report).Encode(r)
	ji.report.Close()
	ji.report = nil
}

// startFailed records a job that never ran its command.
func (ji *jobInit) startFailed(err error, code int) int {
	now := time.Now()
	ji.reportStart(startReport{StartedAt: now, Error: err.Error(), ExitCode: code})
	if ji.dirFD >= 0 {
		ji.writeExit(exitRecord{Reason: reasonStartFailed, ExitCode: code, Error: err.Error(), EndedAt: now})
	}
	return 1
}

// writeExit writes exit.json atomically, through the directory fd: after
// pivot_root the job directory has no path in this mount namespace.
func (ji *jobInit) writeExit(rec exitRecord) error {
	data, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	tmp := "." + exitFile + ".tmp"
	fd, err := unix.Openat(ji.dirFD, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("write exit record: %w", err)
	}
	f := os.NewFile(uintptr(fd), tmp)
	_, err = f.Write(append(data, '\n'))
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err == nil {
		err = unix.Renameat(ji.dirFD, tmp, ji.dirFD, exitFile)
	}
	if err != nil {
		return fmt.Errorf("write exit record: %w", err)
	}
	return nil
}

// startError turns a failed exec into a message for the user and the exit
// code a shell would give.
func startError(command string, err error) (error, int) {
	var se setupError
	switch {
	case errors.As(err, &se):
		return se.error, exitSetupFailed
	case errors.Is(err, exec.ErrNotFound), errors.Is(err, unix.ENOENT):
		return fmt.Errorf("command not found: %s", command), exitNotFound
	case errors.Is(err, unix.EACCES), errors.Is(err, unix.ENOEXEC), errors.Is(err, unix.EISDIR), errors.Is(err, unix.EPERM):
		var pe *os.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return fmt.Errorf("cannot execute %s: %v", command, err), exitNotExecutable
	}
	return fmt.Errorf("start %s: %w", command, err), exitSetupFailed
}

type copyResult struct {
	written   int64
	truncated bool
	err       error
}

// truncationMarker is written once when a job's output reaches the cap.
func truncationMarker(limit int64) string {
	return fmt.Sprintf("\n[worker: output reached the %s cap; the rest was dropped]\n", formatSize(limit))
}

// copyOutput moves the command's output into the output file until every
// writer is gone. Past the cap it keeps draining the pipe, so the job never
// blocks, but drops what it reads.
func copyOutput(dst io.Writer, src io.Reader, limit int64) copyResult {
	var r copyResult
	buf := make([]byte, 256<<10)
	for {
		n, rerr := src.Read(buf)
		if n > 0 && !r.truncated && r.err == nil {
			chunk := buf[:n]
			if limit > 0 && r.written+int64(n) > limit {
				chunk = chunk[:limit-r.written]
				r.truncated = true
			}
			w, werr := dst.Write(chunk)
			r.written += int64(w)
			if werr != nil {
				r.err = fmt.Errorf("write output: %w", werr)
			} else if r.truncated {
				dst.Write([]byte(truncationMarker(limit)))
			}
		}
		if rerr != nil {
			if !errors.Is(rerr, io.EOF) && r.err == nil {
				r.err = fmt.Errorf("read output: %w", rerr)
			}
			return r
		}
	}
}

// closeInheritedFDs marks every descriptor above stderr close-on-exec. The
// server passes on whatever its own parent left open without O_CLOEXEC (Go's
// exec closes nothing it was not told about), and the command must not get
// it: a directory opened outside the job's root is a way out of that root,
// writable wherever the host's mount is (close_range(2), Linux 5.11; before
// that, each descriptor in turn).
func closeInheritedFDs() error {
	if unix.CloseRange(3, math.MaxUint32, unix.CLOSE_RANGE_CLOEXEC) == nil {
		return nil
	}
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fmt.Errorf("list inherited file descriptors: %w", err)
	}
	for _, e := range entries {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			unix.CloseOnExec(fd)
		}
	}
	return nil
}

// isolate builds the job's world inside the namespaces the init was cloned into.
func isolate(spec initSpec) error {
	if err := unix.Sethostname([]byte(spec.Hostname)); err != nil {
		return fmt.Errorf("set hostname: %w", err)
	}
	if err := loopbackUp(); err != nil {
		return err
	}
	return buildRoot(spec)
}

// loopbackUp brings up lo, the only interface of a new network namespace.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("bring up lo: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("bring up lo: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bring up lo: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP | unix.IFF_RUNNING)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bring up lo: %w", err)
	}
	return nil
}

// newRootDir is where the job's root is assembled. The init covers the
// host's /tmp with it in its own mount namespace only; nothing below it is
// bound into the job, so the new root never contains itself.
const newRootDir = "/tmp"

// Top-level host entries the job gets its own version of instead.
var privateTopLevel = map[string]bool{"proc": true, "sys": true, "tmp": true, "dev": true, "run": true, strings.TrimPrefix(jobWorkDir, "/"): true}

// buildRoot assembles the job's root: a read-only tmpfs holding read-only
// binds of the host's top-level directories, a fresh /proc, a minimal /dev,
// and private tmpfs /tmp and work directory; then pivots into it and drops
// the host's root entirely.
func buildRoot(spec initSpec) error {
	// Before any mount: nothing done here may propagate to the host (and a
	// shared host /proc would otherwise be replaced for everyone).
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	if err := mountTmpfs(newRootDir, "mode=0755,size=1m", 0); err != nil {
		return err
	}
	entries, err := os.ReadDir("/")
	if err != nil {
		return fmt.Errorf("read /: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		if privateTopLevel[name] {
			continue
		}
		src, dst := "/"+name, filepath.Join(newRootDir, name)
		switch {
		case e.Type()&os.ModeSymlink != 0:
			target, err := os.Readlink(src)
			if err != nil {
				return fmt.Errorf("read link %s: %w", src, err)
			}
			if err := os.Symlink(target, dst); err != nil {
				return fmt.Errorf("link %s: %w", inJob(dst), err)
			}
		case e.IsDir():
			if err := os.Mkdir(dst, 0o755); err != nil {
				return fmt.Errorf("mkdir %s: %w", inJob(dst), err)
			}
			if err := bindReadOnly(src, dst); err != nil {
				return err
			}
		case e.Type().IsRegular():
			if err := os.WriteFile(dst, nil, 0o644); err != nil {
				return fmt.Errorf("create %s: %w", inJob(dst), err)
			}
			if err := bindReadOnly(src, dst); err != nil {
				return err
			}
		}
	}
	for _, d := range []string{"proc", "sys", "tmp", "dev", "run", jobWorkDir[1:]} {
		if err := os.Mkdir(filepath.Join(newRootDir, d), 0o755); err != nil {
			return fmt.Errorf("mkdir /%s: %w", d, err)
		}
	}
	if err := unix.Mount("proc", filepath.Join(newRootDir, "proc"), "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount /proc: %w", err)
	}
	// A sysfs of its own, not the host's: mounted from inside the job's
	// network namespace it lists only the job's interfaces (sysfs(5)).
	if err := unix.Mount("sysfs", filepath.Join(newRootDir, "sys"), "sysfs", unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount /sys: %w", err)
	}
	size := strconv.FormatInt(spec.ScratchBytes, 10)
	if err := mountTmpfs(filepath.Join(newRootDir, "tmp"), "mode=1777,size="+size, 0); err != nil {
		return err
	}
	work := fmt.Sprintf("mode=0700,uid=%d,gid=%d,size=%s", spec.UID, spec.GID, size)
	if err := mountTmpfs(filepath.Join(newRootDir, jobWorkDir), work, 0); err != nil {
		return err
	}
	if err := buildDev(filepath.Join(newRootDir, "dev"), size); err != nil {
		return err
	}
	if err := unix.Mount("", newRootDir, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("make / read-only: %w", err)
	}
	// pivot_root(".", ".") stacks the old root on the new one; detaching it
	// leaves the host's tree unreachable (pivot_root(2), NOTES).
	if err := unix.Chdir(newRootDir); err != nil {
		return fmt.Errorf("chdir new root: %w", err)
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach host root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("chdir /: %w", err)
	}
	return nil
}

func mountTmpfs(dir, options string, flags uintptr) error {
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|flags, options); err != nil {
		return fmt.Errorf("mount tmpfs on %s (%s): %w", inJob(dir), options, err)
	}
	return nil
}

// inJob names a path of the root being assembled as the job will see it.
func inJob(p string) string {
	if rest, ok := strings.CutPrefix(p, newRootDir+"/"); ok {
		return "/" + rest
	}
	if p == newRootDir {
		return "/"
	}
	return p
}

// buildDev gives the job the harmless devices and nothing else.
func buildDev(dev, shmSize string) error {
	if err := mountTmpfs(dev, "mode=0755,size=64k", unix.MS_NOEXEC); err != nil {
		return err
	}
	for _, name := range []string{"null", "zero", "full", "random", "urandom", "tty"} {
		dst := filepath.Join(dev, name)
		if err := os.WriteFile(dst, nil, 0o666); err != nil {
			return fmt.Errorf("create %s: %w", inJob(dst), err)
		}
		if err := unix.Mount("/dev/"+name, dst, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind /dev/%s: %w", name, err)
		}
	}
	links := map[string]string{"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(dev, name)); err != nil {
			return fmt.Errorf("link /dev/%s: %w", name, err)
		}
	}
	shm := filepath.Join(dev, "shm")
	if err := os.Mkdir(shm, 0o755); err != nil {
		return fmt.Errorf("mkdir /dev/shm: %w", err)
	}
	if err := mountTmpfs(shm, "mode=1777,size="+shmSize, 0); err != nil {
		return err
	}
	if err := unix.Mount("", dev, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("make /dev read-only: %w", err)
	}
	return nil
}

// bindReadOnly binds src and everything mounted below it at dst, read-only,
// nosuid and nodev all the way down.
func bindReadOnly(src, dst string) error {
	if err := unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s: %w", src, err)
	}
	attr := &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV}
	err := unix.MountSetattr(-1, dst, unix.AT_RECURSIVE, attr)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("make %s read-only: %w", inJob(dst), err)
	}
	// Before Linux 5.12 there is no recursive mount_setattr: remount each
	// mount below dst on its own (a bind remount changes only that mount).
	mounts, err := mountPointsUnder(dst)
	if err != nil {
		return err
	}
	for _, m := range mounts {
		if err := unix.Mount("", m, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
			return fmt.Errorf("make %s read-only: %w", inJob(m), err)
		}
	}
	return nil
}

// mountPointsUnder lists the mount points at or below dir, from mountinfo.
func mountPointsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountField(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out, sc.Err()
}

// dropPrivileges empties the bounding, inheritable and ambient capability
// sets and sets no_new_privs on this thread, which forks the command. The
// setuid to the job user then clears the permitted and effective sets, and
// with the bounding set empty no exec can give any back.
func dropPrivileges() error {
	last, err := capLastCap()
	if err != nil {
		return err
	}
	for c := 0; c <= last; c++ {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
			return fmt.Errorf("drop capability %d from the bounding set: %w", c, err)
		}
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("read capabilities: %w", err)
	}
	data[0].Inheritable, data[1].Inheritable = 0, 0
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("clear inheritable capabilities: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("set no_new_privs: %w", err)
	}
	return nil
}

func capLastCap() (int, error) {
	data, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return 0, fmt.Errorf("read cap_last_cap: %w", err)
	}
	return strconv.Atoi(strings.TrimSpace(string(data)))
}
