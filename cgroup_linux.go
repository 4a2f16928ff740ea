// cgroup_linux.go: job resource limits, on cgroup v2 (unified) and on v1
// (legacy, or hybrid with an empty v2 mount beside it).
//
// The server owns one subtree of the hierarchy, a cgroupTree: its own cgroup,
// or the -cgroup-root it was given. It never creates, moves or writes cgroups
// outside that subtree. Invariants:
//   - v2: the server itself lives in the leaf <own>/server, because a cgroup
//     with processes in it cannot enable controllers for its children
//     (Documentation/admin-guide/cgroup-v2.rst, "no internal process
//     constraint"); job cgroups are <own>/jobs/<id>.
//   - v1: job cgroups are <own path in that hierarchy>/worker-jobs/<id> in
//     each hierarchy used (cpu, cpuacct, memory, blkio, pids, freezer).
//   - a job's command, and everything it starts, lives in the sub-cgroup
//     <id>/command, which carries the pids limit; the job's init stays out of
//     it, so -pids counts the job's tasks and never the init's threads. The
//     other limits are on <id> and cover the init too. v1: the init stays in
//     <id>. v2: the init is born in <id>, roots its cgroup namespace there,
//     then moves to <id>/init and enables pids for <id>'s children itself
//     (no process may stay in <id> once it does), so its namespace contains
//     its command's cgroup (see commandFiles).
//   - a job cgroup has its limits written before any process enters it, and is
//     removed only once no process is left in it.
package main

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

const (
	cgroupMountPoint = "/sys/fs/cgroup"
	cgroupCPUPeriod  = 100000 // µs; the kernel default CFS period
	cgroupMinQuota   = 1000   // µs; the kernel refuses a smaller cpu quota
	cgroupKillWait   = 5 * time.Second
	cgroupFreezeWait = time.Second
	cgroupRemoveWait = 2 * time.Second

	cgroupModeUnified = "unified"
	cgroupModeHybrid  = "hybrid"
	cgroupModeLegacy  = "legacy"
)

// Sub-cgroups of a job: see the invariants above.
const (
	commandCgroup = "command"
	initCgroup    = "init" // v2 only
)

// cgroupV2Controllers are enabled for the jobs, in this order.
const cgroupV2Controllers = "+cpu +memory +io +pids"

// cgroupV1Controllers are the v1 hierarchies a job is put in. cpuacct only
// gives usage and the freezer only makes kill race-free, so either may be
// missing; the others enforce limits and must exist.
var cgroupV1Controllers = []struct {
	name     string
	required bool
}{
	{"cpu", true}, {"cpuacct", false}, {"memory", true},
	{"blkio", true}, {"pids", true}, {"freezer", false},
}

// cgroupSystem is what openCgroupTreeAt reads from the host; tests point it
// at a fake tree.
type cgroupSystem struct {
	mountPoint string                           // /sys/fs/cgroup
	statfs     func(path string) (int64, error) // filesystem magic of path
	selfCgroup string                           // content of /proc/self/cgroup
	mountinfo  string                           // content of /proc/self/mountinfo
	pid        int                              // the server, moved into <own>/server on v2
	sysfs      string                           // /sys, for the block devices
	mkdir      func(path string) error          // os.Mkdir; the kernel fills the new dir with interface files
	jobsName   string                           // dir holding job cgroups; "" = "jobs" (v2), "worker-jobs" (v1)
}

// cgroupTree is the part of the cgroup hierarchy this server owns. One per
// server; it does not change after openCgroupTree, so it is safe to share.
type cgroupTree struct {
	kind  string
	sysfs string
	mkdir func(string) error
	hier  []cgroupHierarchy // v2: exactly one
}

// cgroupHierarchy is one mounted hierarchy as the tree uses it.
type cgroupHierarchy struct {
	controllers []string // v1 controllers of interest mounted here; nil on v2
	jobs        string   // host path of the directory holding job cgroups
	rel         string   // the same directory as /proc/<pid>/cgroup names it
}

// jobCgroup is one job's cgroup: one directory on v2, one per hierarchy on v1.
type jobCgroup struct {
	id      string
	unified bool
	sysfs   string
	dirs    []cgroupHierarchy // jobs = the job's directory, rel = its cgroup path
	memSeen atomic.Int64      // v2 without memory.peak: highest memory.current read
}

// openCgroupTree opens the subtree this server owns: with root "", the
// server's own cgroup (per hierarchy on v1); otherwise root, a path relative
// to the cgroup mount (the -cgroup-root flag).
func openCgroupTree(root string) (*cgroupTree, error) {
	sys, err := liveCgroupSystem()
	if err != nil {
		return nil, err
	}
	return openCgroupTreeAt(sys, root)
}

