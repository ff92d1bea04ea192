package crypto

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"strings"
)

// A node is its identity key, not its name: every record a node publishes
// is signed with it, the cluster binds the node's name to its public half
// on first join, and the cluster's TLS certificates carry it.

// NodeID is a node's public identity key (Ed25519). It is not secret.
type NodeID [ed25519.PublicKeySize]byte

// String is the base64 form (URL alphabet, no padding: it appears in
// certificate names and file names).
func (id NodeID) String() string { return base64.RawURLEncoding.EncodeToString(id[:]) }

// Short is an abbreviation for logs and messages.
func (id NodeID) Short() string { return id.String()[:10] }

// IsZero reports whether id is the zero value.
func (id NodeID) IsZero() bool { return id == NodeID{} }

// ParseNodeID decodes the String form.
func ParseNodeID(s string) (NodeID, error) {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil || len(b) != len(NodeID{}) {
		return NodeID{}, fmt.Errorf("node ID %.16q is not %d bytes of unpadded base64url", s, len(NodeID{}))
	}
	var id NodeID
	copy(id[:], b)
	return id, nil
}

// MarshalText implements encoding.TextMarshaler.
func (id NodeID) MarshalText() ([]byte, error) { return []byte(id.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (id *NodeID) UnmarshalText(b []byte) error {
	p, err := ParseNodeID(string(b))
	if err != nil {
		return err
	}
	*id = p
	return nil
}

// Signatures are domain-separated: a signature made for one purpose never
// verifies for another, whatever bytes the two messages share.
const signPrefix = "wgmesh signature v1\x00"

func signedMessage(purpose string, msg []byte) []byte {
	b := make([]byte, 0, len(signPrefix)+len(purpose)+1+len(msg))
	b = append(b, signPrefix...)
	b = append(b, purpose...)
	b = append(b, 0)
	return append(b, msg...)
}

// Verify reports whether sig is id's signature of msg for purpose.
func (id NodeID) Verify(purpose string, msg, sig []byte) bool {
	if len(sig) != ed25519.SignatureSize {
		return false
	}
	return ed25519.Verify(ed25519.PublicKey(id[:]), signedMessage(purpose, msg), sig)
}

// Identity is a node's identity key pair. Like PrivateKey, it formats as a
// redaction marker.
type Identity struct{ k ed25519.PrivateKey }

// GenerateIdentity returns a new random identity.
func GenerateIdentity() (Identity, error) {
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return Identity{}, fmt.Errorf("generating identity key: %w", err)
	}
	return Identity{k}, nil
}

// IdentityFromSeed derives an identity from a 32-byte seed (tests and
// simulations that need reproducible nodes).
func IdentityFromSeed(seed []byte) (Identity, error) {
	if len(seed) != ed25519.SeedSize {
		return Identity{}, fmt.Errorf("identity seed has %d bytes, want %d", len(seed), ed25519.SeedSize)
	}
	return Identity{ed25519.NewKeyFromSeed(seed)}, nil
}

// IsZero reports whether i is the zero value.
func (i Identity) IsZero() bool { return len(i.k) == 0 }

// ID is the public half.
func (i Identity) ID() NodeID {
	var id NodeID
	copy(id[:], i.k.Public().(ed25519.PublicKey))
	return id
}

// Sign signs msg for purpose.
func (i Identity) Sign(purpose string, msg []byte) []byte {
	return ed25519.Sign(i.k, signedMessage(purpose, msg))
}

// Signer is the private key as crypto.Signer, for TLS certificates.
func (i Identity) Signer() ed25519.PrivateKey { return i.k }

const redactedIdentity = "(redacted identity key)"

func (Identity) String() string             { return redactedIdentity }
func (Identity) GoString() string           { return redactedIdentity }
func (Identity) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(redactedIdentity)) }
func (Identity) MarshalText() ([]byte, error) {
	return nil, errors.New("refusing to marshal an identity key")
}

// LoadOrCreateIdentity reads the identity key at path, creating a new one
// (mode 0600) if the file does not exist. created reports which.
func LoadOrCreateIdentity(path string) (id Identity, created bool, err error) {
	b, err := ReadSecretFile(path)
	switch {
	case err == nil:
		seed, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
		if err != nil || len(seed) != ed25519.SeedSize {
			return Identity{}, false, fmt.Errorf("parsing %s: identity key is not %d bytes of base64", path, ed25519.SeedSize)
		}
		return Identity{ed25519.NewKeyFromSeed(seed)}, false, nil
	case errors.Is(err, fs.ErrNotExist):
		id, err := GenerateIdentity()
		if err != nil {
			return Identity{}, false, err
		}
		seed := base64.StdEncoding.EncodeToString(id.k.Seed())
		if err := WriteSecretFile(path, []byte(seed+"\n")); err != nil {
			return Identity{}, false, err
		}
		return id, true, nil
	default:
		return Identity{}, false, err
	}
}
