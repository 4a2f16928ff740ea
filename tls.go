// tls.go: mutual-TLS configuration and the certificates behind it: one CA per
// deployment, a server certificate, and client certificates whose Subject
// CommonName is the user and whose first OrganizationalUnit is the role (§4).
//
// Invariants:
//   - TLS 1.3 only on both sides; the server requires a client certificate
//     and verifies it against ca.pem; the client verifies the server's name.
//   - Keys are ECDSA P-256 in PKCS#8 PEM ("PRIVATE KEY"), files 0600;
//     certificates 0644; a TLS dir we create is 0700.
//   - A file is complete or absent: written to a temp file in the same dir,
//     fsynced, then renamed over the target, or hard-linked to it when it
//     must not replace an existing file (link fails with EEXIST, rename
//     would not).
//   - A key is written before its certificate, so an interrupted run leaves
//     at worst a key without a certificate, which the next run completes by
//     certifying that key.
//   - The zero-config path never overwrites anything. Only an explicit
//     `worker -certs DIR -hosts ...` replaces the server certificate, and
//     `-user NAME` can never name the CA, server or zero-config client files.
package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"
)

const (
	caCertFile     = "ca.pem"
	caKeyFile      = "ca-key.pem"
	serverCertFile = "server.pem"
	serverKeyFile  = "server-key.pem"
	clientCertFile = "client.pem" // the zero-config admin client cert
	clientKeyFile  = "client-key.pem"
)

var validRoles = []string{"admin", "user", "viewer"}

const (
	caValidity   = 10 * 365 * 24 * time.Hour
	leafValidity = 2 * 365 * 24 * time.Hour
	// Certificates start an hour in the past so a client whose clock is a
	// little behind the server's still accepts a fresh certificate.
	clockSkew = time.Hour
)

// authority is a CA that can sign: its certificate and private key.
type authority struct {
	cert *x509.Certificate
	key  crypto.Signer
}

// ensureServerPKI is the zero-config path of `worker -serve`: in dir (created
// 0700 if missing) it creates whatever is missing of the CA, the server
// certificate for hosts (defaultHosts when empty) and the admin client
// certificate. It never overwrites a file; a missing leaf is signed by the
// existing CA.
func ensureServerPKI(dir string, hosts []string) error {
	if len(hosts) == 0 {
		hosts = defaultHosts()
	}
	if err := checkHosts(hosts); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create TLS dir %s: %w", dir, err)
	}
	leaves := []struct {
		cert, key string
		tmpl      *x509.Certificate
	}{
		{serverCertFile, serverKeyFile, serverTemplate(hosts)},
		{clientCertFile, clientKeyFile, clientTemplate("admin", "admin")},
	}
	needSigning := false
	for _, l := range leaves {
		certPath, keyPath := filepath.Join(dir, l.cert), filepath.Join(dir, l.key)
		switch certOK, keyOK := pemExists(certPath), pemExists(keyPath); {
		case certOK && !keyOK:
			return fmt.Errorf("%s exists but its key %s does not: restore the key, or delete %s to have a new one issued", certPath, keyPath, certPath)
		case !certOK:
			needSigning = true
		}
	}
	if !needSigning {
		if !pemExists(filepath.Join(dir, caCertFile)) {
			return fmt.Errorf("%s is missing, so client certificates cannot be verified: restore it, or move %s aside to start a new PKI", filepath.Join(dir, caCertFile), dir)
		}
		return nil
	}

	now := time.Now()
	ca, _, err := loadOrCreateCA(dir, now)
	if err != nil {
		return err
	}
	for _, l := range leaves {
		if pemExists(filepath.Join(dir, l.cert)) {
			continue
		}
		if _, err := issueLeaf(dir, ca, l.cert, l.key, l.tmpl, now, false); err != nil {
			return err
		}
	}
	// The server certificate may predate this run; make sure it belongs to
	// this CA, or every client would fail with a bare handshake error.
	return verifyServerCert(dir, now)
}

