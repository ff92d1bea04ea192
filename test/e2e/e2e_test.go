//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// TestCrossHost: one network on three hosts; every container reaches
// every other, by ping and by a TCP transfer whose checksum must match;
// docker network inspect shows the network.
func TestCrossHost(t *testing.T) {
	ctx := testCtx(t)
	network(t, "app", "10.60.0.0/16", nil)
	ips := make([]string, len(theLab.Hosts))
	for i, h := range theLab.Hosts {
		ips[i] = container(t, h, fmt.Sprintf("x%d", i+1), "app", nil)
	}
	for i, h := range theLab.Hosts {
		for j := range theLab.Hosts {
			if i != j {
				ping(t, h, fmt.Sprintf("x%d", i+1), ips[j])
			}
		}
	}
	// Both directions between h1 and h2, 8 MiB each.
	transfer(t, theLab.Hosts[0], "x1", theLab.Hosts[1], "x2", ips[1], 8192)
	transfer(t, theLab.Hosts[1], "x2", theLab.Hosts[0], "x1", ips[0], 8192)

	// Addresses come from the host's own block: distinct across hosts,
	// inside the subnet.
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	seen := map[string]bool{}
	for _, ip := range ips {
		if seen[ip] || !subnet.Contains(netip.MustParseAddr(ip)) {
			t.Fatalf("bad or duplicate address %s in %v", ip, ips)
		}
		seen[ip] = true
	}

	out, err := theLab.Hosts[0].Docker(ctx, "network", "inspect", "app")
	if err != nil {
		t.Fatal(err)
	}
	var inspect []struct {
		Driver string
		IPAM   struct {
			Driver string
			Config []struct{ Subnet, Gateway string }
		}
		Containers map[string]struct{ IPv4Address string }
	}
	if err := json.Unmarshal([]byte(out), &inspect); err != nil || len(inspect) != 1 {
		t.Fatalf("network inspect: %v\n%s", err, out)
	}
	n := inspect[0]
	if n.Driver != "wgmesh" || n.IPAM.Driver != "wgmesh" || len(n.IPAM.Config) != 1 || n.IPAM.Config[0].Subnet != "10.60.0.0/16" || len(n.Containers) != 1 {
		t.Fatalf("network inspect shows %+v", n)
	}

	// Status on each host: healthy, with both peers.
	for _, h := range theLab.Hosts {
		st := status(t, h)
		if !st.Healthy {
			t.Errorf("%s unhealthy: %v", h.Name, st.Problems)
		}
		if len(st.Networks) != 1 || len(st.Networks[0].Peers) != 2 {
			t.Errorf("%s status networks: %+v", h.Name, st.Networks)
		}
	}
}

func status(t *testing.T, h *lab.Host) *driver.Status {
	t.Helper()
	st, err := driver.NewControlClient(h.ControlSock()).Status(testCtx(t))
	if err != nil {
		t.Fatalf("status of %s: %v", h.Name, err)
	}
	return st
}

// TestFirstPing measures `docker run` to the first ping that crosses to
// another host (the benchmark reports the distribution).
func TestFirstPing(t *testing.T) {
	ctx := testCtx(t)
	network(t, "fp", "10.62.0.0/16", nil)
	remote := container(t, theLab.Hosts[1], "fp-target", "fp", nil)
	start := time.Now()
	container(t, theLab.Hosts[0], "fp-probe", "fp", nil)
	var took time.Duration
	poll.Eventually(t, 20*time.Second, "a first cross-host ping", func() error {
		_, err := theLab.Hosts[0].Docker(ctx, "exec", "fp-probe", "ping", "-c", "1", "-W", "1", remote)
		took = time.Since(start)
		return err
	})
	t.Logf("docker run to first cross-host ping: %s", took.Round(time.Millisecond))
}

