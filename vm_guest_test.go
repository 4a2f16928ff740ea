//go:build linux

// vm_guest_test.go: the checks TestCgroupV2VM runs inside the cgroup v2 VM,
// and the payload processes they start. Every TestGuest* test here runs in
// the VM as root, in the root cgroup of a pure v2 hierarchy, with /dev/nvme0n1
// as a raw 64 MiB disk; elsewhere it skips (vmGuestOnly). A check cleans up
// what it creates: later checks (and the server's own) start from a clean
// root cgroup.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const cgroupRoot = "/sys/fs/cgroup"

// testHelpers are the payload modes of the test binary, run as
// `WORKER_TEST_HELPER=name <test binary> args...` (see TestMain).
var testHelpers = map[string]func(args []string) error{
	"alloc":      helperAlloc,
	"directread": helperDirectRead,
	"nsinfo":     helperNSInfo,
	"pivot":      helperPivot,
}

func TestGuestCgroupIsUnifiedWithControllers(t *testing.T) {
	vmGuestOnly(t)
	var st unix.Statfs_t
	if err := unix.Statfs(cgroupRoot, &st); err != nil {
		t.Fatalf("statfs %s: %v", cgroupRoot, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Fatalf("%s has filesystem magic %#x, want cgroup2 %#x", cgroupRoot, st.Type, unix.CGROUP2_SUPER_MAGIC)
	}
	b, err := os.ReadFile(filepath.Join(cgroupRoot, "cgroup.controllers"))
	if err != nil {
		t.Fatal(err)
	}
	have := strings.Fields(string(b))
	for _, c := range []string{"cpu", "io", "memory", "pids"} {
		if !slices.Contains(have, c) {
			t.Errorf("cgroup.controllers = %q, missing %s", have, c)
		}
	}
}

func TestGuestMemoryMaxOOMKillsHog(t *testing.T) {
	vmGuestOnly(t)
	const limit = 32 << 20
	cg, fd := guestCgroup(t, "memory")
	guestWriteCgroupFile(t, cg, "memory.max", strconv.Itoa(limit))
	guestWriteCgroupFile(t, cg, "memory.swap.max", "0")

	cmd := helperCommand(t, "alloc", "100")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	out, err := cmd.CombinedOutput()
	events := readCgroupKeyed(t, cg, "memory.events")
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		max, _ := os.ReadFile(filepath.Join(cg, "memory.max"))
		t.Fatalf("a hog touching 100 MiB under a %d-byte limit (memory.max reads %s) was not OOM-killed: %v (output %q); memory.events oom_kill=%d",
			limit, bytes.TrimSpace(max), err, bytes.TrimSpace(out), events["oom_kill"])
	}
	if events["oom_kill"] != 1 {
		t.Errorf("memory.events oom_kill = %d after killing the hog, want 1", events["oom_kill"])
	}
	if peak, err := os.ReadFile(filepath.Join(cg, "memory.peak")); err == nil {
		t.Logf("memory.peak = %s", bytes.TrimSpace(peak))
	}
}

func TestGuestIOMaxThrottlesDirectReads(t *testing.T) {
	vmGuestOnly(t)
	const (
		disk  = "/dev/nvme0n1"
		size  = 8 << 20
		limit = 4 << 20
	)
	devNum, err := os.ReadFile("/sys/block/nvme0n1/dev")
	if err != nil {
		t.Fatalf("the NVMe disk is missing: %v", err)
	}
	dev := strings.TrimSpace(string(devNum))
	if fi, err := os.Stat(disk); err != nil || fi.Mode()&os.ModeDevice == 0 {
		t.Fatalf("%s is not a block device (%v)", disk, err)
	}

	unlimited := directRead(t, nil, disk, size)
	cg, fd := guestCgroup(t, "io")
	guestWriteCgroupFile(t, cg, "io.max", fmt.Sprintf("%s rbps=%d", dev, limit))
	limited := directRead(t, &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}, disk, size)
	t.Logf("O_DIRECT read of %d MiB: %s unlimited, %s under rbps=%d", size>>20, unlimited, limited, limit)

	if limited < 1500*time.Millisecond {
		t.Errorf("reading %d MiB under io.max %s rbps=%d took %s, want >= 1.5s", size>>20, dev, limit, limited)
	}
	if unlimited >= limited/2 {
		t.Errorf("the unlimited read took %s, the limited one %s: the throttle is not what slowed it", unlimited, limited)
	}
	stat, err := os.ReadFile(filepath.Join(cg, "io.stat"))
	if err != nil {
		t.Fatal(err)
	}
	var rbytes int64
	for line := range strings.Lines(string(stat)) {
		if f := strings.Fields(line); len(f) > 0 && f[0] == dev {
			for _, kv := range f[1:] {
				if v, ok := strings.CutPrefix(kv, "rbytes="); ok {
					rbytes, _ = strconv.ParseInt(v, 10, 64)
				}
			}
		}
	}
	if rbytes < size {
		t.Errorf("io.stat rbytes for %s = %d, want >= %d; io.stat:\n%s", dev, rbytes, size, stat)
	}
}

