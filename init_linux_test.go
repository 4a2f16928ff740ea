//go:build linux

// init_linux_test.go: end-to-end tests of a job's isolation (issue 3, SPEC
// §5-§6). Each runs real jobs through a real in-process server and real job
// inits, as root, asserts what the job observes from inside, and checks the
// host afterwards: nothing of the job (process, mount, interface, file) may
// be left once the job is reported ended.
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ---- the probe: this test binary, run as a job's command ----

// probeArg makes this test binary a probe of the job it runs in: it reports
// what it sees as one JSON probeReport on stdout. installProbe puts a copy
// where a job can run it.
const probeArg = "-internal-test-probe"

func init() {
	if len(os.Args) > 2 && os.Args[1] == probeArg {
		syscall.Exit(runProbe(os.Args[2], os.Args[3:])) // not os.Exit: see TestMain
	}
}

// probeReport is what a probe saw from inside a job.
type probeReport struct {
	EUID       int               `json:"euid"`
	Status     string            `json:"status"`     // its /proc/self/status
	Interfaces []string          `json:"interfaces"` // "NAME up|down", from netlink: the job's own network namespace
	Loopback   string            `json:"loopback"`   // "ok", or why a TCP echo to itself over 127.0.0.1 failed
	Dials      map[string]string `json:"dials"`      // address → "connected" or the error
}

// runProbe is the probe's main. Modes: "ids" (who am I, with what
// privileges) and "net ADDR..." (interfaces, loopback, and a dial of each
// ADDR: host:port over TCP, or @name for an abstract unix socket).
func runProbe(mode string, args []string) int {
	var r probeReport
	switch mode {
	case "ids":
		r.EUID = os.Geteuid()
		data, err := os.ReadFile("/proc/self/status")
		if err != nil {
			fmt.Fprintln(os.Stderr, "probe:", err)
			return 1
		}
		r.Status = string(data)
	case "net":
		ifaces, err := net.Interfaces()
		if err != nil {
			fmt.Fprintln(os.Stderr, "probe: list interfaces:", err)
			return 1
		}
		for _, ifc := range ifaces {
			state := "down"
			if ifc.Flags&net.FlagUp != 0 {
				state = "up"
			}
			r.Interfaces = append(r.Interfaces, ifc.Name+" "+state)
		}
		r.Loopback = loopbackEcho()
		r.Dials = map[string]string{}
		for _, addr := range args {
			network := "tcp"
			if strings.HasPrefix(addr, "@") {
				network = "unix"
			}
			c, err := net.DialTimeout(network, addr, 2*time.Second)
			if err != nil {
				r.Dials[addr] = err.Error()
				continue
			}
			c.Close()
			r.Dials[addr] = "connected"
		}
	default:
		fmt.Fprintf(os.Stderr, "probe: unknown mode %q\n", mode)
		return 2
	}
	if err := json.NewEncoder(os.Stdout).Encode(r); err != nil {
		return 1
	}
	return 0
}

// loopbackEcho sends a message to itself over TCP on 127.0.0.1 and says
// whether it came back.
func loopbackEcho() string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err.Error()
	}
	defer ln.Close()
	go func() { // ends with the accepted connection, or when ln closes
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.Copy(c, c)
	}()
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
	if err != nil {
		return err.Error()
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		return err.Error()
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "ping" {
		return fmt.Sprintf("echo came back as %q: %v", got, err)
	}
	return "ok"
}

// installProbe copies this test binary where a job can run it: a job sees
// the host's files read-only but has its own /tmp, so the binary go test
// left under /tmp is out of its reach. With setuid, the copy is setuid root.
func installProbe(t *testing.T, setuid bool) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("/var/tmp", "worker-iso-probe-")
	if err != nil {
		t.Fatalf("make a probe directory a job can see: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil { // the job user must get in
		t.Fatal(err)
	}
	src, err := os.Open(exe)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	probe := filepath.Join(dir, "probe")
	dst, err := os.OpenFile(probe, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.Copy(dst, src)
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("copy %s to %s: %v", exe, probe, err)
	}
	mode := os.FileMode(0o755)
	if setuid {
		mode |= os.ModeSetuid
	}
	if err := os.Chmod(probe, mode); err != nil {
		t.Fatal(err)
	}
	return probe
}

// runProbeJob runs the probe as a job and returns its report.
func runProbeJob(t *testing.T, ts *testServer, probe string, args ...string) (probeReport, Job) {
	t.Helper()
	j := ts.run("admin", runRequest{Command: probe, Args: append([]string{probeArg}, args...)})
	out, j := ts.wait("admin", j.ID)
	requireEnded(t, j, out, statusCompleted, reasonExited)
	var r probeReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("probe output %q: %v", out, err)
	}
	return r, j
}

// ---- the host's side ----

