package gossipnet

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/wgmesh/wgmesh/test/poll"
)

// TestReplayAfterSilenceMovesNothing: a captured packet replayed after
// its sender has been silent for a while must not move the sender's
// sighting. The check used to lapse after 10 s of silence.
func TestReplayAfterSilenceMovesNothing(t *testing.T) {
	alice := New(newPipe(), "alice")
	alice.setKeyring(keys("k1"))
	pipe := newPipe()
	bob := New(pipe, "bob")
	bob.setKeyring(keys("k1"))
	bob.Start()
	defer bob.Shutdown()

	home := &net.UDPAddr{IP: net.IPv4(203, 0, 113, 9), Port: 40001}
	captured := alice.seal(kindGossip, []byte("one"))
	now := time.Now()
	pipe.in <- &memberlist.Packet{Buf: alice.seal(kindGossip, []byte("two")), From: home, Timestamp: now}
	recv(t, bob)
	for _, later := range []time.Duration{11 * time.Second, 5 * time.Minute} {
		evil := &net.UDPAddr{IP: net.IPv4(198, 51, 100, 66), Port: 6666}
		pipe.in <- &memberlist.Packet{Buf: captured, From: evil, Timestamp: now.Add(later)}
		recv(t, bob)
		if s := bob.Sightings()["alice"]; s.Addr != netip.MustParseAddrPort("203.0.113.9:40001") {
			t.Fatalf("a packet replayed %s later moved alice to %s", later, s.Addr)
		}
	}
}

// teeTransport copies every packet its inner transport receives.
type teeTransport struct {
	memberlist.NodeAwareTransport
	out            chan *memberlist.Packet
	stop, finished chan struct{}
	mu             sync.Mutex
	seen           []*memberlist.Packet
	once           sync.Once
}

func newTee(inner memberlist.NodeAwareTransport) *teeTransport {
	return &teeTransport{NodeAwareTransport: inner, out: make(chan *memberlist.Packet), stop: make(chan struct{}), finished: make(chan struct{})}
}

func (t *teeTransport) PacketCh() <-chan *memberlist.Packet {
	t.once.Do(func() {
		in := t.NodeAwareTransport.PacketCh()
		go func() {
			for {
				select {
				case p := <-in:
					t.mu.Lock()
					t.seen = append(t.seen, &memberlist.Packet{Buf: append([]byte(nil), p.Buf...), From: p.From, Timestamp: p.Timestamp})
					t.mu.Unlock()
					select {
					case t.out <- p:
					case <-t.stop:
					}
				case <-t.finished:
					return
				}
			}
		}()
	})
	return t.out
}

// Shutdown stops the inner transport, reading its packets meanwhile.
func (t *teeTransport) Shutdown() error {
	close(t.stop)
	err := t.NodeAwareTransport.Shutdown()
	close(t.finished)
	return err
}

func (t *teeTransport) captured() []*memberlist.Packet {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]*memberlist.Packet(nil), t.seen...)
}

// TestReflectionBoundToRequest: a relay's answer to one node's request
// is believed by that node once, and by nobody else.
func TestReflectionBoundToRequest(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	nt, err := NewNetTransport("127.0.0.1", 0, nil, nil, log)
	if err != nil {
		t.Fatal(err)
	}
	tee := newTee(nt)
	asker := New(tee, "asker")
	asker.setKeyring(keys("k"))
	rt, err := NewNetTransport("127.0.0.1", 0, nil, nil, log)
	if err != nil {
		t.Fatal(err)
	}
	relay := New(rt, "relay")
	relay.setKeyring(keys("k"))
	if relay.reflector, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
		t.Fatal(err)
	}
	nt.Start()
	rt.Start()
	asker.Start()
	relay.Start()
	defer asker.Shutdown()
	defer relay.Shutdown()
	relayAt := netip.MustParseAddrPort(relay.reflector.LocalAddr().String())
	hints := map[string]RouteHint{"relay": {Header: true, ReplayProof: true}}
	asker.SetHints(hints)
	asker.AskReflection("relay", relayAt)
	var first Sighting
	poll.Eventually(t, 3*time.Second, "the relay's reflection", func() error {
		var ok bool
		if first, ok = asker.Reflections()["relay"]; !ok {
			return errors.New("none yet")
		}
		return nil
	})
	answers := tee.captured()
	if len(answers) == 0 {
		t.Fatal("the answer was not captured")
	}
	answer := answers[len(answers)-1]

	// Another node that never asked believes nothing of it.
	pipe := newPipe()
	other := New(pipe, "other")
	other.setKeyring(keys("k"))
	other.SetHints(hints)
	other.Start()
	defer other.Shutdown()
	pipe.in <- &memberlist.Packet{Buf: answer.Buf, From: answer.From, Timestamp: time.Now()}
	pipe.in <- &memberlist.Packet{Buf: []byte("sync"), From: answer.From, Timestamp: time.Now()}
	recv(t, other)
	if r, ok := other.Reflections()["relay"]; ok {
		t.Fatalf("a node that never asked believed a reflection: %+v", r)
	}

	// The asker, given the same answer again, believes it no more: a
	// replay cannot keep an old reflection alive (or bring a stale one
	// back).
	askerAt := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(nt.Port()))
	if _, err := relay.reflector.WriteToUDPAddrPort(answer.Buf, askerAt); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if r := asker.Reflections()["relay"]; r.At != first.At {
		t.Fatalf("a replayed answer was believed again: %v, first at %v", r.At, first.At)
	}
}

