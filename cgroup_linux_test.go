package main

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// cgroupHelperEnv makes the test binary a job process (see runCgroupHelper).
const cgroupHelperEnv = "WORKER_CGROUP_TEST_HELPER"

// cgroupTestJobs holds this test process's job cgroups, so the tests never
// see or remove the job cgroups of a real server on the same host.
var cgroupTestJobs = fmt.Sprintf("worker-jobs-test-%d", os.Getpid())

// TestCgroupHelperProcess is not a test: run by helperCmd in a child
// process, it is the job process the enforcement tests put in a cgroup.
func TestCgroupHelperProcess(t *testing.T) {
	if mode := os.Getenv(cgroupHelperEnv); mode != "" {
		os.Exit(runCgroupHelper(mode))
	}
}

// runCgroupHelper is a job process: it waits until the test has put it in
// its cgroup (a byte on stdin), then does mode's work.
func runCgroupHelper(mode string) int {
	buf := make([]byte, 1)
	os.Stdin.Read(buf)
	switch mode {
	case "alloc": // 300 MB, every page touched
		b := make([]byte, 300<<20)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1
		}
		fmt.Println("allocated", len(b))
	case "spin": // 3 s of wall time, busy
		for start := time.Now(); time.Since(start) < 3*time.Second; {
		}
	case "forker": // 40 processes, kept until the test kills the job
		forkSleepers(40, "120")
		os.Stdin.Read(buf)
	default:
		fmt.Fprintln(os.Stderr, "unknown helper mode", mode)
		return 2
	}
	return 0
}

// --- fakes -----------------------------------------------------------------

func writeTestFile(t *testing.T, p, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func readTestFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func symlinkRel(t *testing.T, target, link string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatal(err)
	}
	rel, err := filepath.Rel(filepath.Dir(link), target)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(rel, link); err != nil {
		t.Fatal(err)
	}
}

// fakeSysfs lays out a /sys with: vda (254:0, partition vda1), sda (8:0,
// partition sda2), dm-0 on sda2, dm-1 on loop1, loop0/loop1, zram0, ram0 and
// an empty sr0. The disks to limit are 8:0 and 254:0.
func fakeSysfs(t *testing.T) string {
	t.Helper()
	sys := t.TempDir()
	dev := func(devPath, num, size string) string {
		dir := filepath.Join(sys, "devices", devPath)
		writeTestFile(t, filepath.Join(dir, "dev"), num+"\n")
		writeTestFile(t, filepath.Join(dir, "size"), size+"\n")
		os.MkdirAll(filepath.Join(dir, "slaves"), 0o755)
		symlinkRel(t, dir, filepath.Join(sys, "dev", "block", num))
		return dir
	}
	disk := func(devPath, num, size string) string {
		dir := dev(devPath, num, size)
		symlinkRel(t, dir, filepath.Join(sys, "block", filepath.Base(devPath)))
		return dir
	}
	part := func(devPath, num string) string {
		dir := filepath.Join(sys, "devices", devPath)
		writeTestFile(t, filepath.Join(dir, "dev"), num+"\n")
		writeTestFile(t, filepath.Join(dir, "size"), "2048\n")
		writeTestFile(t, filepath.Join(dir, "partition"), "1\n")
		symlinkRel(t, dir, filepath.Join(sys, "dev", "block", num))
		return dir
	}
	disk("pci0/virtio1/block/vda", "254:0", "536870912")
	part("pci0/virtio1/block/vda/vda1", "254:1")
	disk("pci0/ata1/block/sda", "8:0", "1000000")
	sda2 := part("pci0/ata1/block/sda/sda2", "8:2")
	dm0 := disk("virtual/block/dm-0", "252:0", "900000")
	symlinkRel(t, sda2, filepath.Join(dm0, "slaves", "sda2"))
	disk("virtual/block/loop0", "7:0", "100")
	loop1 := disk("virtual/block/loop1", "7:1", "100")
	dm1 := disk("virtual/block/dm-1", "252:1", "100")
	symlinkRel(t, loop1, filepath.Join(dm1, "slaves", "loop1"))
	disk("virtual/block/zram0", "253:0", "100")
	disk("virtual/block/ram0", "1:0", "100")
	disk("pci0/ata2/block/sr0", "11:0", "0")
	return sys
}

// cgroupV2TestFiles are the interface files the fake v2 "kernel" puts in a new cgroup.
var cgroupV2TestFiles = []string{
	"cgroup.procs", "cgroup.subtree_control", "cgroup.kill", "cgroup.freeze", "cgroup.events",
	"cpu.max", "cpu.stat", "memory.max", "memory.swap.max", "memory.oom.group", "memory.peak",
	"memory.current", "memory.events", "io.max", "io.stat", "pids.max",
}