// makeCerts is `worker -certs DIR [-hosts h1,h2] [-user NAME -role R]`: it
// reuses the CA in dir or creates one, writes the server certificate when
// hosts were given (replacing any existing one) or when it is missing, and
// writes NAME.pem / NAME-key.pem (CN=NAME, OU=role) when user is set. It
// returns the paths written.
func makeCerts(dir string, hosts []string, user, role string) ([]string, error) {
	if err := checkUserRole(user, role); err != nil {
		return nil, err
	}
	if err := checkHosts(hosts); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create TLS dir %s: %w", dir, err)
	}
	replaceServer := len(hosts) > 0
	needServer := replaceServer || !pemExists(filepath.Join(dir, serverCertFile))
	if !needServer && user == "" && pemExists(filepath.Join(dir, caCertFile)) {
		return nil, nil // nothing to sign and nothing missing
	}

	now := time.Now()
	ca, written, err := loadOrCreateCA(dir, now)
	if err != nil {
		return written, err
	}
	if needServer {
		if len(hosts) == 0 {
			hosts = defaultHosts()
		}
		paths, err := issueLeaf(dir, ca, serverCertFile, serverKeyFile, serverTemplate(hosts), now, replaceServer)
		written = append(written, paths...)
		if err != nil {
			return written, err
		}
	}
	if user != "" {
		// Re-running for an existing user reissues the certificate (a new
		// role, or a lost key); it was asked for by name, so replace it.
		paths, err := issueLeaf(dir, ca, user+".pem", user+"-key.pem", clientTemplate(user, role), now, true)
		written = append(written, paths...)
		if err != nil {
			return written, err
		}
	}
	return written, nil
}

// defaultHosts are the names a zero-config server is reached by on its own
// host, plus its hostname for clients on the network.
func defaultHosts() []string {
	hosts := []string{"localhost", "127.0.0.1", "::1"}
	if h, err := os.Hostname(); err == nil && h != "" && !slices.Contains(hosts, h) {
		hosts = append(hosts, h)
	}
	return hosts
}

// serverTLSConfig is the server's mTLS config from the files in dir.
func serverTLSConfig(dir string) (*tls.Config, error) {
	certPath, keyPath := filepath.Join(dir, serverCertFile), filepath.Join(dir, serverKeyFile)
	pool, err := loadCertPool(filepath.Join(dir, caCertFile),
		fmt.Sprintf("run `worker -certs %s` to create a CA and server certificate", dir))
	if err != nil {
		return nil, err
	}
	cert, err := loadKeyPair(certPath, keyPath, "server",
		fmt.Sprintf("run `worker -certs %s -hosts NAME,IP` to issue one", dir))
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		NextProtos:   []string{"h2", "http/1.1"},
	}, nil
}

// clientTLSConfig is the client's mTLS config. serverName is the name the
// server's certificate must carry; "" lets tls.Dial / http.Transport take it
// from the address dialed. NextProtos is left to http.Transport, which adds
// h2 only when it can speak it.
func clientTLSConfig(caFile, certFile, keyFile, serverName string) (*tls.Config, error) {
	certDir := filepath.Dir(certFile)
	pool, err := loadCertPool(caFile,
		"copy ca.pem from the server's TLS dir (default /var/lib/worker/tls), or pass -ca")
	if err != nil {
		return nil, err
	}
	cert, err := loadKeyPair(certFile, keyFile, "client",
		fmt.Sprintf("run `worker -certs %s -user NAME -role user` on the server, or pass -cert/-key", certDir))
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		RootCAs:      pool,
		Certificates: []tls.Certificate{cert},
		ServerName:   serverName,
	}, nil
}

