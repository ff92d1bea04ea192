package gossipnet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/wgmesh/wgmesh/test/poll"
)

// pipeTransport is a NodeAwareTransport that records what is written and
// lets the test feed packets in.
type pipeTransport struct {
	memberlist.NodeAwareTransport
	in      chan *memberlist.Packet
	written []memberlist.Address
	last    []byte
}

func newPipe() *pipeTransport { return &pipeTransport{in: make(chan *memberlist.Packet, 16)} }

func (p *pipeTransport) PacketCh() <-chan *memberlist.Packet { return p.in }
func (p *pipeTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	p.written, p.last = append(p.written, a), b
	return time.Now(), nil
}
func (p *pipeTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	p.written, p.last = append(p.written, memberlist.Address{Addr: addr}), b
	return time.Now(), nil
}
func (p *pipeTransport) Shutdown() error { return nil }

// StreamCh: no streams.
func (p *pipeTransport) StreamCh() <-chan net.Conn { return nil }

func keys(names ...string) [][]byte {
	var out [][]byte
	for _, n := range names {
		k := make([]byte, 32)
		copy(k, n)
		out = append(out, k)
	}
	return out
}

func recv(t *testing.T, g *Transport) *memberlist.Packet {
	t.Helper()
	select {
	case p := <-g.PacketCh():
		return p
	case <-time.After(2 * time.Second):
		t.Fatal("no packet delivered")
		return nil
	}
}

func TestHeaderAuthenticatesSenderAndRoutes(t *testing.T) {
	alice := New(newPipe(), "alice")
	alice.setKeyring(keys("k1"))
	bobPipe := newPipe()
	bob := New(bobPipe, "bob")
	bob.setKeyring(keys("k1", "k0")) // a rotation: bob also knows the old key
	bob.Start()
	defer bob.Shutdown()

	natted := &net.UDPAddr{IP: net.IPv4(203, 0, 113, 9), Port: 40001}
	bobPipe.in <- &memberlist.Packet{Buf: alice.seal(kindGossip, []byte("hello")), From: natted, Timestamp: time.Now()}
	if p := recv(t, bob); string(p.Buf) != "hello" {
		t.Fatalf("delivered %q, want the body without header", p.Buf)
	}
	s := bob.Sightings()["alice"]
	if s.Addr != netip.MustParseAddrPort("203.0.113.9:40001") {
		t.Fatalf("sighting %+v", s)
	}
	// Packets for alice go where she was seen, not where she says she is;
	// with a header only if she reads it.
	bob.SetHints(map[string]RouteHint{"alice": {Header: true}})
	if _, err := bob.WriteToAddress([]byte("x"), memberlist.Address{Addr: "10.0.0.5:7946", Name: "alice"}); err != nil {
		t.Fatal(err)
	}
	if got := bobPipe.written[len(bobPipe.written)-1].Addr; got != "203.0.113.9:40001" {
		t.Fatalf("sent to %s", got)
	}
	if h, body, sealed, err := alice.open(bobPipe.last); err != nil || !sealed || h.name != "bob" || string(body) != "x" {
		t.Fatalf("alice cannot read bob's packet: %+v %q %v %v", h, body, sealed, err)
	}
	// An old node gets memberlist's packet as it is.
	bob.SetHints(map[string]RouteHint{})
	_, _ = bob.WriteToAddress([]byte("x"), memberlist.Address{Addr: "10.0.0.5:7946", Name: "alice"})
	if string(bobPipe.last) != "x" {
		t.Fatalf("header sent to a node that does not read it: %q", bobPipe.last)
	}

	// A replayed packet from elsewhere moves nothing, and is still
	// delivered (memberlist drops duplicates itself).
	old := alice.seal(kindGossip, []byte("one"))
	fresh := alice.seal(kindGossip, []byte("two"))
	bobPipe.in <- &memberlist.Packet{Buf: fresh, From: natted, Timestamp: time.Now()}
	recv(t, bob)
	bobPipe.in <- &memberlist.Packet{Buf: old, From: &net.UDPAddr{IP: net.IPv4(198, 51, 100, 66), Port: 1}, Timestamp: time.Now()}
	recv(t, bob)
	if s := bob.Sightings()["alice"]; s.Addr != netip.MustParseAddrPort("203.0.113.9:40001") {
		t.Fatalf("a replay moved alice to %s", s.Addr)
	}

	// Without the cluster key: refused, not delivered, not learned.
	mallory := New(newPipe(), "alice")
	mallory.setKeyring(keys("k9"))
	bobPipe.in <- &memberlist.Packet{Buf: mallory.seal(kindGossip, []byte("evil")), From: &net.UDPAddr{IP: net.IPv4(198, 51, 100, 66), Port: 2}, Timestamp: time.Now()}
	bobPipe.in <- &memberlist.Packet{Buf: []byte("plain"), From: natted, Timestamp: time.Now()}
	if p := recv(t, bob); string(p.Buf) != "plain" {
		t.Fatalf("forged packet delivered: %q", p.Buf)
	}
	if s := bob.Sightings()["alice"]; s.Addr.Addr() != netip.MustParseAddr("203.0.113.9") {
		t.Fatalf("a forged packet moved alice to %s", s.Addr)
	}
	bob.mu.Lock()
	refused := bob.refused
	bob.mu.Unlock()
	if refused != 1 {
		t.Fatalf("refused %d packets, want 1", refused)
	}
}