// fakeUnified lays out a cgroup2 mount in a temp dir, with the server in /svc.
func fakeUnified(t *testing.T, skip ...string) (cgroupSystem, string) {
	t.Helper()
	root := t.TempDir()
	mkdir := func(p string) error {
		if err := os.Mkdir(p, 0o755); err != nil {
			return err
		}
		for _, f := range cgroupV2TestFiles {
			if !slices.Contains(skip, f) {
				writeTestFile(t, filepath.Join(p, f), "")
			}
		}
		writeTestFile(t, filepath.Join(p, "cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma misc\n")
		return nil
	}
	if err := mkdir(filepath.Join(root, "svc")); err != nil {
		t.Fatal(err)
	}
	return cgroupSystem{
		mountPoint: root,
		statfs: func(p string) (int64, error) {
			if p == root {
				return unix.CGROUP2_SUPER_MAGIC, nil
			}
			return 0, unix.ENOENT
		},
		selfCgroup: "0::/svc\n",
		pid:        4242,
		sysfs:      fakeSysfs(t),
		mkdir:      mkdir,
	}, root
}

// cgroupV1TestFiles are the interface files per v1 controller.
var cgroupV1TestFiles = map[string][]string{
	"cpu":     {"cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.stat"},
	"cpuacct": {"cpuacct.usage"},
	"memory":  {"memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.swappiness", "memory.max_usage_in_bytes", "memory.oom_control"},
	"blkio":   {"blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device", "blkio.throttle.io_service_bytes"},
	"pids":    {"pids.max", "pids.current"},
	"freezer": {"freezer.state"},
}

// fakeLegacy lays out v1 hierarchies in a temp dir, one mount per entry of
// mounts (e.g. "cpu,cpuacct"), with the server's memory cgroup at
// /process_api/x and the others at /, as on the build machines.
func fakeLegacy(t *testing.T, mounts []string, hybrid bool, skip ...string) (cgroupSystem, string) {
	t.Helper()
	root := t.TempDir()
	mkdir := func(p string) error {
		if err := os.Mkdir(p, 0o755); err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		mount, _, _ := strings.Cut(rel, "/")
		writeTestFile(t, filepath.Join(p, "cgroup.procs"), "")
		for _, c := range strings.Split(mount, ",") {
			for _, f := range cgroupV1TestFiles[c] {
				if !slices.Contains(skip, f) {
					writeTestFile(t, filepath.Join(p, f), "")
				}
			}
		}
		return nil
	}
	var mountinfo, self strings.Builder
	for i, m := range mounts {
		if err := mkdir(filepath.Join(root, m)); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&mountinfo, "%d 31 0:%d / %s rw,relatime - cgroup cgroup rw,%s\n", 32+i, 29+i, filepath.Join(root, m), m)
		own := "/"
		if m == "memory" {
			own = "/process_api/x"
			os.MkdirAll(filepath.Join(root, "memory", "process_api"), 0o755)
			if err := mkdir(filepath.Join(root, "memory", "process_api", "x")); err != nil {
				t.Fatal(err)
			}
		}
		fmt.Fprintf(&self, "%d:%s:%s\n", i+1, m, own)
	}
	self.WriteString("0::/\n")
	return cgroupSystem{
		mountPoint: root,
		statfs: func(p string) (int64, error) {
			if p == filepath.Join(root, "unified") && hybrid {
				return unix.CGROUP2_SUPER_MAGIC, nil
			}
			return unix.TMPFS_MAGIC, nil
		},
		selfCgroup: self.String(),
		mountinfo:  mountinfo.String(),
		pid:        4242,
		sysfs:      fakeSysfs(t),
		mkdir:      mkdir,
	}, root
}

var hostLikeV1Mounts = []string{"cpu", "cpuacct", "cpuset", "memory", "freezer", "blkio", "pids"}

// --- mode, parsing, devices --------------------------------------------------