// newMarker is a string unique to one test, put into a job's command lines
// so that its processes can be found on the host.
func newMarker(t *testing.T) string {
	t.Helper()
	var b [6]byte
	rand.Read(b[:])
	return "worker-iso-" + hex.EncodeToString(b[:])
}

// hostProc is a process as the host sees it, from /proc/PID.
type hostProc struct {
	pid     int
	cmdline []string
	state   string // R, S, Z...
	ppid    int
	session int
}

// hostProcs lists the host's processes; keep filters them.
func hostProcs(t testing.TB, keep func(hostProc) bool) []hostProc {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []hostProc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		p := hostProc{pid: pid}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue // ended meanwhile
		}
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 {
			continue
		}
		fields := strings.Fields(string(stat[i+1:]))
		if len(fields) < 4 {
			continue
		}
		p.state = fields[0]
		p.ppid, _ = strconv.Atoi(fields[1])
		p.session, _ = strconv.Atoi(fields[3])
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)) // empty for a zombie
		p.cmdline = strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		if keep(p) {
			out = append(out, p)
		}
	}
	return out
}

func (p hostProc) String() string {
	return fmt.Sprintf("%d (%s) %q", p.pid, p.state, p.cmdline)
}

// marked keeps the processes whose command line carries marker anywhere.
func marked(marker string) func(hostProc) bool {
	return func(p hostProc) bool { return strings.Contains(strings.Join(p.cmdline, " "), marker) }
}

// markedAsArgv0 keeps the processes that were exec'd as marker (`exec -a`).
func markedAsArgv0(marker string) func(hostProc) bool {
	return func(p hostProc) bool { return strings.HasPrefix(p.cmdline[0], marker) }
}

// requireNoneLeft fails if any process on the host carries marker: called
// the moment a job is reported ended, it checks that nothing of it is left.
func requireNoneLeft(t *testing.T, marker, when string) {
	t.Helper()
	if left := hostProcs(t, marked(marker)); len(left) > 0 {
		t.Fatalf("%s, processes of the job are left on the host: %v", when, left)
	}
}

// waitMarkedProcs waits until at least n host processes were exec'd as
// marker, and returns them. A job's processes appear asynchronously.
func waitMarkedProcs(t *testing.T, marker string, n int) []hostProc {
	t.Helper()
	var procs []hostProc
	eventually(t, 20*time.Second, func() error {
		procs = hostProcs(t, markedAsArgv0(marker))
		if len(procs) < n {
			return fmt.Errorf("%d processes exec'd as %s on the host, want at least %d: %v", len(procs), marker, n, procs)
		}
		return nil
	})
	return procs
}

// childrenOfThisProcess are the processes this test process has not reaped:
// job inits still running, or zombies.
func childrenOfThisProcess(t testing.TB) []hostProc {
	me := os.Getpid()
	return hostProcs(t, func(p hostProc) bool { return p.ppid == me })
}

// hostView is what jobs must leave as they found it on the host.
type hostView struct {
	mounts     []string // this process's mountinfo, which is the host's mount namespace
	interfaces []string // /sys/class/net of the host's network namespace
	hostname   string
}

func observeHost(t testing.TB) hostView {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var v hostView
	v.mounts = strings.Split(strings.TrimSpace(string(data)), "\n")
	entries, err := os.ReadDir("/sys/class/net")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		v.interfaces = append(v.interfaces, e.Name())
	}
	if v.hostname, err = os.Hostname(); err != nil {
		t.Fatal(err)
	}
	return v
}

// diff says how the host changed from v to now; "" if it did not.
func (v hostView) diff(now hostView) string {
	var b strings.Builder
	for _, m := range now.mounts {
		if !slices.Contains(v.mounts, m) {
			fmt.Fprintf(&b, "new mount: %s\n", m)
		}
	}
	for _, m := range v.mounts {
		if !slices.Contains(now.mounts, m) {
			fmt.Fprintf(&b, "mount gone: %s\n", m)
		}
	}
	if !slices.Equal(v.interfaces, now.interfaces) {
		fmt.Fprintf(&b, "interfaces were %v, are %v\n", v.interfaces, now.interfaces)
	}
	if v.hostname != now.hostname {
		fmt.Fprintf(&b, "hostname was %q, is %q\n", v.hostname, now.hostname)
	}
	return b.String()
}

func requireHostUnchanged(t *testing.T, before hostView) {
	t.Helper()
	if d := before.diff(observeHost(t)); d != "" {
		t.Fatalf("jobs changed the host:\n%s", d)
	}
}

// jobCgroupsLeft lists the job cgroups still in the server's cgroup tree.
func jobCgroupsLeft(ts *testServer) []string {
	if ts.srv.cgroups == nil {
		return nil
	}
	var left []string
	for _, h := range ts.srv.cgroups.hier {
		for _, name := range subdirs(h.jobs) {
			left = append(left, filepath.Join(h.jobs, name))
		}
	}
	return left
}

