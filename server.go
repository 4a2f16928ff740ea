//go:build linux

// server.go: the HTTP API, who may do what, and the supervision of jobs.
//
// The server owns the store, the cgroup tree, the output watcher and the
// config. It starts each job's init (init_linux.go) and watches it, but is
// never needed by a running job: jobs go on while the server is down, and a
// starting server re-adopts the ones still running and records the end of
// those that ended meanwhile. A job's record says RUNNING until the server
// has read its exit record; every other status is final.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	maxBodyBytes     = 1 << 20
	minMemory        = 16 << 20
	writeTimeout     = 30 * time.Second
	startTimeout     = 30 * time.Second
	forceEndMargin   = 5 * time.Second // past the grace period, before the server kills a job's init itself
	jobNamespaceFlag = unix.CLONE_NEWPID | unix.CLONE_NEWNS | unix.CLONE_NEWNET | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS | unix.CLONE_NEWCGROUP
)

type server struct {
	cfg      serverConfig
	uid, gid int
	store    *store
	cgroups  *cgroupTree // nil with -no-limits
	watcher  *outputWatcher
	metrics  *metrics
	closing  chan struct{} // closed on shutdown: followers end, jobs go on

	mu   sync.Mutex
	live map[string]*liveJob
}

// liveJob is a job whose end the server has not recorded yet.
type liveJob struct {
	id       string
	out      *jobOutput
	cg       *jobCgroup                 // nil without limits
	signal   func(syscall.Signal) error // set before launched is closed; nil if the init never ran
	launched chan struct{}              // closed once the init was started, or failed to
	done     chan struct{}              // closed once the end is recorded

	forced atomic.Value // string: why the server itself killed the init
}

func newServer(cfg serverConfig) (*server, error) {
	if cfg.caps.CPU == 0 {
		cfg.caps.CPU = float64(runtime.NumCPU())
	}
	if cfg.caps.Memory == 0 {
		var si unix.Sysinfo_t
		if err := unix.Sysinfo(&si); err != nil {
			return nil, fmt.Errorf("read the host's memory size: %w", err)
		}
		cfg.caps.Memory = int64(si.Totalram) * int64(si.Unit)
	}
	if cfg.grace <= 0 {
		return nil, fmt.Errorf("-grace %s: want a positive duration", cfg.grace)
	}
	uid, gid, err := lookupJobUser(cfg.jobUser)
	if err != nil {
		return nil, err
	}
	st, err := openStore(filepath.Join(cfg.stateDir, "jobs"))
	if err != nil {
		return nil, err
	}
	s := &server{cfg: cfg, uid: uid, gid: gid, store: st, metrics: newMetrics(), closing: make(chan struct{}), live: map[string]*liveJob{}}
	if !cfg.noLimits {
		s.cgroups, err = openCgroupTree(cfg.cgroupRoot)
		if err != nil {
			return nil, err
		}
		slog.Info("cgroups", "mode", s.cgroups.mode())
	} else {
		slog.Warn("running jobs without resource limits (-no-limits)")
	}
	s.watcher, err = newOutputWatcher()
	if err != nil {
		return nil, err
	}
	go func() { logWatchError(s.watcher.run()) }()
	s.adoptAll()
	return s, nil
}

// close ends followers and releases the server's resources. Jobs go on.
func (s *server) close() {
	select {
	case <-s.closing:
	default:
		close(s.closing)
	}
	s.watcher.close()
}

