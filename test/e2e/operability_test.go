//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// restartAgents restarts every agent with extra flags, and restores the
// default flags when the test ends.
func restartAgents(t *testing.T, extra map[*lab.Host][]string) {
	t.Helper()
	ctx := testCtx(t)
	for _, h := range theLab.Hosts {
		h.StopAgent(syscall.SIGTERM)
		if err := h.StartAgent(ctx, extra[h]...); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, h := range theLab.Hosts {
			h.StopAgent(syscall.SIGTERM)
			if err := h.StartAgent(context.Background()); err != nil {
				t.Error(err)
			}
		}
	})
}

type inspected struct {
	Name    string
	Driver  string
	Options map[string]string
	Labels  map[string]string
	IPAM    struct {
		Driver  string
		Options map[string]string
		Config  []struct {
			Subnet, IPRange, Gateway string
			AuxiliaryAddresses       map[string]string
		}
	}
}

func inspectNetwork(ctx context.Context, h *lab.Host, name string) (*inspected, error) {
	out, err := h.Docker(ctx, "network", "inspect", name)
	if err != nil {
		return nil, err
	}
	var n []inspected
	if err := json.Unmarshal([]byte(out), &n); err != nil || len(n) != 1 {
		return nil, fmt.Errorf("inspect %s: %v", name, err)
	}
	return &n[0], nil
}

