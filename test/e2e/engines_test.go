//go:build e2e

package e2e

// What differs between the engines the suite runs on (Debian's Docker
// 20.10 and Docker Engine 29): the default route of a container that is
// also on a bridge network, internal networks, the gateway every host
// gives a network (Engine 28+ asks the driver first, GwAllocCheck), the
// container interface name a user chooses (Engine 28+), and the IPAM
// pools Docker requests and releases.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// engineMajor is the major version of the engine under test: 20 or 29.
func engineMajor(t *testing.T) int {
	t.Helper()
	major, _, _ := strings.Cut(engineVersion.Server, ".")
	n, err := strconv.Atoi(major)
	if err != nil {
		t.Fatalf("engine version %q: %v", engineVersion.Server, err)
	}
	return n
}

// defaultGateway is the address a container's default route goes
// through; it fails unless there is exactly one default route.
func defaultGateway(t *testing.T, h *lab.Host, ctr string) netip.Addr {
	t.Helper()
	out, err := h.InContainer(testCtx(t), ctr, "ip", "-4", "route", "show", "default")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	f := strings.Fields(lines[0])
	if len(lines) != 1 || len(f) < 3 || f[1] != "via" {
		t.Fatalf("%s on %s: want one default route, have:\n%s", ctr, h.Name, out)
	}
	return netip.MustParseAddr(f[2])
}

// subnetOf is the IPv4 subnet of a network as Docker shows it.
func subnetOf(t *testing.T, h *lab.Host, network string) netip.Prefix {
	t.Helper()
	out, err := h.Docker(testCtx(t), "network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}} {{end}}", network)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range strings.Fields(out) {
		if p, err := netip.ParsePrefix(s); err == nil && p.Addr().Is4() {
			return p
		}
	}
	t.Fatalf("network %s on %s has no IPv4 subnet: %q", network, h.Name, out)
	return netip.Prefix{}
}

// hasAddrIn reports whether a container has an address in p.
func hasAddrIn(t *testing.T, h *lab.Host, ctr string, p netip.Prefix) bool {
	t.Helper()
	out, err := h.InContainer(testCtx(t), ctr, "ip", "-4", "-o", "addr")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		for i := range f {
			if f[i] == "inet" && i+1 < len(f) {
				if a, err := netip.ParsePrefix(f[i+1]); err == nil && p.Contains(a.Addr()) {
					return true
				}
			}
		}
	}
	return false
}

// outside asserts that a container reaches the lab's outside world.
func outside(t *testing.T, h *lab.Host, ctr string) {
	t.Helper()
	ctx := testCtx(t)
	poll.Eventually(t, 10*time.Second, ctr+" on "+h.Name+" reaching the outside world", func() error {
		out, err := h.Docker(ctx, "exec", ctr, "ping", "-c", "1", "-W", "1", lab.WANServer)
		if err != nil {
			return fmt.Errorf("%s on %s cannot reach %s: %v\n%s", ctr, h.Name, lab.WANServer, err, out)
		}
		return nil
	})
}