// TestConnectDisconnect: a running container joins a wgmesh network and
// leaves it again; a container can be on two wgmesh networks.
func TestConnectDisconnect(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	network(t, "cd1", "10.63.0.0/16", nil, h1, h2)
	network(t, "cd2", "10.64.0.0/16", nil, h1, h2)
	peer1 := container(t, h2, "cd-peer1", "cd1", nil)
	peer2 := container(t, h2, "cd-peer2", "cd2", nil)
	container(t, h1, "cd-roamer", "bridge", nil)

	noPing(t, h1, "cd-roamer", peer1)
	if _, err := h1.Docker(ctx, "network", "connect", "cd1", "cd-roamer"); err != nil {
		t.Fatal(err)
	}
	ping(t, h1, "cd-roamer", peer1)
	if _, err := h1.Docker(ctx, "network", "connect", "cd2", "cd-roamer"); err != nil {
		t.Fatal(err)
	}
	ping(t, h1, "cd-roamer", peer2)
	ping(t, h1, "cd-roamer", peer1)

	if _, err := h1.Docker(ctx, "network", "disconnect", "cd1", "cd-roamer"); err != nil {
		t.Fatal(err)
	}
	noPing(t, h1, "cd-roamer", peer1)
	ping(t, h1, "cd-roamer", peer2)
	// The endpoint is gone from the agent too.
	for _, n := range status(t, h1).Networks {
		if n.Subnet.String() == "10.63.0.0/16" && len(n.Endpoints) != 0 {
			t.Fatalf("endpoints left after disconnect: %+v", n.Endpoints)
		}
	}
}

// TestIsolation: containers on different wgmesh networks cannot reach
// each other, on the same host or across hosts, nor can the host reach
// into a network.
func TestIsolation(t *testing.T) {
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	network(t, "red", "10.65.0.0/16", nil, h1, h2)
	network(t, "blue", "10.66.0.0/16", nil, h1, h2)
	red1 := container(t, h1, "red1", "red", nil)
	red2 := container(t, h2, "red2", "red", nil)
	blue1 := container(t, h1, "blue1", "blue", nil)
	blue2 := container(t, h2, "blue2", "blue", nil)
	ping(t, h1, "red1", red2)
	ping(t, h1, "blue1", blue2)
	noPing(t, h1, "red1", blue1)
	noPing(t, h1, "red1", blue2)
	noPing(t, h2, "blue2", red1)
	noPing(t, h2, "blue2", red2)
	if out, err := h1.Exec(testCtx(t), "ping", "-c", "1", "-W", "1", red1); err == nil {
		t.Fatalf("host h1 reached container %s:\n%s", red1, out)
	}
}

// TestOutsideWorld: containers reach a server outside the mesh (in the
// lab's own "internet" namespace) through docker_gwbridge.
func TestOutsideWorld(t *testing.T) {
	ctx := testCtx(t)
	network(t, "out", "10.67.0.0/16", nil, theLab.Hosts[0])
	container(t, theLab.Hosts[0], "out1", "out", nil)
	www := t.TempDir()
	marker := fmt.Sprintf("outside-%d", time.Now().UnixNano())
	if err := os.WriteFile(filepath.Join(www, "index.html"), []byte(marker), 0o644); err != nil {
		t.Fatal(err)
	}
	srv := exec.Command("nsenter", "--net=/run/netns/"+theLab.WAN, "busybox", "httpd", "-f", "-p", lab.WANServer+":8080", "-h", www)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Process.Kill(); _ = srv.Wait() })
	var out string
	poll.Eventually(t, 10*time.Second, "an answer from the outside server", func() error {
		var err error
		// No -T: it crashes this busybox's wget; the context bounds it.
		out, err = theLab.Hosts[0].Docker(ctx, "exec", "out1", "wget", "-qO-", "http://"+lab.WANServer+":8080/")
		return err
	})
	if !strings.Contains(out, marker) {
		t.Fatalf("got %q from the outside server", out)
	}
}

