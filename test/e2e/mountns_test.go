//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// unitSandbox confines an agent as docs/wgmesh.service does: a mount
// namespace of its own, and the unit's capability bounding set.
func unitSandbox(t *testing.T) lab.Sandbox {
	t.Helper()
	b, err := os.ReadFile("../../docs/wgmesh.service")
	if err != nil {
		t.Fatal(err)
	}
	sb := lab.Sandbox{PrivateMountNS: true}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapabilityBoundingSet="); ok {
			sb.Capabilities = append(sb.Capabilities, strings.Fields(v)...)
		}
	}
	if len(sb.Capabilities) == 0 {
		t.Fatal("docs/wgmesh.service sets no CapabilityBoundingSet")
	}
	return sb
}

// TestAgentAsSystemdService runs h1's agent as its systemd unit runs it:
// in a private mount namespace, with the unit's capabilities only. Under
// a steady ping it restarts (stopped, then killed): containers keep their
// interfaces, since the agent pins its networks' namespaces in the
// host's mount namespace. Then an agent that pins in its own namespace
// (--host-mount-ns self, as every agent did before) stops and destroys a
// network's namespace, and with it a container's interface: the next
// agent finds the container through Docker's API and repairs it.
func TestAgentAsSystemdService(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	sb := unitSandbox(t)
	restart := func(sig syscall.Signal, extra ...string) {
		t.Helper()
		h1.StopAgent(sig)
		if err := h1.StartAgentIn(ctx, sb, extra...); err != nil {
			t.Fatal(err)
		}
	}
	// Registered first, so it runs last: the networks go first.
	t.Cleanup(func() {
		h1.StopAgent(syscall.SIGTERM)
		if err := h1.StartAgent(context.Background()); err != nil {
			t.Error(err)
		}
	})
	restart(syscall.SIGTERM)
	network(t, "sd", "10.120.0.0/16", nil, h1, h2)
	ip1 := container(t, h1, "sd1", "sd", nil)
	container(t, h2, "sd2", "sd", nil)
	ping(t, h2, "sd2", ip1)

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		p := startPing(t, h2, "sd2", ip1, 50*time.Millisecond, 200)
		time.Sleep(2 * time.Second)
		stopped := time.Now()
		restart(sig)
		up := time.Since(stopped)
		r := p.wait(t)
		t.Logf("agent restart as a systemd service (private mount namespace, %v): agent back after %s; %s",
			sig, up.Round(time.Millisecond), r)
		if r.Received < r.Sent-100 {
			t.Errorf("restart with %v lost %s", sig, r)
		}
		ping(t, h2, "sd2", ip1)
		if out, err := h1.InContainer(ctx, "sd1", "ip", "-o", "addr"); err != nil || !strings.Contains(out, ip1+"/16") {
			t.Fatalf("the container's interface did not survive the restart: %v\n%s", err, out)
		}
	}
	if st := status(t, h1); hasProblem(st, "lost its interface") {
		t.Fatalf("problems after the restarts: %q", st.Problems)
	}
	if b, _ := os.ReadFile(h1.AgentLog()); strings.Contains(string(b), "repaired") {
		t.Error("an interface needed a repair: its namespace did not survive")
	}

	// The old behaviour destroys a network's namespace; the agent
	// repairs what it took.
	restart(syscall.SIGTERM, "--host-mount-ns", "self")
	network(t, "sdr", "10.121.0.0/16", nil, h1, h2)
	ipr := container(t, h1, "sdr1", "sdr", nil)
	ipr2 := container(t, h2, "sdr2", "sdr", nil)
	ping(t, h2, "sdr2", ipr)
	var ifName string
	poll.Eventually(t, 20*time.Second, "h1's agent knowing the container's interface", func() error {
		for _, n := range status(t, h1).Networks {
			if n.Subnet.String() == "10.121.0.0/16" && len(n.Endpoints) == 1 && n.Endpoints[0].Interface != "" {
				ifName = n.Endpoints[0].Interface
				return nil
			}
		}
		return fmt.Errorf("h1 has not learnt the container's interface name")
	})
	h1.StopAgent(syscall.SIGTERM)
	poll.Eventually(t, 10*time.Second, "the container's "+ifName+" gone with the agent", func() error {
		if _, err := h1.InContainer(ctx, "sdr1", "ip", "link", "show", ifName); err == nil {
			return fmt.Errorf("%s still exists", ifName)
		}
		return nil
	})
	lost := time.Now()
	if err := h1.StartAgentIn(ctx, sb); err != nil {
		t.Fatal(err)
	}
	poll.Eventually(t, 30*time.Second, "sdr1 reachable again", func() error {
		_, err := h2.Docker(ctx, "exec", "sdr2", "ping", "-c", "1", "-W", "1", ipr)
		return err
	})
	t.Logf("a container that lost its interface (%s) with its network's namespace was reachable again %s after the agent restarted",
		ifName, time.Since(lost).Round(time.Millisecond))
	if out, err := h1.InContainer(ctx, "sdr1", "ip", "-o", "addr", "show", ifName); err != nil || !strings.Contains(out, ipr+"/16") {
		t.Fatalf("repaired interface: %v\n%s", err, out)
	}
	st := status(t, h1)
	if hasProblem(st, "lost its interface") {
		t.Errorf("problems after the repair: %q", st.Problems)
	}
	ping(t, h1, "sdr1", ipr2)
}