// liveCgroupSystem describes this host and process.
func liveCgroupSystem() (cgroupSystem, error) {
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return cgroupSystem{}, fmt.Errorf("read own cgroup: %w; run with -no-limits to run jobs unlimited", err)
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return cgroupSystem{}, fmt.Errorf("read mounts: %w", err)
	}
	return cgroupSystem{
		mountPoint: cgroupMountPoint,
		statfs:     statfsMagic,
		selfCgroup: string(self),
		mountinfo:  string(mounts),
		pid:        os.Getpid(),
		sysfs:      "/sys",
		mkdir:      func(p string) error { return os.Mkdir(p, 0o755) },
	}, nil
}

func statfsMagic(p string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		return 0, err
	}
	return int64(st.Type), nil
}

// detectCgroupMode tells unified (cgroup2 on the mount point), hybrid (cgroup2
// on <mount point>/unified, v1 controllers beside it) and legacy apart.
func detectCgroupMode(mountPoint string, statfs func(string) (int64, error)) (string, error) {
	magic, err := statfs(mountPoint)
	if err != nil {
		return "", fmt.Errorf("statfs %s: %w; mount cgroupfs or run with -no-limits to run jobs unlimited", mountPoint, err)
	}
	if magic == unix.CGROUP2_SUPER_MAGIC {
		return cgroupModeUnified, nil
	}
	if magic, err := statfs(filepath.Join(mountPoint, "unified")); err == nil && magic == unix.CGROUP2_SUPER_MAGIC {
		return cgroupModeHybrid, nil
	}
	return cgroupModeLegacy, nil
}

func openCgroupTreeAt(sys cgroupSystem, root string) (*cgroupTree, error) {
	kind, err := detectCgroupMode(sys.mountPoint, sys.statfs)
	if err != nil {
		return nil, err
	}
	t := &cgroupTree{kind: kind, sysfs: sys.sysfs, mkdir: sys.mkdir}
	self := parseProcCgroup(sys.selfCgroup)
	mounts := parseCgroupMounts(sys.mountinfo)
	if kind == cgroupModeUnified {
		err = t.openUnified(sys, root, self, mounts)
	} else {
		err = t.openLegacy(sys, root, self, mounts)
	}
	if err != nil {
		return nil, err
	}
	return t, nil
}

func (t *cgroupTree) openUnified(sys cgroupSystem, root string, self map[string]string, mounts []cgroupMount) error {
	m := cgroupMount{point: sys.mountPoint, root: "/"}
	for _, mm := range mounts {
		if mm.fstype == "cgroup2" && mm.point == sys.mountPoint {
			m = mm
			break
		}
	}
	jobsName := cmp.Or(sys.jobsName, "jobs")
	own, ok := self[""]
	if !ok {
		return errors.New("no cgroup v2 entry (0::) in /proc/self/cgroup; run with -no-limits to run jobs unlimited")
	}
	baseRel := own
	if root != "" {
		baseRel = path.Join(m.root, path.Clean("/"+root))
	} else if path.Base(own) == "server" {
		// A server restarted by hand from inside the leaf of an earlier one
		// owns the same tree: the parent, which holds the jobs.
		if parent, err := m.dir(path.Dir(own)); err == nil && cgroupFileExists(filepath.Join(parent, jobsName, "cgroup.procs")) {
			baseRel = path.Dir(own)
		}
	}
	base, err := m.dir(baseRel)
	if err != nil {
		return fmt.Errorf("%w; run with -no-limits to run jobs unlimited", err)
	}
	if root != "" {
		if err := mkdirUnder(sys.mkdir, m.point, base); err != nil {
			return err
		}
	}
	have, err := os.ReadFile(filepath.Join(base, "cgroup.controllers"))
	if err != nil {
		return fmt.Errorf("read controllers of %s: %w; run with -no-limits to run jobs unlimited", base, err)
	}
	for _, c := range []string{"cpu", "memory", "io", "pids"} {
		if !slices.Contains(strings.Fields(string(have)), c) {
			return fmt.Errorf("cgroup controller %s not available: not in %s (has %q); enable it in the parent's cgroup.subtree_control (systemd: Delegate=yes) or run with -no-limits to run jobs unlimited",
				c, filepath.Join(base, "cgroup.controllers"), strings.TrimSpace(string(have)))
		}
	}
	if own == baseRel {
		leaf := filepath.Join(base, "server")
		if err := sys.mkdir(leaf); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("create server cgroup %s: %w", leaf, err)
		}
		if err := writeCgroupFile(filepath.Join(leaf, "cgroup.procs"), strconv.Itoa(sys.pid)); err != nil {
			return fmt.Errorf("move the server into its leaf cgroup: %w", err)
		}
	}
	if err := writeCgroupFile(filepath.Join(base, "cgroup.subtree_control"), cgroupV2Controllers); err != nil {
		if errors.Is(err, unix.EBUSY) {
			procs, _ := os.ReadFile(filepath.Join(base, "cgroup.procs"))
			return fmt.Errorf("%w: other processes (%s) are in %s; run the server alone in its cgroup (systemd: Delegate=yes) or give it -cgroup-root",
				err, strings.Join(strings.Fields(string(procs)), " "), base)
		}
		return fmt.Errorf("enable controllers: %w", err)
	}
	jobs := filepath.Join(base, jobsName)
	if err := sys.mkdir(jobs); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("create jobs cgroup %s: %w", jobs, err)
	}
	if err := writeCgroupFile(filepath.Join(jobs, "cgroup.subtree_control"), cgroupV2Controllers); err != nil {
		return fmt.Errorf("enable controllers for jobs: %w", err)
	}
	t.hier = []cgroupHierarchy{{jobs: jobs, rel: path.Join(baseRel, jobsName)}}
	return nil
}