// TestRestartedSenderBelieved: a sender's new run is believed even if its
// clock went back (its generation is higher), and packets of its earlier
// run are not, also by a receiver that has no mark for it (restarted)
// but knows the generation it publishes.
func TestRestartedSenderBelieved(t *testing.T) {
	first := New(newPipe(), "alice")
	first.setKeyring(keys("k"))
	first.SetGeneration(1)
	captured := first.seal(kindGossip, []byte("old run"))
	second := New(newPipe(), "alice")
	second.setKeyring(keys("k"))
	second.SetGeneration(2)
	second.seq.Store(1000) // its clock went back

	pipe := newPipe()
	bob := New(pipe, "bob")
	bob.setKeyring(keys("k"))
	bob.Start()
	defer bob.Shutdown()
	home := &net.UDPAddr{IP: net.IPv4(203, 0, 113, 9), Port: 40001}
	evil := &net.UDPAddr{IP: net.IPv4(198, 51, 100, 66), Port: 6666}
	now := time.Now()
	pipe.in <- &memberlist.Packet{Buf: first.seal(kindGossip, []byte("a")), From: evil, Timestamp: now}
	recv(t, bob)
	pipe.in <- &memberlist.Packet{Buf: second.seal(kindGossip, []byte("b")), From: home, Timestamp: now}
	recv(t, bob)
	if s := bob.Sightings()["alice"]; s.Addr.String() != home.String() {
		t.Fatalf("alice's new run, its clock back, not believed: sighted at %s", s.Addr)
	}
	pipe.in <- &memberlist.Packet{Buf: captured, From: evil, Timestamp: now.Add(time.Second)}
	recv(t, bob)
	if s := bob.Sightings()["alice"]; s.Addr.String() != home.String() {
		t.Fatalf("a packet of alice's earlier run moved her to %s", s.Addr)
	}

	// A receiver without a mark for alice, which knows she publishes
	// generation 2.
	pipe2 := newPipe()
	carol := New(pipe2, "carol")
	carol.setKeyring(keys("k"))
	carol.SetHints(map[string]RouteHint{"alice": {Header: true, ReplayProof: true, Gen: 2}})
	carol.Start()
	defer carol.Shutdown()
	pipe2.in <- &memberlist.Packet{Buf: captured, From: evil, Timestamp: now}
	recv(t, carol)
	if s, ok := carol.Sightings()["alice"]; ok {
		t.Fatalf("a packet of alice's earlier run sighted her at %s", s.Addr)
	}
}

// TestOldVersionInterop: a node of the previous version (header version
// 1 only) gets version 1, and its version 1 packets are believed with a
// strictly increasing sequence; version 1 packets of a node that reads
// version 2 (meant for old nodes) are delivered but move nobody.
func TestOldVersionInterop(t *testing.T) {
	old := New(newPipe(), "old")
	old.setKeyring(keys("k"))
	neu := New(newPipe(), "new")
	neu.setKeyring(keys("k"))
	neu.SetGeneration(3)
	pipe := newPipe()
	bob := New(pipe, "bob")
	bob.setKeyring(keys("k"))
	bob.SetGeneration(5)
	bob.SetHints(map[string]RouteHint{
		"old": {Header: true, Gen: 7},
		"new": {Header: true, ReplayProof: true, Gen: 3},
	})
	bob.Start()
	defer bob.Shutdown()

	// What bob sends the old node is what the old node reads: version 1,
	// name, sequence, tag.
	if _, err := bob.WriteToAddress([]byte("x"), memberlist.Address{Addr: "10.0.0.5:7946", Name: "old"}); err != nil {
		t.Fatal(err)
	}
	b := pipe.last
	if b[0] != hdrMagic || b[1] != 1 || int(b[3]) != 3 || len(b) != 4+3+8+tagLen+1 || string(b[len(b)-1:]) != "x" {
		t.Fatalf("sent to an old node: % x", b)
	}
	if _, err := bob.WriteToAddress([]byte("x"), memberlist.Address{Addr: "10.0.0.6:7946", Name: "new"}); err != nil {
		t.Fatal(err)
	}
	if pipe.last[1] != hdrV2 {
		t.Fatalf("sent to a new node in version %d", pipe.last[1])
	}

	home := &net.UDPAddr{IP: net.IPv4(203, 0, 113, 9), Port: 40001}
	evil := &net.UDPAddr{IP: net.IPv4(198, 51, 100, 66), Port: 6666}
	v1 := func(g *Transport, body string) []byte {
		b, _ := g.sealV(hdrV1, kindGossip, []byte(body))
		return b
	}
	captured := v1(old, "1")
	now := time.Now()
	pipe.in <- &memberlist.Packet{Buf: v1(old, "2"), From: home, Timestamp: now}
	if p := recv(t, bob); string(p.Buf) != "2" {
		t.Fatalf("delivered %q", p.Buf)
	}
	pipe.in <- &memberlist.Packet{Buf: captured, From: evil, Timestamp: now.Add(time.Hour)}
	recv(t, bob)
	if s := bob.Sightings()["old"]; s.Addr.String() != home.String() {
		t.Fatalf("old node sighted at %s", s.Addr)
	}
	pipe.in <- &memberlist.Packet{Buf: v1(neu, "3"), From: evil, Timestamp: now}
	if p := recv(t, bob); string(p.Buf) != "3" {
		t.Fatalf("delivered %q", p.Buf)
	}
	if s, ok := bob.Sightings()["new"]; ok {
		t.Fatalf("a version 1 packet of a node that reads version 2 sighted it at %s", s.Addr)
	}
}

