//go:build linux

// vm_test.go: the cgroup v2 VM harness. The build machines are cgroup v1
// hybrid, so TestCgroupV2VM boots a real kernel with a pure cgroup v2
// hierarchy in qemu, with this package's own static test binary as /init.
// Inside, PID 1 runs every TestGuest* test of the package and prints one
// VMCHECK line per test on the serial console; the host turns each line back
// into a subtest, so a failure in the VM fails `go test` with the check's name
// and detail.
//
// Invariants: a guest check that fails, skips, dies or hangs fails the host
// test (never a silent pass); qemu always runs under a deadline and is killed
// at it; TestGuest* tests do real work only inside the VM (vmGuestOnly), and
// the guest entry point runs only as PID 1 of a kernel booted by this harness.
//
// Console protocol, one line each, written only by the guest's PID 1:
//
//	VMCHECK PASS <test>[: <output>]
//	VMCHECK FAIL <test>: <detail>
//	VMCHECK SKIP <test>: <detail>   (a failure too: guest checks must not skip)
//	VMCHECK DONE <n>                n = number of PASS/FAIL/SKIP lines before it
//
// A console without DONE, or whose DONE count disagrees with the lines read,
// fails the test: the guest died, or the console lost lines.
package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// vmGuestEnv is set on the guest kernel's command line. The kernel hands
	// unknown KEY=VALUE parameters to /init as environment variables, and
	// /proc/cmdline keeps it visible to every process in the guest.
	vmGuestEnv = "WORKER_VM_GUEST"
	// vmStageEnv tells the re-executed /init that the root was switched.
	vmStageEnv = "WORKER_VM_STAGE"
	// vmTestTimeoutEnv carries the guest's -test.timeout, shorter than the
	// host's deadline so a hung check dies with a goroutine dump that names it.
	vmTestTimeoutEnv = "WORKER_VM_TEST_TIMEOUT"
	// testHelperEnv makes the test binary run one helper (payload) mode from
	// testHelpers instead of tests: the payload processes of the guest checks.
	testHelperEnv = "WORKER_TEST_HELPER"

	// vmGuestTestPattern selects the guest checks: the TestGuest prefix is
	// reserved for them, and every test so named runs in the VM.
	vmGuestTestPattern = "^TestGuest"
	vmDefaultTimeout   = 4 * time.Minute
)

// TestMain dispatches the test binary's three roles: PID 1 of the VM, a
// helper payload process, or an ordinary test run.
// If another TestMain is ever needed, merge it here: a package has one.
func TestMain(m *testing.M) {
	// All three conditions: a test binary is PID 1 of every job's PID
	// namespace too, and must never take itself for the VM's init there.
	if os.Getpid() == 1 && os.Getenv(vmGuestEnv) == "1" && os.Args[0] == "/init" {
		vmGuestInit()
	}
	// The server re-executes /proc/self/exe as each job's init; in tests that
	// is this test binary, which must then be the init.
	if len(os.Args) > 2 && os.Args[1] == initArg {
		// syscall.Exit, not os.Exit: under -race, os.Exit sleeps a second
		// (GORACE atexit_sleep_ms) in every init, and the init's environment,
		// where GORACE could say otherwise, is empty on purpose.
		syscall.Exit(runInit(os.Args[2]))
	}
	if name := os.Getenv(testHelperEnv); name != "" {
		os.Exit(runTestHelper(name, os.Args[1:]))
	}
	os.Exit(m.Run())
}

func runTestHelper(name string, args []string) int {
	run, ok := testHelpers[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown %s=%q\n", testHelperEnv, name)
		return 2
	}
	if err := run(args); err != nil {
		fmt.Fprintf(os.Stderr, "helper %s: %v\n", name, err)
		return 1
	}
	return 0
}

// inVM reports whether this process runs in a guest booted by
// TestCgroupV2VM. It reads /proc/cmdline rather than the environment: jobs
// get a clean environment, and the flag cannot be set by accident on a host.
var inVM = sync.OnceValue(func() bool {
	b, err := os.ReadFile("/proc/cmdline")
	return err == nil && slices.Contains(strings.Fields(string(b)), vmGuestEnv+"=1")
})

// vmGuestOnly skips a TestGuest* test outside the VM. Skipping is acceptable
// only because TestCgroupV2VM runs every TestGuest* test inside the VM and
// fails if any of them fails or skips there.
func vmGuestOnly(t *testing.T) {
	t.Helper()
	if !inVM() {
		t.Skip("guest-only: TestCgroupV2VM runs this inside a cgroup v2 VM and fails if it fails there")
	}
}

// ---- host side ----

