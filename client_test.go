//go:build linux

package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// End-to-end tests: the real binary, built static, as a user would run it.

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

func workerBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "worker-bin")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "worker")
		cmd := exec.Command("go", "build", "-o", builtBin, ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = errors.New("go build: " + err.Error() + "\n" + string(out))
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return builtBin
}

// serverProc is `worker -serve` running as a child of the test.
type serverProc struct {
	cmd   *exec.Cmd
	addr  string
	state string
	logs  *bytes.Buffer
	mu    *sync.Mutex
}

var servingAddr = regexp.MustCompile(`msg=serving addr=(\S+)`)

func startServerProc(t testing.TB, state string, extra ...string) *serverProc {
	t.Helper()
	requireRoot(t)
	args := append([]string{"-serve", "-listen", "127.0.0.1:0", "-state", state, "-grace", "1s"}, extra...) // a later -listen wins
	cmd := exec.Command(workerBinary(t), args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sp := &serverProc{cmd: cmd, state: state, logs: &bytes.Buffer{}, mu: &sync.Mutex{}}
	addrc := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			sp.mu.Lock()
			sp.logs.WriteString(sc.Text() + "\n")
			sp.mu.Unlock()
			if m := servingAddr.FindStringSubmatch(sc.Text()); m != nil {
				addrc <- m[1]
			}
		}
	}()
	select {
	case sp.addr = <-addrc:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("server did not start:\n%s", sp.logText())
	}
	t.Cleanup(func() { sp.kill(syscall.SIGTERM) })
	return sp
}

func (sp *serverProc) logText() string {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.logs.String()
}

func (sp *serverProc) kill(sig syscall.Signal) {
	if sp.cmd.ProcessState != nil {
		return
	}
	sp.cmd.Process.Signal(sig)
	sp.cmd.Wait()
}

// cli runs the client binary against sp and returns stdout, stderr and the exit code.
func (sp *serverProc) cli(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(workerBinary(t), args...)
	cmd.Env = []string{"WORKER_ADDR=" + sp.addr, "WORKER_TLS=" + filepath.Join(sp.state, "tls"), "HOME=" + t.TempDir()}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}

