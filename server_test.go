//go:build linux

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestEchoHasNoShell(t *testing.T) {
	ts := newTestServer(t)
	out, j := ts.runWait("echo", "a; rm -rf /")
	if out != "a; rm -rf /\n" || j.Status != statusCompleted {
		t.Fatalf("got %q, %s", out, j.Status)
	}
}

func TestRoleMatrix(t *testing.T) {
	ts := newTestServer(t)
	own := map[string]string{} // owner → a job of theirs
	for _, who := range []string{"admin", "alice", "bob"} {
		j := ts.run(who, runRequest{Command: "sleep", Args: []string{"60"}})
		own[who] = j.ID
	}
	// Each caller against alice's job (status and log; stops come last, they
	// end the jobs), and against their own where they can have one.
	cases := []struct {
		who          string
		canRun       bool
		status       int // for status and log of alice's job
		listSeesAll  bool
		listSeesSelf bool
	}{
		{who: "admin", canRun: true, status: 200, listSeesAll: true},
		{who: "alice", canRun: true, status: 200, listSeesSelf: true},
		{who: "bob", canRun: true, status: 404, listSeesSelf: true},
		{who: "vera", canRun: false, status: 200, listSeesAll: true},
		{who: "norole", canRun: false, status: 403},
		{who: "wizard", canRun: false, status: 403},
	}
	for _, c := range cases {
		t.Run(c.who, func(t *testing.T) {
			code, body := ts.do(c.who, "POST", "/v1/jobs", runRequest{Command: "true"})
			if (code == http.StatusCreated) != c.canRun {
				t.Errorf("run: %d %s", code, body)
			}
			if !c.canRun && code != http.StatusForbidden {
				t.Errorf("run refused with %d, want 403", code)
			}
			code, body = ts.do(c.who, "GET", "/v1/jobs", nil)
			switch {
			case c.status == 403:
				if code != 403 {
					t.Errorf("list: %d, want 403", code)
				}
			default:
				var jobs []Job
				json.Unmarshal(body, &jobs)
				owners := map[string]bool{}
				for _, j := range jobs {
					owners[j.Owner] = true
				}
				if c.listSeesAll && !(owners["admin"] && owners["alice"] && owners["bob"]) {
					t.Errorf("list sees owners %v, want all", owners)
				}
				if c.listSeesSelf && (len(owners) != 1 || !owners[c.who]) {
					t.Errorf("list sees owners %v, want only %s", owners, c.who)
				}
			}
			id := own["alice"]
			for _, ep := range []struct{ method, path string }{{"GET", "/v1/jobs/" + id}, {"GET", "/v1/jobs/" + id + "/log?follow=0"}} {
				if code, body := ts.do(c.who, ep.method, ep.path, nil); code != c.status {
					t.Errorf("%s %s: %d %s, want %d", ep.method, ep.path, code, body, c.status)
				}
			}
			if id, ok := own[c.who]; ok { // own job: always visible
				if code, _ := ts.do(c.who, "GET", "/v1/jobs/"+id, nil); code != 200 {
					t.Errorf("own job status: %d", code)
				}
			}
		})
	}
	// Stops last: they end the jobs.
	for _, c := range []struct {
		who, target string
		want        int
	}{{"vera", "alice", 403}, {"bob", "alice", 404}, {"norole", "alice", 403}, {"wizard", "alice", 403}, {"alice", "alice", 200}, {"admin", "bob", 200}, {"admin", "admin", 200}} {
		code, body := ts.do(c.who, "POST", "/v1/jobs/"+own[c.target]+"/stop", nil)
		if code != c.want {
			t.Errorf("stop %s's job as %s: %d %s, want %d", c.target, c.who, code, body, c.want)
		}
	}
}