// lookupJobUser resolves -job-user ("nobody", "65534" or "65534:65534")
// without cgo: os/user reads /etc/passwd in a static build.
func lookupJobUser(name string) (uid, gid int, err error) {
	if u, g, ok := strings.Cut(name, ":"); ok {
		uid, err1 := strconv.Atoi(u)
		gid, err2 := strconv.Atoi(g)
		if err1 != nil || err2 != nil || uid < 0 || gid < 0 {
			return 0, 0, fmt.Errorf("-job-user %q: want NAME, UID or UID:GID", name)
		}
		return checkJobUID(name, uid, gid)
	}
	if n, err := strconv.Atoi(name); err == nil && n >= 0 {
		return checkJobUID(name, n, n)
	}
	u, err := user.Lookup(name)
	if err != nil {
		return 0, 0, fmt.Errorf("-job-user %q: %w; pass an existing user or a numeric UID:GID", name, err)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return checkJobUID(name, uid, gid)
}

func checkJobUID(name string, uid, gid int) (int, int, error) {
	if uid == 0 || gid == 0 {
		return 0, 0, fmt.Errorf("-job-user %q is root: jobs must run unprivileged", name)
	}
	return uid, gid, nil
}

// ---- HTTP ----

type caller struct{ user, role string }

func (c caller) canRun() bool { return c.role == "admin" || c.role == "user" }
func (c caller) canSee(j *Job) bool {
	return c.role == "admin" || c.role == "viewer" || (c.role == "user" && j.Owner == c.user)
}
func (c caller) canStop(j *Job) bool {
	return c.role == "admin" || (c.role == "user" && j.Owner == c.user)
}

type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func errorf(status int, format string, args ...any) *apiError {
	return &apiError{status, fmt.Sprintf(format, args...)}
}

func (s *server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/v1/jobs", s.api("GET POST", s.handleJobs))
	mux.Handle("/v1/jobs/{id}", s.api("GET", s.handleJob))
	mux.Handle("/v1/jobs/{id}/stop", s.api("POST", s.handleStop))
	mux.Handle("/v1/jobs/{id}/log", s.api("GET", s.handleLog))
	mux.Handle("/healthz", s.api("GET", func(w http.ResponseWriter, r *http.Request, c caller) error {
		writeJSON200(w, http.StatusOK, map[string]string{"status": "ok"})
		return nil
	}))
	mux.Handle("/metrics", s.api("GET", func(w http.ResponseWriter, r *http.Request, c caller) error {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		s.metrics.write(w, s.running())
		return nil
	}))
	mux.Handle("/", s.api("", func(w http.ResponseWriter, r *http.Request, c caller) error {
		return errorf(http.StatusNotFound, "no such endpoint: %s", r.URL.Path)
	}))
	return mux
}

type handler func(http.ResponseWriter, *http.Request, caller) error

// api wraps every endpoint: identity and role from the verified client
// certificate, the method check, a bounded body, a write deadline, and
// errors as JSON.
func (s *server) api(methods string, h handler) http.Handler {
	allowed := strings.Fields(methods)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.NewResponseController(w).SetWriteDeadline(time.Now().Add(writeTimeout))
		r.Body = http.MaxBytesReader(w, r.Body, maxBodyBytes)
		err := func() error {
			var c caller
			c.user, c.role = peerIdentity(r.TLS)
			if !validRole(c.role) {
				return errorf(http.StatusForbidden, "certificate of %q has no known role (OU): ask for one with `worker -certs DIR -user NAME -role user`", c.user)
			}
			if len(allowed) > 0 && !containsString(allowed, r.Method) {
				w.Header().Set("Allow", strings.Join(allowed, ", "))
				return errorf(http.StatusMethodNotAllowed, "method %s not allowed on %s", r.Method, r.URL.Path)
			}
			return h(w, r, c)
		}()
		if err != nil {
			var ae *apiError
			if !errors.As(err, &ae) {
				slog.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
				ae = errorf(http.StatusInternalServerError, "internal error: %v", err)
			}
			writeJSON200(w, ae.status, map[string]string{"error": ae.msg})
		}
	})
}

func validRole(role string) bool { return containsString(validRoles, role) }