// peerIdentity is the caller of a verified connection: the leaf's Subject
// CommonName is the user and its first OrganizationalUnit the role ("" when
// absent). Without a verified chain there is no identity.
func peerIdentity(cs *tls.ConnectionState) (user, role string) {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return "", ""
	}
	leaf := cs.VerifiedChains[0][0]
	if len(leaf.Subject.OrganizationalUnit) > 0 {
		role = leaf.Subject.OrganizationalUnit[0]
	}
	return leaf.Subject.CommonName, role
}

// checkUserRole validates `-user NAME -role R` before anything is written.
// NAME becomes a file name, so it is restricted to [A-Za-z0-9._-]{1,64}, may
// not start with '.' or '-' (hidden files, names read as flags), and may not
// map onto a file this package owns — compared case-insensitively, because
// macOS and Windows file systems are.
func checkUserRole(user, role string) error {
	switch {
	case user == "" && role == "":
		return nil
	case user == "":
		return fmt.Errorf("-role %s needs -user NAME: the certificate's name is the user", role)
	case role == "":
		return fmt.Errorf("-user %s needs -role %s", user, strings.Join(validRoles, "|"))
	}
	if !slices.Contains(validRoles, role) {
		return fmt.Errorf("unknown role %q: use one of %s", role, strings.Join(validRoles, ", "))
	}
	if len(user) > 64 || strings.IndexFunc(user, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-')
	}) >= 0 {
		return fmt.Errorf("bad user name %q: use 1 to 64 of A-Z a-z 0-9 . _ -", user)
	}
	if user[0] == '.' || user[0] == '-' {
		return fmt.Errorf("bad user name %q: it may not start with '.' or '-'", user)
	}
	reserved := []string{caCertFile, caKeyFile, serverCertFile, serverKeyFile, clientCertFile, clientKeyFile}
	for _, f := range []string{user + ".pem", user + "-key.pem"} {
		for _, r := range reserved {
			if strings.EqualFold(f, r) {
				return fmt.Errorf("user name %q would overwrite %s: choose another name (the zero-config admin is client.pem; use -user admin for another admin)", user, r)
			}
		}
	}
	return nil
}

// checkHosts rejects names that cannot be a certificate SAN, such as a
// host:port pasted from -listen.
func checkHosts(hosts []string) error {
	for _, h := range hosts {
		if net.ParseIP(h) != nil {
			continue
		}
		if h == "" || strings.ContainsAny(h, ":/ \t[]") {
			return fmt.Errorf("bad host %q: give a DNS name or an IP address without port, e.g. -hosts worker.example.com,10.0.0.5", h)
		}
	}
	return nil
}

