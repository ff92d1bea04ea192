package linux

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/dataplane"
	"github.com/wgmesh/wgmesh/test/netnstest"
	"github.com/wgmesh/wgmesh/test/poll"
)

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

func randomID() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// testHost is one simulated host: a data plane with its own run
// directory. Both hosts of a test share the test's network namespace
// as their underlay and talk over loopback.
type testHost struct {
	dp  *DataPlane
	key crypto.PrivateKey
	cfg dataplane.Config
	dir string
}

func newTestHost(t *testing.T, mode string) *testHost { return newTestHostIn(t, mode, "") }

// newTestHostIn makes a host whose data plane pins namespaces in the
// mount namespace hostMountNS ("" for the test's own).
func newTestHostIn(t *testing.T, mode, hostMountNS string) *testHost {
	t.Helper()
	dir := t.TempDir()
	dp, err := New(testConfig(dir, mode, hostMountNS))
	if err != nil {
		t.Fatal(err)
	}
	key, _ := crypto.GeneratePrivateKey()
	h := &testHost{dp: dp, key: key, dir: dir}
	h.cfg.PrivateKey = key
	t.Cleanup(func() {
		// Unpin namespaces even when the test failed half-way, before
		// the temporary directory holding them is removed.
		h.cfg.Networks = nil
		_ = h.dp.Apply(context.Background(), &h.cfg)
		_ = h.dp.Close()
	})
	return h
}

func testConfig(dir, mode, hostMountNS string) Config {
	return Config{RunDir: dir, Mode: mode, HostMountNS: hostMountNS,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))}
}

func (h *testHost) apply(t *testing.T) {
	t.Helper()
	if err := h.dp.Apply(context.Background(), &h.cfg); err != nil {
		t.Fatalf("apply: %v", err)
	}
}

// attach creates an endpoint and moves its container end into a fresh
// namespace, as Docker would, configured with the endpoint's address.
func (h *testHost) attach(t *testing.T, netIdx int, addr string) (*netnstest.NS, dataplane.Endpoint) {
	t.Helper()
	n := &h.cfg.Networks[netIdx]
	ep := dataplane.Endpoint{ID: randomID(), Addr: netip.MustParsePrefix(addr), MAC: net.HardwareAddr{0x02, 0x42, 0, 0, 0, byte(len(n.Endpoints) + 1)}}
	ifName, err := h.dp.CreateEndpoint(context.Background(), n.ID, ep, n.MTU)
	if err != nil {
		t.Fatal(err)
	}
	ctr := netnstest.NewNS(t, "ctr-"+ep.ID[:8])
	moveInto(t, ifName, ctr, ep.Addr)
	n.Endpoints = append(n.Endpoints, ep)
	h.apply(t)
	return ctr, ep
}

func moveInto(t *testing.T, ifName string, ctr *netnstest.NS, addr netip.Prefix) {
	t.Helper()
	l, err := netlink.LinkByName(ifName)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetNsFd(l, int(ctr.Handle)); err != nil {
		t.Fatal(err)
	}
	l, err = ctr.NL.LinkByName(ifName)
	if err != nil {
		t.Fatal(err)
	}
	if err := ctr.NL.AddrAdd(l, &netlink.Addr{IPNet: ipNet(addr)}); err != nil {
		t.Fatal(err)
	}
	if err := ctr.NL.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
}

func testNetwork(id, subnet, gw string, port uint16, blocks ...string) dataplane.Network {
	n := dataplane.Network{ID: id, Subnet: netip.MustParsePrefix(subnet), Gateway: netip.MustParseAddr(gw), MTU: 1340, ListenPort: port}
	for _, b := range blocks {
		n.LocalBlocks = append(n.LocalBlocks, netip.MustParsePrefix(b))
	}
	return n
}

func peer(h *testHost, port uint16, blocks ...string) dataplane.Peer {
	p := dataplane.Peer{PublicKey: h.key.Public(), Endpoint: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port), Keepalive: 25 * time.Second}
	for _, b := range blocks {
		p.AllowedIPs = append(p.AllowedIPs, netip.MustParsePrefix(b))
	}
	return p
}

