package mesh

import (
	"encoding/json"
	"fmt"
	"net/netip"
)

// Gossip messages are a one-byte kind followed by JSON. JSON is not the
// most compact encoding, but entries are small, it is easy to fuzz, and
// memberlist compresses and encrypts whatever we hand it.
const (
	kindNetwork byte = 'N'
	kindForget  byte = 'F'
	kindVote    byte = 'V'
)

// maxStateBytes bounds a push/pull state we are willing to decode.
const maxStateBytes = 16 << 20

// message is one decoded gossip message; exactly one field is set.
type message struct {
	Net    *NetworkEntry
	Forget *Forget
	Vote   *vote
}

// vote tells a claimant, and only it, that From promised it a block.
// Votes are not gossiped: a claim needs them once, and a voter sends its
// promise again while the claim stays pending.
type vote struct {
	From   string       `json:"f"`
	Subnet netip.Prefix `json:"s"`
	Promise
}

func (v *vote) validate() error {
	if err := validName(v.From); err != nil {
		return err
	}
	if err := ValidSubnet(v.Subnet); err != nil {
		return err
	}
	return v.Promise.validate(v.Subnet)
}

func encodeVote(v vote) []byte {
	b, _ := json.Marshal(v)
	return append([]byte{kindVote}, b...)
}

func encodeNet(e NetworkEntry) []byte {
	b, _ := json.Marshal(e)
	return append([]byte{kindNetwork}, b...)
}

func encodeForget(f Forget) []byte {
	b, _ := json.Marshal(f)
	return append([]byte{kindForget}, b...)
}

// decodeMessage decodes and validates a gossip message from a peer.
func decodeMessage(b []byte) (message, error) {
	if len(b) == 0 {
		return message{}, invalid("empty message")
	}
	switch b[0] {
	case kindNetwork:
		var e NetworkEntry
		if err := json.Unmarshal(b[1:], &e); err != nil {
			return message{}, invalid("network entry: %v", err)
		}
		if err := e.Validate(); err != nil {
			return message{}, err
		}
		return message{Net: &e}, nil
	case kindForget:
		var f Forget
		if err := json.Unmarshal(b[1:], &f); err != nil {
			return message{}, invalid("forget: %v", err)
		}
		if err := f.Validate(); err != nil {
			return message{}, err
		}
		return message{Forget: &f}, nil
	case kindVote:
		var v vote
		if err := json.Unmarshal(b[1:], &v); err != nil {
			return message{}, invalid("vote: %v", err)
		}
		if err := v.validate(); err != nil {
			return message{}, err
		}
		return message{Vote: &v}, nil
	}
	return message{}, invalid("unknown message kind %#x", b[0])
}

// metaV1 is the memberlist node metadata: the protocol version and the
// node's NodeInfo. memberlist caps it at 512 bytes; this is about 150.
type metaV1 struct {
	// Proto is not "v": that tag belongs to NodeInfo.Version, and
	// encoding/json silently drops an embedded field whose name clashes.
	Proto int `json:"proto"`
	NodeInfo
}

func encodeMeta(n NodeInfo) []byte {
	b, _ := json.Marshal(metaV1{Proto: protocolV1, NodeInfo: n})
	return b
}

func decodeMeta(b []byte) (NodeInfo, error) {
	var m metaV1
	if err := json.Unmarshal(b, &m); err != nil {
		return NodeInfo{}, invalid("node metadata: %v", err)
	}
	if m.Proto != protocolV1 {
		return NodeInfo{}, invalid("node metadata: protocol version %d, this node speaks %d", m.Proto, protocolV1)
	}
	if err := m.NodeInfo.Validate(); err != nil {
		return NodeInfo{}, err
	}
	return m.NodeInfo, nil
}

func encodeState(s snapshotState) []byte {
	b, _ := json.Marshal(s)
	return b
}

// decodeState decodes a full state from a peer or from disk. Invalid
// items fail the whole state: a peer that sends garbage is broken, and
// merging half of it would hide that.
func decodeState(b []byte) (snapshotState, error) {
	if len(b) > maxStateBytes {
		return snapshotState{}, invalid("state of %d bytes exceeds %d", len(b), maxStateBytes)
	}
	var s snapshotState
	if err := json.Unmarshal(b, &s); err != nil {
		return snapshotState{}, invalid("state: %v", err)
	}
	if s.V != protocolV1 {
		return snapshotState{}, invalid("state: protocol version %d, this node speaks %d", s.V, protocolV1)
	}
	if s.Clock > maxAttempts {
		return snapshotState{}, invalid("state: clock out of range")
	}
	for i := range s.Nodes {
		if err := s.Nodes[i].Validate(); err != nil {
			return snapshotState{}, fmt.Errorf("node %d: %w", i, err)
		}
	}
	for i := range s.Networks {
		if err := s.Networks[i].Validate(); err != nil {
			return snapshotState{}, fmt.Errorf("network entry %d: %w", i, err)
		}
	}
	for i := range s.Forgotten {
		if err := s.Forgotten[i].Validate(); err != nil {
			return snapshotState{}, fmt.Errorf("forget %d: %w", i, err)
		}
	}
	return s, nil
}