// TestBridgeNetworkConnect: a wgmesh network gives its containers no
// default route, so Docker adds docker_gwbridge for the outside world. A
// container also connected to a bridge network gets that network's
// gateway as its default route instead, and docker_gwbridge goes; once
// disconnected, docker_gwbridge is back. Traffic over wgmesh to another
// host goes on throughout, and the outside world is reachable through
// whichever gateway is current.
func TestBridgeNetworkConnect(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	network(t, "bc", "10.100.0.0/16", nil, h1, h2)
	bridge := netip.MustParsePrefix("172.29.0.0/24")
	if out, err := h1.Docker(ctx, "network", "create", "--subnet", bridge.String(), "bc-bridge"); err != nil {
		t.Fatalf("creating a bridge network: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if out, err := h1.Docker(context.Background(), "network", "rm", "bc-bridge"); err != nil {
			t.Errorf("removing bc-bridge: %v\n%s", err, out)
		}
	})
	ip1 := container(t, h1, "bc1", "bc", nil)
	ip2 := container(t, h2, "bc2", "bc", nil)
	ping(t, h1, "bc1", ip2)
	gwbridge := subnetOf(t, h1, "docker_gwbridge")
	if gw := defaultGateway(t, h1, "bc1"); !gwbridge.Contains(gw) {
		t.Fatalf("on a wgmesh network only, the default route is via %s, not docker_gwbridge (%s)", gw, gwbridge)
	}
	outside(t, h1, "bc1")

	// steady runs op while the container pings across hosts over wgmesh.
	steady := func(what string, op func() error) {
		t.Helper()
		p := startPing(t, h1, "bc1", ip2, 50*time.Millisecond, 100)
		time.Sleep(time.Second)
		err := op()
		r := p.wait(t)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		t.Logf("%s: %s", what, r)
		if r.Received != r.Sent {
			t.Errorf("%s disturbed traffic over wgmesh: %s", what, r)
		}
	}
	steady("docker network connect bc-bridge", func() error {
		_, err := h1.Docker(ctx, "network", "connect", "bc-bridge", "bc1")
		return err
	})
	if gw := defaultGateway(t, h1, "bc1"); gw != bridge.Addr().Next() {
		t.Fatalf("connected to a bridge network, the default route is via %s, not its gateway %s", gw, bridge.Addr().Next())
	}
	if hasAddrIn(t, h1, "bc1", gwbridge) {
		t.Errorf("with the bridge network's gateway, the container is still on docker_gwbridge")
	}
	outside(t, h1, "bc1")
	ping(t, h1, "bc1", ip2)

	steady("docker network disconnect bc-bridge", func() error {
		_, err := h1.Docker(ctx, "network", "disconnect", "bc-bridge", "bc1")
		return err
	})
	if gw := defaultGateway(t, h1, "bc1"); !gwbridge.Contains(gw) {
		t.Fatalf("disconnected from the bridge network, the default route is via %s, not docker_gwbridge (%s)", gw, gwbridge)
	}
	if !hasAddrIn(t, h1, "bc1", gwbridge) {
		t.Errorf("disconnected from the bridge network, the container is not on docker_gwbridge again")
	}
	outside(t, h1, "bc1")
	ping(t, h1, "bc1", ip2)
	ping(t, h2, "bc2", ip1)
	if got, err := h1.ContainerIP(ctx, "bc1", "bc"); err != nil || got != ip1 {
		t.Fatalf("the container's wgmesh address changed: %s -> %s (%v)", ip1, got, err)
	}
}

// TestInternalNetwork: an --internal wgmesh network, created on one host
// and copied by the others' agents, is internal in every host's Docker;
// its containers reach each other across hosts, and nothing else: no
// default route, neither the outside world nor the hosts' underlay.
func TestInternalNetwork(t *testing.T) {
	ctx := testCtx(t)
	h1, h2, h3 := theLab.Hosts[0], theLab.Hosts[1], theLab.Hosts[2]
	sync := []string{"--sync-networks=true"}
	restartAgents(t, map[*lab.Host][]string{h1: sync, h2: sync, h3: sync})
	if err := theLab.CreateNetwork(ctx, "int", "10.101.0.0/16", []string{"--internal"}, h1); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		for _, h := range theLab.Hosts {
			_, _ = h.Docker(ctx, "rm", "-f", "int1", "int3")
		}
		if out, err := h1.Wgmesh(ctx, "network", "rm", "int"); err != nil {
			t.Errorf("wgmesh network rm int: %v\n%s", err, out)
		}
		// Gone everywhere before the agents stop syncing.
		for _, h := range theLab.Hosts {
			poll.Eventually(t, 30*time.Second, "network int gone from "+h.Name, func() error {
				if _, err := h.Docker(ctx, "network", "inspect", "int"); err == nil {
					return fmt.Errorf("network int still on %s", h.Name)
				}
				return nil
			})
		}
	})
	for _, h := range theLab.Hosts {
		poll.Eventually(t, 30*time.Second, "network int internal on "+h.Name, func() error {
			out, err := h.Docker(ctx, "network", "inspect", "-f", "{{.Internal}}", "int")
			if err != nil {
				return err
			}
			if strings.TrimSpace(out) != "true" {
				return fmt.Errorf("network int on %s is not internal: Internal=%s", h.Name, strings.TrimSpace(out))
			}
			return nil
		})
	}
	ip1, err := h1.RunContainer(ctx, "int1", "int", nil)
	if err != nil {
		t.Fatal(err)
	}
	ip3, err := h3.RunContainer(ctx, "int3", "int", nil)
	if err != nil {
		t.Fatal(err)
	}
	ping(t, h1, "int1", ip3)
	ping(t, h3, "int3", ip1)
	if out, err := h1.InContainer(ctx, "int1", "ip", "-4", "route", "show", "default"); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("a container on an internal network has a default route: %v\n%s", err, out)
	}
	noPing(t, h1, "int1", lab.WANServer)
	noPing(t, h3, "int3", lab.WANServer)
	noPing(t, h1, "int1", h2.Addr.String())
}