func TestClientEndToEnd(t *testing.T) {
	sp := startServerProc(t, t.TempDir())
	for _, f := range []struct {
		name string
		mode os.FileMode
	}{{"ca.pem", 0o644}, {"ca-key.pem", 0o600}, {"server.pem", 0o644}, {"server-key.pem", 0o600}, {"client.pem", 0o644}, {"client-key.pem", 0o600}} {
		fi, err := os.Stat(filepath.Join(sp.state, "tls", f.name))
		if err != nil || fi.Mode().Perm() != f.mode {
			t.Errorf("zero-config %s: %v, mode %v, want %v", f.name, err, fi.Mode().Perm(), f.mode)
		}
	}
	cases := []struct {
		name      string
		args      []string
		stdout    string // exact, or a regexp when it starts with ~
		stderrHas string
		code      int
	}{
		{"no shell", []string{"-run", "-f", "echo", "a; rm -rf /"}, "a; rm -rf /\n", "", 0},
		{"exit code", []string{"-run", "-f", "sh", "-c", "echo out; echo err >&2; exit 3"}, "out\nerr\n", "exit code 3", 3},
		{"signal", []string{"-run", "-f", "sh", "-c", "kill -TERM $$"}, "", "SIGTERM", 143},
		{"not found", []string{"-run", "nonexistent-cmd"}, "", "command not found: nonexistent-cmd", 127},
		{"not executable", []string{"-run", "-f", "/etc/hostname"}, "", "cannot execute", 126},
		{"env", []string{"-run", "-f", "-env", "A=1", "-env", "B=two words", "sh", "-c", "echo $A $B"}, "1 two words\n", "", 0},
		{"args after command are the command's", []string{"-run", "-f", "echo", "-f", "-json"}, "-f -json\n", "", 0},
		{"run prints the id", []string{"-run", "true"}, `~^[a-z2-7]{16}\n$`, "", 0},
		{"version", []string{"-version"}, `~^worker \S+\n$`, "", 0},
		{"usage: no mode", []string{}, "", "Client (anywhere)", 2},
		{"usage: two modes", []string{"-list", "-status", "x"}, "", "choose one of", 2},
		{"usage: bad size", []string{"-run", "-mem", "12Q", "true"}, "", "-mem", 2},
		{"usage: bad duration", []string{"-run", "-timeout", "soon", "true"}, "", "-timeout", 2},
		{"usage: bad number", []string{"-run", "-cpu", "lots", "true"}, "", "-cpu", 2},
		{"usage: no command", []string{"-run"}, "", "needs a command", 2},
		{"limit over the cap", []string{"-run", "-cpu", "1000", "true"}, "", "limits.cpu", 1},
		{"unknown job", []string{"-status", "aaaaaaaaaaaaaaaa"}, "", "no job", 1},
		{"malformed job id", []string{"-log", "../../etc"}, "", "no job", 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			stdout, stderr, code := sp.cli(t, c.args...)
			okOut := stdout == c.stdout
			if strings.HasPrefix(c.stdout, "~") {
				okOut = regexp.MustCompile(c.stdout[1:]).MatchString(stdout)
			}
			if !okOut || code != c.code || !strings.Contains(stderr, c.stderrHas) {
				t.Fatalf("worker %q: exit %d, stdout %q, stderr %q; want exit %d, stdout %q, stderr ~%q", c.args, code, stdout, stderr, c.code, c.stdout, c.stderrHas)
			}
			if code != 0 && len(c.args) > 0 && !strings.HasPrefix(stderr, "worker: ") {
				t.Fatalf("error not in the form `worker: ...`: %q", stderr)
			}
		})
	}

	t.Run("status list log stop json", func(t *testing.T) {
		id, _, _ := sp.cli(t, "-run", "sh", "-c", "echo begin; sleep 30")
		id = strings.TrimSpace(id)
		eventually(t, 10*time.Second, func() error {
			st, _, _ := sp.cli(t, "-status", id)
			if !strings.Contains(st, "output: 6 bytes") {
				return errors.New("no output yet: " + st)
			}
			return nil
		})
		st, _, code := sp.cli(t, "-status", id)
		for _, want := range []string{"id: " + id, "owner: admin", "status: RUNNING", "command: sh -c \"echo begin; sleep 30\"", "limits: pids=1024"} {
			if !strings.Contains(st, want) || code != 0 {
				t.Errorf("-status lacks %q:\n%s", want, st)
			}
		}
		list, _, _ := sp.cli(t, "-list")
		lines := strings.Split(strings.TrimSpace(list), "\n")
		header := regexp.MustCompile(`^ID\s+STATUS\s+EXIT\s+OWNER\s+STARTED\s+DURATION\s+COMMAND$`)
		if !header.MatchString(lines[0]) || !strings.Contains(list, id) {
			t.Errorf("-list:\n%s", list)
		}
		col := strings.Index(lines[0], "STATUS")
		for _, l := range lines[1:] {
			if len(l) <= col || l[col-1] != ' ' || l[col] == ' ' {
				t.Errorf("-list columns not aligned:\n%s", list)
				break
			}
		}
		js, _, _ := sp.cli(t, "-list", "-json")
		var jobs []Job
		if err := json.Unmarshal([]byte(js), &jobs); err != nil || len(jobs) < 5 {
			t.Errorf("-list -json: %v\n%s", err, js)
		}
		// -log follows live until the end: stop the job while it is followed.
		logDone := make(chan string)
		go func() {
			out, _, _ := sp.cli(t, "-log", id)
			logDone <- out
		}()
		time.Sleep(200 * time.Millisecond)
		stopOut, _, code := sp.cli(t, "-stop", id)
		if code != 0 || !strings.Contains(stopOut, "status: STOPPED") || !strings.Contains(stopOut, "reason: stopped") {
			t.Errorf("-stop: exit %d\n%s", code, stopOut)
		}
		select {
		case out := <-logDone:
			if out != "begin\n" {
				t.Errorf("-log printed %q", out)
			}
		case <-time.After(10 * time.Second):
			t.Error("-log did not end with the job")
		}
		js, _, _ = sp.cli(t, "-status", id, "-json")
		var j Job
		if err := json.Unmarshal([]byte(js), &j); err != nil || j.Status != statusStopped || j.OutputBytes != 6 {
			t.Errorf("-status -json: %v %+v", err, j)
		}
	})
}

func TestCtrlCDetachesWithoutStoppingTheJob(t *testing.T) {
	sp := startServerProc(t, t.TempDir())
	cmd := exec.Command(workerBinary(t), "-run", "-f", "sh", "-c", "echo up; sleep 30")
	cmd.Env = []string{"WORKER_ADDR=" + sp.addr, "WORKER_TLS=" + filepath.Join(sp.state, "tls")}
	var stderr bytes.Buffer
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(stdout).ReadString('\n')
	if line != "up\n" {
		t.Fatalf("got %q", line)
	}
	cmd.Process.Signal(os.Interrupt)
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 130 || !strings.Contains(stderr.String(), "worker -stop") {
		t.Fatalf("exit %v, stderr %q", err, stderr.String())
	}
	id := regexp.MustCompile(`-stop ([a-z2-7]{16})`).FindStringSubmatch(stderr.String())[1]
	st, _, _ := sp.cli(t, "-status", id)
	if !strings.Contains(st, "status: RUNNING") {
		t.Fatalf("job did not keep running:\n%s", st)
	}
	sp.cli(t, "-stop", id)
}