func TestDialBehindNATFailsFast(t *testing.T) {
	g := New(newPipe(), "bob")
	g.SetHints(map[string]RouteHint{"carol": {BehindNAT: true, Advertised: netip.MustParseAddrPort("10.0.0.7:7946")}})
	if _, err := g.DialAddressTimeout(memberlist.Address{Addr: "10.0.0.7:7946", Name: "carol"}, time.Minute); !errors.Is(err, ErrBehindNAT) {
		t.Fatalf("dialling a member behind NAT: %v", err)
	}
	// Seen at its own address (a host of the same private network): it
	// can be dialled.
	g.sighted(header{name: "carol", seq: 1}, netip.MustParseAddrPort("10.0.0.7:7946"), time.Now())
	if !g.Dialable("carol") {
		t.Fatal("a member seen at its own address is not dialable")
	}
}

// TestProbesOverSockets runs path MTU probes and reflections between two
// transports on loopback sockets.
func TestProbesOverSockets(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	mk := func(name string) (*Transport, *NetTransport) {
		nt, err := NewNetTransport("127.0.0.1", 0, nil, nil, log)
		if err != nil {
			t.Fatal(err)
		}
		g := New(nt, name)
		g.setKeyring(keys("k"))
		return g, nt
	}
	a, an := mk("a")
	b, bn := mk("b")
	var err error
	if b.reflector, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
		t.Fatal(err)
	}
	for _, x := range []struct {
		g *Transport
		n *NetTransport
	}{{a, an}, {b, bn}} {
		x.n.Start()
		x.g.Start()
		// memberlist is not running: drain what it would read.
		go func(g *Transport) {
			for {
				select {
				case <-g.PacketCh():
				case <-g.done:
					return
				}
			}
		}(x.g)
	}
	defer func() {
		_ = a.Shutdown()
		_ = b.Shutdown()
	}()
	to := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(bn.Port()))
	ctx := context.Background()
	if ok, err := a.Probe(ctx, "b", to, 1400, 2, time.Second); err != nil || !ok {
		t.Fatalf("probe of 1400 bytes: %v %v", ok, err)
	}
	// Loopback's MTU is 65536: a probe above it is refused locally, at once.
	if ok, err := a.Probe(ctx, "b", to, 70000, 2, time.Second); ok || !errors.Is(err, ErrTooBig) && err == nil {
		t.Fatalf("probe above the interface MTU: %v %v", ok, err)
	}
	// b now knows where a's probes come from.
	if s := b.Sightings()["a"]; s.Addr.Port() != uint16(an.Port()) {
		t.Fatalf("b saw a at %s, a's port is %d", s.Addr, an.Port())
	}
	// Reflection: b answers from its relay port where a's packets come from.
	a.AskReflection("b", netip.MustParseAddrPort(b.reflector.LocalAddr().String()))
	var r Sighting
	poll.Eventually(t, 2*time.Second, "b's reflection", func() error {
		var ok bool
		if r, ok = a.Reflections()["b"]; !ok {
			return errors.New("none yet")
		}
		return nil
	})
	if r.Addr.Port() != uint16(an.Port()) {
		t.Fatalf("reflected %s, a's port is %d", r.Addr, an.Port())
	}
}

// TestReflectionIsNoSighting: a relay's reflection comes from its relay
// port; packets for the relay must still go to its gossip port.
func TestReflectionIsNoSighting(t *testing.T) {
	relay := New(newPipe(), "relay")
	relay.setKeyring(keys("k"))
	pipe := newPipe()
	node := New(pipe, "node")
	node.setKeyring(keys("k"))
	node.Start()
	defer node.Shutdown()
	gossipPort := &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 7946}
	pipe.in <- &memberlist.Packet{Buf: relay.seal(kindGossip, []byte("g")), From: gossipPort, Timestamp: time.Now()}
	recv(t, node)
	// The node asks; the relay answers its request.
	node.SetHints(map[string]RouteHint{"relay": {Header: true, ReplayProof: true}})
	node.AskReflection("relay", netip.MustParseAddrPort("192.0.2.1:51900"))
	h, nonce, _, err := relay.open(pipe.last)
	if err != nil || h.kind != kindReflect {
		t.Fatalf("request %+v %v", h, err)
	}
	seen, _ := netip.MustParseAddrPort("198.51.100.9:4000").MarshalBinary()
	pipe.in <- &memberlist.Packet{Buf: relay.seal(kindReflectd, append(nonce, seen...)), From: &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 51900}, Timestamp: time.Now()}
	pipe.in <- &memberlist.Packet{Buf: []byte("sync"), From: gossipPort, Timestamp: time.Now()}
	recv(t, node)
	if s := node.Sightings()["relay"]; s.Addr.Port() != 7946 {
		t.Fatalf("relay sighted at %s", s.Addr)
	}
	if r := node.Reflections()["relay"]; r.Addr != netip.MustParseAddrPort("198.51.100.9:4000") {
		t.Fatalf("reflection %+v", r)
	}
}

// TestShutdownWithPacketsPending: memberlist's UDP listener blocks
// handing a packet to a reader, and its Shutdown waits for the listener.
// The gossip transport stopped reading first and then waited for it: an
// agent whose memberlist received packets while it stopped hung forever.
func TestShutdownWithPacketsPending(t *testing.T) {
	inner, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{"127.0.0.1"}, BindPort: 0})
	if err != nil {
		t.Fatal(err)
	}
	g := New(inner, "a")
	g.Start()
	c, err := net.Dial("udp4", fmt.Sprintf("127.0.0.1:%d", inner.GetAutoBindPort()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Nobody reads g.PacketCh(): loopPackets holds one packet, the
	// listener the next.
	for range 20 {
		_, _ = c.Write([]byte("not a memberlist packet, but a packet"))
	}
	time.Sleep(200 * time.Millisecond)
	done := make(chan error, 1)
	go func() { done <- g.Shutdown() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown hangs while the inner transport holds a packet")
	}
}
