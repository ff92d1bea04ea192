package gossipnet

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/wgmesh/wgmesh/crypto"
)

// Transport wraps memberlist's transport to make gossip work with
// members behind NAT, which memberlist alone does not: it sends every
// member's packets (probes, acks, gossip, all addressed by node name) to
// where that member's packets were last seen coming from, rather than to
// the address the member advertises, which behind NAT is a private one.
//
// For that it must know who sent each datagram, which memberlist's
// encrypted packets do not say outside their encryption. So each
// datagram carries a small header, in front of memberlist's packet:
//
//	0xE7 | version 2 | kind | name length | name | generation (8) | sequence (8) | tag (16) | body
//
// The tag is an HMAC (SHA-256, cut to 16 bytes) over everything else,
// keyed from the cluster key: only a member can make one. The generation
// counts the sender's runs (stored durably by the caller, SetGeneration;
// mesh's NodeInfo.Version carries it too), the sequence counts its packets
// within the run, from the wall clock's nanoseconds at start. A sighting
// (the sender's name and the packet's source) is learned only from a
// packet whose (generation, sequence) is higher than any before from
// that sender's identity, and whose generation is no older than the one
// the sender publishes: there is no window after which an old packet is
// believed again, and a run whose clock went back is still believed, as
// its generation is higher. So a replayed packet cannot move a member's
// address; packets are delivered to memberlist either way (it drops
// duplicates itself). Member names in the header are no secret: they
// are also in memberlist's own packets to new members.
//
// Rolling upgrades: agents of 559f90d and before send and read only
// version 1, without the generation, and refuse any other version. A
// node publishes that it reads version 2 (RouteHint.ReplayProof, from
// mesh's featureReplayProof); packets go out as version 2 only to members
// that publish it, as version 1 to those that publish only that they
// read the header (RouteHint.Header). Version 1 packets are believed
// only from members that do not publish ReplayProof (a v2 node's
// version 1 packets are meant for old nodes: elsewhere they are
// replays), with the sender's published generation standing in for the
// one the packet lacks: strictly increasing sequence within it, no
// window.
//
// The same header carries path MTU probes and their acknowledgements
// (Probe; mesh/pmtu.go runs the search), so that probes use the gossip
// port and its NAT mappings.
//
// Streams (TCP) pass through untouched. A member behind NAT cannot be
// dialled; dialling one fails at once with ErrBehindNAT rather than after
// a timeout, and memberlist's push/pull with it happens when the member
// dials out.
type Transport struct {
	inner memberlist.NodeAwareTransport
	df    DFWriter // nil: no path MTU probes
	// sealer makes and checks the header.
	*sealer
	packets chan *memberlist.Packet
	done    chan struct{}
	stop    sync.Once
	wg      sync.WaitGroup

	// reflector, if set, answers members asking where their gossip
	// port's packets come from (SetReflector), on a port of its own.
	reflector *net.UDPConn

	mu          sync.Mutex
	sightings   map[string]Sighting
	reflections map[string]Sighting
	hints       map[string]RouteHint
	waiting     map[uint64]chan struct{}
	// asked: reflection requests not answered yet, by nonce (relays
	// reading version 2), or by relay (older relays, which echo no
	// nonce).
	asked    map[[nonceLen]byte]reflectAsk
	askedOld map[string]reflectAsk
	// refused counts packets dropped for a bad tag.
	refused uint64

	// streams are the streams for memberlist: every stream but a
	// dialback request (dialback.go). sorting holds the streams whose
	// first byte is awaited, closed on shutdown.
	streams     chan net.Conn
	streamsOnce sync.Once
	sorting     map[net.Conn]struct{}
	dialbacks   chan struct{}
}

var _ memberlist.NodeAwareTransport = (*Transport)(nil)

// Sighting is where a member's packets last came from (Addr), and when;
// id, gen and seq mark the newest packet believed.
type Sighting struct {
	Addr netip.AddrPort
	At   time.Time
	id   crypto.NodeID
	gen  uint64
	seq  uint64
}

