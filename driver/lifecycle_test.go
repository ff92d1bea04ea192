package driver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/docker/go-plugins-helpers/network"
	"github.com/google/go-cmp/cmp"

	"github.com/wgmesh/wgmesh/driver/dataplane"
)

// TestDockerLifecycle replays what Docker sends for
//
//	docker network create -d wgmesh --ipam-driver wgmesh --subnet 10.60.0.0/16 app
//	docker run --network app ...
//	docker stop ...
//	docker network rm app
//
// in Docker's order, and checks the state file, the mesh and the data
// plane after each step.
func TestDockerLifecycle(t *testing.T) {
	h := newHarness(t)
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	netID, epID := dockerID("net app"), dockerID("ep web")
	wg := dataplane.WireGuardName(netID)

	// docker network create: IPAM first.
	poolID := h.requestPool(poolReq("10.60.0.0/16", "", nil))
	if s := h.state(); s.Pools[poolID] == nil || s.Pools[poolID].Subnet != subnet {
		t.Fatalf("state after RequestPool: pool %s missing: %+v", poolID, s.Pools)
	}

	// The gateway is the same on every host and takes no block.
	gw := h.requestAddress(gatewayReq(poolID, ""))
	if gw.Addr() != netip.MustParseAddr("10.60.0.1") {
		t.Fatalf("gateway %s, want the subnet's first address", gw)
	}
	if own := h.mesh.View().OwnBlocks(subnet); len(own) != 0 {
		t.Fatalf("the gateway claimed blocks %v", own)
	}
	if gw.Bits() != subnet.Bits() {
		t.Errorf("gateway %s does not carry the subnet's mask", gw)
	}
	if got := h.state().Pools[poolID].Allocated[gw.Addr()]; got != AllocSharedGateway {
		t.Errorf("state has gateway %s as %q, want %q", gw.Addr(), got, AllocSharedGateway)
	}

	h.empty(pathCreateNetwork, createNetworkReq(netID, "10.60.0.0/16", gw, nil))
	n := h.state().Networks[netID]
	if n == nil {
		t.Fatal("state has no network after CreateNetwork")
	}
	if n.Subnet != subnet || n.Gateway != gw.Addr() || n.PoolID != poolID || n.Port != 51820 || n.MTU != 1420 {
		t.Errorf("state network = %+v", n)
	}
	if p := attachedPort(h.mesh, subnet); p != 51820 {
		t.Errorf("mesh announces port %d for %s, want 51820", p, subnet)
	}
	wantNet := fmt.Sprintf("link %s mtu 1420 port 51820 addr %s\nroute 10.60.0.0/16 dev %s", wg, gw.Addr(), wg)
	if diff := cmp.Diff(wantNet, h.fake.Render()); diff != "" {
		t.Errorf("data plane after CreateNetwork (-want +got):\n%s", diff)
	}

	// docker run: the address comes with the MAC Docker generated.
	mac := "02:42:0a:3c:00:02"
	addr := h.requestAddress(containerReq(poolID, "", mac))
	if addr.Addr() == gw.Addr() {
		t.Fatalf("container got the gateway's address %s", addr)
	}
	own := h.mesh.View().OwnBlocks(subnet)
	if len(own) != 1 || !inAny(own, addr.Addr()) {
		t.Fatalf("container address %s is not in this host's blocks %v", addr, own)
	}
	// The block's addresses without a container go nowhere.
	wantNet += fmt.Sprintf("\nroute unreachable %s", own[0])
	for _, a := range []netip.Addr{gw.Addr(), addr.Addr()} {
		if b := lastByte(a); b == 0 || b == 255 {
			t.Errorf("address %s ends in .%d", a, b)
		}
	}

	var ep network.CreateEndpointResponse
	h.ok(pathCreateEndpoint, endpointReq(netID, epID, addr, mac), &ep)
	// Docker refuses answers that repeat what it sent (section 1.4).
	if ep.Interface != nil && (ep.Interface.Address != "" || ep.Interface.MacAddress != "" || ep.Interface.AddressIPv6 != "") {
		t.Errorf("CreateEndpoint echoed fields Docker set: %+v", ep.Interface)
	}
	if e := h.state().Endpoints[epID]; e == nil || e.Addr != addr || e.MAC != mac || e.NetworkID != netID || e.Joined {
		t.Errorf("state endpoint after CreateEndpoint = %+v", e)
	}

	var join network.JoinResponse
	h.ok(pathJoin, joinReq(netID, epID), &join)
	if want := dataplane.ContainerVethName(epID); join.InterfaceName.SrcName != want || join.InterfaceName.DstPrefix != "eth" {
		t.Errorf("Join answered interface %+v, want %s with prefix eth", join.InterfaceName, want)
	}
	// No gateway: Docker then gives the container docker_gwbridge for the
	// outside world.
	if join.Gateway != "" || len(join.StaticRoutes) != 0 || join.DisableGatewayService {
		t.Errorf("Join answered %+v, want no gateway or routes", join)
	}
	if e := h.state().Endpoints[epID]; e == nil || !e.Joined {
		t.Errorf("state endpoint after Join = %+v, want joined", e)
	}
	wantEP := fmt.Sprintf("\nveth %s addr %s mtu 1420 mac %s", dataplane.HostVethName(epID), addr, mac)
	if diff := cmp.Diff(wantNet+wantEP, h.fake.Render()); diff != "" {
		t.Errorf("data plane after Join (-want +got):\n%s", diff)
	}

	var info map[string]any
	h.ok(pathOperInfo, epReq(netID, epID), &info)
	if v, ok := info["Value"].(map[string]any); !ok || v["wgmesh.address"] != addr.String() {
		t.Errorf("EndpointOperInfo answered %v, want a Value object with the address", info)
	}

	// docker stop.
	h.empty(pathLeave, epReq(netID, epID))
	h.empty(pathDeleteEndpoint, epReq(netID, epID))
	if s := h.state(); len(s.Endpoints) != 0 {
		t.Errorf("state keeps endpoints after DeleteEndpoint: %+v", s.Endpoints)
	}
	if diff := cmp.Diff(wantNet, h.fake.Render()); diff != "" {
		t.Errorf("data plane after DeleteEndpoint (-want +got):\n%s", diff)
	}
	h.empty(pathReleaseAddress, releaseReq(poolID, addr.Addr()))
	if _, ok := h.state().Pools[poolID].Allocated[addr.Addr()]; ok {
		t.Errorf("state keeps %s after ReleaseAddress", addr.Addr())
	}

	// docker network rm: IPAM first, then the driver.
	h.empty(pathReleaseAddress, releaseReq(poolID, gw.Addr()))
	h.empty(pathReleasePool, map[string]any{"PoolID": poolID})
	if s := h.state(); len(s.Pools) != 0 {
		t.Errorf("state keeps pools after ReleasePool: %+v", s.Pools)
	}
	if own := h.mesh.View().OwnBlocks(subnet); len(own) != 0 {
		t.Errorf("host still owns %v after ReleasePool", own)
	}
	h.empty(pathDeleteNetwork, netReq(netID))
	if s := h.state(); len(s.Networks) != 0 {
		t.Errorf("state keeps networks after DeleteNetwork: %+v", s.Networks)
	}
	if got := h.fake.Config().Networks; len(got) != 0 {
		t.Errorf("data plane keeps networks after DeleteNetwork: %+v", got)
	}
	if p := attachedPort(h.mesh, subnet); p != 0 {
		t.Errorf("mesh still announces port %d for %s", p, subnet)
	}
	// Docker retries a delete it thinks failed.
	h.empty(pathDeleteNetwork, netReq(netID))
}