// TestCgroupV2VM boots the VM and reports every guest check as a subtest.
func TestCgroupV2VM(t *testing.T) {
	start := time.Now()
	qemu := vmQemu(t)
	kernel := vmKernel(t)
	busybox, applets := vmBusybox(t)
	depsDone := time.Now()

	dir := t.TempDir()
	bin := vmBuildTestBinary(t, dir)
	want := vmListGuestChecks(t, bin)
	initrd := filepath.Join(dir, "initrd.cpio")
	if err := writeInitramfs(initrd, bin, busybox, applets); err != nil {
		t.Fatal(err)
	}
	// A raw disk: the io check formats it in the guest with busybox mke2fs.
	// Sparse, so it costs nothing on the host.
	disk := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 64<<20); err != nil {
		t.Fatalf("size disk image: %v", err)
	}
	built := time.Now()

	timeout := vmTimeout(t)
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	appendArgs := strings.Join([]string{
		"console=ttyS0", "quiet", "panic=-1", "cgroup_no_v1=all",
		vmGuestEnv + "=1",
		vmTestTimeoutEnv + "=" + (timeout - 20*time.Second).String(),
	}, " ")
	cmd := exec.CommandContext(ctx, qemu,
		"-accel", "tcg", // never kvm: /dev/kvm here crashes stock kernels
		"-m", "512", "-smp", "2",
		"-nographic", "-no-reboot", "-net", "none",
		"-kernel", kernel, "-initrd", initrd, "-append", appendArgs,
		"-drive", "file="+disk+",format=raw,if=none,id=d0",
		"-device", "nvme,drive=d0,serial=w0",
	)
	var console tailBuffer
	cmd.Stdout, cmd.Stderr = &console, &console
	cmd.WaitDelay = 5 * time.Second
	runErr := cmd.Run()
	ran := time.Now()
	t.Logf("VM: deps %s, build %s, boot+checks %s (qemu tcg)",
		depsDone.Sub(start).Round(time.Millisecond), built.Sub(depsDone).Round(time.Millisecond),
		ran.Sub(built).Round(time.Millisecond))

	out := console.String()
	if path := os.Getenv("WORKER_VM_CONSOLE"); path != "" {
		if err := os.WriteFile(path, []byte(out), 0o644); err != nil {
			t.Errorf("save the console: %v", err)
		}
	}
	if ctx.Err() != nil {
		t.Fatalf("the VM did not power off within %s, qemu killed (raise WORKER_VM_TIMEOUT if the machine is just slow); console tail:\n%s",
			timeout, consoleTail(out, 60))
	}
	if runErr != nil {
		t.Fatalf("qemu: %v; console tail:\n%s", runErr, consoleTail(out, 60))
	}
	checks, err := parseVMChecks(out)
	if err != nil {
		t.Fatalf("%v; console tail:\n%s", err, consoleTail(out, 60))
	}
	if len(checks) == 0 {
		t.Fatalf("no guest checks ran; console tail:\n%s", consoleTail(out, 60))
	}

	if c := checks[0]; c.name == "guest-init" {
		t.Fatalf("the VM's init failed, no check ran: %s; console tail:\n%s", c.detail, consoleTail(out, 60))
	}
	got := make(map[string]vmCheck, len(checks))
	names := slices.Clone(want)
	for _, c := range checks {
		if _, dup := got[c.name]; !dup && !slices.Contains(want, c.name) {
			names = append(names, c.name) // e.g. guest-init: the VM's own setup failed
		}
		got[c.name] = c
	}
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			c, ok := got[name]
			switch {
			case !ok:
				t.Errorf("%s reported no result from the VM", name)
			case c.status == "PASS" && c.detail != "":
				t.Logf("guest output: %s", c.detail)
			case c.status == "FAIL":
				t.Errorf("%s failed in the VM: %s", name, c.detail)
			case c.status == "SKIP":
				t.Errorf("%s skipped in the VM (guest checks must run there): %s", name, c.detail)
			}
		})
	}
	if t.Failed() {
		t.Logf("console tail:\n%s", consoleTail(out, 40))
	}
}

func vmTimeout(t *testing.T) time.Duration {
	t.Helper()
	timeout := vmDefaultTimeout
	if s := os.Getenv("WORKER_VM_TIMEOUT"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d < time.Minute {
			t.Fatalf("WORKER_VM_TIMEOUT=%q: want a Go duration of at least 1m", s)
		}
		timeout = d
	}
	if dl, ok := t.Deadline(); ok && time.Until(dl)-10*time.Second < timeout {
		timeout = time.Until(dl) - 10*time.Second
	}
	if timeout < 30*time.Second {
		t.Fatalf("only %s left before the go test deadline: run with a larger -timeout", timeout)
	}
	return timeout
}

// vmBuildTestBinary builds this package's tests as one static binary: it
// becomes the guest's /init and every payload the guest checks run.
func vmBuildTestBinary(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "worker.test")
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool(), "test", "-c", "-o", bin, "-ldflags=-s -w", ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the static test binary for the VM: %v\n%s", err, out)
	}
	return bin
}

// goTool is the go command running this test: `go test` puts its own
// GOROOT/bin first on PATH.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "go"
}

// vmListGuestChecks asks the built binary which guest checks exist, so a
// check that never reports is caught, not just those that report failure.
func vmListGuestChecks(t *testing.T, bin string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "-test.list", vmGuestTestPattern).Output()
	if err != nil {
		t.Fatalf("list guest checks with %s -test.list: %v", bin, err)
	}
	names := strings.Fields(string(out))
	if len(names) == 0 {
		t.Fatalf("no %s tests in this package: nothing to run in the VM", vmGuestTestPattern)
	}
	return names
}

