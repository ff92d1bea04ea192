package gossipnet

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"time"
)

// sealer makes and checks the header in front of every datagram of the
// gossip port and every frame of a dialback stream (gossipnet.go has the
// format): a member's name, generation and sequence, tagged with a key
// derived from the cluster key.
type sealer struct {
	self string
	keys atomic.Pointer[[][]byte]
	// gen is this node's generation; seq its last packet's sequence.
	gen atomic.Uint64
	seq atomic.Uint64
}

func newSealer(self string) *sealer {
	s := &sealer{self: self}
	// Within a generation the sequence only grows; seeding it from the
	// wall clock also keeps it growing across runs without a state
	// directory (tests), whose generation stays 1.
	s.seq.Store(uint64(time.Now().UnixNano()))
	empty := [][]byte{}
	s.keys.Store(&empty)
	return s
}

// Header constants.
const (
	hdrMagic     byte = 0xE7
	hdrV1        byte = 1
	hdrV2        byte = 2
	kindGossip   byte = 0
	kindProbe    byte = 1
	kindProbeAck byte = 2
	kindReflect  byte = 3
	kindReflectd byte = 4
	tagLen            = 16
	maxNameLen        = 255
	nonceLen          = 16
)

// setKeyring derives the header keys from the cluster keys; the first
// signs. No keys (--insecure) means tags are neither made nor checked.
func (t *sealer) setKeyring(ring [][]byte) {
	keys := make([][]byte, 0, len(ring))
	for _, k := range ring {
		m := hmac.New(sha256.New, k)
		m.Write([]byte("wgmesh gossip sender v1"))
		keys = append(keys, m.Sum(nil))
	}
	t.keys.Store(&keys)
}

// seal prepends the current header to body.
func (t *sealer) seal(kind byte, body []byte) []byte {
	b, _ := t.sealV(hdrV2, kind, body)
	return b
}

// headLen is the header's length in front of the body.
func (t *sealer) headLen(ver byte) int {
	n := 4 + len(t.self) + 8 + tagLen
	if ver >= hdrV2 {
		n += 8
	}
	return n
}

// sealV prepends a header of version ver to body, and returns the
// packet's sequence number.
func (t *sealer) sealV(ver, kind byte, body []byte) ([]byte, uint64) {
	name := t.self
	seq := t.seq.Add(1)
	b := make([]byte, 0, t.headLen(ver)+len(body))
	b = append(b, hdrMagic, ver, kind, byte(len(name)))
	b = append(b, name...)
	if ver >= hdrV2 {
		b = binary.BigEndian.AppendUint64(b, t.gen.Load())
	}
	b = binary.BigEndian.AppendUint64(b, seq)
	tagAt := len(b)
	b = append(b, make([]byte, tagLen)...)
	b = append(b, body...)
	if keys := *t.keys.Load(); len(keys) > 0 {
		copy(b[tagAt:], tag(keys[0], b[:tagAt], body))
	}
	return b, seq
}

func tag(key, head, body []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(head)
	m.Write(body)
	return m.Sum(nil)[:tagLen]
}

type header struct {
	ver  byte
	kind byte
	name string
	gen  uint64 // 0 in version 1
	seq  uint64
}

var errBadHeader = errors.New("bad gossip header")

// open parses and checks a sealed packet. ok is false for a packet
// without a header (memberlist's own, from a node that sends none).
func (t *sealer) open(b []byte) (h header, body []byte, ok bool, err error) {
	if len(b) < 4 || b[0] != hdrMagic {
		return header{}, b, false, nil
	}
	ver := b[1]
	if ver != hdrV1 && ver != hdrV2 {
		return header{}, nil, true, fmt.Errorf("%w: version %d", errBadHeader, ver)
	}
	n := int(b[3])
	nums := 8
	if ver >= hdrV2 {
		nums = 16
	}
	if n == 0 || len(b) < 4+n+nums+tagLen {
		return header{}, nil, true, fmt.Errorf("%w: truncated", errBadHeader)
	}
	h = header{ver: ver, kind: b[2], name: string(b[4 : 4+n])}
	if ver >= hdrV2 {
		h.gen = binary.BigEndian.Uint64(b[4+n:])
	}
	h.seq = binary.BigEndian.Uint64(b[4+n+nums-8:])
	tagAt := 4 + n + nums
	body = b[tagAt+tagLen:]
	if keys := *t.keys.Load(); len(keys) > 0 {
		good := false
		for _, k := range keys {
			if hmac.Equal(b[tagAt:tagAt+tagLen], tag(k, b[:tagAt], body)) {
				good = true
				break
			}
		}
		if !good {
			return header{}, nil, true, fmt.Errorf("%w: bad tag", errBadHeader)
		}
	}
	return h, body, true, nil
}