func (t *cgroupTree) openLegacy(sys cgroupSystem, root string, self map[string]string, mounts []cgroupMount) error {
	jobsName := cmp.Or(sys.jobsName, "worker-jobs")
	for _, c := range cgroupV1Controllers {
		m, ok := findV1Mount(mounts, c.name)
		if !ok {
			if !c.required {
				continue
			}
			return fmt.Errorf("cgroup controller %s not available: no cgroup v1 hierarchy with it in /proc/self/mountinfo; run with -no-limits to run jobs unlimited", c.name)
		}
		if i := slices.IndexFunc(t.hier, func(h cgroupHierarchy) bool { return slices.Contains(m.options, h.controllers[0]) }); i >= 0 {
			t.hier[i].controllers = append(t.hier[i].controllers, c.name) // co-mounted, e.g. cpu,cpuacct
			continue
		}
		parent := path.Join(m.root, path.Clean("/"+root))
		if root == "" {
			if parent, ok = self[c.name]; !ok {
				if !c.required {
					continue
				}
				return fmt.Errorf("cgroup controller %s not available: not in /proc/self/cgroup; run with -no-limits to run jobs unlimited", c.name)
			}
		}
		rel := path.Join(parent, jobsName)
		dir, err := m.dir(rel)
		if err != nil {
			return fmt.Errorf("cgroup controller %s not available: %w; run with -no-limits to run jobs unlimited", c.name, err)
		}
		if err := mkdirUnder(sys.mkdir, m.point, dir); err != nil {
			return err
		}
		t.hier = append(t.hier, cgroupHierarchy{controllers: []string{c.name}, jobs: dir, rel: rel})
	}
	return nil
}

func (t *cgroupTree) mode() string { return t.kind }

// job returns the cgroup of job id, without touching the filesystem: for a
// restarted server, a job started by an earlier one. An id that is not a
// single path element gives a jobCgroup with no directories, which touches
// nothing.
func (t *cgroupTree) job(id string) *jobCgroup {
	j := &jobCgroup{id: id, unified: t.kind == cgroupModeUnified, sysfs: t.sysfs}
	if !cgroupNameOK(id) {
		return j
	}
	for _, h := range t.hier {
		j.dirs = append(j.dirs, cgroupHierarchy{controllers: h.controllers, jobs: filepath.Join(h.jobs, id), rel: path.Join(h.rel, id)})
	}
	return j
}

// newJob creates job id's cgroup and writes its limits; a zero limit is not
// written (unlimited). On error nothing is left behind.
func (t *cgroupTree) newJob(id string, l Limits) (*jobCgroup, error) {
	if !cgroupNameOK(id) {
		return nil, fmt.Errorf("job cgroup: invalid job id %q", id)
	}
	if math.IsNaN(l.CPU) || math.IsInf(l.CPU, 0) || l.CPU < 0 || l.Memory < 0 || l.IOBps < 0 || l.Pids < 0 {
		return nil, fmt.Errorf("job %s: invalid limits %+v", id, l)
	}
	j := t.job(id)
	for i, d := range j.dirs {
		// Exclusive: IDs are never reused, so an existing dir is someone else's.
		if err := t.mkdir(d.jobs); err != nil {
			(&jobCgroup{dirs: j.dirs[:i]}).remove()
			return nil, fmt.Errorf("create job cgroup %s: %w", d.jobs, err)
		}
	}
	var subs []string
	if j.unified {
		subs = []string{filepath.Join(j.dirs[0].jobs, initCgroup), filepath.Join(j.dirs[0].jobs, commandCgroup)}
	} else {
		subs = []string{filepath.Join(j.dir("pids"), commandCgroup)}
	}
	for _, sub := range subs {
		if err := t.mkdir(sub); err != nil {
			j.remove()
			return nil, fmt.Errorf("create job cgroup %s: %w", sub, err)
		}
	}
	var err error
	if j.unified {
		err = j.limitUnified(l)
	} else {
		err = j.limitLegacy(l)
	}
	if err != nil {
		j.remove()
		return nil, fmt.Errorf("job %s limits: %w", id, err)
	}
	return j, nil
}

func cpuQuota(cores float64) int64 {
	return max(int64(math.Round(cores*cgroupCPUPeriod)), cgroupMinQuota)
}