func containsString(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func writeJSON200(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func (s *server) handleJobs(w http.ResponseWriter, r *http.Request, c caller) error {
	if r.Method == http.MethodGet {
		jobs := []Job{}
		for _, rec := range s.store.list() {
			if c.canSee(&rec.Job) {
				jobs = append(jobs, s.view(rec))
			}
		}
		writeJSON200(w, http.StatusOK, jobs)
		return nil
	}
	if !c.canRun() {
		return errorf(http.StatusForbidden, "role %s may not run jobs", c.role)
	}
	req, err := decodeRunRequest(r.Body)
	if err != nil {
		return err
	}
	rec, err := s.startJob(c.user, req)
	if err != nil {
		return err
	}
	writeJSON200(w, http.StatusCreated, s.view(rec))
	return nil
}

// visibleJob is the job the caller asked for, or 404 if there is none or
// the caller may not see it: the two are indistinguishable from outside.
func (s *server) visibleJob(r *http.Request, c caller) (record, error) {
	id := r.PathValue("id")
	if !validID(id) {
		return record{}, errorf(http.StatusNotFound, "no job %q", id)
	}
	rec, ok := s.store.get(id)
	if !ok || !c.canSee(&rec.Job) {
		return record{}, errorf(http.StatusNotFound, "no job %q", id)
	}
	return rec, nil
}

func (s *server) handleJob(w http.ResponseWriter, r *http.Request, c caller) error {
	rec, err := s.visibleJob(r, c)
	if err != nil {
		return err
	}
	writeJSON200(w, http.StatusOK, s.view(rec))
	return nil
}

func (s *server) handleStop(w http.ResponseWriter, r *http.Request, c caller) error {
	rec, err := s.visibleJob(r, c)
	if err != nil {
		return err
	}
	if !c.canStop(&rec.Job) {
		return errorf(http.StatusForbidden, "role %s may not stop jobs", c.role)
	}
	// Stopping takes up to the grace period; the client waits for the end.
	http.NewResponseController(w).SetWriteDeadline(time.Now().Add(s.cfg.grace + 2*forceEndMargin + writeTimeout))
	rec, err = s.stopJob(rec.ID)
	if err != nil {
		return err
	}
	writeJSON200(w, http.StatusOK, s.view(rec))
	return nil
}

func (s *server) handleLog(w http.ResponseWriter, r *http.Request, c caller) error {
	rec, err := s.visibleJob(r, c)
	if err != nil {
		return err
	}
	q := r.URL.Query()
	var offset int64
	if v := q.Get("offset"); v != "" {
		offset, err = strconv.ParseInt(v, 10, 64)
		if err != nil || offset < 0 {
			return errorf(http.StatusBadRequest, "offset %q: want a byte offset, 0 or more", v)
		}
	}
	follow := true
	if v := q.Get("follow"); v != "" {
		follow, err = strconv.ParseBool(v)
		if err != nil {
			return errorf(http.StatusBadRequest, "follow %q: want 1 or 0", v)
		}
	}
	out := s.outputOf(rec)
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(time.Time{}) // a follow may last as long as the job
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(http.StatusOK)

	s.metrics.followers.Add(1)
	defer s.metrics.followers.Add(-1)
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	go func() {
		select {
		case <-s.closing:
			cancel()
		case <-ctx.Done():
		}
	}()
	// No deadline while waiting for a quiet job's next byte; one per write.
	rc.SetWriteDeadline(time.Time{})
	dw := &deadlineWriter{w: w, rc: rc}
	sent, err := out.follow(ctx, dw, dw.flush, offset, follow)
	s.metrics.bytesStreamed.Add(sent)
	if err != nil && ctx.Err() == nil {
		slog.Debug("follow ended", "job", rec.ID, "err", err)
	}
	return nil // the status line is out; errors end the stream
}

// deadlineWriter gives every write of a long response its own deadline, so
// a client that stops reading is dropped instead of held forever.
type deadlineWriter struct {
	w  io.Writer
	rc *http.ResponseController
}

func (d *deadlineWriter) Write(p []byte) (int, error) {
	d.rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	defer d.rc.SetWriteDeadline(time.Time{})
	return d.w.Write(p)
}

func (d *deadlineWriter) flush() error {
	d.rc.SetWriteDeadline(time.Now().Add(writeTimeout))
	defer d.rc.SetWriteDeadline(time.Time{})
	return d.rc.Flush()
}

// outputOf is the follow side of a job's output: the live one while the job
// runs, a finished one afterwards.
func (s *server) outputOf(rec record) *jobOutput {
	s.mu.Lock()
	lj := s.live[rec.ID]
	s.mu.Unlock()
	if lj != nil {
		return lj.out
	}
	o := newJobOutput(filepath.Join(s.store.jobDir(rec.ID), outputFile))
	o.finish()
	return o
}

// view is the API's picture of a record; a running job's output size is read live.
func (s *server) view(rec record) Job {
	j := rec.Job
	if !j.ended() {
		if fi, err := os.Stat(filepath.Join(s.store.jobDir(j.ID), outputFile)); err == nil {
			j.OutputBytes = fi.Size()
			j.OutputTruncated = s.cfg.outputCap > 0 && fi.Size() > s.cfg.outputCap
		}
	}
	return j
}

// ---- requests ----

func decodeRunRequest(body io.Reader) (runRequest, error) {
	var req runRequest
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		var mbe *http.MaxBytesError
		var ute *json.UnmarshalTypeError
		switch {
		case errors.As(err, &mbe):
			return req, errorf(http.StatusRequestEntityTooLarge, "request body over %d bytes", mbe.Limit)
		case errors.As(err, &ute):
			return req, errorf(http.StatusBadRequest, "%s: want a %s, not a JSON %s", ute.Field, ute.Type, ute.Value)
		}
		return req, errorf(http.StatusBadRequest, "bad request body: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return req, errorf(http.StatusRequestEntityTooLarge, "request body over %d bytes", mbe.Limit)
		}
		return req, errorf(http.StatusBadRequest, "bad request body: more than one JSON value")
	}
	return req, nil
}

// validate checks a run request against the server's caps; every message
// names what is wrong.
func (s *server) validate(req *runRequest) (time.Duration, error) {
	if req.Command == "" {
		return 0, errorf(http.StatusBadRequest, "command: must not be empty")
	}
	if strings.ContainsRune(req.Command, 0) {
		return 0, errorf(http.StatusBadRequest, "command: contains a NUL byte")
	}
	for i, a := range req.Args {
		if strings.ContainsRune(a, 0) {
			return 0, errorf(http.StatusBadRequest, "args[%d]: contains a NUL byte", i)
		}
	}
	for k, v := range req.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
			return 0, errorf(http.StatusBadRequest, "env %q: want NAME=VALUE with no '=' in NAME and no NUL bytes", k)
		}
	}
	l, caps := req.Limits, s.cfg.caps
	switch {
	case math.IsNaN(l.CPU) || math.IsInf(l.CPU, 0) || l.CPU < 0:
		return 0, errorf(http.StatusBadRequest, "limits.cpu: want a positive number of cores")
	case caps.CPU > 0 && l.CPU > caps.CPU:
		return 0, errorf(http.StatusBadRequest, "limits.cpu: %g cores is over this server's cap of %g", l.CPU, caps.CPU)
	case l.CPU > 0 && l.CPU < 0.01:
		return 0, errorf(http.StatusBadRequest, "limits.cpu: %g cores is below the smallest limit, 0.01", l.CPU)
	case l.Memory < 0:
		return 0, errorf(http.StatusBadRequest, "limits.memory: want a positive number of bytes")
	case caps.Memory > 0 && l.Memory > caps.Memory:
		return 0, errorf(http.StatusBadRequest, "limits.memory: %s is over this server's cap of %s", formatSize(l.Memory), formatSize(caps.Memory))
	case l.Memory > 0 && l.Memory < minMemory:
		return 0, errorf(http.StatusBadRequest, "limits.memory: %s is below the smallest limit, %s (the job's init needs some)", formatSize(l.Memory), formatSize(minMemory))
	case l.IOBps < 0:
		return 0, errorf(http.StatusBadRequest, "limits.io_bps: want a positive number of bytes per second")
	case caps.IOBps > 0 && l.IOBps > caps.IOBps:
		return 0, errorf(http.StatusBadRequest, "limits.io_bps: %s/s is over this server's cap of %s/s", formatSize(l.IOBps), formatSize(caps.IOBps))
	case l.Pids < 0:
		return 0, errorf(http.StatusBadRequest, "limits.pids: want a positive number of tasks")
	case caps.Pids > 0 && l.Pids > caps.Pids:
		return 0, errorf(http.StatusBadRequest, "limits.pids: %d is over this server's cap of %d", l.Pids, caps.Pids)
	}
	var timeout time.Duration
	if req.Timeout != "" {
		d, err := time.ParseDuration(req.Timeout)
		if err != nil || d <= 0 {
			return 0, errorf(http.StatusBadRequest, "timeout %q: want a positive duration such as 30s or 5m", req.Timeout)
		}
		timeout = d
	}
	return timeout, nil
}

