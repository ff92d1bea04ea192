package gossipnet

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
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
// (Probe; mesh/reachability runs the search), so that probes use the gossip
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

	streams streamQueue

	// mu guards the fields after it.
	mu        sync.Mutex
	sightings map[string]Sighting
	hints     map[string]RouteHint
	// refused counts packets dropped for a bad tag.
	refused uint64
	// sorting holds the streams whose first byte is awaited, closed on
	// shutdown.
	sorting map[net.Conn]struct{}
	probes  probeState
}

// streamQueue holds the streams for memberlist: every stream but a
// dialback request (dialback.go).
type streamQueue struct {
	ch   chan net.Conn
	once sync.Once
	// dialbacks caps the dialback requests served at once.
	dialbacks chan struct{}
}

// probeState is what this member asked others over the header and
// awaits, or learned from their answers. Transport.mu guards it.
type probeState struct {
	// waiting: path MTU probes not acknowledged yet, by sequence.
	waiting     map[uint64]chan struct{}
	reflections map[string]Sighting
	// asked: reflection requests not answered yet, by nonce (relays
	// reading version 2), or by relay (older relays, which echo no
	// nonce).
	asked    map[[nonceLen]byte]reflectAsk
	askedOld map[string]reflectAsk
}

var _ memberlist.NodeAwareTransport = (*Transport)(nil)

// ErrBehindNAT refuses a stream to a member that cannot be dialled. Its
// text marks the memberlist log lines of such a failure, which are
// expected and logged at debug level.
var ErrBehindNAT = errors.New("behind NAT: it connects out itself")

// New wraps inner for the member named self. If inner can send with DF
// set (DFWriter), the transport sends path MTU probes. It starts
// nothing; Start does.
func New(inner memberlist.NodeAwareTransport, self string) *Transport {
	t := &Transport{inner: inner, sealer: newSealer(self), packets: make(chan *memberlist.Packet), done: make(chan struct{}),
		streams:   streamQueue{ch: make(chan net.Conn), dialbacks: make(chan struct{}, dialbacksAtOnce)},
		sightings: map[string]Sighting{}, hints: map[string]RouteHint{}, sorting: map[net.Conn]struct{}{},
		probes: probeState{waiting: map[uint64]chan struct{}{}, reflections: map[string]Sighting{},
			asked: map[[nonceLen]byte]reflectAsk{}, askedOld: map[string]reflectAsk{}}}
	if df, ok := inner.(DFWriter); ok {
		t.df = df
	}
	return t
}

// SetKeyring sets the cluster keys the header is sealed and checked
// with; the first seals. No keys (--insecure) means tags are neither
// made nor checked.
func (t *Transport) SetKeyring(ring [][]byte) { t.setKeyring(ring) }

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
	t.streams.once.Do(func() {
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

// Refused counts packets dropped for a bad header.
func (t *Transport) Refused() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.refused
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

// StreamCh implements memberlist.Transport.
func (t *Transport) StreamCh() <-chan net.Conn { return t.streams.ch }

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
	case t.streams.ch <- &peekedConn{Conn: c, first: b[0], peeked: true}:
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