// TestTwoHostsUserspace carries container traffic between two simulated
// hosts over wireguard-go, checks isolation between two networks, and
// that tearing everything down leaves nothing behind.
func TestTwoHostsUserspace(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	testTwoHosts(t, dataplane.ModeUserspace)
}

// TestTwoHostsKernel is the same over kernel WireGuard where it exists
// (make vmtest runs it in a VM that has it).
func TestTwoHostsKernel(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	netnstest.SkipUnlessKernelWireGuard(t)
	testTwoHosts(t, dataplane.ModeKernel)
}

func testTwoHosts(t *testing.T, mode string) {
	a, b := newTestHost(t, mode), newTestHost(t, mode)
	if got := a.dp.Mode(); got != mode {
		t.Fatalf("mode %s, want %s", got, mode)
	}
	netA, netB := randomID(), randomID()
	a.cfg.Networks = []dataplane.Network{testNetwork(netA, "10.60.0.0/16", "10.60.1.1", 51901, "10.60.1.0/24")}
	b.cfg.Networks = []dataplane.Network{testNetwork(netB, "10.60.0.0/16", "10.60.2.1", 51902, "10.60.2.0/24")}
	a.cfg.Networks[0].Peers = []dataplane.Peer{peer(b, 51902, "10.60.2.0/24")}
	b.cfg.Networks[0].Peers = []dataplane.Peer{peer(a, 51901, "10.60.1.0/24")}
	a.apply(t)
	b.apply(t)
	// Applying an unchanged config again is harmless.
	a.apply(t)

	ctrA, epA := a.attach(t, 0, "10.60.1.5/16")
	ctrB, _ := b.attach(t, 0, "10.60.2.7/16")

	ctrA.Ping(t, "10.60.2.7")
	ctrB.Ping(t, "10.60.1.5")
	// The host's own address in the network answers too.
	ctrA.Ping(t, "10.60.1.1")
	// MTU-sized packets with DF set get through the tunnel: 1340 - 28.
	if out, err := ctrA.Exec(context.Background(), "ping", "-c", "3", "-W", "2", "-M", "do", "-s", "1312", "10.60.2.7"); err != nil {
		t.Fatalf("MTU-sized ping with DF: %v", err)
	} else if !strings.Contains(out, " 0% packet loss") {
		t.Fatalf("MTU-sized ping with DF lost packets:\n%s", out)
	}
	// One byte more does not fit; the sender learns it at once instead
	// of the packet vanishing.
	if out, _ := ctrA.Exec(context.Background(), "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1313", "10.60.2.7"); !strings.Contains(out, "message too long") && !strings.Contains(out, "mtu=1340") {
		t.Fatalf("oversized DF ping did not report the MTU:\n%s", out)
	}
	// An unused address in A's own block is unreachable, not sent to B.
	ctrA.NoPing(t, "10.60.1.99")

	// The host end routes and answers ARP at once; the WireGuard link
	// forwards.
	nsPath := filepath.Join(a.dir, "netns", netA)
	for file, want := range map[string]string{
		"/proc/sys/net/ipv4/conf/" + dataplane.HostVethName(epA.ID) + "/proxy_arp":    "1",
		"/proc/sys/net/ipv4/conf/" + dataplane.HostVethName(epA.ID) + "/forwarding":   "1",
		"/proc/sys/net/ipv4/neigh/" + dataplane.HostVethName(epA.ID) + "/proxy_delay": "0",
		"/proc/sys/net/ipv4/conf/" + dataplane.WireGuardName(netA) + "/forwarding":    "1",
	} {
		out, err := netnstest.Exec(context.Background(), nsPath, "cat", file)
		if err != nil || strings.TrimSpace(out) != want {
			t.Errorf("%s = %q (%v), want %s", file, strings.TrimSpace(out), err, want)
		}
	}

	// The container end carries the network's MTU and Docker's MAC.
	l, err := ctrA.NL.LinkByName(dataplane.ContainerVethName(epA.ID))
	if err != nil {
		t.Fatal(err)
	}
	if l.Attrs().MTU != 1340 || l.Attrs().HardwareAddr.String() != epA.MAC.String() {
		t.Fatalf("container interface: MTU %d MAC %s", l.Attrs().MTU, l.Attrs().HardwareAddr)
	}

	st, err := a.dp.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 1 || len(st[0].Peers) != 1 || st[0].Peers[0].LastHandshake.IsZero() || st[0].Peers[0].RxBytes == 0 {
		t.Fatalf("status after traffic: %+v", st)
	}
	if st[0].PublicKey != a.key.Public() || len(st[0].Endpoints) != 1 || st[0].Endpoints[0] != epA.ID {
		t.Fatalf("status: %+v", st[0])
	}

	// A second network on A is isolated from the first.
	other := testNetwork(randomID(), "10.61.0.0/16", "10.61.1.1", 51903, "10.61.1.0/24")
	a.cfg.Networks = append(a.cfg.Networks, other)
	a.apply(t)
	ctrA2, _ := a.attach(t, 1, "10.61.1.5/16")
	ctrA2.NoPing(t, "10.60.1.5")
	ctrA2.NoPing(t, "10.60.2.7")
	ctrA.NoPing(t, "10.61.1.5")
	// Nor can the host reach into a network.
	if out, err := netnstest.Exec(context.Background(), "/proc/self/ns/net", "busybox", "ping", "-c", "1", "-W", "1", "10.60.1.5"); err == nil {
		t.Fatalf("host reached a container:\n%s", out)
	}

	// Removing an endpoint removes its veth pair and its route.
	if err := a.dp.DeleteEndpoint(context.Background(), other.ID, a.cfg.Networks[1].Endpoints[0].ID); err != nil {
		t.Fatal(err)
	}
	if err := a.dp.DeleteEndpoint(context.Background(), other.ID, a.cfg.Networks[1].Endpoints[0].ID); err != nil {
		t.Fatalf("deleting twice: %v", err)
	}

	// Tear down: no namespaces, links, sockets or mounts remain.
	a.cfg.Networks, b.cfg.Networks = nil, nil
	a.apply(t)
	b.apply(t)
	for _, h := range []*testHost{a, b} {
		if err := h.dp.Close(); err != nil {
			t.Fatal(err)
		}
	}
	assertClean(t, []string{netA, netB, other.ID}, a, b)
}

