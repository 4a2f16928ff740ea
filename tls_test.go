package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// newPKI makes a zero-config TLS dir whose server answers to localhost and
// 127.0.0.1.
func newPKI(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tls")
	if err := ensureServerPKI(dir, []string{"localhost", "127.0.0.1"}); err != nil {
		t.Fatalf("ensureServerPKI: %v", err)
	}
	return dir
}

// startIdentityServer serves mTLS on 127.0.0.1 with the config from dir and
// answers each verified connection with "user role\n" from peerIdentity.
func startIdentityServer(t *testing.T, dir string) string {
	t.Helper()
	cfg, err := serverTLSConfig(dir)
	if err != nil {
		t.Fatalf("serverTLSConfig: %v", err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return // listener closed by cleanup
			}
			tc := c.(*tls.Conn)
			tc.SetDeadline(time.Now().Add(5 * time.Second))
			if err := tc.Handshake(); err == nil {
				cs := tc.ConnectionState()
				user, role := peerIdentity(&cs)
				fmt.Fprintf(tc, "%s %s\n", user, role)
			}
			tc.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return ln.Addr().String()
}

// dialIdentity connects with cfg and returns what the server answered. In TLS
// 1.3 the server checks the client certificate after the client considers
// the handshake done, so a refusal shows up on the first read.
func dialIdentity(addr string, cfg *tls.Config) (string, error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(conn)
	return strings.TrimSpace(string(b)), err
}

func mustClientConfig(t *testing.T, caFile, certFile, keyFile, serverName string) *tls.Config {
	t.Helper()
	cfg, err := clientTLSConfig(caFile, certFile, keyFile, serverName)
	if err != nil {
		t.Fatalf("clientTLSConfig: %v", err)
	}
	return cfg
}

// forceClientCert makes cfg present its certificate whatever the server
// asks for, as a hostile or misconfigured client would.
func forceClientCert(t *testing.T, cfg *tls.Config) *tls.Config {
	t.Helper()
	cert := cfg.Certificates[0]
	cfg.Certificates = nil
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	return cfg
}

// issueTestClient signs a client certificate with the CA in dir, with the
// validity given, which the production code never allows to be in the past.
func issueTestClient(t testing.TB, dir, user, role string, notBefore, notAfter time.Time) (certFile, keyFile string) {
	t.Helper()
	ca, _, err := loadOrCreateCA(dir, time.Now())
	if err != nil {
		t.Fatalf("load CA: %v", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := clientTemplate(user, role)
	tmpl.NotBefore, tmpl.NotAfter = notBefore, notAfter
	der, err := ca.sign(tmpl, key.Public())
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	certFile, keyFile = filepath.Join(out, user+".pem"), filepath.Join(out, user+"-key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// snapshot is every file in dir with its bytes and mode.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{}
	for _, e := range entries {
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		files[e.Name()] = info.Mode().String() + "\n" + string(data)
	}
	return files
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	certs, err := readCerts(path)
	if err != nil {
		t.Fatal(err)
	}
	return certs[0]
}

func TestServerAcceptsOnlyVerifiedTLS13Clients(t *testing.T) {
	dir := newPKI(t)
	other := newPKI(t)
	addr := startIdentityServer(t, dir)
	ca := filepath.Join(dir, caCertFile)
	if _, err := makeCerts(dir, nil, "alice", "user"); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	expiredCert, expiredKey := issueTestClient(t, dir, "old", "user", now.Add(-48*time.Hour), now.Add(-24*time.Hour))

	tests := []struct {
		name    string
		cfg     func(t *testing.T) *tls.Config
		want    string // the identity the server saw
		wantErr string // substring of the client's error
	}{
		{
			name: "admin client gets through",
			cfg: func(t *testing.T) *tls.Config {
				return mustClientConfig(t, ca, filepath.Join(dir, clientCertFile), filepath.Join(dir, clientKeyFile), "localhost")
			},
			want: "admin admin",
		},
		{
			name: "user cert from makeCerts gets through by IP name",
			cfg: func(t *testing.T) *tls.Config {
				return mustClientConfig(t, ca, filepath.Join(dir, "alice.pem"), filepath.Join(dir, "alice-key.pem"), "127.0.0.1")
			},
			want: "alice user",
		},
		{
			name: "no client certificate is refused",
			cfg: func(t *testing.T) *tls.Config {
				cfg := mustClientConfig(t, ca, filepath.Join(dir, clientCertFile), filepath.Join(dir, clientKeyFile), "localhost")
				cfg.Certificates = nil
				return cfg
			},
			wantErr: "certificate required",
		},
		{
			name: "client certificate from another CA is refused",
			cfg: func(t *testing.T) *tls.Config {
				// Through GetClientCertificate, because crypto/tls would not even
				// offer a certificate the server's CA list does not name.
				return forceClientCert(t, mustClientConfig(t, ca, filepath.Join(other, clientCertFile), filepath.Join(other, clientKeyFile), "localhost"))
			},
			wantErr: "unknown certificate authority",
		},
		{
			name: "expired client certificate is refused",
			cfg: func(t *testing.T) *tls.Config {
				cfg := mustClientConfig(t, ca, filepath.Join(dir, clientCertFile), filepath.Join(dir, clientKeyFile), "localhost")
				pair, err := tls.LoadX509KeyPair(expiredCert, expiredKey) // clientTLSConfig itself refuses it
				if err != nil {
					t.Fatal(err)
				}
				cfg.Certificates = []tls.Certificate{pair}
				return forceClientCert(t, cfg)
			},
			wantErr: "expired certificate",
		},
		{
			name: "server certificate used as client certificate is refused",
			cfg: func(t *testing.T) *tls.Config {
				return forceClientCert(t, mustClientConfig(t, ca, filepath.Join(dir, serverCertFile), filepath.Join(dir, serverKeyFile), "localhost"))
			},
			wantErr: "bad certificate",
		},
		{
			name: "TLS 1.2 client is refused",
			cfg: func(t *testing.T) *tls.Config {
				cfg := mustClientConfig(t, ca, filepath.Join(dir, clientCertFile), filepath.Join(dir, clientKeyFile), "localhost")
				cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
				return cfg
			},
			wantErr: "protocol version",
		},
		{
			name: "client refuses a server name the certificate does not carry",
			cfg: func(t *testing.T) *tls.Config {
				return mustClientConfig(t, ca, filepath.Join(dir, clientCertFile), filepath.Join(dir, clientKeyFile), "worker.example.com")
			},
			wantErr: "not worker.example.com",
		},
		{
			name: "client refuses a server from another CA",
			cfg: func(t *testing.T) *tls.Config {
				return mustClientConfig(t, filepath.Join(other, caCertFile), filepath.Join(dir, clientCertFile), filepath.Join(dir, clientKeyFile), "localhost")
			},
			wantErr: "certificate signed by unknown authority",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := dialIdentity(addr, tt.cfg(t))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got identity %q, error %v; want error containing %q", got, err, tt.wantErr)
				}
				if got != "" {
					t.Fatalf("refused client still read %q", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			if got != tt.want {
				t.Fatalf("server saw identity %q, want %q", got, tt.want)
			}
		})
	}
}

func TestHTTP2IsNegotiatedOverMTLS(t *testing.T) {
	dir := newPKI(t)
	cfg, err := serverTLSConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.MinVersion != tls.VersionTLS13 || cfg.ClientAuth != tls.RequireAndVerifyClientCert {
		t.Fatalf("server config MinVersion %x ClientAuth %v; want TLS 1.3 and RequireAndVerifyClientCert", cfg.MinVersion, cfg.ClientAuth)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			user, role := peerIdentity(r.TLS)
			fmt.Fprintf(w, "%s %s %s", r.Proto, user, role)
		}),
		ReadHeaderTimeout: 5 * time.Second,
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		<-served
	})

	tr := &http.Transport{
		TLSClientConfig:   mustClientConfig(t, filepath.Join(dir, caCertFile), filepath.Join(dir, clientCertFile), filepath.Join(dir, clientKeyFile), "localhost"),
		ForceAttemptHTTP2: true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	resp, err := client.Get("https://" + ln.Addr().String() + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.TLS.NegotiatedProtocol != "h2" || resp.TLS.Version != tls.VersionTLS13 {
		t.Fatalf("negotiated %q version %x, want h2 over TLS 1.3", resp.TLS.NegotiatedProtocol, resp.TLS.Version)
	}
	if got, want := string(body), "HTTP/2.0 admin admin"; got != want {
		t.Fatalf("handler answered %q, want %q", got, want)
	}
}

func TestPKIFilesHaveTightPermissions(t *testing.T) {
	dir := newPKI(t)
	if _, err := makeCerts(dir, nil, "bob", "viewer"); err != nil {
		t.Fatal(err)
	}
	info, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if perm := info.Mode().Perm(); perm != 0o700 {
		t.Errorf("dir %s mode %o, want 700", dir, perm)
	}
	want := map[string]os.FileMode{
		caCertFile: 0o644, caKeyFile: 0o600,
		serverCertFile: 0o644, serverKeyFile: 0o600,
		clientCertFile: 0o644, clientKeyFile: 0o600,
		"bob.pem": 0o644, "bob-key.pem": 0o600,
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != len(want) {
		t.Errorf("dir holds %d files, want %d (no temp files left): %v", len(entries), len(want), entries)
	}
	for name, perm := range want {
		info, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("stat: %v", err)
			continue
		}
		if got := info.Mode().Perm(); got != perm {
			t.Errorf("%s mode %o, want %o", name, got, perm)
		}
	}
}

func TestCertificatesFollowTheProfile(t *testing.T) {
	dir := newPKI(t)
	now := time.Now()
	ca := readCert(t, filepath.Join(dir, caCertFile))
	server := readCert(t, filepath.Join(dir, serverCertFile))
	client := readCert(t, filepath.Join(dir, clientCertFile))

	if !ca.IsCA || ca.KeyUsage&x509.KeyUsageCertSign == 0 || !ca.MaxPathLenZero {
		t.Errorf("CA: IsCA %v KeyUsage %b MaxPathLenZero %v", ca.IsCA, ca.KeyUsage, ca.MaxPathLenZero)
	}
	if !strings.HasPrefix(ca.Subject.CommonName, "worker CA ") {
		t.Errorf("CA subject %q", ca.Subject.CommonName)
	}
	if !slices.Equal(server.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) ||
		!slices.Equal(server.DNSNames, []string{"localhost"}) ||
		len(server.IPAddresses) != 1 || !server.IPAddresses[0].Equal(net.IPv4(127, 0, 0, 1)) {
		t.Errorf("server: EKU %v DNS %v IP %v", server.ExtKeyUsage, server.DNSNames, server.IPAddresses)
	}
	if !slices.Equal(client.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) ||
		client.Subject.CommonName != "admin" || !slices.Equal(client.Subject.OrganizationalUnit, []string{"admin"}) {
		t.Errorf("client: EKU %v subject %v", client.ExtKeyUsage, client.Subject)
	}
	for _, tc := range []struct {
		name     string
		cert     *x509.Certificate
		lifetime time.Duration
	}{
		{"ca", ca, caValidity},
		{"server", server, leafValidity},
		{"client", client, leafValidity},
	} {
		if tc.cert.NotBefore.After(now.Add(-59 * time.Minute)) {
			t.Errorf("%s NotBefore %v is not an hour in the past", tc.name, tc.cert.NotBefore)
		}
		if d := tc.cert.NotAfter.Sub(now); d < tc.lifetime-time.Hour || d > tc.lifetime+time.Hour {
			t.Errorf("%s valid for %v more, want about %v", tc.name, d, tc.lifetime)
		}
		if tc.cert.SerialNumber.BitLen() <= 64 {
			t.Errorf("%s serial %v is not a random 128-bit number", tc.name, tc.cert.SerialNumber)
		}
		if pub, ok := tc.cert.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
			t.Errorf("%s key is %T, want ECDSA P-256", tc.name, tc.cert.PublicKey)
		}
	}
	for _, name := range []string{caKeyFile, serverKeyFile, clientKeyFile} {
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if block, _ := pem.Decode(data); block == nil || block.Type != "PRIVATE KEY" {
			t.Errorf("%s is not a PKCS#8 PEM key", name)
		}
	}
	if other := readCert(t, filepath.Join(newPKI(t), caCertFile)); other.Subject.String() == ca.Subject.String() {
		t.Errorf("two PKIs share the CA subject %q", ca.Subject)
	}
}

func TestEnsureServerPKITwiceChangesNothing(t *testing.T) {
	dir := newPKI(t)
	before := snapshot(t, dir)
	if err := ensureServerPKI(dir, []string{"other.example"}); err != nil {
		t.Fatal(err)
	}
	after := snapshot(t, dir)
	if len(before) != 6 || len(after) != len(before) {
		t.Fatalf("files before %d, after %d; want 6 both times", len(before), len(after))
	}
	for name, b := range before {
		if after[name] != b {
			t.Errorf("%s changed", name)
		}
	}
}

func TestEnsureServerPKICompletesWithTheExistingCA(t *testing.T) {
	tests := []struct {
		name    string
		remove  []string
		keepKey string // a key left behind must be certified, not replaced
	}{
		{name: "client pair", remove: []string{clientCertFile, clientKeyFile}},
		{name: "client cert only", remove: []string{clientCertFile}, keepKey: clientKeyFile},
		{name: "server pair", remove: []string{serverCertFile, serverKeyFile}},
		{name: "server cert only", remove: []string{serverCertFile}, keepKey: serverKeyFile},
		{
			name:    "interrupted first run left only the CA key",
			remove:  []string{caCertFile, serverCertFile, serverKeyFile, clientCertFile, clientKeyFile},
			keepKey: caKeyFile,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := newPKI(t)
			before := snapshot(t, dir)
			for _, f := range tt.remove {
				if err := os.Remove(filepath.Join(dir, f)); err != nil {
					t.Fatal(err)
				}
			}
			if err := ensureServerPKI(dir, []string{"localhost"}); err != nil {
				t.Fatalf("ensureServerPKI: %v", err)
			}
			after := snapshot(t, dir)
			for name, b := range before {
				if !slices.Contains(tt.remove, name) && after[name] != b {
					t.Errorf("%s was not missing but changed", name)
				}
			}
			if tt.keepKey != "" && after[tt.keepKey] != before[tt.keepKey] {
				t.Errorf("%s was replaced instead of certified", tt.keepKey)
			}
			addr := startIdentityServer(t, dir)
			got, err := dialIdentity(addr, mustClientConfig(t, filepath.Join(dir, caCertFile),
				filepath.Join(dir, clientCertFile), filepath.Join(dir, clientKeyFile), "localhost"))
			if err != nil || got != "admin admin" {
				t.Fatalf("admin dial after repair: %q, %v", got, err)
			}
		})
	}
}

func TestEnsureServerPKIRefusesToMixPKIs(t *testing.T) {
	tests := []struct {
		name    string
		break_  func(t *testing.T, dir string)
		wantErr string
	}{
		{
			name:    "CA gone, a leaf to sign, another leaf remains",
			break_:  removeFiles(caCertFile, caKeyFile, clientCertFile, clientKeyFile),
			wantErr: "a new CA would not have signed it",
		},
		{
			name:    "CA gone, nothing to sign",
			break_:  removeFiles(caCertFile, caKeyFile),
			wantErr: "client certificates cannot be verified",
		},
		{
			name:    "CA key gone and a leaf to sign",
			break_:  removeFiles(caKeyFile, clientCertFile, clientKeyFile),
			wantErr: "no certificates can be signed",
		},
		{
			name:    "CA certificate gone, nothing to sign",
			break_:  removeFiles(caCertFile),
			wantErr: "client certificates cannot be verified",
		},
		{
			name:    "server key gone",
			break_:  removeFiles(serverKeyFile),
			wantErr: "its key",
		},
		{
			name: "server certificate from another PKI",
			break_: func(t *testing.T, dir string) {
				other := newPKI(t)
				for _, f := range []string{serverCertFile, serverKeyFile} {
					data, err := os.ReadFile(filepath.Join(other, f))
					if err != nil {
						t.Fatal(err)
					}
					if err := os.WriteFile(filepath.Join(dir, f), data, 0o600); err != nil {
						t.Fatal(err)
					}
				}
				removeFiles(clientCertFile, clientKeyFile)(t, dir)
			},
			wantErr: "does not verify against",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := newPKI(t)
			tt.break_(t, dir)
			if err := ensureServerPKI(dir, nil); err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ensureServerPKI: %v; want error containing %q", err, tt.wantErr)
			}
		})
	}
}

