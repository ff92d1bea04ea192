package relay

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/crypto/blake2s"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/wgmesh/wgmesh/crypto"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var loopback = netip.MustParseAddr("127.0.0.1")

func freeUDPPort(t *testing.T) uint16 {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: loopback.AsSlice()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}

func listen(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: loopback.AsSlice()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func pubKey(t *testing.T) crypto.PublicKey {
	k, err := crypto.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k.Public()
}

// handshake makes a handshake message of the given type whose mac1 is
// keyed for to, the way WireGuard makes it; the rest is random.
func handshake(typ byte, to crypto.PublicKey) []byte {
	size := sizeInitiation
	if typ == msgResponse {
		size = sizeResponse
	}
	msg := make([]byte, size)
	_, _ = rand.Read(msg)
	msg[0], msg[1], msg[2], msg[3] = typ, 0, 0, 0
	key := mac1Key(to)
	h, _ := blake2s.New128(key[:])
	off := size - 2*macSize
	h.Write(msg[:off])
	copy(msg[off:], h.Sum(nil))
	return msg
}

func expect(t *testing.T, c *net.UDPConn, want []byte) {
	t.Helper()
	buf := make([]byte, 2048)
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, _, err := c.ReadFromUDPAddrPort(buf)
	if err != nil || !bytes.Equal(buf[:n], want) {
		t.Fatalf("got %d bytes %v, want %d bytes", n, err, len(want))
	}
}

func expectNothing(t *testing.T, c *net.UDPConn) {
	t.Helper()
	buf := make([]byte, 2048)
	_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, from, err := c.ReadFromUDPAddrPort(buf); err == nil {
		t.Fatalf("got %d bytes from %s, want nothing", n, from)
	}
}

func TestForwardsOnlyBetweenTheLearnedEnds(t *testing.T) {
	ka, kb := pubKey(t), pubKey(t)
	s := New(Config{BindAddr: loopback})
	defer s.Close()
	port := freeUDPPort(t)
	if err := s.Set([]Session{{Port: port, A: ka, B: kb}}); err != nil {
		t.Fatal(err)
	}
	relay := net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback, port))
	a, b, stranger := listen(t), listen(t), listen(t)

	// A's initiation to B teaches the relay where A is; B is unknown yet.
	initA := handshake(msgInitiation, kb)
	_, _ = a.WriteToUDP(initA, relay)
	expectNothing(t, b)
	// B's initiation to A reaches A; so does B's response.
	initB := handshake(msgInitiation, ka)
	_, _ = b.WriteToUDP(initB, relay)
	expect(t, a, initB)
	resp := handshake(msgResponse, ka)
	_, _ = b.WriteToUDP(resp, relay)
	expect(t, a, resp)
	// Data goes between the learned ends, both ways.
	data := append([]byte{4, 0, 0, 0}, bytes.Repeat([]byte{7}, 1200)...)
	_, _ = a.WriteToUDP(data, relay)
	expect(t, b, data)
	_, _ = b.WriteToUDP(data[:100], relay)
	expect(t, a, data[:100])

	// A stranger gets nothing through, not with data, not with a
	// handshake for an unknown key, not with a replay of A's initiation.
	_, _ = stranger.WriteToUDP(data, relay)
	_, _ = stranger.WriteToUDP(handshake(msgInitiation, pubKey(t)), relay)
	_, _ = stranger.WriteToUDP(initA, relay)
	expectNothing(t, b)
	expectNothing(t, a)
	// ... and B's traffic still goes to A, not to the stranger.
	_, _ = b.WriteToUDP(data[:50], relay)
	expect(t, a, data[:50])
	expectNothing(t, stranger)

	st := s.Stats()
	if len(st) != 1 || st[0].PacketsAB != 1 || st[0].PacketsBA != 4 || st[0].Dropped < 4 ||
		st[0].AddrA.Port() != uint16(a.LocalAddr().(*net.UDPAddr).Port) {
		t.Fatalf("stats %+v", st)
	}

	// Closing the session closes its port.
	if err := s.Set(nil); err != nil {
		t.Fatal(err)
	}
	c, err := net.ListenUDP("udp4", relay)
	if err != nil {
		t.Fatalf("port still bound: %v", err)
	}
	c.Close()
}