// TestPeerMTU: a peer behind a smaller path gets a route of its own with
// that MTU, so a container's oversized packet with DF to it is answered
// with "fragmentation needed" carrying the smaller MTU, while another
// peer keeps the network's; a new generation starts a peer over.
func TestPeerMTU(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	a, b, c := newTestHost(t, dataplane.ModeUserspace), newTestHost(t, dataplane.ModeUserspace), newTestHost(t, dataplane.ModeUserspace)
	a.cfg.Networks = []dataplane.Network{testNetwork(randomID(), "10.60.0.0/16", "10.60.1.1", 51911, "10.60.1.0/24")}
	b.cfg.Networks = []dataplane.Network{testNetwork(randomID(), "10.60.0.0/16", "10.60.2.1", 51912, "10.60.2.0/24")}
	c.cfg.Networks = []dataplane.Network{testNetwork(randomID(), "10.60.0.0/16", "10.60.3.1", 51913, "10.60.3.0/24")}
	small := peer(b, 51912, "10.60.2.0/24")
	small.MTU = 1216
	a.cfg.Networks[0].Peers = []dataplane.Peer{small, peer(c, 51913, "10.60.3.0/24")}
	b.cfg.Networks[0].Peers = []dataplane.Peer{peer(a, 51911, "10.60.1.0/24")}
	c.cfg.Networks[0].Peers = []dataplane.Peer{peer(a, 51911, "10.60.1.0/24")}
	for _, h := range []*testHost{a, b, c} {
		h.apply(t)
	}
	ctrA, _ := a.attach(t, 0, "10.60.1.5/16")
	b.attach(t, 0, "10.60.2.7/16")
	c.attach(t, 0, "10.60.3.7/16")
	ctx := context.Background()
	ping := func(dst string, size int) (string, error) {
		return ctrA.Exec(ctx, "ping", "-c", "2", "-W", "2", "-M", "do", "-s", strconv.Itoa(size), dst)
	}
	if out, err := ping("10.60.3.7", 1312); err != nil || !strings.Contains(out, " 0% packet loss") {
		t.Fatalf("full-size DF ping to the peer on a full path: %v\n%s", err, out)
	}
	out, _ := ping("10.60.2.7", 1312)
	if !strings.Contains(out, "mtu=1216") && !strings.Contains(out, "mtu = 1216") {
		t.Fatalf("full-size DF ping to the peer on a small path did not learn MTU 1216:\n%s", out)
	}
	if out, err := ping("10.60.2.7", 1216-28); err != nil || !strings.Contains(out, " 0% packet loss") {
		t.Fatalf("DF ping that fits the small path: %v\n%s", err, out)
	}
	// Idempotent, and the route goes when the path is full size again.
	a.apply(t)
	a.cfg.Networks[0].Peers[0].MTU = 0
	a.apply(t)
	nsPath := filepath.Join(a.dir, "netns", a.cfg.Networks[0].ID)
	if routes, err := netnstest.Exec(ctx, nsPath, "ip", "route"); err != nil || strings.Contains(routes, "mtu") {
		t.Fatalf("routes after the path grew: %v\n%s", err, routes)
	}

	// A new generation removes and adds the peer: its session starts
	// over, and traffic flows again.
	st, err := a.dp.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	before := st[0].Peers[0].LastHandshake
	a.cfg.Networks[0].Peers[0].Generation++
	a.apply(t)
	ctrA.Ping(t, "10.60.2.7")
	st, _ = a.dp.Status(ctx)
	for _, p := range st[0].Peers {
		if p.PublicKey == b.key.Public() && !p.LastHandshake.After(before) {
			t.Fatalf("peer not started over: handshake %s, before %s", p.LastHandshake, before)
		}
	}
}

