package dns

import (
	"context"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/wgmesh/wgmesh/driver/dns/hostaddr"
	"github.com/wgmesh/wgmesh/test/netnstest"
	"github.com/wgmesh/wgmesh/test/poll"
)

// TestLocalNets: which link and source make a query this host's.
func TestLocalNets(t *testing.T) {
	p := netip.MustParsePrefix
	a := netip.MustParseAddr
	links := []LinkAddrs{
		{Index: 1, Addrs: []netip.Prefix{p("127.0.0.1/8"), p("169.254.53.53/32")}},
		{Index: 2, Addrs: []netip.Prefix{p("192.168.1.10/24")}},  // the LAN
		{Index: 3, Addrs: []netip.Prefix{p("172.18.0.1/16")}},    // docker_gwbridge
		{Index: 4, Addrs: []netip.Prefix{p("172.30.5.1/24")}},    // a bridge of a network with a wider subnet
		{Index: 5, Addrs: []netip.Prefix{p("192.168.100.1/24")}}, // a macvlan shim or VPN: no bridge network's
	}
	n := newLocalNets(links, []netip.Prefix{p("172.18.0.0/16"), p("172.30.0.0/16"), p("172.17.0.0/16")})
	for _, c := range []struct {
		ifindex int
		src     string
		want    verdict
	}{
		{1, "127.0.0.1", local},
		{1, "192.168.1.10", local}, // the host, from its own LAN address
		{1, "192.168.1.77", local}, // only the host sends on loopback
		{3, "172.18.0.2", local},
		{4, "172.30.5.9", local},
		{4, "172.30.6.9", foreign}, // in Docker's subnet, but not the bridge's
		{3, "172.30.5.9", foreign}, // another bridge's container, on the wrong link
		{2, "192.168.1.77", foreign},
		{2, "172.18.0.2", foreign}, // a neighbour forging a container's address
		{5, "192.168.100.2", foreign},
		{9, "172.18.0.2", unknownLink}, // a link made since the look
	} {
		if got := n.udp(c.ifindex, a(c.src)); got != c.want {
			t.Errorf("UDP from %s on link %d: %v, want %v", c.src, c.ifindex, got, c.want)
		}
	}
	var none *localNets
	if none.udp(3, a("172.18.0.2")) != unknownLink || none.udp(loopbackIndex, a("10.0.0.1")) != local {
		t.Error("before the first look, only loopback is known")
	}
	for src, want := range map[string]bool{"127.0.0.5": true, "169.254.53.53": true, "192.168.1.10": true, "172.18.0.2": true,
		"172.30.5.9": true, "192.168.1.77": false, "172.30.6.9": false, "192.168.100.2": false} {
		if got := n.tcp(a(src)); got != want {
			t.Errorf("TCP from %s: %v, want %v", src, got, want)
		}
	}
	// Without Sources (no Docker that lists bridges): loopback only.
	var s *Sources
	if s.udp(loopbackIndex, a("127.0.0.1")) != local || s.udp(3, a("172.18.0.2")) != foreign || !s.tcp(a("127.0.0.1")) || s.tcp(a("172.18.0.2")) {
		t.Error("nil Sources must take loopback only")
	}
}