// ---- jobs ----

func requireEnded(t *testing.T, j Job, out, status, reason string) {
	t.Helper()
	if j.Status != status || j.Reason != reason {
		t.Fatalf("job %s ended %s/%s (exit %d, signal %q, error %q), want %s/%s; output:\n%s",
			j.ID, j.Status, j.Reason, derefInt(j.ExitCode), j.Signal, j.Error, status, reason, out)
	}
}

// stopJobViaAPI stops a job as admin and returns it as the stop returned it:
// ended.
func stopJobViaAPI(t *testing.T, ts *testServer, id string) Job {
	t.Helper()
	code, body := ts.do("admin", "POST", "/v1/jobs/"+id+"/stop", nil)
	if code != http.StatusOK {
		t.Fatalf("stop %s: %d %s", id, code, body)
	}
	var j Job
	if err := json.Unmarshal(body, &j); err != nil {
		t.Fatal(err)
	}
	return j
}

// quietLogs keeps the server's per-job log lines out of tests and
// benchmarks that run hundreds of jobs; warnings still show.
func quietLogs(tb testing.TB) {
	old := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	tb.Cleanup(func() { slog.SetDefault(old) })
}

// ---- 1. PID namespace ----

func TestJobSeesOnlyItsOwnProcesses(t *testing.T) {
	ts := newTestServer(t)
	out, j := ts.runWait("ps", "-e", "-o", "pid=,args=")
	requireEnded(t, j, out, statusCompleted, reasonExited)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	// The job's init as PID 1, and ps itself: nothing of the host.
	if len(lines) != 2 {
		t.Fatalf("ps -e in the job shows %d processes, want its init and ps:\n%s", len(lines), out)
	}
	if f := strings.Fields(lines[0]); f[0] != "1" || !slices.Contains(f, initArg) {
		t.Errorf("PID 1 in the job is %q, want the job's init", lines[0])
	}
	if f := strings.Fields(lines[1]); f[0] == "1" || !strings.HasPrefix(strings.Join(f[1:], " "), "ps -e") {
		t.Errorf("second process in the job is %q, want ps", lines[1])
	}
}

func TestJobInitReapsOrphans(t *testing.T) {
	ts := newTestServer(t)
	// The inner sh exits at once, orphaning its sleep to PID 1, the job's
	// init. Unreaped, the sleep would stay a zombie in /proc forever.
	script := `p=$(sh -c 'sleep 0.2 >/dev/null 2>&1 & echo $!')
i=0
while [ -e /proc/$p ]; do
	i=$((i+1))
	if [ $i -gt 1000 ]; then echo "orphan $p not reaped: $(grep State /proc/$p/status)"; exit 1; fi
	sleep 0.01
done
echo reaped`
	out, j := ts.runWait("sh", "-c", script)
	requireEnded(t, j, out, statusCompleted, reasonExited)
	if out != "reaped\n" {
		t.Fatalf("output %q, want %q", out, "reaped\n")
	}
}

func TestJobEndTakesDaemonsOrphansAndZombiesWithIt(t *testing.T) {
	ts := newTestServer(t)
	marker := newMarker(t)
	// A double-forked daemon in its own session, a child that ignores
	// SIGTERM, and a zombie under a parent that never waits; then the
	// command ends, leaving them all behind.
	script := fmt.Sprintf(`setsid -f bash -c 'echo $$ >/tmp/daemon; exec -a %[1]s sleep 1000' </dev/null >/dev/null 2>&1
(trap '' TERM; exec -a %[1]s sleep 1000) </dev/null >/dev/null 2>&1 &
until [ -s /tmp/daemon ]; do sleep 0.01; done
echo started
true &
exec sleep 0.1`, marker)
	j := ts.run("admin", runRequest{Command: "bash", Args: []string{"-c", script}})
	rec, _ := ts.srv.store.get(j.ID)
	out, j := ts.wait("admin", j.ID)
	requireEnded(t, j, out, statusCompleted, reasonExited)
	if out != "started\n" {
		t.Fatalf("output %q, want %q", out, "started\n")
	}
	requireNoneLeft(t, marker, "when the job is reported ended")
	if rec.InitPID == 0 || procStartTime(rec.InitPID) == rec.InitStart {
		t.Fatalf("the job's init (PID %d) is still there after the job ended", rec.InitPID)
	}
}

// ---- 7. stop and timeout ----