// ---- job lifecycle ----

var errTooManyJobs = errorf(http.StatusTooManyRequests, "too many running jobs: this server runs at most -max-jobs at once; try again when one has ended")

func (s *server) running() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.live)
}

// startJob creates the job's record, starts its init and waits until the
// command runs or could not start.
func (s *server) startJob(owner string, req runRequest) (record, error) {
	begin := time.Now()
	timeout, err := s.validate(&req)
	if err != nil {
		return record{}, err
	}
	limits := req.Limits
	if limits.Pids == 0 {
		limits.Pids = s.cfg.pids
	}
	rec := record{
		Job: Job{
			ID: newID(), Owner: owner, Command: req.Command, Args: req.Args, Status: statusRunning,
			CreatedAt: begin.UTC(), Limits: limits, Unlimited: s.cgroups == nil,
		},
		Env: req.Env,
	}
	if rec.Args == nil {
		rec.Args = []string{}
	}
	if timeout > 0 {
		rec.Timeout = timeout.String()
	}
	lj := newLiveJob(rec.ID, s.store.jobDir(rec.ID))

	// The slot is taken before anything starts, so -max-jobs holds under a burst.
	s.mu.Lock()
	if s.cfg.maxJobs > 0 && len(s.live) >= s.cfg.maxJobs {
		s.mu.Unlock()
		return record{}, errTooManyJobs
	}
	s.live[rec.ID] = lj
	s.mu.Unlock()

	if err := s.store.create(rec); err != nil {
		s.dropLive(lj)
		return record{}, err
	}
	cmd, report, err := s.launch(rec, timeout, lj)
	close(lj.launched)
	if err == nil && report.Error == "" {
		// The init created the output file before it reported.
		if err := s.watcher.watch(lj.out); err != nil {
			slog.Warn("output will be followed only at the end", "job", rec.ID, "err", err)
		}
		lj.out.changed() // for followers that came while it started
	}
	if err != nil {
		s.finish(lj, err)
		rec, _ = s.store.get(rec.ID)
		return rec, nil
	}
	if report.Error == "" {
		s.metrics.observeStart(time.Since(begin))
		startedAt := report.StartedAt.UTC()
		rec, err = s.store.update(rec.ID, func(r *record) {
			r.StartedAt = &startedAt
			r.InitPID = cmd.Process.Pid
			r.InitStart = procStartTime(cmd.Process.Pid)
		})
		if err != nil {
			slog.Error("record start", "job", rec.ID, "err", err)
		}
		slog.Info("job started", "job", rec.ID, "owner", owner, "command", rec.Command, "args", rec.Args)
	}
	s.metrics.started.Add(1)
	go func() {
		cmd.Wait()
		s.finish(lj, nil)
	}()
	if timeout > 0 {
		go s.enforceDeadline(lj, timeout)
	}
	if report.Error != "" {
		<-lj.done
	}
	rec, _ = s.store.get(rec.ID)
	return rec, nil
}

