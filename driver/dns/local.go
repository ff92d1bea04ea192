package dns

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// Who may ask. The server's address sits on lo, and Linux takes a packet
// for any of its addresses on any link (the weak host model): a machine
// on the host's LAN that routes the address to the host would get
// answers, and recursion through the host's resolvers. So the server
// answers only queries from this host:
//
//   - what arrives on the loopback link, which only the host itself sends
//     on (programs of the host, and containers sharing its network);
//   - what arrives on a link of one of Docker's bridge networks
//     (docker0, user-defined bridges, docker_gwbridge) from an address of
//     that network: a container of this host. Docker's embedded
//     resolver, on 20.10 as on 29, forwards from inside the asking
//     container, from its address on the network of its default route:
//     docker_gwbridge for a container on wgmesh networks only (wgmesh
//     gives no gateway), else its bridge network's; the packet comes in
//     on that network's bridge.
//
// Everything else is dropped as it is read, before any other work: no
// answer, no cache, no upstream. A forged source does not help: the link
// a packet came in on is the kernel's, and an address of a bridge
// network is taken only on that bridge. Over TCP the link is unknown, but
// the handshake proves the source: a connection is taken from loopback,
// from the host's own addresses, or from an address of a bridge network.

// loopbackIndex is the loopback link's index, the same in every network
// namespace (the kernel's LOOPBACK_IFINDEX).
const loopbackIndex = 1

// BridgeLister lists the IPv4 subnets of the local engine's bridge
// networks. The Docker a Service is given may implement it; without it
// the server answers only what arrives on loopback.
type BridgeLister interface {
	BridgeSubnets(ctx context.Context) ([]netip.Prefix, error)
}

// verdict is what a query's source and link make of it.
type verdict int

const (
	foreign verdict = iota
	local
	// unknownLink: a link the last look did not see (a bridge network
	// created since); a fresh look decides.
	unknownLink
)

// localNets is one look at the host's links and Docker's bridges.
type localNets struct {
	// known are the links that had IPv4 addresses.
	known map[int]bool
	// bridges maps a link to the parts of Docker's bridge subnets it
	// holds addresses in.
	bridges map[int][]netip.Prefix
	all     []netip.Prefix
	host    map[netip.Addr]bool
}

// LinkAddrs are the IPv4 addresses of one link of the host, with their
// prefix lengths (172.18.0.1/16). The agent lists them from the kernel
// (dns/hostaddr); this package stays clear of netlink, as the driver's
// packages do (test/deptest).
type LinkAddrs struct {
	Index int
	Addrs []netip.Prefix
}

func newLocalNets(links []LinkAddrs, subnets []netip.Prefix) *localNets {
	n := &localNets{known: map[int]bool{}, bridges: map[int][]netip.Prefix{}, host: map[netip.Addr]bool{}}
	for _, l := range links {
		n.known[l.Index] = true
		for _, a := range l.Addrs {
			n.host[a.Addr()] = true
			for _, s := range subnets {
				p := a.Masked()
				if !s.Overlaps(p) {
					continue
				}
				// The narrower of the two: the bridge's own subnet, or
				// Docker's, if the link holds a wider one.
				if s.Bits() > p.Bits() {
					p = s
				}
				n.bridges[l.Index] = append(n.bridges[l.Index], p)
				n.all = append(n.all, p)
			}
		}
	}
	return n
}

func containedIn(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// udp judges a datagram from src that came in on link ifindex; n may be
// nil (no look yet).
func (n *localNets) udp(ifindex int, src netip.Addr) verdict {
	switch {
	case ifindex == loopbackIndex:
		return local
	case n == nil:
		return unknownLink
	case n.bridges[ifindex] != nil:
		if containedIn(n.bridges[ifindex], src) {
			return local
		}
		return foreign
	case n.known[ifindex]:
		return foreign
	}
	return unknownLink
}

// tcp judges a connection from src.
func (n *localNets) tcp(src netip.Addr) bool {
	return src.IsLoopback() || n != nil && (n.host[src] || containedIn(n.all, src))
}

// Sources knows which queries come from this host: it looks at the
// host's links and Docker's bridge networks at start, every
// sourcesResync, and when a query comes in on a link it has not seen.
type Sources struct {
	bridges func(context.Context) ([]netip.Prefix, error)
	links   func() ([]LinkAddrs, error)
	log     *slog.Logger
	nets    atomic.Pointer[localNets]
	kick    chan struct{}
	waiters chan struct{}

	mu sync.Mutex
	// started and done count looks; doneCh is closed and replaced when
	// one ends.
	started, done uint64
	doneCh        chan struct{}
}

// sourcesResync is how often Sources looks without being asked; looks for
// unknown links are spaced by unknownLookEvery and at most
// maxUnknownWaiters queries wait for one, as the watcher's.
const sourcesResync = 30 * time.Second

// NewSources creates Sources that learn Docker's bridge networks from
// bridges and the host's links from links (nil: none known).
func NewSources(bridges func(context.Context) ([]netip.Prefix, error), links func() ([]LinkAddrs, error), log *slog.Logger) *Sources {
	if links == nil {
		links = func() ([]LinkAddrs, error) { return nil, nil }
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Sources{bridges: bridges, links: links, log: log.With("component", "dns"), kick: make(chan struct{}, 1),
		waiters: make(chan struct{}, maxUnknownWaiters), doneCh: make(chan struct{})}
}

// Run looks until ctx is done.
func (s *Sources) Run(ctx context.Context) error {
	t := time.NewTicker(sourcesResync)
	defer t.Stop()
	var last time.Time
	for {
		s.look(ctx)
		last = time.Now()
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-s.kick:
			if !sleep(ctx, time.Until(last.Add(unknownLookEvery))) {
				return nil
			}
		}
	}
}

func (s *Sources) look(ctx context.Context) {
	s.mu.Lock()
	s.started++
	n := s.started
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.done = max(s.done, n)
		close(s.doneCh)
		s.doneCh = make(chan struct{})
		s.mu.Unlock()
	}()
	// Links first: a bridge seen here is one whose network Docker
	// lists below (Docker makes the bridge before it keeps the network).
	links, err := s.links()
	if err != nil {
		s.log.Warn("listing the host's links; keeping the last look", "err", err)
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	subnets, err := s.bridges(ctx)
	if err != nil {
		s.log.Debug("listing Docker's bridge networks; keeping the last look", "err", err)
		return
	}
	s.nets.Store(newLocalNets(links, subnets))
}

// await waits, within ctx, for a look that starts after it is called. It
// returns at once when too many queries wait already.
func (s *Sources) await(ctx context.Context) {
	select {
	case s.waiters <- struct{}{}:
		defer func() { <-s.waiters }()
	default:
		return
	}
	s.mu.Lock()
	target := s.started + 1
	s.mu.Unlock()
	select {
	case s.kick <- struct{}{}:
	default:
	}
	for {
		s.mu.Lock()
		if s.done >= target {
			s.mu.Unlock()
			return
		}
		ch := s.doneCh
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-ch:
		}
	}
}