// TestRestartKeepsContainers: a new data plane (an agent restart) takes
// over existing namespaces and veths, and traffic flows again.
func TestRestartKeepsContainers(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	testRestart(t, dataplane.ModeUserspace)
}

// TestRestartKeepsKernelLink: with kernel WireGuard, traffic does not even
// stop while no data plane runs, and the new one adopts the same link.
func TestRestartKeepsKernelLink(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	netnstest.SkipUnlessKernelWireGuard(t)
	testRestart(t, dataplane.ModeKernel)
}

func testRestart(t *testing.T, mode string) {
	a, b := newTestHost(t, mode), newTestHost(t, mode)
	ids := []string{randomID(), randomID()}
	a.cfg.Networks = []dataplane.Network{testNetwork(ids[0], "10.60.0.0/16", "10.60.1.1", 51911, "10.60.1.0/24")}
	b.cfg.Networks = []dataplane.Network{testNetwork(ids[1], "10.60.0.0/16", "10.60.2.1", 51912, "10.60.2.0/24")}
	a.cfg.Networks[0].Peers = []dataplane.Peer{peer(b, 51912, "10.60.2.0/24")}
	b.cfg.Networks[0].Peers = []dataplane.Peer{peer(a, 51911, "10.60.1.0/24")}
	a.apply(t)
	b.apply(t)
	ctrA, _ := a.attach(t, 0, "10.60.1.5/16")
	b.attach(t, 0, "10.60.2.7/16")
	ctrA.Ping(t, "10.60.2.7")

	wgIndex := func() int {
		t.Helper()
		ns, err := netns.GetFromPath(filepath.Join(a.dir, "netns", ids[0]))
		if err != nil {
			t.Fatal(err)
		}
		defer ns.Close()
		h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		l, err := h.LinkByName(dataplane.WireGuardName(ids[0]))
		if err != nil {
			t.Fatal(err)
		}
		return l.Attrs().Index
	}
	before := wgIndex()
	if err := a.dp.Close(); err != nil {
		t.Fatal(err)
	}
	if mode == dataplane.ModeKernel {
		// The kernel carries on without any process.
		ctrA.Ping(t, "10.60.2.7")
	} else {
		ctrA.NoPing(t, "10.60.2.7")
	}
	dp, err := New(Config{RunDir: a.dir, Mode: mode})
	if err != nil {
		t.Fatal(err)
	}
	a.dp = dp
	a.apply(t)
	ctrA.Ping(t, "10.60.2.7")
	if after := wgIndex(); mode == dataplane.ModeKernel && after != before {
		t.Fatalf("the restarted data plane replaced the kernel link: ifindex %d, then %d", before, after)
	}

	a.cfg.Networks, b.cfg.Networks = nil, nil
	a.apply(t)
	b.apply(t)
	a.dp.Close()
	b.dp.Close()
	assertClean(t, ids, a, b)
}

