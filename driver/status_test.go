package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/dataplane"
	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/test/poll"
)

func TestStatus(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	n := h.createNetwork("net status", "10.60.0.0/16", nil)
	epID, mac := dockerID("ep status"), "02:42:0a:3c:00:02"
	addr := h.run(n, epID, mac)

	st, err := h.d.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A lone node is its own quorum and has no peers to miss.
	if !st.Healthy || len(st.Problems) != 0 {
		t.Errorf("lone node unhealthy: %q", st.Problems)
	}
	wantNode := NodeStatus{Name: testNode, Addr: netip.MustParseAddr("127.0.0.1"), PublicKey: h.key.Public(), WGMode: dataplane.ModeUserspace, ClusterID: st.Node.ClusterID}
	if diff := cmp.Diff(wantNode, st.Node, cmpNetip); diff != "" {
		t.Errorf("node (-want +got):\n%s", diff)
	}
	if len(st.Members) != 1 || !st.Members[0].Self || st.Members[0].State != mesh.Alive || st.Members[0].Name != testNode {
		t.Errorf("members = %+v, want only this node, alive", st.Members)
	}
	wantNets := []NetworkStatus{{
		ID: n.id, Subnet: n.subnet, Interface: dataplane.WireGuardName(n.id), Port: 51820, MTU: 1420, Gateway: n.gw.Addr(),
		Blocks:    h.mesh.View().OwnBlocks(n.subnet),
		Endpoints: []EndpointStatus{{ID: epID, Addr: addr, MAC: mac, Joined: true}},
	}}
	if len(wantNets[0].Blocks) != 1 {
		t.Errorf("host owns blocks %v, want one", wantNets[0].Blocks)
	}
	if diff := cmp.Diff(wantNets, st.Networks, cmpNetip); diff != "" {
		t.Errorf("networks (-want +got):\n%s", diff)
	}
	// `wgmesh status` receives it as JSON.
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var back Status
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatalf("status does not round-trip through JSON: %v", err)
	}
	if diff := cmp.Diff(st.Networks, back.Networks, cmpNetip); diff != "" {
		t.Errorf("networks after JSON round trip (-before +after):\n%s", diff)
	}

	// A network the data plane could not set up is a problem, and so the
	// node is unhealthy. A key rotation is one apply that shows it.
	h.setFailApply(n.id, errors.New("boom"))
	k2, _ := crypto.GeneratePrivateKey()
	if err := h.d.SetPrivateKey(ctx, k2); err == nil {
		t.Error("SetPrivateKey hid the data plane's error")
	}
	st, err = h.d.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Healthy || !slices.ContainsFunc(st.Problems, func(p string) bool { return strings.Contains(p, "no data plane") }) {
		t.Errorf("healthy %v, problems %q; want the unapplied network reported", st.Healthy, st.Problems)
	}
	if st.Node.PublicKey != k2.Public() {
		t.Error("status shows the old public key after rotation")
	}
}

// sandboxKey is the sandbox key joinReq gives an endpoint.
func sandboxKey(epID string) string { return "/var/run/docker/netns/" + epID[:12] }

