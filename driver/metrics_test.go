package driver

import (
	"fmt"
	"io"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// TestMetrics scrapes the collector the way Prometheus would, after a
// network with one container and one refused call.
func TestMetrics(t *testing.T) {
	h := newHarness(t)
	n := h.createNetwork("metrics net", "10.60.0.0/16", nil)
	h.run(n, dockerID("metrics ep"), "02:42:0a:3c:00:02")
	h.fail(pathCreateEndpoint, endpointReq(dockerID("no such net"), dockerID("ep2"), n.gw, "02:42:0a:3c:00:03"))

	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(h.d.Collector())
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.HTTPErrorOnError}))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("scrape: %s\n%s", resp.Status, b)
	}
	body := string(b)
	// A /24 block: the container holds one of the 254 addresses that do
	// not end in .0 or .255; the network's gateway, if in it, is not the
	// host's to give.
	free := 253
	if own := h.mesh.View().OwnBlocks(n.subnet); len(own) == 1 && own[0].Contains(netip.MustParseAddr("10.60.0.1")) {
		free = 252
	}
	for _, want := range []string{
		`wgmesh_members{state="alive"} 1`,
		`wgmesh_member_info{node="node-a",state="alive",wg_mode="userspace"} 1`,
		"wgmesh_networks 1",
		`wgmesh_endpoints{network="10.60.0.0/16"} 1`,
		`wgmesh_endpoints_broken{network="10.60.0.0/16"} 0`,
		"wgmesh_endpoint_repairs_total 0",
		`wgmesh_ipam_blocks{network="10.60.0.0/16"} 1`,
		`wgmesh_ipam_addresses{network="10.60.0.0/16",state="used"} 1`,
		fmt.Sprintf(`wgmesh_ipam_addresses{network="10.60.0.0/16",state="free"} %d`, free),
		`wgmesh_plugin_requests_total{call="NetworkDriver.Join",result="ok"} 1`,
		`wgmesh_plugin_requests_total{call="NetworkDriver.CreateEndpoint",result="not found"} 1`,
		"wgmesh_reconcile_errors_total 0",
		"wgmesh_problems 0",
		"wgmesh_consensus_leader 1",
		`wgmesh_consensus_servers{suffrage="voter"} 1`,
		`wgmesh_consensus_proposal_seconds_count{op="claim"} 1`,
		`wgmesh_gossip_messages_total{direction="sent"}`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("scrape lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("scrape:\n%s", body)
	}
}