// TestNetworkSync: a network created on one host appears on the others
// with the same name, subnet and options; a host can opt out. A prune or
// `docker network rm` on one host removes that host's copy only, and the
// agent puts it back. `wgmesh network rm` removes it everywhere, but
// never from under containers, and says where they are.
func TestNetworkSync(t *testing.T) {
	ctx := testCtx(t)
	h1, h2, h3 := theLab.Hosts[0], theLab.Hosts[1], theLab.Hosts[2]
	restartAgents(t, map[*lab.Host][]string{h1: {"--sync-networks=true"}, h2: {"--sync-networks=true"}})

	args := []string{"--ip-range", "10.90.128.0/17", "--aux-address", "router=10.90.0.2",
		"-o", "com.docker.network.driver.mtu=1300", "--ipam-opt", "wgmesh.block-size=26", "--label", "team=blue"}
	if err := theLab.CreateNetwork(ctx, "synced", "10.90.0.0/16", args, h1); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, h := range theLab.Hosts {
			_, _ = h.Docker(context.Background(), "rm", "-f", "sync1", "sync2")
		}
		_, _ = h1.Wgmesh(context.Background(), "network", "rm", "synced")
	})
	start := time.Now()
	var copied *inspected
	poll.Eventually(t, 30*time.Second, "network synced on h2", func() error {
		var err error
		copied, err = inspectNetwork(ctx, h2, "synced")
		return err
	})
	t.Logf("network created on h1 appeared on h2 after %s", time.Since(start).Round(time.Millisecond))
	orig, err := inspectNetwork(ctx, h1, "synced")
	if err != nil {
		t.Fatal(err)
	}
	if copied.Driver != orig.Driver || copied.IPAM.Driver != orig.IPAM.Driver ||
		copied.Options["com.docker.network.driver.mtu"] != "1300" || copied.Labels["team"] != "blue" ||
		copied.IPAM.Options["wgmesh.block-size"] != "26" || len(copied.IPAM.Config) != 1 ||
		copied.IPAM.Config[0].Subnet != "10.90.0.0/16" || copied.IPAM.Config[0].IPRange != "10.90.128.0/17" ||
		!slices.Contains(slices.Collect(maps.Values(copied.IPAM.Config[0].AuxiliaryAddresses)), "10.90.0.2") ||
		copied.IPAM.Config[0].Gateway != orig.IPAM.Config[0].Gateway {
		t.Fatalf("copy differs:\n h1 %+v\n h2 %+v", orig, copied)
	}
	ip1 := container(t, h1, "sync1", "synced", nil)
	container(t, h2, "sync2", "synced", nil)
	ping(t, h2, "sync2", ip1)

	// h3 opted out: no copy there.
	time.Sleep(3 * time.Second)
	if _, err := h3.Docker(ctx, "network", "inspect", "synced"); err == nil {
		t.Fatal("the network appeared on h3, which runs with --sync-networks=false")
	}

	// A prune on h1 (as cron runs it) takes h1's copy, not h2's; h1's
	// agent puts it back, and containers start on it again.
	if _, err := h1.Docker(ctx, "rm", "-f", "sync1"); err != nil {
		t.Fatal(err)
	}
	if out, err := h1.Docker(ctx, "network", "prune", "-f"); err != nil || !strings.Contains(out, "synced") {
		t.Fatalf("prune: %v\n%s", err, out)
	}
	pruned := time.Now()
	poll.Eventually(t, 30*time.Second, "network synced back on h1", func() error {
		_, err := inspectNetwork(ctx, h1, "synced")
		return err
	})
	t.Logf("a network pruned on h1 was back %s later", time.Since(pruned).Round(time.Millisecond))
	if _, err := inspectNetwork(ctx, h2, "synced"); err != nil {
		t.Fatalf("a prune on h1 took the network from h2: %v", err)
	}
	ip1 = container(t, h1, "sync1", "synced", nil)
	ping(t, h2, "sync2", ip1)

	// Removing it from the cluster is refused while containers use it,
	// naming the hosts.
	out, err := h1.Wgmesh(ctx, "network", "rm", "synced")
	if err == nil || !strings.Contains(out, "h1 (1)") || !strings.Contains(out, "h2 (1)") {
		t.Fatalf("network rm while in use: %v\n%s", err, out)
	}
	for _, h := range []*lab.Host{h1, h2} {
		if _, err := h.Docker(ctx, "rm", "-f", "sync1", "sync2"); err != nil {
			t.Fatal(err)
		}
	}
	poll.Eventually(t, 30*time.Second, "wgmesh network rm synced", func() error {
		out, err := h1.Wgmesh(ctx, "network", "rm", "synced")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	for _, h := range []*lab.Host{h1, h2} {
		poll.Eventually(t, 30*time.Second, "network synced gone from "+h.Name, func() error {
			if _, err := h.Docker(ctx, "network", "inspect", "synced"); err == nil {
				return fmt.Errorf("network still on %s", h.Name)
			}
			return nil
		})
	}
}

func hasProblem(st *driver.Status, want string) bool {
	for _, p := range st.Problems {
		if strings.Contains(p, want) {
			return true
		}
	}
	return false
}

// TestMetricsEndpoint scrapes a running agent's /metrics.
func TestMetricsEndpoint(t *testing.T) {
	ctx := testCtx(t)
	h1 := theLab.Hosts[0]
	restartAgents(t, map[*lab.Host][]string{h1: {"--metrics-addr", "127.0.0.1:9586"}})
	network(t, "met", "10.91.0.0/16", nil, h1, theLab.Hosts[1])
	container(t, h1, "met1", "met", nil)
	ip2 := container(t, theLab.Hosts[1], "met2", "met", nil)
	ping(t, h1, "met1", ip2)
	var body string
	poll.Eventually(t, 10*time.Second, "the metrics", func() error {
		var err error
		body, err = h1.Exec(ctx, "busybox", "wget", "-qO-", "http://127.0.0.1:9586/metrics")
		return err
	})
	for _, want := range []string{
		`wgmesh_members{state="alive"} 3`,
		"wgmesh_networks 1",
		`wgmesh_endpoints{network="10.91.0.0/16"} 1`,
		`wgmesh_peers{network="10.91.0.0/16"} 1`,
		`wgmesh_peer_receive_bytes_total{network="10.91.0.0/16",peer="h2"}`,
		`wgmesh_peer_last_handshake_age_seconds{network="10.91.0.0/16",peer="h2"}`,
		`wgmesh_ipam_addresses{network="10.91.0.0/16",state="used"} 1`,
		`wgmesh_plugin_requests_total{call="NetworkDriver.Join",result="ok"} 1`,
		"go_goroutines",
		"process_resident_memory_bytes",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}
