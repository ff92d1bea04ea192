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

// TestCollectGone: a joined endpoint whose veth vanished (its container
// died without Docker telling us) is forgotten at the next resync;
// endpoints not joined yet have no veth to miss.
func TestCollectGone(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	n := h.createNetwork("net gone", "10.60.0.0/16", nil)
	dead, alive, created := dockerID("ep dead"), dockerID("ep alive"), dockerID("ep created")
	deadAddr := h.run(n, dead, "02:42:0a:3c:00:02")
	h.run(n, alive, "02:42:0a:3c:00:03")
	createdAddr := h.requestAddress(containerReq(n.poolID, "", "02:42:0a:3c:00:04"))
	h.ok(pathCreateEndpoint, endpointReq(n.id, created, createdAddr, "02:42:0a:3c:00:04"), nil)

	h.fake.Kill(dead)
	h.d.collectGone(ctx)

	s := h.state()
	if s.Endpoints[dead] != nil {
		t.Error("the dead endpoint is still in the state file")
	}
	if s.Endpoints[alive] == nil || s.Endpoints[created] == nil {
		t.Errorf("live endpoints were forgotten: %v", s.Endpoints)
	}
	// Docker releases the address when it cleans up the endpoint.
	if s.Pools[n.poolID].Allocated[deadAddr.Addr()] != AllocEndpoint {
		t.Error("the dead endpoint's address was released behind Docker's back")
	}

	h.d.mu.Lock()
	err := h.d.applyLocked(ctx)
	h.d.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if r := h.fake.Render(); strings.Contains(r, dataplane.HostVethName(dead)) || !strings.Contains(r, dataplane.HostVethName(alive)) {
		t.Errorf("data plane after resync:\n%s", r)
	}

	// Docker's cleanup of the dead container arrives later and succeeds.
	h.empty(pathLeave, epReq(n.id, dead))
	h.empty(pathDeleteEndpoint, epReq(n.id, dead))
	h.empty(pathReleaseAddress, releaseReq(n.poolID, deadAddr.Addr()))
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
	eventually(t, 5*time.Second, func() error {
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
