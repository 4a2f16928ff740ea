//go:build linux

// vm_guest_test.go: the checks TestCgroupV2VM runs inside the cgroup v2 VM,
// and the payloads their jobs run. Every TestGuest* test here runs in the VM
// as root (elsewhere it skips: vmGuestOnly), and goes through the real server:
// it starts one in this process with newTestServer, which opens the cgroup
// tree as a real start does (unified mode; this process moves into the leaf
// <own>/server, jobs go in <own>/jobs/<id>), and starts its jobs over HTTPS.
// Only what the API cannot show is read from the side: the job cgroup's
// files while the job runs, and /proc of the guest.
//
// Jobs run busybox (/bin in the guest) or this test binary (/init, which a
// job sees read-only like the rest of the guest's root) in one of its
// testHelpers modes. The guest has /dev/nvme0n1, a raw 64 MiB disk.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testHelpers are the payload modes of the test binary, run as
// `WORKER_TEST_HELPER=name <test binary> args...` (see TestMain).
var testHelpers = map[string]func(args []string) error{
	"alloc":     helperAlloc,
	"spin":      helperSpin,
	"forker":    helperForker,
	"isolation": helperIsolation,
}

// guestServer starts a real server in this process, on a fresh state dir,
// with a short grace period so stops are quick. Its log is kept out of the
// check's output unless the check fails.
func guestServer(t *testing.T) *testServer {
	t.Helper()
	ts, _ := guestServerLog(t)
	return ts
}

// guestServerLog is guestServer, and the server's log as it is written.
func guestServerLog(t *testing.T) (*testServer, *lockedBuffer) {
	t.Helper()
	vmGuestOnly(t)
	logs := &lockedBuffer{}
	// slog.SetDefault also points the log package at the new handler, and
	// putting back the default slog handler does not undo that.
	oldSlog, oldOut, oldFlags := slog.Default(), log.Writer(), log.Flags()
	slog.SetDefault(slog.New(slog.NewTextHandler(logs, nil)))
	// Registered before the server's cleanup, so it runs after it: the
	// server's last words are kept too.
	t.Cleanup(func() {
		slog.SetDefault(oldSlog)
		log.SetOutput(oldOut)
		log.SetFlags(oldFlags)
		if t.Failed() {
			t.Logf("server log:\n%s", logs)
		}
	})
	ts := newTestServer(t, func(c *serverConfig) { c.grace = 500 * time.Millisecond })
	return ts, logs
}

// helperJob asks for a job running this test binary in helper mode name.
// One P: a Go payload then needs few threads (pids.max counts them).
func helperJob(name string, l Limits, args ...string) runRequest {
	return runRequest{Command: "/init", Args: args, Limits: l,
		Env: map[string]string{testHelperEnv: name, "GOMAXPROCS": "1"}}
}

// jobCgroupDir is where the server keeps job id's cgroup.
func jobCgroupDir(t *testing.T, ts *testServer, id string) string {
	t.Helper()
	dir := ts.srv.cgroups.job(id).dir("memory")
	if dir == "" {
		t.Fatalf("the server has no cgroup directory for job %s", id)
	}
	return dir
}

// ---- 1. the tree ----

