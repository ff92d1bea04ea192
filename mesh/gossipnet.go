package mesh

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// gossipTransport wraps memberlist's transport to make gossip work with
// members behind NAT, which memberlist alone does not: it sends every
// member's packets (probes, acks, gossip, all addressed by node name) to
// where that member's packets were last seen coming from, rather than to
// the address the member advertises, which behind NAT is a private one.
//
// For that it must know who sent each datagram, which memberlist's
// encrypted packets do not say outside their encryption. So each
// datagram carries a small header, in front of memberlist's packet:
//
//	0xE7 | version 1 | kind | name length | name | sequence (8) | tag (16) | body
//
// The tag is an HMAC (SHA-256, cut to 16 bytes) over everything else,
// keyed from the cluster key: only a member can make one. A sighting
// (the sender's name and the packet's source) is learned only from a
// packet whose sequence number is higher than any before from that
// sender, so a replayed packet cannot move a member's address; packets
// are delivered to memberlist either way. Member names in the header are
// no secret: they are also in memberlist's own packets to new members.
//
// The same header carries path MTU probes and their acknowledgements
// (pmtu.go), so that probes use the gossip port and its NAT mappings.
//
// Streams (TCP) pass through untouched. A member behind NAT cannot be
// dialled; dialling one fails at once with errBehindNAT rather than after
// a timeout, and memberlist's push/pull with it happens when the member
// dials out.
type gossipTransport struct {
	inner memberlist.NodeAwareTransport
	df    dfWriter // nil: no path MTU probes
	self  string

	keys    atomic.Pointer[[][]byte]
	seq     atomic.Uint64
	packets chan *memberlist.Packet
	done    chan struct{}
	stop    sync.Once
	wg      sync.WaitGroup

	// reflector, if set, answers members asking where their gossip
	// port's packets come from (nat.go), on a port of its own.
	reflector *net.UDPConn

	mu          sync.Mutex
	sightings   map[string]sighting
	reflections map[string]sighting
	hints       map[string]routeHint
	waiting     map[uint64]chan struct{}
	// refused counts packets dropped for a bad tag.
	refused uint64
}

var _ memberlist.NodeAwareTransport = (*gossipTransport)(nil)

// sighting is where a member's packets last came from.
type sighting struct {
	Addr netip.AddrPort
	At   time.Time
	seq  uint64
}

// routeHint is what the member's own published info says about reaching
// it: how members see it (Public, if behind NAT), and whether it reads
// the header at all.
type routeHint struct {
	Advertised netip.AddrPort
	Public     netip.AddrPort
	BehindNAT  bool
	Header     bool
}

// Header constants.
const (
	hdrMagic     byte = 0xE7
	hdrVersion   byte = 1
	kindGossip   byte = 0
	kindProbe    byte = 1
	kindProbeAck byte = 2
	kindReflect  byte = 3
	kindReflectd byte = 4
	tagLen            = 16
	maxNameLen        = 255
)

// sightingTTL is how long a sighting is used to route to a member.
const sightingTTL = 2 * time.Minute

// errBehindNAT refuses a stream to a member that cannot be dialled. Its
// text marks the memberlist log lines of such a failure, which are
// expected and logged at debug level.
var errBehindNAT = errors.New("behind NAT: it connects out itself")

func newGossipTransport(inner memberlist.NodeAwareTransport, self string) *gossipTransport {
	t := &gossipTransport{inner: inner, self: self, packets: make(chan *memberlist.Packet), done: make(chan struct{}),
		sightings: map[string]sighting{}, reflections: map[string]sighting{}, hints: map[string]routeHint{}, waiting: map[uint64]chan struct{}{}}
	if df, ok := inner.(dfWriter); ok {
		t.df = df
	}
	t.seq.Store(uint64(time.Now().UnixNano()))
	empty := [][]byte{}
	t.keys.Store(&empty)
	return t
}

// setKeyring derives the header keys from the cluster keys; the first
// signs. No keys (--insecure) means tags are neither made nor checked.
func (t *gossipTransport) setKeyring(ring [][]byte) {
	keys := make([][]byte, 0, len(ring))
	for _, k := range ring {
		m := hmac.New(sha256.New, k)
		m.Write([]byte("wgmesh gossip sender v1"))
		keys = append(keys, m.Sum(nil))
	}
	t.keys.Store(&keys)
}

