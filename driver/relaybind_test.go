package driver

import (
	"bytes"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/crypto/blake2s"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/relay"
	"github.com/wgmesh/wgmesh/mesh"
)

// wgHandshake makes a WireGuard handshake initiation whose mac1 is keyed
// for to, as WireGuard makes it; the rest does not matter to a relay.
func wgHandshake(to crypto.PublicKey) []byte {
	msg := make([]byte, 148)
	msg[0] = 1
	h, _ := blake2s.New256(nil)
	h.Write([]byte("mac1----"))
	h.Write(to[:])
	mac, _ := blake2s.New128(h.Sum(nil))
	mac.Write(msg[:116])
	copy(msg[116:], mac.Sum(nil))
	return msg
}

// TestRelayBinds: a host whose peer is relayed sends the relay binds, so
// that the relay takes its WireGuard handshakes; to a relay that predates
// binds it sends none.
func TestRelayBinds(t *testing.T) {
	keys := map[string]crypto.PrivateKey{}
	for _, n := range []string{"x", "y", "r"} {
		k, err := crypto.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		keys[n] = k
	}
	portC, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(portC.LocalAddr().(*net.UDPAddr).Port)
	portC.Close()
	kx, _ := relay.BindKey(keys["r"], keys["x"].Public())
	ky, _ := relay.BindKey(keys["r"], keys["y"].Public())
	srv := relay.New(relay.Config{BindAddr: netip.MustParseAddr("127.0.0.1")})
	defer srv.Close()
	if err := srv.Set([]relay.Session{{Port: port, A: keys["x"].Public(), B: keys["y"].Public(), KeyA: kx, KeyB: ky}}); err != nil {
		t.Fatal(err)
	}
	relayEP := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	v := &mesh.View{Self: "x", Members: map[string]mesh.Member{
		"r": {NodeInfo: mesh.NodeInfo{Name: "r", PublicKey: keys["r"].Public(), Features: mesh.FeatureRelayBind}},
	}}
	ps := newPaths(slog.New(slog.DiscardHandler), 8*time.Second, time.Minute, 25*time.Second)
	p := ps.get(pathKey{subnet, "y"})
	p.relayed, p.via, p.relayEP = true, "r", relayEP

	// Both hosts' binders bind; their WireGuard sockets (others, on the
	// same address) then get through.
	bx, by := newRelayBinder(slog.New(slog.DiscardHandler)), newRelayBinder(slog.New(slog.DiscardHandler))
	defer bx.close()
	defer by.close()
	now := time.Now()
	bx.sendLocked(now, v, keys["x"], ps)
	vy := *v
	vy.Self = "y"
	by.sendLocked(now, &vy, keys["y"], ps)
	time.Sleep(50 * time.Millisecond)
	wx, wy := listenUDP(t), listenUDP(t)
	relayUDP := net.UDPAddrFromAddrPort(relayEP)
	_, _ = wx.WriteToUDP(wgHandshake(keys["y"].Public()), relayUDP)
	initY := wgHandshake(keys["x"].Public())
	_, _ = wy.WriteToUDP(initY, relayUDP)
	buf := make([]byte, 256)
	_ = wx.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, _, err := wx.ReadFromUDP(buf); err != nil || !bytes.Equal(buf[:n], initY) {
		t.Fatalf("y's handshake did not reach x through the relay: %v", err)
	}

	// Not again before BindEvery; again after.
	if n := bx.sendLocked(now.Add(time.Second), v, keys["x"], ps); n != 0 {
		t.Errorf("%d binds a second later", n)
	}
	if n := bx.sendLocked(now.Add(relay.BindEvery), v, keys["x"], ps); n != 1 {
		t.Errorf("%d binds after BindEvery, want 1", n)
	}
	// An old relay gets none.
	old := v.Members["r"]
	old.Features = 0
	v.Members["r"] = old
	if n := bx.sendLocked(now.Add(time.Hour), v, keys["x"], ps); n != 0 {
		t.Errorf("%d binds to a relay that predates them", n)
	}
}

func listenUDP(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
