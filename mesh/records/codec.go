package records

import (
	"encoding/json"

	"github.com/wgmesh/wgmesh/crypto"
)

// Signed is a record with its signature over exactly Data.
type Signed struct {
	Data json.RawMessage `json:"d"`
	Sig  []byte          `json:"s"`
}

func Sign(id crypto.Identity, purpose string, v any) Signed {
	b, _ := json.Marshal(v)
	return Signed{Data: b, Sig: id.Sign(purpose, b)}
}

// metaV2 is the memberlist node metadata: protocol version and the signed
// NodeInfo. memberlist caps it at 512 bytes.
type metaV2 struct {
	Proto int `json:"p"`
	Signed
}

func EncodeMeta(s Signed) []byte {
	b, _ := json.Marshal(metaV2{Proto: protocol, Signed: s})
	return b
}

// DecodeMeta decodes a node's metadata and checks its self-signature:
// the info is signed by the identity it names. Whether that identity is
// the one the catalog binds to the name is for the View to decide.
func DecodeMeta(b []byte) (NodeInfo, Signed, error) {
	if len(b) > maxRecordBytes {
		return NodeInfo{}, Signed{}, invalid("metadata of %d bytes", len(b))
	}
	var m metaV2
	if err := json.Unmarshal(b, &m); err != nil {
		return NodeInfo{}, Signed{}, invalid("node metadata: %v", err)
	}
	if m.Proto != protocol {
		return NodeInfo{}, Signed{}, invalid("node metadata of protocol %d, this node speaks %d (upgrade every node)", m.Proto, protocol)
	}
	var n NodeInfo
	if err := json.Unmarshal(m.Data, &n); err != nil {
		return NodeInfo{}, Signed{}, invalid("node info: %v", err)
	}
	if err := n.validate(); err != nil {
		return NodeInfo{}, Signed{}, err
	}
	if !n.ID.Verify(PurposeInfo, m.Data, m.Sig) {
		return NodeInfo{}, Signed{}, invalid("node %s: info not signed by its identity", n.Name)
	}
	return n, m.Signed, nil
}

// DecodeSession decodes a signed relay session without checking its
// signature.
func DecodeSession(s Signed) (RelaySession, error) {
	var r RelaySession
	if err := json.Unmarshal(s.Data, &r); err != nil {
		return RelaySession{}, invalid("relay session: %v", err)
	}
	if err := r.Validate(); err != nil {
		return RelaySession{}, err
	}
	return r, nil
}

// DecodeObservation decodes a signed observation without checking its
// signature.
func DecodeObservation(s Signed) (Observation, error) {
	var o Observation
	if err := json.Unmarshal(s.Data, &o); err != nil {
		return Observation{}, invalid("observation: %v", err)
	}
	if err := o.validate(); err != nil {
		return Observation{}, err
	}
	return o, nil
}

// DecodeEntry decodes a signed entry without checking its signature,
// which needs the identity of its node.
func DecodeEntry(s Signed) (NetworkEntry, error) {
	var e NetworkEntry
	if err := json.Unmarshal(s.Data, &e); err != nil {
		return NetworkEntry{}, invalid("network entry: %v", err)
	}
	if err := e.validate(); err != nil {
		return NetworkEntry{}, err
	}
	return e, nil
}

// DecodeInfo decodes a saved info and checks its self-signature.
func DecodeInfo(s Signed) (NodeInfo, error) {
	n, _, err := DecodeMeta(EncodeMeta(s))
	return n, err
}

// Gossip messages are a one-byte kind followed by JSON. JSON is not the
// most compact encoding, but records are small, it is easy to fuzz, and
// memberlist compresses and encrypts whatever we hand it.
const (
	// KindEntry: a NetworkEntry, gossiped.
	KindEntry byte = 'E'
	// KindSession: a RelaySession, gossiped.
	KindSession byte = 'S'
	// KindObservation: an Observation, sent to its subject only.
	KindObservation byte = 'O'
)

func EncodeMsg(kind byte, s Signed) []byte {
	b, _ := json.Marshal(s)
	return append([]byte{kind}, b...)
}

func EncodeEntryMsg(s Signed) []byte { return EncodeMsg(KindEntry, s) }

// Message is a decoded gossip message whose record is well formed; its
// signature is checked when it is merged, against its node's identity.
type Message struct {
	Kind   byte
	Signed Signed
}

// DecodeMessage decodes a gossip message from a peer.
func DecodeMessage(b []byte) (Message, error) {
	if len(b) == 0 {
		return Message{}, invalid("empty message")
	}
	if len(b) > maxRecordBytes {
		return Message{}, invalid("message of %d bytes", len(b))
	}
	var s Signed
	switch b[0] {
	case KindEntry, KindSession, KindObservation:
	default:
		return Message{}, invalid("unknown message kind %#x", b[0])
	}
	if err := json.Unmarshal(b[1:], &s); err != nil {
		return Message{}, invalid("message: %v", err)
	}
	var err error
	switch b[0] {
	case KindEntry:
		_, err = DecodeEntry(s)
	case KindSession:
		_, err = DecodeSession(s)
	case KindObservation:
		_, err = DecodeObservation(s)
	}
	if err != nil {
		return Message{}, err
	}
	return Message{Kind: b[0], Signed: s}, nil
}