func removeFiles(names ...string) func(t *testing.T, dir string) {
	return func(t *testing.T, dir string) {
		t.Helper()
		for _, n := range names {
			if err := os.Remove(filepath.Join(dir, n)); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestMakeCertsReusesTheCA(t *testing.T) {
	dir := newPKI(t)
	before := snapshot(t, dir)
	addr := startIdentityServer(t, dir) // loaded before the user exists
	ca := filepath.Join(dir, caCertFile)

	for _, role := range []string{"user", "viewer"} { // the second run reissues
		paths, err := makeCerts(dir, nil, "alice", role)
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{filepath.Join(dir, "alice-key.pem"), filepath.Join(dir, "alice.pem")}; !slices.Equal(paths, want) {
			t.Fatalf("makeCerts wrote %v, want %v", paths, want)
		}
		got, err := dialIdentity(addr, mustClientConfig(t, ca, filepath.Join(dir, "alice.pem"), filepath.Join(dir, "alice-key.pem"), "localhost"))
		if err != nil {
			t.Fatalf("dial as alice: %v", err)
		}
		if want := "alice " + role; got != want {
			t.Fatalf("server saw %q, want %q", got, want)
		}
	}
	after := snapshot(t, dir)
	for name, b := range before {
		if after[name] != b {
			t.Errorf("%s changed when adding a user", name)
		}
	}
}

func TestMakeCertsInEmptyDirCreatesCAAndServer(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	paths, err := makeCerts(dir, nil, "", "")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{caKeyFile, caCertFile, serverKeyFile, serverCertFile}
	for i := range want {
		want[i] = filepath.Join(dir, want[i])
	}
	if !slices.Equal(paths, want) {
		t.Fatalf("wrote %v, want %v", paths, want)
	}
	server := readCert(t, filepath.Join(dir, serverCertFile))
	for _, h := range defaultHosts() {
		if server.VerifyHostname(h) != nil {
			t.Errorf("server certificate does not cover default host %q", h)
		}
	}
	if paths, err := makeCerts(dir, nil, "", ""); err != nil || len(paths) != 0 {
		t.Fatalf("second run wrote %v, %v; want nothing", paths, err)
	}
}

func TestMakeCertsWithHostsReplacesServerCert(t *testing.T) {
	dir := newPKI(t)
	before := snapshot(t, dir)
	paths, err := makeCerts(dir, []string{"worker.example.com", "10.1.2.3"}, "", "")
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{filepath.Join(dir, serverKeyFile), filepath.Join(dir, serverCertFile)}; !slices.Equal(paths, want) {
		t.Fatalf("wrote %v, want %v", paths, want)
	}
	after := snapshot(t, dir)
	for _, name := range []string{caCertFile, caKeyFile, clientCertFile, clientKeyFile} {
		if after[name] != before[name] {
			t.Errorf("%s changed", name)
		}
	}
	addr := startIdentityServer(t, dir)
	for _, tc := range []struct {
		name string
		ok   bool
	}{{"worker.example.com", true}, {"10.1.2.3", true}, {"localhost", false}} {
		_, err := dialIdentity(addr, mustClientConfig(t, filepath.Join(dir, caCertFile), filepath.Join(dir, clientCertFile), filepath.Join(dir, clientKeyFile), tc.name))
		if (err == nil) != tc.ok {
			t.Errorf("dial as %q: %v, want success %v", tc.name, err, tc.ok)
		}
	}
}

func TestMakeCertsValidatesBeforeWriting(t *testing.T) {
	tests := []struct {
		user, role string
		hosts      []string
		wantErr    string // "" for a valid request
	}{
		{user: "alice", role: "admin"},
		{user: "svc_ci-1.prod", role: "viewer"},
		{user: strings.Repeat("a", 64), role: "user"},
		{user: "admin", role: "admin"},
		{user: "", role: "user", wantErr: "needs -user"},
		{user: "bob", role: "", wantErr: "needs -role"},
		{user: "bob", role: "root", wantErr: "unknown role"},
		{user: "bob", role: "Admin", wantErr: "unknown role"},
		{user: strings.Repeat("a", 65), role: "user", wantErr: "bad user name"},
		{user: "../evil", role: "user", wantErr: "bad user name"},
		{user: "a/b", role: "user", wantErr: "bad user name"},
		{user: "bob smith", role: "user", wantErr: "bad user name"},
		{user: "élise", role: "user", wantErr: "bad user name"},
		{user: "-rf", role: "user", wantErr: "may not start"},
		{user: ".hidden", role: "user", wantErr: "may not start"},
		{user: "ca", role: "admin", wantErr: "would overwrite ca.pem"},
		{user: "CA", role: "admin", wantErr: "would overwrite ca.pem"},
		{user: "ca-key", role: "admin", wantErr: "would overwrite ca-key.pem"},
		{user: "server", role: "admin", wantErr: "would overwrite server.pem"},
		{user: "server-key", role: "admin", wantErr: "would overwrite server-key.pem"},
		{user: "client", role: "admin", wantErr: "would overwrite client.pem"},
		{hosts: []string{"host:8443"}, wantErr: "bad host"},
		{hosts: []string{""}, wantErr: "bad host"},
		{hosts: []string{"[::1]"}, wantErr: "bad host"},
		{hosts: []string{"::1", "10.0.0.1", "*.example.com"}},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%q %q %q", tt.user, tt.role, tt.hosts), func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "tls")
			paths, err := makeCerts(dir, tt.hosts, tt.user, tt.role)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("makeCerts: %v; want error containing %q", err, tt.wantErr)
				}
				if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
					t.Fatalf("refused request still created %s (paths %v)", dir, paths)
				}
				return
			}
			if err != nil {
				t.Fatalf("makeCerts: %v", err)
			}
			if tt.user != "" {
				cert := readCert(t, filepath.Join(dir, tt.user+".pem"))
				if cert.Subject.CommonName != tt.user || !slices.Equal(cert.Subject.OrganizationalUnit, []string{tt.role}) {
					t.Fatalf("subject %v, want CN=%s OU=%s", cert.Subject, tt.user, tt.role)
				}
			}
		})
	}
}