// launch clones the job's init into its namespaces and cgroup, hands it its
// spec and reads its start report.
func (s *server) launch(rec record, timeout time.Duration, lj *liveJob) (*exec.Cmd, startReport, error) {
	var report startReport
	if s.cgroups != nil {
		cg, err := s.cgroups.newJob(rec.ID, rec.Limits)
		if err != nil {
			return nil, report, fmt.Errorf("create cgroup: %w", err)
		}
		lj.cg = cg
	}
	specR, specW, err := os.Pipe()
	if err != nil {
		return nil, report, err
	}
	defer specW.Close()
	reportR, reportW, err := os.Pipe()
	if err != nil {
		specR.Close()
		return nil, report, err
	}
	defer reportR.Close()

	cmd := &exec.Cmd{
		Path:       "/proc/self/exe",
		Args:       []string{"worker", initArg, s.store.jobDir(rec.ID)},
		Env:        initRuntimeEnv,
		Stdin:      specR,
		ExtraFiles: []*os.File{reportW},
		SysProcAttr: &syscall.SysProcAttr{
			Cloneflags: jobNamespaceFlag,
			Setsid:     true, // its own session: a terminal's signals and the server's end don't reach it
		},
	}
	cgFD := -1
	commandCgroup := ""
	if lj.cg != nil {
		files, err := lj.cg.commandFiles()
		if err != nil {
			specR.Close()
			reportW.Close()
			return nil, report, err
		}
		defer func() {
			for _, f := range files {
				f.Close()
			}
		}()
		cmd.ExtraFiles = append(cmd.ExtraFiles, files...)
		commandCgroup = commandCgroupV1
		if lj.cg.unified {
			commandCgroup = commandCgroupV2
		}
		if cgFD, err = lj.cg.openFD(); err != nil {
			specR.Close()
			reportW.Close()
			return nil, report, fmt.Errorf("open job cgroup: %w", err)
		}
		if cgFD >= 0 {
			// cgroup v2: born in its cgroup, so not one instruction runs unlimited.
			cmd.SysProcAttr.UseCgroupFD = true
			cmd.SysProcAttr.CgroupFD = cgFD
			defer unix.Close(cgFD)
		}
	}
	err = cmd.Start()
	specR.Close()
	reportW.Close()
	if err != nil {
		return nil, report, fmt.Errorf("start job init: %w", err)
	}
	lj.signal = func(sig syscall.Signal) error { return cmd.Process.Signal(sig) }
	fail := func(err error) (*exec.Cmd, startReport, error) {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, report, err
	}
	if lj.cg != nil && cgFD < 0 {
		// cgroup v1: joined before the init reads its spec, so before the command exists.
		if err := lj.cg.addProc(cmd.Process.Pid); err != nil {
			return fail(fmt.Errorf("join job cgroup: %w", err))
		}
	}
	spec := initSpec{
		ID: rec.ID, Command: rec.Command, Args: rec.Args, Env: jobEnv(rec), UID: s.uid, GID: s.gid,
		Hostname: rec.ID, Timeout: timeout, Grace: s.cfg.grace, OutputCap: s.cfg.outputCap,
		ScratchBytes: rec.Limits.Memory, CommandCgroup: commandCgroup, Pids: rec.Limits.Pids,
	}
	if spec.ScratchBytes == 0 {
		spec.ScratchBytes = s.cfg.caps.Memory
	}
	// A spec can be up to a request body in size, more than a pipe holds:
	// an init that never reads it must not hold the request forever.
	specW.SetWriteDeadline(time.Now().Add(startTimeout))
	if err := json.NewEncoder(specW).Encode(spec); err != nil {
		return fail(fmt.Errorf("send job spec: %w", err))
	}
	specW.Close()
	reportR.SetReadDeadline(time.Now().Add(startTimeout))
	if err := json.NewDecoder(reportR).Decode(&report); err != nil {
		return fail(fmt.Errorf("job init did not report its start: %w", err))
	}
	return cmd, report, nil
}

// initRuntimeEnv is the whole environment of a job's init (the job's own is
// in its spec). The init is small and mostly blocked in syscalls: one P and
// no collection before its heap nears the limit make its start-up cost about
// half the CPU of the defaults, which is most of the cost of a short job.
var initRuntimeEnv = []string{"GOMAXPROCS=1", "GOGC=off", "GOMEMLIMIT=32MiB"}

// jobEnv is the whole environment of a job: the basics, then the request's.
func jobEnv(rec record) []string {
	env := map[string]string{"PATH": jobPath, "HOME": jobWorkDir, "HOSTNAME": rec.ID}
	for k, v := range rec.Env {
		env[k] = v
	}
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	return out
}