func TestBadRequestsAreRefusedAndStartNothing(t *testing.T) {
	ts := newTestServer(t, func(c *serverConfig) { c.caps = Limits{CPU: 2, Memory: 1 << 30, IOBps: 100 << 20, Pids: 100} })
	for _, c := range []struct {
		name, body string
		want       int
		mention    string
	}{
		{"bad json", `{"command":`, 400, "bad request body"},
		{"unknown field", `{"command":"true","bogus":1}`, 400, "bogus"},
		{"two values", `{"command":"true"} {}`, 400, "more than one"},
		{"empty command", `{"command":""}`, 400, "command"},
		{"no command", `{}`, 400, "command"},
		{"NUL in command", `{"command":"tr\u0000ue"}`, 400, "NUL"},
		{"NUL in args", `{"command":"echo","args":["a\u0000b"]}`, 400, "args[0]"},
		{"bad env name", `{"command":"true","env":{"A=B":"c"}}`, 400, "env"},
		{"cpu as string", `{"command":"true","limits":{"cpu":"NaN"}}`, 400, "limits.cpu"},
		{"negative cpu", `{"command":"true","limits":{"cpu":-1}}`, 400, "limits.cpu"},
		{"cpu over cap", `{"command":"true","limits":{"cpu":64}}`, 400, "limits.cpu"},
		{"memory fraction", `{"command":"true","limits":{"memory":1.5}}`, 400, "limits.memory"},
		{"negative memory", `{"command":"true","limits":{"memory":-5}}`, 400, "limits.memory"},
		{"memory over cap", `{"command":"true","limits":{"memory":1099511627776}}`, 400, "limits.memory"},
		{"tiny memory", `{"command":"true","limits":{"memory":1000}}`, 400, "limits.memory"},
		{"io over cap", `{"command":"true","limits":{"io_bps":1099511627776}}`, 400, "limits.io_bps"},
		{"negative pids", `{"command":"true","limits":{"pids":-1}}`, 400, "limits.pids"},
		{"pids over cap", `{"command":"true","limits":{"pids":101}}`, 400, "limits.pids"},
		{"bad timeout", `{"command":"true","timeout":"soon"}`, 400, "timeout"},
		{"negative timeout", `{"command":"true","timeout":"-1s"}`, 400, "timeout"},
		{"huge body", `{"command":"true","args":["` + strings.Repeat("a", 2<<20) + `"]}`, 413, "body"},
	} {
		t.Run(c.name, func(t *testing.T) {
			code, body := ts.do("admin", "POST", "/v1/jobs", c.body)
			var e struct{ Error string }
			json.Unmarshal(body, &e)
			if code != c.want || !strings.Contains(e.Error, c.mention) {
				t.Fatalf("got %d %s, want %d mentioning %q", code, body, c.want, c.mention)
			}
		})
	}
	if jobs := ts.srv.store.list(); len(jobs) != 0 {
		t.Fatalf("bad requests created %d jobs", len(jobs))
	}
}

func TestUnknownJobsMethodsAndPaths(t *testing.T) {
	ts := newTestServer(t)
	for _, c := range []struct {
		method, path string
		want         int
	}{
		{"GET", "/v1/jobs/aaaaaaaaaaaaaaaa", 404},
		{"GET", "/v1/jobs/not-an-id", 404},
		{"GET", "/v1/jobs/..%2f..%2fetc", 404},
		{"GET", "/v1/jobs/aaaaaaaaaaaaaaaa/log", 404},
		{"POST", "/v1/jobs/aaaaaaaaaaaaaaaa/stop", 404},
		{"DELETE", "/v1/jobs", 405},
		{"PUT", "/v1/jobs/aaaaaaaaaaaaaaaa", 405},
		{"GET", "/v1/jobs/aaaaaaaaaaaaaaaa/stop", 405},
		{"POST", "/healthz", 405},
		{"GET", "/v2/nothing", 404},
		{"GET", "/healthz", 200},
	} {
		code, body := ts.do("admin", c.method, c.path, nil)
		if code != c.want {
			t.Errorf("%s %s: %d %s, want %d", c.method, c.path, code, body, c.want)
		}
		if code != 200 && !json.Valid(body) {
			t.Errorf("%s %s: error body is not JSON: %s", c.method, c.path, body)
		}
	}
}