func (j *jobCgroup) limitUnified(l Limits) error {
	dir := j.dirs[0].jobs
	if l.CPU > 0 {
		if err := writeCgroupFile(filepath.Join(dir, "cpu.max"), fmt.Sprintf("%d %d", cpuQuota(l.CPU), cgroupCPUPeriod)); err != nil {
			return err
		}
	}
	if l.Memory > 0 {
		if err := writeCgroupFile(filepath.Join(dir, "memory.max"), strconv.FormatInt(l.Memory, 10)); err != nil {
			return err
		}
		// Without swap accounting (no memory.swap.max) there is no swap to bypass the limit with.
		if swap := filepath.Join(dir, "memory.swap.max"); cgroupFileExists(swap) {
			if err := writeCgroupFile(swap, "0"); err != nil {
				return err
			}
		}
		// One OOM kill takes the whole job, so a job never goes on half-killed.
		if err := writeCgroupFile(filepath.Join(dir, "memory.oom.group"), "1"); err != nil {
			return err
		}
	}
	if l.IOBps > 0 {
		disks, err := blockDisks(j.sysfs)
		if err != nil {
			return err
		}
		var lines []string
		for _, d := range disks {
			lines = append(lines, fmt.Sprintf("%s rbps=%d wbps=%d\n", d, l.IOBps, l.IOBps))
		}
		if err := writeCgroupFile(filepath.Join(dir, "io.max"), lines...); err != nil {
			return err
		}
	}
	// pids.max of <id>/command exists only once the init has enabled pids
	// for <id>'s children; the init writes it then (commandFiles).
	return nil
}

func (j *jobCgroup) limitLegacy(l Limits) error {
	if l.CPU > 0 {
		dir := j.dir("cpu")
		if err := writeCgroupFile(filepath.Join(dir, "cpu.cfs_period_us"), strconv.Itoa(cgroupCPUPeriod)); err != nil {
			return err
		}
		if err := writeCgroupFile(filepath.Join(dir, "cpu.cfs_quota_us"), strconv.FormatInt(cpuQuota(l.CPU), 10)); err != nil {
			return err
		}
	}
	if l.Memory > 0 {
		dir := j.dir("memory")
		v := strconv.FormatInt(l.Memory, 10)
		// memory first: the kernel keeps memsw >= memory, and memsw starts unlimited.
		if err := writeCgroupFile(filepath.Join(dir, "memory.limit_in_bytes"), v); err != nil {
			return err
		}
		if memsw := filepath.Join(dir, "memory.memsw.limit_in_bytes"); cgroupFileExists(memsw) {
			// memory+swap at the same value: swapping out frees nothing, so swap cannot bypass the limit.
			if err := writeCgroupFile(memsw, v); err != nil {
				return err
			}
		} else if sw := filepath.Join(dir, "memory.swappiness"); cgroupFileExists(sw) {
			// No swap accounting (swapaccount=0): tell reclaim not to swap this cgroup's memory.
			if err := writeCgroupFile(sw, "0"); err != nil {
				return err
			}
		}
	}
	if l.IOBps > 0 {
		dir := j.dir("blkio")
		disks, err := blockDisks(j.sysfs)
		if err != nil {
			return err
		}
		var lines []string
		for _, d := range disks {
			lines = append(lines, fmt.Sprintf("%s %d\n", d, l.IOBps))
		}
		for _, f := range []string{"blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device"} {
			if err := writeCgroupFile(filepath.Join(dir, f), lines...); err != nil {
				return err
			}
		}
	}
	if l.Pids > 0 {
		// One more than asked: the init's forking thread sits in the command
		// cgroup while it forks the command, and lowers this to the limit
		// before it leaves (see commandFiles), so the job never has more.
		if err := writeCgroupFile(filepath.Join(j.dir("pids"), commandCgroup, "pids.max"), strconv.FormatInt(l.Pids+1, 10)); err != nil {
			return err
		}
	}
	return nil
}

// dir is the job's directory in the hierarchy of controller c ("" if none).
func (j *jobCgroup) dir(c string) string {
	for _, d := range j.dirs {
		if j.unified || slices.Contains(d.controllers, c) {
			return d.jobs
		}
	}
	return ""
}

// openFD returns, on v2, an O_PATH fd of the job's directory for
// SysProcAttr.CgroupFD (clone3 CLONE_INTO_CGROUP), so the job's init is born
// in its cgroup; the caller closes it. On v1 it returns -1: use addProc.
func (j *jobCgroup) openFD() (int, error) {
	if !j.unified {
		return -1, nil
	}
	if len(j.dirs) == 0 {
		return -1, fmt.Errorf("job cgroup: invalid job id %q", j.id)
	}
	dir := j.dirs[0].jobs
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open job cgroup %s: %w", dir, err)
	}
	return fd, nil
}