// TestSegmentedBurst: a burst sent as one segmented datagram (as
// wireguard-go sends with UDP GSO) arrives as the same datagrams.
func TestSegmentedBurst(t *testing.T) {
	ka, kb := pubKey(t), pubKey(t)
	s := New(Config{BindAddr: loopback})
	defer s.Close()
	port := freeUDPPort(t)
	if err := s.Set([]Session{{Port: port, A: ka, B: kb}}); err != nil {
		t.Fatal(err)
	}
	relay := net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback, port))
	a, b := listen(t), listen(t)
	_, _ = a.WriteToUDP(handshake(msgInitiation, kb), relay)
	resp := handshake(msgResponse, ka)
	_, _ = b.WriteToUDP(resp, relay)
	expect(t, a, resp)
	const n, size = 20, 1000
	burst := make([]byte, 0, n*size)
	for i := range n {
		pkt := bytes.Repeat([]byte{byte(i)}, size)
		copy(pkt, []byte{4, 0, 0, 0})
		burst = append(burst, pkt...)
	}
	if _, _, err := a.WriteMsgUDP(burst, gsoControl(make([]byte, 64), size), relay); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		want := bytes.Repeat([]byte{byte(i)}, size)
		copy(want, []byte{4, 0, 0, 0})
		expect(t, b, want)
	}
	if st := s.Stats(); st[0].PacketsAB != n {
		t.Fatalf("counted %d packets, want %d", st[0].PacketsAB, n)
	}
}

func TestRateLimit(t *testing.T) {
	ka, kb := pubKey(t), pubKey(t)
	s := New(Config{BindAddr: loopback, MaxRate: 4000})
	defer s.Close()
	port := freeUDPPort(t)
	if err := s.Set([]Session{{Port: port, A: ka, B: kb}}); err != nil {
		t.Fatal(err)
	}
	relay := net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback, port))
	a, b := listen(t), listen(t)
	_, _ = a.WriteToUDP(handshake(msgInitiation, kb), relay)
	resp := handshake(msgResponse, ka)
	_, _ = b.WriteToUDP(resp, relay)
	expect(t, a, resp)
	data := append([]byte{4, 0, 0, 0}, make([]byte, 996)...)
	for range 10 {
		_, _ = a.WriteToUDP(data, relay)
	}
	got := 0
	buf := make([]byte, 2048)
	for {
		_ = b.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if _, _, err := b.ReadFromUDPAddrPort(buf); err != nil {
			break
		}
		got++
	}
	if got < 3 || got > 4 {
		t.Fatalf("%d of 10 packets of 1000 bytes passed a limit of 4000 bytes a second", got)
	}
}

// wgDevice is wireguard-go on a channel TUN with a socket on loopback.
type wgDevice struct {
	dev *device.Device
	tun *tuntest.ChannelTUN
	key crypto.PrivateKey
	ip  netip.Addr
}

func newWG(t *testing.T, ip string) *wgDevice {
	t.Helper()
	k, err := crypto.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	ct := tuntest.NewChannelTUN()
	logger := device.NewLogger(device.LogLevelError, "")
	d := &wgDevice{dev: device.NewDevice(ct.TUN(), conn.NewDefaultBind(), logger), tun: ct, key: k, ip: netip.MustParseAddr(ip)}
	t.Cleanup(d.dev.Close)
	b := k.Bytes()
	if err := d.dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=0\n", hex.EncodeToString(b[:]))); err != nil {
		t.Fatal(err)
	}
	if err := d.dev.Up(); err != nil {
		t.Fatal(err)
	}
	return d
}

func (d *wgDevice) peer(t *testing.T, o *wgDevice, endpoint netip.AddrPort) {
	t.Helper()
	pub := o.key.Public()
	cfg := fmt.Sprintf("public_key=%s\nendpoint=%s\nallowed_ip=%s/32\npersistent_keepalive_interval=1\n", hex.EncodeToString(pub[:]), endpoint, o.ip)
	if err := d.dev.IpcSet(cfg); err != nil {
		t.Fatal(err)
	}
}