// TestCreateEndpointMAC: Docker lets a driver fill in only what it left
// empty, so wgmesh answers a MAC exactly when none was given.
func TestCreateEndpointMAC(t *testing.T) {
	h := newHarness(t)
	n := h.createNetwork("net mac", "10.60.0.0/16", nil)
	addr := h.requestAddress(containerReq(n.poolID, "", ""))
	epID := dockerID("ep no mac")

	var resp network.CreateEndpointResponse
	h.ok(pathCreateEndpoint, endpointReq(n.id, epID, addr, ""), &resp)
	if resp.Interface == nil || resp.Interface.Address != "" || resp.Interface.AddressIPv6 != "" {
		t.Fatalf("answer %+v, want only a MAC", resp.Interface)
	}
	mac := parseMAC(resp.Interface.MacAddress)
	if mac == nil || mac[0]&1 != 0 || mac[0]&2 == 0 {
		t.Errorf("MAC %q is not a locally administered unicast address", resp.Interface.MacAddress)
	}
	if got := h.state().Endpoints[epID].MAC; got != resp.Interface.MacAddress {
		t.Errorf("state has MAC %q, answered %q", got, resp.Interface.MacAddress)
	}

	// Docker retries CreateEndpoint after a timeout: same answer.
	h.ok(pathCreateEndpoint, endpointReq(n.id, epID, addr, "02:42:0a:3c:00:09"), nil)
	// The same endpoint with another address is a conflict.
	other := netip.PrefixFrom(addr.Addr().Next(), addr.Bits())
	if _, msg := h.fail(pathCreateEndpoint, endpointReq(n.id, epID, other, "02:42:0a:3c:00:09")); !strings.Contains(msg, "already exists") {
		t.Errorf("error %q", msg)
	}

	for _, tc := range []struct {
		name string
		req  map[string]any
		want string
	}{
		{"bad MAC", endpointReq(n.id, dockerID("ep bad mac"), addr, "not-a-mac"), "MAC address"},
		{"address outside subnet", endpointReq(n.id, dockerID("ep outside"), mustPrefix(t, "10.61.0.2/16"), ""), "not in"},
		{"bad address", map[string]any{"NetworkID": n.id, "EndpointID": dockerID("ep bad"), "Interface": map[string]any{"Address": "10.60.0.300/16"}}, "endpoint address"},
		{"no interface", map[string]any{"NetworkID": n.id, "EndpointID": dockerID("ep none")}, "no IPv4 address"},
		{"IPv6", map[string]any{"NetworkID": n.id, "EndpointID": dockerID("ep v6"), "Interface": map[string]any{"Address": addr.String(), "AddressIPv6": "fd00::2/64"}}, "IPv4 only"},
		{"bad endpoint ID", endpointReq(n.id, "../../x", addr, ""), "endpoint ID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, msg := h.fail(pathCreateEndpoint, tc.req); !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not contain %q", msg, tc.want)
			}
		})
	}
	if got := len(h.state().Endpoints); got != 1 {
		t.Errorf("state has %d endpoints, want 1", got)
	}
}