// TestInterfaceName: Engine 28 and later name a container's interface as
// the endpoint option com.docker.network.endpoint.ifname asks, on `docker
// run` and on `docker network connect`; the driver answers Join with it.
func TestInterfaceName(t *testing.T) {
	if engineMajor(t) < 28 {
		t.Skipf("engine %s: interface names (com.docker.network.endpoint.ifname) need Engine 28 or later", engineVersion.Server)
	}
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	network(t, "ifn", "10.102.0.0/16", nil, h1, h2)
	network(t, "ifn2", "10.103.0.0/16", nil, h1)
	if out, err := h1.Docker(ctx, "run", "-d", "--name", "ifn1",
		"--network", "name=ifn,driver-opt=com.docker.network.endpoint.ifname=wg0", lab.Image, "sleep", "86400"); err != nil {
		t.Fatalf("docker run with an interface name: %v\n%s", err, out)
	}
	t.Cleanup(func() { _, _ = h1.Docker(context.Background(), "rm", "-f", "ifn1") })
	ip1, err := h1.ContainerIP(ctx, "ifn1", "ifn")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := h1.InContainer(ctx, "ifn1", "ip", "-4", "-o", "addr", "show", "dev", "wg0"); err != nil || !strings.Contains(out, " "+ip1+"/16") {
		t.Fatalf("the container has no interface wg0 with %s: %v\n%s", ip1, err, out)
	}
	ip2 := container(t, h2, "ifn2c", "ifn", nil)
	ping(t, h1, "ifn1", ip2)
	ping(t, h2, "ifn2c", ip1)

	if out, err := h1.Docker(ctx, "network", "connect", "--driver-opt", "com.docker.network.endpoint.ifname=wg1", "ifn2", "ifn1"); err != nil {
		t.Fatalf("docker network connect with an interface name: %v\n%s", err, out)
	}
	ipB, err := h1.ContainerIP(ctx, "ifn1", "ifn2")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := h1.InContainer(ctx, "ifn1", "ip", "-4", "-o", "addr", "show", "dev", "wg1"); err != nil || !strings.Contains(out, " "+ipB+"/16") {
		t.Fatalf("the container has no interface wg1 with %s: %v\n%s", ipB, err, out)
	}
	ping(t, h1, "ifn1", ip2)
}

// callsIn counts the plugin calls of a kind that succeeded in a piece of
// an agent's log (at debug level, each is a line "plugin call").
func callsIn(log, call string) int {
	n := 0
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, `msg="plugin call"`) && strings.Contains(line, " call=/"+call+" ") {
			n++
		}
	}
	return n
}