func TestGuestServerDetectsUnifiedModeAndMovesIntoLeaf(t *testing.T) {
	vmGuestOnly(t)
	before := ownCgroup(t)
	ts, logs := guestServerLog(t)
	if ts.srv.cgroups == nil {
		t.Fatal("the server runs without cgroups")
	}
	if mode := ts.srv.cgroups.mode(); mode != cgroupModeUnified {
		t.Fatalf("cgroup mode = %q, want %q", mode, cgroupModeUnified)
	}
	if !strings.Contains(logs.String(), "msg=cgroups mode=unified") {
		t.Errorf("the server did not log its cgroup mode; its log:\n%s", logs)
	}

	// The server's own cgroup, as it was before the first server of this
	// guest moved the process into <own>/server.
	base := before
	if path.Base(before) == "server" {
		base = path.Dir(before)
	}
	after := ownCgroup(t)
	if want := path.Join(base, "server"); after != want {
		t.Fatalf("the server process is in cgroup %q (was %q), want the leaf %q", after, before, want)
	}
	tasks, _ := filepath.Glob("/proc/self/task/*/cgroup")
	for _, task := range tasks {
		if b, err := os.ReadFile(task); err == nil && strings.TrimSpace(string(b)) != "0::"+after {
			t.Errorf("thread %s is in %q, not in the server's leaf %s", task, strings.TrimSpace(string(b)), after)
		}
	}
	own := filepath.Join(cgroupMountPoint, base)
	for _, dir := range []string{own, filepath.Join(own, "jobs")} {
		ctl := readTrimmed(t, filepath.Join(dir, "cgroup.subtree_control"))
		for _, c := range []string{"cpu", "io", "memory", "pids"} {
			if !slices.Contains(strings.Fields(ctl), c) {
				t.Errorf("%s/cgroup.subtree_control = %q, missing %s", dir, ctl, c)
			}
		}
	}
	if procs := readTrimmed(t, filepath.Join(own, "jobs", "cgroup.procs")); procs != "" {
		t.Errorf("processes %q in %s/jobs itself, want none (no internal processes)", procs, own)
	}

	// A job's cgroup is <own>/jobs/<id>, its command's <id>/command with the default pids limit.
	j := ts.run("admin", runRequest{Command: "sleep", Args: []string{"60"}})
	rec, _ := ts.srv.store.get(j.ID)
	dir := jobCgroupDir(t, ts, j.ID)
	if want := filepath.Join(own, "jobs", j.ID); dir != want {
		t.Errorf("job cgroup at %s, want %s", dir, want)
	}
	initCg := readTrimmed(t, fmt.Sprintf("/proc/%d/cgroup", rec.InitPID))
	// Born in <id>, the init moves to <id>/init so pids can be enabled below <id>.
	if want := "0::" + path.Join(base, "jobs", j.ID, initCgroup); initCg != want {
		t.Errorf("the job's init (pid %d) is in %q, want %q", rec.InitPID, initCg, want)
	}
	// The pids limit is on the command's own cgroup, below the init's.
	if got := readTrimmed(t, filepath.Join(dir, commandCgroup, "pids.max")); got != strconv.FormatInt(ts.srv.cfg.pids, 10) {
		t.Errorf("pids.max of a job that asked for no limit = %s, want the server default %d", got, ts.srv.cfg.pids)
	}
	if got := readTrimmed(t, filepath.Join(dir, commandCgroup, "cgroup.procs")); got == "" || strings.Contains(got, strconv.Itoa(rec.InitPID)) {
		t.Errorf("%s/%s/cgroup.procs = %q, want the command and not the init (%d)", dir, commandCgroup, got, rec.InitPID)
	}
	stopJob(t, ts, j.ID)
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("job cgroup %s still there after the job ended (%v)", dir, err)
	}
	t.Logf("mode unified; server moved from %q to %q; %s/jobs enables %q; job init in %s",
		before, after, own, readTrimmed(t, filepath.Join(own, "jobs", "cgroup.subtree_control")), strings.TrimPrefix(initCg, "0::"))
}

// ---- 2. memory ----

func TestGuestMemoryLimitOOMKillsJobAndReportsPeak(t *testing.T) {
	ts := guestServer(t)
	const limit = 32 << 20
	hog := ts.run("admin", helperJob("alloc", Limits{Memory: limit}, "100"))
	out, end := ts.wait("admin", hog.ID)
	peak := end.Usage.MemoryPeakBytes
	if end.Status != statusFailed || end.Reason != reasonOOM {
		t.Errorf("a job touching 100 MiB under limits.memory=32M ended %s (reason %q, signal %q, exit %d), want FAILED with reason oom; output %q",
			end.Status, end.Reason, end.Signal, derefInt(end.ExitCode), out)
	}
	// The peak may pass the limit by the charge in flight when the OOM
	// killer ran (seen on hosts: a page).
	if peak <= 16<<20 || peak > limit+2<<20 {
		t.Errorf("memory_peak_bytes = %d, want about the 32M limit (16M < peak <= 34M)", peak)
	}

	// The same hog under a limit it fits in: the limit, nothing else, killed it.
	roomy := ts.run("admin", helperJob("alloc", Limits{Memory: 256 << 20}, "100"))
	out2, end2 := ts.wait("admin", roomy.ID)
	if end2.Status != statusCompleted || !strings.Contains(out2, "survived holding 100 MiB") {
		t.Errorf("the hog under limits.memory=256M ended %s (reason %q), output %q; want COMPLETED", end2.Status, end2.Reason, out2)
	}
	if end2.Usage.MemoryPeakBytes < 100<<20 || end2.Usage.MemoryPeakBytes > 256<<20 {
		t.Errorf("memory_peak_bytes under 256M = %d, want 100-256 MiB", end2.Usage.MemoryPeakBytes)
	}
	t.Logf("100 MiB hog: under 32M %s reason=%s signal=%s memory_peak_bytes=%d (%.1f MiB); under 256M %s memory_peak_bytes=%d (%.1f MiB)",
		end.Status, end.Reason, end.Signal, peak, float64(peak)/(1<<20), end2.Status, end2.Usage.MemoryPeakBytes, float64(end2.Usage.MemoryPeakBytes)/(1<<20))
}

// ---- 3. cpu ----