func (s *Sources) udp(ifindex int, src netip.Addr) verdict {
	if s == nil {
		if ifindex == loopbackIndex {
			return local
		}
		return foreign
	}
	return s.nets.Load().udp(ifindex, src)
}

func (s *Sources) tcp(src netip.Addr) bool {
	if s == nil {
		return src.IsLoopback()
	}
	return s.nets.Load().tcp(src)
}

// recvLink asks a UDP socket, before it is bound, for the link of each
// datagram it receives.
func recvLink(v4 bool) func(network, address string, c syscall.RawConn) error {
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if v4 {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
			}
		})
		return errors.Join(err, serr)
	}
}

// pendingAddr is the source of a datagram that came in on a link Sources
// did not know: the handler waits for a look before it answers.
type pendingAddr struct {
	*net.UDPAddr
	ifindex int
}

// gatedConn is the server's UDP socket: it reads, with each datagram,
// the link it came in on, and drops what does not come from this host.
type gatedConn struct {
	*net.UDPConn
	read    func(b []byte) (n, ifindex int, src net.Addr, err error)
	sources *Sources
	dropped *atomic.Uint64
}

func newGatedConn(c *net.UDPConn, sources *Sources, dropped *atomic.Uint64) (*gatedConn, error) {
	g := &gatedConn{UDPConn: c, sources: sources, dropped: dropped}
	if la, ok := c.LocalAddr().(*net.UDPAddr); ok && la.IP.To4() != nil {
		p := ipv4.NewPacketConn(c)
		if err := p.SetControlMessage(ipv4.FlagInterface, true); err != nil {
			return nil, err
		}
		g.read = func(b []byte) (int, int, net.Addr, error) {
			n, cm, src, err := p.ReadFrom(b)
			if cm == nil {
				return n, 0, src, err
			}
			return n, cm.IfIndex, src, err
		}
	} else {
		p := ipv6.NewPacketConn(c)
		if err := p.SetControlMessage(ipv6.FlagInterface, true); err != nil {
			return nil, err
		}
		g.read = func(b []byte) (int, int, net.Addr, error) {
			n, cm, src, err := p.ReadFrom(b)
			if cm == nil {
				return n, 0, src, err
			}
			return n, cm.IfIndex, src, err
		}
	}
	return g, nil
}

// ReadFrom returns the next datagram from this host, or from a link not
// known yet (its source a *pendingAddr).
func (g *gatedConn) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		n, ifindex, src, err := g.read(b)
		if err != nil {
			return n, src, err
		}
		ua, ok := src.(*net.UDPAddr)
		if !ok {
			continue
		}
		a, _ := netip.AddrFromSlice(ua.IP)
		switch g.sources.udp(ifindex, a.Unmap()) {
		case local:
			return n, ua, nil
		case unknownLink:
			return n, &pendingAddr{UDPAddr: ua, ifindex: ifindex}, nil
		}
		g.dropped.Add(1)
	}
}

func (g *gatedConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	if p, ok := addr.(*pendingAddr); ok {
		addr = p.UDPAddr
	}
	return g.UDPConn.WriteTo(b, addr)
}

// gatedListener is the server's TCP listener: it closes connections that
// do not come from this host before reading from them.
type gatedListener struct {
	net.Listener
	sources *Sources
	dropped *atomic.Uint64
}

func (l *gatedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return c, err
		}
		if a, ok := addrOf(c.RemoteAddr()); ok && l.sources.tcp(a) {
			return c, nil
		}
		c.Close()
		l.dropped.Add(1)
	}
}