// TestSameGatewayEverywhere: every host gives a network the same gateway,
// the subnet's first address or the one given with --gateway; Engine 28
// and later ask the driver first (GwAllocCheck) and keep it. A host asking
// for another gateway is refused.
func TestSameGatewayEverywhere(t *testing.T) {
	ctx := testCtx(t)
	logAt := map[*lab.Host]int64{}
	for _, h := range theLab.Hosts {
		logAt[h] = fileSize(t, h.AgentLog())
	}
	network(t, "gw", "10.104.0.0/16", nil)
	network(t, "gw2", "10.105.0.0/16", []string{"--gateway", "10.105.0.254"})
	for _, tc := range []struct {
		network, want string
		given         bool
	}{{"gw", "10.104.0.1", false}, {"gw2", "10.105.0.254", true}} {
		subnet := subnetOf(t, theLab.Hosts[0], tc.network)
		for _, h := range theLab.Hosts {
			if n := networkStatus(wgmeshStatus(t, h), subnet); n == nil || n.Gateway.String() != tc.want {
				t.Errorf("network %s on %s: the agent has gateway %v, want %s", tc.network, h.Name, n, tc.want)
			}
			n, err := inspectNetwork(ctx, h, tc.network)
			if err != nil {
				t.Fatal(err)
			}
			got := ""
			if len(n.IPAM.Config) == 1 {
				got = n.IPAM.Config[0].Gateway
			}
			// 20.10 shows the IPAM configuration as given, not what was
			// allocated: with --subnet and no --gateway, no gateway.
			if got != tc.want && !(got == "" && !tc.given && engineMajor(t) == 20) {
				t.Errorf("network %s on %s: IPAM config %+v, want gateway %s", tc.network, h.Name, n.IPAM.Config, tc.want)
			}
		}
	}
	for _, h := range theLab.Hosts {
		calls := callsIn(fileFrom(t, h.AgentLog(), logAt[h]), "NetworkDriver.GwAllocCheck")
		switch {
		case engineMajor(t) >= 28 && calls < 2:
			t.Errorf("%s: %d GwAllocCheck calls for two networks; Engine %s should ask", h.Name, calls, engineVersion.Server)
		case engineMajor(t) < 28 && calls != 0:
			t.Errorf("%s: %d GwAllocCheck calls from engine %s, which predates them", h.Name, calls, engineVersion.Server)
		}
		t.Logf("%s: %d GwAllocCheck calls for two networks", h.Name, calls)
	}
	// The gateway is the network namespace's: no container gets it.
	ip1 := container(t, theLab.Hosts[0], "gw1", "gw2", nil)
	if ip1 == "10.105.0.254" {
		t.Fatalf("a container got the gateway's address %s", ip1)
	}
	h3 := theLab.Hosts[2]
	if out, err := h3.Docker(ctx, "network", "rm", "gw2"); err != nil {
		t.Fatalf("docker network rm gw2 on h3: %v\n%s", err, out)
	}
	out, err := h3.Docker(ctx, "network", "create", "-d", "wgmesh", "--ipam-driver", "wgmesh", "--subnet", "10.105.0.0/16", "--gateway", "10.105.0.1", "gw2")
	if err == nil || !strings.Contains(out, "gateway 10.105.0.254") {
		t.Fatalf("a host gave gw2 another gateway: %v\n%s", err, out)
	}
	if _, err := theLab.Hosts[2].Docker(ctx, "network", "create", "-d", "wgmesh", "--ipam-driver", "wgmesh", "--subnet", "10.105.0.0/16", "gw2"); err != nil {
		t.Fatalf("creating gw2 again on h3 without --gateway: %v", err)
	}
	if n := networkStatus(wgmeshStatus(t, h3), netip.MustParsePrefix("10.105.0.0/16")); n == nil || n.Gateway.String() != "10.105.0.254" {
		t.Fatalf("gw2 again on h3: the agent has %+v, want gateway 10.105.0.254", n)
	}
}

// driverState is a host agent's state file.
func driverState(t *testing.T, h *lab.Host) *driver.State {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(h.Dir, "state", "driver.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st driver.State
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatalf("%s's state file: %v", h.Name, err)
	}
	return &st
}

// poolsOf lists the IPAM pools of a host's agent inside subnet.
func poolsOf(t *testing.T, h *lab.Host, subnet netip.Prefix) []*driver.Pool {
	t.Helper()
	var pools []*driver.Pool
	for _, p := range driverState(t, h).Pools {
		if subnet.Overlaps(p.Subnet) {
			pools = append(pools, p)
		}
	}
	return pools
}

