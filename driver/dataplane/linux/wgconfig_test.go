package linux

import (
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/dataplane"
)

func pub(b byte) crypto.PublicKey {
	var k crypto.PublicKey
	k[0] = b
	return k
}

// render prints a wgctrl config like `wg set` arguments, for comparison.
func render(c wgtypes.Config) string {
	var b strings.Builder
	if c.PrivateKey != nil {
		b.WriteString("private-key; ")
	}
	if c.ListenPort != nil {
		b.WriteString("listen-port " + strconv.Itoa(*c.ListenPort) + "; ")
	}
	for _, p := range c.Peers {
		b.WriteString("peer " + strconv.Itoa(int(p.PublicKey[0])))
		if p.Remove {
			b.WriteString(" remove; ")
			continue
		}
		if p.Endpoint != nil {
			b.WriteString(" endpoint " + p.Endpoint.String())
		}
		if p.PersistentKeepaliveInterval != nil {
			b.WriteString(" keepalive " + p.PersistentKeepaliveInterval.String())
		}
		var ips []string
		for _, a := range p.AllowedIPs {
			ips = append(ips, a.String())
		}
		switch {
		case p.ReplaceAllowedIPs:
			b.WriteString(" allowed-ips " + strings.Join(ips, ","))
		case len(ips) > 0:
			// Added to those the peer has.
			b.WriteString(" allowed-ips +" + strings.Join(ips, ",+"))
		}
		b.WriteString("; ")
	}
	return strings.TrimSpace(b.String())
}

func TestWGDiff(t *testing.T) {
	key, _ := crypto.GeneratePrivateKey()
	other, _ := crypto.GeneratePrivateKey()
	ep := func(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
	pfx := netip.MustParsePrefix
	net1 := func(peers ...dataplane.Peer) *dataplane.Network {
		return &dataplane.Network{ListenPort: 51820, Peers: peers}
	}
	p1 := dataplane.Peer{PublicKey: pub(1), Endpoint: ep("192.0.2.1:51820"), AllowedIPs: []netip.Prefix{pfx("10.60.1.0/24")}, Keepalive: 25 * time.Second}
	p2 := dataplane.Peer{PublicKey: pub(2), Endpoint: ep("192.0.2.2:51820"), AllowedIPs: []netip.Prefix{pfx("10.60.3.0/24"), pfx("10.60.2.0/24")}}

	tests := []struct {
		name string
		have wgState
		want *dataplane.Network
		key  crypto.PrivateKey
		out  string
	}{
		{
			name: "new device gets everything",
			have: wgState{},
			want: net1(p1, p2),
			key:  key,
			out: "private-key; listen-port 51820; " +
				"peer 1 endpoint 192.0.2.1:51820 keepalive 25s allowed-ips 10.60.1.0/24; " +
				"peer 2 endpoint 192.0.2.2:51820 keepalive 0s allowed-ips 10.60.2.0/24,10.60.3.0/24;",
		},
		{
			name: "unchanged means no call",
			have: desiredWG(key, net1(p1, p2)),
			want: net1(p2, p1),
			key:  key,
			out:  "",
		},
		{
			name: "a new block only touches its peer, not its endpoint",
			have: desiredWG(key, net1(p1, p2)),
			want: net1(p1, dataplane.Peer{PublicKey: pub(2), Endpoint: p2.Endpoint, AllowedIPs: []netip.Prefix{pfx("10.60.2.0/24")}}),
			key:  key,
			out:  "peer 2 allowed-ips 10.60.2.0/24;",
		},
		{
			name: "a gone peer is removed",
			have: desiredWG(key, net1(p1, p2)),
			want: net1(p2),
			key:  key,
			out:  "peer 1 remove;",
		},
		{
			name: "a new generation starts the peer over",
			have: desiredWG(key, net1(p1, p2)),
			want: net1(dataplane.Peer{PublicKey: pub(1), Endpoint: p1.Endpoint, AllowedIPs: p1.AllowedIPs, Keepalive: p1.Keepalive, Generation: 1}, p2),
			key:  key,
			out:  "peer 1 remove; peer 1 endpoint 192.0.2.1:51820 keepalive 25s allowed-ips 10.60.1.0/24;",
		},
		{
			name: "a rotated key and a moved endpoint",
			have: desiredWG(key, net1(p1)),
			want: net1(dataplane.Peer{PublicKey: pub(1), Endpoint: ep("198.51.100.9:51820"), AllowedIPs: p1.AllowedIPs, Keepalive: p1.Keepalive}),
			key:  other,
			out:  "private-key; peer 1 endpoint 198.51.100.9:51820;",
		},
		{
			// Replacing them would leave a moment without a peer for
			// them, in which the kernel drops what goes there.
			name: "a keepalive turned on leaves the allowed IPs alone",
			have: desiredWG(key, net1(dataplane.Peer{PublicKey: pub(1), Endpoint: p1.Endpoint, AllowedIPs: p1.AllowedIPs}, p2)),
			want: net1(p1, p2),
			key:  key,
			out:  "peer 1 keepalive 25s;",
		},
		{
			name: "a block added is added, not all replaced",
			have: desiredWG(key, net1(p1, dataplane.Peer{PublicKey: pub(2), Endpoint: p2.Endpoint, AllowedIPs: []netip.Prefix{pfx("10.60.3.0/24")}})),
			want: net1(p1, p2),
			key:  key,
			out:  "peer 2 allowed-ips +10.60.2.0/24;",
		},
		{
			name: "a block moved replaces the peer's",
			have: desiredWG(key, net1(p1, dataplane.Peer{PublicKey: pub(2), Endpoint: p2.Endpoint, AllowedIPs: []netip.Prefix{pfx("10.60.2.0/24"), pfx("10.60.4.0/24")}})),
			want: net1(p1, p2),
			key:  key,
			out:  "peer 2 allowed-ips 10.60.2.0/24,10.60.3.0/24;",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, changed := wgDiff(tt.have, desiredWG(tt.key, tt.want), tt.key)
			if got := render(cfg); got != tt.out || changed != (tt.out != "") {
				t.Fatalf("diff:\n got %q (changed %v)\nwant %q", got, changed, tt.out)
			}
		})
	}
}

