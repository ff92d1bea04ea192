// Package crypto holds wgmesh's secrets: the node's WireGuard key pair and
// the cluster keyring that encrypts gossip. It keeps them in files readable
// only by their owner and makes it hard to print them by accident: a
// PrivateKey formats as a redaction marker, never as its bytes.
//
// It imports nothing else of wgmesh but internal/durable, for writing its
// files.
package crypto

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/crypto/curve25519"
)

// KeyLen is the length of WireGuard keys.
const KeyLen = 32

// PrivateKey is a Curve25519 private key in WireGuard's clamped form.
//
// Its String, GoString and Format methods print a redaction marker so that
// logging or wrapping one in an error cannot leak it; Bytes is the one
// deliberate way out.
type PrivateKey struct{ k [KeyLen]byte }

// PublicKey is a Curve25519 public key. It is not secret.
type PublicKey [KeyLen]byte

// GeneratePrivateKey returns a new random private key.
func GeneratePrivateKey() (PrivateKey, error) {
	var k PrivateKey
	if _, err := rand.Read(k.k[:]); err != nil {
		return PrivateKey{}, fmt.Errorf("reading random bytes: %w", err)
	}
	clamp(&k.k)
	return k, nil
}

// clamp applies the Curve25519 scalar clamping that `wg genkey` applies.
func clamp(k *[KeyLen]byte) {
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
}

// ParsePrivateKey decodes a base64 private key as written by `wg genkey`.
// The error never contains the input.
func ParsePrivateKey(s string) (PrivateKey, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil || len(b) != KeyLen {
		return PrivateKey{}, errors.New("private key is not 32 bytes of base64")
	}
	var k PrivateKey
	copy(k.k[:], b)
	return k, nil
}

// IsZero reports whether k is the zero value.
func (k PrivateKey) IsZero() bool { return k.k == [KeyLen]byte{} }

// Public derives the public key.
func (k PrivateKey) Public() PublicKey {
	var pub PublicKey
	out, err := curve25519.X25519(k.k[:], curve25519.Basepoint)
	if err != nil {
		// X25519 fails only for low-order points, which the base point is not.
		panic("curve25519: " + err.Error())
	}
	copy(pub[:], out)
	return pub
}

// Bytes returns the raw key. Callers must not log or persist it except
// through this package.
func (k PrivateKey) Bytes() [KeyLen]byte { return k.k }

// encode is the base64 text form, used only to write the key file.
func (k PrivateKey) encode() string { return base64.StdEncoding.EncodeToString(k.k[:]) }

const redacted = "(redacted private key)"

func (PrivateKey) String() string   { return redacted }
func (PrivateKey) GoString() string { return redacted }

// Format makes every fmt verb, including %x and %#v, print the marker.
func (PrivateKey) Format(f fmt.State, _ rune) { _, _ = f.Write([]byte(redacted)) }

// MarshalText refuses, so a private key cannot end up in JSON by accident.
func (PrivateKey) MarshalText() ([]byte, error) {
	return nil, errors.New("refusing to marshal a private key")
}

// String is the base64 form, as `wg pubkey` prints it.
func (k PublicKey) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// Short is an abbreviation for logs.
func (k PublicKey) Short() string { return k.String()[:8] }

// IsZero reports whether k is the zero value.
func (k PublicKey) IsZero() bool { return k == PublicKey{} }

// ParsePublicKey decodes a base64 public key.
func ParsePublicKey(s string) (PublicKey, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return PublicKey{}, fmt.Errorf("decoding public key: %w", err)
	}
	if len(b) != KeyLen {
		return PublicKey{}, fmt.Errorf("public key has %d bytes, want %d", len(b), KeyLen)
	}
	var k PublicKey
	copy(k[:], b)
	return k, nil
}

// MarshalText implements encoding.TextMarshaler.
func (k PublicKey) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (k *PublicKey) UnmarshalText(b []byte) error {
	p, err := ParsePublicKey(string(b))
	if err != nil {
		return err
	}
	*k = p
	return nil
}