func TestStopAndTimeoutReachEveryProcessOfTheJob(t *testing.T) {
	ts := newTestServer(t, func(c *serverConfig) { c.grace = 300 * time.Millisecond })
	for _, c := range []struct {
		name    string
		timeout string
		status  string
		reason  string
	}{
		{"stop", "", statusStopped, reasonStopped},
		{"timeout", "2s", statusFailed, reasonTimeout},
	} {
		t.Run(c.name, func(t *testing.T) {
			marker := newMarker(t)
			// A daemon in its own session, a child ignoring SIGTERM, and a
			// command ignoring it too: only the SIGKILL after the grace
			// period ends the job.
			script := fmt.Sprintf(`setsid -f bash -c 'exec -a %[1]s-daemon sleep 1000' </dev/null >/dev/null 2>&1
(trap '' TERM; exec -a %[1]s-ignores-term sleep 1000) </dev/null >/dev/null 2>&1 &
trap '' TERM
exec -a %[1]s-main sleep 1000`, marker)
			j := ts.run("admin", runRequest{Command: "bash", Args: []string{"-c", script}, Timeout: c.timeout})
			procs := waitMarkedProcs(t, marker, 3)
			sessions := map[int]bool{}
			for _, p := range procs {
				sessions[p.session] = true
				if strings.HasSuffix(p.cmdline[0], "-ignores-term") && !ignoresSignal(t, p.pid, unix.SIGTERM) {
					t.Fatalf("%v does not ignore SIGTERM: the test proves nothing", p)
				}
			}
			if len(sessions) < 2 {
				t.Fatalf("the daemon did not get its own session: %v", procs)
			}
			if c.timeout == "" {
				j = stopJobViaAPI(t, ts, j.ID)
				requireNoneLeft(t, marker, "when the stop returned")
			} else {
				_, j = ts.wait("admin", j.ID)
				requireNoneLeft(t, marker, "when the timed-out job is reported ended")
			}
			requireEnded(t, j, "", c.status, c.reason)
			if j.Signal != "SIGKILL" {
				t.Errorf("command ended by %q, want SIGKILL: it ignored SIGTERM", j.Signal)
			}
		})
	}
}

// ignoresSignal says whether a host process ignores sig (SigIgn in its status).
func ignoresSignal(t *testing.T, pid int, sig syscall.Signal) bool {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "SigIgn:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return mask&(1<<(sig-1)) != 0
		}
	}
	t.Fatalf("no SigIgn in /proc/%d/status", pid)
	return false
}

func TestStopEndsAForkBombInTheJob(t *testing.T) {
	ts := newTestServer(t, func(c *serverConfig) { c.grace = 300 * time.Millisecond })
	marker := newMarker(t)
	// A fork bomb that ignores SIGTERM, bounded by hand (no cgroup pids
	// limit here): every process forks two, 7 levels deep, 255 processes.
	script := fmt.Sprintf(`trap '' TERM
bomb() { [ $1 -gt 0 ] || exec -a %s sleep 1000; bomb $(($1-1)) & bomb $(($1-1)) & wait; }
bomb 7`, marker)
	j := ts.run("admin", runRequest{Command: "bash", Args: []string{"-c", script}})
	waitMarkedProcs(t, marker, 20) // stopped while it is still forking, most likely
	j = stopJobViaAPI(t, ts, j.ID)
	requireNoneLeft(t, marker, "when the stop returned")
	requireEnded(t, j, "", statusStopped, reasonStopped)
}

// ---- 2. mount namespace ----

func TestJobSeesHostFilesystemReadOnly(t *testing.T) {
	ts := newTestServer(t)
	marker := newMarker(t)
	paths := []string{"/", "/etc", "/usr", "/var", "/var/tmp", "/root"} // /var/tmp is world-writable on the host
	var script strings.Builder
	for _, p := range paths {
		fmt.Fprintf(&script, "echo %s: $(touch %s 2>&1)\n", p, filepath.Join(p, marker))
	}
	out, j := ts.runWait("sh", "-c", script.String())
	requireEnded(t, j, out, statusCompleted, reasonExited)
	for _, p := range paths {
		t.Run(p, func(t *testing.T) {
			line := ""
			for _, l := range strings.Split(out, "\n") {
				if strings.HasPrefix(l, p+": ") {
					line = l
				}
			}
			want := []string{"Read-only file system"}
			if p == "/root" { // 0700: the job user cannot even look in
				want = append(want, "Permission denied")
			}
			if !slices.ContainsFunc(want, func(w string) bool { return strings.Contains(line, w) }) {
				t.Errorf("writing to %s in the job: %q, want one of %q", p, line, want)
			}
			if _, err := os.Lstat(filepath.Join(p, marker)); err == nil {
				os.Remove(filepath.Join(p, marker))
				t.Errorf("the job created %s on the host", filepath.Join(p, marker))
			}
		})
	}

	// Whatever the job user's rights: every mount of the job but its own
	// scratch space, /proc and the harmless devices is read-only.
	writable := []string{"/proc", "/tmp", jobWorkDir, "/dev/shm", "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"}
	out, j = ts.runWait("cat", "/proc/self/mountinfo")
	requireEnded(t, j, out, statusCompleted, reasonExited)
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		mountPoint, options := unescapeMountField(f[4]), strings.Split(f[5], ",")
		if !slices.Contains(options, "ro") && !slices.Contains(writable, mountPoint) {
			t.Errorf("%s is writable in the job: %s", mountPoint, line)
		}
		if !slices.Contains(options, "nosuid") && !strings.HasPrefix(mountPoint, "/dev/") {
			t.Errorf("%s honours setuid bits in the job: %s", mountPoint, line)
		}
	}
}