func newLiveJob(id, dir string) *liveJob {
	return &liveJob{
		id:       id,
		out:      newJobOutput(filepath.Join(dir, outputFile)),
		launched: make(chan struct{}),
		done:     make(chan struct{}),
	}
}

func (s *server) dropLive(lj *liveJob) {
	s.mu.Lock()
	delete(s.live, lj.id)
	s.mu.Unlock()
}

// enforceDeadline is the server's backstop for a timeout: the init enforces
// it, but an init that does not end in time is killed from outside.
func (s *server) enforceDeadline(lj *liveJob, timeout time.Duration) {
	t := time.NewTimer(timeout + s.cfg.grace + forceEndMargin)
	defer t.Stop()
	select {
	case <-lj.done:
	case <-t.C:
		s.forceEnd(lj, reasonTimeout)
	}
}

// forceEnd kills a job from outside: its init (whose death as PID 1 kills
// the namespace) and everything in its cgroup.
func (s *server) forceEnd(lj *liveJob, reason string) {
	lj.forced.CompareAndSwap(nil, reason)
	slog.Warn("job init did not end in time; killing it", "job", lj.id, "reason", reason)
	if lj.signal != nil {
		lj.signal(unix.SIGKILL)
	}
	if lj.cg != nil {
		if err := lj.cg.kill(); err != nil {
			slog.Error("kill job cgroup", "job", lj.id, "err", err)
		}
	}
}

// stopJob stops a running job and returns it once it has ended; an ended
// job is returned unchanged.
func (s *server) stopJob(id string) (record, error) {
	s.mu.Lock()
	lj := s.live[id]
	s.mu.Unlock()
	if lj != nil {
		<-lj.launched // a stop during the start lands once there is something to stop
	}
	if lj == nil || lj.signal == nil {
		if lj != nil {
			<-lj.done
		}
		rec, _ := s.store.get(id)
		return rec, nil
	}
	lj.signal(unix.SIGTERM) // the init sends TERM to all, and KILL after the grace period
	t := time.NewTimer(s.cfg.grace + forceEndMargin)
	defer t.Stop()
	select {
	case <-lj.done:
	case <-t.C:
		s.forceEnd(lj, reasonStopped)
		select {
		case <-lj.done:
		case <-time.After(forceEndMargin):
			return record{}, fmt.Errorf("job %s did not end after SIGKILL", id)
		}
	}
	rec, _ := s.store.get(id)
	return rec, nil
}

// finish records the end of a job whose init has exited (or never started:
// startErr). It reads the init's exit record, the cgroup's verdict and
// usage, makes sure nothing of the job is left, and wakes its followers.
func (s *server) finish(lj *liveJob, startErr error) {
	dir := s.store.jobDir(lj.id)
	var ex exitRecord
	exitErr := readJSON(filepath.Join(dir, exitFile), &ex)
	var usage Usage
	oom := false
	if lj.cg != nil {
		usage, oom = lj.cg.usage(), lj.cg.oomKilled()
		if err := lj.cg.kill(); err != nil {
			slog.Error("kill job cgroup", "job", lj.id, "err", err)
		}
		if err := lj.cg.remove(); err != nil {
			slog.Error("remove job cgroup", "job", lj.id, "err", err)
		}
	}
	forced, _ := lj.forced.Load().(string)
	rec, err := s.store.update(lj.id, func(r *record) {
		applyEnd(r, ex, exitErr, startErr, forced, oom)
		r.Usage = usage
		if fi, err := os.Stat(filepath.Join(dir, outputFile)); err == nil {
			r.OutputBytes = fi.Size()
		}
	})
	if err != nil {
		slog.Error("record job end", "job", lj.id, "err", err)
	}
	s.watcher.unwatch(lj.out)
	lj.out.finish()
	s.dropLive(lj)
	close(lj.done)
	s.metrics.finished(rec.Status)
	var dur time.Duration
	if rec.StartedAt != nil && rec.EndedAt != nil {
		dur = rec.EndedAt.Sub(*rec.StartedAt)
	}
	slog.Info("job ended", "job", rec.ID, "owner", rec.Owner, "command", rec.Command,
		"status", rec.Status, "reason", rec.Reason, "exit_code", derefInt(rec.ExitCode), "duration", dur)
}

