package linux

import (
	"bytes"
	"context"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"

	"github.com/wgmesh/wgmesh/driver/dataplane"
	"github.com/wgmesh/wgmesh/test/netnstest"
)

// tcpSend sends n bytes over TCP from namespace from to dst:port in
// namespace to, and reports whether all arrived within limit.
func tcpSend(t *testing.T, from, to netns.NsHandle, dst string, n int, limit time.Duration) error {
	t.Helper()
	var l net.Listener
	addr := net.JoinHostPort(dst, "5001")
	if err := inNS(to, func() (err error) { l, err = net.Listen("tcp4", addr); return err }); err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- -1
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(limit))
		m, _ := io.Copy(io.Discard, c)
		got <- m
	}()
	var c net.Conn
	if err := inNS(from, func() (err error) { c, err = net.DialTimeout("tcp4", addr, 5*time.Second); return err }); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(limit))
	_, err := io.Copy(c, bytes.NewReader(make([]byte, n)))
	c.(*net.TCPConn).CloseWrite()
	m := <-got
	c.Close()
	if err == nil && m != int64(n) {
		err = io.ErrShortWrite
	}
	return err
}

func mssRuleCount(t *testing.T, nsPath string) int {
	t.Helper()
	h, err := netns.GetFromPath(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(h)))
	if err != nil {
		t.Fatal(err)
	}
	rules, err := c.GetRules(&nftables.Table{Family: nftables.TableFamilyINet, Name: mssTable}, &nftables.Chain{Name: "forward"})
	if err != nil {
		return -1
	}
	return len(rules)
}

// TestMSSClamp: containers that drop ICMP "fragmentation needed" carry
// TCP to a peer behind a smaller path, whichever end knows of it: the
// network's namespace lowers the MSS of handshakes going out by the
// route's MTU, and of those coming in from the peer by its path's, so
// that an end without the clamp (an agent of before) is covered too.
func TestMSSClamp(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	a, b := newTestHost(t, dataplane.ModeUserspace), newTestHost(t, dataplane.ModeUserspace)
	a.cfg.Networks = []dataplane.Network{testNetwork(randomID(), "10.60.0.0/16", "10.60.1.1", 51921, "10.60.1.0/24")}
	b.cfg.Networks = []dataplane.Network{testNetwork(randomID(), "10.60.0.0/16", "10.60.2.1", 51922, "10.60.2.0/24")}
	// Only a knows that the path to b is small.
	small := peer(b, 51922, "10.60.2.0/24")
	small.MTU = 1216
	a.cfg.Networks[0].Peers = []dataplane.Peer{small}
	b.cfg.Networks[0].Peers = []dataplane.Peer{peer(a, 51921, "10.60.1.0/24")}
	a.apply(t)
	b.apply(t)
	ctrA, _ := a.attach(t, 0, "10.60.1.5/16")
	ctrB, _ := b.attach(t, 0, "10.60.2.7/16")
	ctx := context.Background()
	for _, ctr := range []*netnstest.NS{ctrA, ctrB} {
		if _, err := ctr.Exec(ctx, "iptables", "-A", "INPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP"); err != nil {
			t.Fatal(err)
		}
	}
	ctrA.Ping(t, "10.60.2.7")
	nsA := filepath.Join(a.dir, "netns", a.cfg.Networks[0].ID)
	nsB := filepath.Join(b.dir, "netns", b.cfg.Networks[0].ID)
	if n := mssRuleCount(t, nsA); n != 2 {
		t.Fatalf("a's clamp: %d rules, want 2 (out, and in from b's block)", n)
	}

	// a's container sends into the small path; it learns the MSS from
	// the handshake coming in from b.
	if err := tcpSend(t, ctrA.Handle, ctrB.Handle, "10.60.2.7", 1<<20, 15*time.Second); err != nil {
		t.Fatalf("TCP from a's container into the small path, a clamping: %v", err)
	}

	// Now b knows too, but clamps nothing, as an agent of before: its
	// container learns the MSS from a's clamp of the handshake going out.
	b.cfg.Networks[0].Peers[0].MTU = 1216
	b.apply(t)
	h, err := netns.GetFromPath(nsB)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(h)))
	if err != nil {
		t.Fatal(err)
	}
	c.DelTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: mssTable})
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := tcpSend(t, ctrB.Handle, ctrA.Handle, "10.60.1.5", 1<<20, 15*time.Second); err != nil {
		t.Fatalf("TCP from b's container into the small path, only a clamping: %v", err)
	}

	// Unchanged rules are not rewritten; a full path again leaves only
	// the rule going out.
	a.apply(t)
	a.cfg.Networks[0].Peers[0].MTU = 0
	a.apply(t)
	if n := mssRuleCount(t, nsA); n != 1 {
		t.Fatalf("a's clamp with a full path: %d rules, want 1", n)
	}
}