// commandFiles are what the job's init needs to start its command in
// <id>/command, handed to it as open files because it cannot reach the
// cgroup filesystem once it is isolated:
//   - v2: <id>/init's cgroup.procs, <id>'s cgroup.subtree_control and the
//     <id>/command directory. The init, born in <id>, roots its cgroup
//     namespace there, moves into <id>/init, enables pids for <id>'s
//     children, writes <id>/command's pids.max through the directory, and
//     clones its command into it (CLONE_INTO_CGROUP).
//   - v1: the command cgroup's tasks and pids.max, and the job cgroup's
//     cgroup.procs, in the pids hierarchy. v1 has no clone into a cgroup, so
//     the init moves its forking thread in, forks, lowers pids.max to the
//     limit and moves all its threads back out.
func (j *jobCgroup) commandFiles() ([]*os.File, error) {
	if len(j.dirs) == 0 {
		return nil, fmt.Errorf("job cgroup: invalid job id %q", j.id)
	}
	type want struct {
		path string
		flag int
	}
	var wants []want
	if j.unified {
		dir := j.dirs[0].jobs
		wants = []want{
			{filepath.Join(dir, initCgroup, "cgroup.procs"), unix.O_WRONLY},
			{filepath.Join(dir, "cgroup.subtree_control"), unix.O_WRONLY},
			{filepath.Join(dir, commandCgroup), unix.O_PATH | unix.O_DIRECTORY},
		}
	} else {
		pids := j.dir("pids")
		wants = []want{
			{filepath.Join(pids, commandCgroup, "tasks"), unix.O_WRONLY},
			{filepath.Join(pids, commandCgroup, "pids.max"), unix.O_WRONLY},
			{filepath.Join(pids, "cgroup.procs"), unix.O_WRONLY},
		}
	}
	var files []*os.File
	for _, w := range wants {
		fd, err := unix.Open(w.path, w.flag|unix.O_CLOEXEC, 0)
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			return nil, fmt.Errorf("open job cgroup file %s: %w", w.path, err)
		}
		files = append(files, os.NewFile(uintptr(fd), w.path))
	}
	return files, nil
}

// addProc moves process pid (all its threads) into the job's cgroup in every
// hierarchy.
func (j *jobCgroup) addProc(pid int) error {
	if len(j.dirs) == 0 {
		return fmt.Errorf("job cgroup: invalid job id %q", j.id)
	}
	for _, d := range j.dirs {
		if err := writeCgroupFile(filepath.Join(d.jobs, "cgroup.procs"), strconv.Itoa(pid)); err != nil {
			return fmt.Errorf("add process %d to job %s: %w", pid, j.id, err)
		}
	}
	return nil
}

// kill SIGKILLs every process in the job and returns once none is left (at
// most cgroupKillWait). A job whose cgroup is gone has nothing to kill.
func (j *jobCgroup) kill() error {
	if len(j.dirs) == 0 {
		return nil
	}
	deadline := time.Now().Add(cgroupKillWait)
	killed := false
	if j.unified {
		// cgroup.kill (5.14+) kills atomically, forks in flight included.
		err := writeCgroupFile(filepath.Join(j.dirs[0].jobs, "cgroup.kill"), "1")
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("kill job %s: %w", j.id, err)
		}
		killed = err == nil
	}
	if !killed {
		// Frozen, the job cannot fork between our reading its pids and the
		// signals; v1 frozen tasks die of the SIGKILL once thawed.
		thaw := j.freeze()
		j.signalAll()
		thaw()
	}
	for wait := 2 * time.Millisecond; ; wait = min(2*wait, 50*time.Millisecond) {
		left := j.procs()
		if len(left) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kill job %s: processes %v still running after %s (stuck in the kernel?)", j.id, left, cgroupKillWait)
		}
		j.signalAll()
		time.Sleep(wait)
	}
}

// freeze freezes the job as far as the kernel allows within cgroupFreezeWait
// and returns the function that thaws it. Without a freezer it does nothing.
func (j *jobCgroup) freeze() (thaw func()) {
	file, frozen, thawed := "freezer.state", "FROZEN", "THAWED"
	dir := j.dir("freezer")
	if j.unified {
		file, frozen, thawed = "cgroup.freeze", "1", "0" // 5.2+
	}
	if dir == "" || writeCgroupFile(filepath.Join(dir, file), frozen) != nil {
		return func() {}
	}
	for deadline := time.Now().Add(cgroupFreezeWait); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if j.unified {
			if v, ok := flatKeyed(filepath.Join(dir, "cgroup.events"), "frozen"); ok && v == 1 {
				break
			}
		} else if b, err := os.ReadFile(filepath.Join(dir, file)); err != nil || strings.TrimSpace(string(b)) == frozen {
			break
		}
	}
	return func() { writeCgroupFile(filepath.Join(dir, file), thawed) }
}

// procs lists the processes in any of the job's cgroups, sub-cgroups included.
func (j *jobCgroup) procs() []int {
	var pids []int
	for _, d := range j.dirs {
		for _, dir := range cgroupSubtree(d.jobs) {
			for _, p := range readCgroupPids(filepath.Join(dir, "cgroup.procs")) {
				if !slices.Contains(pids, p) {
					pids = append(pids, p)
				}
			}
		}
	}
	return pids
}

