//go:build linux

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// liveOutput is an output file being written, followed through a real
// inotify watcher, as a running job's is.
func liveOutput(t *testing.T) (*jobOutput, *os.File) {
	t.Helper()
	w, err := newOutputWatcher()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { w.run(); close(done) }()
	t.Cleanup(func() { w.close(); <-done })
	path := filepath.Join(t.TempDir(), outputFile)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	o := newJobOutput(path)
	if err := w.watch(o); err != nil {
		t.Fatal(err)
	}
	return o, f
}

func noFlush() error { return nil }

func TestConcurrentFollowersGetEveryByteInOrder(t *testing.T) {
	o, f := liveOutput(t)
	data := make([]byte, 2<<20)
	rand.Read(data)
	const followers = 20
	results := make([]bytes.Buffer, followers)
	var wg sync.WaitGroup
	for i := range followers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := o.follow(context.Background(), &results[i], noFlush, 0, true); err != nil {
				t.Error(err)
			}
		}()
	}
	// The writer never waits for anyone: chunks of odd sizes, as fast as it can.
	for off := 0; off < len(data); {
		n := min(len(data)-off, 1+(off*7919)%70000)
		if _, err := f.Write(data[off : off+n]); err != nil {
			t.Fatal(err)
		}
		off += n
	}
	o.finish()
	wg.Wait()
	for i := range results {
		if !bytes.Equal(results[i].Bytes(), data) {
			t.Fatalf("follower %d got %d bytes, not the %d written (or out of order)", i, results[i].Len(), len(data))
		}
	}
}

func TestFollowerResumesAtOffset(t *testing.T) {
	o, f := liveOutput(t)
	f.WriteString("0123456789")
	o.finish()
	for _, off := range []int64{0, 3, 9, 10, 25} {
		var b bytes.Buffer
		n, err := o.follow(context.Background(), &b, noFlush, off, true)
		want := ""
		if off < 10 {
			want = "0123456789"[off:]
		}
		if err != nil || b.String() != want || n != int64(len(want)) {
			t.Errorf("offset %d: got %q (%d), %v; want %q", off, b.String(), n, err, want)
		}
	}
}