// TestCheckEndpoints: a joined endpoint whose veth vanished is forgotten
// when its container is gone, and repaired, under the name Docker gave
// it, when its container runs on; endpoints not joined yet have no veth
// to miss.
func TestCheckEndpoints(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	n := h.createNetwork("net gone", "10.60.0.0/16", nil)
	dead, lost, alive, created := dockerID("ep dead"), dockerID("ep lost"), dockerID("ep alive"), dockerID("ep created")
	deadAddr := h.run(n, dead, "02:42:0a:3c:00:02")
	h.run(n, lost, "02:42:0a:3c:00:05")
	h.run(n, alive, "02:42:0a:3c:00:03")
	createdAddr := h.requestAddress(containerReq(n.poolID, "", "02:42:0a:3c:00:04"))
	h.ok(pathCreateEndpoint, endpointReq(n.id, created, createdAddr, "02:42:0a:3c:00:04"), nil)
	// Docker moves the container ends into the containers, as eth1.
	for _, ep := range []string{dead, lost, alive} {
		h.fake.Move(ep, sandboxKey(ep), "eth1")
	}
	h.d.checkEndpoints(ctx)
	if got := h.state().Endpoints[lost].CtrIfName; got != "eth1" {
		t.Fatalf("container interface name learnt: %q, want eth1", got)
	}

	// One container dies; another loses its interface and runs on.
	h.fake.Sandbox(sandboxKey(dead), false)
	h.fake.Kill(lost)
	h.d.checkEndpoints(ctx)

	s := h.state()
	if s.Endpoints[dead] != nil {
		t.Error("the dead endpoint is still in the state file")
	}
	if s.Endpoints[alive] == nil || s.Endpoints[created] == nil || s.Endpoints[lost] == nil {
		t.Errorf("live endpoints were forgotten: %v", s.Endpoints)
	}
	// Docker releases the address when it cleans up the endpoint.
	if s.Pools[n.poolID].Allocated[deadAddr.Addr()] != AllocEndpoint {
		t.Error("the dead endpoint's address was released behind Docker's back")
	}
	if h.fake.Repairs != 1 {
		t.Errorf("%d repairs, want 1", h.fake.Repairs)
	}
	if name, err := h.fake.ContainerInterface(ctx, n.id, lost, sandboxKey(lost)); err != nil || name != "eth1" {
		t.Errorf("repaired as %q (%v), want eth1", name, err)
	}

	h.d.mu.Lock()
	err := h.d.applyLocked(ctx)
	h.d.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if r := h.fake.Render(); strings.Contains(r, dataplane.HostVethName(dead)) || !strings.Contains(r, dataplane.HostVethName(alive)) ||
		!strings.Contains(r, "veth "+dataplane.HostVethName(lost)+" addr 10.60.") || strings.Contains(r, "missing") {
		t.Errorf("data plane after resync:\n%s", r)
	}

	// Docker's cleanup of the dead container arrives later and succeeds.
	h.empty(pathLeave, epReq(n.id, dead))
	h.empty(pathDeleteEndpoint, epReq(n.id, dead))
	h.empty(pathReleaseAddress, releaseReq(n.poolID, deadAddr.Addr()))
}

// TestCheckEndpointsAsksDocker: with Docker's API, Docker decides
// whether an endpoint's container runs, and the repair happens in
// /proc/PID/ns/net of its process, wherever the sandbox key lives.
func TestCheckEndpointsAsksDocker(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	docker := &fakeDocker{h: h, nets: map[string]DockerNetwork{}, pids: map[string]int{}}
	h.d.cfg.Docker = docker
	n := h.createNetwork("net docker", "10.60.0.0/16", nil)
	stopped, running := dockerID("ep stopped"), dockerID("ep running")
	h.run(n, stopped, "02:42:0a:3c:00:02")
	h.run(n, running, "02:42:0a:3c:00:03")
	docker.pids[running] = 4242
	h.fake.Move(running, "/proc/4242/ns/net", "eth0")
	// The sandbox key of the stopped one still exists: Docker's word
	// counts. The running one's interface name was never learnt: the
	// repair takes the first free eth<N>.
	h.fake.Sandbox(sandboxKey(stopped), true)
	h.fake.Kill(stopped)
	h.fake.Kill(running)

	// Docker says a third runs, but its /proc namespace is out of reach
	// (an agent in a PID namespace of its own): reported, not forgotten.
	unreachable := dockerID("ep unreachable")
	h.run(n, unreachable, "02:42:0a:3c:00:04")
	docker.mu.Lock()
	docker.pids[unreachable] = 4343
	docker.mu.Unlock()
	h.fake.Kill(unreachable)

	h.d.checkEndpoints(ctx)
	s := h.state()
	if s.Endpoints[stopped] != nil {
		t.Error("the endpoint of a stopped container was kept")
	}
	if s.Endpoints[running] == nil || s.Endpoints[running].CtrIfName != "eth0" || h.fake.Repairs != 1 {
		t.Errorf("the running container was not repaired in its /proc namespace: %+v, %d repairs", s.Endpoints[running], h.fake.Repairs)
	}
	if s.Endpoints[unreachable] == nil {
		t.Error("the endpoint of a container Docker says runs was forgotten")
	}
	if st, _ := h.d.Status(ctx); !hasProblemWith(st, "PID namespace") {
		t.Errorf("problems %q; want the unreachable container reported", st.Problems)
	}
}