// TestUnderlayIsEncrypted captures the underlay while a container sends a
// marker to another host: the capture holds only WireGuard and encrypted
// gossip, and never the marker. A capture inside the receiving container
// sees the marker, so the method can see it when it is in clear.
func TestUnderlayIsEncrypted(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	network(t, "enc", "10.68.0.0/16", nil, h1, h2)
	container(t, h1, "enc1", "enc", nil)
	ip2 := container(t, h2, "enc2", "enc", nil)
	ping(t, h1, "enc1", ip2)

	dir := t.TempDir()
	underlay := filepath.Join(dir, "underlay.pcap")
	inside := filepath.Join(dir, "inside.pcap")
	stopU := capture(t, "/run/netns/"+theLab.Switch, "br0", underlay)
	pid2, err := h2.ContainerPID(ctx, "enc2")
	if err != nil {
		t.Fatal(err)
	}
	stopI := capture(t, fmt.Sprintf("/proc/%d/ns/net", pid2), "eth0", inside)

	marker := fmt.Sprintf("SECRET-MARKER-%d", time.Now().UnixNano())
	if _, err := h2.Docker(ctx, "exec", "-d", "enc2", "sh", "-c", "sleep 60 | nc -l -p 7001 > /tmp/got"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	if out, err := h1.Docker(ctx, "exec", "enc1", "sh", "-c", fmt.Sprintf("for i in 1 2 3 4 5; do echo %s; done | nc -w 3 %s 7001", marker, ip2)); err != nil {
		t.Fatalf("sending marker: %v\n%s", err, out)
	}
	poll.Eventually(t, 10*time.Second, "the marker on enc2", func() error {
		out, err := h2.Docker(ctx, "exec", "enc2", "cat", "/tmp/got")
		if err != nil || !strings.Contains(out, marker) {
			return fmt.Errorf("marker not received yet: %q %v", out, err)
		}
		return nil
	})
	time.Sleep(500 * time.Millisecond)
	stopU()
	stopI()

	raw, err := os.ReadFile(inside)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(raw, []byte(marker)) {
		t.Fatal("control capture inside the container does not show the marker: the check below would prove nothing")
	}
	raw, err = os.ReadFile(underlay)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, []byte(marker)) {
		t.Fatal("the marker crossed the underlay in clear")
	}
	text, err := exec.Command("tcpdump", "-nn", "-r", underlay).CombinedOutput()
	if err != nil {
		t.Fatalf("reading capture: %v\n%s", err, text)
	}
	// The WireGuard ports of the network on both hosts, from status.
	wgPorts := map[string]bool{}
	for _, h := range []*lab.Host{h1, h2} {
		for _, n := range status(t, h).Networks {
			if n.Subnet.String() == "10.68.0.0/16" {
				wgPorts[fmt.Sprintf("%s.%d", h.Addr, n.Port)] = true
			}
		}
	}
	wgPackets := 0
	for _, line := range strings.Split(strings.TrimSpace(string(text)), "\n") {
		f := strings.Fields(line)
		switch {
		case strings.Contains(line, "reading from file"), strings.Contains(line, " ARP"), line == "":
		case len(f) > 4 && f[1] == "IP6" && strings.HasPrefix(f[2], "fe80::") && strings.HasPrefix(f[4], "ff02::"):
			// The lab hosts' own IPv6 neighbour discovery on the underlay.
		case strings.Contains(line, ".7946"):
			// Gossip: encrypted with the cluster key (checked in mesh tests).
		case strings.Contains(line, ".7947"):
			// Consensus: mutual TLS with keys from the cluster key
			// (crypto tests); the marker check above covers its bytes too.
		case len(f) > 4 && f[1] == "IP" && wgPorts[f[2]] && wgPorts[strings.TrimSuffix(f[4], ":")] && strings.Contains(line, ": UDP"):
			wgPackets++
		default:
			t.Errorf("unexpected packet on the underlay: %s", line)
		}
	}
	if wgPackets == 0 {
		t.Fatalf("no WireGuard packets captured (ports %v): the capture saw nothing:\n%s", wgPorts, text)
	}
	t.Logf("%d WireGuard packets on the underlay, none in clear", wgPackets)
}

// capture runs tcpdump on iface in the network namespace at nsPath until
// the returned function is called.
func capture(t *testing.T, nsPath, iface, file string) func() {
	t.Helper()
	// Immediate mode: without it libpcap hands packets over in blocks
	// once a second, and stopping drops the block not yet handed over.
	cmd := exec.Command("nsenter", "--net="+nsPath, "tcpdump", "--immediate-mode", "-i", iface, "-U", "-s", "0", "-w", file)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	poll.Eventually(t, 10*time.Second, "tcpdump listening", func() error {
		if !strings.Contains(stderr.String(), "listening on") {
			return fmt.Errorf("tcpdump not listening yet: %s", stderr.String())
		}
		return nil
	})
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		_ = cmd.Process.Signal(syscall.SIGINT)
		_ = cmd.Wait()
	}
	t.Cleanup(stop)
	return stop
}

