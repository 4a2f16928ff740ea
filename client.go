// client.go: client mode. Every command is one or two HTTPS requests to the
// server; following a log resumes at its byte offset when the connection
// drops or the server restarts, so a follower neither misses nor repeats a
// byte.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

type clientConfig struct {
	addr, tlsDir, ca, cert, key string
	json                        bool
}

type client struct {
	base   string // https://host:port
	http   *http.Client
	json   bool
	stdout io.Writer
	stderr io.Writer
}

// exitError carries an exit code other than 1 out of a client command.
type exitError struct {
	code int
	msg  string
}

func (e exitError) Error() string { return e.msg }

const requestTimeout = 30 * time.Second

// defaultTLSDir: $WORKER_TLS, else ~/.config/worker if it exists, else the
// zero-config server's own directory.
func defaultTLSDir() string {
	if d := os.Getenv("WORKER_TLS"); d != "" {
		return d
	}
	if home, err := os.UserHomeDir(); err == nil {
		d := filepath.Join(home, ".config", "worker")
		if fi, err := os.Stat(d); err == nil && fi.IsDir() {
			return d
		}
	}
	return "/var/lib/worker/tls"
}

func withClient(cfg clientConfig, stdout, stderr io.Writer, f func(*client) error) error {
	c, err := newClient(cfg, stdout, stderr)
	if err != nil {
		return err
	}
	defer c.http.CloseIdleConnections()
	return f(c)
}

func newClient(cfg clientConfig, stdout, stderr io.Writer) (*client, error) {
	addr := cfg.addr
	if addr == "" {
		addr = os.Getenv("WORKER_ADDR")
	}
	if addr == "" {
		addr = "localhost:8443"
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, usageError{fmt.Sprintf("-addr %q: want host:port", addr)}
	}
	if host == "" {
		host = "localhost"
	}
	dir := cfg.tlsDir
	if dir == "" {
		dir = defaultTLSDir()
	}
	pick := func(override, name string) string {
		if override != "" {
			return override
		}
		return filepath.Join(dir, name)
	}
	tlsCfg, err := clientTLSConfig(pick(cfg.ca, caCertFile), pick(cfg.cert, clientCertFile), pick(cfg.key, clientKeyFile), host)
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{
		TLSClientConfig:     tlsCfg,
		ForceAttemptHTTP2:   true,
		TLSHandshakeTimeout: 10 * time.Second,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		// A follow can be silent for hours: pings, not a read timeout, tell
		// a quiet job from a dead connection.
		HTTP2: &http.HTTP2Config{SendPingTimeout: 30 * time.Second, PingTimeout: 15 * time.Second},
	}
	return &client{
		base:   "https://" + addr,
		http:   &http.Client{Transport: tr},
		json:   cfg.json,
		stdout: stdout,
		stderr: stderr,
	}, nil
}