func TestCgroupModeFollowsFilesystemMagic(t *testing.T) {
	tests := []struct {
		name  string
		magic map[string]int64
		want  string
	}{
		{"cgroup2 on the mount point", map[string]int64{"/c": unix.CGROUP2_SUPER_MAGIC}, cgroupModeUnified},
		{"tmpfs with cgroup2 in unified", map[string]int64{"/c": unix.TMPFS_MAGIC, "/c/unified": unix.CGROUP2_SUPER_MAGIC}, cgroupModeHybrid},
		{"tmpfs without unified", map[string]int64{"/c": unix.TMPFS_MAGIC}, cgroupModeLegacy},
		{"tmpfs with tmpfs in unified", map[string]int64{"/c": unix.TMPFS_MAGIC, "/c/unified": unix.TMPFS_MAGIC}, cgroupModeLegacy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			statfs := func(p string) (int64, error) {
				if m, ok := tt.magic[p]; ok {
					return m, nil
				}
				return 0, unix.ENOENT
			}
			got, err := detectCgroupMode("/c", statfs)
			if err != nil || got != tt.want {
				t.Fatalf("detectCgroupMode = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
	_, err := detectCgroupMode("/c", func(string) (int64, error) { return 0, unix.ENOENT })
	if err == nil || !strings.Contains(err.Error(), "-no-limits") {
		t.Fatalf("no cgroupfs: err = %v, want one that suggests -no-limits", err)
	}
}

func TestCgroupModeOfThisHostMatchesItsMounts(t *testing.T) {
	got, err := detectCgroupMode(cgroupMountPoint, statfsMagic)
	if err != nil {
		t.Fatal(err)
	}
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	want := cgroupModeLegacy
	for _, m := range parseCgroupMounts(string(info)) {
		switch {
		case m.fstype == "cgroup2" && m.point == cgroupMountPoint:
			want = cgroupModeUnified
		case m.fstype == "cgroup2" && m.point == cgroupMountPoint+"/unified" && want != cgroupModeUnified:
			want = cgroupModeHybrid
		}
	}
	if got != want {
		t.Fatalf("mode = %s, mountinfo says %s", got, want)
	}
	t.Logf("this host: %s", got)
}

func TestParseCgroupMountsReadsRootPointAndControllers(t *testing.T) {
	info := "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n" +
		"32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n" +
		"41 31 0:38 /docker/abc /sys/fs/cgroup/my\\040mem rw - cgroup cgroup rw,memory\n" +
		"42 31 0:39 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
	got := parseCgroupMounts(info)
	if len(got) != 3 {
		t.Fatalf("got %d mounts, want 3: %+v", len(got), got)
	}
	if m := got[0]; m.point != "/sys/fs/cgroup/cpu,cpuacct" || !slices.Contains(m.options, "cpuacct") || m.fstype != "cgroup" {
		t.Errorf("cpu mount = %+v", m)
	}
	if m := got[1]; m.point != "/sys/fs/cgroup/my mem" || m.root != "/docker/abc" {
		t.Errorf("memory mount = %+v", m)
	}
	dir, err := got[1].dir("/docker/abc/worker-jobs")
	if err != nil || dir != "/sys/fs/cgroup/my mem/worker-jobs" {
		t.Errorf("dir under a non-root mount = %q, %v", dir, err)
	}
	if _, err := got[1].dir("/elsewhere"); err == nil {
		t.Error("a cgroup outside the mounted part gave no error")
	}
}

func TestBlockDisksAreWholeRealDisks(t *testing.T) {
	sys := fakeSysfs(t)
	got, err := blockDisks(sys)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"8:0", "254:0"}; !slices.Equal(got, want) {
		t.Fatalf("blockDisks = %v, want %v (loop, ram, zram, empty skipped; dm-0 is sda; sorted by number)", got, want)
	}
	if _, err := blockDisks(t.TempDir()); err == nil {
		t.Fatal("blockDisks of a sysfs without disks gave no error")
	}
}

func TestDiskOfResolvesPartitionsAndStackedDevices(t *testing.T) {
	sys := fakeSysfs(t)
	tests := []struct {
		dev  string
		want []string
	}{
		{"254:0", []string{"254:0"}}, // a disk is itself
		{"254:1", []string{"254:0"}}, // partition → its disk
		{"252:0", []string{"8:0"}},   // dm → the disk of its slave partition
		{"252:1", nil},               // dm on a loop device → nothing to limit
		{"7:0", nil},                 // loop
		{"253:0", nil},               // zram
		{"11:0", nil},                // empty drive
	}
	for _, tt := range tests {
		got, err := diskOf(sys, tt.dev)
		if err != nil || !slices.Equal(got, tt.want) {
			t.Errorf("diskOf(%s) = %v, %v; want %v", tt.dev, got, err, tt.want)
		}
	}
	if !blockStacked(sys, "252:0") || blockStacked(sys, "8:0") {
		t.Error("blockStacked: want dm-0 stacked and sda not")
	}
}

// --- fake v2 ---------------------------------------------------------------

func TestUnifiedTreeMovesServerToLeafAndEnablesControllers(t *testing.T) {
	sys, root := fakeUnified(t)
	tree, err := openCgroupTreeAt(sys, "")
	if err != nil {
		t.Fatal(err)
	}
	if tree.mode() != cgroupModeUnified {
		t.Errorf("mode = %s", tree.mode())
	}
	for file, want := range map[string]string{
		"svc/server/cgroup.procs":         "4242",
		"svc/cgroup.subtree_control":      "+cpu +memory +io +pids",
		"svc/jobs/cgroup.subtree_control": "+cpu +memory +io +pids",
	} {
		if got := readTestFile(t, filepath.Join(root, file)); got != want {
			t.Errorf("%s = %q, want %q", file, got, want)
		}
	}
}

func TestUnifiedTreeRestartedInsideServerLeafKeepsItsParent(t *testing.T) {
	sys, root := fakeUnified(t)
	if _, err := openCgroupTreeAt(sys, ""); err != nil {
		t.Fatal(err)
	}
	writeTestFile(t, filepath.Join(root, "svc/server/cgroup.procs"), "")
	sys.selfCgroup = "0::/svc/server\n"
	tree, err := openCgroupTreeAt(sys, "")
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(root, "svc/jobs/a"); tree.job("a").dirs[0].jobs != want {
		t.Errorf("job dir = %s, want %s", tree.job("a").dirs[0].jobs, want)
	}
	if got := readTestFile(t, filepath.Join(root, "svc/server/cgroup.procs")); got != "" {
		t.Errorf("server moved again: %q", got)
	}
}

func TestUnifiedTreeWithExplicitRootCreatesIt(t *testing.T) {
	sys, root := fakeUnified(t)
	tree, err := openCgroupTreeAt(sys, "worker.slice/w")
	if err != nil {
		t.Fatal(err)
	}
	if got := readTestFile(t, filepath.Join(root, "worker.slice/w/jobs/cgroup.subtree_control")); got != cgroupV2Controllers {
		t.Errorf("jobs subtree_control = %q", got)
	}
	if cgroupFileExists(filepath.Join(root, "worker.slice/w/server")) {
		t.Error("server moved into an explicit root it was not in")
	}
	if want := filepath.Join(root, "worker.slice/w/jobs/a"); tree.job("a").dirs[0].jobs != want {
		t.Errorf("job dir = %s, want %s", tree.job("a").dirs[0].jobs, want)
	}
}

func TestUnifiedTreeNamesMissingController(t *testing.T) {
	sys, root := fakeUnified(t)
	writeTestFile(t, filepath.Join(root, "svc/cgroup.controllers"), "cpu memory pids\n")
	_, err := openCgroupTreeAt(sys, "")
	if err == nil || !strings.Contains(err.Error(), "cgroup controller io not available") || !strings.Contains(err.Error(), "-no-limits") {
		t.Fatalf("err = %v, want it to name io and -no-limits", err)
	}
}

func TestUnifiedJobLimitsAreWrittenExactly(t *testing.T) {
	tests := []struct {
		name   string
		limits Limits
		skip   []string
		want   map[string]string
	}{
		{"all limits", Limits{CPU: 0.25, Memory: 64 << 20, IOBps: 2 << 20, Pids: 10}, nil, map[string]string{
			"cpu.max":          "25000 100000",
			"memory.max":       "67108864",
			"memory.swap.max":  "0",
			"memory.oom.group": "1",
			"io.max":           "8:0 rbps=2097152 wbps=2097152\n254:0 rbps=2097152 wbps=2097152\n",
			"pids.max":         "", "cgroup.subtree_control": "", // the pids limit is the init's to write (commandFiles)
		}},
		{"tiny cpu gets the kernel minimum", Limits{CPU: 0.001, Pids: 5}, nil, map[string]string{
			"cpu.max": "1000 100000", "memory.max": "", "io.max": "", "pids.max": "",
		}},
		{"two cores", Limits{CPU: 2, Pids: 5}, nil, map[string]string{"cpu.max": "200000 100000"}},
		{"zero limits are not written", Limits{Pids: 64}, nil, map[string]string{
			"cpu.max": "", "memory.max": "", "memory.swap.max": "", "memory.oom.group": "", "io.max": "", "command/pids.max": "",
		}},
		{"no swap accounting", Limits{Memory: 1 << 30, Pids: 1}, []string{"memory.swap.max"}, map[string]string{
			"memory.max": "1073741824", "memory.oom.group": "1",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sys, root := fakeUnified(t, tt.skip...)
			tree, err := openCgroupTreeAt(sys, "")
			if err != nil {
				t.Fatal(err)
			}
			j, err := tree.newJob("job1", tt.limits)
			if err != nil {
				t.Fatal(err)
			}
			for file, want := range tt.want {
				if got := readTestFile(t, filepath.Join(root, "svc/jobs/job1", file)); got != want {
					t.Errorf("%s = %q, want %q", file, got, want)
				}
			}
			if slices.Contains(tt.skip, "memory.swap.max") && cgroupFileExists(filepath.Join(root, "svc/jobs/job1/memory.swap.max")) {
				t.Error("memory.swap.max created")
			}
			if err := j.addProc(77); err != nil {
				t.Fatal(err)
			}
			if got := readTestFile(t, filepath.Join(root, "svc/jobs/job1/cgroup.procs")); got != "77" {
				t.Errorf("cgroup.procs = %q", got)
			}
			fd, err := j.openFD()
			if err != nil || fd < 0 {
				t.Fatalf("openFD = %d, %v", fd, err)
			}
			var st unix.Stat_t
			if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
				t.Errorf("openFD fd is not the job dir: %v", err)
			}
			unix.Close(fd)
		})
	}
}

func TestNewJobRefusesBadIDsAndLimitsAndExistingDirs(t *testing.T) {
	sys, root := fakeUnified(t)
	tree, err := openCgroupTreeAt(sys, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"", ".", "..", "a/b", "../svc"} {
		if _, err := tree.newJob(id, Limits{Pids: 1}); err == nil {
			t.Errorf("newJob(%q) gave no error", id)
		}
		if j := tree.job(id); len(j.dirs) != 0 || j.kill() != nil || j.remove() != nil {
			t.Errorf("job(%q) touches directories %v", id, j.dirs)
		}
	}
	for _, l := range []Limits{{CPU: -1}, {Memory: -1}, {IOBps: -1}, {Pids: -1}, {CPU: nan()}} {
		if _, err := tree.newJob("x", l); err == nil {
			t.Errorf("newJob with %+v gave no error", l)
		}
	}
	if _, err := tree.newJob("dup", Limits{Pids: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := tree.newJob("dup", Limits{Pids: 1}); !errors.Is(err, fs.ErrExist) {
		t.Errorf("second newJob(dup) = %v, want ErrExist", err)
	}
	if cgroupFileExists(filepath.Join(root, "svc/jobs/x")) {
		t.Error("refused job left a directory")
	}
}

func nan() float64 { z := 0.0; return z / z }

func TestUnifiedUsageAndOOMComeFromCounters(t *testing.T) {
	sys, root := fakeUnified(t)
	tree, err := openCgroupTreeAt(sys, "")
	if err != nil {
		t.Fatal(err)
	}
	j, err := tree.newJob("job1", Limits{Pids: 1})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "svc/jobs/job1")
	writeTestFile(t, filepath.Join(dir, "cpu.stat"), "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
	writeTestFile(t, filepath.Join(dir, "memory.peak"), "33554432\n")
	// dm-0 (252:0) sits on sda: its bytes are counted again on 8:0.
	writeTestFile(t, filepath.Join(dir, "io.stat"), "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n"+
		"252:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n254:0 rbytes=100 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n")
	want := Usage{CPUSeconds: 2.5, MemoryPeakBytes: 32 << 20, IOReadBytes: 4196, IOWriteBytes: 8192}
	if got := j.usage(); got != want {
		t.Errorf("usage = %+v, want %+v", got, want)
	}
	for events, want := range map[string]bool{
		"low 0\nhigh 0\nmax 3\noom 0\noom_kill 0\noom_group_kill 0\n": false,
		"low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n": true,
		"low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\noom_group_kill 1\n": true,
		"": false,
	} {
		writeTestFile(t, filepath.Join(dir, "memory.events"), events)
		if got := j.oomKilled(); got != want {
			t.Errorf("oomKilled with %q = %v, want %v", events, got, want)
		}
	}
}

func TestUnifiedUsageWithoutPeakReportsHighestSeen(t *testing.T) {
	sys, root := fakeUnified(t, "memory.peak")
	tree, err := openCgroupTreeAt(sys, "")
	if err != nil {
		t.Fatal(err)
	}
	j, err := tree.newJob("job1", Limits{Pids: 1})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		current string
		want    int64
	}{{"1000", 1000}, {"5000", 5000}, {"2000", 5000}} {
		writeTestFile(t, filepath.Join(root, "svc/jobs/job1/memory.current"), tc.current+"\n")
		if got := j.usage().MemoryPeakBytes; got != tc.want {
			t.Errorf("memory.current %s: peak = %d, want %d", tc.current, got, tc.want)
		}
	}
}

// --- fake v1 ---------------------------------------------------------------

func TestLegacyTreeUsesOwnPathInEachHierarchy(t *testing.T) {
	tests := []struct {
		name   string
		mounts []string
		hybrid bool
		mode   string
		dirs   []string
	}{
		{"separate cpu and cpuacct, hybrid", hostLikeV1Mounts, true, cgroupModeHybrid, []string{
			"cpu/worker-jobs/j", "cpuacct/worker-jobs/j", "memory/process_api/x/worker-jobs/j",
			"blkio/worker-jobs/j", "pids/worker-jobs/j", "freezer/worker-jobs/j",
		}},
		{"co-mounted cpu,cpuacct, legacy", []string{"cpu,cpuacct", "memory", "blkio", "pids", "freezer"}, false, cgroupModeLegacy, []string{
			"cpu,cpuacct/worker-jobs/j", "memory/process_api/x/worker-jobs/j",
			"blkio/worker-jobs/j", "pids/worker-jobs/j", "freezer/worker-jobs/j",
		}},
		{"no freezer, no cpuacct", []string{"cpu", "memory", "blkio", "pids"}, false, cgroupModeLegacy, []string{
			"cpu/worker-jobs/j", "memory/process_api/x/worker-jobs/j", "blkio/worker-jobs/j", "pids/worker-jobs/j",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sys, root := fakeLegacy(t, tt.mounts, tt.hybrid)
			tree, err := openCgroupTreeAt(sys, "")
			if err != nil {
				t.Fatal(err)
			}
			if tree.mode() != tt.mode {
				t.Errorf("mode = %s, want %s", tree.mode(), tt.mode)
			}
			if _, err := tree.newJob("j", Limits{Pids: 1}); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, d := range tree.job("j").dirs {
				rel, _ := filepath.Rel(root, d.jobs)
				got = append(got, rel)
				if !cgroupFileExists(d.jobs) {
					t.Errorf("%s not created", d.jobs)
				}
			}
			if !slices.Equal(got, tt.dirs) {
				t.Errorf("job dirs = %v, want %v", got, tt.dirs)
			}
			if cgroupFileExists(filepath.Join(root, "memory/worker-jobs")) {
				t.Error("created a cgroup outside the server's own memory cgroup")
			}
			fd, err := tree.job("j").openFD()
			if fd != -1 || err != nil {
				t.Errorf("openFD on v1 = %d, %v; want -1, nil", fd, err)
			}
		})
	}
}

func TestLegacyTreeWithExplicitRootUsesItInEveryHierarchy(t *testing.T) {
	sys, root := fakeLegacy(t, hostLikeV1Mounts, true)
	tree, err := openCgroupTreeAt(sys, "/worker")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range tree.job("j").dirs {
		rel, _ := filepath.Rel(root, d.jobs)
		if _, rest, _ := strings.Cut(rel, "/"); rest != "worker/worker-jobs/j" {
			t.Errorf("job dir %s, want <hierarchy>/worker/worker-jobs/j", rel)
		}
		if d.rel != "/worker/worker-jobs/j" {
			t.Errorf("job cgroup path %s", d.rel)
		}
	}
}

func TestLegacyTreeNamesMissingController(t *testing.T) {
	sys, _ := fakeLegacy(t, []string{"cpu", "cpuacct", "blkio", "pids"}, true)
	_, err := openCgroupTreeAt(sys, "")
	if err == nil || !strings.Contains(err.Error(), "cgroup controller memory not available") || !strings.Contains(err.Error(), "-no-limits") {
		t.Fatalf("err = %v, want it to name memory and -no-limits", err)
	}
}

func TestLegacyJobLimitsAreWrittenExactly(t *testing.T) {
	tests := []struct {
		name   string
		limits Limits
		skip   []string
		want   map[string]string
	}{
		{"all limits", Limits{CPU: 0.25, Memory: 64 << 20, IOBps: 2 << 20, Pids: 10}, nil, map[string]string{
			"cpu/worker-jobs/j/cpu.cfs_period_us":                            "100000",
			"cpu/worker-jobs/j/cpu.cfs_quota_us":                             "25000",
			"memory/process_api/x/worker-jobs/j/memory.limit_in_bytes":       "67108864",
			"memory/process_api/x/worker-jobs/j/memory.memsw.limit_in_bytes": "67108864",
			"memory/process_api/x/worker-jobs/j/memory.swappiness":           "",
			"blkio/worker-jobs/j/blkio.throttle.read_bps_device":             "8:0 2097152\n254:0 2097152\n",
			"blkio/worker-jobs/j/blkio.throttle.write_bps_device":            "8:0 2097152\n254:0 2097152\n",
			"pids/worker-jobs/j/command/pids.max":                            "11", // limit+1 until the init lowers it (commandFiles)
			"pids/worker-jobs/j/pids.max":                                    "",
		}},
		{"no swap accounting", Limits{Memory: 32 << 20, Pids: 3}, []string{"memory.memsw.limit_in_bytes"}, map[string]string{
			"memory/process_api/x/worker-jobs/j/memory.limit_in_bytes": "33554432",
			"memory/process_api/x/worker-jobs/j/memory.swappiness":     "0",
		}},
		{"zero limits are not written", Limits{Pids: 64}, nil, map[string]string{
			"cpu/worker-jobs/j/cpu.cfs_period_us":                      "",
			"cpu/worker-jobs/j/cpu.cfs_quota_us":                       "",
			"memory/process_api/x/worker-jobs/j/memory.limit_in_bytes": "",
			"blkio/worker-jobs/j/blkio.throttle.read_bps_device":       "",
			"pids/worker-jobs/j/command/pids.max":                      "65",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sys, root := fakeLegacy(t, hostLikeV1Mounts, true, tt.skip...)
			tree, err := openCgroupTreeAt(sys, "")
			if err != nil {
				t.Fatal(err)
			}
			j, err := tree.newJob("j", tt.limits)
			if err != nil {
				t.Fatal(err)
			}
			for file, want := range tt.want {
				if got := readTestFile(t, filepath.Join(root, file)); got != want {
					t.Errorf("%s = %q, want %q", file, got, want)
				}
			}
			if err := j.addProc(77); err != nil {
				t.Fatal(err)
			}
			for _, d := range j.dirs {
				if got := readTestFile(t, filepath.Join(d.jobs, "cgroup.procs")); got != "77" {
					t.Errorf("%s/cgroup.procs = %q", d.jobs, got)
				}
			}
		})
	}
}

func TestLegacyUsageAndOOMComeFromCounters(t *testing.T) {
	sys, root := fakeLegacy(t, hostLikeV1Mounts, true)
	tree, err := openCgroupTreeAt(sys, "")
	if err != nil {
		t.Fatal(err)
	}
	j, err := tree.newJob("j", Limits{Pids: 1})
	if err != nil {
		t.Fatal(err)
	}
	writeTestFile(t, filepath.Join(root, "cpuacct/worker-jobs/j/cpuacct.usage"), "1500000000\n")
	writeTestFile(t, filepath.Join(root, "memory/process_api/x/worker-jobs/j/memory.max_usage_in_bytes"), "1048576\n")
	writeTestFile(t, filepath.Join(root, "blkio/worker-jobs/j/blkio.throttle.io_service_bytes"),
		"254:0 Read 6291456\n254:0 Write 4096\n254:0 Sync 6295552\n254:0 Async 0\n254:0 Discard 0\n254:0 Total 6295552\n"+
			"252:0 Read 999\n252:0 Write 999\n252:0 Total 1998\nTotal 6297550\n")
	want := Usage{CPUSeconds: 1.5, MemoryPeakBytes: 1 << 20, IOReadBytes: 6 << 20, IOWriteBytes: 4096}
	if got := j.usage(); got != want {
		t.Errorf("usage = %+v, want %+v", got, want)
	}
	oom := filepath.Join(root, "memory/process_api/x/worker-jobs/j/memory.oom_control")
	for content, want := range map[string]bool{
		"oom_kill_disable 0\nunder_oom 0\noom_kill 0\n": false,
		"oom_kill_disable 0\nunder_oom 0\noom_kill 2\n": true,
		"oom_kill_disable 0\nunder_oom 1\n":             false, // old kernel: no counter, no guess
	} {
		writeTestFile(t, oom, content)
		if got := j.oomKilled(); got != want {
			t.Errorf("oomKilled with %q = %v, want %v", content, got, want)
		}
	}
}

// --- real cgroups on this host ---------------------------------------------

// ownCgroupDirs lists the host directories of this process's own cgroups in
// the hierarchies the tree uses.
func ownCgroupDirs() ([]string, error) {
	sys, err := liveCgroupSystem()
	if err != nil {
		return nil, err
	}
	mode, err := detectCgroupMode(sys.mountPoint, sys.statfs)
	if err != nil {
		return nil, err
	}
	self := parseProcCgroup(sys.selfCgroup)
	mounts := parseCgroupMounts(sys.mountinfo)
	var dirs []string
	for _, m := range mounts {
		var own string
		var ok bool
		switch {
		case mode == cgroupModeUnified && m.fstype == "cgroup2" && m.point == sys.mountPoint:
			own, ok = self[""]
		case mode != cgroupModeUnified && m.fstype == "cgroup":
			for _, c := range cgroupV1Controllers {
				if slices.Contains(m.options, c.name) {
					own, ok = self[c.name]
				}
			}
		}
		if !ok {
			continue
		}
		if d, err := m.dir(own); err == nil && !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
		}
	}
	return dirs, nil
}

func listOwnCgroups(t *testing.T) map[string][]string {
	t.Helper()
	dirs, err := ownCgroupDirs()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for _, d := range dirs {
		out[d] = subdirs(d)
	}
	return out
}

func subdirs(dir string) []string {
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		if e.IsDir() {
			names = append(names, e.Name())
		}
	}
	return names
}

// checkNoCgroupLeak removes this test process's (empty) jobs directories and
// compares the listings of its own cgroups with those taken before the test.
// Other new entries are only reported: a real server may share the host.
func checkNoCgroupLeak(before map[string][]string) error {
	var errs []error
	for dir, names := range before {
		jobs := filepath.Join(dir, cgroupTestJobs)
		if left := subdirs(jobs); len(left) > 0 {
			errs = append(errs, fmt.Errorf("%s still has job cgroups %v", jobs, left))
		}
		if err := rmdirRetry(jobs); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", jobs, err))
		}
		for _, n := range subdirs(dir) {
			if slices.Contains(names, n) {
				continue
			}
			if n == cgroupTestJobs {
				errs = append(errs, fmt.Errorf("%s left behind", filepath.Join(dir, n)))
			} else {
				fmt.Fprintf(os.Stderr, "note: %s appeared during the test (not created by it)\n", filepath.Join(dir, n))
			}
		}
	}
	return errors.Join(errs...)
}