// TestMTUNoBlackHole: with an underlay MTU of 1400, the network's MTU is
// 1340; a 1340-byte packet with DF set crosses hosts, and a bigger one is
// refused at once with "message too long" rather than vanishing.
func TestMTUNoBlackHole(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	network(t, "mtu", "10.69.0.0/16", nil, h1, h2)
	container(t, h1, "mtu1", "mtu", nil)
	ip2 := container(t, h2, "mtu2", "mtu", nil)
	ping(t, h1, "mtu1", ip2)
	out, err := h1.InContainer(ctx, "mtu1", "ip", "-o", "link", "show", "eth0")
	if err != nil || !strings.Contains(out, "mtu 1340") {
		t.Fatalf("container MTU: %v\n%s", err, out)
	}
	out, err = h1.InContainer(ctx, "mtu1", "ping", "-c", "3", "-W", "2", "-M", "do", "-s", "1312", ip2)
	if err != nil || !strings.Contains(out, " 0% packet loss") {
		t.Fatalf("full-size ping with DF: %v\n%s", err, out)
	}
	out, _ = h1.InContainer(ctx, "mtu1", "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1313", ip2)
	if !strings.Contains(out, "message too long") {
		t.Fatalf("oversized ping with DF was not refused:\n%s", out)
	}
	// An MTU given with -o wins over the derived one.
	network(t, "mtu-small", "10.70.0.0/16", []string{"-o", "com.docker.network.driver.mtu=1280"}, h1, h2)
	container(t, h1, "mtu3", "mtu-small", nil)
	ip4 := container(t, h2, "mtu4", "mtu-small", nil)
	out, err = h1.InContainer(ctx, "mtu3", "ping", "-c", "2", "-W", "2", "-M", "do", "-s", "1252", ip4)
	if err != nil || !strings.Contains(out, " 0% packet loss") {
		t.Fatalf("ping at MTU 1280: %v\n%s", err, out)
	}
}