func TestJobScratchSpaceIsPrivateTmpfsGoneWithTheJob(t *testing.T) {
	ts := newTestServer(t)
	before := observeHost(t)
	marker := newMarker(t)
	script := fmt.Sprintf(`pwd; echo "$HOME"; stat -f -c %%T /tmp "$HOME"
echo data >/tmp/%[1]s && echo data >"$HOME/%[1]s" && cat /tmp/%[1]s "$HOME/%[1]s"`, marker)
	out, j := ts.runWait("sh", "-c", script)
	requireEnded(t, j, out, statusCompleted, reasonExited)
	if want := "/job\n/job\ntmpfs\ntmpfs\ndata\ndata\n"; out != want {
		t.Fatalf("job output %q, want %q (cwd and HOME /job; /tmp and /job writable tmpfs)", out, want)
	}
	for _, p := range []string{filepath.Join("/tmp", marker), filepath.Join(jobWorkDir, marker)} {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("the job's %s is visible on the host", p)
		}
	}
	requireHostUnchanged(t, before)

	out, j = ts.runWait("find", "/tmp", jobWorkDir, "-mindepth", "1")
	requireEnded(t, j, out, statusCompleted, reasonExited)
	if out != "" {
		t.Fatalf("the next job finds files in its /tmp and %s:\n%s", jobWorkDir, out)
	}
}

// ---- 3. network namespace ----

func TestJobNetworkIsOnlyItsOwnLoopback(t *testing.T) {
	ts := newTestServer(t)
	probe := installProbe(t, false)
	marker := newMarker(t)

	// On the host: a TCP listener on every address, and an abstract unix
	// socket (abstract names are per network namespace).
	tcpLn, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tcpLn.Close() })
	unixLn, err := net.Listen("unix", "@"+marker)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unixLn.Close() })
	accepted := make(chan string, 100)
	for _, ln := range []net.Listener{tcpLn, unixLn} {
		go func() { // ends when the listener is closed
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				accepted <- c.RemoteAddr().String()
				c.Close()
			}
		}()
	}
	port := strconv.Itoa(tcpLn.Addr().(*net.TCPAddr).Port)
	targets := []string{ts.http.Listener.Addr().String(), "@" + marker}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if ip := a.(*net.IPNet).IP; !ip.IsLinkLocalUnicast() {
			targets = append(targets, net.JoinHostPort(ip.String(), port))
		}
	}
	// The premise: from the host, every target answers.
	for _, addr := range targets {
		network := "tcp"
		if strings.HasPrefix(addr, "@") {
			network = "unix"
		}
		c, err := net.DialTimeout(network, addr, 2*time.Second)
		if err != nil {
			t.Fatalf("control: the host cannot reach %s: %v", addr, err)
		}
		c.Close()
	}
	for range targets[1:] { // all but the server, whose connections we do not see
		<-accepted
	}

	r, _ := runProbeJob(t, ts, probe, append([]string{"net"}, targets...)...)
	if !slices.Equal(r.Interfaces, []string{"lo up"}) {
		t.Errorf("interfaces in the job: %v, want only lo, up", r.Interfaces)
	}
	if r.Loopback != "ok" {
		t.Errorf("TCP over 127.0.0.1 inside the job: %s", r.Loopback)
	}
	for _, addr := range targets {
		got, ok := r.Dials[addr]
		if !ok || got == "connected" || !(strings.Contains(got, "refused") || strings.Contains(got, "unreachable")) {
			t.Errorf("dial %s from the job: %q, want refused (its own loopback) or unreachable", addr, got)
		}
	}
	select {
	case from := <-accepted:
		t.Errorf("a host listener accepted a connection from the job (%s)", from)
	default:
	}

	out, j := ts.runWait("cat", "/proc/net/dev")
	requireEnded(t, j, out, statusCompleted, reasonExited)
	var names []string
	for _, line := range strings.Split(out, "\n") {
		if name, _, ok := strings.Cut(line, ":"); ok && !strings.Contains(name, "|") {
			names = append(names, strings.TrimSpace(name))
		}
	}
	if !slices.Equal(names, []string{"lo"}) {
		t.Errorf("/proc/net/dev in the job lists %v, want only lo", names)
	}
	// Its /sys is its own too: the host's interfaces are not listed there.
	out, j = ts.runWait("ls", "/sys/class/net")
	requireEnded(t, j, out, statusCompleted, reasonExited)
	if out != "lo\n" {
		t.Errorf("/sys/class/net in the job lists %q, want only lo", out)
	}
}