// reflectAsk is a reflection request awaiting its answer.
type reflectAsk struct {
	relay string
	at    time.Time
	// minSeq: an older relay's answer must be sealed after the request,
	// so after every packet of it seen before.
	minSeq uint64
}

// RouteHint is what the member's own published info says about reaching
// it: how members see it (Public, if behind NAT), and whether it reads
// the header at all.
type RouteHint struct {
	// Advertised is its gossip address as it advertises it; Public
	// where members see it, if that is consistent.
	Advertised netip.AddrPort
	Public     netip.AddrPort
	// BehindNAT: it cannot be dialled (unless seen at Advertised).
	BehindNAT bool
	// Header: it reads the header (version 1 at least).
	Header bool
	// ReplayProof: it reads header version 2. ID and Gen are its
	// identity and the generation it publishes (0: unknown).
	ReplayProof bool
	ID          crypto.NodeID
	Gen         uint64
}

// reflectWait is how long a reflection request waits for its answer.
const reflectWait = 10 * time.Second

// sightingTTL is how long a sighting is used to route to a member.
const sightingTTL = 2 * time.Minute

// ErrBehindNAT refuses a stream to a member that cannot be dialled. Its
// text marks the memberlist log lines of such a failure, which are
// expected and logged at debug level.
var ErrBehindNAT = errors.New("behind NAT: it connects out itself")

// New wraps inner for the member named self. If inner can send with DF
// set (DFWriter), the transport sends path MTU probes. It starts
// nothing; Start does.
func New(inner memberlist.NodeAwareTransport, self string) *Transport {
	t := &Transport{inner: inner, sealer: newSealer(self), packets: make(chan *memberlist.Packet), done: make(chan struct{}),
		sightings: map[string]Sighting{}, reflections: map[string]Sighting{}, hints: map[string]RouteHint{}, waiting: map[uint64]chan struct{}{},
		asked: map[[nonceLen]byte]reflectAsk{}, askedOld: map[string]reflectAsk{},
		streams: make(chan net.Conn), sorting: map[net.Conn]struct{}{}, dialbacks: make(chan struct{}, dialbacksAtOnce)}
	if df, ok := inner.(DFWriter); ok {
		t.df = df
	}
	return t
}

// version is the header version the member reads, 0 for none.
func (h RouteHint) version() byte {
	switch {
	case h.ReplayProof:
		return hdrV2
	case h.Header:
		return hdrV1
	}
	return 0
}

// versionFor is the header version of probes and reflection requests
// for the member name: the newest it reads; version 1, which every
// version reads, for a member whose info has not arrived yet (its
// answer matters, not its sighting of this node).
func (t *Transport) versionFor(name string) byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	if h := t.hints[name]; h.ReplayProof {
		return hdrV2
	}
	return hdrV1
}

// SetHints replaces what is known of reaching each member, by name: the
// members' published info, which the transport cannot read itself.
func (t *Transport) SetHints(h map[string]RouteHint) {
	t.mu.Lock()
	t.hints = h
	t.mu.Unlock()
}

// SetKeyring sets the cluster keys the header is sealed and checked
// with; the first seals. No keys (--insecure) means tags are neither
// made nor checked.
func (t *Transport) SetKeyring(ring [][]byte) { t.setKeyring(ring) }

// SetReflector makes the transport answer members' reflection requests
// (AskReflection) on c, a UDP socket of its own: before Start. Shutdown
// closes it.
func (t *Transport) SetReflector(c *net.UDPConn) { t.reflector = c }

// CanProbe reports whether the transport can send path MTU probes: its
// inner transport is a DFWriter.
func (t *Transport) CanProbe() bool { return t.df != nil }

// Start starts reading the inner transport's packets and streams, and
// answering reflection requests if SetReflector gave a port.
func (t *Transport) Start() {
	t.StartStreams()
	t.wg.Add(1)
	go t.loopPackets()
	if t.reflector != nil {
		t.wg.Add(1)
		go t.loopReflect()
	}
}

// StartStreams starts sorting incoming streams (dialback requests are
// answered from then on), before Start if need be.
func (t *Transport) StartStreams() {
	t.streamsOnce.Do(func() {
		t.wg.Add(1)
		go t.loopStreams()
	})
}

