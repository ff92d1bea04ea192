package crypto

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func TestPublicKeyMatchesWgtypes(t *testing.T) {
	for range 20 {
		k, err := GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		b := k.Bytes()
		ref := wgtypes.Key(b)
		if got, want := k.Public().String(), ref.PublicKey().String(); got != want {
			t.Fatalf("public key %s, wgtypes derives %s", got, want)
		}
		// Generated keys are already clamped, so clamping is a no-op.
		c := b
		clamp(&c)
		if c != b {
			t.Fatal("generated key is not clamped")
		}
	}
}

func TestPrivateKeyNeverPrints(t *testing.T) {
	k, err := GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	b := k.Bytes()
	secret := wgtypes.Key(b).String()
	outputs := []string{
		fmt.Sprint(k), fmt.Sprintf("%v %+v %#v %s %q %x %X", k, k, k, k, k, k, k),
		fmt.Sprintf("%v", struct{ K PrivateKey }{k}), fmt.Sprintf("%+v", &struct{ K PrivateKey }{k}),
		fmt.Errorf("wrapping %v: %w", k, errors.New("x")).Error(),
	}
	for _, out := range outputs {
		if strings.Contains(out, secret) || strings.Contains(out, fmt.Sprintf("%x", b[:8])) {
			t.Fatalf("private key leaked in %q", out)
		}
	}
	if _, err := json.Marshal(struct{ K PrivateKey }{k}); err == nil {
		t.Fatal("json.Marshal of a private key succeeded")
	}
}

func TestParsePrivateKeyErrorOmitsInput(t *testing.T) {
	in := "c2VjcmV0LXNlY3JldC1zZWNyZXQ="
	_, err := ParsePrivateKey(in)
	if err == nil || strings.Contains(err.Error(), in) {
		t.Fatalf("err = %v", err)
	}
}

func TestLoadOrCreatePrivateKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "wg.key")
	k1, created, err := LoadOrCreatePrivateKey(path)
	if err != nil || !created {
		t.Fatalf("first load: created=%v err=%v", created, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %#o, want 0600", st.Mode().Perm())
	}
	k2, created, err := LoadOrCreatePrivateKey(path)
	if err != nil || created {
		t.Fatalf("second load: created=%v err=%v", created, err)
	}
	if k1.Bytes() != k2.Bytes() {
		t.Fatal("reloaded key differs")
	}

	// The file is interoperable with wg(8): one base64 line.
	b, _ := os.ReadFile(path)
	if _, err := wgtypes.ParseKey(strings.TrimSpace(string(b))); err != nil {
		t.Fatalf("key file is not wg format: %v", err)
	}

	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err = LoadOrCreatePrivateKey(path)
	if !errors.Is(err, ErrInsecureFile) {
		t.Fatalf("world-readable key: err = %v, want ErrInsecureFile", err)
	}
	if !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("error %q does not say how to fix it", err)
	}
}

func TestKeyring(t *testing.T) {
	k1, _ := GenerateClusterKey()
	k2, _ := GenerateClusterKey()
	tests := []struct {
		name    string
		in      string
		want    int
		wantErr string
	}{
		{"one", k1 + "\n", 1, ""},
		{"two with comments", "# rotation in progress\n\n" + k2 + "\n" + k1 + "\n", 2, ""},
		{"duplicate", k1 + "\n" + k1 + "\n", 1, ""},
		{"aes128", "AAAAAAAAAAAAAAAAAAAAAA==\n", 1, ""},
		{"empty", "# nothing\n", 0, "holds no key"},
		{"not base64", k1 + "\nnot-a-key!\n", 0, "line 2: cluster key is not valid base64"},
		{"wrong length", "AAAA\n", 0, "line 1: cluster key has 3 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ring, err := ParseKeyring([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), k1) {
					t.Fatal("error contains key material")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(ring) != tt.want {
				t.Fatalf("got %d keys, want %d", len(ring), tt.want)
			}
		})
	}
	ring, _ := ParseKeyring([]byte(k2 + "\n" + k1))
	want, _ := ParseClusterKey(k2)
	if string(ring.Primary()) != string(want) {
		t.Fatal("primary is not the first key")
	}
}

func TestLoadKeyringRefusesReadableFile(t *testing.T) {
	k, _ := GenerateClusterKey()
	path := filepath.Join(t.TempDir(), "cluster.key")
	if err := os.WriteFile(path, []byte(k), 0o640); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKeyring(path); !errors.Is(err, ErrInsecureFile) {
		t.Fatalf("err = %v", err)
	}
	if err := WriteSecretFile(path, []byte(k)); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKeyring(path); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKeyring(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing file: err = %v", err)
	}
}