// cgroupSubtree is dir and the cgroups below it, children before parents
// (the order rmdir needs). A job's tree is two levels deep at most.
func cgroupSubtree(dir string) []string {
	var out []string
	if entries, err := os.ReadDir(dir); err == nil {
		for _, e := range entries {
			if e.IsDir() {
				out = append(out, cgroupSubtree(filepath.Join(dir, e.Name()))...)
			}
		}
	}
	return append(out, dir)
}

// signalAll SIGKILLs every process in the job. A pid read from cgroup.procs
// may have exited and been reused by the time we signal it, so each one is
// pinned with a pidfd and checked to still be in the job before the signal.
func (j *jobCgroup) signalAll() {
	for _, d := range j.dirs {
		for _, dir := range cgroupSubtree(d.jobs) {
			sub := d
			sub.rel = path.Join(d.rel, filepath.ToSlash(strings.TrimPrefix(dir, d.jobs)))
			for _, pid := range readCgroupPids(filepath.Join(dir, "cgroup.procs")) {
				signalIfMember(pid, sub)
			}
		}
	}
}

func signalIfMember(pid int, d cgroupHierarchy) {
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return
	}
	if err == nil {
		defer unix.Close(fd)
	}
	b, rerr := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if rerr != nil {
		return
	}
	key := ""
	if d.controllers != nil {
		key = d.controllers[0]
	}
	if parseProcCgroup(string(b))[key] != d.rel {
		return
	}
	if err == nil {
		unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
	} else { // no pidfd (kernel < 5.3): the membership check narrows the race
		unix.Kill(pid, unix.SIGKILL)
	}
}

// usage reads what the job consumed from its cgroup's counters; a counter the
// kernel does not have reads as 0. Read it before remove.
func (j *jobCgroup) usage() Usage {
	var u Usage
	if len(j.dirs) == 0 {
		return u
	}
	if j.unified {
		dir := j.dirs[0].jobs
		if v, ok := flatKeyed(filepath.Join(dir, "cpu.stat"), "usage_usec"); ok {
			u.CPUSeconds = float64(v) / 1e6
		}
		if v, err := readCgroupInt(filepath.Join(dir, "memory.peak")); err == nil { // 5.19+
			u.MemoryPeakBytes = v
		} else if v, err := readCgroupInt(filepath.Join(dir, "memory.current")); err == nil {
			// Older kernels keep no peak: this is the highest value seen by
			// the calls to usage, a lower bound of the true peak.
			for old := j.memSeen.Load(); v > old && !j.memSeen.CompareAndSwap(old, v); old = j.memSeen.Load() {
			}
			u.MemoryPeakBytes = j.memSeen.Load()
		}
		u.IOReadBytes, u.IOWriteBytes = j.ioStat(filepath.Join(dir, "io.stat"))
		return u
	}
	if dir := j.dir("cpuacct"); dir != "" {
		if v, err := readCgroupInt(filepath.Join(dir, "cpuacct.usage")); err == nil {
			u.CPUSeconds = float64(v) / 1e9
		}
	}
	if dir := j.dir("memory"); dir != "" {
		if v, err := readCgroupInt(filepath.Join(dir, "memory.max_usage_in_bytes")); err == nil {
			u.MemoryPeakBytes = v
		}
	}
	dir := j.dir("blkio")
	for _, f := range []string{"blkio.throttle.io_service_bytes", "blkio.throttle.io_service_bytes_recursive"} {
		if p := filepath.Join(dir, f); dir != "" && cgroupFileExists(p) {
			u.IOReadBytes, u.IOWriteBytes = j.blkioStat(p)
			break
		}
	}
	return u
}

// ioStat sums rbytes and wbytes of a v2 io.stat over whole disks. A stacked
// device (dm, md) is skipped: its I/O is counted again on the disks below it.
func (j *jobCgroup) ioStat(p string) (read, write int64) {
	b, _ := os.ReadFile(p)
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 2 || blockStacked(j.sysfs, f[0]) {
			continue
		}
		for _, kv := range f[1:] {
			k, v, _ := strings.Cut(kv, "=")
			n, _ := strconv.ParseInt(v, 10, 64)
			switch k {
			case "rbytes":
				read += n
			case "wbytes":
				write += n
			}
		}
	}
	return read, write
}

// blkioStat sums the Read and Write lines ("MAJ:MIN Read N") of a v1 blkio
// io_service_bytes file, skipping stacked devices as ioStat does.
func (j *jobCgroup) blkioStat(p string) (read, write int64) {
	b, _ := os.ReadFile(p)
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) != 3 || blockStacked(j.sysfs, f[0]) {
			continue
		}
		n, _ := strconv.ParseInt(f[2], 10, 64)
		switch f[1] {
		case "Read":
			read += n
		case "Write":
			write += n
		}
	}
	return read, write
}