// TestCreateNetworkApplyFails: when the data plane cannot be set up, the
// network is rolled back everywhere, and creating it again later works.
func TestCreateNetworkApplyFails(t *testing.T) {
	h := newHarness(t)
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	netID := dockerID("net fails")
	poolID := h.requestPool(poolReq(subnet.String(), "", nil))
	gw := h.requestAddress(gatewayReq(poolID, ""))

	h.setFailApply(netID, errors.New("netlink: operation not permitted"))
	status, msg := h.fail(pathCreateNetwork, createNetworkReq(netID, subnet.String(), gw, nil))
	if status != 500 || !strings.Contains(msg, "operation not permitted") {
		t.Errorf("got %d %q, want a system error with the cause", status, msg)
	}
	checkNoNetwork(t, h, subnet)
	// IPAM is Docker's to roll back (it sends ReleaseAddress and
	// ReleasePool next); the driver leaves it alone.
	if s := h.state(); s.Pools[poolID] == nil || s.Pools[poolID].Allocated[gw.Addr()] != AllocSharedGateway {
		t.Errorf("pool changed by the driver's rollback: %+v", s.Pools)
	}

	h.setFailApply(netID, nil)
	h.empty(pathCreateNetwork, createNetworkReq(netID, subnet.String(), gw, nil))
	if n := h.state().Networks[netID]; n == nil || n.Port != 51820 {
		t.Errorf("network after retry = %+v, want port 51820 (the failed try must not keep one)", n)
	}
	if p := attachedPort(h.mesh, subnet); p != 51820 {
		t.Errorf("mesh announces port %d", p)
	}
	if got := h.fake.Config().Networks; len(got) != 1 || got[0].ID != netID {
		t.Errorf("data plane networks = %+v", got)
	}
}

// checkNoNetwork requires that no trace of a network of subnet is left on
// this host: not in the data plane, not announced, not in the state file.
func checkNoNetwork(t *testing.T, h *harness, subnet netip.Prefix) {
	t.Helper()
	if got := h.fake.Config().Networks; len(got) != 0 {
		t.Errorf("data plane has networks: %+v", got)
	}
	if p := attachedPort(h.mesh, subnet); p != 0 {
		t.Errorf("mesh announces port %d for %s", p, subnet)
	}
	if s := h.state(); len(s.Networks) != 0 {
		t.Errorf("state file has networks: %+v", s.Networks)
	}
	h.d.mu.Lock()
	defer h.d.mu.Unlock()
	if n := h.d.state.networkBySubnet(subnet); n != nil {
		t.Errorf("driver remembers network %+v", n)
	}
}