// do sends one request and decodes a JSON answer into out; an error status
// becomes the server's message.
func (c *client) do(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return c.connError(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("read answer of %s %s: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		return apiErrorOf(resp.StatusCode, data)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("decode answer of %s %s: %w", method, path, err)
	}
	return nil
}

func (c *client) connError(err error) error {
	if errors.Is(err, context.Canceled) {
		return err
	}
	return fmt.Errorf("cannot reach the server at %s: %w (is `worker -serve` running there? set -addr or WORKER_ADDR)", strings.TrimPrefix(c.base, "https://"), err)
}

func apiErrorOf(status int, body []byte) error {
	var e struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(body, &e) == nil && e.Error != "" {
		return errors.New(e.Error)
	}
	return fmt.Errorf("server answered %s", http.StatusText(status))
}

func (c *client) get(ctx context.Context, id string) (Job, error) {
	var j Job
	err := c.do(ctx, "GET", "/v1/jobs/"+url.PathEscape(id), nil, &j)
	return j, err
}

func (c *client) printJSON(v any) error {
	enc := json.NewEncoder(c.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (c *client) run(req runRequest, follow bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*requestTimeout)
	var j Job
	err := c.do(ctx, "POST", "/v1/jobs", req, &j)
	cancel()
	if err != nil {
		return err
	}
	if j.Reason == reasonStartFailed {
		if c.json {
			c.printJSON(j)
		}
		return exitError{code: derefInt(j.ExitCode), msg: fmt.Sprintf("job %s did not start: %s", j.ID, j.Error)}
	}
	if !follow {
		if c.json {
			return c.printJSON(j)
		}
		fmt.Fprintln(c.stdout, j.ID)
		return nil
	}
	// Ctrl-C detaches; the job goes on.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := c.follow(ctx, j.ID, c.stdout); err != nil {
		if ctx.Err() != nil {
			return exitError{code: 130, msg: fmt.Sprintf("detached from job %s, which keeps running; stop it with: worker -stop %s", j.ID, j.ID)}
		}
		return err
	}
	ctx, cancel = context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	j, err = c.get(ctx, j.ID)
	if err != nil {
		return err
	}
	if code := derefInt(j.ExitCode); code != 0 {
		return exitError{code: code, msg: fmt.Sprintf("job %s %s (%s)", j.ID, strings.ToLower(j.Status), endDescription(j))}
	}
	return nil
}

func endDescription(j Job) string {
	switch {
	case j.Error != "":
		return j.Error
	case j.Signal != "":
		return j.Reason + ", " + j.Signal
	case j.ExitCode != nil:
		return fmt.Sprintf("%s, exit code %d", j.Reason, *j.ExitCode)
	}
	return j.Reason
}

// follow writes the job's output from the start until the job has ended and
// every byte was written, reconnecting at its offset when the stream breaks.
func (c *client) follow(ctx context.Context, id string, w io.Writer) error {
	var offset int64
	failures := 0
	for {
		n, err := c.streamOnce(ctx, id, offset, w)
		offset += n
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if n > 0 {
			failures = 0
		}
		if err == nil {
			// The server ends a stream when the job has ended, or when it
			// shuts down; only the job's record tells which.
			qctx, cancel := context.WithTimeout(ctx, requestTimeout)
			j, gerr := c.get(qctx, id)
			cancel()
			if gerr == nil && j.ended() && offset >= j.OutputBytes {
				return nil
			}
			if gerr != nil {
				err = gerr
			}
		}
		var perm permanentError
		if errors.As(err, &perm) {
			return perm.err
		}
		failures++
		if failures > 8 {
			return fmt.Errorf("follow job %s: giving up at byte %d: %w", id, offset, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Duration(failures*failures) * 250 * time.Millisecond):
		}
	}
}

// permanentError is a follow failure that retrying cannot mend.
type permanentError struct{ err error }

func (e permanentError) Error() string { return e.err.Error() }

func (c *client) streamOnce(ctx context.Context, id string, offset int64, w io.Writer) (int64, error) {
	u := fmt.Sprintf("%s/v1/jobs/%s/log?offset=%d&follow=1", c.base, url.PathEscape(id), offset)
	req, err := http.NewRequestWithContext(ctx, "GET", u, nil)
	if err != nil {
		return 0, permanentError{err}
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, c.connError(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		err := apiErrorOf(resp.StatusCode, data)
		if resp.StatusCode < 500 {
			return 0, permanentError{err}
		}
		return 0, err
	}
	// Copy chunk by chunk and flush nothing ourselves: os.Stdout is unbuffered.
	return io.Copy(w, resp.Body)
}

func (c *client) status(id string) error {
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	j, err := c.get(ctx, id)
	if err != nil {
		return err
	}
	if c.json {
		return c.printJSON(j)
	}
	printStatus(c.stdout, j)
	return nil
}

func (c *client) stop(id string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var j Job
	if err := c.do(ctx, "POST", "/v1/jobs/"+url.PathEscape(id)+"/stop", nil, &j); err != nil {
		return err
	}
	if c.json {
		return c.printJSON(j)
	}
	printStatus(c.stdout, j)
	return nil
}

func (c *client) log(id string) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	err := c.follow(ctx, id, c.stdout)
	if err != nil && ctx.Err() != nil {
		return exitError{code: 130, msg: "interrupted"}
	}
	return err
}

func (c *client) list() error {
	ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
	defer cancel()
	var jobs []Job
	if err := c.do(ctx, "GET", "/v1/jobs", nil, &jobs); err != nil {
		return err
	}
	if c.json {
		return c.printJSON(jobs)
	}
	tw := tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tSTATUS\tEXIT\tOWNER\tSTARTED\tDURATION\tCOMMAND")
	for _, j := range jobs {
		exit := "-"
		if j.ExitCode != nil {
			exit = strconv.Itoa(*j.ExitCode)
		}
		started := "-"
		if j.StartedAt != nil {
			started = j.StartedAt.Local().Format("2006-01-02 15:04:05")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", j.ID, j.Status, exit, j.Owner, started, duration(j), truncate(commandLine(j), 60))
	}
	return tw.Flush()
}

func printStatus(w io.Writer, j Job) {
	line := func(k, v string) {
		if v != "" {
			fmt.Fprintf(w, "%s: %s\n", k, v)
		}
	}
	ts := func(t *time.Time) string {
		if t == nil {
			return ""
		}
		return t.Local().Format(time.RFC3339)
	}
	line("id", j.ID)
	line("owner", j.Owner)
	line("command", commandLine(j))
	line("status", j.Status)
	line("reason", j.Reason)
	if j.ExitCode != nil {
		line("exit_code", strconv.Itoa(*j.ExitCode))
	}
	line("signal", j.Signal)
	line("error", j.Error)
	line("created", ts(&j.CreatedAt))
	line("started", ts(j.StartedAt))
	line("ended", ts(j.EndedAt))
	line("duration", duration(j))
	line("timeout", j.Timeout)
	line("limits", limitsLine(j))
	if j.ended() {
		line("cpu_seconds", strconv.FormatFloat(j.Usage.CPUSeconds, 'f', 3, 64))
		line("memory_peak", formatSize(j.Usage.MemoryPeakBytes))
		line("io_read", formatSize(j.Usage.IOReadBytes))
		line("io_write", formatSize(j.Usage.IOWriteBytes))
	}
	out := strconv.FormatInt(j.OutputBytes, 10) + " bytes"
	if j.OutputTruncated {
		out += " (truncated at the server's output cap)"
	}
	line("output", out)
}

func limitsLine(j Job) string {
	if j.Unlimited {
		return "none (the server runs with -no-limits)"
	}
	var parts []string
	l := j.Limits
	if l.CPU > 0 {
		parts = append(parts, "cpu="+strconv.FormatFloat(l.CPU, 'g', -1, 64))
	}
	if l.Memory > 0 {
		parts = append(parts, "mem="+formatSize(l.Memory))
	}
	if l.IOBps > 0 {
		parts = append(parts, "io="+formatSize(l.IOBps)+"/s")
	}
	if l.Pids > 0 {
		parts = append(parts, "pids="+strconv.FormatInt(l.Pids, 10))
	}
	return strings.Join(parts, " ")
}

func duration(j Job) string {
	if j.StartedAt == nil {
		return "-"
	}
	end := time.Now()
	if j.EndedAt != nil {
		end = *j.EndedAt
	}
	d := end.Sub(*j.StartedAt)
	if d < time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(100 * time.Millisecond).String()
}

// commandLine shows argv so it can be read back: words with spaces or
// quotes are quoted.
func commandLine(j Job) string {
	words := append([]string{j.Command}, j.Args...)
	for i, w := range words {
		if w == "" || strings.ContainsAny(w, " \t\n\"'\\$`;&|<>()*?[]#~") {
			words[i] = strconv.Quote(w)
		}
	}
	return strings.Join(words, " ")
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-3] + "..."
}