// tailBuffer keeps the last 8 MiB of the console: enough for any tail we
// print, bounded however much a broken guest writes.
type tailBuffer struct{ b []byte }

func (w *tailBuffer) Write(p []byte) (int, error) {
	const max = 8 << 20
	w.b = append(w.b, p...)
	if len(w.b) > max {
		w.b = append(w.b[:0], w.b[len(w.b)-max:]...)
	}
	return len(p), nil
}

func (w *tailBuffer) String() string { return string(w.b) }

// ansiEscape matches the terminal control sequences SeaBIOS writes.
var ansiEscape = regexp.MustCompile(`\x1b(\[[0-9;?]*[A-Za-z]|.)`)

func consoleTail(s string, n int) string {
	s = ansiEscape.ReplaceAllString(strings.ReplaceAll(s, "\r", ""), "")
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "\t" + strings.Join(lines, "\n\t")
}

type vmCheck struct{ name, status, detail string }

// parseVMChecks reads the VMCHECK lines of a console log.
func parseVMChecks(console string) ([]vmCheck, error) {
	var checks []vmCheck
	for line := range strings.Lines(console) {
		// SeaBIOS leaves terminal escapes, without a newline, where the
		// guest's first line starts.
		line = ansiEscape.ReplaceAllString(strings.TrimRight(line, "\r\n"), "")
		rest, ok := strings.CutPrefix(line, "VMCHECK ")
		if !ok {
			continue
		}
		status, rest, _ := strings.Cut(rest, " ")
		switch status {
		case "PASS", "FAIL", "SKIP":
			name, detail, _ := strings.Cut(rest, ": ")
			checks = append(checks, vmCheck{name: name, status: status, detail: detail})
		case "DONE":
			n, err := strconv.Atoi(rest)
			if err != nil {
				return nil, fmt.Errorf("malformed console line %q", line)
			}
			if n != len(checks) {
				return nil, fmt.Errorf("the console lost check results: the guest reported %d, the host read %d", n, len(checks))
			}
			return checks, nil
		default:
			return nil, fmt.Errorf("malformed console line %q", line)
		}
	}
	return nil, fmt.Errorf("the guest never finished (no VMCHECK DONE after %d results): it crashed or powered off early", len(checks))
}

// vmCacheDir holds the guest kernel between runs.
func vmCacheDir() (string, error) {
	if d := os.Getenv("WORKER_VM_CACHE"); d != "" {
		return d, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("find the VM cache: %w; set WORKER_VM_CACHE", err)
	}
	return filepath.Join(home, ".cache", "worker-vm"), nil
}

// vmQemu returns qemu-system-x86_64, installing it with apt if missing.
func vmQemu(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("qemu-system-x86_64"); err == nil {
		return p
	}
	if err := aptRun(t, "", "apt-get", "update"); err != nil {
		t.Fatal(err)
	}
	if err := aptRun(t, "", "apt-get", "install", "-y", "--no-install-recommends", "qemu-system-x86"); err != nil {
		t.Fatal(err)
	}
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatalf("qemu-system-x86 installed but qemu-system-x86_64 not on PATH: %v", err)
	}
	return p
}

// vmKernel returns a Debian cloud kernel from the cache, fetching it once.
// Its NVMe driver and ext4 are built in, so the guest needs no modules.
func vmKernel(t *testing.T) string {
	t.Helper()
	return vmCachedFromDeb(t, "vmlinuz", cloudKernelPackage, "boot/vmlinuz-*")
}

// vmBusybox returns a static busybox from the cache (fetching it once) and
// the applets it has. It gives the guest the shell, sleep, dd, ps and mke2fs
// that the guest checks' jobs run, as a host's jobs would run the host's.
func vmBusybox(t *testing.T) (string, []string) {
	t.Helper()
	bb := vmCachedFromDeb(t, "busybox", func(*testing.T) (string, error) { return "busybox-static", nil }, "bin/busybox")
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bb, "--list").Output()
	if err != nil {
		t.Fatalf("list the applets of %s: %v (delete it to fetch it again)", bb, err)
	}
	applets := strings.Fields(string(out))
	for _, need := range []string{"sh", "sleep", "dd", "mke2fs"} {
		if !slices.Contains(applets, need) {
			t.Fatalf("%s has no %s applet (has %q); delete it to fetch it again", bb, need, applets)
		}
	}
	return bb, applets
}

