package mesh

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

func tcpMaxSeg(t *testing.T, c net.Conn) int {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var mss int
	var serr error
	if err := rc.Control(func(fd uintptr) { mss, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_MAXSEG) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return mss
}

// TestControlSocketsMSS: the agent's dialled and accepted TCP keep to the
// packet size asked for, on both ends, even over loopback (MTU 65536):
// the MSS a listener advertises holds back what a dialler without a
// clamp of its own sends.
func TestControlSocketsMSS(t *testing.T) {
	if mssFor(1280, netip.MustParseAddr("192.0.2.1")) != 1240 || mssFor(1280, netip.MustParseAddr("2001:db8::1")) != 1220 ||
		mssFor(1280, netip.MustParseAddr("::ffff:192.0.2.1")) != 1240 {
		t.Fatal("mssFor: wrong header sizes")
	}
	lc := net.ListenConfig{Control: mssControl(func(netip.Addr) int { return controlMTU })}
	l, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 2)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()

	// A dialler that clamps lower than the listener.
	d := net.Dialer{Control: mssControl(func(ip netip.Addr) int {
		if ip != netip.MustParseAddr("127.0.0.1") {
			t.Errorf("asked for the MTU to %s", ip)
		}
		return 1000
	})}
	c, err := d.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s := <-accepted
	defer s.Close()
	if got := tcpMaxSeg(t, c); got > 960 {
		t.Errorf("dialled: MSS %d, want at most 960", got)
	}
	if got := tcpMaxSeg(t, s); got > 960 {
		t.Errorf("accepted from a clamped dialler: MSS %d, want at most 960", got)
	}

	// A dialler without a clamp (an agent of before) still gets the
	// listener's; a listener's clamp can change later.
	if err := setListenerMSS(l, 1100); err != nil {
		t.Fatal(err)
	}
	var plain net.Dialer
	c2, err := plain.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	s2 := <-accepted
	defer s2.Close()
	if got := tcpMaxSeg(t, c2); got > 1060 {
		t.Errorf("unclamped dialler: MSS %d, want at most 1060 (the listener's)", got)
	}
	if got := tcpMaxSeg(t, s2); got > 1060 {
		t.Errorf("accepted: MSS %d, want at most 1060", got)
	}
}