// applyEnd sets a record's final status from what is known of the end.
func applyEnd(r *record, ex exitRecord, exitErr, startErr error, forced string, oom bool) {
	now := time.Now().UTC()
	r.EndedAt = &now
	code := func(c int) { r.ExitCode = &c }
	switch {
	case startErr != nil:
		r.Status, r.Reason, r.Error = statusFailed, reasonStartFailed, startErr.Error()
		code(exitSetupFailed)
		return
	case exitErr != nil:
		// The init died without a word: killed from outside (by us, after it
		// ignored a stop or deadline) or the host went down under it.
		code(128 + int(unix.SIGKILL))
		r.Signal = unix.SignalName(unix.SIGKILL)
		switch forced {
		case reasonStopped:
			r.Status, r.Reason = statusStopped, reasonStopped
		case reasonTimeout:
			r.Status, r.Reason = statusFailed, reasonTimeout
		default:
			r.Status, r.Reason = statusFailed, reasonSignaled
			r.Error = "the job's init ended without recording an exit status (killed from outside, or the host restarted)"
		}
		if oom {
			r.Status, r.Reason = statusFailed, reasonOOM
		}
		return
	}
	ended := ex.EndedAt.UTC()
	r.EndedAt = &ended
	if r.StartedAt == nil && !ex.StartedAt.IsZero() {
		started := ex.StartedAt.UTC()
		r.StartedAt = &started
	}
	code(ex.ExitCode)
	r.Error = ex.Error
	r.OutputTruncated = ex.Truncated
	if ex.Signal > 0 {
		r.Signal = unix.SignalName(syscall.Signal(ex.Signal))
	}
	r.Reason = ex.Reason
	switch {
	case ex.Reason == reasonStartFailed:
		r.Status = statusFailed
	case ex.Reason == reasonStopped:
		r.Status = statusStopped
	case oom:
		r.Status, r.Reason = statusFailed, reasonOOM
	case ex.Reason == reasonTimeout:
		r.Status = statusFailed
	case ex.Reason == reasonExited && ex.ExitCode == 0:
		r.Status = statusCompleted
	default:
		r.Status = statusFailed
	}
}

// adoptAll picks up where a previous server left off: jobs that ended while
// it was down get their end recorded; jobs still running are watched again.
func (s *server) adoptAll() {
	for _, rec := range s.store.list() {
		if rec.ended() {
			continue
		}
		lj := newLiveJob(rec.ID, s.store.jobDir(rec.ID))
		if s.cgroups != nil {
			lj.cg = s.cgroups.job(rec.ID)
		}
		s.mu.Lock()
		s.live[rec.ID] = lj
		s.mu.Unlock()
		pidfd := -1
		if rec.InitPID > 0 && procStartTime(rec.InitPID) == rec.InitStart {
			if fd, err := unix.PidfdOpen(rec.InitPID, unix.PIDFD_NONBLOCK); err == nil {
				pidfd = fd
			}
		}
		// Checked again after pidfd_open: the PID may have been reused in between.
		if pidfd < 0 || procStartTime(rec.InitPID) != rec.InitStart {
			if pidfd >= 0 {
				unix.Close(pidfd)
			}
			var startErr error
			if rec.InitPID == 0 {
				startErr = errors.New("the server stopped before the job started")
			}
			close(lj.launched)
			s.finish(lj, startErr)
			continue
		}
		pf := os.NewFile(uintptr(pidfd), "pidfd")
		lj.signal = func(sig syscall.Signal) error { return unix.PidfdSendSignal(int(pf.Fd()), sig, nil, 0) }
		close(lj.launched)
		if err := s.watcher.watch(lj.out); err != nil {
			slog.Warn("output will be followed only at the end", "job", rec.ID, "err", err)
		}
		slog.Info("re-adopted running job", "job", rec.ID, "owner", rec.Owner, "pid", rec.InitPID)
		go func() {
			waitPidfd(pf)
			s.finish(lj, nil)
			pf.Close()
		}()
		if rec.Timeout != "" {
			if d, err := time.ParseDuration(rec.Timeout); err == nil && rec.StartedAt != nil {
				go s.enforceDeadline(lj, d-time.Since(*rec.StartedAt))
			}
		}
	}
	if s.cgroups != nil {
		err := s.cgroups.removeStale(func(id string) bool {
			s.mu.Lock()
			defer s.mu.Unlock()
			return s.live[id] != nil
		})
		if err != nil {
			slog.Warn("remove stale job cgroups", "err", err)
		}
	}
}

// waitPidfd returns when the process behind a (non-blocking) pidfd has
// exited; the wait parks in the runtime's poller, not on a thread.
func waitPidfd(pf *os.File) {
	rc, err := pf.SyscallConn()
	if err != nil {
		return
	}
	rc.Read(func(fd uintptr) bool {
		n, _ := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
		return n > 0
	})
}

// procStartTime is field 22 of /proc/PID/stat, the process's start time in
// clock ticks since boot: with the PID it names one process for good.
func procStartTime(pid int) uint64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return 0
	}
	fields := strings.Fields(string(data[i+1:]))
	if len(fields) < 20 {
		return 0
	}
	v, _ := strconv.ParseUint(fields[19], 10, 64)
	return v
}

// ---- serving ----