// SetGeneration sets this node's generation (its run), before Start.
func (t *Transport) SetGeneration(gen uint64) { t.gen.Store(gen) }

func (t *Transport) loopPackets() {
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
				t.probeAcked(h, body)
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
func (t *Transport) sighted(h header, from netip.AddrPort, at time.Time) {
	if !from.IsValid() || h.name == t.self || len(h.name) > maxNameLen {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	gen, ok := t.freshLocked(h)
	if !ok {
		return
	}
	if at.IsZero() {
		at = time.Now()
	}
	id := t.hints[h.name].ID
	if id == (crypto.NodeID{}) {
		id = t.sightings[h.name].id
	}
	t.sightings[h.name] = Sighting{Addr: from, At: at, id: id, gen: gen, seq: h.seq}
}

// freshLocked reports whether a packet is newer than every packet of its
// sender believed so far, and its sender's generation.
func (t *Transport) freshLocked(h header) (uint64, bool) {
	hint := t.hints[h.name]
	gen := h.gen
	if h.ver < hdrV2 {
		if hint.ReplayProof {
			// Sent to a node of an older version, or replayed.
			return 0, false
		}
		gen = hint.Gen
	} else if gen < hint.Gen {
		// A packet of an earlier run.
		return 0, false
	}
	cur, ok := t.sightings[h.name]
	var none crypto.NodeID
	if !ok || cur.id != none && hint.ID != none && cur.id != hint.ID {
		// A new sender, or a name taken over by a new identity.
		return gen, true
	}
	if gen < cur.gen || gen == cur.gen && h.seq <= cur.seq {
		return 0, false
	}
	return gen, true
}

// Sightings returns where each member's packets last came from.
func (t *Transport) Sightings() map[string]Sighting {
	t.mu.Lock()
	defer t.mu.Unlock()
	return maps.Clone(t.sightings)
}

// Refused counts packets dropped for a bad header.
func (t *Transport) Refused() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.refused
}

// Forget drops a member's sighting (it was forgotten).
func (t *Transport) Forget(name string) {
	t.mu.Lock()
	delete(t.sightings, name)
	t.mu.Unlock()
}

// route is where packets for the member name go: where its packets come
// from, else where it says members see it, else addr (the address it
// advertises); and the header version it reads (0: none).
func (t *Transport) route(name, addr string) (string, byte) {
	if name == "" {
		return addr, 0
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	h := t.hints[name]
	header := h.version()
	if s, ok := t.sightings[name]; ok && time.Since(s.At) < sightingTTL {
		return s.Addr.String(), header
	}
	if h.Public.IsValid() {
		return h.Public.String(), header
	}
	return addr, header
}

// FinalAdvertiseAddr implements memberlist.Transport.
func (t *Transport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	return t.inner.FinalAdvertiseAddr(ip, port)
}

// WriteTo implements memberlist.Transport: no name, no header (the
// receiver may be a node not known yet, of a version without it).
func (t *Transport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.inner.WriteTo(b, addr)
}

// WriteToAddress implements memberlist.NodeAwareTransport.
func (t *Transport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	dst, ver := t.route(a.Name, a.Addr)
	if ver != 0 {
		b, _ = t.sealV(ver, kindGossip, b)
	}
	return t.inner.WriteToAddress(b, memberlist.Address{Addr: dst, Name: a.Name})
}

// PacketCh implements memberlist.Transport.
func (t *Transport) PacketCh() <-chan *memberlist.Packet { return t.packets }

// DialTimeout implements memberlist.Transport.
func (t *Transport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.inner.DialTimeout(addr, timeout)
}

// DialAddressTimeout implements memberlist.NodeAwareTransport.
func (t *Transport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	if !t.Dialable(a.Name) {
		return nil, fmt.Errorf("node %s is %w", a.Name, ErrBehindNAT)
	}
	return t.inner.DialAddressTimeout(a, timeout)
}

// Dialable reports whether a member can be dialled: it is not behind
// NAT, or this node sees it at the address it advertises (a host of the
// same private network).
func (t *Transport) Dialable(name string) bool {
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
func (t *Transport) StreamCh() <-chan net.Conn { return t.streams }

// streamSortWait bounds the wait for a stream's first byte: memberlist's
// TCP timeout (its dialer writes first).
const streamSortWait = 10 * time.Second

// loopStreams hands each incoming stream to sortStream.
func (t *Transport) loopStreams() {
	defer t.wg.Done()
	in := t.inner.StreamCh()
	for {
		select {
		case <-t.done:
			return
		case c := <-in:
			t.mu.Lock()
			if t.sorting == nil {
				// Shut down.
				t.mu.Unlock()
				c.Close()
				return
			}
			t.sorting[c] = struct{}{}
			t.mu.Unlock()
			t.wg.Add(1)
			go t.sortStream(c)
		}
	}
}

// sortStream reads a stream's first byte: a dialback request is served
// here, everything else goes to memberlist, first byte and all.
func (t *Transport) sortStream(c net.Conn) {
	defer t.wg.Done()
	_ = c.SetReadDeadline(time.Now().Add(streamSortWait))
	var b [1]byte
	_, err := io.ReadFull(c, b[:])
	t.mu.Lock()
	delete(t.sorting, c)
	t.mu.Unlock()
	if err != nil {
		c.Close()
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	if b[0] == hdrMagic {
		t.serveDialback(c)
		return
	}
	select {
	case t.streams <- &peekedConn{Conn: c, first: b[0], peeked: true}:
	case <-t.done:
		c.Close()
	}
}

// peekedConn gives back a stream's first byte, read to sort it.
type peekedConn struct {
	net.Conn
	first  byte
	peeked bool
}

func (c *peekedConn) Read(p []byte) (int, error) {
	if c.peeked && len(p) > 0 {
		p[0], c.peeked = c.first, false
		return 1, nil
	}
	return c.Conn.Read(p)
}

// Shutdown implements memberlist.Transport.
func (t *Transport) Shutdown() error {
	t.stop.Do(func() {
		close(t.done)
		if t.reflector != nil {
			t.reflector.Close()
		}
		t.mu.Lock()
		for c := range t.sorting {
			c.Close()
		}
		t.sorting = nil
		t.mu.Unlock()
	})
	t.wg.Wait()
	// The inner transport's UDP listener may be blocked handing over a
	// packet that loopPackets will no longer take, and the inner
	// Shutdown waits for that listener: drain until it has stopped.
	// So may its TCP listener, handing over a stream: close those.
	in, streams, stopped := t.inner.PacketCh(), t.inner.StreamCh(), make(chan struct{})
	go func() {
		for {
			select {
			case <-in:
			case c := <-streams:
				c.Close()
			case <-stopped:
				return
			}
		}
	}()
	err := t.inner.Shutdown()
	close(stopped)
	return err
}

// AskReflection asks the relay (a member, at to) to say where this
// node's gossip port's packets come from; the answer arrives as a sealed
// packet (Reflections), and is believed only as the answer to this
// request: a relay of this version echoes the request's random nonce; an
// older one (header version 1) must answer with a packet it sealed after
// the request.
func (t *Transport) AskReflection(relay string, to netip.AddrPort) {
	var nonce [nonceLen]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return
	}
	ver := t.versionFor(relay)
	now := time.Now()
	t.mu.Lock()
	for n, a := range t.asked {
		if now.Sub(a.at) > reflectWait {
			delete(t.asked, n)
		}
	}
	for n, a := range t.askedOld {
		if now.Sub(a.at) > reflectWait {
			delete(t.askedOld, n)
		}
	}
	if ver >= hdrV2 {
		t.asked[nonce] = reflectAsk{relay: relay, at: now}
	} else {
		t.askedOld[relay] = reflectAsk{relay: relay, at: now, minSeq: t.sightings[relay].seq}
	}
	t.mu.Unlock()
	// An older relay reads no body; the nonce does no harm there.
	b, _ := t.sealV(ver, kindReflect, nonce[:])
	_, _ = t.inner.WriteTo(b, to.String())
}

// loopReflect answers members' reflection requests with the source of
// their request: a sealed reply, so only members ask and only members
// believe the answer; to a request of header version 2, with its nonce.
func (t *Transport) loopReflect() {
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
		h, body, sealed, err := t.open(buf[:n])
		if err != nil || !sealed || h.kind != kindReflect {
			continue
		}
		from = unmapPort(from)
		b, _ := from.MarshalBinary()
		if h.ver >= hdrV2 {
			if len(body) < nonceLen {
				continue
			}
			b = append(append([]byte(nil), body[:nonceLen]...), b...)
		}
		pkt, _ := t.sealV(h.ver, kindReflectd, b)
		_, _ = t.reflector.WriteToUDPAddrPort(pkt, from)
	}
}

// reflected takes a relay's answer to a reflection request, if it answers
// a request this node made and has not had answered yet.
func (t *Transport) reflected(h header, body []byte, at time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	if h.ver >= hdrV2 {
		if len(body) < nonceLen {
			return
		}
		nonce := [nonceLen]byte(body[:nonceLen])
		ask, ok := t.asked[nonce]
		if !ok || ask.relay != h.name || now.Sub(ask.at) > reflectWait {
			return
		}
		delete(t.asked, nonce)
		body = body[nonceLen:]
	} else {
		ask, ok := t.askedOld[h.name]
		if !ok || t.hints[h.name].ReplayProof || h.seq <= ask.minSeq || now.Sub(ask.at) > reflectWait {
			return
		}
		delete(t.askedOld, h.name)
	}
	var a netip.AddrPort
	if err := a.UnmarshalBinary(body); err != nil || !a.IsValid() {
		return
	}
	if at.IsZero() {
		at = now
	}
	t.reflections[h.name] = Sighting{Addr: a, At: at}
}

// Reflections returns the latest reflection from each relay: where it
// saw this node's gossip port's packets come from.
func (t *Transport) Reflections() map[string]Sighting {
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

// ErrTooBig: the local interface's MTU is below the probe.
var ErrTooBig = errors.New("larger than the outgoing interface's MTU")

// Probe sends copies path MTU probes of size bytes (whole IP packets)
// with DF set to the member name at to, and reports whether any was
// acknowledged within timeout; ErrTooBig if the local interface cannot
// send it.
func (t *Transport) Probe(ctx context.Context, name string, to netip.AddrPort, size, copies int, timeout time.Duration) (bool, error) {
	if t.df == nil {
		return false, errors.New("the gossip transport cannot send path MTU probes")
	}
	ver := t.versionFor(name)
	pad := size - ipOverhead(to.Addr()) - t.headLen(ver)
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
	for range max(copies, 1) {
		pkt, seq := t.sealV(ver, kindProbe, body)
		t.mu.Lock()
		t.waiting[seq] = acked
		t.mu.Unlock()
		seqs = append(seqs, seq)
		if err := t.df.WriteDF(pkt, to); err != nil {
			if isMsgSize(err) {
				return false, ErrTooBig
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

// Fits reports whether a probe of size bytes leaves the local interface
// (it is sent, once; an answer is not waited for).
func (t *Transport) Fits(name string, to netip.AddrPort, size int) bool {
	if t.df == nil {
		return false
	}
	ver := t.versionFor(name)
	pad := size - ipOverhead(to.Addr()) - t.headLen(ver)
	if pad < 2 {
		return true
	}
	body := make([]byte, pad)
	binary.BigEndian.PutUint16(body, uint16(size))
	pkt, _ := t.sealV(ver, kindProbe, body)
	return !isMsgSize(t.df.WriteDF(pkt, to))
}

// ackProbe answers a probe with a small packet from the gossip socket,
// which never sets DF: the answer must not depend on the path back.
func (t *Transport) ackProbe(h header, body []byte, from netip.AddrPort) {
	if len(body) < 2 || !from.IsValid() {
		return
	}
	ack := make([]byte, 10)
	binary.BigEndian.PutUint64(ack, h.seq)
	copy(ack[8:], body[:2])
	// In the probe's header version: the prober reads it.
	pkt, _ := t.sealV(h.ver, kindProbeAck, ack)
	_, _ = t.inner.WriteTo(pkt, from.String())
}

func (t *Transport) probeAcked(_ header, body []byte) {
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