func TestGuestCPULimitThrottlesSpinningJob(t *testing.T) {
	ts := guestServer(t)
	begin := time.Now()
	j := ts.run("admin", helperJob("spin", Limits{CPU: 0.2}, "1.5s"))
	dir := jobCgroupDir(t, ts, j.ID)
	cpuMax := readTrimmed(t, filepath.Join(dir, "cpu.max"))
	// cpu.stat goes with the cgroup when the job ends: read it while it runs.
	var throttled int64
	var stat string
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
		if err != nil {
			break // ended
		}
		stat = string(b)
		if v, ok := flatKeyed(filepath.Join(dir, "cpu.stat"), "nr_throttled"); ok && v > throttled {
			throttled = v
		}
	}
	out, end := ts.wait("admin", j.ID)
	wall := time.Since(begin)
	cpu := end.Usage.CPUSeconds

	if cpuMax != "20000 100000" {
		t.Errorf("cpu.max of a job with limits.cpu=0.2 = %q, want \"20000 100000\"", cpuMax)
	}
	if end.Status != statusCompleted {
		t.Fatalf("the spinning job ended %s (reason %q): %s", end.Status, end.Reason, out)
	}
	var spinWall, spinCPU time.Duration
	if _, err := fmt.Sscanf(strings.TrimSpace(out), "spun wall=%d cpu=%d", &spinWall, &spinCPU); err != nil {
		t.Fatalf("spin printed %q: %v", out, err)
	}
	if throttled == 0 {
		t.Errorf("cpu.stat nr_throttled stayed 0 while the job spun; last cpu.stat:\n%s", stat)
	}
	// 0.2 cores: at most 0.2 cpu-s per second of wall (the job's init and
	// the payload's start count too), plus a period's slack.
	if cpu <= 0.05 || cpu > 0.2*wall.Seconds()+0.1 {
		t.Errorf("job cpu_seconds = %.3f in %.2f s of wall, want at most 0.2 per second", cpu, wall.Seconds())
	}
	if share := spinCPU.Seconds() / spinWall.Seconds(); spinCPU >= 500*time.Millisecond || share > 0.3 {
		t.Errorf("the busy loop got %s of cpu in %s of wall (%.2f cores), want about 0.2 cores and under 0.5 s", spinCPU, spinWall, share)
	}
	t.Logf("busy loop under limits.cpu=0.2: spun %s of wall on %s of cpu (%.2f cores); job cpu_seconds=%.3f in %.2f s of wall; nr_throttled=%d",
		spinWall.Round(time.Millisecond), spinCPU.Round(time.Millisecond), spinCPU.Seconds()/spinWall.Seconds(), cpu, wall.Seconds(), throttled)
}

// ---- 4. pids ----

func TestGuestPidsLimitCapsJobTasks(t *testing.T) {
	ts := guestServer(t)
	const limit, tries = 24, 40
	req := helperJob("forker", Limits{Pids: limit}, strconv.Itoa(tries))
	req.Env["GOGC"] = "off" // no GC workers: the payload starts no thread of its own at the limit
	j := ts.run("admin", req)
	dir := jobCgroupDir(t, ts, j.ID)
	waitForOutput(t, ts, j.ID, "started=")
	// The limit is on the command's cgroup: the init's threads never count.
	dir = filepath.Join(dir, commandCgroup)
	pidsMax := readTrimmed(t, filepath.Join(dir, "pids.max"))
	current, _ := readCgroupInt(filepath.Join(dir, "pids.current"))
	peak, peakErr := readCgroupInt(filepath.Join(dir, "pids.peak")) // not in every kernel
	refused, _ := flatKeyed(filepath.Join(dir, "pids.events"), "max")
	threads := len(readCgroupPids(filepath.Join(dir, "cgroup.threads")))
	end := stopJob(t, ts, j.ID)
	out, _ := ts.wait("admin", j.ID)

	var started, eagain, other int
	if _, err := fmt.Sscanf(out, "started=%d eagain=%d other=%d", &started, &eagain, &other); err != nil {
		t.Fatalf("forker printed %q: %v", out, err)
	}
	peakText := "absent"
	if peakErr == nil {
		peakText = strconv.FormatInt(peak, 10)
	}
	if pidsMax != strconv.Itoa(limit) {
		t.Errorf("pids.max = %q, want %d", pidsMax, limit)
	}
	if eagain == 0 || other != 0 || started+eagain != tries {
		t.Errorf("%d forks under limits.pids=%d: %d started, %d EAGAIN, %d other errors; want the rest refused with EAGAIN and nothing else", tries, limit, started, eagain, other)
	}
	if current > limit || threads > limit || (peakErr == nil && peak > limit) {
		t.Errorf("the job exceeded limits.pids=%d: pids.current %d, tasks in cgroup.threads %d, pids.peak %s", limit, current, threads, peakText)
	}
	if refused == 0 {
		t.Errorf("pids.events max = 0 after refused forks")
	}
	// The job's init (a Go program, counted too) must have lived through it.
	if end.Status != statusStopped {
		t.Errorf("the job ended %s (reason %q, error %q) after a stop, want STOPPED: its init did not survive the limit", end.Status, end.Reason, end.Error)
	}
	t.Logf("%d forks under limits.pids=%d: %d started, %d EAGAIN; pids.current %d, tasks %d, pids.peak %s, pids.events max %d",
		tries, limit, started, eagain, current, threads, peakText, refused)
}