// ---- 4. UTS, IPC and cgroup namespaces ----

func TestJobHasItsOwnNamespacesAndHostname(t *testing.T) {
	ts := newTestServer(t)
	before := observeHost(t)
	// A SysV shared memory segment on the host, which the job's IPC namespace must not show.
	shmID, err := unix.SysvShmGet(unix.IPC_PRIVATE, 4096, unix.IPC_CREAT|0o666)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.SysvShmCtl(shmID, unix.IPC_RMID, nil) })

	namespaces := []string{"pid", "mnt", "net", "ipc", "uts", "cgroup"}
	script := `cat /proc/sys/kernel/hostname; for n in ` + strings.Join(namespaces, " ") + `; do echo "$n $(readlink /proc/self/ns/$n)"; done; ipcs -m`
	out, j := ts.runWait("sh", "-c", script)
	requireEnded(t, j, out, statusCompleted, reasonExited)
	lines := strings.Split(out, "\n")
	if lines[0] != j.ID {
		t.Errorf("hostname in the job is %q, want the job ID %q", lines[0], j.ID)
	}
	inside := map[string]string{}
	for _, l := range lines[1:] {
		if n, link, ok := strings.Cut(l, " "); ok && slices.Contains(namespaces, n) {
			inside[n] = link
		}
		if strings.HasPrefix(l, "0x") {
			t.Errorf("ipcs -m in the job lists a host segment: %s", l)
		}
	}
	for _, n := range namespaces {
		t.Run(n, func(t *testing.T) {
			host, err := os.Readlink("/proc/self/ns/" + n)
			if err != nil {
				t.Fatal(err)
			}
			if inside[n] == "" || inside[n] == host {
				t.Errorf("%s namespace in the job is %q, the host's is %q: want its own", n, inside[n], host)
			}
		})
	}
	requireHostUnchanged(t, before)
}

// ---- 5. privileges ----

func TestJobRunsUnprivileged(t *testing.T) {
	ts := newTestServer(t)
	if ts.srv.uid != 65534 || ts.srv.gid != 65534 {
		t.Fatalf("-job-user nobody resolved to %d:%d, want 65534:65534", ts.srv.uid, ts.srv.gid)
	}
	out, j := ts.runWait("cat", "/proc/self/status")
	requireEnded(t, j, out, statusCompleted, reasonExited)
	status := parseStatus(out)
	for _, c := range []struct {
		field string
		want  []string
	}{
		{"Uid", []string{"65534\t65534\t65534\t65534"}},
		{"Gid", []string{"65534\t65534\t65534\t65534"}},
		{"Groups", []string{"", "65534"}},
		{"CapInh", []string{"0000000000000000"}},
		{"CapPrm", []string{"0000000000000000"}},
		{"CapEff", []string{"0000000000000000"}},
		{"CapBnd", []string{"0000000000000000"}},
		{"CapAmb", []string{"0000000000000000"}},
		{"NoNewPrivs", []string{"1"}},
	} {
		if got, ok := status[c.field]; !ok || !slices.Contains(c.want, got) {
			t.Errorf("%s in the job: %q, want one of %q", c.field, got, c.want)
		}
	}
}

// parseStatus reads /proc/PID/status text into field → value.
func parseStatus(s string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(s, "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

func TestSetuidBinaryGainsNothingInTheJob(t *testing.T) {
	ts := newTestServer(t)
	probe := installProbe(t, true)

	// The control: on the host, run by the job user, the setuid-root probe
	// does become root.
	var out bytes.Buffer
	cmd := exec.Command(probe, probeArg, "ids")
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(ts.srv.uid), Gid: uint32(ts.srv.gid), Groups: []uint32{}}}
	if err := cmd.Run(); err != nil {
		t.Fatalf("control run of the setuid probe on the host: %v\n%s", err, out.String())
	}
	var control probeReport
	if err := json.Unmarshal(out.Bytes(), &control); err != nil {
		t.Fatalf("control output %q: %v", out.String(), err)
	}
	if control.EUID != 0 {
		t.Logf("setuid bits are ignored on this host's %s already (euid %d): only the job's side is checked", filepath.Dir(probe), control.EUID)
	}

	r, _ := runProbeJob(t, ts, probe, "ids")
	status := parseStatus(r.Status)
	if r.EUID != ts.srv.uid || status["CapEff"] != "0000000000000000" || status["CapPrm"] != "0000000000000000" || status["NoNewPrivs"] != "1" {
		t.Fatalf("a setuid-root binary in the job runs with euid %d, CapPrm %s, CapEff %s, NoNewPrivs %s; want euid %d, no capabilities, NoNewPrivs 1",
			r.EUID, status["CapPrm"], status["CapEff"], status["NoNewPrivs"], ts.srv.uid)
	}
}

