package mesh

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

func recv(t *testing.T, g *gossipTransport) *memberlist.Packet {
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
	alice := newGossipTransport(newPipe(), "alice")
	alice.setKeyring(keys("k1"))
	bobPipe := newPipe()
	bob := newGossipTransport(bobPipe, "bob")
	bob.setKeyring(keys("k1", "k0")) // a rotation: bob also knows the old key
	bob.start()
	defer bob.Shutdown()

	natted := &net.UDPAddr{IP: net.IPv4(203, 0, 113, 9), Port: 40001}
	bobPipe.in <- &memberlist.Packet{Buf: alice.seal(kindGossip, []byte("hello")), From: natted, Timestamp: time.Now()}
	if p := recv(t, bob); string(p.Buf) != "hello" {
		t.Fatalf("delivered %q, want the body without header", p.Buf)
	}
	s := bob.sightingsCopy()["alice"]
	if s.Addr != netip.MustParseAddrPort("203.0.113.9:40001") {
		t.Fatalf("sighting %+v", s)
	}
	// Packets for alice go where she was seen, not where she says she is;
	// with a header only if she reads it.
	bob.setHints(map[string]routeHint{"alice": {Header: true}})
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
	bob.setHints(map[string]routeHint{})
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
	if s := bob.sightingsCopy()["alice"]; s.Addr != netip.MustParseAddrPort("203.0.113.9:40001") {
		t.Fatalf("a replay moved alice to %s", s.Addr)
	}

	// Without the cluster key: refused, not delivered, not learned.
	mallory := newGossipTransport(newPipe(), "alice")
	mallory.setKeyring(keys("k9"))
	bobPipe.in <- &memberlist.Packet{Buf: mallory.seal(kindGossip, []byte("evil")), From: &net.UDPAddr{IP: net.IPv4(198, 51, 100, 66), Port: 2}, Timestamp: time.Now()}
	bobPipe.in <- &memberlist.Packet{Buf: []byte("plain"), From: natted, Timestamp: time.Now()}
	if p := recv(t, bob); string(p.Buf) != "plain" {
		t.Fatalf("forged packet delivered: %q", p.Buf)
	}
	if s := bob.sightingsCopy()["alice"]; s.Addr.Addr() != netip.MustParseAddr("203.0.113.9") {
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
	g := newGossipTransport(newPipe(), "bob")
	g.setHints(map[string]routeHint{"carol": {BehindNAT: true, Advertised: netip.MustParseAddrPort("10.0.0.7:7946")}})
	if _, err := g.DialAddressTimeout(memberlist.Address{Addr: "10.0.0.7:7946", Name: "carol"}, time.Minute); !errors.Is(err, errBehindNAT) {
		t.Fatalf("dialling a member behind NAT: %v", err)
	}
	// Seen at its own address (a host of the same private network): it
	// can be dialled.
	g.sighted(header{name: "carol", seq: 1}, netip.MustParseAddrPort("10.0.0.7:7946"), time.Now())
	if !g.dialable("carol") {
		t.Fatal("a member seen at its own address is not dialable")
	}
}

func TestSearchPMTU(t *testing.T) {
	path := func(mtu, iface int) probeFunc {
		return func(_ context.Context, size int) (bool, error) {
			if size > iface {
				return false, errTooBig
			}
			return size <= mtu, nil
		}
	}

	for _, c := range []struct {
		name                    string
		mtu, iface, first, want int
		wantLocal               int
	}{
		{"full path", 1400, 1400, 0, 1400, 1400},
		{"smaller path, black hole", 1280, 1400, 0, 1280, 1400},
		{"odd size", 1333, 1500, 0, 1333, 1500},
		{"from the last value, unchanged", 1280, 1400, 1280, 1280, 1400},
		{"from the last value, shrunk", 1200, 1400, 1280, 1200, 1400},
		{"from the last value, grown", 1400, 1400, 1280, 1400, 1400},
		{"nothing passes", 0, 1400, 0, 0, 1400},
		{"jumbo", 9000, 9000, 0, 9000, 9000},
	} {
		t.Run(c.name, func(t *testing.T) {
			probes := 0
			p := path(c.mtu, c.iface)
			counted := func(ctx context.Context, size int) (bool, error) {
				probes++
				return p(ctx, size)
			}
			fits := func(size int) bool { return size <= c.iface }
			got, local, err := searchPMTU(context.Background(), counted, fits, 576, pmtuMaxSize, c.first)
			if err != nil || got != c.want || local != c.wantLocal {
				t.Fatalf("got %d (local %d) %v, want %d (local %d)", got, local, err, c.want, c.wantLocal)
			}
			if probes > 12 {
				t.Errorf("%d probes", probes)
			}
			if c.mtu == c.iface && c.first == 0 && probes != 1 {
				t.Errorf("a full path took %d probes, want 1", probes)
			}
		})
	}
}

func TestAssessNAT(t *testing.T) {
	ap := netip.MustParseAddrPort
	local := ap("10.0.0.5:7946")
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	wgLocal := map[netip.Prefix]netip.AddrPort{subnet: ap("10.0.0.5:51820")}
	for _, c := range []struct {
		name   string
		gossip []netip.AddrPort
		wg     []netip.AddrPort
		want   natState
	}{
		{"no observer", nil, nil, natState{}},
		{"reachable", []netip.AddrPort{local, local}, []netip.AddrPort{ap("10.0.0.5:51820")}, natState{Kind: NATNone}},
		{"port preserved", []netip.AddrPort{ap("203.0.113.7:7946"), ap("203.0.113.7:7946")}, []netip.AddrPort{ap("203.0.113.7:51820")},
			natState{Kind: NATConsistent, Seen: ap("203.0.113.7:7946"), WG: map[netip.Prefix]netip.AddrPort{subnet: ap("203.0.113.7:51820")}}},
		{"consistent mapping to another port", []netip.AddrPort{ap("203.0.113.7:1044"), ap("203.0.113.7:1044")}, nil,
			natState{Kind: NATConsistent, Seen: ap("203.0.113.7:1044")}},
		{"a port per destination", []netip.AddrPort{ap("203.0.113.7:31000"), ap("203.0.113.7:14121"), ap("203.0.113.7:31000")}, []netip.AddrPort{ap("203.0.113.7:5555")},
			natState{Kind: NATSymmetric, Seen: ap("203.0.113.7:31000"), WG: map[netip.Prefix]netip.AddrPort{subnet: ap("203.0.113.7:5555")}}},
		{"seen directly inside, mapped outside", []netip.AddrPort{local, ap("203.0.113.7:7946")}, []netip.AddrPort{ap("10.0.0.5:51820"), ap("203.0.113.7:51820")},
			natState{Kind: NATConsistent, Seen: ap("203.0.113.7:7946"), WG: map[netip.Prefix]netip.AddrPort{subnet: ap("203.0.113.7:51820")}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			wg := map[netip.Prefix][]netip.AddrPort{}
			if c.wg != nil {
				wg[subnet] = c.wg
			}
			if got := assessNAT(local, c.gossip, wgLocal, wg); !got.equal(c.want) {
				t.Fatalf("got %+v, want %+v", got, c.want)
			}
		})
	}
}

// TestProbesOverSockets runs path MTU probes and reflections between two
// transports on loopback sockets.
func TestProbesOverSockets(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	mk := func(name string) (*gossipTransport, *netTransport) {
		nt, err := newNetTransport("127.0.0.1", 0, log)
		if err != nil {
			t.Fatal(err)
		}
		g := newGossipTransport(nt, name)
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
		g *gossipTransport
		n *netTransport
	}{{a, an}, {b, bn}} {
		x.n.start()
		x.g.start()
		// memberlist is not running: drain what it would read.
		go func(g *gossipTransport) {
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
	if ok, err := a.probe(ctx, "b", to, 1400, 2, time.Second); err != nil || !ok {
		t.Fatalf("probe of 1400 bytes: %v %v", ok, err)
	}
	// Loopback's MTU is 65536: a probe above it is refused locally, at once.
	if ok, err := a.probe(ctx, "b", to, 70000, 2, time.Second); ok || !errors.Is(err, errTooBig) && err == nil {
		t.Fatalf("probe above the interface MTU: %v %v", ok, err)
	}
	// b now knows where a's probes come from.
	if s := b.sightingsCopy()["a"]; s.Addr.Port() != uint16(an.Port()) {
		t.Fatalf("b saw a at %s, a's port is %d", s.Addr, an.Port())
	}
	// Reflection: b answers from its relay port where a's packets come from.
	a.askReflection("b", netip.MustParseAddrPort(b.reflector.LocalAddr().String()))
	deadline := time.Now().Add(2 * time.Second)
	for {
		if r, ok := a.reflectionsCopy()["b"]; ok {
			if r.Addr.Port() != uint16(an.Port()) {
				t.Fatalf("reflected %s, a's port is %d", r.Addr, an.Port())
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no reflection")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestReflectionIsNoSighting: a relay's reflection comes from its relay
// port; packets for the relay must still go to its gossip port.
func TestReflectionIsNoSighting(t *testing.T) {
	relay := newGossipTransport(newPipe(), "relay")
	relay.setKeyring(keys("k"))
	pipe := newPipe()
	node := newGossipTransport(pipe, "node")
	node.setKeyring(keys("k"))
	node.start()
	defer node.Shutdown()
	gossipPort := &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 7946}
	pipe.in <- &memberlist.Packet{Buf: relay.seal(kindGossip, []byte("g")), From: gossipPort, Timestamp: time.Now()}
	recv(t, node)
	// The node asks; the relay answers its request.
	node.setHints(map[string]routeHint{"relay": {Header: true, ReplayProof: true}})
	node.askReflection("relay", netip.MustParseAddrPort("192.0.2.1:51900"))
	h, nonce, _, err := relay.open(pipe.last)
	if err != nil || h.kind != kindReflect {
		t.Fatalf("request %+v %v", h, err)
	}
	seen, _ := netip.MustParseAddrPort("198.51.100.9:4000").MarshalBinary()
	pipe.in <- &memberlist.Packet{Buf: relay.seal(kindReflectd, append(nonce, seen...)), From: &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 51900}, Timestamp: time.Now()}
	pipe.in <- &memberlist.Packet{Buf: []byte("sync"), From: gossipPort, Timestamp: time.Now()}
	recv(t, node)
	if s := node.sightingsCopy()["relay"]; s.Addr.Port() != 7946 {
		t.Fatalf("relay sighted at %s", s.Addr)
	}
	if r := node.reflectionsCopy()["relay"]; r.Addr != netip.MustParseAddrPort("198.51.100.9:4000") {
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
	g := newGossipTransport(inner, "a")
	g.start()
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