// TestCreateNetworkIdempotent: Docker may retry CreateNetwork; the same
// request succeeds, a different subnet under the same ID does not, and a
// second network cannot take a subnet this host already has.
func TestCreateNetworkIdempotent(t *testing.T) {
	h := newHarness(t)
	n := h.createNetwork("net once", "10.60.0.0/16", nil)
	h.empty(pathCreateNetwork, createNetworkReq(n.id, "10.60.0.0/16", n.gw, nil))
	if got := len(h.state().Networks); got != 1 {
		t.Fatalf("%d networks after retry", got)
	}

	other := h.requestPool(poolReq("10.61.0.0/16", "", nil))
	gw := h.requestAddress(gatewayReq(other, ""))
	if _, msg := h.fail(pathCreateNetwork, createNetworkReq(n.id, "10.61.0.0/16", gw, nil)); !strings.Contains(msg, "already exists") {
		t.Errorf("same ID, other subnet: %q", msg)
	}
	if _, msg := h.fail(pathCreateNetwork, createNetworkReq(dockerID("net twice"), "10.60.0.0/16", n.gw, nil)); !strings.Contains(msg, "already used") {
		t.Errorf("other ID, same subnet: %q", msg)
	}
	if got := len(h.state().Networks); got != 1 {
		t.Errorf("%d networks, want 1", got)
	}
}

// TestNetworkOptionsApplied: -o options reach the data plane.
func TestNetworkOptionsApplied(t *testing.T) {
	h := newHarness(t)
	netID := dockerID("net mtu")
	poolID := h.requestPool(poolReq("10.60.0.0/16", "", nil))
	gw := h.requestAddress(gatewayReq(poolID, ""))
	req := createNetworkReq(netID, "10.60.0.0/16", gw, map[string]any{
		optMTU: " 1380 ",
		// Options of other tools are none of wgmesh's business.
		"com.example.team": "blue",
	})
	req["Options"].(map[string]any)[dockerInternal] = true
	h.empty(pathCreateNetwork, req)

	n := h.state().Networks[netID]
	if n == nil || n.MTU != 1380 || !n.Options.Internal || n.Options.MTU != 1380 {
		t.Fatalf("state network = %+v", n)
	}
	if !strings.HasPrefix(h.fake.Render(), fmt.Sprintf("link %s mtu 1380 ", dataplane.WireGuardName(netID))) {
		t.Errorf("data plane:\n%s", h.fake.Render())
	}
	epID := dockerID("ep mtu")
	h.run(testNet{id: netID, poolID: poolID}, epID, "02:42:0a:3c:00:05")
	if !strings.Contains(h.fake.Render(), fmt.Sprintf("veth %s addr", dataplane.HostVethName(epID))) ||
		!strings.Contains(h.fake.Render(), "mtu 1380 mac 02:42:0a:3c:00:05") {
		t.Errorf("endpoint does not get the network's MTU:\n%s", h.fake.Render())
	}
}

