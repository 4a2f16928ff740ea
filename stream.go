// stream.go: following a job's output.
//
// The server is never in the data path between a job and its output file:
// the job's init writes the file, and followers read it by offset with
// pread, so no reader can slow the job down and a reconnecting client
// resumes exactly where it stopped. Followers sleep until the kernel says the
// file changed (inotify) or the job ended; each holds one fixed buffer, so
// memory grows with neither output size nor follower count.
//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// followBufSize is each follower's one buffer.
const followBufSize = 32 << 10

// jobOutput is the follow side of one job's output file.
type jobOutput struct {
	path string

	mu    sync.Mutex
	wake  chan struct{} // closed and replaced whenever the file grew or the job ended
	ended bool
}

func newJobOutput(path string) *jobOutput {
	return &jobOutput{path: path, wake: make(chan struct{})}
}

// changed wakes every follower.
func (o *jobOutput) changed() {
	o.mu.Lock()
	close(o.wake)
	o.wake = make(chan struct{})
	o.mu.Unlock()
}

// finish marks the end of output: everything the job will ever write is in
// the file by the time it is called.
func (o *jobOutput) finish() {
	o.mu.Lock()
	if !o.ended {
		o.ended = true
		close(o.wake)
		o.wake = make(chan struct{})
	}
	o.mu.Unlock()
}

func (o *jobOutput) state() (<-chan struct{}, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.wake, o.ended
}

// follow copies the output from offset to w, calling flush after each burst.
// With follow it keeps going until the job has ended and every byte was
// sent; without, it stops at the current end of the file. It returns the
// number of bytes written.
//
// The job's init creates the output file as it starts: a follower that comes
// during the start waits for it like for new bytes (changed is called once it
// exists), and one of a job that never started gets nothing.
func (o *jobOutput) follow(ctx context.Context, w io.Writer, flush func() error, offset int64, follow bool) (int64, error) {
	var f *os.File
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	buf := make([]byte, followBufSize)
	var sent int64
	for {
		// Take the wake channel before reading, so a write that lands after
		// the read still wakes us.
		wake, ended := o.state()
		if f == nil {
			var err error
			if f, err = os.Open(o.path); errors.Is(err, fs.ErrNotExist) {
				f = nil
			} else if err != nil {
				return sent, fmt.Errorf("open output: %w", err)
			}
		}
		for f != nil {
			n, rerr := f.ReadAt(buf, offset)
			if n > 0 {
				if _, err := w.Write(buf[:n]); err != nil {
					return sent, err
				}
				offset += int64(n)
				sent += int64(n)
			}
			if rerr == io.EOF || n == 0 {
				break
			}
			if rerr != nil {
				return sent, fmt.Errorf("read output: %w", rerr)
			}
		}
		if err := flush(); err != nil {
			return sent, err
		}
		if ended || !follow {
			return sent, nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return sent, ctx.Err()
		}
	}
}

// errWatcherClosed ends the watcher's loop.
var errWatcherClosed = errors.New("output watcher closed")

// logWatchError is for the watcher's own failures, which only cost latency:
// followers still wake when the job ends.
func logWatchError(err error) {
	if !errors.Is(err, errWatcherClosed) {
		slog.Error("output watcher", "err", err)
	}
}

// outputWatcher turns inotify events on output files into follower
// wake-ups. One per server; run owns its goroutine until close.
type outputWatcher struct {
	file *os.File // the inotify fd, non-blocking, so reads park in the runtime poller

	mu   sync.Mutex
	byWD map[int32]*jobOutput
	wdOf map[*jobOutput]int32
}

func newOutputWatcher() (*outputWatcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	return &outputWatcher{
		file: os.NewFile(uintptr(fd), "inotify"),
		byWD: map[int32]*jobOutput{},
		wdOf: map[*jobOutput]int32{},
	}, nil
}

func (w *outputWatcher) watch(o *jobOutput) error {
	var wd int
	rc, err := w.file.SyscallConn()
	if err != nil {
		return err
	}
	cerr := rc.Control(func(fd uintptr) {
		wd, err = unix.InotifyAddWatch(int(fd), o.path, unix.IN_MODIFY)
	})
	if cerr != nil {
		return cerr
	}
	if err != nil {
		return fmt.Errorf("watch %s: %w", o.path, err)
	}
	w.mu.Lock()
	w.byWD[int32(wd)] = o
	w.wdOf[o] = int32(wd)
	w.mu.Unlock()
	return nil
}

func (w *outputWatcher) unwatch(o *jobOutput) {
	w.mu.Lock()
	wd, ok := w.wdOf[o]
	delete(w.wdOf, o)
	if ok && w.byWD[wd] == o {
		delete(w.byWD, wd)
	}
	w.mu.Unlock()
	if !ok {
		return
	}
	if rc, err := w.file.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { unix.InotifyRmWatch(int(fd), uint32(wd)) })
	}
}

// run dispatches events until close.
func (w *outputWatcher) run() error {
	buf := make([]byte, 64<<10)
	for {
		n, err := w.file.Read(buf)
		if err != nil {
			if errors.Is(err, os.ErrClosed) {
				return errWatcherClosed
			}
			return fmt.Errorf("read inotify: %w", err)
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			off += unix.SizeofInotifyEvent + int(ev.Len)
			if ev.Mask&unix.IN_Q_OVERFLOW != 0 {
				w.wakeAll()
				continue
			}
			w.mu.Lock()
			o := w.byWD[ev.Wd]
			w.mu.Unlock()
			if o != nil {
				o.changed()
			}
		}
	}
}

func (w *outputWatcher) wakeAll() {
	w.mu.Lock()
	outs := make([]*jobOutput, 0, len(w.byWD))
	for _, o := range w.byWD {
		outs = append(outs, o)
	}
	w.mu.Unlock()
	for _, o := range outs {
		o.changed()
	}
}

func (w *outputWatcher) close() error { return w.file.Close() }
