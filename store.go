// store.go: job records and their on-disk state.
//
// Layout under the state dir: jobs/<id>/job.json (the record, written only by
// the server), jobs/<id>/output (the job's output, written only by its init)
// and jobs/<id>/exit.json (the end of the job, written only by its init).
// Every file is written to a temporary name, fsynced and renamed, so a record
// on disk is always complete, whatever happens to the process writing it.
// IDs are random, validated before they touch a path, and never reused: a
// job's directory is created exclusively.
package main

import (
	"crypto/rand"
	"encoding/base32"
	"encoding/json"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Job statuses and end reasons, as in SPEC §5.
const (
	statusRunning   = "RUNNING"
	statusCompleted = "COMPLETED"
	statusFailed    = "FAILED"
	statusStopped   = "STOPPED"

	reasonExited      = "exited"
	reasonSignaled    = "signaled"
	reasonOOM         = "oom"
	reasonTimeout     = "timeout"
	reasonStartFailed = "start_failed"
	reasonStopped     = "stopped"
)

// Limits are a job's resource limits; zero means none asked.
type Limits struct {
	CPU    float64 `json:"cpu,omitempty"`    // cores
	Memory int64   `json:"memory,omitempty"` // bytes
	IOBps  int64   `json:"io_bps,omitempty"` // bytes/s, read and write each
	Pids   int64   `json:"pids,omitempty"`   // tasks
}

// Usage is what a job consumed, from its cgroup's own counters.
type Usage struct {
	CPUSeconds      float64 `json:"cpu_seconds"`
	MemoryPeakBytes int64   `json:"memory_peak_bytes"`
	IOReadBytes     int64   `json:"io_read_bytes"`
	IOWriteBytes    int64   `json:"io_write_bytes"`
}

// Job is what the API shows of a job.
type Job struct {
	ID              string     `json:"id"`
	Owner           string     `json:"owner"`
	Command         string     `json:"command"`
	Args            []string   `json:"args"`
	Status          string     `json:"status"`
	ExitCode        *int       `json:"exit_code"`
	Signal          string     `json:"signal,omitempty"`
	Reason          string     `json:"reason,omitempty"`
	Error           string     `json:"error,omitempty"`
	CreatedAt       time.Time  `json:"created_at"`
	StartedAt       *time.Time `json:"started_at,omitempty"`
	EndedAt         *time.Time `json:"ended_at,omitempty"`
	Timeout         string     `json:"timeout,omitempty"`
	Limits          Limits     `json:"limits"`
	Unlimited       bool       `json:"unlimited,omitempty"` // the server runs with -no-limits
	Usage           Usage      `json:"usage"`
	OutputBytes     int64      `json:"output_bytes"`
	OutputTruncated bool       `json:"output_truncated,omitempty"`
}

// runRequest is the body of POST /v1/jobs.
type runRequest struct {
	Command string            `json:"command"`
	Args    []string          `json:"args"`
	Env     map[string]string `json:"env"`
	Limits  Limits            `json:"limits"`
	Timeout string            `json:"timeout"`
}

func derefInt(p *int) int {
	if p == nil {
		return -1
	}
	return *p
}

func (j *Job) ended() bool { return j.Status != statusRunning }

// record is a job as kept on disk: what the API shows plus what only the
// server needs. The environment is kept out of the API: it may hold secrets.
type record struct {
	Job
	Env       map[string]string `json:"env,omitempty"`
	InitPID   int               `json:"init_pid,omitempty"`
	InitStart uint64            `json:"init_start,omitempty"` // /proc/PID/stat starttime: tells a reused PID apart
}

const (
	recordFile = "job.json"
	outputFile = "output"
	exitFile   = "exit.json"
)

// store owns the job records: in memory for reads, on disk for durability.
type store struct {
	dir string // <state>/jobs

	mu   sync.Mutex
	jobs map[string]*storedJob
}

// storedJob serializes the writes of one job's record without holding up
// every other job while it is fsynced.
type storedJob struct {
	mu  sync.Mutex
	rec record
}

func openStore(dir string) (*store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create job store: %w", err)
	}
	s := &store{dir: dir, jobs: map[string]*storedJob{}}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read job store: %w", err)
	}
	for _, e := range entries {
		if !e.IsDir() || !validID(e.Name()) {
			continue
		}
		var rec record
		if err := readJSON(filepath.Join(dir, e.Name(), recordFile), &rec); err != nil {
			// A directory without a complete record is a job whose creation
			// was cut short: it never started, so there is nothing to show.
			slog.Warn("skipping job without a readable record", "job", e.Name(), "err", err)
			continue
		}
		s.jobs[rec.ID] = &storedJob{rec: rec}
	}
	return s, nil
}