// TestRealWireGuardThroughRelay: two wireguard-go devices that know each
// other only as the relay's address complete handshakes and exchange
// traffic through it, with their own keys, which the relay never has.
func TestRealWireGuardThroughRelay(t *testing.T) {
	a, b := newWG(t, "10.99.0.1"), newWG(t, "10.99.0.2")
	s := New(Config{BindAddr: loopback})
	defer s.Close()
	port := freeUDPPort(t)
	if err := s.Set([]Session{{Port: port, A: a.key.Public(), B: b.key.Public()}}); err != nil {
		t.Fatal(err)
	}
	relay := netip.AddrPortFrom(loopback, port)
	a.peer(t, b, relay)
	b.peer(t, a, relay)
	for i, dir := range [][2]*wgDevice{{a, b}, {b, a}, {a, b}} {
		from, to := dir[0], dir[1]
		ping := tuntest.Ping(to.ip, from.ip)
		deadline := time.After(10 * time.Second)
	send:
		for {
			select {
			case from.tun.Outbound <- ping:
			case <-deadline:
				t.Fatalf("ping %d: not sent", i)
			}
			select {
			case got := <-to.tun.Inbound:
				if !bytes.Equal(got, ping) {
					t.Fatalf("ping %d: received another packet", i)
				}
				break send
			case <-time.After(500 * time.Millisecond):
			case <-deadline:
				t.Fatalf("ping %d: nothing arrived through the relay", i)
			}
		}
	}
	st := s.Stats()
	if len(st) != 1 || st[0].PacketsAB == 0 || st[0].PacketsBA == 0 {
		t.Fatalf("stats %+v", st)
	}
}

// bindEnd is one end of a relayed pair as the driver runs it: WireGuard's
// socket, and another socket on the same address that sends binds.
type bindEnd struct {
	wg, binder *net.UDPConn
	pub        crypto.PublicKey
	key        [32]byte // its bind key with the relay
}

func newBindEnd(t *testing.T, ip string, relayKey crypto.PrivateKey) *bindEnd {
	t.Helper()
	priv, err := crypto.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	e := &bindEnd{pub: priv.Public()}
	for _, c := range []**net.UDPConn{&e.wg, &e.binder} {
		*c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(ip)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { (*c).Close() })
	}
	// The end derives the key from its private key and the relay's
	// public key; the relay from the other two: they must agree.
	if e.key, err = BindKey(priv, relayKey.Public()); err != nil {
		t.Fatal(err)
	}
	if k, err := BindKey(relayKey, e.pub); err != nil || k != e.key {
		t.Fatalf("the relay derives another bind key (%v)", err)
	}
	return e
}

func (e *bindEnd) bind(t *testing.T, relay *net.UDPAddr, at time.Time) []byte {
	t.Helper()
	msg := AppendBind(nil, e.key, uint16(relay.Port), at)
	if _, err := e.binder.WriteToUDP(msg, relay); err != nil {
		t.Fatal(err)
	}
	return msg
}

