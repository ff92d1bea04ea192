package crypto

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"

	"github.com/wgmesh/wgmesh/internal/durable"
)

// SecretFileMode is the only mode wgmesh writes secrets with, and the most
// it accepts when reading them.
const SecretFileMode fs.FileMode = 0o600

// ErrInsecureFile is wrapped by errors about secret files that others can read.
var ErrInsecureFile = errors.New("secret file is accessible to group or others")

// WriteSecretFile atomically and durably replaces path with data, mode
// 0600 whatever the mode of an existing file was.
func WriteSecretFile(path string, data []byte) error {
	return durable.WriteFile(path, data, SecretFileMode)
}

// ReadSecretFile reads a secret file, refusing one that group or others may
// access: a leaked cluster key lets anyone read and forge gossip.
func ReadSecretFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening secret file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s has mode %#o, want %#o (run: chmod 600 %s): %w",
			path, st.Mode().Perm(), SecretFileMode, path, ErrInsecureFile)
	}
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(f); err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	return buf.Bytes(), nil
}

// LoadOrCreatePrivateKey reads the WireGuard private key at path, creating a
// new one (mode 0600) if the file does not exist. created reports which.
func LoadOrCreatePrivateKey(path string) (key PrivateKey, created bool, err error) {
	b, err := ReadSecretFile(path)
	switch {
	case err == nil:
		k, err := ParsePrivateKey(string(b))
		if err != nil {
			return PrivateKey{}, false, fmt.Errorf("parsing %s: %w", path, err)
		}
		return k, false, nil
	case errors.Is(err, fs.ErrNotExist):
		k, err := GeneratePrivateKey()
		if err != nil {
			return PrivateKey{}, false, err
		}
		if err := StorePrivateKey(path, k); err != nil {
			return PrivateKey{}, false, err
		}
		return k, true, nil
	default:
		return PrivateKey{}, false, err
	}
}

// StorePrivateKey writes k to path with mode 0600.
func StorePrivateKey(path string, k PrivateKey) error {
	return WriteSecretFile(path, []byte(k.encode()+"\n"))
}

// Cluster keys are AES keys for memberlist's gossip encryption.
var clusterKeyLens = map[int]bool{16: true, 24: true, 32: true}

// GenerateClusterKey returns a new 32-byte cluster key in base64.
func GenerateClusterKey() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("reading random bytes: %w", err)
	}
	return encodeClusterKey(b), nil
}

func encodeClusterKey(k []byte) string { return base64.StdEncoding.EncodeToString(k) }

// ParseClusterKey decodes a base64 cluster key of 16, 24 or 32 bytes.
// The error never contains the input.
func ParseClusterKey(s string) ([]byte, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return nil, errors.New("cluster key is not valid base64")
	}
	if !clusterKeyLens[len(b)] {
		return nil, fmt.Errorf("cluster key has %d bytes, want 16, 24 or 32", len(b))
	}
	return b, nil
}

// Keyring is the ordered set of cluster keys: the first encrypts outgoing
// gossip, all of them are tried on incoming gossip. Holding two keys at once
// is how a cluster rotates its key without downtime.
type Keyring [][]byte

// Primary is the key that encrypts.
func (k Keyring) Primary() []byte { return k[0] }

// Equal reports whether two keyrings hold the same keys in the same order.
func (k Keyring) Equal(o Keyring) bool {
	return slices.EqualFunc(k, o, func(a, b []byte) bool { return bytes.Equal(a, b) })
}

// LoadKeyring reads a cluster key file: one base64 key per line, primary
// first; blank lines and lines starting with # are ignored.
func LoadKeyring(path string) (Keyring, error) {
	b, err := ReadSecretFile(path)
	if err != nil {
		return nil, err
	}
	return ParseKeyring(b)
}

// ParseKeyring parses the contents of a cluster key file.
func ParseKeyring(b []byte) (Keyring, error) {
	var ring Keyring
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, err := ParseClusterKey(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		if !seen[string(k)] {
			seen[string(k)] = true
			ring = append(ring, k)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading keyring: %w", err)
	}
	if len(ring) == 0 {
		return nil, errors.New("cluster key file holds no key")
	}
	return ring, nil
}
