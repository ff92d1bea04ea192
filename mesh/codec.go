package mesh

import "encoding/json"

// Gossip messages are a one-byte kind followed by JSON. JSON is not the
// most compact encoding, but records are small, it is easy to fuzz, and
// memberlist compresses and encrypts whatever we hand it.
const (
	// kindEntry: a NetworkEntry, gossiped.
	kindEntry byte = 'E'
	// kindSession: a RelaySession, gossiped.
	kindSession byte = 'S'
	// kindObservation: an Observation, sent to its subject only.
	kindObservation byte = 'O'
)

func encodeMsg(kind byte, s signed) []byte {
	b, _ := json.Marshal(s)
	return append([]byte{kind}, b...)
}

func encodeEntryMsg(s signed) []byte { return encodeMsg(kindEntry, s) }

// message is a decoded gossip message whose record is well formed; its
// signature is checked when it is merged, against its node's identity.
type message struct {
	kind byte
	s    signed
}

// decodeMessage decodes a gossip message from a peer.
func decodeMessage(b []byte) (message, error) {
	if len(b) == 0 {
		return message{}, invalid("empty message")
	}
	if len(b) > maxRecordBytes {
		return message{}, invalid("message of %d bytes", len(b))
	}
	var s signed
	switch b[0] {
	case kindEntry, kindSession, kindObservation:
	default:
		return message{}, invalid("unknown message kind %#x", b[0])
	}
	if err := json.Unmarshal(b[1:], &s); err != nil {
		return message{}, invalid("message: %v", err)
	}
	var err error
	switch b[0] {
	case kindEntry:
		_, err = decodeEntry(s)
	case kindSession:
		_, err = decodeSession(s)
	case kindObservation:
		_, err = decodeObservation(s)
	}
	if err != nil {
		return message{}, err
	}
	return message{kind: b[0], s: s}, nil
}