func TestCurlWorksOnEveryEndpointOverHTTP2(t *testing.T) {
	if _, err := exec.LookPath("curl"); err != nil {
		t.Fatal("this test needs curl (.ci/run installs it)")
	}
	sp := startServerProc(t, t.TempDir())
	tlsDir := filepath.Join(sp.state, "tls")
	curl := func(args ...string) (string, error) {
		base := []string{"-sS", "--http2", "--cacert", filepath.Join(tlsDir, "ca.pem"), "--cert", filepath.Join(tlsDir, "client.pem"), "--key", filepath.Join(tlsDir, "client-key.pem")}
		out, err := exec.Command("curl", append(base, args...)...).CombinedOutput()
		return string(out), err
	}
	url := "https://" + sp.addr
	out, err := curl("-X", "POST", "-d", `{"command":"echo","args":["hi"]}`, "-w", "\n%{http_code} %{http_version}", url+"/v1/jobs")
	if err != nil || !strings.HasSuffix(out, "\n201 2") {
		t.Fatalf("POST /v1/jobs: %v %s", err, out)
	}
	var j Job
	json.Unmarshal([]byte(out[:strings.LastIndex(out, "\n")]), &j)
	for _, c := range []struct{ args, want string }{
		{"GET /v1/jobs", "200 2"},
		{"GET /v1/jobs/" + j.ID, "200 2"},
		{"GET /v1/jobs/" + j.ID + "/log", "hi\n200 2"},
		{"GET /v1/jobs/" + j.ID + "/log?offset=1&follow=0", "i\n200 2"},
		{"POST /v1/jobs/" + j.ID + "/stop", "200 2"},
		{"GET /healthz", "200 2"},
		{"GET /metrics", "200 2"},
		{"DELETE /v1/jobs", "405 2"},
	} {
		method, path, _ := strings.Cut(c.args, " ")
		out, err := curl("-X", method, "-w", "%{http_code} %{http_version}", url+path)
		if err != nil || !strings.HasSuffix(out, c.want) {
			t.Errorf("%s: %v %q, want suffix %q", c.args, err, out, c.want)
		}
	}
	// Refused in the handshake: no client certificate, and TLS 1.2.
	if out, err := exec.Command("curl", "-sS", "--cacert", filepath.Join(tlsDir, "ca.pem"), url+"/healthz").CombinedOutput(); err == nil {
		t.Errorf("no client certificate: got through: %s", out)
	}
	if out, err := curl("--tls-max", "1.2", url+"/healthz"); err == nil {
		t.Errorf("TLS 1.2: got through: %s", out)
	}
}