// ---- 6. environment ----

func TestJobEnvironmentIsOnlyBasicsAndRequestEnv(t *testing.T) {
	ts := newTestServer(t)
	secret := newMarker(t)
	t.Setenv("WORKER_ISO_SECRET", secret) // the server's environment, from now on

	j := ts.run("admin", runRequest{Command: "env", Env: map[string]string{"GREETING": "hello world"}})
	out, j := ts.wait("admin", j.ID)
	requireEnded(t, j, out, statusCompleted, reasonExited)
	got := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		k, v, _ := strings.Cut(line, "=")
		got[k] = v
	}
	want := map[string]string{"PATH": jobPath, "HOME": jobWorkDir, "HOSTNAME": j.ID, "GREETING": "hello world"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("environment of the job:\n%s\nwant exactly %v", out, want)
	}
	if strings.Contains(out, secret) {
		t.Errorf("the server's environment reached the job:\n%s", out)
	}

	// Nor does the job's init, which stays root beside the job, carry it.
	j = ts.run("admin", runRequest{Command: "sleep", Args: []string{"1000"}})
	rec, _ := ts.srv.store.get(j.ID)
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", rec.InitPID))
	if err != nil {
		t.Fatal(err)
	}
	// Only its Go runtime settings, none of the server's.
	want0 := strings.Join(initRuntimeEnv, "\x00") + "\x00"
	if string(environ) != want0 {
		t.Errorf("the job's init has the environment %q, want only %q", bytes.ReplaceAll(environ, []byte{0}, []byte{' '}), initRuntimeEnv)
	}
	stopJobViaAPI(t, ts, j.ID)
}

// ---- descriptors: no way out of the job's root ----

func TestJobInheritsNoDescriptorsFromTheServer(t *testing.T) {
	ts := newTestServer(t)
	marker := newMarker(t)
	// A host directory the job user could write to, open in the server
	// without O_CLOEXEC, as a careless parent of the server may leave one.
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })

	script := fmt.Sprintf(`ls -l /proc/self/fd; echo escaped >/proc/$$/fd/%d/%s`, fd, marker)
	out, _ := ts.runWait("sh", "-c", script)
	for _, line := range strings.Split(out, "\n") {
		num, target, ok := strings.Cut(line, " -> ")
		if !ok {
			continue
		}
		f := strings.Fields(num)
		n := f[len(f)-1]
		// stdin, the output pipe twice, and the directory ls is reading.
		if n != "0" && n != "1" && n != "2" && !(strings.HasPrefix(target, "/proc/") && strings.HasSuffix(target, "/fd")) {
			t.Errorf("the job's command has descriptor %s -> %s from outside the job", n, target)
		}
	}
	if _, err := os.Lstat(filepath.Join(dir, marker)); err == nil {
		t.Fatalf("the job wrote %s on the host through an inherited descriptor:\n%s", filepath.Join(dir, marker), out)
	}
}

// ---- 9. start failures ----

func TestStartFailuresAreReportedNotHung(t *testing.T) {
	ts := newTestServer(t)
	for _, c := range []struct {
		name   string
		broken func(*serverConfig) // a server whose jobs cannot be set up
		req    runRequest
		code   int
		error  string
	}{
		{name: "command not found", req: runRequest{Command: "no-such-command-worker-iso"}, code: exitNotFound, error: "command not found"},
		{name: "command is a directory", req: runRequest{Command: "/etc"}, code: exitNotExecutable, error: "cannot execute /etc"},
		{name: "command not executable", req: runRequest{Command: "/etc/passwd"}, code: exitNotExecutable, error: "cannot execute /etc/passwd"},
		{name: "exec refuses the arguments", req: runRequest{Command: "true", Args: []string{strings.Repeat("a", 200<<10)}}, code: exitSetupFailed, error: "argument list too long"},
		// A negative scratch size is one tmpfs refuses: the init's setup fails for real.
		{name: "isolation setup fails", broken: func(c *serverConfig) { c.caps.Memory = -1 }, req: runRequest{Command: "true"}, code: exitSetupFailed, error: "mount tmpfs on /tmp (mode=1777,size=-1)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			ts := ts
			if c.broken != nil {
				ts = newTestServer(t, c.broken)
			}
			before := observeHost(t)
			j := ts.run("admin", c.req) // returns once the start has failed: no hang
			if j.Status != statusFailed || j.Reason != reasonStartFailed || derefInt(j.ExitCode) != c.code || !strings.Contains(j.Error, c.error) {
				t.Fatalf("got %s/%s exit %d error %q, want %s/%s exit %d error mentioning %q",
					j.Status, j.Reason, derefInt(j.ExitCode), j.Error, statusFailed, reasonStartFailed, c.code, c.error)
			}
			if _, after := ts.wait("admin", j.ID); after.Status != j.Status || after.Error != j.Error {
				t.Fatalf("the record changed after the start failed: %+v, then %+v", j, after)
			}
			if kids := childrenOfThisProcess(t); len(kids) > 0 {
				t.Fatalf("job inits left after a failed start: %v", kids)
			}
			requireHostUnchanged(t, before)
		})
	}
}