func assertClean(t *testing.T, netIDs []string, hosts ...*testHost) {
	t.Helper()
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		if name := l.Attrs().Name; strings.HasPrefix(name, "wg") {
			t.Errorf("link %s left behind", name)
		}
	}
	for _, id := range netIDs {
		sock := "/var/run/wireguard/" + dataplane.WireGuardName(id) + ".sock"
		if _, err := os.Stat(sock); err == nil {
			t.Errorf("UAPI socket %s left behind", sock)
		}
	}
	for _, h := range hosts {
		entries, _ := os.ReadDir(filepath.Join(h.dir, "netns"))
		if len(entries) > 0 {
			t.Errorf("namespaces left in %s: %v", h.dir, entries)
		}
		mounts, _ := os.ReadFile("/proc/self/mountinfo")
		if strings.Contains(string(mounts), h.dir) {
			t.Errorf("mounts under %s left behind", h.dir)
		}
	}
}

// otherMountNS starts a process in a mount namespace of its own, a copy
// of the test's, and returns the path of that namespace; the process
// ends with the test, after the cleanups registered later.
func otherMountNS(t *testing.T) string {
	t.Helper()
	cmd := exec.Command("unshare", "-m", "--propagation", "private", "sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	path := fmt.Sprintf("/proc/%d/ns/mnt", cmd.Process.Pid)
	own, _ := os.Readlink("/proc/self/ns/mnt")
	poll.Eventually(t, 2*time.Second, path+" out of the test's mount namespace", func() error {
		other, err := os.Readlink(path)
		if err == nil && other == own {
			return errors.New("still in it")
		}
		return err
	})
	return path
}

// mountsOf reports whether the mount table of a mount namespace (that of
// the process whose ns/mnt is nsPath) has a mount at or under dir.
func mountsUnder(t *testing.T, nsPath, dir string) bool {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(filepath.Dir(filepath.Dir(nsPath)), "mountinfo"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(string(b), " "+dir+"/") || strings.Contains(string(b), " "+dir+" ")
}

// TestPinsInHostMountNS: a data plane given another mount namespace as
// the host's pins network namespaces there, not in its own, where an
// agent under systemd's ProtectSystem= would lose them when it stops. A
// new data plane finds them there, and the container's interface has
// lived on.
func TestPinsInHostMountNS(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	host := otherMountNS(t)
	a, b := newTestHostIn(t, dataplane.ModeUserspace, host), newTestHost(t, dataplane.ModeUserspace)
	ids := []string{randomID(), randomID()}
	a.cfg.Networks = []dataplane.Network{testNetwork(ids[0], "10.60.0.0/16", "10.60.1.1", 51921, "10.60.1.0/24")}
	b.cfg.Networks = []dataplane.Network{testNetwork(ids[1], "10.60.0.0/16", "10.60.2.1", 51922, "10.60.2.0/24")}
	a.cfg.Networks[0].Peers = []dataplane.Peer{peer(b, 51922, "10.60.2.0/24")}
	b.cfg.Networks[0].Peers = []dataplane.Peer{peer(a, 51921, "10.60.1.0/24")}
	a.apply(t)
	b.apply(t)
	ctrA, _ := a.attach(t, 0, "10.60.1.5/16")
	b.attach(t, 0, "10.60.2.7/16")
	ctrA.Ping(t, "10.60.2.7")

	pin := filepath.Join(a.dir, "netns", ids[0])
	if mountsUnder(t, "/proc/self/ns/mnt", pin) || !mountsUnder(t, host, pin) {
		t.Fatalf("pin %s: in the own mount namespace %v, in the host's %v; want only the host's",
			pin, mountsUnder(t, "/proc/self/ns/mnt", pin), mountsUnder(t, host, pin))
	}
	if err := a.dp.Close(); err != nil {
		t.Fatal(err)
	}
	dp, err := New(testConfig(a.dir, dataplane.ModeUserspace, host))
	if err != nil {
		t.Fatal(err)
	}
	a.dp = dp
	a.apply(t)
	ctrA.Ping(t, "10.60.2.7")

	a.cfg.Networks, b.cfg.Networks = nil, nil
	a.apply(t)
	b.apply(t)
	a.dp.Close()
	b.dp.Close()
	if mountsUnder(t, host, filepath.Join(a.dir, "netns")) {
		t.Error("mounts left in the host's mount namespace")
	}
	assertClean(t, ids, a, b)
}

// TestRepairEndpoint: the network's namespace is destroyed under a
// running container (the pin went with an agent's private mount
// namespace, say), taking the container's interface with it. Once the
// namespace is back, RepairEndpoint gives the container its interface
// again, as Docker had set it up, and traffic flows.
func TestRepairEndpoint(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	ctx := context.Background()
	a, b := newTestHost(t, dataplane.ModeUserspace), newTestHost(t, dataplane.ModeUserspace)
	ids := []string{randomID(), randomID()}
	a.cfg.Networks = []dataplane.Network{testNetwork(ids[0], "10.60.0.0/16", "10.60.1.1", 51931, "10.60.1.0/24")}
	b.cfg.Networks = []dataplane.Network{testNetwork(ids[1], "10.60.0.0/16", "10.60.2.1", 51932, "10.60.2.0/24")}
	a.cfg.Networks[0].Peers = []dataplane.Peer{peer(b, 51932, "10.60.2.0/24")}
	b.cfg.Networks[0].Peers = []dataplane.Peer{peer(a, 51931, "10.60.1.0/24")}
	a.apply(t)
	b.apply(t)
	b.attach(t, 0, "10.60.2.7/16")
	ctr, ep := a.attach(t, 0, "10.60.1.5/16")
	// Docker names the container end in the container.
	l, err := ctr.NL.LinkByName(dataplane.ContainerVethName(ep.ID))
	if err == nil {
		err = ctr.NL.LinkSetDown(l)
	}
	if err == nil {
		err = ctr.NL.LinkSetName(l, "eth3")
	}
	if err == nil {
		err = ctr.NL.LinkSetUp(l)
	}
	if err != nil {
		t.Fatal(err)
	}
	if name, err := a.dp.ContainerInterface(ctx, ids[0], ep.ID, ctr.Path); err != nil || name != "eth3" {
		t.Fatalf("container interface %q (%v), want eth3", name, err)
	}
	ctr.Ping(t, "10.60.2.7")

	// The namespace goes: nothing holds it once the data plane is closed
	// and its pin is gone.
	if err := a.dp.Close(); err != nil {
		t.Fatal(err)
	}
	pin := filepath.Join(a.dir, "netns", ids[0])
	if err := unix.Unmount(pin, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	poll.Eventually(t, 5*time.Second, "the container's interface gone with its network's namespace", func() error {
		if _, err := ctr.NL.LinkByName("eth3"); err == nil {
			return errors.New("still there")
		}
		return nil
	})
	dp, err := New(testConfig(a.dir, dataplane.ModeUserspace, ""))
	if err != nil {
		t.Fatal(err)
	}
	a.dp = dp
	a.apply(t)
	if st, err := a.dp.Status(ctx); err != nil || len(st) != 1 || len(st[0].Endpoints) != 0 {
		t.Fatalf("status before the repair: %+v, %v", st, err)
	}
	if _, err := a.dp.RepairEndpoint(ctx, ids[0], ep, 1340, filepath.Join(t.TempDir(), "gone"), "eth3"); !errors.Is(err, dataplane.ErrNoSandbox) {
		t.Fatalf("repair in a container that is gone: %v, want ErrNoSandbox", err)
	}
	name, err := a.dp.RepairEndpoint(ctx, ids[0], ep, 1340, ctr.Path, "eth3")
	if err != nil || name != "eth3" {
		t.Fatalf("repair: %q, %v", name, err)
	}
	l, err = ctr.NL.LinkByName("eth3")
	if err != nil {
		t.Fatal(err)
	}
	addrs, _ := ctr.NL.AddrList(l, netlink.FAMILY_V4)
	if l.Attrs().MTU != 1340 || l.Attrs().HardwareAddr.String() != ep.MAC.String() || l.Attrs().Flags&net.FlagUp == 0 ||
		len(addrs) != 1 || addrs[0].IPNet.String() != "10.60.1.5/16" {
		t.Fatalf("repaired interface: MTU %d MAC %s flags %v addrs %v", l.Attrs().MTU, l.Attrs().HardwareAddr, l.Attrs().Flags, addrs)
	}
	a.apply(t)
	ctr.Ping(t, "10.60.2.7")
	if st, err := a.dp.Status(ctx); err != nil || len(st[0].Endpoints) != 1 || st[0].Endpoints[0] != ep.ID {
		t.Fatalf("status after the repair: %+v, %v", st, err)
	}
	// Repairing what works replaces it, under the same name.
	if name, err := a.dp.RepairEndpoint(ctx, ids[0], ep, 1340, ctr.Path, "eth3"); err != nil || name != "eth3" {
		t.Fatalf("second repair: %q, %v", name, err)
	}
	a.apply(t)
	ctr.Ping(t, "10.60.2.7")

	a.cfg.Networks, b.cfg.Networks = nil, nil
	a.apply(t)
	b.apply(t)
	a.dp.Close()
	b.dp.Close()
	assertClean(t, ids, a, b)
}

// TestWireGuardDriftRepaired: a peer removed from the device by hand
// (wg set IF peer KEY remove) is back after the next Apply, which
// compares with the device, not with what it last wrote.
func TestWireGuardDriftRepaired(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	a, b := newTestHost(t, dataplane.ModeUserspace), newTestHost(t, dataplane.ModeUserspace)
	ids := []string{randomID(), randomID()}
	a.cfg.Networks = []dataplane.Network{testNetwork(ids[0], "10.60.0.0/16", "10.60.1.1", 51941, "10.60.1.0/24")}
	b.cfg.Networks = []dataplane.Network{testNetwork(ids[1], "10.60.0.0/16", "10.60.2.1", 51942, "10.60.2.0/24")}
	a.cfg.Networks[0].Peers = []dataplane.Peer{peer(b, 51942, "10.60.2.0/24")}
	b.cfg.Networks[0].Peers = []dataplane.Peer{peer(a, 51941, "10.60.1.0/24")}
	a.apply(t)
	b.apply(t)
	ctrA, _ := a.attach(t, 0, "10.60.1.5/16")
	b.attach(t, 0, "10.60.2.7/16")
	ctrA.Ping(t, "10.60.2.7")

	wg, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	defer wg.Close()
	iface := dataplane.WireGuardName(ids[0])
	if err := wg.ConfigureDevice(iface, wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: wgtypes.Key(b.key.Public()), Remove: true}}}); err != nil {
		t.Fatal(err)
	}
	if dev, err := wg.Device(iface); err != nil || len(dev.Peers) != 0 {
		t.Fatalf("peer not removed by hand: %v", err)
	}
	ctrA.NoPing(t, "10.60.2.7")
	a.apply(t)
	dev, err := wg.Device(iface)
	if err != nil || len(dev.Peers) != 1 || dev.Peers[0].PublicKey != wgtypes.Key(b.key.Public()) || len(dev.Peers[0].AllowedIPs) != 1 {
		t.Fatalf("after apply: %+v, %v", dev, err)
	}
	ctrA.Ping(t, "10.60.2.7")

	a.cfg.Networks, b.cfg.Networks = nil, nil
	a.apply(t)
	b.apply(t)
	a.dp.Close()
	b.dp.Close()
	assertClean(t, ids, a, b)
}