func TestJobsAndRecordsSurviveServerRestarts(t *testing.T) {
	state := t.TempDir()
	sp := startServerProc(t, state)
	done, _, _ := sp.cli(t, "-run", "-f", "echo", "finished before")
	if done != "finished before\n" {
		t.Fatalf("got %q", done)
	}
	long, _, _ := sp.cli(t, "-run", "sh", "-c", "i=0; while [ $i -lt 40 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done")
	long = strings.TrimSpace(long)
	short, _, _ := sp.cli(t, "-run", "sh", "-c", "sleep 0.5; echo ended while down; exit 4")
	short = strings.TrimSpace(short)
	forever, _, _ := sp.cli(t, "-run", "sleep", "300")
	forever = strings.TrimSpace(forever)

	sp.kill(syscall.SIGKILL)    // no goodbye
	time.Sleep(1 * time.Second) // `short` ends while no server runs
	sp = startServerProc(t, state)
	if !strings.Contains(sp.logText(), "re-adopted running job") {
		t.Errorf("no re-adoption logged:\n%s", sp.logText())
	}
	st, _, _ := sp.cli(t, "-status", short)
	if !strings.Contains(st, "status: FAILED") || !strings.Contains(st, "exit_code: 4") {
		t.Errorf("job that ended while the server was down:\n%s", st)
	}
	if out, _, _ := sp.cli(t, "-log", short); out != "ended while down\n" {
		t.Errorf("its output: %q", out)
	}
	// Follow the running one to its end across the restart: every tick, once.
	out, _, code := sp.cli(t, "-log", long)
	var want strings.Builder
	for i := 0; i < 40; i++ {
		want.WriteString("tick " + itoa(i) + "\n")
	}
	if code != 0 || out != want.String() {
		t.Errorf("-log across a restart: exit %d, %q", code, out)
	}
	// A graceful restart too; then stop the adopted job.
	sp.kill(syscall.SIGTERM)
	sp = startServerProc(t, state)
	stopped, _, _ := sp.cli(t, "-stop", forever)
	if !strings.Contains(stopped, "status: STOPPED") {
		t.Errorf("-stop of an adopted job:\n%s", stopped)
	}
	list, _, _ := sp.cli(t, "-list")
	for _, id := range []string{long, short, forever} {
		if !strings.Contains(list, id) {
			t.Errorf("-list after restarts lacks %s:\n%s", id, list)
		}
	}
	if !strings.Contains(list, "COMPLETED") {
		t.Errorf("-list lost the finished job:\n%s", list)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

func TestIssuedUserCertificateSeesOnlyItsOwnJobs(t *testing.T) {
	sp := startServerProc(t, t.TempDir())
	tlsDir := filepath.Join(sp.state, "tls")
	out, _, code := sp.cli(t, "-certs", tlsDir, "-user", "alice", "-role", "user")
	if code != 0 || !strings.Contains(out, "alice.pem") || !strings.Contains(out, "alice-key.pem") {
		t.Fatalf("-certs: exit %d %q", code, out)
	}
	if fi, err := os.Stat(filepath.Join(tlsDir, "alice-key.pem")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("alice-key.pem: %v", err)
	}
	adminJob, _, _ := sp.cli(t, "-run", "sleep", "30")
	adminJob = strings.TrimSpace(adminJob)
	alice := func(args ...string) (string, string, int) {
		return sp.cli(t, append([]string{"-cert", filepath.Join(tlsDir, "alice.pem"), "-key", filepath.Join(tlsDir, "alice-key.pem")}, args...)...)
	}
	mine, _, code := alice("-run", "-f", "echo", "from alice")
	if code != 0 || mine != "from alice\n" {
		t.Fatalf("alice -run -f: %d %q", code, mine)
	}
	list, _, _ := alice("-list")
	if strings.Contains(list, adminJob) || !strings.Contains(list, "alice") {
		t.Fatalf("alice's -list shows others' jobs or not hers:\n%s", list)
	}
	if _, stderr, code := alice("-stop", adminJob); code != 1 || !strings.Contains(stderr, "no job") {
		t.Fatalf("alice stopping admin's job: exit %d %q", code, stderr)
	}
	if _, stderr, code := sp.cli(t, "-certs", tlsDir, "-user", "../evil", "-role", "user"); code == 0 || !strings.HasPrefix(stderr, "worker: ") {
		t.Fatalf("bad user name accepted: %d %q", code, stderr)
	}
	sp.cli(t, "-stop", adminJob)
}

func TestFollowerResumesAcrossAServerCrash(t *testing.T) {
	// A fixed port, so the follower finds the restarted server where it was.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	state := t.TempDir()
	sp := startServerProc(t, state, "-listen", addr)
	id, _, _ := sp.cli(t, "-run", "sh", "-c", "i=0; while [ $i -lt 50 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done")
	id = strings.TrimSpace(id)
	follower := exec.Command(workerBinary(t), "-log", id)
	follower.Env = []string{"WORKER_ADDR=" + addr, "WORKER_TLS=" + filepath.Join(state, "tls")}
	var out, stderr bytes.Buffer
	follower.Stdout, follower.Stderr = &out, &stderr
	if err := follower.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	sp.kill(syscall.SIGKILL)
	time.Sleep(time.Second) // the job writes on; nobody is serving
	startServerProc(t, state, "-listen", addr)
	if err := follower.Wait(); err != nil {
		t.Fatalf("-log across a server crash: %v: %s", err, stderr.String())
	}
	var want strings.Builder
	for i := 0; i < 50; i++ {
		fmt.Fprintf(&want, "tick %d\n", i)
	}
	if out.String() != want.String() {
		t.Fatalf("-log across a server crash printed %q, want every tick once", out.String())
	}
}

func TestSecondServerOnTheSameStateIsRefused(t *testing.T) {
	state := t.TempDir()
	startServerProc(t, state)
	out, err := exec.Command(workerBinary(t), "-serve", "-listen", "127.0.0.1:0", "-state", state).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "in use by another worker -serve") {
		t.Fatalf("second server on one state dir: %v: %s", err, out)
	}
}