// newID returns a fresh job ID: 80 random bits, lower-case base32, which is
// URL-safe, case-insensitive-filesystem-safe and usable as a host name.
func newID() string {
	b := make([]byte, 10)
	rand.Read(b)
	return strings.ToLower(base32.StdEncoding.EncodeToString(b))
}

func validID(id string) bool {
	if len(id) != 16 {
		return false
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= '2' && c <= '7') {
			return false
		}
	}
	return true
}

func (s *store) jobDir(id string) string { return filepath.Join(s.dir, id) }

// create makes the job's directory and its first record; the job's init
// creates the output file. The directory is created exclusively, so an ID is
// never reused.
func (s *store) create(rec record) error {
	dir := s.jobDir(rec.ID)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fmt.Errorf("create job directory: %w", err)
	}
	if err := writeJSON(filepath.Join(dir, recordFile), rec); err != nil {
		return err
	}
	s.mu.Lock()
	s.jobs[rec.ID] = &storedJob{rec: rec}
	s.mu.Unlock()
	return nil
}

func (s *store) entry(id string) *storedJob {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.jobs[id]
}

// get returns a copy of the job's record.
func (s *store) get(id string) (record, bool) {
	e := s.entry(id)
	if e == nil {
		return record{}, false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.rec.clone(), true
}

// update changes a job's record on disk, then in memory; if the write fails
// neither changes.
func (s *store) update(id string, change func(*record)) (record, error) {
	e := s.entry(id)
	if e == nil {
		return record{}, fmt.Errorf("no job %s", id)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	next := e.rec.clone()
	change(&next)
	if err := writeJSON(filepath.Join(s.jobDir(id), recordFile), next); err != nil {
		return e.rec.clone(), err
	}
	e.rec = next
	return next.clone(), nil
}

// list returns copies of every record, oldest first.
func (s *store) list() []record {
	s.mu.Lock()
	entries := make([]*storedJob, 0, len(s.jobs))
	for _, e := range s.jobs {
		entries = append(entries, e)
	}
	s.mu.Unlock()
	out := make([]record, 0, len(entries))
	for _, e := range entries {
		e.mu.Lock()
		out = append(out, e.rec.clone())
		e.mu.Unlock()
	}
	slices.SortFunc(out, func(a, b record) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out
}

func (r record) clone() record {
	c := r
	c.Args = slices.Clone(r.Args)
	if r.Env != nil {
		c.Env = make(map[string]string, len(r.Env))
		for k, v := range r.Env {
			c.Env[k] = v
		}
	}
	if r.ExitCode != nil {
		v := *r.ExitCode
		c.ExitCode = &v
	}
	return c
}

// writeJSON writes v to path atomically: temp file, fsync, rename.
func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return writeFileAtomic(path, append(data, '\n'), 0o600)
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op once renamed
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(mode)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func readJSON(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("decode %s: %w", path, err)
	}
	return nil
}

// parseSize reads a size as the command line takes it: bytes, or a number
// with a K, M or G suffix (powers of 1024), such as 256M or 1.5G.
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(strings.TrimSuffix(t, "iB"), "B")
	mult := int64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		case 'g', 'G':
			mult = 1 << 30
		case 't', 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			t = t[:n-1]
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || t == "" || strings.ContainsAny(t, "xXpP_") || math.IsNaN(v) || math.IsInf(v, 0) {
		return 0, fmt.Errorf("size %q: want bytes or a number with K, M or G, such as 256M", s)
	}
	if v < 0 {
		return 0, fmt.Errorf("size %q: must not be negative", s)
	}
	b := v * float64(mult)
	if b >= math.MaxInt64 {
		return 0, fmt.Errorf("size %q: too large", s)
	}
	return int64(b), nil
}

// formatSize writes a byte count the way parseSize reads it.
func formatSize(n int64) string {
	units := []struct {
		suffix string
		size   int64
	}{{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}}
	for _, u := range units {
		if n >= u.size && n%u.size == 0 {
			return strconv.FormatInt(n/u.size, 10) + u.suffix
		}
	}
	for _, u := range units {
		if n >= u.size {
			return strconv.FormatFloat(float64(n)/float64(u.size), 'f', 1, 64) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}
