package gossipnet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/memberlist"
	"golang.org/x/sys/unix"
)

// NetTransport is memberlist's transport on real sockets, like
// memberlist.NetTransport, TCP and UDP on one port, with one addition:
// a second UDP socket on the same port (SO_REUSEPORT) that sends with
// the don't-fragment bit and never fragments locally, for path MTU
// probes. The gossip socket is the opposite, it never sets DF: memberlist
// packets reach across a path smaller than they are as fragments rather
// than vanish into a path that drops oversized packets without a word.
//
// Probes and gossip leave from the same port, so they share the NAT
// mappings of the path they measure. Both UDP sockets receive (the
// kernel spreads datagrams between them by flow); everything goes to
// one packet channel.
type NetTransport struct {
	log    *slog.Logger
	tcp    *net.TCPListener
	udp    *net.UDPConn
	df     *net.UDPConn
	port   int
	family int
	// dial sets up outgoing TCP connections; nil leaves the kernel's
	// defaults.
	dial func(network, address string, c syscall.RawConn) error

	packets chan *memberlist.Packet
	streams chan net.Conn
	closed  atomic.Bool
	started sync.Once
	wg      sync.WaitGroup
}

var (
	_ memberlist.NodeAwareTransport = (*NetTransport)(nil)
	_ DFWriter                      = (*NetTransport)(nil)
)

// DFWriter sends a datagram from the gossip port with DF set; a packet
// larger than the outgoing interface's MTU fails with EMSGSIZE rather
// than being fragmented.
type DFWriter interface {
	WriteDF(b []byte, to netip.AddrPort) error
}

// udpRecvBuf is what the UDP sockets ask the kernel to buffer.
const udpRecvBuf = 2 << 20

// NewNetTransport binds the gossip port on addr (port 0 picks one).
// listen and dial, if not nil, set up the TCP listener and each outgoing
// TCP connection before they bind or connect (as net.ListenConfig.Control
// and net.Dialer.Control): the caller's policy for its TCP sockets (mesh
// keeps their segments small, mesh/tcpmss.go). It starts nothing; Start
// does.
func NewNetTransport(addr string, port int, listen, dial func(network, address string, c syscall.RawConn) error, log *slog.Logger) (*NetTransport, error) {
	ip, err := netip.ParseAddr(addr)
	if err != nil {
		return nil, fmt.Errorf("bind address %q: %w", addr, err)
	}
	ip = ip.Unmap()
	network, family := "4", unix.AF_INET
	if ip.Is6() {
		network, family = "6", unix.AF_INET6
	}
	var last error
	// Port 0: the kernel picks the TCP port, which UDP may find taken.
	for range 10 {
		t, err := bindNetTransport(network, family, ip, port, listen, log)
		if err == nil {
			t.dial = dial
			return t, nil
		}
		last = err
		if port != 0 {
			break
		}
	}
	return nil, last
}

func bindNetTransport(network string, family int, ip netip.Addr, port int, listen func(network, address string, c syscall.RawConn) error, log *slog.Logger) (*NetTransport, error) {
	lc := net.ListenConfig{Control: listen}
	l, err := lc.Listen(context.Background(), "tcp"+network, netip.AddrPortFrom(ip, uint16(port)).String())
	if err != nil {
		return nil, fmt.Errorf("gossip port (TCP): %w", err)
	}
	tl := l.(*net.TCPListener)
	port = tl.Addr().(*net.TCPAddr).Port
	hostPort := net.JoinHostPort(ip.String(), strconv.Itoa(port))
	udp, err := listenUDP("udp"+network, hostPort, family, pmtuDiscDont(family))
	if err != nil {
		tl.Close()
		return nil, fmt.Errorf("gossip port (UDP): %w", err)
	}
	df, err := listenUDP("udp"+network, hostPort, family, pmtuDiscProbe(family))
	if err != nil {
		tl.Close()
		udp.Close()
		return nil, fmt.Errorf("gossip port (UDP, path MTU probes): %w", err)
	}
	return &NetTransport{log: log, tcp: tl, udp: udp, df: df, port: port, family: family,
		packets: make(chan *memberlist.Packet), streams: make(chan net.Conn)}, nil
}

func pmtuDiscDont(family int) int {
	if family == unix.AF_INET6 {
		return unix.IPV6_PMTUDISC_DONT
	}
	return unix.IP_PMTUDISC_DONT
}

func pmtuDiscProbe(family int) int {
	if family == unix.AF_INET6 {
		return unix.IPV6_PMTUDISC_PROBE
	}
	return unix.IP_PMTUDISC_PROBE
}

