package integration

import (
	"context"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// private is how systemd runs the agent (docs/wgmesh.service): in a
// mount namespace of its own, whose mounts do not reach the host.
var private = lab.Sandbox{PrivateMountNS: true}

// TestAgentRestartInPrivateMountNS: an agent that runs in a private
// mount namespace restarts under a steady ping, twice. The network
// namespaces it pinned, in the host's mount namespace, outlive it, and
// so do the containers' interfaces.
func TestAgentRestartInPrivateMountNS(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l := newLab(t, 2)
	h2 := l.Hosts[1]
	h2.StopAgent(syscall.SIGTERM)
	if err := h2.StartAgentIn(ctx, private); err != nil {
		t.Fatal(err)
	}
	// Created by the confined agent: its pins are its own doing.
	p := newPair(ctx, t, l, "10.85.0.0/16")
	const interval, count = 50 * time.Millisecond, 120
	for range 2 {
		ping := startPing(p.ctrs[0], p.ctrs[1].IP, interval, count)
		time.Sleep(2 * time.Second)
		stopped := time.Now()
		h2.StopAgent(syscall.SIGTERM)
		if err := h2.StartAgentIn(ctx, private); err != nil {
			t.Fatal(err)
		}
		back := time.Since(stopped)
		lost := ping.lost()
		t.Logf("agent restart in a private mount namespace (SIGTERM): agent back after %s; %s",
			back.Round(time.Millisecond), lostString(lost, count, interval))
		if out, err := p.ctrs[1].Exec(ctx, "ip", "-o", "link", "show", "eth0"); err != nil {
			t.Fatalf("the container lost its interface across the restart: %v\n%s", err, out)
		}
		if len(lost) > count/2 {
			t.Errorf("lost %d of %d pings", len(lost), count)
		}
		firstPing(ctx, t, p.ctrs[0], p.ctrs[1].IP)
	}
	if b, _ := os.ReadFile(h2.AgentLog()); strings.Contains(string(b), "lost its interface") {
		t.Error("the agent found a container without its interface")
	}
}

// TestAgentRepairsLostInterfaces: an agent pins its namespaces in its
// own private mount namespace (--host-mount-ns self, what every agent
// did before), so stopping it destroys them and the container's
// interface. The next agent finds the container alive through its
// sandbox key and gives it its interface back.
func TestAgentRepairsLostInterfaces(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l := newLab(t, 2)
	h2 := l.Hosts[1]
	h2.StopAgent(syscall.SIGTERM)
	if err := h2.StartAgentIn(ctx, private, "--host-mount-ns", "self"); err != nil {
		t.Fatal(err)
	}
	p := newPair(ctx, t, l, "10.86.0.0/16")
	// Let the agent learn the container's interface name (after Join).
	poll.Eventually(t, 20*time.Second, "h2's agent knowing the interface eth0", poll.Bool(func() bool {
		st, err := driver.NewControlClient(h2.ControlSock()).Status(ctx)
		return err == nil && len(st.Networks) == 1 && len(st.Networks[0].Endpoints) == 1 && st.Networks[0].Endpoints[0].Interface == "eth0"
	}))
	h2.StopAgent(syscall.SIGTERM)
	poll.Eventually(t, 10*time.Second, "the container's eth0 gone with the agent", poll.Bool(func() bool {
		_, err := p.ctrs[1].Exec(ctx, "ip", "link", "show", "eth0")
		return err != nil
	}))
	lostAt := time.Now()
	if err := h2.StartAgentIn(ctx, private); err != nil {
		t.Fatal(err)
	}
	firstPing(ctx, t, p.ctrs[0], p.ctrs[1].IP)
	t.Logf("container interface destroyed with its network namespace; reachable again %s after the agent restarted",
		time.Since(lostAt).Round(time.Millisecond))
	out, err := p.ctrs[1].Exec(ctx, "ip", "-o", "addr", "show", "eth0")
	if err != nil || !strings.Contains(out, p.ctrs[1].IP+"/16") {
		t.Fatalf("repaired interface: %v\n%s", err, out)
	}
	b, _ := os.ReadFile(h2.AgentLog())
	if !strings.Contains(string(b), "repaired") {
		t.Error("the agent did not log the repair")
	}
	st, err := driver.NewControlClient(h2.ControlSock()).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, pr := range st.Problems {
		if strings.Contains(pr, "lost its interface") {
			t.Errorf("problem after the repair: %s", pr)
		}
	}
}