func TestConfigErrorsSayWhatToDo(t *testing.T) {
	dir := newPKI(t)
	now := time.Now()
	expiredCert, expiredKey := issueTestClient(t, dir, "old", "user", now.Add(-48*time.Hour), now.Add(-time.Hour))
	empty := t.TempDir()
	ca, cert, key := filepath.Join(dir, caCertFile), filepath.Join(dir, clientCertFile), filepath.Join(dir, clientKeyFile)

	tests := []struct {
		name     string
		load     func() (*tls.Config, error)
		wantErrs []string
	}{
		{
			name: "client without CA",
			load: func() (*tls.Config, error) {
				return clientTLSConfig(filepath.Join(empty, caCertFile), cert, key, "localhost")
			},
			wantErrs: []string{"no CA certificate at " + filepath.Join(empty, caCertFile), "-ca"},
		},
		{
			name: "client without certificate",
			load: func() (*tls.Config, error) {
				return clientTLSConfig(ca, filepath.Join(empty, clientCertFile), filepath.Join(empty, clientKeyFile), "localhost")
			},
			wantErrs: []string{
				"no client certificate at " + filepath.Join(empty, clientCertFile),
				"run `worker -certs " + empty + " -user NAME -role user` on the server, or pass -cert/-key",
			},
		},
		{
			name: "client without key",
			load: func() (*tls.Config, error) {
				return clientTLSConfig(ca, cert, filepath.Join(empty, clientKeyFile), "localhost")
			},
			wantErrs: []string{"no client key at " + filepath.Join(empty, clientKeyFile)},
		},
		{
			name:     "client key from another certificate",
			load:     func() (*tls.Config, error) { return clientTLSConfig(ca, cert, expiredKey, "localhost") },
			wantErrs: []string{"private key does not match public key"},
		},
		{
			name:     "expired client certificate",
			load:     func() (*tls.Config, error) { return clientTLSConfig(ca, expiredCert, expiredKey, "localhost") },
			wantErrs: []string{"certificate " + expiredCert + " expired on", "worker -certs"},
		},
		{
			name:     "server without TLS material",
			load:     func() (*tls.Config, error) { return serverTLSConfig(empty) },
			wantErrs: []string{"no CA certificate at", "run `worker -certs " + empty + "`"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := tt.load()
			if err == nil {
				t.Fatalf("got config %v, want an error", cfg)
			}
			for _, want := range tt.wantErrs {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not contain %q", err, want)
				}
			}
		})
	}
}