// loadOrCreateCA returns the CA in dir, creating it when neither file exists
// (or completing it when only the key survived an interrupted run). It
// refuses to create a CA next to leaf certificates, which a new CA could not
// have signed.
func loadOrCreateCA(dir string, now time.Time) (*authority, []string, error) {
	certPath, keyPath := filepath.Join(dir, caCertFile), filepath.Join(dir, caKeyFile)
	certOK, keyOK := pemExists(certPath), pemExists(keyPath)
	if certOK && keyOK {
		pair, err := loadKeyPair(certPath, keyPath, "CA", "restore the CA files, or move "+dir+" aside to start a new PKI")
		if err != nil {
			return nil, nil, err
		}
		ca := pair.Leaf
		if !ca.IsCA {
			return nil, nil, fmt.Errorf("%s is not a CA certificate: move %s aside to start a new PKI", certPath, dir)
		}
		if now.After(ca.NotAfter) {
			return nil, nil, fmt.Errorf("CA %s expired on %s: move %s aside to start a new PKI and reissue all certificates", certPath, ca.NotAfter.Format(time.DateOnly), dir)
		}
		signer, ok := pair.PrivateKey.(crypto.Signer)
		if !ok {
			return nil, nil, fmt.Errorf("CA key %s cannot sign: replace it with an ECDSA or RSA key", keyPath)
		}
		return &authority{cert: ca, key: signer}, nil, nil
	}
	if certOK {
		return nil, nil, fmt.Errorf("%s exists but %s does not, so no certificates can be signed: restore the CA key, or move %s aside to start a new PKI", certPath, keyPath, dir)
	}
	for _, f := range []string{serverCertFile, clientCertFile} {
		if p := filepath.Join(dir, f); pemExists(p) {
			return nil, nil, fmt.Errorf("%s exists but %s does not: a new CA would not have signed it; restore the CA, or move %s aside to start a new PKI", p, certPath, dir)
		}
	}

	var written []string
	var key *ecdsa.PrivateKey
	var err error
	if keyOK {
		if key, err = readECKey(keyPath); err != nil {
			return nil, nil, err
		}
	} else {
		if key, err = writeNewKey(keyPath, false); err != nil {
			return nil, nil, err
		}
		written = append(written, keyPath)
	}
	tmpl := &x509.Certificate{
		Subject: pkix.Name{
			Organization: []string{"worker"},
			// Unique per CA, so certificates of two deployments never look
			// like they came from the same issuer.
			CommonName: "worker CA " + randomSuffix(),
		},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true, // signs leaves only, never another CA
	}
	der, err := signCert(tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, written, err
	}
	if err := writeCert(certPath, der, false); err != nil {
		return nil, written, err
	}
	written = append(written, certPath)
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, written, fmt.Errorf("parse new CA certificate: %w", err)
	}
	return &authority{cert: cert, key: key}, written, nil
}

// issueLeaf writes certName (and keyName) in dir, signed by ca. With replace
// it always makes a new key and replaces both files; without, it certifies
// an existing key (left by an interrupted run) and never replaces a file.
func issueLeaf(dir string, ca *authority, certName, keyName string, tmpl *x509.Certificate, now time.Time, replace bool) ([]string, error) {
	certPath, keyPath := filepath.Join(dir, certName), filepath.Join(dir, keyName)
	var written []string
	var key *ecdsa.PrivateKey
	var err error
	if !replace && pemExists(keyPath) {
		if key, err = readECKey(keyPath); err != nil {
			return nil, err
		}
	} else {
		if key, err = writeNewKey(keyPath, replace); err != nil {
			return nil, err
		}
		written = append(written, keyPath)
	}
	tmpl.NotBefore = now.Add(-clockSkew)
	// A certificate outliving its CA would fail verification anyway; say so
	// in its dates.
	tmpl.NotAfter = now.Add(leafValidity)
	if tmpl.NotAfter.After(ca.cert.NotAfter) {
		tmpl.NotAfter = ca.cert.NotAfter
	}
	der, err := ca.sign(tmpl, key.Public())
	if err != nil {
		return written, err
	}
	if err := writeCert(certPath, der, replace); err != nil {
		return written, err
	}
	return append(written, certPath), nil
}

func (ca *authority) sign(tmpl *x509.Certificate, pub crypto.PublicKey) ([]byte, error) {
	return signCert(tmpl, ca.cert, pub, ca.key)
}

func signCert(tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("generate serial number: %w", err)
	}
	tmpl.SerialNumber = serial
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate %q: %w", tmpl.Subject.CommonName, err)
	}
	return der, nil
}

func serverTemplate(hosts []string) *x509.Certificate {
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{Organization: []string{"worker"}, CommonName: "worker server"},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	return tmpl
}