// vmCachedFromDeb returns <cache>/<name>, fetching it once from a Debian
// package: pkg names the package, which is downloaded with apt-get download
// and unpacked with dpkg -x, never installed on the host; pick is the glob
// of the one file wanted in the unpacked tree. To move to newer packages,
// delete the cache directory.
func vmCachedFromDeb(t *testing.T, name string, pkg func(*testing.T) (string, error), pick string) string {
	t.Helper()
	cache, err := vmCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	dest := filepath.Join(cache, name)
	if _, err := os.Stat(dest); err == nil {
		return dest
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		t.Fatalf("create the VM cache: %v", err)
	}
	work, err := os.MkdirTemp(cache, "fetch-")
	if err != nil {
		t.Fatalf("create the VM cache: %v", err)
	}
	defer os.RemoveAll(work)

	deb, err := pkg(t)
	if err != nil {
		// The package lists may be missing or stale on a fresh machine.
		if err := aptRun(t, "", "apt-get", "update"); err != nil {
			t.Fatal(err)
		}
		if deb, err = pkg(t); err != nil {
			t.Fatal(err)
		}
	}
	download := func() error { return aptRun(t, work, "apt-get", "download", deb) }
	if err := download(); err != nil {
		if err := aptRun(t, "", "apt-get", "update"); err != nil {
			t.Fatal(err)
		}
		if err := download(); err != nil {
			t.Fatal(err)
		}
	}
	debs, _ := filepath.Glob(filepath.Join(work, deb+"_*.deb"))
	if len(debs) != 1 {
		t.Fatalf("apt-get download %s left %d .deb files in %s, want 1", deb, len(debs), work)
	}
	root := filepath.Join(work, "root")
	if err := aptRun(t, "", "dpkg", "-x", debs[0], root); err != nil {
		t.Fatal(err)
	}
	found, _ := filepath.Glob(filepath.Join(root, pick))
	if len(found) != 1 {
		t.Fatalf("%s holds %d %s files, want 1", debs[0], len(found), pick)
	}
	// Rename last: a run killed half-way leaves nothing half-made in the cache.
	if err := os.Rename(found[0], dest); err != nil {
		t.Fatalf("cache %s: %v", dest, err)
	}
	if err := os.WriteFile(dest+".source", []byte(filepath.Base(debs[0])+"\n"), 0o644); err != nil {
		t.Fatalf("cache %s: %v", dest, err)
	}
	t.Logf("cached %s from %s", dest, filepath.Base(debs[0]))
	return dest
}

// cloudKernelPackage resolves the linux-image-cloud-amd64 metapackage to the
// versioned kernel package it depends on.
func cloudKernelPackage(t *testing.T) (string, error) {
	t.Helper()
	out, err := aptOutput(t, "", "apt-cache", "depends", "linux-image-cloud-amd64")
	if err != nil {
		return "", fmt.Errorf("apt-cache depends linux-image-cloud-amd64: %v\n%s", err, out)
	}
	for line := range strings.Lines(string(out)) {
		if dep, ok := strings.CutPrefix(strings.TrimSpace(line), "Depends: "); ok && strings.HasPrefix(dep, "linux-image-") {
			return dep, nil
		}
	}
	return "", fmt.Errorf("apt-cache depends linux-image-cloud-amd64 names no linux-image-* package:\n%s", out)
}

// aptRun runs one apt or dpkg command in dir under a deadline; its error
// holds the tail of the command's output.
func aptRun(t *testing.T, dir, name string, args ...string) error {
	t.Helper()
	out, err := aptOutput(t, dir, name, args...)
	if err != nil {
		return fmt.Errorf("%s %s (the VM test needs it; run it as root): %v\n%s",
			name, strings.Join(args, " "), err, consoleTail(string(out), 20))
	}
	return nil
}

func aptOutput(t *testing.T, dir, name string, args ...string) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	cmd.WaitDelay = 5 * time.Second
	return cmd.CombinedOutput()
}

// ---- initramfs ----

// writeInitramfs writes an uncompressed newc cpio archive (the format of
// Documentation/driver-api/early-userspace/buffer-format.rst) holding bin
// as /init, busybox as /bin/busybox with a /bin symlink per applet, the
// directories PID 1 mounts on, /dev/console (the kernel opens it for init's
// stdio before any devtmpfs exists) and the users jobs run as.
// Uncompressed because gunzip in an emulated CPU costs more than the bytes.
func writeInitramfs(path, bin, busybox string, applets []string) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create initramfs: %w", err)
	}
	defer f.Close()
	w := &newcWriter{w: bufio.NewWriterSize(f, 1<<20)}
	for _, d := range []string{"bin", "dev", "etc", "newroot", "proc", "root", "run", "sys", "var", "var/lib"} {
		w.entry(d, unix.S_IFDIR|0o755, 0, 0, nil)
	}
	w.entry("tmp", unix.S_IFDIR|0o1777, 0, 0, nil)
	w.entry("dev/console", unix.S_IFCHR|0o600, 0, unix.Mkdev(5, 1), nil)
	w.entry("dev/null", unix.S_IFCHR|0o666, 0, unix.Mkdev(1, 3), nil)
	w.file("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
	w.file("etc/group", 0o644, "root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\n")
	w.file("etc/hostname", 0o644, "worker-vm\n")

	b, err := os.Open(bin)
	if err != nil {
		return fmt.Errorf("open test binary: %w", err)
	}
	defer b.Close()
	st, err := b.Stat()
	if err != nil {
		return fmt.Errorf("stat test binary: %w", err)
	}
	w.entry("init", unix.S_IFREG|0o755, st.Size(), 0, b)

	bb, err := os.Open(busybox)
	if err != nil {
		return fmt.Errorf("open busybox: %w", err)
	}
	defer bb.Close()
	if st, err = bb.Stat(); err != nil {
		return fmt.Errorf("stat busybox: %w", err)
	}
	w.entry("bin/busybox", unix.S_IFREG|0o755, st.Size(), 0, bb)
	for _, a := range applets {
		if a == "busybox" || strings.ContainsAny(a, "/\x00") {
			continue
		}
		w.entry("bin/"+a, unix.S_IFLNK|0o777, int64(len("busybox")), 0, strings.NewReader("busybox"))
	}
	w.entry("TRAILER!!!", 0, 0, 0, nil)
	if w.err != nil {
		return fmt.Errorf("write initramfs %s: %w", path, w.err)
	}
	if err := w.w.Flush(); err != nil {
		return fmt.Errorf("write initramfs %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write initramfs %s: %w", path, err)
	}
	return nil
}

