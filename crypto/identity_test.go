package crypto

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestIdentitySignVerify(t *testing.T) {
	a, err := GenerateIdentity()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := GenerateIdentity()
	msg := []byte("node record")
	sig := a.Sign("record", msg)
	if !a.ID().Verify("record", msg, sig) {
		t.Fatal("own signature does not verify")
	}
	if a.ID().Verify("claim", msg, sig) {
		t.Error("signature verifies for another purpose")
	}
	if b.ID().Verify("record", msg, sig) {
		t.Error("signature verifies under another identity")
	}
	if a.ID().Verify("record", []byte("node recorD"), sig) {
		t.Error("signature verifies for other bytes")
	}
	if a.ID().Verify("record", msg, sig[:10]) {
		t.Error("short signature verifies")
	}
	for _, s := range []string{a.String(), fmt.Sprintf("%v %+v %#v %x %s", a, a, a, a, a)} {
		if !strings.Contains(s, "redacted") || strings.Contains(s, string(a.Signer().Seed())) {
			t.Errorf("identity printed as %q", s)
		}
	}
	if _, err := a.MarshalText(); err == nil {
		t.Error("identity marshals")
	}
	id, err := ParseNodeID(a.ID().String())
	if err != nil || id != a.ID() {
		t.Fatalf("ParseNodeID round trip: %v %v", id, err)
	}
	if _, err := ParseNodeID("short"); err == nil {
		t.Error("ParseNodeID accepted garbage")
	}
}