// listenUDP binds a UDP socket that shares its port (SO_REUSEPORT) and
// sets its path MTU discovery mode.
func listenUDP(network, hostPort string, family, pmtud int) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); serr != nil {
				return
			}
			if family == unix.AF_INET6 {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, pmtud)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, pmtud)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(context.Background(), network, hostPort)
	if err != nil {
		return nil, err
	}
	c := pc.(*net.UDPConn)
	_ = c.SetReadBuffer(udpRecvBuf)
	return c, nil
}

// Port is the bound port.
func (t *NetTransport) Port() int { return t.port }

// Start starts the listeners' goroutines.
func (t *NetTransport) Start() {
	t.started.Do(func() {
		t.wg.Add(3)
		go t.loopAccept()
		go t.loopRead(t.udp)
		go t.loopRead(t.df)
	})
}

func (t *NetTransport) loopAccept() {
	defer t.wg.Done()
	delay := time.Duration(0)
	for {
		c, err := t.tcp.AcceptTCP()
		if err != nil {
			if t.closed.Load() {
				return
			}
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			t.log.Warn("accepting a gossip connection", "err", err)
			time.Sleep(delay)
			continue
		}
		delay = 0
		t.streams <- c
	}
}

// maxDatagram is the largest UDP payload.
const maxDatagram = 65536

func (t *NetTransport) loopRead(c *net.UDPConn) {
	defer t.wg.Done()
	for {
		buf := make([]byte, maxDatagram)
		n, from, err := c.ReadFromUDPAddrPort(buf)
		ts := time.Now()
		if err != nil {
			if t.closed.Load() {
				return
			}
			// ICMP errors of earlier sends surface here; they say
			// nothing about this socket.
			continue
		}
		if n < 1 {
			continue
		}
		t.packets <- &memberlist.Packet{Buf: buf[:n], From: net.UDPAddrFromAddrPort(unmapPort(from)), Timestamp: ts}
	}
}

func unmapPort(a netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// FinalAdvertiseAddr implements memberlist.Transport: the caller always
// gives the address.
func (t *NetTransport) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	a := net.ParseIP(ip)
	if a == nil {
		return nil, 0, fmt.Errorf("advertise address %q is not an IP address", ip)
	}
	if port == 0 {
		port = t.port
	}
	return a, port, nil
}

func parseAddrPort(addr string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err == nil {
		return unmapPort(ap), nil
	}
	ua, rerr := net.ResolveUDPAddr("udp", addr)
	if rerr != nil {
		return netip.AddrPort{}, err
	}
	return unmapPort(ua.AddrPort()), nil
}

// WriteTo implements memberlist.Transport.
func (t *NetTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	ap, err := parseAddrPort(addr)
	if err != nil {
		return time.Time{}, err
	}
	_, err = t.udp.WriteToUDPAddrPort(b, ap)
	return time.Now(), err
}

// WriteToAddress implements memberlist.NodeAwareTransport.
func (t *NetTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	return t.WriteTo(b, a.Addr)
}

// WriteDF implements DFWriter.
func (t *NetTransport) WriteDF(b []byte, to netip.AddrPort) error {
	_, err := t.df.WriteToUDPAddrPort(b, to)
	return err
}

// PacketCh implements memberlist.Transport.
func (t *NetTransport) PacketCh() <-chan *memberlist.Packet { return t.packets }

// DialTimeout implements memberlist.Transport.
func (t *NetTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	d := net.Dialer{Timeout: timeout, Control: t.dial}
	return d.Dial("tcp", addr)
}

// Listener is the gossip port's TCP listener; nil on a nil transport.
func (t *NetTransport) Listener() net.Listener {
	if t == nil {
		return nil
	}
	return t.tcp
}

// DialAddressTimeout implements memberlist.NodeAwareTransport.
func (t *NetTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	return t.DialTimeout(a.Addr, timeout)
}

// StreamCh implements memberlist.Transport.
func (t *NetTransport) StreamCh() <-chan net.Conn { return t.streams }

// Shutdown implements memberlist.Transport.
func (t *NetTransport) Shutdown() error {
	if t.closed.Swap(true) {
		return nil
	}
	err := errors.Join(t.tcp.Close(), t.udp.Close(), t.df.Close())
	// The loops may be blocked handing over a packet or stream that
	// memberlist no longer reads.
	done := make(chan struct{})
	go func() { t.wg.Wait(); close(done) }()
	for {
		select {
		case <-done:
			return err
		case p := <-t.packets:
			_ = p
		case c := <-t.streams:
			c.Close()
		}
	}
}

// isMsgSize reports a send refused because the packet exceeds the
// outgoing interface's MTU.
func isMsgSize(err error) bool { return errors.Is(err, unix.EMSGSIZE) }