// newcWriter writes cpio "newc" entries; the first error sticks.
type newcWriter struct {
	w   *bufio.Writer
	ino int
	n   int64 // bytes written, for the 4-byte alignment
	err error
}

func (w *newcWriter) file(name string, perm uint32, content string) {
	w.entry(name, unix.S_IFREG|perm, int64(len(content)), 0, strings.NewReader(content))
}

func (w *newcWriter) entry(name string, mode uint32, size int64, rdev uint64, data io.Reader) {
	if w.err != nil {
		return
	}
	w.ino++
	nlink := 1
	if mode&unix.S_IFMT == unix.S_IFDIR {
		nlink = 2
	}
	// magic, then 13 fields of 8 hex digits: ino mode uid gid nlink mtime
	// filesize devmajor devminor rdevmajor rdevminor namesize check.
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, mode, 0, 0, nlink, 0, size, 0, 0, unix.Major(rdev), unix.Minor(rdev), len(name)+1, 0)
	w.write([]byte(hdr + name + "\x00"))
	w.pad()
	if data != nil {
		n, err := io.Copy(w.w, io.LimitReader(data, size))
		w.n += n
		if err == nil && n != size {
			err = fmt.Errorf("%s: wrote %d of %d bytes", name, n, size)
		}
		if err != nil && w.err == nil {
			w.err = err
		}
	}
	w.pad()
}

func (w *newcWriter) write(p []byte) {
	if w.err != nil {
		return
	}
	n, err := w.w.Write(p)
	w.n += int64(n)
	w.err = err
}

func (w *newcWriter) pad() {
	if r := w.n % 4; r != 0 {
		w.write(make([]byte, 4-r))
	}
}

// ---- guest side: PID 1 ----

// vmGuestInit is the VM's PID 1. Stage 1 runs on the initramfs (rootfs)
// and moves everything onto a tmpfs root, because pivot_root(2) — which the
// job init uses — fails with EINVAL while the root is rootfs. Stage 2 mounts
// the kernel filesystems, runs the guest checks and powers off. It never
// returns: if PID 1 exited, the kernel would panic (and, with panic=-1 and
// qemu's -no-reboot, qemu would exit without a DONE line, which fails too).
func vmGuestInit() {
	var err error
	if os.Getenv(vmStageEnv) == "" {
		err = vmSwitchRoot() // execs stage 2 on success
	} else {
		err = vmRunGuestChecks()
	}
	if err != nil {
		fmt.Printf("VMCHECK FAIL guest-init: %s\nVMCHECK DONE 1\n", oneLine(err.Error()))
	}
	vmPowerOff()
}

// vmSwitchRoot is switch_root(8): copy the initramfs into a tmpfs, move that
// mount onto /, chroot into it, and re-exec /init there (keeping the
// environment). See Documentation/filesystems/ramfs-rootfs-initramfs.rst.
func vmSwitchRoot() error {
	const newRoot = "/newroot"
	if err := unix.Mount("tmpfs", newRoot, "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("mount tmpfs on %s: %w", newRoot, err)
	}
	err := filepath.WalkDir("/", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path == newRoot {
			return fs.SkipDir
		}
		dst := filepath.Join(newRoot, path)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return err
			}
			if err := os.Chmod(dst, info.Mode()&(fs.ModePerm|fs.ModeSticky)); err != nil {
				return err
			}
			if path == "/dev" || path == "/proc" || path == "/sys" {
				return fs.SkipDir // mount points: stage 2 mounts over them
			}
		case info.Mode().IsRegular():
			return copyFile(path, dst, info.Mode().Perm())
		case info.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(path)
			if err != nil {
				return err
			}
			return os.Symlink(target, dst)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("copy the initramfs to %s: %w", newRoot, err)
	}
	if err := os.Chdir(newRoot); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move %s onto /: %w", newRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot into the new root: %w", err)
	}
	if err := os.Chdir("/"); err != nil {
		return err
	}
	env := append(os.Environ(), vmStageEnv+"=2")
	return fmt.Errorf("re-exec /init on the new root: %w", unix.Exec("/init", []string{"/init"}, env))
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
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return out.Close()
}

