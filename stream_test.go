//go:build linux

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"os"
	"path/filepath"
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
