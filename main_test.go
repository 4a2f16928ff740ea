//go:build linux

package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// requireRoot fails, never skips: namespaces, mounts and cgroups are what
// these tests are about, and a skip would read as a pass.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (namespaces, mounts, cgroups): run it as root, as CI does")
	}
}

// testServer is a real server in this process: real state dir, real mTLS,
// real job inits. Each identity has its own HTTPS client.
type testServer struct {
	t       testing.TB
	srv     *server
	http    *httptest.Server
	tlsDir  string
	clients map[string]*http.Client // by identity name: admin, alice, bob, vera, norole, wizard
}

// testIdentities: name → role. alice and bob are users, vera a viewer;
// norole has no OU, wizard an unknown one.
var testIdentities = map[string]string{"admin": "admin", "alice": "user", "bob": "user", "vera": "viewer", "norole": "", "wizard": "wizard"}

func testConfig(state string) serverConfig {
	return serverConfig{
		stateDir:  state,
		maxJobs:   50,
		grace:     2 * time.Second,
		jobUser:   "nobody",
		outputCap: 1 << 30,
		pids:      1024,
		caps:      Limits{Pids: 32768},
	}
}

func newTestServer(t testing.TB, mutate ...func(*serverConfig)) *testServer {
	t.Helper()
	requireRoot(t)
	state := t.TempDir()
	cfg := testConfig(state)
	for _, f := range mutate {
		f(&cfg)
	}
	return startTestServer(t, cfg)
}

func startTestServer(t testing.TB, cfg serverConfig) *testServer {
	t.Helper()
	tlsDir := filepath.Join(cfg.stateDir, "tls")
	if err := ensureServerPKI(tlsDir, []string{"localhost", "127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	srv, err := newServer(cfg)
	if err != nil {
		t.Fatalf("newServer: %v", err)
	}
	tlsCfg, err := serverTLSConfig(tlsDir)
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewUnstartedServer(srv.routes())
	hs.TLS = tlsCfg
	hs.EnableHTTP2 = true
	hs.StartTLS()
	ts := &testServer{t: t, srv: srv, http: hs, tlsDir: tlsDir, clients: map[string]*http.Client{}}
	for name, role := range testIdentities {
		var certFile, keyFile string
		if name == "admin" {
			certFile, keyFile = filepath.Join(tlsDir, clientCertFile), filepath.Join(tlsDir, clientKeyFile)
		} else {
			certFile, keyFile = issueTestClient(t, tlsDir, name, role, time.Now().Add(-time.Hour), time.Now().Add(time.Hour))
		}
		ccfg, err := clientTLSConfig(filepath.Join(tlsDir, caCertFile), certFile, keyFile, "127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		ts.clients[name] = &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{TLSClientConfig: ccfg, ForceAttemptHTTP2: true}}
	}
	t.Cleanup(ts.close)
	return ts
}

// close waits for the jobs still running to end (stopping them), then shuts
// the server down.
func (ts *testServer) close() {
	for _, rec := range ts.srv.store.list() {
		if !rec.ended() {
			ts.srv.stopJob(rec.ID)
		}
	}
	ts.http.Close()
	ts.srv.close()
	for _, c := range ts.clients {
		c.CloseIdleConnections()
	}
}

// do sends a request as who and returns the status and body.
func (ts *testServer) do(who, method, path string, body any) (int, []byte) {
	ts.t.Helper()
	var rd io.Reader
	if body != nil {
		if s, ok := body.(string); ok {
			rd = strings.NewReader(s)
		} else {
			data, err := json.Marshal(body)
			if err != nil {
				ts.t.Fatal(err)
			}
			rd = bytes.NewReader(data)
		}
	}
	req, err := http.NewRequest(method, ts.http.URL+path, rd)
	if err != nil {
		ts.t.Fatal(err)
	}
	resp, err := ts.clients[who].Do(req)
	if err != nil {
		ts.t.Fatalf("%s %s as %s: %v", method, path, who, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		ts.t.Fatalf("%s %s as %s: read body: %v", method, path, who, err)
	}
	return resp.StatusCode, data
}

// run starts a job as who and returns it; the start must succeed.
func (ts *testServer) run(who string, req runRequest) Job {
	ts.t.Helper()
	code, body := ts.do(who, "POST", "/v1/jobs", req)
	if code != http.StatusCreated {
		ts.t.Fatalf("run %v as %s: %d %s", req.Command, who, code, body)
	}
	var j Job
	if err := json.Unmarshal(body, &j); err != nil {
		ts.t.Fatal(err)
	}
	return j
}

// wait follows the job's log to its end and returns its output and final record.
func (ts *testServer) wait(who, id string) (string, Job) {
	ts.t.Helper()
	code, out := ts.do(who, "GET", "/v1/jobs/"+id+"/log", nil)
	if code != http.StatusOK {
		ts.t.Fatalf("log %s: %d %s", id, code, out)
	}
	code, body := ts.do(who, "GET", "/v1/jobs/"+id, nil)
	if code != http.StatusOK {
		ts.t.Fatalf("status %s: %d %s", id, code, body)
	}
	var j Job
	if err := json.Unmarshal(body, &j); err != nil {
		ts.t.Fatal(err)
	}
	if !j.ended() {
		ts.t.Fatalf("job %s still %s after its log ended", id, j.Status)
	}
	return string(out), j
}

// runWait runs a command as admin and waits for its end.
func (ts *testServer) runWait(command string, args ...string) (string, Job) {
	ts.t.Helper()
	j := ts.run("admin", runRequest{Command: command, Args: args})
	return ts.wait("admin", j.ID)
}

// eventually polls cond until it holds or the deadline passes; for state
// that settles asynchronously (processes reaped by another parent).
func eventually(t *testing.T, within time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var _ = context.Background
var _ = fmt.Sprintf
var _ = tls.VersionTLS13