// vmRunGuestChecks mounts what a real host has, then runs the TestGuest*
// tests as a child process, turning its -test.v output into VMCHECK lines.
// A child rather than in-process: a check that panics or wedges takes down
// only the child, and PID 1 still reports which check it was.
func vmRunGuestChecks() error {
	mounts := []struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}{
		{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
		// The options systemd uses, so the guest matches a real v2 host.
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, "nsdelegate,memory_recursiveprot"},
		{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
		{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
	}
	for _, m := range mounts {
		if err := unix.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.dst, err)
		}
	}
	// Only emergencies on the console: kernel messages (an OOM kill report)
	// would otherwise land in the middle of VMCHECK lines.
	if err := os.WriteFile("/proc/sys/kernel/printk", []byte("1"), 0); err != nil {
		return fmt.Errorf("quiet the kernel console: %w", err)
	}
	if err := unix.Sethostname([]byte("worker-vm")); err != nil {
		return fmt.Errorf("set hostname: %w", err)
	}
	if err := loopbackUp(); err != nil { // the guest serves the API on 127.0.0.1
		return err
	}

	timeout := os.Getenv(vmTestTimeoutEnv)
	if timeout == "" {
		timeout = "3m"
	}
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	devNull, err := os.Open("/dev/null")
	if err != nil {
		return err
	}
	child, err := os.StartProcess("/init",
		[]string{"/init", "-test.run=" + vmGuestTestPattern, "-test.v", "-test.count=1", "-test.timeout=" + timeout},
		&os.ProcAttr{Env: vmGuestChildEnv(), Files: []*os.File{devNull, w, w}})
	devNull.Close()
	w.Close()
	if err != nil {
		r.Close()
		return fmt.Errorf("start the guest checks: %w", err)
	}

	// PID 1 adopts every orphan, so it reaps every child, and learns the
	// checks' exit status from the same loop (os.Process.Wait would race it).
	exited := make(chan unix.WaitStatus, 1)
	go func() {
		for {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(-1, &ws, 0, nil)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				return // ECHILD: nothing left; the checks' status was sent
			}
			if pid == child.Pid {
				exited <- ws
			}
		}
	}()
	lines := make(chan string, 64)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()

	rep := &guestReport{out: os.Stdout}
	var ws unix.WaitStatus
	var drain <-chan time.Time // after the exit: a leaked pipe writer must not hang PID 1
loop:
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				if drain != nil {
					break loop
				}
				lines = nil
				continue
			}
			rep.line(line)
		case ws = <-exited:
			if lines == nil {
				break loop
			}
			drain = time.After(2 * time.Second)
		case <-drain:
			break loop
		}
	}
	status := "exit status " + strconv.Itoa(ws.ExitStatus())
	if ws.Signaled() {
		status = "killed by " + ws.Signal().String()
	}
	rep.finish(ws.Exited() && ws.ExitStatus() == 0, status)
	return nil
}

// vmGuestChildEnv is PID 1's environment less the markers that make a test
// binary act as the VM's init: the checks' own children (job inits are PID 1
// too) must never see them.
func vmGuestChildEnv() []string {
	env := []string{"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root", "TMPDIR=/tmp"}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case vmGuestEnv, vmStageEnv, "PATH", "HOME", "TMPDIR":
		default:
			env = append(env, kv)
		}
	}
	return env
}

// vmPowerOff flushes the console and powers the VM off.
func vmPowerOff() {
	// tcdrain: the serial port sends asynchronously, and power-off would
	// otherwise cut the last lines (the DONE line) off the console.
	_ = unix.IoctlSetInt(1, unix.TCSBRK, 1)
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {} // PID 1 must not exit
}

// guestReport turns `go test -v` output into VMCHECK lines. It keeps, per
// top-level test, the output lines printed while it ran: a failing test's
// t.Error messages become the detail of its FAIL line.
type guestReport struct {
	out     io.Writer
	current string               // the test whose output is being read
	running map[string]bool      // started, no result yet
	detail  map[string]*lineClip // output lines per test
	outside lineClip             // output outside any test (a panic's message and trace)
	n       int                  // result lines written
	failed  bool
}

func (g *guestReport) line(s string) {
	if g.running == nil {
		g.running, g.detail = map[string]bool{}, map[string]*lineClip{}
	}
	// Echo for a human reading the console; only PID 1 may start a line
	// with VMCHECK.
	if strings.HasPrefix(s, "VMCHECK") {
		fmt.Fprintf(g.out, "> %s\n", s)
	} else {
		fmt.Fprintf(g.out, "%s\n", s)
	}

	topLevel := func(name string) string { top, _, _ := strings.Cut(name, "/"); return top }
	for _, p := range []string{"=== RUN ", "=== CONT ", "=== NAME "} {
		if name, ok := strings.CutPrefix(s, p); ok {
			name = strings.TrimSpace(name)
			g.current = topLevel(name)
			if p == "=== RUN " && name == g.current {
				g.running[name] = true
				g.detail[name] = &lineClip{}
			}
			return
		}
	}
	if strings.HasPrefix(s, "=== ") {
		return // PAUSE
	}
	for _, status := range []string{"PASS", "FAIL", "SKIP"} {
		if rest, ok := strings.CutPrefix(s, "--- "+status+": "); ok {
			name, _, _ := strings.Cut(rest, " (")
			g.result(status, name, g.detail[name].lines())
			delete(g.running, name)
			delete(g.detail, name)
			if g.current == name {
				g.current = ""
			}
			return
		}
	}
	t := strings.TrimSpace(s)
	switch {
	case t == "" || t == "PASS" || t == "FAIL":
	case g.current != "" && g.detail[g.current] != nil:
		g.detail[g.current].add(t)
	default:
		g.outside.add(t)
	}
}