// TestApplyLeavesRoutesAlone: applying what already runs changes no
// route, and a route that changes (a peer's path MTU) is replaced in
// place: a route deleted and added again leaves a moment in which the
// namespace routes a container's packets to nowhere (the block's
// unreachable route), and an agent applies at every mesh change.
func TestApplyLeavesRoutesAlone(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	a, b := newTestHost(t, dataplane.ModeUserspace), newTestHost(t, dataplane.ModeUserspace)
	id := randomID()
	a.cfg.Networks = []dataplane.Network{testNetwork(id, "10.60.0.0/16", "10.60.1.1", 51911, "10.60.1.0/24")}
	small := peer(b, 51912, "10.60.2.0/24")
	small.MTU = 1216
	a.cfg.Networks[0].Peers = []dataplane.Peer{small}
	a.apply(t)
	a.attach(t, 0, "10.60.1.5/16")

	st := a.dp.nets[id]
	updates := make(chan netlink.RouteUpdate, 100)
	done := make(chan struct{})
	if err := netlink.RouteSubscribeWithOptions(updates, done, netlink.RouteSubscribeOptions{Namespace: &st.ns}); err != nil {
		t.Fatal(err)
	}
	// collect returns the route changes seen until a marker route added
	// after the applies comes through.
	marker := netip.MustParsePrefix("192.0.2.0/24")
	collect := func() []string {
		t.Helper()
		lo, err := st.nl.LinkByName("lo")
		if err != nil {
			t.Fatal(err)
		}
		r := netlink.Route{LinkIndex: lo.Attrs().Index, Dst: ipNet(marker), Scope: netlink.SCOPE_LINK}
		if err := st.nl.RouteReplace(&r); err != nil {
			t.Fatal(err)
		}
		var seen []string
		timeout := time.After(5 * time.Second)
		for {
			select {
			case u := <-updates:
				if u.Dst != nil && u.Dst.String() == marker.String() {
					if u.Type == unix.RTM_DELROUTE {
						continue // the last marker's
					}
					if err := st.nl.RouteDel(&r); err != nil {
						t.Fatal(err)
					}
					return seen
				}
				op := "add"
				if u.Type == unix.RTM_DELROUTE {
					op = "del"
				}
				seen = append(seen, fmt.Sprintf("%s %s mtu %d", op, u.Dst, u.MTU))
			case <-timeout:
				t.Fatal("marker route not seen")
			}
		}
	}
	collect()

	a.apply(t)
	a.apply(t)
	if seen := collect(); len(seen) > 0 {
		t.Errorf("applying what runs changed routes: %q", seen)
	}
	a.cfg.Networks[0].Peers[0].MTU = 1280
	a.apply(t)
	seen := collect()
	if len(seen) != 1 || seen[0] != "add 10.60.2.0/24 mtu 1280" {
		t.Errorf("a new path MTU changed routes %q, want only the peer's route replaced", seen)
	}
	close(done)
}