func (t *gossipTransport) setHints(h map[string]routeHint) {
	t.mu.Lock()
	t.hints = h
	t.mu.Unlock()
}

func (t *gossipTransport) start() {
	t.wg.Add(1)
	go t.loopPackets()
	if t.reflector != nil {
		t.wg.Add(1)
		go t.loopReflect()
	}
}

// seal prepends the header to body.
func (t *gossipTransport) seal(kind byte, body []byte) []byte {
	name := t.self
	b := make([]byte, 0, 4+len(name)+8+tagLen+len(body))
	b = append(b, hdrMagic, hdrVersion, kind, byte(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint64(b, t.seq.Add(1))
	tagAt := len(b)
	b = append(b, make([]byte, tagLen)...)
	b = append(b, body...)
	if keys := *t.keys.Load(); len(keys) > 0 {
		copy(b[tagAt:], tag(keys[0], b[:tagAt], body))
	}
	return b
}

func tag(key, head, body []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(head)
	m.Write(body)
	return m.Sum(nil)[:tagLen]
}

type header struct {
	kind byte
	name string
	seq  uint64
}

var errBadHeader = errors.New("bad gossip header")

// open parses and checks a sealed packet. ok is false for a packet
// without a header (memberlist's own, from a node that sends none).
func (t *gossipTransport) open(b []byte) (h header, body []byte, ok bool, err error) {
	if len(b) < 4 || b[0] != hdrMagic {
		return header{}, b, false, nil
	}
	if b[1] != hdrVersion {
		return header{}, nil, true, fmt.Errorf("%w: version %d", errBadHeader, b[1])
	}
	n := int(b[3])
	if n == 0 || len(b) < 4+n+8+tagLen {
		return header{}, nil, true, fmt.Errorf("%w: truncated", errBadHeader)
	}
	h = header{kind: b[2], name: string(b[4 : 4+n]), seq: binary.BigEndian.Uint64(b[4+n:])}
	tagAt := 4 + n + 8
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

func (t *gossipTransport) loopPackets() {
	defer t.wg.Done()
	in := t.inner.PacketCh()
	for {
		var p *memberlist.Packet
		select {
		case <-t.done:
			return
		case p = <-in:
		}
		h, body, sealed, err := t.open(p.Buf)
		if err != nil {
			t.mu.Lock()
			t.refused++
			t.mu.Unlock()
			continue
		}
		if sealed {
			from := addrPortOf(p.From)
			if h.kind != kindReflectd {
				// Everything else comes from the sender's gossip port;
				// a reflection from its relay port.
				t.sighted(h, from, p.Timestamp)
			}
			switch h.kind {
			case kindGossip:
			case kindProbe:
				t.ackProbe(h, body, from)
				continue
			case kindProbeAck:
				t.probeAcked(h.seq, body)
				continue
			case kindReflectd:
				t.reflected(h, body, p.Timestamp)
				continue
			default:
				continue
			}
		}
		select {
		case t.packets <- &memberlist.Packet{Buf: body, From: p.From, Timestamp: p.Timestamp}:
		case <-t.done:
			return
		}
	}
}

func addrPortOf(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.UDPAddr:
		return unmapPort(a.AddrPort())
	case nil:
		return netip.AddrPort{}
	}
	ap, _ := parseAddrPort(a.String())
	return ap
}

// sighted records where a member's packet came from, if it is newer than
// every packet of that member so far.
func (t *gossipTransport) sighted(h header, from netip.AddrPort, at time.Time) {
	if !from.IsValid() || h.name == t.self || len(h.name) > maxNameLen {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	cur, ok := t.sightings[h.name]
	// A sender that restarted with a lower sequence (its clock went
	// back) is believed again once its last sighting is old.
	if ok && h.seq <= cur.seq && at.Sub(cur.At) < 10*time.Second {
		return
	}
	if at.IsZero() {
		at = time.Now()
	}
	t.sightings[h.name] = sighting{Addr: from, At: at, seq: h.seq}
}

// sightingsCopy returns the current sightings.
func (t *gossipTransport) sightingsCopy() map[string]sighting {
	t.mu.Lock()
	defer t.mu.Unlock()
	return maps.Clone(t.sightings)
}

// forget drops a member's sighting (it was forgotten).
func (t *gossipTransport) forget(name string) {
	t.mu.Lock()
	delete(t.sightings, name)
	t.mu.Unlock()
}

// route is where packets for the member name go: where its packets come
// from, else where it says members see it, else addr (the address it
// advertises).
func (t *gossipTransport) route(name, addr string) (string, bool) {
	if name == "" {
		return addr, false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	h, hinted := t.hints[name]
	header := hinted && h.Header
	if s, ok := t.sightings[name]; ok && time.Since(s.At) < sightingTTL {
		return s.Addr.String(), header
	}
	if h.Public.IsValid() {
		return h.Public.String(), header
	}
	return addr, header
}

// FinalAdvertiseAddr implements memberlist.Transport.
func (t *gossipTransport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	return t.inner.FinalAdvertiseAddr(ip, port)
}

// WriteTo implements memberlist.Transport: no name, no header (the
// receiver may be a node not known yet, of a version without it).
func (t *gossipTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.inner.WriteTo(b, addr)
}

// WriteToAddress implements memberlist.NodeAwareTransport.
func (t *gossipTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	dst, header := t.route(a.Name, a.Addr)
	if header {
		b = t.seal(kindGossip, b)
	}
	return t.inner.WriteToAddress(b, memberlist.Address{Addr: dst, Name: a.Name})
}

// PacketCh implements memberlist.Transport.
func (t *gossipTransport) PacketCh() <-chan *memberlist.Packet { return t.packets }

// DialTimeout implements memberlist.Transport.
func (t *gossipTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.inner.DialTimeout(addr, timeout)
}

// DialAddressTimeout implements memberlist.NodeAwareTransport.
func (t *gossipTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	if !t.dialable(a.Name) {
		return nil, fmt.Errorf("node %s is %w", a.Name, errBehindNAT)
	}
	return t.inner.DialAddressTimeout(a, timeout)
}

// dialable reports whether a member can be dialled: it is not behind
// NAT, or this node sees it at the address it advertises (a host of the
// same private network).
func (t *gossipTransport) dialable(name string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	h, ok := t.hints[name]
	if !ok || !h.BehindNAT {
		return true
	}
	s, seen := t.sightings[name]
	return seen && s.Addr == h.Advertised && time.Since(s.At) < sightingTTL
}

// StreamCh implements memberlist.Transport.
func (t *gossipTransport) StreamCh() <-chan net.Conn { return t.inner.StreamCh() }

// Shutdown implements memberlist.Transport.
func (t *gossipTransport) Shutdown() error {
	t.stop.Do(func() {
		close(t.done)
		if t.reflector != nil {
			t.reflector.Close()
		}
	})
	t.wg.Wait()
	// The inner transport's UDP listener may be blocked handing over a
	// packet that loopPackets will no longer take, and the inner
	// Shutdown waits for that listener: drain until it has stopped.
	in, stopped := t.inner.PacketCh(), make(chan struct{})
	go func() {
		for {
			select {
			case <-in:
			case <-stopped:
				return
			}
		}
	}()
	err := t.inner.Shutdown()
	close(stopped)
	return err
}

// askReflection asks the relay at to say where this node's gossip port's
// packets come from; the answer arrives as a sealed packet (reflected).
func (t *gossipTransport) askReflection(to netip.AddrPort) {
	_, _ = t.inner.WriteTo(t.seal(kindReflect, nil), to.String())
}

// loopReflect answers members' reflection requests with the source of
// their request: a sealed reply, so only members ask and only members
// believe the answer.
func (t *gossipTransport) loopReflect() {
	defer t.wg.Done()
	buf := make([]byte, 2048)
	for {
		n, from, err := t.reflector.ReadFromUDPAddrPort(buf)
		if err != nil {
			select {
			case <-t.done:
				return
			default:
				continue
			}
		}
		h, _, sealed, err := t.open(buf[:n])
		if err != nil || !sealed || h.kind != kindReflect {
			continue
		}
		from = unmapPort(from)
		b, _ := from.MarshalBinary()
		_, _ = t.reflector.WriteToUDPAddrPort(t.seal(kindReflectd, b), from)
	}
}

func (t *gossipTransport) reflected(h header, body []byte, at time.Time) {
	var a netip.AddrPort
	if err := a.UnmarshalBinary(body); err != nil || !a.IsValid() {
		return
	}
	if at.IsZero() {
		at = time.Now()
	}
	t.mu.Lock()
	t.reflections[h.name] = sighting{Addr: a, At: at}
	t.mu.Unlock()
}

// reflectionsCopy returns the latest reflection from each relay.
func (t *gossipTransport) reflectionsCopy() map[string]sighting {
	t.mu.Lock()
	defer t.mu.Unlock()
	return maps.Clone(t.reflections)
}

// ipOverhead is the IP and UDP header size in front of a datagram.
func ipOverhead(a netip.Addr) int {
	if a.Is4() || a.Is4In6() {
		return 20 + 8
	}
	return 40 + 8
}

// errTooBig: the local interface's MTU is below the probe.
var errTooBig = errors.New("larger than the outgoing interface's MTU")

// probe sends two path MTU probes of size bytes (whole IP packets) with
// DF set to a member at to, and reports whether either was acknowledged
// within timeout.
func (t *gossipTransport) probe(ctx context.Context, to netip.AddrPort, size int, timeout time.Duration) (bool, error) {
	if t.df == nil {
		return false, errors.New("the gossip transport cannot send path MTU probes")
	}
	headLen := 4 + len(t.self) + 8 + tagLen
	pad := size - ipOverhead(to.Addr()) - headLen
	if pad < 2 {
		return false, fmt.Errorf("probe of %d bytes is too small", size)
	}
	body := make([]byte, pad)
	binary.BigEndian.PutUint16(body, uint16(size))
	acked := make(chan struct{}, 1)
	var seqs []uint64
	defer func() {
		t.mu.Lock()
		for _, s := range seqs {
			delete(t.waiting, s)
		}
		t.mu.Unlock()
	}()
	for range 2 {
		pkt := t.seal(kindProbe, body)
		seq := binary.BigEndian.Uint64(pkt[4+len(t.self):])
		t.mu.Lock()
		t.waiting[seq] = acked
		t.mu.Unlock()
		seqs = append(seqs, seq)
		if err := t.df.WriteDF(pkt, to); err != nil {
			if isMsgSize(err) {
				return false, errTooBig
			}
			return false, err
		}
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-acked:
		return true, nil
	case <-timer.C:
		return false, nil
	case <-ctx.Done():
		return false, ctx.Err()
	case <-t.done:
		return false, net.ErrClosed
	}
}

// fits reports whether a probe of size bytes leaves the local interface
// (it is sent, once; an answer is not waited for).
func (t *gossipTransport) fits(to netip.AddrPort, size int) bool {
	if t.df == nil {
		return false
	}
	pad := size - ipOverhead(to.Addr()) - (4 + len(t.self) + 8 + tagLen)
	if pad < 2 {
		return true
	}
	body := make([]byte, pad)
	binary.BigEndian.PutUint16(body, uint16(size))
	return !isMsgSize(t.df.WriteDF(t.seal(kindProbe, body), to))
}

// ackProbe answers a probe with a small packet from the gossip socket,
// which never sets DF: the answer must not depend on the path back.
func (t *gossipTransport) ackProbe(h header, body []byte, from netip.AddrPort) {
	if len(body) < 2 || !from.IsValid() {
		return
	}
	ack := make([]byte, 10)
	binary.BigEndian.PutUint64(ack, h.seq)
	copy(ack[8:], body[:2])
	_, _ = t.inner.WriteTo(t.seal(kindProbeAck, ack), from.String())
}

func (t *gossipTransport) probeAcked(_ uint64, body []byte) {
	if len(body) < 10 {
		return
	}
	seq := binary.BigEndian.Uint64(body)
	t.mu.Lock()
	ch, ok := t.waiting[seq]
	t.mu.Unlock()
	if ok {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}