func realTree(t *testing.T) *cgroupTree {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root: this test creates real cgroups")
	}
	// Registered first, so it runs after the jobs' own cleanups.
	before := listOwnCgroups(t)
	t.Cleanup(func() {
		if err := checkNoCgroupLeak(before); err != nil {
			t.Errorf("cgroup leak: %v", err)
		}
	})
	sys, err := liveCgroupSystem()
	if err != nil {
		t.Fatal(err)
	}
	sys.jobsName = cgroupTestJobs
	tree, err := openCgroupTreeAt(sys, "")
	if err != nil {
		t.Fatal(err)
	}
	return tree
}

// newRealJob creates a job cgroup that is killed and removed at the end of
// the test, and checks that nothing of it is left.
func newRealJob(t *testing.T, tree *cgroupTree, id string, l Limits) *jobCgroup {
	t.Helper()
	j, err := tree.newJob(id, l)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := j.kill(); err != nil {
			t.Errorf("cleanup kill: %v", err)
		}
		if err := j.remove(); err != nil {
			t.Errorf("cleanup remove: %v", err)
		}
		for _, d := range j.dirs {
			if cgroupFileExists(d.jobs) {
				t.Errorf("%s left behind", d.jobs)
			}
		}
	})
	return j
}

// startInJob starts cmd blocked on its stdin, puts it in j, and returns the
// function that lets it go: no instruction of the job runs outside its cgroup.
func startInJob(t *testing.T, j *jobCgroup, cmd *exec.Cmd) (release func()) {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdin = pr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pr.Close()
	t.Cleanup(func() {
		pw.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	if err := j.addProc(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	return func() {
		if _, err := pw.Write([]byte("\n")); err != nil {
			t.Fatal(err)
		}
	}
}

func helperCmd(mode string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^TestCgroupHelperProcess$")
	// One P and no GC: the helper needs no new thread under a pids limit.
	cmd.Env = append(os.Environ(), cgroupHelperEnv+"="+mode, "GOMAXPROCS=1", "GOGC=off")
	cmd.Stderr = os.Stderr
	return cmd
}

func killedBy(err error) (syscall.Signal, bool) {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return 0, false
	}
	ws := ee.Sys().(syscall.WaitStatus)
	return ws.Signal(), ws.Signaled()
}

func TestMemoryLimitOOMKillsAndIsReported(t *testing.T) {
	tree := realTree(t)
	j := newRealJob(t, tree, "memory", Limits{Memory: 32 << 20, Pids: 64})
	cmd := helperCmd("alloc")
	var out strings.Builder
	cmd.Stdout = &out
	startInJob(t, j, cmd)()
	err := cmd.Wait()
	if sig, ok := killedBy(err); !ok || sig != syscall.SIGKILL {
		t.Fatalf("300 MB under 32M: wait = %v, output %q; want SIGKILL", err, out.String())
	}
	if !j.oomKilled() {
		t.Error("oomKilled = false after an OOM kill")
	}
	u := j.usage()
	// The high-water mark may pass the limit by the charge in flight when
	// the OOM killer ran (seen: one page).
	if u.MemoryPeakBytes < 16<<20 || u.MemoryPeakBytes > 33<<20 {
		t.Errorf("memory peak = %d, want about 32M", u.MemoryPeakBytes)
	}
	t.Logf("OOM-killed; memory peak %d bytes (%.1f MiB)", u.MemoryPeakBytes, float64(u.MemoryPeakBytes)/(1<<20))
}

func TestCPULimitThrottlesBusyLoop(t *testing.T) {
	tree := realTree(t)
	j := newRealJob(t, tree, "cpu", Limits{CPU: 0.2, Pids: 64})
	cmd := helperCmd("spin")
	startInJob(t, j, cmd)()
	start := time.Now()
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	u := j.usage()
	t.Logf("3 s busy loop under 0.2 cores: %.3f cpu-seconds in %.2f s", u.CPUSeconds, time.Since(start).Seconds())
	if u.CPUSeconds < 0.2 || u.CPUSeconds > 1.0 {
		t.Errorf("cpu = %.3f s, want 0.2-1.0", u.CPUSeconds)
	}
	if j.oomKilled() {
		t.Error("oomKilled = true without a memory limit")
	}
}

func TestPidsLimitRefusesForksBeyondIt(t *testing.T) {
	tree := realTree(t)
	j := newRealJob(t, tree, "pids", Limits{Pids: 10})
	cmd := helperCmd("forker")
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer outR.Close()
	cmd.Stdout = outW
	release := startInJob(t, j, cmd)
	// As the job's init does for its command: into <id>/command, which
	// carries the pids limit, lowered from limit+1 to the limit.
	files, err := j.commandFiles()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		defer f.Close()
	}
	if _, err := files[1].WriteString("10"); err != nil {
		t.Fatal(err)
	}
	if err := writeCgroupFile(filepath.Join(j.dir("pids"), commandCgroup, "cgroup.procs"), strconv.Itoa(cmd.Process.Pid)); err != nil {
		t.Fatal(err)
	}
	release()
	outW.Close()
	outR.SetReadDeadline(time.Now().Add(20 * time.Second))
	line, err := bufio.NewReader(outR).ReadString('\n')
	if err != nil {
		t.Fatalf("helper output: %v", err)
	}
	var started, eagain, other int
	if _, err := fmt.Sscanf(line, "started=%d eagain=%d other=%d", &started, &eagain, &other); err != nil {
		t.Fatalf("helper said %q: %v", line, err)
	}
	pidsDir := filepath.Join(j.dir("pids"), commandCgroup)
	current, _ := readCgroupInt(filepath.Join(pidsDir, "pids.current"))
	peak, peakErr := readCgroupInt(filepath.Join(pidsDir, "pids.peak"))
	refused, _ := flatKeyed(filepath.Join(pidsDir, "pids.events"), "max")
	t.Logf("40 forks under pids 10: %d started, %d EAGAIN, %d other; pids.current %d, pids.peak %d (%v), pids.events max %d",
		started, eagain, other, current, peak, peakErr, refused)
	if eagain < 25 || other != 0 || started+eagain != 40 {
		t.Errorf("want most forks refused with EAGAIN and no other error")
	}
	if current > 10 || (peakErr == nil && peak > 10) {
		t.Errorf("tasks exceeded 10: current %d, peak %d", current, peak)
	}
	if len(j.procs()) < started {
		t.Errorf("job has %d processes, want the helper and its %d children", len(j.procs()), started)
	}
	if err := j.kill(); err != nil {
		t.Fatal(err)
	}
	if left := j.procs(); len(left) != 0 {
		t.Fatalf("after kill: %v", left)
	}
	if sig, ok := killedBy(cmd.Wait()); !ok || sig != syscall.SIGKILL {
		t.Errorf("helper not SIGKILLed")
	}
}

// diskBackedDir returns a directory on a disk the io limit applies to (not
// tmpfs), where O_DIRECT reads reach the disk.
func diskBackedDir(t *testing.T) string {
	t.Helper()
	disks, err := blockDisks("/sys")
	if err != nil {
		t.Fatal(err)
	}
	for _, cand := range []string{t.TempDir(), "/var/tmp"} {
		var st unix.Stat_t
		if err := unix.Stat(cand, &st); err != nil {
			continue
		}
		under, _ := diskOf("/sys", fmt.Sprintf("%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev)))
		if len(under) > 0 && slices.Contains(disks, under[0]) {
			if cand == "/var/tmp" {
				d, err := os.MkdirTemp(cand, "worker-io-test-")
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { os.RemoveAll(d) })
				return d
			}
			return cand
		}
	}
	t.Fatalf("no temp directory on one of the disks %v", disks)
	return ""
}

func TestIOLimitThrottlesDirectReads(t *testing.T) {
	tree := realTree(t)
	file := filepath.Join(diskBackedDir(t), "6M")
	f, err := os.Create(file)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(make([]byte, 6<<20)); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	read := func(id string, l Limits) (time.Duration, Usage) {
		j := newRealJob(t, tree, id, l)
		cmd := exec.Command("sh", "-c", `read x; exec dd if="$1" of=/dev/null bs=1M iflag=direct status=none`, "sh", file)
		cmd.Stderr = os.Stderr
		release := startInJob(t, j, cmd)
		start := time.Now()
		release()
		if err := cmd.Wait(); err != nil {
			t.Fatalf("dd: %v", err)
		}
		return time.Since(start), j.usage()
	}
	limited, u := read("io-limited", Limits{IOBps: 2 << 20, Pids: 64})
	free, _ := read("io-free", Limits{Pids: 64})
	t.Logf("6 MiB O_DIRECT read: %.2f s under 2 MiB/s (io_read_bytes %d), %.3f s unlimited", limited.Seconds(), u.IOReadBytes, free.Seconds())
	if limited < 2500*time.Millisecond {
		t.Errorf("limited read took %s, want >= 2.5 s", limited)
	}
	if free > limited/2 {
		t.Errorf("unlimited read took %s, not much faster than %s", free, limited)
	}
	if u.IOReadBytes < 6<<20 {
		t.Errorf("io_read_bytes = %d, want >= 6 MiB", u.IOReadBytes)
	}
}

func TestKillLeavesNoProcessAndRemoveNoDirectory(t *testing.T) {
	tree := realTree(t)
	j, err := tree.newJob("kill", Limits{Pids: 64})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.kill(); j.remove() })
	// A process ignoring SIGTERM, a double-forked orphan, and the shell.
	cmd := exec.Command("sh", "-c", `read x; sh -c 'trap "" TERM; sleep 300' & sh -c 'sleep 300 &'; sleep 300`)
	startInJob(t, j, cmd)()
	var pids []int
	for deadline := time.Now().Add(5 * time.Second); len(pids) < 5 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		pids = j.procs()
	}
	if len(pids) < 5 {
		t.Fatalf("job has processes %v, want 5", pids)
	}
	start := time.Now()
	if err := j.kill(); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed %d processes in %s", len(pids), time.Since(start))
	if left := j.procs(); len(left) != 0 {
		t.Fatalf("after kill: %v", left)
	}
	if sig, ok := killedBy(cmd.Wait()); !ok || sig != syscall.SIGKILL {
		t.Errorf("shell not SIGKILLed")
	}
	for _, pid := range pids {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			if _, rest, _ := strings.Cut(string(b), ") "); !strings.HasPrefix(rest, "Z") {
				t.Errorf("process %d still alive: %s", pid, b)
			}
		}
	}
	if err := j.remove(); err != nil {
		t.Fatal(err)
	}
	for _, d := range j.dirs {
		if cgroupFileExists(d.jobs) {
			t.Errorf("%s left behind", d.jobs)
		}
	}
	if err := j.kill(); err != nil {
		t.Errorf("kill of a removed job: %v", err)
	}
	if err := j.remove(); err != nil {
		t.Errorf("second remove: %v", err)
	}
}