func TestLoadOrCreateIdentity(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "identity.key")
	a, created, err := LoadOrCreateIdentity(path)
	if err != nil || !created {
		t.Fatalf("create: %v %v", created, err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("identity file mode %v (%v)", st.Mode(), err)
	}
	b, created, err := LoadOrCreateIdentity(path)
	if err != nil || created || b.ID() != a.ID() {
		t.Fatalf("reload: %v %v same=%v", created, err, b.ID() == a.ID())
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreateIdentity(path); err == nil {
		t.Error("world-readable identity file accepted")
	}
	if err := os.WriteFile(path, []byte("not a key\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreateIdentity(path); err == nil || strings.Contains(err.Error(), "not a key") {
		t.Errorf("garbage identity file: %v", err)
	}
}

// tlsPair connects a client and a server over loopback and returns the
// identities each side saw, or the first error.
func tlsPair(t *testing.T, server, client *ClusterTLS) (sawClient, sawServer NodeID, err error) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	type res struct {
		id  NodeID
		err error
	}
	srv := make(chan res, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			srv <- res{err: err}
			return
		}
		defer c.Close()
		id, err := Handshake(tls.Server(c, server.ServerConfig()), 5*time.Second)
		srv <- res{id, err}
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sawServer, cerr := Handshake(tls.Client(c, client.ClientConfig()), 5*time.Second)
	if cerr != nil {
		c.Close()
	}
	r := <-srv
	if cerr != nil {
		return NodeID{}, NodeID{}, cerr
	}
	return r.id, sawServer, r.err
}

func TestClusterTLS(t *testing.T) {
	ida, _ := GenerateIdentity()
	idb, _ := GenerateIdentity()
	k1, _ := GenerateClusterKey()
	k2, _ := GenerateClusterKey()
	ring := func(keys ...string) Keyring {
		var r Keyring
		for _, k := range keys {
			b, err := ParseClusterKey(k)
			if err != nil {
				t.Fatal(err)
			}
			r = append(r, b)
		}
		return r
	}
	newTLS := func(id Identity, r Keyring) *ClusterTLS {
		c, err := NewClusterTLS(id, r)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	a, b := newTLS(ida, ring(k1)), newTLS(idb, ring(k1))
	sawClient, sawServer, err := tlsPair(t, a, b)
	if err != nil {
		t.Fatalf("same cluster key: %v", err)
	}
	if sawClient != idb.ID() || sawServer != ida.ID() {
		t.Fatalf("identities: server saw %s (want %s), client saw %s (want %s)", sawClient.Short(), idb.ID().Short(), sawServer.Short(), ida.ID().Short())
	}

	if _, _, err := tlsPair(t, a, newTLS(idb, ring(k2))); err == nil {
		t.Error("a node with another cluster key got in")
	}
	if _, _, err := tlsPair(t, a, newTLS(idb, nil)); err == nil {
		t.Error("an insecure node got into a keyed cluster")
	}
	if _, _, err := tlsPair(t, newTLS(ida, nil), newTLS(idb, nil)); err != nil {
		t.Errorf("two insecure nodes: %v", err)
	}

	// Rotation as docs/operations.md describes it: every node adds the new key
	// second, then makes it first, then drops the old one. Certificates
	// are mutual, so at each step both sides must accept each other.
	r := newTLS(idb, ring(k1, k2))
	for _, pair := range [][2]*ClusterTLS{{a, r}, {r, a}} {
		if _, _, err := tlsPair(t, pair[0], pair[1]); err != nil {
			t.Errorf("[k1] and [k1,k2]: %v", err)
		}
	}
	if err := r.SetKeyring(ring(k2, k1)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := tlsPair(t, a, r); err == nil {
		t.Error("a k1-only node accepted a certificate of k2")
	}
	if err := a.SetKeyring(ring(k1, k2)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := tlsPair(t, r, a); err != nil {
		t.Errorf("[k2,k1] and [k1,k2]: %v", err)
	}
	if err := r.SetKeyring(ring(k2)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := tlsPair(t, r, a); err == nil {
		t.Error("a k2-only node accepted a certificate of k1")
	}
	if err := a.SetKeyring(ring(k2)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := tlsPair(t, r, a); err != nil {
		t.Errorf("after both rotated: %v", err)
	}
}

// TestRekeyCutsConnectionsOfRemovedKeys: a guarded connection stays up
// while its peer's key is in the ring (during a rotation) and is cut the
// moment the key is removed, as an evicted host's must be; connections
// not guarded are left alone.
func TestRekeyCutsConnectionsOfRemovedKeys(t *testing.T) {
	ids := make([]Identity, 2)
	for i := range ids {
		ids[i], _ = GenerateIdentity()
	}
	k1, _ := GenerateClusterKey()
	k2, _ := GenerateClusterKey()
	old, _ := ParseClusterKey(k1)
	fresh, _ := ParseClusterKey(k2)
	server, err := NewClusterTLS(ids[0], Keyring{old})
	if err != nil {
		t.Fatal(err)
	}
	evicted, err := NewClusterTLS(ids[1], Keyring{old})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan *GuardedConn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			close(accepted)
			return
		}
		tc := tls.Server(c, server.ServerConfig())
		if _, err := Handshake(tc, 5*time.Second); err != nil {
			c.Close()
			close(accepted)
			return
		}
		accepted <- server.Guard(tc)
	}()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tc := tls.Client(c, evicted.ClientConfig())
	if _, err := Handshake(tc, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	g := <-accepted
	if g == nil {
		t.Fatal("the server refused the handshake")
	}
	defer g.Close()
	// usable checks the connection carries a byte from the evicted end.
	usable := func() error {
		if _, err := tc.Write([]byte{1}); err != nil {
			return err
		}
		_ = g.SetReadDeadline(time.Now().Add(2 * time.Second))
		var b [1]byte
		_, err := io.ReadFull(g, b[:])
		return err
	}
	if err := usable(); err != nil {
		t.Fatalf("before the rotation: %v", err)
	}
	for _, step := range []Keyring{{old, fresh}, {fresh, old}} {
		if cut, err := server.Rekey(step); err != nil || cut != 0 {
			t.Fatalf("rotation step of %d keys: cut %d, %v", len(step), cut, err)
		}
		if err := usable(); err != nil {
			t.Fatalf("while the old key is still in the ring: %v", err)
		}
	}
	cut, err := server.Rekey(Keyring{fresh})
	if err != nil || cut != 1 {
		t.Fatalf("removing the old key cut %d connections (%v), want 1", cut, err)
	}
	if err := usable(); err == nil {
		t.Fatal("the connection of a host holding only the removed key is still usable")
	}
	server.mu.Lock()
	left := len(server.guarded)
	server.mu.Unlock()
	if left != 0 {
		t.Errorf("%d connections still guarded after the cut", left)
	}
}