func TestExitCodesSignalsAndStartFailures(t *testing.T) {
	ts := newTestServer(t)
	dir := t.TempDir() // under /tmp: the job cannot see it, but the path need not exist for these
	_ = dir
	for _, c := range []struct {
		name    string
		req     runRequest
		status  string
		reason  string
		code    int
		signal  string
		errText string
	}{
		{"success", runRequest{Command: "true"}, statusCompleted, reasonExited, 0, "", ""},
		{"failure", runRequest{Command: "sh", Args: []string{"-c", "exit 7"}}, statusFailed, reasonExited, 7, "", ""},
		{"signal", runRequest{Command: "sh", Args: []string{"-c", "kill -KILL $$"}}, statusFailed, reasonSignaled, 137, "SIGKILL", ""},
		{"not found", runRequest{Command: "no-such-command-here"}, statusFailed, reasonStartFailed, 127, "", "command not found"},
		{"not executable", runRequest{Command: "/etc/passwd"}, statusFailed, reasonStartFailed, 126, "", "cannot execute"},
		{"directory", runRequest{Command: "/usr"}, statusFailed, reasonStartFailed, 126, "", "cannot execute"},
		{"timeout", runRequest{Command: "sleep", Args: []string{"30"}, Timeout: "300ms"}, statusFailed, reasonTimeout, 143, "SIGTERM", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			j := ts.run("admin", c.req)
			_, j = ts.wait("admin", j.ID)
			if j.Status != c.status || j.Reason != c.reason || derefInt(j.ExitCode) != c.code || j.Signal != c.signal || !strings.Contains(j.Error, c.errText) {
				t.Fatalf("got %s/%s code %d signal %q error %q; want %s/%s code %d signal %q error ~%q",
					j.Status, j.Reason, derefInt(j.ExitCode), j.Signal, j.Error, c.status, c.reason, c.code, c.signal, c.errText)
			}
		})
	}
}

func TestStopSendsTermThenKillAfterGrace(t *testing.T) {
	ts := newTestServer(t, func(c *serverConfig) { c.grace = 500 * time.Millisecond })
	polite := ts.run("admin", runRequest{Command: "sh", Args: []string{"-c", "trap 'echo got TERM; exit 0' TERM; echo ready; while :; do sleep 0.05; done"}})
	waitForOutput(t, ts, polite.ID, "ready")
	code, body := ts.do("admin", "POST", "/v1/jobs/"+polite.ID+"/stop", nil)
	var j Job
	json.Unmarshal(body, &j)
	if code != 200 || j.Status != statusStopped || j.Reason != reasonStopped {
		t.Fatalf("stop: %d %s", code, body)
	}
	if out, _ := ts.wait("admin", polite.ID); !strings.Contains(out, "got TERM") {
		t.Fatalf("the job did not see SIGTERM: %q", out)
	}
	stubborn := ts.run("admin", runRequest{Command: "sh", Args: []string{"-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"}})
	waitForOutput(t, ts, stubborn.ID, "ready")
	begin := time.Now()
	code, body = ts.do("admin", "POST", "/v1/jobs/"+stubborn.ID+"/stop", nil)
	json.Unmarshal(body, &j)
	if code != 200 || j.Status != statusStopped || j.Signal != "SIGKILL" || time.Since(begin) < 500*time.Millisecond {
		t.Fatalf("stop of a job ignoring TERM: %d %s after %v", code, body, time.Since(begin))
	}
	// Stopping an ended job returns it unchanged.
	_, again := ts.do("admin", "POST", "/v1/jobs/"+stubborn.ID+"/stop", nil)
	if string(again) != string(body) {
		t.Fatalf("second stop changed the job:\n%s\n%s", body, again)
	}
}

// waitForOutput waits until the job's output contains s.
func waitForOutput(t *testing.T, ts *testServer, id, s string) {
	t.Helper()
	eventually(t, 10*time.Second, func() error {
		_, out := ts.do("admin", "GET", "/v1/jobs/"+id+"/log?follow=0", nil)
		if !strings.Contains(string(out), s) {
			return fmt.Errorf("job %s output %q lacks %q", id, out, s)
		}
		return nil
	})
}

func TestMaxJobsRefusesWith429(t *testing.T) {
	ts := newTestServer(t, func(c *serverConfig) { c.maxJobs = 2 })
	a := ts.run("admin", runRequest{Command: "sleep", Args: []string{"30"}})
	ts.run("admin", runRequest{Command: "sleep", Args: []string{"30"}})
	code, body := ts.do("admin", "POST", "/v1/jobs", runRequest{Command: "true"})
	if code != http.StatusTooManyRequests {
		t.Fatalf("third job: %d %s, want 429", code, body)
	}
	ts.do("admin", "POST", "/v1/jobs/"+a.ID+"/stop", nil)
	if code, body := ts.do("admin", "POST", "/v1/jobs", runRequest{Command: "true"}); code != http.StatusCreated {
		t.Fatalf("after a stop: %d %s", code, body)
	}
}