func serve(cfg serverConfig) error {
	if err := os.MkdirAll(cfg.stateDir, 0o700); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	lock, err := lockStateDir(cfg.stateDir)
	if err != nil {
		return err
	}
	defer lock.Close()
	if cfg.tlsDir == "" {
		cfg.tlsDir = filepath.Join(cfg.stateDir, "tls")
		if err := ensureServerPKI(cfg.tlsDir, defaultHosts()); err != nil {
			return err
		}
	}
	tlsCfg, err := serverTLSConfig(cfg.tlsDir)
	if err != nil {
		return err
	}
	s, err := newServer(cfg)
	if err != nil {
		return err
	}
	defer s.close()
	ln, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return err
	}
	hs := newHTTPServer(s.routes(), tlsCfg)
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(tls.NewListener(ln, tlsCfg)) }()
	slog.Info("serving", "addr", ln.Addr().String(), "state", cfg.stateDir, "tls", cfg.tlsDir, "jobs_running", s.running())

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM)
	defer signal.Stop(sigs)
	select {
	case err := <-errc:
		return err
	case sig := <-sigs:
		slog.Info("shutting down; jobs keep running", "signal", sig.String())
	}
	close(s.closing)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return hs.Shutdown(ctx)
}

// lockStateDir makes sure one server at a time owns a state dir: two would
// both adopt the same running jobs and record their ends twice. The lock
// goes with the process, however it ends.
func lockStateDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, ".lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock state directory: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("state directory %s is in use by another worker -serve (pid %s); stop it, or give this one its own -state", dir, strings.TrimSpace(string(holder)))
		}
		return nil, fmt.Errorf("lock state directory: %w", err)
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return f, nil
}

func newHTTPServer(h http.Handler, tlsCfg *tls.Config) *http.Server {
	return &http.Server{
		Handler:           h,
		TLSConfig:         tlsCfg,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams: 1000,
			SendPingTimeout:      30 * time.Second,
			PingTimeout:          15 * time.Second,
		},
		ErrorLog: slog.NewLogLogger(slog.Default().Handler(), slog.LevelDebug),
	}
}

// ---- metrics ----

// metrics are the server's counters, written in Prometheus text format.
type metrics struct {
	started       atomic.Int64
	bytesStreamed atomic.Int64
	followers     atomic.Int64

	mu           sync.Mutex
	byStatus     map[string]int64
	startBuckets []int64 // cumulative counts per startBounds
	startSum     float64
	startCount   int64
}

// startBounds are the start-latency histogram's upper bounds, in seconds.
var startBounds = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}

func newMetrics() *metrics {
	return &metrics{byStatus: map[string]int64{}, startBuckets: make([]int64, len(startBounds))}
}

func (m *metrics) observeStart(d time.Duration) {
	sec := d.Seconds()
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, b := range startBounds {
		if sec <= b {
			m.startBuckets[i]++
		}
	}
	m.startSum += sec
	m.startCount++
}

func (m *metrics) finished(status string) {
	m.mu.Lock()
	m.byStatus[status]++
	m.mu.Unlock()
}

func (m *metrics) write(w io.Writer, running int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	fmt.Fprintf(w, "# HELP worker_jobs_started_total Jobs started.\n# TYPE worker_jobs_started_total counter\nworker_jobs_started_total %d\n", m.started.Load())
	fmt.Fprintf(w, "# HELP worker_jobs_running Jobs running now.\n# TYPE worker_jobs_running gauge\nworker_jobs_running %d\n", running)
	fmt.Fprintf(w, "# HELP worker_jobs_finished_total Jobs ended, by final status.\n# TYPE worker_jobs_finished_total counter\n")
	for _, st := range []string{statusCompleted, statusFailed, statusStopped} {
		fmt.Fprintf(w, "worker_jobs_finished_total{status=%q} %d\n", st, m.byStatus[st])
	}
	fmt.Fprintf(w, "# HELP worker_job_start_seconds Time from request to the command running.\n# TYPE worker_job_start_seconds histogram\n")
	for i, b := range startBounds {
		fmt.Fprintf(w, "worker_job_start_seconds_bucket{le=%q} %d\n", strconv.FormatFloat(b, 'g', -1, 64), m.startBuckets[i])
	}
	fmt.Fprintf(w, "worker_job_start_seconds_bucket{le=\"+Inf\"} %d\nworker_job_start_seconds_sum %g\nworker_job_start_seconds_count %d\n", m.startCount, m.startSum, m.startCount)
	fmt.Fprintf(w, "# HELP worker_log_bytes_streamed_total Output bytes sent to followers.\n# TYPE worker_log_bytes_streamed_total counter\nworker_log_bytes_streamed_total %d\n", m.bytesStreamed.Load())
	fmt.Fprintf(w, "# HELP worker_log_followers Log streams open now.\n# TYPE worker_log_followers gauge\nworker_log_followers %d\n", m.followers.Load())
}