func TestFollowerWakesOnNewOutputAndEndsWithTheJob(t *testing.T) {
	o, f := liveOutput(t)
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		_, err := o.follow(context.Background(), pw, noFlush, 0, true)
		pw.CloseWithError(err)
		done <- err
	}()
	buf := make([]byte, 64)
	for _, line := range []string{"first\n", "second\n", "third\n"} {
		f.WriteString(line)
		// Each line arrives without any more writes or an end: inotify woke the follower.
		got := ""
		for got != line {
			n, err := pr.Read(buf)
			if err != nil {
				t.Fatalf("waiting for %q: %v", line, err)
			}
			got += string(buf[:n])
		}
	}
	select {
	case err := <-done:
		t.Fatalf("follow ended before the job: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	f.WriteString("last\n")
	o.finish()
	rest, _ := io.ReadAll(pr)
	if string(rest) != "last\n" {
		t.Fatalf("after the end got %q, want the last line", rest)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestFollowWithoutFollowStopsAtTheCurrentEnd(t *testing.T) {
	o, f := liveOutput(t)
	f.WriteString("so far")
	var b bytes.Buffer
	if _, err := o.follow(context.Background(), &b, noFlush, 0, false); err != nil || b.String() != "so far" {
		t.Fatalf("got %q, %v", b.String(), err)
	}
}

func TestFollowEndsWhenTheClientGoesAway(t *testing.T) {
	o, _ := liveOutput(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := o.follow(ctx, io.Discard, noFlush, 0, true)
		done <- err
	}()
	cancel()
	if err := <-done; err != context.Canceled {
		t.Fatalf("follow returned %v, want context.Canceled", err)
	}
}

func TestOutputCapKeepsTheJobGoingAndMarksTheCut(t *testing.T) {
	var out bytes.Buffer
	pr, pw := io.Pipe()
	go func() {
		chunk := bytes.Repeat([]byte("x"), 1000)
		for i := 0; i < 5000; i++ { // 5 MB past a 1 MB cap: the writer must never block
			pw.Write(chunk)
		}
		pw.Close()
	}()
	r := copyOutput(&out, pr, 1<<20)
	if !r.truncated || r.written != 1<<20 || r.err != nil {
		t.Fatalf("copyOutput = %+v", r)
	}
	want := strings.Repeat("x", 1<<20) + truncationMarker(1<<20)
	if out.String() != want {
		t.Fatalf("output is %d bytes ending %q, want the cap then one marker", out.Len(), out.String()[max(0, out.Len()-80):])
	}
}

// Streaming benchmarks against a real server process (SPEC §10), each
// reported as ratios against a floor measured in the same run.

// benchServer starts `worker -serve` for a benchmark and returns it with a
// client that speaks HTTP/2 over mTLS as admin.
func benchServer(b *testing.B) (*serverProc, *client) {
	b.Helper()
	sp := startServerProc(b, b.TempDir())
	c, err := newClient(clientConfig{addr: sp.addr, tlsDir: filepath.Join(sp.state, "tls")}, io.Discard, io.Discard)
	if err != nil {
		b.Fatal(err)
	}
	return sp, c
}

func benchRun(b *testing.B, c *client, req runRequest) Job {
	b.Helper()
	var j Job
	if err := c.do(context.Background(), "POST", "/v1/jobs", req, &j); err != nil {
		b.Fatal(err)
	}
	return j
}

// BenchmarkFollowerThroughput: one follower of a job writing flat out, as a
// share of the rate at which the job writes its output with nobody reading.
func BenchmarkFollowerThroughput(b *testing.B) {
	sp, c := benchServer(b)
	const size = 256 << 20
	req := runRequest{Command: "head", Args: []string{"-c", "256M", "/dev/zero"}}
	var floorSec, followSec float64
	for b.Loop() {
		j := benchRun(b, c, req)
		var sink countWriter
		if err := c.follow(context.Background(), j.ID, &sink); err != nil {
			b.Fatal(err)
		}
		j, _ = c.get(context.Background(), j.ID)
		floorSec += j.EndedAt.Sub(*j.StartedAt).Seconds() // the job's own writing time, floor for what follows
		if sink.n != size {
			b.Fatalf("follower got %d bytes, want %d", sink.n, size)
		}
		// Followed from the start: the stream's end is when the last byte arrived.
		followSec += time.Since(*j.StartedAt).Seconds()
	}
	// The bare floor: the same bytes written straight to a file in the
	// state dir, no job, no pipe, no follower.
	direct := filepath.Join(sp.state, "direct")
	var directSec float64
	for range b.N {
		begin := time.Now()
		cmd := exec.Command("sh", "-c", "head -c 256M /dev/zero > "+direct)
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("%v: %s", err, out)
		}
		directSec += time.Since(begin).Seconds()
	}
	os.Remove(direct)
	n := float64(b.N)
	b.ReportMetric(size/(1<<20)/(directSec/n), "direct-MB/s")
	b.ReportMetric(directSec/followSec, "x-direct")
	b.ReportMetric(size/(1<<20)/(floorSec/n), "job-MB/s")
	b.ReportMetric(size/(1<<20)/(followSec/n), "follow-MB/s")
	b.ReportMetric(floorSec/followSec, "x-job")
	_ = sp
}

type countWriter struct{ n int64 }

func (w *countWriter) Write(p []byte) (int, error) { w.n += int64(len(p)); return len(p), nil }

// BenchmarkThousandFollowers: 1000 concurrent followers of one job; every
// one must get every byte, and the server's peak RSS is reported.
func BenchmarkThousandFollowers(b *testing.B) {
	sp, _ := benchServer(b)
	const followers = 1000
	// Several connections: one HTTP/2 connection carries at most 1000 streams.
	clients := make([]*client, 8)
	for i := range clients {
		c, err := newClient(clientConfig{addr: sp.addr, tlsDir: filepath.Join(sp.state, "tls")}, io.Discard, io.Discard)
		if err != nil {
			b.Fatal(err)
		}
		clients[i] = c
	}
	baseline := vmHWM(b, sp.cmd.Process.Pid)
	for b.Loop() {
		// 16 MB written in bursts over about two seconds, so followers are live.
		j := benchRun(b, clients[0], runRequest{Command: "sh", Args: []string{"-c", "for i in $(seq 16); do head -c 1M /dev/urandom; sleep 0.1; done"}})
		var wg sync.WaitGroup
		got := make([]int64, followers)
		for i := range followers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var w countWriter
				if err := clients[i%len(clients)].follow(context.Background(), j.ID, &w); err != nil {
					b.Error(err)
				}
				got[i] = w.n
			}()
		}
		wg.Wait()
		for i, n := range got {
			if n != 16<<20 {
				b.Fatalf("follower %d got %d bytes, want %d", i, n, 16<<20)
			}
		}
	}
	peak := vmHWM(b, sp.cmd.Process.Pid)
	b.ReportMetric(float64(peak)/(1<<20), "server-peak-RSS-MiB")
	b.ReportMetric(float64(peak-baseline)/(1<<20), "RSS-growth-MiB")
}