func TestPeerIdentityComesFromTheVerifiedLeaf(t *testing.T) {
	leaf := func(cn string, ou ...string) *x509.Certificate {
		c := &x509.Certificate{}
		c.Subject.CommonName, c.Subject.OrganizationalUnit = cn, ou
		return c
	}
	tests := []struct {
		name       string
		cs         *tls.ConnectionState
		user, role string
	}{
		{"nil state", nil, "", ""},
		{"no verified chain", &tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf("mallory", "admin")}}, "", ""},
		{"empty chain", &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{}}}, "", ""},
		{"CN and OU", &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{leaf("alice", "user"), leaf("ca")}}}, "alice", "user"},
		{"first OU wins", &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{leaf("bob", "viewer", "admin")}}}, "bob", "viewer"},
		{"no OU", &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{leaf("carol")}}}, "carol", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if user, role := peerIdentity(tt.cs); user != tt.user || role != tt.role {
				t.Fatalf("peerIdentity = %q, %q; want %q, %q", user, role, tt.user, tt.role)
			}
		})
	}
}

func TestDefaultHostsCoverLoopback(t *testing.T) {
	hosts := defaultHosts()
	for _, want := range []string{"localhost", "127.0.0.1", "::1"} {
		if !slices.Contains(hosts, want) {
			t.Errorf("defaultHosts %v lacks %q", hosts, want)
		}
	}
	if sorted := slices.Sorted(slices.Values(hosts)); len(slices.Compact(sorted)) != len(hosts) {
		t.Errorf("defaultHosts %v has duplicates", hosts)
	}
	if err := checkHosts(hosts); err != nil {
		t.Errorf("defaultHosts fail checkHosts: %v", err)
	}
}

func TestWritePEMFileReplacesOnlyWhenAsked(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "k.pem")
	if err := writePEMFile(path, []byte("one"), 0o600, false); err != nil {
		t.Fatal(err)
	}
	if err := writePEMFile(path, []byte("two"), 0o600, false); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("second write without replace: %v; want 'already exists'", err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, []byte("one")) {
		t.Fatalf("content %q after refused write, want %q", got, "one")
	}
	if err := writePEMFile(path, []byte("three"), 0o644, true); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, []byte("three")) {
		t.Fatalf("content %q after replace, want %q", got, "three")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("dir holds %v, want only k.pem (temp files removed)", entries)
	}
}
