package crypto

import (
	"bytes"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"sync"
	"time"
)

// ClusterTLS authenticates and encrypts the cluster's consensus traffic
// with mutual TLS 1.3, from nothing but the cluster key and each node's
// identity key: no certificate authority to run, no files to copy.
//
// Every holder of a cluster key derives the same certificate authority
// from it (an Ed25519 key made from the cluster key with HKDF), so a
// certificate signed by it proves that its holder has the cluster key.
// Each node makes itself a leaf certificate for its identity key, signed
// by the authority of the primary cluster key; peers accept a leaf signed
// by the authority of any key in their ring, which lets a cluster rotate
// its key the way it rotates gossip encryption. The leaf's key is the
// node's identity, so a connection also tells who is at the other end.
//
// Without a cluster key (--insecure) the authority comes from a fixed,
// public seed: traffic is still encrypted, but anyone running wgmesh can
// join it, as anyone can join insecure gossip.
type ClusterTLS struct {
	id Identity

	mu    sync.Mutex
	ring  Keyring
	roots *x509.CertPool
	leaf  *tls.Certificate
	// leafFor is the primary key the leaf was signed for.
	leafFor []byte
	now     func() time.Time
	// guarded are the live connections Guard registered, with the
	// certificate chain each peer presented.
	guarded map[*GuardedConn]struct{}
}

// insecureSeed stands in for a cluster key when gossip runs without one.
var insecureSeed = []byte("wgmesh insecure cluster: no key was given")

// NewClusterTLS returns TLS settings for a node with identity id in a
// cluster with keyring ring (nil: insecure).
func NewClusterTLS(id Identity, ring Keyring) (*ClusterTLS, error) {
	if id.IsZero() {
		return nil, errors.New("cluster TLS: no identity key")
	}
	c := &ClusterTLS{id: id, now: time.Now}
	if err := c.SetKeyring(ring); err != nil {
		return nil, err
	}
	return c, nil
}

// SetKeyring switches to a new keyring: new connections present a
// certificate of its primary key and accept certificates of all its keys;
// connections made before whose peer's certificate no longer verifies
// are cut (see Rekey).
func (c *ClusterTLS) SetKeyring(ring Keyring) error {
	_, err := c.Rekey(ring)
	return err
}

// Rekey is SetKeyring, and returns how many guarded connections (Guard)
// it cut because their peer's certificate does not verify under the new
// keyring. Removing a key must cut off a host holding only that key, an
// evicted one, and not only refuse its next handshake: TLS checks a
// certificate once, so a Raft connection made before would otherwise
// carry on for as long as the host keeps it open.
//
// Rolling upgrades: nothing new goes on the wire. A cut peer, of any
// version, sees its connection close, as after a network fault, and dials
// again (Raft and the RPC client do); it gets in if it holds a key of the
// new ring. A rotation done as docs/operations.md says cuts only connections made
// under a key that every good host has since dropped.
func (c *ClusterTLS) Rekey(ring Keyring) (cut int, err error) {
	keys := ring
	if len(keys) == 0 {
		keys = Keyring{insecureSeed}
	}
	roots := x509.NewCertPool()
	for _, k := range keys {
		ca, _, err := clusterCA(k)
		if err != nil {
			return 0, err
		}
		roots.AddCert(ca)
	}
	c.mu.Lock()
	c.ring = keys
	c.roots = roots
	if !bytes.Equal(c.leafFor, keys.Primary()) {
		c.leaf, c.leafFor = nil, nil
	}
	conns := make([]*GuardedConn, 0, len(c.guarded))
	for g := range c.guarded {
		conns = append(conns, g)
	}
	c.mu.Unlock()
	for _, g := range conns {
		if c.verifyWith(roots, g.peer) == nil {
			continue
		}
		c.mu.Lock()
		delete(c.guarded, g)
		c.mu.Unlock()
		// The socket, not the TLS session: closing that would send a
		// close_notify, which may wait on a peer that does not read.
		_ = g.NetConn().Close()
		cut++
	}
	return cut, nil
}

// GuardedConn is a TLS connection that a keyring change cuts once its
// peer's certificate no longer verifies (ClusterTLS.Guard).
type GuardedConn struct {
	*tls.Conn
	c    *ClusterTLS
	peer [][]byte
}

// Guard registers conn, whose handshake is complete, with c: a later
// SetKeyring cuts it if the peer's certificate does not verify under the
// new keyring. Closing the returned connection unregisters it.
func (c *ClusterTLS) Guard(conn *tls.Conn) *GuardedConn {
	var raw [][]byte
	for _, cert := range conn.ConnectionState().PeerCertificates {
		raw = append(raw, cert.Raw)
	}
	g := &GuardedConn{Conn: conn, c: c, peer: raw}
	c.mu.Lock()
	if c.guarded == nil {
		c.guarded = map[*GuardedConn]struct{}{}
	}
	c.guarded[g] = struct{}{}
	c.mu.Unlock()
	return g
}

