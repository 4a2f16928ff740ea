// main.go: the command line: usage, flags, and which mode runs.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"
)

// initArg is argv[1] of a job's init (init_linux.go). It is no flag a user would type.
const initArg = "-internal-job-init"

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

const usage = `worker runs commands on a Linux host as isolated, resource-limited jobs.

Server (on the Linux host, as root):
    worker -serve [-listen :8443] [-state /var/lib/worker] [-tls DIR]
                  [-max-jobs N] [-grace 10s] [-job-user nobody] [-output-cap 1G]
                  [-max-cpu N] [-max-mem SIZE] [-max-io SIZE] [-max-pids N]
                  [-default-pids N] [-cgroup-root PATH] [-no-limits] [-log-level info]

    With no TLS material, the server creates a CA, a server certificate and
    an admin client certificate in STATE/tls; a root client on the same host
    then needs no flags at all.

Certificates:
    worker -certs DIR [-hosts name,ip,...] [-user NAME -role admin|user|viewer]

Client (anywhere):
    worker [client flags] -run [-cpu 0.5] [-mem 256M] [-io 10M] [-pids 64]
                               [-timeout 30s] [-env K=V]... [-f] COMMAND [ARG...]
    worker [client flags] -status ID
    worker [client flags] -list
    worker [client flags] -log ID
    worker [client flags] -stop ID
    worker -version

Client flags:
    -addr host:port   server address (env WORKER_ADDR; default localhost:8443)
    -tls DIR          ca.pem, client.pem, client-key.pem (env WORKER_TLS; default
                      ~/.config/worker if it exists, else /var/lib/worker/tls)
    -ca/-cert/-key F  override single files
    -json             print the API's JSON, for scripts

Examples:
    $ sudo worker -serve &
    $ sudo worker -run -f echo 'a; rm -rf /'     # no shell: prints a; rm -rf /
    a; rm -rf /
    $ sudo worker -run -mem 256M -cpu 0.5 -timeout 1h make -C /src test
    q3v7x2mabc4defgh
    $ sudo worker -log q3v7x2mabc4defgh          # everything so far, then live
    $ sudo worker -list
    $ sudo worker -stop q3v7x2mabc4defgh

    $ sudo worker -certs /var/lib/worker/tls -user alice -role user
    $ worker -addr build1:8443 -tls ~/alice -cert ~/alice/alice.pem \
          -key ~/alice/alice-key.pem -run -f uname -a

Sizes take K, M and G (powers of 1024); -cpu is in cores; durations are Go
durations (30s, 5m, 2h). Errors exit 1, usage errors 2; -run -f exits with the
job's exit code (128+N when a signal N ended it).
`

// envList collects repeated -env K=V flags.
type envList map[string]string

func (e envList) String() string { return "" }
func (e envList) Set(v string) error {
	k, val, ok := strings.Cut(v, "=")
	if !ok || k == "" {
		return fmt.Errorf("want K=V, got %q", v)
	}
	e[k] = val
	return nil
}

// sizeFlag is a byte count with K/M/G suffixes.
type sizeFlag int64

func (s *sizeFlag) String() string { return formatSize(int64(*s)) }
func (s *sizeFlag) Set(v string) error {
	n, err := parseSize(v)
	*s = sizeFlag(n)
	return err
}

type serverConfig struct {
	listen     string
	stateDir   string
	tlsDir     string
	maxJobs    int
	grace      time.Duration
	jobUser    string
	outputCap  int64
	caps       Limits // the most a job may ask for
	pids       int64  // a job's pids limit when it asks for none
	noLimits   bool   // run jobs without cgroup limits, and say so in each record
	cgroupRoot string
}