func TestRemoveStaleKillsAndRemovesDeadJobsOnly(t *testing.T) {
	tree := realTree(t)
	live := newRealJob(t, tree, "live", Limits{Pids: 8})
	stale, err := tree.newJob("stale", Limits{Pids: 8})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stale.kill(); stale.remove() })
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if err := stale.addProc(cmd.Process.Pid); err != nil {
		t.Fatal(err)
	}
	// A restarted server knows its jobs by id only.
	if err := tree.removeStale(func(id string) bool { return id == "live" }); err != nil {
		t.Fatal(err)
	}
	if sig, ok := killedBy(cmd.Wait()); !ok || sig != syscall.SIGKILL {
		t.Errorf("stale job's process not SIGKILLed")
	}
	for _, d := range tree.job("stale").dirs {
		if cgroupFileExists(d.jobs) {
			t.Errorf("stale %s left behind", d.jobs)
		}
	}
	for _, d := range live.dirs {
		if !cgroupFileExists(d.jobs) {
			t.Errorf("live %s removed", d.jobs)
		}
	}
}

func TestRealTreeStaysUnderOwnCgroups(t *testing.T) {
	tree := realTree(t)
	own, err := ownCgroupDirs()
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range tree.hier {
		if !slices.Contains(own, filepath.Dir(h.jobs)) {
			t.Errorf("jobs dir %s is not directly under one of the process's cgroups %v", h.jobs, own)
		}
		b, err := os.ReadFile("/proc/self/cgroup")
		if err != nil {
			t.Fatal(err)
		}
		key := ""
		if h.controllers != nil {
			key = h.controllers[0]
		}
		if want := path.Join(parseProcCgroup(string(b))[key], cgroupTestJobs); tree.kind != cgroupModeUnified && h.rel != want {
			t.Errorf("jobs cgroup path %s, want %s", h.rel, want)
		}
	}
	t.Logf("mode %s; job dirs under %d hierarchies", tree.mode(), len(tree.hier))
}

