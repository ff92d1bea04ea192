package crypto

import (
	"os"
	"path/filepath"
	"testing"
)

func TestServerProof(t *testing.T) {
	a, _ := GenerateIdentity()
	b, _ := GenerateIdentity()
	key := []byte("0123456789abcdef0123456789abcdef")
	other := []byte("fedcba9876543210fedcba9876543210")
	p := ServerProof(key, a.ID())
	if !VerifyServerProof(key, a.ID(), p) {
		t.Fatal("a proof made with the key does not verify")
	}
	// A member that copies a's proof cannot use it for itself.
	if VerifyServerProof(key, b.ID(), p) {
		t.Fatal("a's proof verified for b")
	}
	// A member with another key (the cluster key, say) cannot make one.
	if VerifyServerProof(key, a.ID(), ServerProof(other, a.ID())) {
		t.Fatal("a proof made with another key verified")
	}
	if VerifyServerProof(nil, a.ID(), p) || VerifyServerProof(key, a.ID(), nil) || VerifyServerProof(key, a.ID(), p[:8]) {
		t.Fatal("an empty key or a short proof verified")
	}
}

func TestLoadServerKey(t *testing.T) {
	dir := t.TempDir()
	k, _ := GenerateClusterKey()
	path := filepath.Join(dir, "server.key")
	if err := WriteSecretFile(path, []byte(k+"\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadServerKey(path); err != nil {
		t.Fatal(err)
	}
	k2, _ := GenerateClusterKey()
	if err := WriteSecretFile(path, []byte(k+"\n"+k2+"\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadServerKey(path); err == nil {
		t.Fatal("a file of two keys was taken as a server key")
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadServerKey(path); err == nil {
		t.Fatal("a server key readable by others was taken")
	}
}