// ---- 8. nothing leaks ----

func TestNothingOfAJobLeaksToTheHost(t *testing.T) {
	ts := newTestServer(t, func(c *serverConfig) { c.grace = 300 * time.Millisecond })
	before := observeHost(t)
	marker := newMarker(t)
	fill := fmt.Sprintf(`exec -a %s sh -c 'head -c 8M /dev/zero >/tmp/fill && head -c 8M /dev/zero >$HOME/fill && echo filled'`, marker)
	for _, c := range []struct {
		name   string
		req    runRequest
		stop   bool
		status string
		reason string
	}{
		{"completed", runRequest{Command: "bash", Args: []string{"-c", fill}}, false, statusCompleted, reasonExited},
		{"failed", runRequest{Command: "bash", Args: []string{"-c", "exec -a " + marker + " sh -c 'exit 3'"}}, false, statusFailed, reasonExited},
		{"stopped", runRequest{Command: "bash", Args: []string{"-c", "exec -a " + marker + " sleep 1000"}}, true, statusStopped, reasonStopped},
		{"timed out", runRequest{Command: "bash", Args: []string{"-c", "trap '' TERM; exec -a " + marker + " sleep 1000"}, Timeout: "200ms"}, false, statusFailed, reasonTimeout},
		{"start failed", runRequest{Command: "/etc/passwd", Args: []string{marker}}, false, statusFailed, reasonStartFailed},
	} {
		t.Run(c.name, func(t *testing.T) {
			j := ts.run("admin", c.req)
			out := ""
			if c.stop {
				waitMarkedProcs(t, marker, 1)
				if ts.srv.cgroups != nil && len(jobCgroupsLeft(ts)) == 0 {
					t.Fatal("a running job has no cgroup where jobCgroupsLeft looks: the check for leaks would prove nothing")
				}
				j = stopJobViaAPI(t, ts, j.ID)
			} else {
				out, j = ts.wait("admin", j.ID)
			}
			requireEnded(t, j, out, c.status, c.reason)
			requireNoneLeft(t, marker, "when the job is reported ended")
			if kids := childrenOfThisProcess(t); len(kids) > 0 {
				t.Fatalf("job inits left when the job is reported ended: %v", kids)
			}
			if left := jobCgroupsLeft(ts); len(left) > 0 {
				t.Fatalf("job cgroups left when the job is reported ended: %v", left)
			}
			requireHostUnchanged(t, before)
		})
	}
}

// TestNoLeaksAfter200Jobs runs short isolated jobs back to back, then checks
// that the server holds no more mounts, processes, cgroups, file descriptors
// or goroutines than before them.
func TestNoLeaksAfter200Jobs(t *testing.T) {
	quietLogs(t)
	ts := newTestServer(t)
	for range 3 { // the HTTP/2 connection and everything else that lasts
		ts.runWait("true")
	}
	before := observeHost(t)
	fds := openFDs(t)
	goroutines := runtime.NumGoroutine()

	for i := range 200 {
		command, args, want := "true", []string(nil), ""
		if i%2 == 1 {
			command, args, want = "echo", []string{strconv.Itoa(i)}, strconv.Itoa(i)+"\n"
		}
		j := ts.run("admin", runRequest{Command: command, Args: args})
		out, j := ts.wait("admin", j.ID)
		requireEnded(t, j, out, statusCompleted, reasonExited)
		if out != want {
			t.Fatalf("job %d (%s %v): output %q, want %q", i, command, args, out, want)
		}
	}

	requireHostUnchanged(t, before)
	if kids := childrenOfThisProcess(t); len(kids) > 0 {
		t.Fatalf("processes left under the server (job inits or zombies): %v", kids)
	}
	if left := jobCgroupsLeft(ts); len(left) > 0 {
		t.Fatalf("job cgroups left after 200 jobs: %v", left)
	}
	eventually(t, 5*time.Second, func() error {
		if n := openFDs(t); n > fds {
			return fmt.Errorf("%d open file descriptors after 200 jobs, %d before", n, fds)
		}
		return nil
	})
	eventually(t, 5*time.Second, func() error {
		if n := runtime.NumGoroutine(); n > goroutines+2 {
			var dump strings.Builder
			pprof.Lookup("goroutine").WriteTo(&dump, 1)
			return fmt.Errorf("%d goroutines after 200 jobs, %d before:\n%s", n, goroutines, dump.String())
		}
		return nil
	})
}

// openFDs counts this process's open file descriptors (the count includes
// the one used to count, every time alike).
func openFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}