// Close unregisters the connection and closes it.
func (g *GuardedConn) Close() error {
	g.c.mu.Lock()
	delete(g.c.guarded, g)
	g.c.mu.Unlock()
	return g.Conn.Close()
}

// clusterCA derives the certificate authority of a cluster key.
func clusterCA(key []byte) (*x509.Certificate, ed25519.PrivateKey, error) {
	seed, err := hkdf.Key(sha256.New, key, nil, "wgmesh cluster CA v1", ed25519.SeedSize)
	if err != nil {
		return nil, nil, fmt.Errorf("deriving the cluster CA: %w", err)
	}
	priv := ed25519.NewKeyFromSeed(seed)
	// A name of its own per key: certificate pools pick candidate
	// authorities by name, and a ring holds several during a rotation.
	fp := sha256.Sum256(priv.Public().(ed25519.PublicKey))
	// Every other field is fixed, so every node derives the very same
	// certificate (Ed25519 signatures are deterministic).
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: fmt.Sprintf("wgmesh cluster CA %x", fp[:8])},
		NotBefore:             time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC),
		NotAfter:              time.Date(2199, 12, 31, 0, 0, 0, 0, time.UTC),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, priv.Public(), priv)
	if err != nil {
		return nil, nil, fmt.Errorf("making the cluster CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("parsing the cluster CA certificate: %w", err)
	}
	return cert, priv, nil
}

// certificate returns this node's leaf, making it on first use and after
// the primary key changed.
func (c *ClusterTLS) certificate() (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.leaf != nil {
		return c.leaf, nil
	}
	primary := c.ring.Primary()
	ca, caKey, err := clusterCA(primary)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("making a certificate serial: %w", err)
	}
	now := c.now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: c.id.ID().String()},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(100 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, c.id.Signer().Public(), caKey)
	if err != nil {
		return nil, fmt.Errorf("making this node's certificate: %w", err)
	}
	c.leaf = &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: c.id.Signer()}
	c.leafFor = primary
	return c.leaf, nil
}

// verify checks a peer's certificate chain against the authorities of the
// current keyring.
func (c *ClusterTLS) verify(raw [][]byte) error {
	c.mu.Lock()
	roots := c.roots
	c.mu.Unlock()
	return c.verifyWith(roots, raw)
}

func (c *ClusterTLS) verifyWith(roots *x509.CertPool, raw [][]byte) error {
	if len(raw) == 0 {
		return errors.New("peer sent no certificate")
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return fmt.Errorf("parsing peer certificate: %w", err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: c.now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("peer certificate is not signed for this cluster (a different cluster key?): %w", err)
	}
	if _, err := leafID(leaf); err != nil {
		return err
	}
	return nil
}

func leafID(leaf *x509.Certificate) (NodeID, error) {
	pub, ok := leaf.PublicKey.(ed25519.PublicKey)
	if !ok {
		return NodeID{}, errors.New("peer certificate is not for an Ed25519 identity")
	}
	var id NodeID
	copy(id[:], pub)
	if leaf.Subject.CommonName != id.String() {
		return NodeID{}, errors.New("peer certificate names another identity than its key")
	}
	return id, nil
}

// ServerConfig is the TLS configuration for accepting connections.
func (c *ClusterTLS) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS13,
		ClientAuth:     tls.RequireAnyClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return c.certificate() },
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			return c.verify(raw)
		},
	}
}

// ClientConfig is the TLS configuration for dialling a peer. Host names
// mean nothing here: the chain is checked against the cluster's
// authorities instead, and the caller checks who answered with PeerID.
func (c *ClusterTLS) ClientConfig() *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		ServerName:           "wgmesh",
		InsecureSkipVerify:   true, // replaced by VerifyPeerCertificate
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return c.certificate() },
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			return c.verify(raw)
		},
	}
}

// PeerID returns the identity of the node at the other end of a TLS
// connection whose handshake is complete.
func PeerID(conn *tls.Conn) (NodeID, error) {
	st := conn.ConnectionState()
	if !st.HandshakeComplete || len(st.PeerCertificates) == 0 {
		return NodeID{}, errors.New("TLS handshake not complete")
	}
	return leafID(st.PeerCertificates[0])
}

// Handshake completes the TLS handshake of conn within timeout and
// returns the peer's identity.
func Handshake(conn *tls.Conn, timeout time.Duration) (NodeID, error) {
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return NodeID{}, err
	}
	if err := conn.Handshake(); err != nil {
		return NodeID{}, fmt.Errorf("TLS handshake with %s: %w", remote(conn), err)
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return NodeID{}, err
	}
	return PeerID(conn)
}

func remote(c net.Conn) string {
	if a := c.RemoteAddr(); a != nil {
		return a.String()
	}
	return "peer"
}