// ---- 5. io ----

// TestGuestIOLimitThrottlesDirectReadsAndWrites: a job can only read disks
// (SPEC §6: the host filesystem is read-only to it, its scratch space is
// memory), so the job does the O_DIRECT reads, from a file on an ext2 made on
// the NVMe disk, and the write half of the io.max line the server wrote is
// checked by a root writer born into the job's cgroup (clone3
// CLONE_INTO_CGROUP through the server's own jobCgroup.openFD). Both sides
// are then in the job's usage, which the server reads from io.stat.
func TestGuestIOLimitThrottlesDirectReadsAndWrites(t *testing.T) {
	vmGuestOnly(t)
	const size, limit = 8 << 20, 4 << 20
	disk, dev := guestDiskFS(t) // before the server: its cleanup must run after the server's
	ts := guestServer(t)

	data := filepath.Join(disk, "data")
	if err := os.WriteFile(data, bytes.Repeat([]byte{0xa5}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	unix.Sync()
	// busybox time: its dd does not say how long it took.
	ddArgs := []string{"-f", "dd took %e s", "dd", "if=" + data, "of=/dev/null", "bs=1M", "iflag=direct"}

	// Unlimited, through a job too: the throttle is what slows the next one.
	free := ts.run("admin", runRequest{Command: "time", Args: ddArgs})
	freeOut, freeEnd := ts.wait("admin", free.ID)
	freeRead := ddSeconds(t, "unlimited read job", freeOut)
	if freeEnd.Status != statusCompleted {
		t.Fatalf("unlimited dd job ended %s: %s", freeEnd.Status, freeOut)
	}

	flag := filepath.Join(disk, "writer-done")
	script := `time "$@" && echo read-done && while [ ! -e ` + flag + ` ]; do sleep 0.1; done`
	j := ts.run("admin", runRequest{Command: "sh", Args: append([]string{"-c", script, "sh"}, ddArgs...), Limits: Limits{IOBps: limit}})
	dir := jobCgroupDir(t, ts, j.ID)
	ioMax := readTrimmed(t, filepath.Join(dir, "io.max"))

	writeArgs := []string{"-f", "dd took %e s", "dd", "if=/dev/zero", "bs=1M", "count=8", "oflag=direct", "conv=fsync"}
	fd := openCommandCgroup(t, dir)
	w := exec.Command("/bin/time", append(writeArgs, "of="+filepath.Join(disk, "limited"))...)
	w.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	wOut, err := w.CombinedOutput()
	unix.Close(fd)
	if err != nil {
		t.Fatalf("O_DIRECT writer in the job's cgroup: %v: %s", err, wOut)
	}
	limitedWrite := ddSeconds(t, "writer in the job's cgroup", string(wOut))
	if err := os.WriteFile(flag, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	out, end := ts.wait("admin", j.ID)
	limitedRead := ddSeconds(t, "limited read job", out)

	fw := exec.Command("/bin/time", append(writeArgs, "of="+filepath.Join(disk, "free"))...)
	fwOut, err := fw.CombinedOutput()
	if err != nil {
		t.Fatalf("unlimited O_DIRECT writer: %v: %s", err, fwOut)
	}
	freeWrite := ddSeconds(t, "unlimited writer", string(fwOut))

	if want := fmt.Sprintf("%s rbps=%d wbps=%d", dev, limit, limit); !strings.Contains(ioMax, want) {
		t.Errorf("io.max = %q, want a line %q for the NVMe disk", ioMax, want)
	}
	if end.Status != statusCompleted {
		t.Errorf("the limited read job ended %s (reason %q): %s", end.Status, end.Reason, out)
	}
	// size/limit = 2 s; blk-throttle lets a slice's worth through early.
	for _, c := range []struct {
		what        string
		limited, fr float64
	}{{"read", limitedRead, freeRead}, {"write", limitedWrite, freeWrite}} {
		if c.limited < 1.5 || c.limited > 4 {
			t.Errorf("O_DIRECT %s of 8 MiB under limits.io_bps=4M took %.2f s, want about 2 s (1.5-4)", c.what, c.limited)
		}
		if c.fr > c.limited/2 {
			t.Errorf("unlimited O_DIRECT %s took %.2f s, not much faster than the limited %.2f s: the throttle is not what slowed it", c.what, c.fr, c.limited)
		}
	}
	if end.Usage.IOReadBytes < size || end.Usage.IOWriteBytes < size {
		t.Errorf("usage io_read_bytes=%d io_write_bytes=%d, want each >= %d", end.Usage.IOReadBytes, end.Usage.IOWriteBytes, size)
	}
	t.Logf("io.max %q; 8 MiB O_DIRECT under 4M/s: read %.2f s (unlimited %.3f s), write %.2f s (unlimited %.3f s); usage io_read_bytes=%d io_write_bytes=%d",
		ioMax, limitedRead, freeRead, limitedWrite, freeWrite, end.Usage.IOReadBytes, end.Usage.IOWriteBytes)
}

// guestDiskFS makes an ext2 filesystem on the guest's raw NVMe disk and
// mounts it on /var/disk, where jobs see it (read-only, like all of the
// host). It returns the mount point and the disk's MAJ:MIN.
func guestDiskFS(t *testing.T) (string, string) {
	t.Helper()
	vmGuestOnly(t) // it formats a disk: never on a host
	devNum, err := os.ReadFile("/sys/block/nvme0n1/dev")
	if err != nil {
		t.Fatalf("the NVMe disk is missing: %v", err)
	}
	if out, err := exec.Command("/bin/mke2fs", "-F", "/dev/nvme0n1").CombinedOutput(); err != nil {
		t.Fatalf("mke2fs /dev/nvme0n1: %v: %s", err, out)
	}
	dir := "/var/disk"
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The ext4 driver (built in) mounts ext2.
	if err := unix.Mount("/dev/nvme0n1", dir, "ext4", unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		t.Fatalf("mount /dev/nvme0n1 on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir, strings.TrimSpace(string(devNum))
}

var ddTook = regexp.MustCompile(`dd took ([0-9.]+) s`)

// ddSeconds reads the time `time -f "dd took %e s" dd ...` reports.
func ddSeconds(t *testing.T, what, out string) float64 {
	t.Helper()
	m := ddTook.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("%s: no time in dd's output %q", what, out)
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// ---- 6. stop ----

func TestGuestStopKillsEveryProcessAndRemovesCgroup(t *testing.T) {
	ts := guestServer(t)
	// A child ignoring SIGTERM, a double-forked daemon in its own session,
	// and a main command ignoring SIGTERM too, so only the KILL after the
	// grace period ends the job; each sleep's argument marks it in /proc.
	script := `sh -c 'trap "" TERM; exec sleep 4241' & sh -c 'setsid sleep 4242 &'; trap "" TERM; echo ready; exec sleep 4243`
	j := ts.run("admin", runRequest{Command: "sh", Args: []string{"-c", script}})
	dir := jobCgroupDir(t, ts, j.ID)
	waitForOutput(t, ts, j.ID, "ready")

	// And a process in the job's cgroup but outside its PID namespace, where
	// the init's kill(-1) cannot reach: only the server's kill of the cgroup
	// (cgroup.kill) ends it.
	fd := openCommandCgroup(t, jobCgroupDir(t, ts, j.ID))
	intruder := exec.Command("/bin/sleep", "4244")
	intruder.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	err := intruder.Start()
	unix.Close(fd)
	if err != nil {
		t.Fatal(err)
	}
	intruderDone := make(chan error, 1)
	go func() { intruderDone <- intruder.Wait() }()
	t.Cleanup(func() { intruder.Process.Kill(); <-intruderDone })

	markers := []string{"4241", "4242", "4243", "4244"}
	var procs map[string]int
	eventually(t, 10*time.Second, func() error {
		procs = sleepersByMarker(markers)
		if len(procs) != len(markers) {
			return fmt.Errorf("job processes by marker: %v, want all of %v", procs, markers)
		}
		return nil
	})
	rel := "0::" + path.Join(strings.TrimPrefix(dir, cgroupMountPoint), commandCgroup)
	for m, pid := range procs {
		if got := readTrimmed(t, fmt.Sprintf("/proc/%d/cgroup", pid)); got != rel {
			t.Errorf("sleep %s (pid %d) is in %q, want the job's command cgroup %q", m, pid, got, rel)
		}
	}
	if !ignoresTERM(t, procs["4241"]) {
		t.Errorf("sleep 4241 (pid %d) does not ignore SIGTERM: the check would not test the KILL", procs["4241"])
	}

	begin := time.Now()
	end := stopJob(t, ts, j.ID)
	took := time.Since(begin)
	if end.Status != statusStopped || end.Reason != reasonStopped || end.Signal != "SIGKILL" {
		t.Errorf("after POST /stop the job is %s (reason %q, signal %q), want STOPPED by SIGKILL", end.Status, end.Reason, end.Signal)
	}
	if grace := ts.srv.cfg.grace; took < grace {
		t.Errorf("a job ignoring SIGTERM stopped in %s, before the %s grace period ended", took, grace)
	}
	select {
	case err := <-intruderDone:
		intruderDone <- err
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Errorf("the process in the job's cgroup outside its PID namespace ended with %v, want SIGKILL", err)
		}
	case <-time.After(10 * time.Second):
		t.Errorf("the process in the job's cgroup outside its PID namespace (pid %d) still runs 10 s after the stop", intruder.Process.Pid)
	}
	eventually(t, 10*time.Second, func() error {
		if left := sleepersByMarker(markers); len(left) > 0 {
			return fmt.Errorf("processes of the stopped job still exist: %v", left)
		}
		return nil
	})
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("job cgroup %s still there after the stop (%v)", dir, err)
	}
	t.Logf("stopped %d processes (one ignoring TERM, a setsid daemon, one outside the PID namespace) in %s; status %s signal %s; cgroup removed",
		len(procs), took.Round(time.Millisecond), end.Status, end.Signal)
}

// sleepersByMarker maps each marker to the pid of a live `sleep <marker>`.
func sleepersByMarker(markers []string) map[string]int {
	found := map[string]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		argv := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if len(argv) == 2 && path.Base(argv[0]) == "sleep" && slices.Contains(markers, argv[1]) {
			if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
				if _, rest, _ := strings.Cut(string(st), ") "); strings.HasPrefix(rest, "Z") {
					continue // dead, not yet reaped
				}
			}
			found[argv[1]] = pid
		}
	}
	return found
}

func ignoresTERM(t *testing.T, pid int) bool {
	t.Helper()
	v, ok := procStatus(t, pid)["SigIgn"]
	if !ok {
		return false
	}
	mask, err := strconv.ParseUint(v, 16, 64)
	return err == nil && mask&(1<<(uint(syscall.SIGTERM)-1)) != 0
}

// ---- 7. isolation ----

// isolationReport is what a job sees of its world (helperIsolation).
type isolationReport struct {
	Pid        int               `json:"pid"`
	Procs      []string          `json:"procs"` // "pid comm" of its /proc
	NS         map[string]string `json:"ns"`
	Hostname   string            `json:"hostname"`
	NetDevs    []string          `json:"net_devs"` // from /proc/net/dev
	LoUp       bool              `json:"lo_up"`
	DialServer string            `json:"dial_server"` // the error dialing the server's port
	Cgroup     string            `json:"cgroup"`
	Status     map[string]string `json:"status"` // from /proc/self/status
	Cwd        string            `json:"cwd"`
	Env        []string          `json:"env"`
	RootRO     bool              `json:"root_ro"`
	WriteRoot  string            `json:"write_root"` // the error creating /probe
	WriteEtc   string            `json:"write_etc"`  // the error creating /etc/probe
	TmpBefore  []string          `json:"tmp_before"`
	WriteTmp   string            `json:"write_tmp"`
	WriteWork  string            `json:"write_work"`
	Dev        []string          `json:"dev"`
	DiskNode   string            `json:"disk_node"` // the error opening /dev/nvme0n1
}

var namespaceKinds = []string{"pid", "mnt", "net", "uts", "ipc", "cgroup"}

func TestGuestJobIsIsolated(t *testing.T) {
	ts := guestServer(t)
	// Something in the guest's /tmp, which the job's /tmp must not show.
	hostTmp, err := os.CreateTemp("", "vmcheck-host-tmp-")
	if err != nil {
		t.Fatal(err)
	}
	hostTmp.Close()
	t.Cleanup(func() { os.Remove(hostTmp.Name()) })
	hostname, _ := os.Hostname()
	mountsBefore := readTrimmed(t, "/proc/self/mountinfo")
	ifacesBefore := interfaceNames(t)
	serverAddr := strings.TrimPrefix(ts.http.URL, "https://")

	j := ts.run("admin", helperJob("isolation", Limits{}, serverAddr))
	dir := jobCgroupDir(t, ts, j.ID)
	out, end := ts.wait("admin", j.ID)
	if end.Status != statusCompleted {
		t.Fatalf("isolation job ended %s (reason %q, error %q): %s", end.Status, end.Reason, end.Error, out)
	}
	var got isolationReport
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("isolation helper printed %q: %v", out, err)
	}

	for _, kind := range namespaceKinds {
		mine, err := os.Readlink("/proc/self/ns/" + kind)
		if err != nil {
			t.Fatal(err)
		}
		if got.NS[kind] == "" || got.NS[kind] == mine {
			t.Errorf("%s namespace of the job = %q, want its own (the server's is %q)", kind, got.NS[kind], mine)
		}
	}
	ownPID := fmt.Sprintf("%d init", got.Pid)
	if len(got.Procs) != 2 || got.Procs[0] != "1 worker-init" || !slices.Contains(got.Procs, ownPID) {
		t.Errorf("processes the job sees = %q, want only its init and itself (\"1 worker-init\", %q)", got.Procs, ownPID)
	}
	status := got.Status
	env := slices.Sorted(slices.Values(got.Env))
	wantEnv := []string{"GOMAXPROCS=1", "HOME=" + jobWorkDir, "HOSTNAME=" + j.ID, "PATH=" + jobPath, testHelperEnv + "=isolation"}
	checks := []struct {
		what      string
		got, want any
	}{
		{"hostname", got.Hostname, j.ID},
		{"network devices", strings.Join(got.NetDevs, ","), "lo"},
		{"lo up", got.LoUp, true},
		// Rooted at the job's cgroup; the command lives in its sub-cgroup.
		{"/proc/self/cgroup (cgroup namespace)", got.Cgroup, "0::/" + commandCgroup},
		{"Uid", status["Uid"], "65534\t65534\t65534\t65534"},
		{"Gid", status["Gid"], "65534\t65534\t65534\t65534"},
		{"Groups", status["Groups"], ""},
		{"CapEff", status["CapEff"], "0000000000000000"},
		{"CapPrm", status["CapPrm"], "0000000000000000"},
		{"CapInh", status["CapInh"], "0000000000000000"},
		{"CapBnd", status["CapBnd"], "0000000000000000"},
		{"CapAmb", status["CapAmb"], "0000000000000000"},
		{"NoNewPrivs", status["NoNewPrivs"], "1"},
		{"cwd", got.Cwd, jobWorkDir},
		{"environment", strings.Join(env, " "), strings.Join(wantEnv, " ")},
		{"/ mounted read-only", got.RootRO, true},
		{"creating /probe", got.WriteRoot, "read-only file system"},
		{"creating /etc/probe", got.WriteEtc, "read-only file system"},
		{"/tmp at start", strings.Join(got.TmpBefore, ","), ""},
		{"writing /tmp", got.WriteTmp, ""},
		{"writing the work dir", got.WriteWork, ""},
		{"opening /dev/nvme0n1", got.DiskNode, "no such file or directory"},
	}
	for _, c := range checks {
		if fmt.Sprint(c.got) != fmt.Sprint(c.want) {
			t.Errorf("%s = %q, want %q", c.what, fmt.Sprint(c.got), fmt.Sprint(c.want))
		}
	}
	if !strings.Contains(got.DialServer, "connection refused") {
		t.Errorf("dialing the server's %s from the job: %q, want connection refused (its own network namespace)", serverAddr, got.DialServer)
	}
	for _, d := range got.Dev {
		if !slices.Contains([]string{"fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"}, d) {
			t.Errorf("the job's /dev has %s: want only the harmless devices (have %q)", d, got.Dev)
		}
	}

	// Nothing of the job's isolation leaks into the guest.
	if h, _ := os.Hostname(); h != hostname {
		t.Errorf("guest hostname changed from %q to %q", hostname, h)
	}
	if m := readTrimmed(t, "/proc/self/mountinfo"); m != mountsBefore {
		t.Errorf("the server's mounts changed while the job ran:\nbefore:\n%s\nafter:\n%s", mountsBefore, m)
	}
	if ifaces := interfaceNames(t); !slices.Equal(ifaces, ifacesBefore) {
		t.Errorf("guest interfaces changed from %q to %q", ifacesBefore, ifaces)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("job cgroup %s still there after the job ended (%v)", dir, err)
	}
	t.Logf("job %s: pid %d, sees %q; hostname %s; net %q; cgroup %q; uid %s; CapEff %s CapBnd %s NoNewPrivs %s; / ro (%s); /tmp empty; server port: %s",
		j.ID, got.Pid, got.Procs, got.Hostname, got.NetDevs, got.Cgroup, strings.Fields(status["Uid"])[0], status["CapEff"], status["CapBnd"], status["NoNewPrivs"], got.WriteRoot, got.DialServer)
}

func interfaceNames(t *testing.T) []string {
	t.Helper()
	ifaces, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, ifc := range ifaces {
		names = append(names, ifc.Name)
	}
	return names
}

// ---- plumbing ----

// stopJob stops a job through the API and returns its final record.
func stopJob(t *testing.T, ts *testServer, id string) Job {
	t.Helper()
	code, body := ts.do("admin", "POST", "/v1/jobs/"+id+"/stop", nil)
	if code != 200 {
		t.Fatalf("stop %s: %d %s", id, code, body)
	}
	var j Job
	if err := json.Unmarshal(body, &j); err != nil {
		t.Fatalf("stop %s: %v: %s", id, err, body)
	}
	return j
}

func ownCgroup(t *testing.T) string {
	t.Helper()
	cg, ok := parseProcCgroup(readTrimmed(t, "/proc/self/cgroup"))[""]
	if !ok {
		t.Fatal("no cgroup v2 entry in /proc/self/cgroup")
	}
	return cg
}

func readTrimmed(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	m, err := readProcStatus(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func readProcStatus(p string) (map[string]string, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	m := map[string]string{}
	for line := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m, nil
}

// lockedBuffer is a bytes.Buffer safe for the server's concurrent logging.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// ---- payloads ----

// helperAlloc touches args[0] MiB, page by page, and keeps it referenced.
func helperAlloc(args []string) error {
	mib, err := strconv.Atoi(args[0])
	if err != nil {
		return err
	}
	hog := make([][]byte, 0, mib)
	for range mib {
		b := make([]byte, 1<<20)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1
		}
		hog = append(hog, b)
	}
	fmt.Printf("survived holding %d MiB\n", len(hog))
	return nil
}

// helperSpin spins for args[0] of wall time and prints the wall time and
// the cpu time it got, in nanoseconds.
func helperSpin(args []string) error {
	d, err := time.ParseDuration(args[0])
	if err != nil {
		return err
	}
	start := time.Now()
	for time.Since(start) < d {
	}
	wall := time.Since(start)
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return err
	}
	cpu := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	fmt.Printf("spun wall=%d cpu=%d\n", wall.Nanoseconds(), cpu.Nanoseconds())
	return nil
}

// helperForker starts args[0] `sleep 600` processes, counting the forks
// refused, prints the counts and waits to be stopped.
func helperForker(args []string) error {
	n, err := strconv.Atoi(args[0])
	if err != nil {
		return err
	}
	forkSleepers(n, "600")
	time.Sleep(time.Hour)
	return nil
}

// helperIsolation reports what the job sees, as JSON; args[0] is the
// server's address, which must be unreachable.
func helperIsolation(args []string) error {
	r := isolationReport{Pid: os.Getpid(), NS: map[string]string{}}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			r.Procs = append(r.Procs, fmt.Sprintf("%d %s", pid, strings.TrimSpace(string(comm))))
		}
	}
	for _, kind := range namespaceKinds {
		r.NS[kind], _ = os.Readlink("/proc/self/ns/" + kind)
	}
	r.Hostname, _ = os.Hostname()
	netdev, err := os.ReadFile("/proc/net/dev")
	if err != nil {
		return err
	}
	for line := range strings.Lines(string(netdev)) {
		if name, _, ok := strings.Cut(line, ":"); ok && !strings.Contains(name, "|") {
			r.NetDevs = append(r.NetDevs, strings.TrimSpace(name))
		}
	}
	if lo, err := net.InterfaceByName("lo"); err == nil {
		r.LoUp = lo.Flags&net.FlagUp != 0
	}
	if c, err := net.DialTimeout("tcp", args[0], 5*time.Second); err != nil {
		r.DialServer = err.Error()
	} else {
		c.Close()
	}
	cg, _ := os.ReadFile("/proc/self/cgroup")
	r.Cgroup = strings.TrimSpace(string(cg))
	if r.Status, err = readProcStatus("/proc/self/status"); err != nil {
		return err
	}
	r.Cwd, _ = os.Getwd()
	r.Env = os.Environ()
	var st unix.Statfs_t
	if err := unix.Statfs("/", &st); err == nil {
		r.RootRO = st.Flags&unix.ST_RDONLY != 0
	}
	errText := func(err error) string {
		var errno syscall.Errno
		if errors.As(err, &errno) {
			return errno.Error()
		}
		if err != nil {
			return err.Error()
		}
		return ""
	}
	r.WriteRoot = errText(os.WriteFile("/probe", nil, 0o644))
	r.WriteEtc = errText(os.WriteFile("/etc/probe", nil, 0o644))
	tmp, _ := os.ReadDir("/tmp")
	for _, e := range tmp {
		r.TmpBefore = append(r.TmpBefore, e.Name())
	}
	r.WriteTmp = errText(os.WriteFile("/tmp/probe", []byte("x"), 0o644))
	r.WriteWork = errText(os.WriteFile(filepath.Join(jobWorkDir, "probe"), []byte("x"), 0o644))
	dev, _ := os.ReadDir("/dev")
	for _, e := range dev {
		r.Dev = append(r.Dev, e.Name())
	}
	f, err := os.Open("/dev/nvme0n1")
	if err == nil {
		f.Close()
	}
	r.DiskNode = errText(err)
	return json.NewEncoder(os.Stdout).Encode(r)
}

// openCommandCgroup opens a job's command cgroup for CLONE_INTO_CGROUP: once
// the job runs, its own cgroup has pids enabled for its children and may
// hold no process.
func openCommandCgroup(t *testing.T, jobDir string) int {
	t.Helper()
	fd, err := unix.Open(filepath.Join(jobDir, commandCgroup), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}