// oomKilled reports whether the kernel OOM-killed a process of the job.
// v2: memory.events oom_kill or oom_group_kill. v1: the oom_kill counter of
// memory.oom_control (4.13+). Kernels without that counter report false:
// memory.failcnt counts every time usage hit the limit, which ordinary page
// cache reclaim does too, and under_oom is only true while an OOM is pending,
// so neither tells that a process was killed.
func (j *jobCgroup) oomKilled() bool {
	dir := j.dir("memory")
	if dir == "" {
		return false
	}
	if j.unified {
		kill, _ := flatKeyed(filepath.Join(dir, "memory.events"), "oom_kill")
		group, _ := flatKeyed(filepath.Join(dir, "memory.events"), "oom_group_kill")
		return kill > 0 || group > 0
	}
	n, _ := flatKeyed(filepath.Join(dir, "memory.oom_control"), "oom_kill")
	return n > 0
}

// remove removes the job's directories. rmdir fails with EBUSY for a moment
// after the last process died (the kernel finishes its exit asynchronously),
// so it is retried for up to cgroupRemoveWait.
func (j *jobCgroup) remove() error {
	var errs []error
	for _, d := range j.dirs {
		for _, dir := range cgroupSubtree(d.jobs) {
			if err := rmdirRetry(dir); err != nil {
				errs = append(errs, fmt.Errorf("remove job cgroup %s: %w", dir, err))
			}
		}
	}
	return errors.Join(errs...)
}

func rmdirRetry(dir string) error {
	deadline := time.Now().Add(cgroupRemoveWait)
	for wait := time.Millisecond; ; wait = min(2*wait, 100*time.Millisecond) {
		err := unix.Rmdir(dir)
		if err == nil || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(wait)
	}
}

// removeStale kills and removes the job cgroups whose id is not live: jobs
// of a server that crashed and whose records are gone.
func (t *cgroupTree) removeStale(live func(id string) bool) error {
	var ids []string
	var errs []error
	for _, h := range t.hier {
		entries, err := os.ReadDir(h.jobs)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("list job cgroups: %w", err))
		}
		for _, e := range entries {
			if e.IsDir() && !slices.Contains(ids, e.Name()) {
				ids = append(ids, e.Name())
			}
		}
	}
	for _, id := range ids {
		if live(id) {
			continue
		}
		j := t.job(id)
		if err := j.kill(); err != nil {
			errs = append(errs, fmt.Errorf("stale job cgroup: %w", err))
			continue
		}
		if err := j.remove(); err != nil {
			errs = append(errs, fmt.Errorf("stale job cgroup: %w", err))
		}
	}
	return errors.Join(errs...)
}

// blockDisks returns the whole-disk block devices ("MAJ:MIN", sorted) that
// I/O limits are written for: every disk in <sysfs>/block except loop, ram
// and zram devices and empty ones (size 0); a stacked device (dm, md) stands
// for the disks under it.
func blockDisks(sysfs string) ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(sysfs, "block"))
	if err != nil {
		return nil, fmt.Errorf("list block devices: %w", err)
	}
	var disks []string
	for _, e := range entries {
		d, err := deviceDisks(filepath.Join(sysfs, "block", e.Name()), 0)
		if err != nil {
			return nil, err
		}
		for _, x := range d {
			if !slices.Contains(disks, x) {
				disks = append(disks, x)
			}
		}
	}
	if len(disks) == 0 {
		return nil, fmt.Errorf("no disk in %s to limit I/O on; run jobs without an io limit", filepath.Join(sysfs, "block"))
	}
	slices.SortFunc(disks, compareDevNum)
	return disks, nil
}

func deviceDisks(dir string, depth int) ([]string, error) {
	if depth > 16 {
		return nil, fmt.Errorf("block device %s: stacked too deep", dir)
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return nil, fmt.Errorf("resolve block device: %w", err)
	}
	// A partition's sysfs dir sits inside its disk's.
	if cgroupFileExists(filepath.Join(real, "partition")) {
		real = filepath.Dir(real)
	}
	name := filepath.Base(real)
	for _, skip := range []string{"loop", "ram", "zram"} {
		if strings.HasPrefix(name, skip) {
			return nil, nil
		}
	}
	slaves, _ := os.ReadDir(filepath.Join(real, "slaves"))
	if len(slaves) > 0 {
		var disks []string
		for _, s := range slaves {
			d, err := deviceDisks(filepath.Join(real, "slaves", s.Name()), depth+1)
			if err != nil {
				return nil, err
			}
			disks = append(disks, d...)
		}
		return disks, nil
	}
	if size, err := readCgroupInt(filepath.Join(real, "size")); err != nil || size == 0 {
		return nil, nil
	}
	// Hidden disks (NVMe multipath paths) take no cgroup limits; their I/O goes through the visible head.
	if hidden, err := readCgroupInt(filepath.Join(real, "hidden")); err == nil && hidden == 1 {
		return nil, nil
	}
	dev, err := os.ReadFile(filepath.Join(real, "dev"))
	if err != nil {
		return nil, fmt.Errorf("block device %s: %w", name, err)
	}
	return []string{strings.TrimSpace(string(dev))}, nil
}