func (g *guestReport) result(status, name string, detail []string) {
	g.n++
	if status == "FAIL" {
		g.failed = true
	}
	d := strings.Join(detail, " | ")
	switch {
	case d != "":
		fmt.Fprintf(g.out, "VMCHECK %s %s: %s\n", status, name, oneLine(d))
	case status == "PASS":
		fmt.Fprintf(g.out, "VMCHECK PASS %s\n", name)
	default:
		fmt.Fprintf(g.out, "VMCHECK %s %s: (no output)\n", status, name)
	}
}

// finish reports tests that never ended (the test binary died in them) and
// a test binary that failed with output outside any test (a panic reported
// after its test's FAIL line, a TestMain failure), then writes DONE.
func (g *guestReport) finish(ok bool, status string) {
	running := make([]string, 0, len(g.running))
	for name := range g.running {
		running = append(running, name)
	}
	sort.Strings(running)
	for _, name := range running {
		died := "the guest test binary died during this check (" + status + ")"
		g.result("FAIL", name, append([]string{died}, g.detail[name].lines()...))
	}
	if !ok && (!g.failed || len(g.outside.head) > 0) {
		failed := "the guest test binary failed (" + status + ")"
		g.result("FAIL", "guest-test-binary", append([]string{failed}, g.outside.lines()...))
	}
	fmt.Fprintf(g.out, "VMCHECK DONE %d\n", g.n)
}

// lineClip keeps the first and the last lines of some output: a failure's
// message tends to be first (a panic) or last (t.Fatal after t.Logs).
type lineClip struct {
	head, tail []string
	dropped    int
}

const clipLines = 10

func (c *lineClip) add(s string) {
	if len(c.head) < clipLines {
		c.head = append(c.head, s)
		return
	}
	c.tail = append(c.tail, s)
	if len(c.tail) > clipLines {
		c.tail = c.tail[1:]
		c.dropped++
	}
}

func (c *lineClip) lines() []string {
	if c == nil {
		return nil
	}
	out := slices.Clone(c.head)
	if c.dropped > 0 {
		out = append(out, fmt.Sprintf("(%d lines left out)", c.dropped))
	}
	return append(out, c.tail...)
}

// oneLine keeps a detail on its console line.
func oneLine(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > 4000 {
		s = s[:4000] + "..."
	}
	return s
}

// ---- tests of the harness itself (host, fast) ----

func TestVMReportTurnsTestOutputIntoCheckLines(t *testing.T) {
	tests := []struct {
		name   string
		output string // the guest test binary's -test.v output
		ok     bool   // its exit
		want   []vmCheck
	}{{
		name:   "passes, with and without output",
		output: "=== RUN   TestGuestA\n--- PASS: TestGuestA (0.00s)\n=== RUN   TestGuestB\n    x_test.go:1: took 2s\n--- PASS: TestGuestB (2.00s)\nPASS\n",
		ok:     true,
		want:   []vmCheck{{"TestGuestA", "PASS", ""}, {"TestGuestB", "PASS", "x_test.go:1: took 2s"}},
	}, {
		name:   "a failure carries its messages",
		output: "=== RUN   TestGuestA\n    x_test.go:9: memory.max = 1, want 2\n        second line\n--- FAIL: TestGuestA (0.10s)\nFAIL\n",
		want:   []vmCheck{{"TestGuestA", "FAIL", "x_test.go:9: memory.max = 1, want 2 | second line"}},
	}, {
		name:   "a failing subtest fails its test",
		output: "=== RUN   TestGuestA\n=== RUN   TestGuestA/oom\n    x_test.go:3: no oom\n    --- FAIL: TestGuestA/oom (0.00s)\n--- FAIL: TestGuestA (0.00s)\nFAIL\n",
		want:   []vmCheck{{"TestGuestA", "FAIL", "x_test.go:3: no oom | --- FAIL: TestGuestA/oom (0.00s)"}},
	}, {
		name:   "a skip is reported as a skip",
		output: "=== RUN   TestGuestA\n    x_test.go:2: no disk\n--- SKIP: TestGuestA (0.00s)\nPASS\n",
		ok:     true,
		want:   []vmCheck{{"TestGuestA", "SKIP", "x_test.go:2: no disk"}},
	}, {
		name:   "the binary dies inside a test",
		output: "=== RUN   TestGuestA\n--- PASS: TestGuestA (0.00s)\n=== RUN   TestGuestB\n    x_test.go:5: starting\n",
		want: []vmCheck{{"TestGuestA", "PASS", ""},
			{"TestGuestB", "FAIL", "the guest test binary died during this check (exit status 3) | x_test.go:5: starting"}},
	}, {
		name:   "a panic after the test's FAIL line",
		output: "=== RUN   TestGuestA\n--- FAIL: TestGuestA (0.00s)\npanic: boom [recovered]\ngoroutine 7 [running]:\n",
		want: []vmCheck{{"TestGuestA", "FAIL", "(no output)"},
			{"guest-test-binary", "FAIL", "the guest test binary failed (exit status 3) | panic: boom [recovered] | goroutine 7 [running]:"}},
	}, {
		name:   "the binary fails outside any test",
		output: "flag provided but not defined: -x\n",
		want:   []vmCheck{{"guest-test-binary", "FAIL", "the guest test binary failed (exit status 3) | flag provided but not defined: -x"}},
	}, {
		name:   "a line that looks like the protocol is escaped",
		output: "=== RUN   TestGuestA\nVMCHECK DONE 0\n--- PASS: TestGuestA (0.00s)\n",
		ok:     true,
		want:   []vmCheck{{"TestGuestA", "PASS", "VMCHECK DONE 0"}},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var console strings.Builder
			rep := &guestReport{out: &console}
			for line := range strings.Lines(tt.output) {
				rep.line(strings.TrimSuffix(line, "\n"))
			}
			rep.finish(tt.ok, "exit status 3")
			got, err := parseVMChecks(console.String())
			if err != nil {
				t.Fatalf("parse: %v\nconsole:\n%s", err, console.String())
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("checks:\n got %q\nwant %q\nconsole:\n%s", got, tt.want, console.String())
			}
		})
	}
}

