package crypto

import (
	"crypto/hmac"
	"crypto/sha256"
	"fmt"
)

// A server key names the hosts that may vote in consensus. The cluster
// key cannot do that: every member holds it. An operator who does not
// trust every host gives a second key to the hosts that may vote only;
// each publishes a proof that it holds the key, bound to its identity,
// and voters promote only members whose proof checks out. A member
// without the key cannot make a proof for its own identity, and a proof
// it copies from another member names that member's identity, which it
// cannot prove over TLS.

// serverProofLen is the length of a proof: a truncated HMAC-SHA256, as
// long as a 128-bit security level needs, so it fits in gossip metadata.
const serverProofLen = 16

// LoadServerKey reads a server key file (one key, as 'wgmesh keygen'
// writes; mode 0600).
func LoadServerKey(path string) ([]byte, error) {
	b, err := ReadSecretFile(path)
	if err != nil {
		return nil, err
	}
	ring, err := ParseKeyring(b)
	if err != nil {
		return nil, fmt.Errorf("server key %s: %w", path, err)
	}
	if len(ring) != 1 {
		return nil, fmt.Errorf("server key %s: holds %d keys, want one", path, len(ring))
	}
	return ring.Primary(), nil
}

// ServerProof is the proof that the holder of key speaks for id.
func ServerProof(key []byte, id NodeID) []byte {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte("wgmesh server v1\x00"))
	mac.Write(id[:])
	return mac.Sum(nil)[:serverProofLen]
}

// VerifyServerProof reports whether proof shows that id holds key.
func VerifyServerProof(key []byte, id NodeID, proof []byte) bool {
	return len(key) > 0 && len(proof) == serverProofLen && hmac.Equal(ServerProof(key, id), proof)
}