// TestReflectionFromOldRelay: an old relay answers without a nonce; its
// answer is believed once, after a request to it, and not unasked.
func TestReflectionFromOldRelay(t *testing.T) {
	relay := New(newPipe(), "relay")
	relay.setKeyring(keys("k"))
	pipe := newPipe()
	node := New(pipe, "node")
	node.setKeyring(keys("k"))
	node.SetHints(map[string]RouteHint{"relay": {Header: true}})
	node.Start()
	defer node.Shutdown()
	from := &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 51900}
	seen, _ := netip.MustParseAddrPort("198.51.100.9:4000").MarshalBinary()
	answer := func() []byte {
		b, _ := relay.sealV(hdrV1, kindReflectd, seen)
		return b
	}
	deliver := func(b []byte) {
		pipe.in <- &memberlist.Packet{Buf: b, From: from, Timestamp: time.Now()}
		pipe.in <- &memberlist.Packet{Buf: []byte("sync"), From: from, Timestamp: time.Now()}
		recv(t, node)
	}
	unasked := answer()
	deliver(unasked)
	if r, ok := node.Reflections()["relay"]; ok {
		t.Fatalf("an unasked answer believed: %+v", r)
	}
	// The node hears the relay's gossip, then asks: an answer sealed
	// before that gossip (so before the request) is an old one.
	gossip, _ := relay.sealV(hdrV1, kindGossip, []byte("g"))
	pipe.in <- &memberlist.Packet{Buf: gossip, From: &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 7946}, Timestamp: time.Now()}
	recv(t, node)
	node.AskReflection("relay", netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), 51900))
	if pipe.last[1] != hdrV1 {
		t.Fatalf("asked an old relay in version %d", pipe.last[1])
	}
	deliver(unasked)
	if r, ok := node.Reflections()["relay"]; ok {
		t.Fatalf("an answer sealed before the request believed: %+v", r)
	}
	deliver(answer())
	first := node.Reflections()["relay"]
	if first.Addr.Port() != 4000 {
		t.Fatalf("the old relay's answer not believed: %+v", first)
	}
	deliver(answer())
	if r := node.Reflections()["relay"]; r.At != first.At {
		t.Fatal("a second answer to one request believed")
	}
}

// TestNewRelayAnswersOldAsker: a relay answers a version 1 request (an
// old node's) as the old version did: version 1, the address alone.
func TestNewRelayAnswersOldAsker(t *testing.T) {
	rt, err := NewNetTransport("127.0.0.1", 0, nil, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	relay := New(rt, "relay")
	relay.setKeyring(keys("k"))
	if relay.reflector, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
		t.Fatal(err)
	}
	rt.Start()
	relay.Start()
	defer relay.Shutdown()
	old := New(newPipe(), "old")
	old.setKeyring(keys("k"))
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req, _ := old.sealV(hdrV1, kindReflect, nil)
	if _, err := c.WriteToUDPAddrPort(req, netip.MustParseAddrPort(relay.reflector.LocalAddr().String())); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 2048)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	h, body, _, err := old.open(buf[:n])
	var a netip.AddrPort
	if err != nil || h.ver != hdrV1 || h.kind != kindReflectd || a.UnmarshalBinary(body) != nil || a.String() != c.LocalAddr().String() {
		t.Fatalf("answer %+v %v %q", h, err, body)
	}
}