// TestSameRoute: a route as the kernel lists it matches the route that
// was asked for, whose type was left to the kernel's default.
func TestSameRoute(t *testing.T) {
	dst := ipNet(netip.MustParsePrefix("10.60.1.5/32"))
	asked := netlink.Route{LinkIndex: 3, Dst: dst, Scope: netlink.SCOPE_LINK, Protocol: routeProtocol}
	listed := netlink.Route{LinkIndex: 3, Dst: dst, Scope: netlink.SCOPE_LINK, Protocol: routeProtocol, Type: unix.RTN_UNICAST, Table: unix.RT_TABLE_MAIN}
	if !sameRoute(listed, asked) {
		t.Error("a unicast route as listed differs from the same route as asked for")
	}
	other := listed
	other.LinkIndex = 4
	if sameRoute(other, asked) {
		t.Error("routes through other links are the same")
	}
	unreachable := netlink.Route{Dst: dst, Type: unix.RTN_UNREACHABLE, Protocol: routeProtocol}
	if sameRoute(listed, unreachable) || !sameRoute(unreachable, unreachable) {
		t.Error("an unreachable route is compared wrongly")
	}
	mtu := asked
	mtu.MTU = 1280
	if sameRoute(listed, mtu) {
		t.Error("routes of different MTUs are the same")
	}
}

// TestWGAdopt: a restarted agent that finds a kernel device running its
// configuration changes nothing, whatever generation its peers are at;
// a peer it does not want goes.
func TestWGAdopt(t *testing.T) {
	key, _ := crypto.GeneratePrivateKey()
	n := &dataplane.Network{ListenPort: 51820, Peers: []dataplane.Peer{
		{PublicKey: pub(1), Endpoint: netip.MustParseAddrPort("192.0.2.1:51820"), Keepalive: 25 * time.Second, Generation: 3,
			AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.60.3.0/24"), netip.MustParsePrefix("10.60.1.0/24")}},
	}}
	// As the kernel reports it: IPv4 in 16 bytes, in its own order.
	dev := &wgtypes.Device{
		PublicKey:  wgtypes.Key(key.Public()),
		ListenPort: 51820,
		Peers: []wgtypes.Peer{{
			PublicKey:                   wgtypes.Key(pub(1)),
			Endpoint:                    &net.UDPAddr{IP: net.ParseIP("192.0.2.1"), Port: 51820},
			PersistentKeepaliveInterval: 25 * time.Second,
			AllowedIPs: []net.IPNet{
				{IP: net.ParseIP("10.60.3.0"), Mask: net.CIDRMask(24, 32)},
				{IP: net.ParseIP("10.60.1.0").To4(), Mask: net.CIDRMask(24, 32)},
			},
		}},
	}
	want := desiredWG(key, n)
	if cfg, changed := wgDiff(adoptWG(dev, nil, want), want, key); changed {
		t.Errorf("adopting a device that runs the configuration: %q", render(cfg))
	}
	dev.Peers = append(dev.Peers, wgtypes.Peer{PublicKey: wgtypes.Key(pub(2))})
	if cfg, _ := wgDiff(adoptWG(dev, nil, want), want, key); render(cfg) != "peer 2 remove;" {
		t.Errorf("adopting a device with a peer too many: %q", render(cfg))
	}
}