func clientTemplate(user, role string) *x509.Certificate {
	return &x509.Certificate{
		Subject: pkix.Name{
			Organization:       []string{"worker"},
			OrganizationalUnit: []string{role},
			CommonName:         user,
		},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
}

// verifyServerCert checks that server.pem in dir chains to ca.pem and is
// valid now, so a mixed-up or expired PKI fails at startup, not at every
// client's handshake.
func verifyServerCert(dir string, now time.Time) error {
	caPath, certPath := filepath.Join(dir, caCertFile), filepath.Join(dir, serverCertFile)
	pool, err := loadCertPool(caPath, "move "+dir+" aside to start a new PKI")
	if err != nil {
		return err
	}
	chain, err := readCerts(certPath)
	if err != nil {
		return err
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err = chain[0].Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return fmt.Errorf("%s does not verify against %s (%w): run `worker -certs %s -hosts NAME,IP` to issue a new one", certPath, caPath, err, dir)
	}
	return nil
}

// loadCertPool reads PEM CA certificates from path; todo says what the user
// should do when the file is missing.
func loadCertPool(path, todo string) (*x509.CertPool, error) {
	certs, err := readCerts(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("no CA certificate at %s: %s", path, todo)
	}
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	return pool, nil
}

func readCerts(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	var certs []*x509.Certificate
	for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", path, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s holds no PEM certificate", path)
	}
	return certs, nil
}

// loadKeyPair loads a certificate and its key, refusing an expired
// certificate with a message instead of a handshake alert later.
// kind ("client", "server", "CA") names the pair in messages.
func loadKeyPair(certPath, keyPath, kind, todo string) (tls.Certificate, error) {
	for _, p := range []struct{ what, path string }{{"certificate", certPath}, {"key", keyPath}} {
		if _, err := os.Stat(p.path); errors.Is(err, fs.ErrNotExist) {
			return tls.Certificate{}, fmt.Errorf("no %s %s at %s: %s", kind, p.what, p.path, todo)
		}
	}
	pair, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("load %s and %s: %w", certPath, keyPath, err)
	}
	if now := time.Now(); now.After(pair.Leaf.NotAfter) {
		return tls.Certificate{}, fmt.Errorf("certificate %s expired on %s: %s", certPath, pair.Leaf.NotAfter.Format(time.DateOnly), todo)
	}
	return pair, nil
}

func readECKey(path string) (*ecdsa.PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%s holds no PEM key: delete it to have a new one made", path)
	}
	var parsed any
	switch block.Type {
	case "PRIVATE KEY":
		parsed, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		parsed, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		err = fmt.Errorf("unexpected PEM block %q", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("parse key %s: %w", path, err)
	}
	key, ok := parsed.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("key %s is %T, not ECDSA: delete it to have a new one made", path, parsed)
	}
	return key, nil
}

func writeNewKey(path string, replace bool) (*ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key for %s: %w", path, err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode key for %s: %w", path, err)
	}
	data := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	if err := writePEMFile(path, data, 0o600, replace); err != nil {
		return nil, err
	}
	return key, nil
}

func writeCert(path string, der []byte, replace bool) error {
	return writePEMFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644, replace)
}

// writePEMFile puts data at path with mode perm so that path is always
// either absent, its old content, or all of data. Without replace an
// existing path is an error and is left alone.
func writePEMFile(path string, data []byte, perm os.FileMode, replace bool) error {
	dir := filepath.Dir(path)
	// CreateTemp makes the file 0600 from the start, so key bytes are never
	// readable by others, whatever the umask.
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after a rename it is already gone; after a link it is the spare name
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if replace {
		err = os.Rename(tmp, path)
	} else {
		err = os.Link(tmp, path) // EEXIST instead of replacing
	}
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("write %s: already exists, not replacing it", path)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return syncPEMDir(dir)
}

// syncPEMDir makes a rename or link in dir durable (fsync(2) on the directory).
// Windows cannot fsync a directory and commits metadata itself.
func syncPEMDir(dir string) error {
	if runtime.GOOS == "windows" {
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	return nil
}

// pemExists reports whether path exists; a file we cannot stat counts as
// present, so we never write over something we could not look at.
func pemExists(path string) bool {
	_, err := os.Lstat(path)
	return !errors.Is(err, fs.ErrNotExist)
}

func randomSuffix() string {
	b := make([]byte, 8)
	rand.Read(b) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b)
}