// TestForgedHandshakeMovesNobody: anyone who knows an end's public key
// (every member, every former member) can make a handshake message the
// relay takes for the other end's. With bind keys, the relay learns an
// end's address only from a handshake that comes from the address of the
// end's latest bind, so a forged one moves nobody and reflects nothing.
func TestForgedHandshakeMovesNobody(t *testing.T) {
	relayKey, err := crypto.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	a, b := newBindEnd(t, "127.0.0.2", relayKey), newBindEnd(t, "127.0.0.4", relayKey)
	stranger := listenOn(t, "127.0.0.3")
	s := New(Config{BindAddr: loopback})
	defer s.Close()
	port := freeUDPPort(t)
	if err := s.Set([]Session{{Port: port, A: a.pub, B: b.pub, KeyA: a.key, KeyB: b.key}}); err != nil {
		t.Fatal(err)
	}
	relay := net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback, port))

	// Before binding, an end's handshakes teach the relay nothing.
	_, _ = a.wg.WriteToUDP(handshake(msgInitiation, b.pub), relay)
	_, _ = b.wg.WriteToUDP(handshake(msgInitiation, a.pub), relay)
	expectNothing(t, a.wg)
	now := time.Now()
	a.bind(t, relay, now)
	b.bind(t, relay, now)
	time.Sleep(50 * time.Millisecond)
	initA := handshake(msgInitiation, b.pub)
	_, _ = a.wg.WriteToUDP(initA, relay)
	initB := handshake(msgInitiation, a.pub)
	_, _ = b.wg.WriteToUDP(initB, relay)
	expect(t, a.wg, initB)
	data := append([]byte{4, 0, 0, 0}, bytes.Repeat([]byte{7}, 200)...)
	_, _ = a.wg.WriteToUDP(data, relay)
	expect(t, b.wg, data)

	// A stranger forges a fresh initiation "from A" (mac1 keyed with B's
	// public key): A stays where it is.
	_, _ = stranger.WriteToUDP(handshake(msgInitiation, b.pub), relay)
	time.Sleep(50 * time.Millisecond)
	_, _ = b.wg.WriteToUDP(data[:60], relay)
	expect(t, a.wg, data[:60])
	expectNothing(t, stranger)

	// Nor does a bind of A's replayed from the stranger's address, or a
	// bind made with another key, or one for another port, or a stale one.
	_, _ = stranger.WriteToUDP(a.bind(t, relay, now.Add(time.Millisecond)), relay)
	wrong := *a
	wrong.key[0] ^= 1
	_, _ = stranger.WriteToUDP(AppendBind(nil, wrong.key, port, time.Now()), relay)
	_, _ = stranger.WriteToUDP(AppendBind(nil, a.key, port+1, time.Now()), relay)
	_, _ = stranger.WriteToUDP(AppendBind(nil, a.key, port, time.Now().Add(-time.Hour)), relay)
	time.Sleep(50 * time.Millisecond)
	_, _ = stranger.WriteToUDP(handshake(msgInitiation, b.pub), relay)
	time.Sleep(50 * time.Millisecond)
	_, _ = b.wg.WriteToUDP(data[:70], relay)
	expect(t, a.wg, data[:70])
	expectNothing(t, stranger)

	// A moves (a new NAT mapping, another address): its bind from there,
	// then its handshake, move it; the old address gets nothing more.
	moved := newBindEnd(t, "127.0.0.5", relayKey)
	moved.key, moved.pub = a.key, a.pub
	moved.bind(t, relay, time.Now())
	time.Sleep(50 * time.Millisecond)
	_, _ = moved.wg.WriteToUDP(handshake(msgInitiation, b.pub), relay)
	time.Sleep(50 * time.Millisecond)
	_, _ = b.wg.WriteToUDP(data[:80], relay)
	expect(t, moved.wg, data[:80])
	expectNothing(t, a.wg)
}

// TestUnboundEndsLearnFromHandshakes: an end without a bind key (an old
// agent, which sends no binds) is learned from its handshakes as before.
func TestUnboundEndsLearnFromHandshakes(t *testing.T) {
	relayKey, err := crypto.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	a := newBindEnd(t, "127.0.0.2", relayKey)
	old := listenOn(t, "127.0.0.4")
	kOld := pubKey(t)
	s := New(Config{BindAddr: loopback})
	defer s.Close()
	port := freeUDPPort(t)
	if err := s.Set([]Session{{Port: port, A: a.pub, B: kOld, KeyA: a.key}}); err != nil {
		t.Fatal(err)
	}
	relay := net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopback, port))
	a.bind(t, relay, time.Now())
	time.Sleep(50 * time.Millisecond)
	_, _ = a.wg.WriteToUDP(handshake(msgInitiation, kOld), relay)
	initB := handshake(msgInitiation, a.pub)
	_, _ = old.WriteToUDP(initB, relay)
	expect(t, a.wg, initB)
}

func listenOn(t *testing.T, ip string) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(ip)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