func TestJobWritingFlatOutWithNoReaderNeverBlocks(t *testing.T) {
	ts := newTestServer(t)
	j := ts.run("admin", runRequest{Command: "head", Args: []string{"-c", "200M", "/dev/zero"}})
	// Nobody reads; the job must end on its own.
	s := ts.srv
	s.mu.Lock()
	lj := s.live[j.ID]
	s.mu.Unlock()
	if lj != nil {
		select {
		case <-lj.done:
		case <-time.After(60 * time.Second):
			t.Fatal("a job writing 200 MB with no reader did not end in 60 s")
		}
	}
	rec, _ := s.store.get(j.ID)
	if rec.Status != statusCompleted || rec.OutputBytes != 200<<20 {
		t.Fatalf("got %s with %d output bytes", rec.Status, rec.OutputBytes)
	}
}

func TestOutputCapDropsTheRestAndSaysSo(t *testing.T) {
	ts := newTestServer(t, func(c *serverConfig) { c.outputCap = 64 << 10 })
	out, j := ts.runWait("sh", "-c", "head -c 1M /dev/zero | tr '\\0' x; echo; echo still running")
	if j.Status != statusCompleted || !j.OutputTruncated {
		t.Fatalf("job %s truncated=%v", j.Status, j.OutputTruncated)
	}
	if want := strings.Repeat("x", 64<<10) + truncationMarker(64<<10); out != want {
		t.Fatalf("output is %d bytes, want the cap plus one marker (%d)", len(out), len(want))
	}
}

func TestHealthAndMetrics(t *testing.T) {
	ts := newTestServer(t)
	ts.runWait("true")
	ts.runWait("false")
	code, body := ts.do("vera", "GET", "/metrics", nil)
	if code != 200 {
		t.Fatalf("metrics: %d", code)
	}
	for _, want := range []string{
		"worker_jobs_started_total 2", "worker_jobs_running 0",
		`worker_jobs_finished_total{status="COMPLETED"} 1`, `worker_jobs_finished_total{status="FAILED"} 1`,
		"worker_job_start_seconds_count 2", "worker_log_bytes_streamed_total", "worker_log_followers 0",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}
	if code, _ := ts.do("norole", "GET", "/healthz", nil); code != 403 {
		t.Errorf("healthz without a role: %d, want 403", code)
	}
}

func TestEnvReachesTheJob(t *testing.T) {
	ts := newTestServer(t)
	j := ts.run("admin", runRequest{Command: "sh", Args: []string{"-c", "echo $GREETING $HOME"}, Env: map[string]string{"GREETING": "hello world"}})
	if out, _ := ts.wait("admin", j.ID); out != "hello world /job\n" {
		t.Fatalf("got %q", out)
	}
}

// Limits enforced for real through the API, on this host's cgroups.

func TestAPIMemoryLimitOOMKillsAndIsReported(t *testing.T) {
	ts := newTestServer(t)
	hog := "b = bytearray(300 << 20); print('survived')"
	j := ts.run("admin", runRequest{Command: "python3", Args: []string{"-c", hog}, Limits: Limits{Memory: 32 << 20}})
	out, j := ts.wait("admin", j.ID)
	if j.Status != statusFailed || j.Reason != reasonOOM || strings.Contains(out, "survived") {
		t.Fatalf("300 MB under 32M: %s/%s, output %q", j.Status, j.Reason, out)
	}
	t.Logf("under 32M: %s/%s, memory peak %d bytes", j.Status, j.Reason, j.Usage.MemoryPeakBytes)
	j = ts.run("admin", runRequest{Command: "python3", Args: []string{"-c", "b = bytearray(200 << 20); print('done')"}, Limits: Limits{Memory: 256 << 20}})
	out, j = ts.wait("admin", j.ID)
	if j.Status != statusCompleted || out != "done\n" {
		t.Fatalf("200 MB under 256M: %s/%s %q", j.Status, j.Reason, out)
	}
	if p := j.Usage.MemoryPeakBytes; p < 200<<20 || p > 256<<20 {
		t.Fatalf("memory_peak_bytes = %d, want between 200M and 256M", p)
	}
	t.Logf("under 256M: completed, memory peak %d bytes", j.Usage.MemoryPeakBytes)
}