// TestServerDropsNeighbour: in a namespace standing in for a host, with
// the server's address on lo, a LAN neighbour that routes the address to
// the host gets nothing, over UDP or TCP, even when it forges a
// container's address; a container on a bridge network, including one
// made after the server started, and the host itself get answers.
func TestServerDropsNeighbour(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	const listen = "169.254.53.53:53"
	if err := hostaddr.Ensure(netip.MustParseAddrPort(listen).Addr()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = hostaddr.Remove() })
	// The neighbour: on the LAN 192.0.2.0/24, a route to the server's
	// address through the host, and a container's address on its lo to
	// forge with. The host's reverse path filter is off (it is loose on
	// many distributions, which lets such a packet in as well).
	nb := netnstest.NewNS(t, "nb")
	plug(t, "lanh", "192.0.2.1/24", nb, "192.0.2.2/24")
	if err := nb.NL.RouteAdd(&netlink.Route{Dst: netlink.NewIPNet(net.ParseIP("169.254.53.53")), Gw: net.ParseIP("192.0.2.1")}); err != nil {
		t.Fatal(err)
	}
	nbLo, _ := nb.NL.LinkByName("lo")
	forged, _ := netlink.ParseAddr("172.31.9.2/32")
	if err := nb.NL.AddrAdd(nbLo, forged); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"all", "lanh"} {
		if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+f+"/rp_filter", []byte("0"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A container on a bridge network 172.31.9.0/24 (Docker lists it
	// from the start).
	ctr := netnstest.NewNS(t, "ctr")
	plug(t, "brh", "172.31.9.1/24", ctr, "172.31.9.2/24")
	if err := ctr.NL.RouteAdd(&netlink.Route{Gw: net.ParseIP("172.31.9.1")}); err != nil {
		t.Fatal(err)
	}

	up := startUpstream(t)
	sources := NewSources(func(context.Context) ([]netip.Prefix, error) {
		return []netip.Prefix{netip.MustParsePrefix("172.31.9.0/24"), netip.MustParsePrefix("172.31.10.0/24")}, nil
	}, kernelLinks, nil)
	cfg := DefaultConfig()
	cfg.Listen, cfg.Upstreams, cfg.Clients, cfg.Names, cfg.Sources = netip.MustParseAddrPort(listen), []netip.AddrPort{up.addr}, fakeClients{}, newFakeNames(), sources
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { _ = sources.Run(ctx); done <- struct{}{} }()
	go func() { _ = s.Run(ctx); done <- struct{}{} }()
	t.Cleanup(func() { cancel(); <-done; <-done })

	query := func(ns *netnstest.NS, proto, from string) error {
		t.Helper()
		c := &dns.Client{Net: proto, Timeout: time.Second}
		if from != "" {
			c.Dialer = &net.Dialer{Timeout: time.Second, LocalAddr: &net.UDPAddr{IP: net.ParseIP(from)}}
			if proto == "tcp" {
				c.Dialer.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
			}
		}
		var conn *dns.Conn
		if err := inNS(ns, func() (err error) { conn, err = c.Dial(listen); return err }); err != nil {
			return err // a forged TCP handshake does not complete
		}
		defer conn.Close()
		m, _, err := c.ExchangeWithConn(new(dns.Msg).SetQuestion("outside.example.", dns.TypeA), conn)
		if err == nil && len(addrsOf(m)) != 1 {
			t.Fatalf("outside.example from %s over %s: %v", from, proto, m)
		}
		return err
	}
	// The host itself, once the server is up.
	poll.Eventually(t, 5*time.Second, "the server answering the host", func() error {
		return query(nil, "udp", "")
	})
	for _, proto := range []string{"udp", "tcp"} {
		if err := query(nil, proto, ""); err != nil {
			t.Errorf("the host over %s: %v", proto, err)
		}
		if err := query(ctr, proto, ""); err != nil {
			t.Errorf("a container over %s: %v", proto, err)
		}
		for _, from := range []string{"192.0.2.2", "172.31.9.2"} {
			if err := query(nb, proto, from); err == nil {
				t.Errorf("the neighbour, from %s over %s, got an answer", from, proto)
			}
		}
	}
	// A container of a network made after the server's last look: its
	// link is new, and the server looks again before it answers.
	ctr2 := netnstest.NewNS(t, "ctr2")
	plug(t, "brh2", "172.31.10.1/24", ctr2, "172.31.10.2/24")
	if err := ctr2.NL.RouteAdd(&netlink.Route{Gw: net.ParseIP("172.31.10.1")}); err != nil {
		t.Fatal(err)
	}
	if err := query(ctr2, "udp", ""); err != nil {
		t.Errorf("a container on a new bridge: %v", err)
	}
	// The neighbour's two datagrams and its real TCP connection; its
	// forged handshake never completes (the container's kernel resets
	// it).
	if st := s.Stats(); st.Foreign != 3 {
		t.Errorf("dropped %d queries from outside, want the neighbour's 3: %+v", st.Foreign, st)
	}
}

// plug links the test's namespace (hostName, hostAddr) to ns (eth0,
// nsAddr) with a veth pair.
func plug(t *testing.T, hostName, hostAddr string, ns *netnstest.NS, nsAddr string) {
	t.Helper()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostName}, PeerName: "eth0", PeerNamespace: netlink.NsFd(ns.Handle)}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netlink.LinkDel(veth) })
	ha, _ := netlink.ParseAddr(hostAddr)
	if err := netlink.AddrAdd(veth, ha); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(veth); err != nil {
		t.Fatal(err)
	}
	peer, err := ns.NL.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	na, _ := netlink.ParseAddr(nsAddr)
	if err := ns.NL.AddrAdd(peer, na); err != nil {
		t.Fatal(err)
	}
	if err := ns.NL.LinkSetUp(peer); err != nil {
		t.Fatal(err)
	}
	// What is sent before both ends are up is lost.
	poll.Eventually(t, 5*time.Second, "link "+hostName+" up at both ends", poll.Bool(func() bool {
		h, err1 := netlink.LinkByName(hostName)
		p, err2 := ns.NL.LinkByName("eth0")
		return err1 == nil && err2 == nil && h.Attrs().OperState == netlink.OperUp && p.Attrs().OperState == netlink.OperUp
	}))
}

// inNS runs fn on a thread in ns (nil: the test's own namespace); the
// sockets it opens stay there.
func inNS(ns *netnstest.NS, fn func() error) error {
	if ns == nil {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(ns.Handle); err != nil {
			errc <- err
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- err // the thread dies with the goroutine, still locked
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// kernelLinks lists the links of the test's namespace, as the agent does.
func kernelLinks() ([]LinkAddrs, error) {
	ls, err := hostaddr.List()
	out := make([]LinkAddrs, 0, len(ls))
	for _, l := range ls {
		out = append(out, LinkAddrs{Index: l.Index, Addrs: l.Addrs})
	}
	return out, err
}