// directRead runs the directread helper and returns the time its reads took.
func directRead(t *testing.T, attr *syscall.SysProcAttr, disk string, size int) time.Duration {
	t.Helper()
	cmd := helperCommand(t, "directread", disk, strconv.Itoa(size))
	cmd.SysProcAttr = attr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("O_DIRECT read of %s: %v", disk, exitDetail(err))
	}
	ns, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
	if err != nil {
		t.Fatalf("directread printed %q, want nanoseconds", out)
	}
	return time.Duration(ns)
}

type nsInfo struct {
	Pid        int               `json:"pid"`
	Hostname   string            `json:"hostname"`
	Interfaces []string          `json:"interfaces"`
	Cgroup     string            `json:"cgroup"`
	NS         map[string]string `json:"ns"`
	ProcPids   int               `json:"proc_pids"` // processes in a fresh /proc
}

var namespaceKinds = []string{"pid", "mnt", "net", "uts", "ipc", "cgroup"}

func TestGuestCloneNewNamespaces(t *testing.T) {
	vmGuestOnly(t)
	cmd := helperCommand(t, "nsinfo")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWPID | unix.CLONE_NEWNS |
		unix.CLONE_NEWNET | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC | unix.CLONE_NEWCGROUP}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("clone with all namespaces: %v", exitDetail(err))
	}
	var got nsInfo
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("nsinfo printed %q: %v", out, err)
	}
	for _, kind := range namespaceKinds {
		mine, err := os.Readlink("/proc/self/ns/" + kind)
		if err != nil {
			t.Fatal(err)
		}
		if got.NS[kind] == "" || got.NS[kind] == mine {
			t.Errorf("%s namespace of the child = %q, want a new one (the parent's is %q)", kind, got.NS[kind], mine)
		}
	}
	host, _ := os.Hostname()
	checks := []struct {
		what      string
		got, want any
	}{
		{"pid in its PID namespace", got.Pid, 1},
		{"processes in its own /proc", got.ProcPids, 1},
		{"hostname it set", got.Hostname, "vmcheck-ns"},
		{"parent's hostname afterwards", host, "worker-vm"},
		{"network interfaces", strings.Join(got.Interfaces, ","), "lo"},
		{"/proc/self/cgroup in its cgroup namespace", got.Cgroup, "0::/"},
	}
	for _, c := range checks {
		if fmt.Sprint(c.got) != fmt.Sprint(c.want) {
			t.Errorf("%s = %v, want %v", c.what, c.got, c.want)
		}
	}
}

// The job init pivots into its own root; that fails with EINVAL on the
// initramfs rootfs, which is why vmSwitchRoot exists.
func TestGuestPivotRootWorksInNewMountNamespace(t *testing.T) {
	vmGuestOnly(t)
	cmd := helperCommand(t, "pivot", t.TempDir())
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: unix.CLONE_NEWNS}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("pivot_root in a new mount namespace: %v", exitDetail(err))
	}
	if got := strings.TrimSpace(string(out)); got != "pivoted" {
		t.Fatalf("pivot helper printed %q, want pivoted", got)
	}
}

func TestGuestLoopbackServesHTTP(t *testing.T) {
	vmGuestOnly(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen on loopback: %v", err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, "ok")
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + ln.Addr().String() + "/")
	if err != nil {
		t.Fatalf("GET over loopback: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET over loopback: %s", resp.Status)
	}
}

// ---- cgroup plumbing for the checks ----

// guestCgroup creates a cgroup for this test under the root, with the given
// controllers enabled for it, and returns its path and an open directory fd
// for SysProcAttr.CgroupFD. Cleanup kills what is left in it, removes it and
// disables again the controllers it enabled.
func guestCgroup(t *testing.T, controllers ...string) (string, int) {
	t.Helper()
	ctl := filepath.Join(cgroupRoot, "cgroup.subtree_control")
	b, err := os.ReadFile(ctl)
	if err != nil {
		t.Fatal(err)
	}
	var added []string
	for _, c := range controllers {
		if !slices.Contains(strings.Fields(string(b)), c) {
			added = append(added, c)
		}
	}
	if len(added) > 0 {
		guestWriteCgroupFile(t, cgroupRoot, "cgroup.subtree_control", "+"+strings.Join(added, " +"))
		t.Cleanup(func() {
			if err := os.WriteFile(ctl, []byte("-"+strings.Join(added, " -")), 0); err != nil {
				t.Errorf("disable %v again in %s: %v", added, ctl, err)
			}
		})
	}

	dir := filepath.Join(cgroupRoot, "vmcheck-"+strings.NewReplacer("/", "-").Replace(t.Name()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		_ = os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
		// A killed process leaves its cgroup a moment after it is reaped.
		deadline := time.Now().Add(5 * time.Second)
		for {
			err := os.Remove(dir)
			if err == nil {
				return
			}
			if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
				t.Errorf("remove cgroup: %v", err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return dir, int(f.Fd())
}

func guestWriteCgroupFile(t *testing.T, dir, name, value string) {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(value), 0); err != nil {
		t.Fatalf("write %q to %s: %v", value, path, err)
	}
}

// readCgroupKeyed reads a flat-keyed cgroup file such as memory.events.
func readCgroupKeyed(t *testing.T, dir, name string) map[string]int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]int64{}
	for line := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), " "); ok {
			m[k], _ = strconv.ParseInt(v, 10, 64)
		}
	}
	return m
}