func hasProblemWith(st *Status, s string) bool {
	return slices.ContainsFunc(st.Problems, func(p string) bool { return strings.Contains(p, s) })
}

// TestCheckEndpointsReportsBroken: a container whose interface cannot be
// repaired is a problem in status, and a metric, until a later check
// repairs it.
func TestCheckEndpointsReportsBroken(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	n := h.createNetwork("net broken", "10.60.0.0/16", nil)
	ep := dockerID("ep broken")
	h.run(n, ep, "02:42:0a:3c:00:02")
	h.fake.Move(ep, sandboxKey(ep), "eth0")
	h.d.checkEndpoints(ctx)
	h.fake.Kill(ep)
	h.fake.Config() // orders the map write below after the fake's reads
	h.fake.FailRepair[ep] = errors.New("no luck")
	h.fake.Config()

	h.d.checkEndpoints(ctx)
	st, err := h.d.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Healthy || !slices.ContainsFunc(st.Problems, func(p string) bool {
		return strings.Contains(p, "lost its interface") && strings.Contains(p, "no luck")
	}) {
		t.Errorf("healthy %v, problems %q; want the broken endpoint reported", st.Healthy, st.Problems)
	}
	if got := st.Networks[0].Endpoints[0]; got.Broken == "" || got.Interface != "eth0" {
		t.Errorf("endpoint status %+v", got)
	}
	if h.state().Endpoints[ep] == nil {
		t.Fatal("a broken endpoint of a running container was forgotten")
	}

	h.fake.Config()
	delete(h.fake.FailRepair, ep)
	h.fake.Config()
	h.d.checkEndpoints(ctx)
	if st, _ := h.d.Status(ctx); !st.Healthy || h.fake.Repairs != 1 {
		t.Errorf("after a successful repair: healthy %v, problems %q, %d repairs", st.Healthy, st.Problems, h.fake.Repairs)
	}
}

// TestCheckEndpointsIgnoresNewJoins: an endpoint that joins after the
// data plane's status was read is not in it, and must not be taken for
// one whose veth vanished.
func TestCheckEndpointsIgnoresNewJoins(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	n := h.createNetwork("net race", "10.60.0.0/16", nil)
	late := dockerID("ep late")
	h.fake.Config()
	h.fake.AfterStatus = func() {
		h.fake.AfterStatus = nil
		h.run(n, late, "02:42:0a:3c:00:02")
	}
	h.fake.Config()
	h.d.checkEndpoints(ctx)
	if h.state().Endpoints[late] == nil {
		t.Fatal("an endpoint that joined during the check was forgotten")
	}
}

// TestRunLoop: the reconcile loop resyncs on its own, collecting dead
// endpoints, and stops when cancelled.
func TestRunLoop(t *testing.T) {
	h := newHarness(t)
	// Before Run starts, so the loop's goroutine sees it.
	h.d.cfg.ResyncInterval = 20 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})

	n := h.createNetwork("net loop", "10.60.0.0/16", nil)
	epID := dockerID("ep loop")
	h.run(n, epID, "02:42:0a:3c:00:02")
	h.fake.Kill(epID)
	poll.Eventually(t, 5*time.Second, "the killed container's endpoint gone", func() error {
		if h.state().Endpoints[epID] != nil {
			return fmt.Errorf("endpoint still in state")
		}
		for _, dn := range h.fake.Config().Networks {
			if len(dn.Endpoints) != 0 {
				return fmt.Errorf("data plane still routes to %v", dn.Endpoints)
			}
		}
		return nil
	})
}