// TestPoolsBalance: every IPAM pool Docker requests it releases, whatever
// the engine (Engine 29 requests some twice): networks with an IP range,
// aux addresses and a gateway of their own, created, used and removed
// twice over, leave no pool on any host, and the RequestPool and
// ReleasePool calls in the agents' logs pair up.
func TestPoolsBalance(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	subnet := netip.MustParsePrefix("10.106.0.0/16")
	logAt := map[*lab.Host]int64{h1: fileSize(t, h1.AgentLog()), h2: fileSize(t, h2.AgentLog())}
	for round := 1; round <= 2; round++ {
		args := []string{"--ip-range", "10.106.128.0/17", "--aux-address", "router=10.106.0.2", "--gateway", "10.106.0.10",
			"--ipam-opt", "wgmesh.block-size=26"}
		if err := theLab.CreateNetwork(ctx, "pools", subnet.String(), args, h1, h2); err != nil {
			t.Fatal(err)
		}
		for _, h := range []*lab.Host{h1, h2} {
			pools := poolsOf(t, h, subnet)
			if len(pools) != 1 {
				t.Fatalf("round %d: %s has %d pools in %s, want 1", round, h.Name, len(pools), subnet)
			}
			t.Logf("round %d: %s holds pool %s, requested %d time(s)", round, h.Name, pools[0].ID, pools[0].Requests)
		}
		ipA, err := h1.RunContainer(ctx, "pools1", "pools", nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h2.RunContainer(ctx, "pools2", "pools", []string{"--ip", "10.106.200.7"}); err != nil {
			t.Fatal(err)
		}
		ping(t, h2, "pools2", ipA)
		for _, h := range []*lab.Host{h1, h2} {
			if _, err := h.Docker(ctx, "rm", "-f", "pools1", "pools2"); err != nil && !strings.Contains(err.Error(), "No such container") {
				t.Fatal(err)
			}
		}
		if err := theLab.RemoveNetwork(ctx, "pools", h1, h2); err != nil {
			t.Fatal(err)
		}
		for _, h := range []*lab.Host{h1, h2} {
			if pools := poolsOf(t, h, subnet); len(pools) != 0 {
				t.Fatalf("round %d: after network rm %s still holds pool %s (%d request(s))", round, h.Name, pools[0].ID, pools[0].Requests)
			}
		}
	}
	for _, h := range []*lab.Host{h1, h2} {
		log := fileFrom(t, h.AgentLog(), logAt[h])
		req, rel := callsIn(log, "IpamDriver.RequestPool"), callsIn(log, "IpamDriver.ReleasePool")
		t.Logf("%s: %d RequestPool, %d ReleasePool", h.Name, req, rel)
		if req != rel || req < 2 {
			t.Errorf("%s: %d RequestPool and %d ReleasePool calls for two networks", h.Name, req, rel)
		}
	}
}

// wgmeshStatus is `wgmesh status --json` on a host; it exits 1 when there
// are problems, which does not matter here.
func wgmeshStatus(t *testing.T, h *lab.Host) *driver.Status {
	t.Helper()
	out, _ := h.Wgmesh(testCtx(t), "status", "--json")
	var st driver.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("wgmesh status --json on %s: %v\n%s", h.Name, err, out)
	}
	return &st
}

func networkStatus(st *driver.Status, subnet netip.Prefix) *driver.NetworkStatus {
	for i := range st.Networks {
		if st.Networks[i].Subnet == subnet {
			return &st.Networks[i]
		}
	}
	return nil
}

// TestNoBlockWithoutContainers: a network on three hosts with a container
// on one: only that host owns an address block of it. The gateway, the
// same on every host, takes none. The others give it, as a WireGuard peer,
// exactly its block.
func TestNoBlockWithoutContainers(t *testing.T) {
	h1, h2, h3 := theLab.Hosts[0], theLab.Hosts[1], theLab.Hosts[2]
	subnet := netip.MustParsePrefix("10.107.0.0/16")
	network(t, "nb", subnet.String(), nil)
	ip := container(t, h2, "nb2", "nb", nil)
	var block netip.Prefix
	for _, h := range []*lab.Host{h1, h3, h2} {
		n := networkStatus(wgmeshStatus(t, h), subnet)
		if n == nil {
			t.Fatalf("%s has no network %s", h.Name, subnet)
		}
		switch {
		case h == h2 && (len(n.Blocks) != 1 || !n.Blocks[0].Contains(netip.MustParseAddr(ip))):
			t.Fatalf("h2, with container %s, owns blocks %v", ip, n.Blocks)
		case h == h2:
			block = n.Blocks[0]
		case len(n.Blocks) != 0:
			t.Errorf("%s, with no container on the network, owns blocks %v", h.Name, n.Blocks)
		}
	}
	t.Logf("h2 owns %s; h1 and h3 own none", block)
	poll.Eventually(t, 10*time.Second, "h1 and h3 allowing only h2's block", func() error {
		for _, h := range []*lab.Host{h1, h3} {
			for _, p := range networkStatus(wgmeshStatus(t, h), subnet).Peers {
				want := 0
				if p.Node == h2.Name {
					want = 1
				}
				if len(p.AllowedIPs) != want || (want == 1 && p.AllowedIPs[0] != block) {
					return fmt.Errorf("%s allows peer %s %v", h.Name, p.Node, p.AllowedIPs)
				}
			}
		}
		return nil
	})
}