// helperCommand runs this test binary in one of its testHelpers modes, under
// a deadline.
func helperCommand(t *testing.T, name string, args ...string) *exec.Cmd {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, exe, args...)
	cmd.Env = append(os.Environ(), testHelperEnv+"="+name)
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// exitDetail adds a failed helper's stderr to its error.
func exitDetail(err error) string {
	var exit *exec.ExitError
	if errors.As(err, &exit) && len(exit.Stderr) > 0 {
		return fmt.Sprintf("%v: %s", err, bytes.TrimSpace(exit.Stderr))
	}
	return err.Error()
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

// helperDirectRead reads args[1] bytes of args[0] with O_DIRECT, bypassing
// the page cache so every byte is a real, throttleable I/O, and prints the
// nanoseconds the reads took.
func helperDirectRead(args []string) error {
	size, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	fd, err := unix.Open(args[0], unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s O_DIRECT: %w", args[0], err)
	}
	defer unix.Close(fd)
	// O_DIRECT needs a block-aligned buffer: mmap is page-aligned.
	buf, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return err
	}
	defer unix.Munmap(buf)
	start := time.Now()
	for off := 0; off < size; {
		n, err := unix.Pread(fd, buf, int64(off))
		if err != nil {
			return fmt.Errorf("read %s at %d: %w", args[0], off, err)
		}
		if n == 0 {
			return fmt.Errorf("read %s: end of device at %d", args[0], off)
		}
		off += n
	}
	fmt.Println(time.Since(start).Nanoseconds())
	return nil
}

// helperNSInfo describes the namespaces it runs in, as JSON.
func helperNSInfo([]string) error {
	info := nsInfo{Pid: os.Getpid(), NS: map[string]string{}}
	for _, kind := range namespaceKinds {
		link, err := os.Readlink("/proc/self/ns/" + kind)
		if err != nil {
			return err
		}
		info.NS[kind] = link
	}
	if err := unix.Sethostname([]byte("vmcheck-ns")); err != nil {
		return fmt.Errorf("sethostname: %w", err)
	}
	info.Hostname, _ = os.Hostname()
	ifaces, err := net.Interfaces()
	if err != nil {
		return err
	}
	for _, ifc := range ifaces {
		info.Interfaces = append(info.Interfaces, ifc.Name)
	}
	cg, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return err
	}
	info.Cgroup = strings.TrimSpace(string(cg))

	// A fresh proc mount shows only this PID namespace.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	proc, err := os.MkdirTemp("", "proc-")
	if err != nil {
		return err
	}
	defer os.Remove(proc)
	if err := unix.Mount("proc", proc, "proc", 0, ""); err != nil {
		return fmt.Errorf("mount proc: %w", err)
	}
	defer unix.Unmount(proc, unix.MNT_DETACH)
	ents, err := os.ReadDir(proc)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err == nil {
			info.ProcPids++
		}
	}
	return json.NewEncoder(os.Stdout).Encode(info)
}

// helperPivot pivots into a fresh tmpfs under args[0], as the job init
// does, and checks the old root is gone. Run it in a new mount namespace.
func helperPivot(args []string) error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	root := args[0]
	if err := unix.Mount("tmpfs", root, "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("mount tmpfs on %s: %w", root, err)
	}
	if err := os.Mkdir(filepath.Join(root, "old"), 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "marker"), nil, 0o644); err != nil {
		return err
	}
	// pivot_root(2): new_root must be a mount point not on the current root's mount.
	if err := unix.PivotRoot(root, filepath.Join(root, "old")); err != nil {
		return fmt.Errorf("pivot_root %s: %w", root, err)
	}
	if err := os.Chdir("/"); err != nil {
		return err
	}
	if err := unix.Unmount("/old", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach the old root: %w", err)
	}
	if _, err := os.Stat("/marker"); err != nil {
		return fmt.Errorf("after pivot_root: %w", err)
	}
	if _, err := os.Stat("/init"); err == nil {
		return errors.New("after pivot_root the old root's /init is still visible")
	}
	fmt.Println("pivoted")
	return nil
}