// TestRestart: a new agent on the same state directory restores the
// networks and joined endpoints before Docker calls anything, with the
// same WireGuard ports, and then serves Docker's calls about them.
func TestRestart(t *testing.T) {
	h := newHarness(t)
	n := h.createNetwork("net restart", "10.60.0.0/16", nil)
	epID := dockerID("ep restart")
	mac := "02:42:0a:3c:00:07"
	addr := h.run(n, epID, mac)
	before := h.fake.Render()

	h.restart()
	if got := h.fake.Config().Networks; len(got) != 0 {
		t.Fatalf("fresh data plane has networks: %+v", got)
	}
	if err := h.d.Restore(context.Background()); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	nets := h.fake.Config().Networks
	if len(nets) != 1 {
		t.Fatalf("data plane after Restore has %d networks, want 1", len(nets))
	}
	got := nets[0]
	if got.ID != n.id || got.Subnet != n.subnet || got.Gateway != n.gw.Addr() || got.ListenPort != 51820 || got.MTU != 1420 {
		t.Errorf("restored network = %+v", got)
	}
	wantEPs := []dataplane.Endpoint{{ID: epID, Addr: addr, MAC: parseMAC(mac)}}
	if diff := cmp.Diff(wantEPs, got.Endpoints, cmpNetip); diff != "" {
		t.Errorf("restored endpoints (-want +got):\n%s", diff)
	}
	if p := attachedPort(h.mesh, n.subnet); p != 51820 {
		t.Errorf("mesh announces port %d after restart, want 51820", p)
	}
	// The kernel keeps veth pairs across an agent restart; the fresh fake
	// does not have them, so only their state differs.
	if want := strings.Replace(before, fmt.Sprintf("mtu 1420 mac %s", mac), "missing", 1); h.fake.Render() != want {
		t.Errorf("data plane after restore:\n%s\nwant:\n%s", h.fake.Render(), want)
	}

	// A second network on this host gets the next port, and the first
	// keeps its own.
	n2 := h.createNetwork("net second", "10.61.0.0/16", nil)
	if p := h.state().Networks[n2.id].Port; p != 51821 {
		t.Errorf("second network got port %d, want 51821", p)
	}
	if p := h.state().Networks[n.id].Port; p != 51820 {
		t.Errorf("first network moved to port %d", p)
	}

	// Docker stops the container it started before the restart.
	h.empty(pathLeave, epReq(n.id, epID))
	h.empty(pathDeleteEndpoint, epReq(n.id, epID))
	h.empty(pathReleaseAddress, releaseReq(n.poolID, addr.Addr()))
	if s := h.state(); len(s.Endpoints) != 0 || len(s.Pools[n.poolID].Allocated) != 1 {
		t.Errorf("state after stop: endpoints %v, allocated %v", s.Endpoints, s.Pools[n.poolID].Allocated)
	}

	// Deleting the first network frees its port for the next one.
	h.empty(pathReleaseAddress, releaseReq(n.poolID, n.gw.Addr()))
	h.empty(pathReleasePool, map[string]any{"PoolID": n.poolID})
	h.empty(pathDeleteNetwork, netReq(n.id))
	n3 := h.createNetwork("net third", "10.62.0.0/16", nil)
	if p := h.state().Networks[n3.id].Port; p != 51820 {
		t.Errorf("third network got port %d, want the freed 51820", p)
	}
}

// TestRestartBetweenReleasePoolAndDeleteNetwork: on `docker network rm`,
// Docker releases the pool before it deletes the network, and only logs a
// DeleteNetwork that fails (e.g. because the agent is restarting). The
// state file then holds a network whose pool is gone.
func TestRestartBetweenReleasePoolAndDeleteNetwork(t *testing.T) {
	h := newHarness(t)
	n := h.createNetwork("net rm", "10.60.0.0/16", nil)
	h.empty(pathReleaseAddress, releaseReq(n.poolID, n.gw.Addr()))
	h.empty(pathReleasePool, map[string]any{"PoolID": n.poolID})
	// The agent restarts here; Docker's DeleteNetwork never reaches it.
	h.restart()
	err := func() (err error) {
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("panic: %v", p)
			}
		}()
		return h.d.Restore(context.Background())
	}()
	if err != nil {
		t.Fatalf("Restore: %v", err)
	}
}

// TestCreateNetworkSaveFails: CreateNetwork promises to complete or leave
// nothing behind, also when the state file cannot be written (full or
// read-only disk). Docker takes the error as "no network" and never sends
// DeleteNetwork for it.
func TestCreateNetworkSaveFails(t *testing.T) {
	h := newHarness(t)
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	netID := dockerID("net unsaved")
	poolID := h.requestPool(poolReq(subnet.String(), "", nil))
	gw := h.requestAddress(gatewayReq(poolID, ""))

	// A directory where the state file goes makes the atomic rename fail,
	// even for root.
	statePath := filepath.Join(h.dir, "driver.json")
	if err := os.Rename(statePath, statePath+".saved"); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(statePath, "in-the-way"), 0o700); err != nil {
		t.Fatal(err)
	}
	h.fail(pathCreateNetwork, createNetworkReq(netID, subnet.String(), gw, nil))
	if err := os.RemoveAll(statePath); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(statePath+".saved", statePath); err != nil {
		t.Fatal(err)
	}
	checkNoNetwork(t, h, subnet)

	// Docker rolls back IPAM, and the user runs the command again.
	h.empty(pathReleaseAddress, releaseReq(poolID, gw.Addr()))
	h.empty(pathReleasePool, map[string]any{"PoolID": poolID})
	h.createNetwork("net unsaved again", subnet.String(), nil)
}