func TestKillStopsForkBomb(t *testing.T) {
	tree := realTree(t)
	j := newRealJob(t, tree, "forkbomb", Limits{CPU: 0.5, Pids: 64})
	// Every process forks for ever, retrying the forks the pids limit refuses.
	cmd := exec.Command("sh", "-c", `read x; exec perl -e 'while (1) { fork }'`)
	startInJob(t, j, cmd)()
	var n int
	for deadline := time.Now().Add(5 * time.Second); n < 60 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		n = len(j.procs())
	}
	start := time.Now()
	if err := j.kill(); err != nil {
		t.Fatal(err)
	}
	t.Logf("fork bomb at %d processes killed in %s", n, time.Since(start))
	if left := j.procs(); len(left) != 0 {
		t.Fatalf("after kill: %v", left)
	}
}

// forkSleepers starts n `sleep secs` processes, counting the forks the pids
// limit refuses (EAGAIN) apart from other failures, and prints the counts as
// "started=N eagain=N other=N".
func forkSleepers(n int, secs string) {
	started, eagain, other := 0, 0, 0
	for range n {
		_, err := syscall.ForkExec("/bin/sleep", []string{"sleep", secs}, &syscall.ProcAttr{})
		switch {
		case err == nil:
			started++
		case errors.Is(err, syscall.EAGAIN):
			eagain++
		default:
			other++
			fmt.Fprintln(os.Stderr, "fork:", err)
		}
	}
	fmt.Printf("started=%d eagain=%d other=%d\n", started, eagain, other)
}

// diskOf returns the whole disks under block device "MAJ:MIN": itself if it
// is one, its disk if it is a partition, the disks under it if stacked.
func diskOf(sysfs, dev string) ([]string, error) {
	return deviceDisks(filepath.Join(sysfs, "dev", "block", dev), 0)
}
