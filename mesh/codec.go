package mesh

import "encoding/json"

// Gossip messages are a one-byte kind followed by JSON. JSON is not the
// most compact encoding, but records are small, it is easy to fuzz, and
// memberlist compresses and encrypts whatever we hand it.
const kindEntry byte = 'E'

func encodeEntryMsg(s signed) []byte {
	b, _ := json.Marshal(s)
	return append([]byte{kindEntry}, b...)
}

// decodeMessage decodes a gossip message from a peer; the entry's
// signature is checked when it is merged.
func decodeMessage(b []byte) (signed, error) {
	if len(b) == 0 {
		return signed{}, invalid("empty message")
	}
	if len(b) > maxRecordBytes {
		return signed{}, invalid("message of %d bytes", len(b))
	}
	if b[0] != kindEntry {
		return signed{}, invalid("unknown message kind %#x", b[0])
	}
	var s signed
	if err := json.Unmarshal(b[1:], &s); err != nil {
		return signed{}, invalid("message: %v", err)
	}
	if _, err := decodeEntry(s); err != nil {
		return signed{}, err
	}
	return s, nil
}
