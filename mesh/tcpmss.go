package mesh

import (
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/wgmesh/wgmesh/mesh/gossipnet"
)

// The agent's own TCP (consensus over TLS, gossip push/pull) crosses the
// same paths as WireGuard, and the same black holes: a path smaller than
// the hosts' interfaces that drops larger packets and whose ICMP
// "fragmentation needed" never arrives. The kernel's path MTU discovery
// waits for that ICMP, so a connection whose segments fill the
// interface's MTU stalls at its first large flight (a TLS certificate
// flight, a gossip state), for good.
//
// So every TCP socket of the agent keeps its segments small, with
// TCP_MAXSEG: set before the handshake it clamps the MSS this end
// advertises, and so what the other end sends, as well as what this end
// sends. The packet size is the path MTU the prober measured to that
// member if it is smaller, else at most controlMTU, which IPv6 requires
// every path to take and which nearly every IPv4 path does too: a path
// MTU measured a while ago may have shrunk since, and control traffic is
// small and waits on round trips, not on bandwidth. Listening sockets
// cannot know who will connect; they take the smallest path MTU measured
// to any member (capped likewise), and pass it on to what they accept.
//
// Nothing of it is on the wire beyond TCP's own MSS option: old and new
// agents connect to each other as before, and an old peer's large
// segments are held back by the MSS this end advertises.

// controlMTU is the largest packet the agent's own TCP sends or asks for.
const controlMTU = 1280

// mssFor is the TCP MSS of packets of mtu bytes to an address of the
// family of a: IP and TCP headers without options (the kernel takes the
// options off the MSS itself).
func mssFor(mtu int, a netip.Addr) int {
	if a.Is6() && !a.Is4In6() {
		return mtu - 60
	}
	return mtu - 40
}

// controlMTUTo is the packet size for the agent's TCP to the member at ip.
func (m *Mesh) controlMTUTo(ip netip.Addr) int {
	mtu := controlMTU
	if p := m.pathMTUTo(ip.Unmap()); p > 0 {
		mtu = min(mtu, p)
	}
	return mtu
}

// pathMTUTo is the path MTU measured to the member that advertises ip or
// whose gossip arrives from it; 0 if none is known.
func (m *Mesh) pathMTUTo(ip netip.Addr) int {
	if m.pmtu == nil {
		return 0
	}
	var sightings map[string]gossipnet.Sighting
	if m.gossip.net != nil {
		sightings = m.gossip.net.Sightings()
	}
	pmtus := m.pmtu.Results()
	m.mu.Lock()
	defer m.mu.Unlock()
	found := 0
	for name, p := range pmtus {
		rec, ok := m.state.rep.Info(name)
		if (ok && rec.Addr == ip) || sightings[name].Addr.Addr() == ip {
			if found == 0 || p.MTU < found {
				found = p.MTU
			}
		}
	}
	return found
}

// listenMTU is the packet size for what the agent's TCP listeners accept:
// the smallest path MTU measured to any member, at most controlMTU.
func (m *Mesh) listenMTU() int {
	mtu := controlMTU
	if m.pmtu != nil {
		for _, p := range m.pmtu.Results() {
			if p.MTU > 0 {
				mtu = min(mtu, p.MTU)
			}
		}
	}
	return mtu
}

// setMSS sets TCP_MAXSEG on a socket.
func setMSS(c syscall.RawConn, mss int) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_MAXSEG, mss)
	}); err != nil {
		return err
	}
	return serr
}

// mssControl is a net.Dialer or net.ListenConfig Control that sets the
// MSS for packets of mtu(address) bytes.
func mssControl(mtu func(netip.Addr) int) func(network, address string, c syscall.RawConn) error {
	return func(_, address string, c syscall.RawConn) error {
		ap, err := netip.ParseAddrPort(address)
		if err != nil {
			return nil // not an IP socket
		}
		ip := ap.Addr().Unmap()
		return setMSS(c, mssFor(mtu(ip), ip))
	}
}

// setListenerMSS sets the MSS of what a listener accepts from now on.
func setListenerMSS(l net.Listener, mtu int) error {
	tl, ok := l.(*net.TCPListener)
	if !ok {
		return nil
	}
	rc, err := tl.SyscallConn()
	if err != nil {
		return err
	}
	ip := netip.IPv6Unspecified()
	if ap, err := netip.ParseAddrPort(tl.Addr().String()); err == nil && ap.Addr().Is4() {
		ip = ap.Addr()
	}
	return setMSS(rc, mssFor(mtu, ip))
}

// setListenersMSS sets the MSS of the TCP listeners for the path MTUs
// now known (tcpmss.go).
func (m *Mesh) setListenersMSS() {
	mtu := m.listenMTU()
	for _, l := range []net.Listener{m.raftListener, m.gossip.sockets.Listener()} {
		if l == nil {
			continue
		}
		if err := setListenerMSS(l, mtu); err != nil {
			m.log.Debug("setting the MSS of a listener", "addr", l.Addr().String(), "err", err)
		}
	}
}