// TestBadRequestsAreRefused: mistakes get a clear error and create
// nothing.
func TestBadRequestsAreRefused(t *testing.T) {
	ctx := testCtx(t)
	h := theLab.Hosts[0]
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"network", "create", "-d", "wgmesh", "--ipam-driver", "wgmesh", "nosubnet"}, "needs --subnet"},
		{[]string{"network", "create", "-d", "wgmesh", "--subnet", "10.71.0.0/16", "defaultipam"}, "--ipam-driver wgmesh"},
		{[]string{"network", "create", "-d", "wgmesh", "--ipam-driver", "wgmesh", "--subnet", "10.72.0.0/16", "-o", "com.docker.network.driver.mtu=99999", "badmtu"}, "MTU must be between"},
		{[]string{"network", "create", "-d", "wgmesh", "--ipam-driver", "wgmesh", "--subnet", "10.73.0.0/30", "tiny"}, "too small"},
	} {
		out, err := h.Docker(ctx, tc.args...)
		if err == nil || !strings.Contains(out, tc.want) {
			t.Errorf("docker %v: err %v, output %q; want an error saying %q", tc.args, err, out, tc.want)
		}
	}
	// IPv6, asked for in any way: Docker requests an IPv6 pool (refused),
	// after the IPv4 pool and its gateway, which it then releases.
	refused := []string{"nosubnet", "defaultipam", "badmtu", "tiny", "overlap"}
	v6cases := []struct {
		name string
		args []string
	}{
		{"v6auto", []string{"--subnet", "10.76.0.0/16", "--ipv6"}},
		{"v6subnet", []string{"--subnet", "10.77.0.0/16", "--ipv6", "--subnet", "fd00:77::/64"}},
		{"v6opt", []string{"--subnet", "10.78.0.0/16", "-o", "com.docker.network.enable_ipv6=true"}},
	}
	if engineMajor(t) >= 27 {
		// Since API 1.47 a network may have no IPv4: Docker then asks the
		// IPAM driver for no IPv4 pool and sends CreateNetwork with no
		// IPv4Data and com.docker.network.enable_ipv4=false. The 20.10 CLI
		// has no --ipv4.
		args := []string{"network", "create", "-d", "wgmesh", "--ipam-driver", "wgmesh", "--ipv4=false", "nov4"}
		if out, err := h.Docker(ctx, args...); err == nil || !strings.Contains(out, "without --ipv4=false") {
			t.Errorf("docker %v: err %v, output %q; want an error saying to leave out --ipv4=false", args, err, out)
		}
		refused = append(refused, "nov4")
		v6cases = append(v6cases, struct {
			name string
			args []string
		}{"v6only", []string{"--ipv4=false", "--ipv6", "--subnet", "fd00:79::/64"}})
	}
	for _, tc := range v6cases {
		args := append([]string{"network", "create", "-d", "wgmesh", "--ipam-driver", "wgmesh"}, tc.args...)
		out, err := h.Docker(ctx, append(args, tc.name)...)
		if err == nil || !strings.Contains(out, "IPv4 only") {
			t.Errorf("docker %v: err %v, output %q; want an error saying wgmesh networks are IPv4 only", args, err, out)
		}
		refused = append(refused, tc.name)
	}
	network(t, "dup", "10.74.0.0/16", nil, h)
	if out, err := h.Docker(ctx, "network", "create", "-d", "wgmesh", "--ipam-driver", "wgmesh", "--subnet", "10.74.128.0/17", "overlap"); err == nil || !strings.Contains(out, "overlaps") {
		t.Errorf("overlapping subnet accepted: %v %s", err, out)
	}
	out, err := h.Docker(ctx, "network", "ls", "--format", "{{.Name}}")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range refused {
		if strings.Contains(out, name+"\n") {
			t.Errorf("refused network %s exists anyway", name)
		}
	}
	if st := status(t, h); len(st.Networks) != 1 {
		t.Errorf("agent has %d networks, want 1 (dup)", len(st.Networks))
	}
	if pools := driverState(t, h).Pools; len(pools) != 1 {
		t.Errorf("agent has %d address pools, want 1 (dup): %v", len(pools), slices.Collect(maps.Keys(pools)))
	}
	// A refusal after Docker asked for the gateway (the MTU, IPv6) leaves
	// nothing in the cluster's catalog either: the cluster learns of a
	// network only once its creation has passed every check.
	for _, subnet := range []string{"10.72.0.0/16", "10.76.0.0/16", "10.77.0.0/16", "10.78.0.0/16"} {
		if out, err := h.Wgmesh(ctx, "network", "rm", subnet); err == nil {
			t.Errorf("the cluster kept refused network %s", subnet)
		} else if !strings.Contains(out, "no network") {
			t.Errorf("wgmesh network rm %s: %v\n%s", subnet, err, out)
		}
	}
}

// TestNetworkRemoveCleansUp: after containers and the network are gone,
// no wgmesh namespace or link remains on the hosts.
func TestNetworkRemoveCleansUp(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	if err := theLab.CreateNetwork(ctx, "gone", "10.75.0.0/16", nil, h1, h2); err != nil {
		t.Fatal(err)
	}
	for i, h := range []*lab.Host{h1, h2} {
		if _, err := h.RunContainer(ctx, fmt.Sprintf("gone%d", i), "gone", nil); err != nil {
			t.Fatal(err)
		}
	}
	entries, _ := os.ReadDir(filepath.Join(h1.Dir, "run", "netns"))
	if len(entries) == 0 {
		t.Fatal("no network namespace while the network exists: the check below would prove nothing")
	}
	for i, h := range []*lab.Host{h1, h2} {
		if _, err := h.Docker(ctx, "rm", "-f", fmt.Sprintf("gone%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := theLab.RemoveNetwork(ctx, "gone", h1, h2); err != nil {
		t.Fatal(err)
	}
	// Other tests' networks may exist; only this one must be gone.
	poll.Eventually(t, 10*time.Second, "the network gone, with nothing left of it", func() error {
		for _, h := range []*lab.Host{h1, h2} {
			for _, n := range status(t, h).Networks {
				if n.Subnet.String() == "10.75.0.0/16" {
					return fmt.Errorf("%s still has the network", h.Name)
				}
			}
		}
		return checkNoLeftovers(context.Background(), h1, h2)
	})
}