// blockStacked reports whether block device "MAJ:MIN" sits on other devices.
func blockStacked(sysfs, dev string) bool {
	slaves, _ := os.ReadDir(filepath.Join(sysfs, "dev", "block", dev, "slaves"))
	return len(slaves) > 0
}

func compareDevNum(a, b string) int {
	num := func(s string) (int, int) {
		maj, mn, _ := strings.Cut(s, ":")
		x, _ := strconv.Atoi(maj)
		y, _ := strconv.Atoi(mn)
		return x, y
	}
	a1, a2 := num(a)
	b1, b2 := num(b)
	if a1 != b1 {
		return a1 - b1
	}
	return a2 - b2
}

// cgroupMount is one cgroup filesystem mount from /proc/self/mountinfo.
type cgroupMount struct {
	point   string   // where it is mounted
	root    string   // the cgroup of the hierarchy shown at point
	fstype  string   // cgroup or cgroup2
	options []string // super options: v1 controllers, e.g. rw,cpu,cpuacct
}

// dir turns a cgroup path, as /proc/<pid>/cgroup names it, into a path under
// the mount. A mount whose root is not "/" (a container without a cgroup
// namespace, a bind mount) shows only its part of the hierarchy.
func (m cgroupMount) dir(cgPath string) (string, error) {
	rel := cgPath
	if m.root != "/" {
		if cgPath != m.root && !strings.HasPrefix(cgPath, m.root+"/") {
			return "", fmt.Errorf("cgroup %s is outside the part %s of the hierarchy mounted on %s", cgPath, m.root, m.point)
		}
		rel = strings.TrimPrefix(cgPath, m.root)
	}
	return filepath.Join(m.point, rel), nil
}

func findV1Mount(mounts []cgroupMount, controller string) (cgroupMount, bool) {
	for _, m := range mounts {
		if m.fstype == "cgroup" && slices.Contains(m.options, controller) {
			return m, true
		}
	}
	return cgroupMount{}, false
}

// parseCgroupMounts picks the cgroup mounts out of /proc/self/mountinfo
// (proc(5): "36 35 98:0 /root /point opts optional... - fstype source superopts").
func parseCgroupMounts(mountinfo string) []cgroupMount {
	var ms []cgroupMount
	for line := range strings.Lines(mountinfo) {
		f := strings.Fields(line)
		sep := slices.Index(f, "-")
		if sep < 6 || len(f) < sep+4 || (f[sep+1] != "cgroup" && f[sep+1] != "cgroup2") {
			continue
		}
		ms = append(ms, cgroupMount{
			point:   unescapeMountField(f[4]),
			root:    unescapeMountField(f[3]),
			fstype:  f[sep+1],
			options: strings.Split(f[sep+3], ","),
		})
	}
	return ms
}

// unescapeMountField undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountField(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// parseProcCgroup maps each v1 controller of /proc/<pid>/cgroup to its cgroup
// path, and "" to the v2 one ("0::/path").
func parseProcCgroup(s string) map[string]string {
	m := map[string]string{}
	for line := range strings.Lines(s) {
		parts := strings.SplitN(strings.TrimRight(line, "\n"), ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[1] == "" {
			if parts[0] == "0" {
				m[""] = parts[2]
			}
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			m[c] = parts[2]
		}
	}
	return m
}

// mkdirUnder creates dir and its missing parents below mountPoint.
func mkdirUnder(mkdir func(string) error, mountPoint, dir string) error {
	rel, err := filepath.Rel(mountPoint, dir)
	if err != nil || strings.HasPrefix(rel, "..") {
		return fmt.Errorf("cgroup %s is not under %s", dir, mountPoint)
	}
	cur := mountPoint
	for _, part := range strings.Split(rel, string(filepath.Separator)) {
		if part == "." {
			continue
		}
		cur = filepath.Join(cur, part)
		if err := mkdir(cur); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("create cgroup %s: %w", cur, err)
		}
	}
	return nil
}

// writeCgroupFile writes each value with its own write(2): cgroup files take
// one value per write (io.max and blkio.throttle.*_device one device each).
func writeCgroupFile(p string, values ...string) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	for _, v := range values {
		if _, err := f.WriteString(v); err != nil {
			f.Close()
			return fmt.Errorf("write %q to %s: %w", strings.TrimSpace(v), p, err)
		}
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	return nil
}

func readCgroupInt(p string) (int64, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
}

// flatKeyed reads key's value from a "key value" per line file (cpu.stat,
// memory.events, memory.oom_control, cgroup.events).
func flatKeyed(p, key string) (int64, bool) {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, false
	}
	for line := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), " "); ok && k == key {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}

func readCgroupPids(p string) []int {
	b, _ := os.ReadFile(p)
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			pids = append(pids, n)
		}
	}
	return pids
}

// cgroupNameOK accepts a job id only as one plain path element.
func cgroupNameOK(id string) bool {
	return id != "" && id != "." && id != ".." && !strings.ContainsAny(id, "/\x00\n")
}

func cgroupFileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