// usageError exits 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func main() {
	if len(os.Args) > 2 && os.Args[1] == initArg {
		os.Exit(runInit(os.Args[2]))
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}

	// modes
	serveMode := fs.Bool("serve", false, "")
	certsDir := fs.String("certs", "", "")
	runMode := fs.Bool("run", false, "")
	statusID := fs.String("status", "", "")
	listMode := fs.Bool("list", false, "")
	logID := fs.String("log", "", "")
	stopID := fs.String("stop", "", "")
	versionMode := fs.Bool("version", false, "")

	// server
	listen := fs.String("listen", ":8443", "")
	state := fs.String("state", "/var/lib/worker", "")
	tlsDir := fs.String("tls", "", "")
	maxJobs := fs.Int("max-jobs", 100, "")
	grace := fs.Duration("grace", 10*time.Second, "")
	jobUser := fs.String("job-user", "nobody", "")
	outputCap := sizeFlag(1 << 30)
	fs.Var(&outputCap, "output-cap", "")
	maxCPU := fs.Float64("max-cpu", 0, "")
	var maxMem, maxIO sizeFlag
	fs.Var(&maxMem, "max-mem", "")
	fs.Var(&maxIO, "max-io", "")
	maxPids := fs.Int64("max-pids", 32768, "")
	defaultPids := fs.Int64("default-pids", 1024, "")
	cgroupRoot := fs.String("cgroup-root", "", "")
	noLimits := fs.Bool("no-limits", false, "")
	logLevel := fs.String("log-level", os.Getenv("WORKER_LOG_LEVEL"), "")

	// certificates
	hosts := fs.String("hosts", "", "")
	certUser := fs.String("user", "", "")
	certRole := fs.String("role", "", "")

	// client
	addr := fs.String("addr", "", "")
	caFile := fs.String("ca", "", "")
	certFile := fs.String("cert", "", "")
	keyFile := fs.String("key", "", "")
	jsonOut := fs.Bool("json", false, "")
	follow := fs.Bool("f", false, "")
	cpu := fs.Float64("cpu", 0, "")
	var mem, io_ sizeFlag
	fs.Var(&mem, "mem", "")
	fs.Var(&io_, "io", "")
	pids := fs.Int64("pids", 0, "")
	timeout := fs.Duration("timeout", 0, "")
	env := envList{}
	fs.Var(env, "env", "")

	fail := func(err error) int {
		fmt.Fprintf(stderr, "worker: %v\n", err)
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintln(stderr, "run `worker -h` for usage")
			return 2
		}
		var ee exitError
		if errors.As(err, &ee) {
			return ee.code
		}
		return 1
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, usage)
			return 0
		}
		return fail(usageError{err.Error()})
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })

	var modes []string
	for _, m := range []string{"serve", "certs", "run", "status", "list", "log", "stop", "version"} {
		if set[m] {
			modes = append(modes, "-"+m)
		}
	}
	switch {
	case len(modes) == 0:
		fmt.Fprint(stderr, usage)
		return 2
	case len(modes) > 1:
		return fail(usageError{"choose one of " + strings.Join(modes, ", ")})
	}
	if !*runMode && fs.NArg() > 0 {
		return fail(usageError{fmt.Sprintf("unexpected argument %q (flags go before the command of -run)", fs.Arg(0))})
	}
	if err := setupLogging(*logLevel, stderr); err != nil {
		return fail(usageError{err.Error()})
	}

	clientCfg := func() clientConfig {
		return clientConfig{addr: *addr, tlsDir: *tlsDir, ca: *caFile, cert: *certFile, key: *keyFile, json: *jsonOut}
	}
	var err error
	switch {
	case *versionMode:
		fmt.Fprintln(stdout, "worker", version)
	case *serveMode:
		err = serve(serverConfig{
			listen: *listen, stateDir: *state, tlsDir: *tlsDir, maxJobs: *maxJobs, grace: *grace,
			jobUser: *jobUser, outputCap: int64(outputCap), pids: *defaultPids, noLimits: *noLimits,
			cgroupRoot: *cgroupRoot,
			caps:       Limits{CPU: *maxCPU, Memory: int64(maxMem), IOBps: int64(maxIO), Pids: *maxPids},
		})
	case *certsDir != "":
		var written []string
		var hostList []string
		if *hosts != "" {
			hostList = strings.Split(*hosts, ",")
		}
		written, err = makeCerts(*certsDir, hostList, *certUser, *certRole)
		for _, f := range written {
			fmt.Fprintln(stdout, "wrote", f)
		}
	case *runMode:
		if fs.NArg() == 0 {
			return fail(usageError{"-run needs a command: worker -run COMMAND [ARG...]"})
		}
		req := runRequest{
			Command: fs.Arg(0), Args: fs.Args()[1:], Env: env,
			Limits: Limits{CPU: *cpu, Memory: int64(mem), IOBps: int64(io_), Pids: *pids},
		}
		if *timeout < 0 {
			return fail(usageError{"-timeout must be positive"})
		}
		if *timeout > 0 {
			req.Timeout = timeout.String()
		}
		err = withClient(clientCfg(), stdout, stderr, func(c *client) error { return c.run(req, *follow) })
	case set["status"]:
		err = withClient(clientCfg(), stdout, stderr, func(c *client) error { return c.status(*statusID) })
	case *listMode:
		err = withClient(clientCfg(), stdout, stderr, func(c *client) error { return c.list() })
	case set["log"]:
		err = withClient(clientCfg(), stdout, stderr, func(c *client) error { return c.log(*logID) })
	case set["stop"]:
		err = withClient(clientCfg(), stdout, stderr, func(c *client) error { return c.stop(*stopID) })
	}
	if err != nil {
		return fail(err)
	}
	return 0
}

func setupLogging(level string, w io.Writer) error {
	var l slog.Level
	if level != "" {
		if err := l.UnmarshalText([]byte(level)); err != nil {
			return fmt.Errorf("log level %q: want debug, info, warn or error", level)
		}
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})))
	return nil
}
