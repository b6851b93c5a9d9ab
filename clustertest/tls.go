package clustertest

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"time"
)

// certValidity is how long the generated certificates are valid. A cluster
// lives for a test or a benchmark run; a week also covers a machine whose
// clock jumps. NotBefore is an hour back for the same reason.
const certValidity = 7 * 24 * time.Hour

// alpnPostgres is the ALPN protocol PostgreSQL 17 requires of a client that
// starts TLS directly (sslnegotiation=direct) instead of with an SSLRequest.
const alpnPostgres = "postgresql"

// tlsRecordHandshake is the first byte of a TLS ClientHello record. A
// startup packet starts with its length, whose first byte is 0 (the packet
// is at most maxStartupPacket bytes), so the two cannot be confused.
const tlsRecordHandshake = 0x16

const msgSSLRequired = "node is running secure mode, SSL connection required"

// certAuthority is a certificate authority made up for one cluster.
type certAuthority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte // the certificate, PEM-encoded
}

// newCertAuthority makes a self-signed ECDSA P-256 CA valid from an hour
// before now for certValidity.
func newCertAuthority(name string, now time.Time) (*certAuthority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serialNumber(),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(certValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &certAuthority{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// serverCert issues a server certificate for the loopback addresses the
// cluster listens on (127.0.0.1, ::1, localhost), so sslmode=verify-full
// accepts every node and the load balancer.
func (ca *certAuthority) serverCert(now time.Time) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serialNumber(),
		Subject:      pkix.Name{CommonName: "node"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(certValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

func serialNumber() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on supported platforms
	}
	return n
}

// newServerTLS makes the cluster's CA and the server configuration every
// node proxy uses, and returns the CA certificate in PEM.
func newServerTLS(now time.Time) (*tls.Config, []byte, error) {
	ca, err := newCertAuthority("clustertest CA", now)
	if err != nil {
		return nil, nil, fmt.Errorf("clustertest: generating the CA: %w", err)
	}
	cert, err := ca.serverCert(now)
	if err != nil {
		return nil, nil, fmt.Errorf("clustertest: generating the server certificate: %w", err)
	}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
		// A client negotiating with an SSLRequest may offer ALPN or not; one
		// starting TLS directly must offer "postgresql", as PostgreSQL 17
		// requires. Go refuses a client that offers only other protocols.
		NextProtos: []string{alpnPostgres},
	}
	return cfg, ca.pem, nil
}

// bufferedConn reads through the bufio.Reader that already holds the
// first bytes of the TLS handshake (peeked to detect direct TLS) and writes
// to the connection itself.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c bufferedConn) Read(b []byte) (int, error) { return c.r.Read(b) }