func TestAPICPULimitThrottles(t *testing.T) {
	ts := newTestServer(t)
	spin := "import time\nt = time.time()\nwhile time.time() - t < 3: pass"
	j := ts.run("admin", runRequest{Command: "python3", Args: []string{"-c", spin}, Limits: Limits{CPU: 0.2}})
	_, j = ts.wait("admin", j.ID)
	if j.Status != statusCompleted || j.Usage.CPUSeconds < 0.2 || j.Usage.CPUSeconds > 1.0 {
		t.Fatalf("3 s spin under 0.2 cores: %s, %.3f cpu-seconds; want 0.2-1.0", j.Status, j.Usage.CPUSeconds)
	}
	t.Logf("3 s spin under -cpu 0.2: %.3f cpu-seconds", j.Usage.CPUSeconds)
}

func TestAPIPidsLimitCountsTheJobsTasksOnly(t *testing.T) {
	ts := newTestServer(t)
	forker := `
import os, time, errno
ok = again = 0
for i in range(40):
    try:
        if os.fork() == 0:
            time.sleep(1); os._exit(0)
        ok += 1
    except OSError as e:
        if e.errno != errno.EAGAIN: raise
        again += 1
print(ok, again)
`
	j := ts.run("admin", runRequest{Command: "python3", Args: []string{"-c", forker}, Limits: Limits{Pids: 10}})
	out, j := ts.wait("admin", j.ID)
	// python itself is one task: 9 children fit under 10, the other 31 get EAGAIN.
	if j.Status != statusCompleted || out != "9 31\n" {
		t.Fatalf("40 forks under -pids 10: %s, output %q; want 9 started, 31 EAGAIN", j.Status, out)
	}
}

func TestAPIIOLimitThrottlesDirectReads(t *testing.T) {
	ts := newTestServer(t)
	// A 6 MB file on the host's disk, readable by the job user; not under
	// /tmp, which jobs do not see.
	dir, err := os.MkdirTemp("/var/tmp", "worker-io-test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	file := filepath.Join(dir, "data")
	if err := os.WriteFile(file, bytes.Repeat([]byte{1}, 6<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	// dd's own timing: job start-up is not what is measured.
	ddSeconds := regexp.MustCompile(`copied, ([0-9.]+) s`)
	read := func(l Limits) (time.Duration, Job) {
		j := ts.run("admin", runRequest{Command: "dd", Args: []string{"if=" + file, "of=/dev/null", "bs=1M", "iflag=direct"}, Limits: l})
		out, j := ts.wait("admin", j.ID)
		m := ddSeconds.FindStringSubmatch(out)
		if j.Status != statusCompleted || m == nil {
			t.Fatalf("dd: %s %s", j.Status, out)
		}
		sec, _ := strconv.ParseFloat(m[1], 64)
		return time.Duration(sec * float64(time.Second)), j
	}
	free, _ := read(Limits{})
	limited, j := read(Limits{IOBps: 2 << 20})
	if limited < 2500*time.Millisecond || free > limited/4 {
		t.Fatalf("6 MB O_DIRECT read: %v under -io 2M, %v unlimited; want >= 2.5 s and far faster", limited, free)
	}
	if j.Usage.IOReadBytes < 6<<20 {
		t.Fatalf("io_read_bytes = %d, want >= 6M", j.Usage.IOReadBytes)
	}
	t.Logf("6 MB O_DIRECT read: %v under -io 2M (io_read_bytes %d), %v unlimited", limited, j.Usage.IOReadBytes, free)
}

func TestNoLimitsModeSaysSoInEachRecord(t *testing.T) {
	ts := newTestServer(t, func(c *serverConfig) { c.noLimits = true })
	_, j := ts.runWait("true")
	if !j.Unlimited || j.Status != statusCompleted {
		t.Fatalf("job under -no-limits: unlimited=%v status %s", j.Unlimited, j.Status)
	}
}