// vmHWM is a process's peak resident set size, in bytes.
func vmHWM(b *testing.B, pid int) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	b.Fatal("no VmHWM")
	return 0
}

func TestFollowerOfAStartingJobWaitsForItsOutputFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), outputFile)
	o := newJobOutput(path)
	done := make(chan string)
	go func() {
		var b bytes.Buffer
		if _, err := o.follow(context.Background(), &b, noFlush, 0, true); err != nil {
			t.Error(err)
		}
		done <- b.String()
	}()
	select {
	case got := <-done:
		t.Fatalf("follow ended before the output existed, with %q", got)
	case <-time.After(50 * time.Millisecond):
	}
	os.WriteFile(path, []byte("started\n"), 0o600)
	o.changed()
	o.finish()
	if got := <-done; got != "started\n" {
		t.Fatalf("got %q", got)
	}
	// A job that never started has no output file and nothing to follow.
	never := newJobOutput(filepath.Join(t.TempDir(), outputFile))
	never.finish()
	if n, err := never.follow(context.Background(), io.Discard, noFlush, 0, true); n != 0 || err != nil {
		t.Fatalf("follow of a job without output: %d, %v", n, err)
	}
}

// BenchmarkServerRSSUnderLargeOutput: a job writes 10 GiB while one client
// follows it; the server's peak RSS is reported before and after (SPEC §10:
// flat).
func BenchmarkServerRSSUnderLargeOutput(b *testing.B) {
	sp := startServerProc(b, b.TempDir(), "-output-cap", "11G")
	c, err := newClient(clientConfig{addr: sp.addr, tlsDir: filepath.Join(sp.state, "tls")}, io.Discard, io.Discard)
	if err != nil {
		b.Fatal(err)
	}
	// Warm up the server's allocations with a small job first: the floor.
	small := benchRun(b, c, runRequest{Command: "head", Args: []string{"-c", "64M", "/dev/zero"}})
	if err := c.follow(context.Background(), small.ID, io.Discard); err != nil {
		b.Fatal(err)
	}
	floor := vmHWM(b, sp.cmd.Process.Pid)
	for b.Loop() {
		j := benchRun(b, c, runRequest{Command: "head", Args: []string{"-c", "10G", "/dev/zero"}})
		var sink countWriter
		if err := c.follow(context.Background(), j.ID, &sink); err != nil {
			b.Fatal(err)
		}
		if sink.n != 10<<30 {
			b.Fatalf("follower got %d bytes, want 10 GiB", sink.n)
		}
		os.Remove(filepath.Join(sp.state, "jobs", j.ID, outputFile)) // 10 GiB of disk back
	}
	peak := vmHWM(b, sp.cmd.Process.Pid)
	b.ReportMetric(float64(floor)/(1<<20), "peak-RSS-after-64MiB-MiB")
	b.ReportMetric(float64(peak)/(1<<20), "peak-RSS-after-10GiB-MiB")
	b.ReportMetric(float64(peak)/float64(floor), "x-floor")
}