func TestParseVMChecksFailsWithoutCompleteReport(t *testing.T) {
	tests := []struct {
		name, console, wantErr string
	}{
		{"no DONE: the guest died", "VMCHECK PASS TestGuestA\r\n[ 1.0] Kernel panic\r\n", "never finished"},
		{"a lost line", "VMCHECK PASS TestGuestA\r\nVMCHECK DONE 2\r\n", "lost check results"},
		{"garbage", "VMCHECK MAYBE TestGuestA\n", "malformed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseVMChecks(tt.console)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("parseVMChecks(%q) error = %v, want one containing %q", tt.console, err, tt.wantErr)
			}
		})
	}
	got, err := parseVMChecks("SeaBIOS\r\n\x1bc\x1b[?7l\x1b[2JVMCHECK FAIL TestGuestA: x: y\r\n> VMCHECK not at line start\r\nVMCHECK DONE 1\r\n")
	if err != nil || !slices.Equal(got, []vmCheck{{"TestGuestA", "FAIL", "x: y"}}) {
		t.Errorf("parseVMChecks = %q, %v; want one FAIL with detail \"x: y\"", got, err)
	}
}

// TestInitramfsIsNewcArchive reads the archive back by the rules of the
// kernel's initramfs unpacker: 110-byte headers, names and data 4-aligned.
func TestInitramfsIsNewcArchive(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	if err := os.WriteFile(bin, []byte("\x7fELF pretend binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	busybox := filepath.Join(dir, "busybox")
	if err := os.WriteFile(busybox, []byte("\x7fELF pretend busybox"), 0o755); err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(dir, "initrd")
	if err := writeInitramfs(initrd, bin, busybox, []string{"busybox", "sh", "sleep"}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(initrd)
	if err != nil {
		t.Fatal(err)
	}
	type entry struct {
		mode uint64
		rdev string
		data string
	}
	entries := map[string]entry{}
	var order []string
	align := func(n int) int { return (n + 3) &^ 3 }
	for off := 0; ; {
		if off+110 > len(b) || string(b[off:off+6]) != "070701" {
			t.Fatalf("no newc header at offset %d", off)
		}
		field := func(i int) uint64 {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("header field %d at offset %d: %v", i, off, err)
			}
			return v
		}
		mode, size, namesize := field(1), int(field(6)), int(field(11))
		name := string(b[off+110 : off+110+namesize-1])
		data := align(off + 110 + namesize)
		order = append(order, name)
		entries[name] = entry{mode, fmt.Sprintf("%d:%d", field(9), field(10)), string(b[data : data+size])}
		off = align(data + size)
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Errorf("%d bytes after the trailer", len(b)-off)
			}
			break
		}
	}
	checks := []struct {
		name string
		mode uint64
		rdev string
		data string
	}{
		{"init", unix.S_IFREG | 0o755, "0:0", "\x7fELF pretend binary"},
		{"dev/console", unix.S_IFCHR | 0o600, "5:1", ""},
		{"tmp", unix.S_IFDIR | 0o1777, "0:0", ""},
		{"newroot", unix.S_IFDIR | 0o755, "0:0", ""},
		{"bin/busybox", unix.S_IFREG | 0o755, "0:0", "\x7fELF pretend busybox"},
		{"bin/sh", unix.S_IFLNK | 0o777, "0:0", "busybox"},
		{"bin/sleep", unix.S_IFLNK | 0o777, "0:0", "busybox"},
	}
	for _, c := range checks {
		e, ok := entries[c.name]
		if !ok {
			t.Errorf("no %s in %q", c.name, order)
			continue
		}
		if e.mode != c.mode || e.rdev != c.rdev || e.data != c.data {
			t.Errorf("%s: mode %o rdev %s data %q, want mode %o rdev %s data %q", c.name, e.mode, e.rdev, e.data, c.mode, c.rdev, c.data)
		}
	}
	if !strings.Contains(entries["etc/passwd"].data, "nobody:x:65534:65534:") {
		t.Errorf("etc/passwd has no nobody: %q", entries["etc/passwd"].data)
	}
}
