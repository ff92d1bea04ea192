//go:build e2e

package e2e

// The engine restarting under wgmesh: with live-restore on and off, and
// with the plugin not there yet when it starts.

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// restartDocker stops a host's dockerd (SIGTERM: containers stop unless
// live-restore keeps them) and starts it with extra flags.
func restartDocker(t *testing.T, h *lab.Host, extra ...string) {
	t.Helper()
	h.StopDocker(syscall.SIGTERM)
	if err := h.StartDocker(testCtx(t), extra...); err != nil {
		t.Fatal(err)
	}
}

// containerPID is the PID of a running container's first process.
func containerPID(t *testing.T, h *lab.Host, ctr string) int {
	t.Helper()
	pid, err := h.ContainerPID(testCtx(t), ctr)
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// TestLiveRestore: dockerd restarts with live-restore off, then on.
// Off, a --restart=always container stops with dockerd and comes back
// with cross-host connectivity. On, running containers keep running
// through the restart, and keep their connectivity during and after it;
// Docker and the plugin then go on working for them and for new ones.
func TestLiveRestore(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	// The lab's dockerd again at the end, once the containers and the
	// network are gone (cleanups run last registered first).
	t.Cleanup(func() { restartDocker(t, h1) })
	network(t, "lr", "10.108.0.0/16", nil, h1, h2)
	// --stop-timeout: the lab's containers sleep as PID 1, which ignores
	// SIGTERM; each stop would take 10 s.
	container(t, h1, "lr1", "lr", []string{"--restart=always", "--stop-timeout=1"})
	ip2 := container(t, h2, "lr2", "lr", nil)
	ping(t, h1, "lr1", ip2)

	// Off: the container stops with dockerd and Docker starts it again.
	before := containerPID(t, h1, "lr1")
	restartDocker(t, h1)
	back := time.Now()
	var ip1 string
	poll.Eventually(t, 60*time.Second, "lr1 restarted and reachable from h2", func() error {
		var err error
		if ip1, err = h1.ContainerIP(ctx, "lr1", "lr"); err != nil {
			return err
		}
		_, err = h2.Docker(ctx, "exec", "lr2", "ping", "-c", "1", "-W", "1", ip1)
		return err
	})
	t.Logf("live-restore off: --restart=always container restarted, reachable from h2 %s after dockerd was back",
		time.Since(back).Round(100*time.Millisecond))
	if pid := containerPID(t, h1, "lr1"); pid == before {
		t.Fatalf("live-restore off: the container's process %d survived the restart", pid)
	}

	// On. This restart still stops the containers (the dockerd stopping
	// has no live-restore); the next one keeps them.
	restartDocker(t, h1, "--live-restore")
	poll.Eventually(t, 60*time.Second, "lr1 restarted and reaching h2", func() error {
		var err error
		if ip1, err = h1.ContainerIP(ctx, "lr1", "lr"); err != nil {
			return err
		}
		_, err = h1.Docker(ctx, "exec", "lr1", "ping", "-c", "1", "-W", "1", ip2)
		return err
	})
	before = containerPID(t, h1, "lr1")
	// 20 s of pings: dockerd's restart takes a few seconds, longer on a
	// loaded machine, and the ping must outlast it to see the whole of it.
	const pings = 400
	p := startPing(t, h1, "lr1", ip2, 50*time.Millisecond, pings)
	time.Sleep(time.Second)
	start := time.Now()
	h1.StopDocker(syscall.SIGTERM)
	if err := syscall.Kill(before, 0); err != nil {
		t.Fatalf("live-restore on: the container's process is gone with dockerd: %v", err)
	}
	if err := h1.StartDocker(ctx, "--live-restore"); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	r := p.wait(t)
	t.Logf("live-restore on: dockerd down and back in %s; steady ping lr1 -> h2 at 50 ms: %s", took.Round(100*time.Millisecond), r)
	if ran := pings*50*time.Millisecond - 2*time.Second; took > ran {
		t.Errorf("the restart took %s, longer than the steady ping ran", took)
	}
	if r.Received != r.Sent {
		t.Errorf("live-restore on: cross-host traffic lost across the restart: %s", r)
	}
	if pid := containerPID(t, h1, "lr1"); pid != before {
		t.Fatalf("live-restore on: the container was restarted (PID %d, was %d)", pid, before)
	}
	if got, err := h1.ContainerIP(ctx, "lr1", "lr"); err != nil || got != ip1 {
		t.Fatalf("live-restore on: the container's address changed: %s -> %s (%v)", ip1, got, err)
	}
	ping(t, h1, "lr1", ip2)
	ping(t, h2, "lr2", ip1)
	// Docker and the plugin go on: a new container, and one removed.
	ip3 := container(t, h1, "lr3", "lr", nil)
	ping(t, h2, "lr2", ip3)
	if out, err := h1.Docker(ctx, "rm", "-f", "lr3"); err != nil {
		t.Fatalf("removing a container after the restart: %v\n%s", err, out)
	}
	poll.Eventually(t, 10*time.Second, "lr3's endpoint gone from h1's agent", func() error {
		for _, n := range status(t, h1).Networks {
			if n.Subnet.String() == "10.108.0.0/16" && len(n.Endpoints) != 1 {
				return fmt.Errorf("h1's agent has %d endpoints on lr, want 1 (lr1)", len(n.Endpoints))
			}
		}
		return nil
	})
}

// TestPluginLate: the agent is stopped, dockerd restarted, and the agent
// comes up some seconds after dockerd, as after a crash of the agent, or
// at boot without the systemd unit's ordering. Each time dockerd needs a
// plugin whose socket is not there, it looks again after 1, 2, 4 and 8 s
// and gives up 15 s after the first try (pkg/plugins loadWithRetry, the
// same in 20.10 and 29); at start it does so for the network's IPAM, the
// container's old endpoint and its start, one after the other, and does
// not answer its API meanwhile. Within that, the network is there, the
// --restart=always container comes back with connectivity, and `docker
// run` works.
func TestPluginLate(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	t.Cleanup(func() {
		if h1.AgentPID() == 0 {
			if err := h1.StartAgent(context.Background()); err != nil {
				t.Error(err)
			}
		}
	})
	network(t, "pl", "10.109.0.0/16", nil, h1, h2)
	container(t, h1, "pl1", "pl", []string{"--restart=always", "--stop-timeout=1"})
	ip2 := container(t, h2, "pl2", "pl", nil)
	ping(t, h1, "pl1", ip2)

	const late = 5 * time.Second
	// With the agent gone, dockerd's shutdown cannot take the container
	// off the network and gives up after its shutdown timeout (15 s).
	h1.StopAgent(syscall.SIGTERM)
	h1.StopDocker(syscall.SIGTERM)
	logAt := fileSize(t, h1.DockerLog())
	start := time.Now()
	dockerUp := make(chan error, 1)
	var upAfter time.Duration
	go func() {
		err := h1.StartDocker(ctx)
		upAfter = time.Since(start)
		dockerUp <- err
	}()
	time.Sleep(late)
	if err := h1.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	agentAfter := time.Since(start)
	if err := <-dockerUp; err != nil {
		t.Fatal(err)
	}
	var ip1 string
	poll.Eventually(t, 60*time.Second, "pl1 restarted and reachable from h2", func() error {
		var err error
		if ip1, err = h1.ContainerIP(ctx, "pl1", "pl"); err != nil {
			return err
		}
		_, err = h2.Docker(ctx, "exec", "pl2", "ping", "-c", "1", "-W", "1", ip1)
		return err
	})
	t.Logf("agent up %s after dockerd started (dockerd answered after %s); --restart=always container reachable from h2 %s after dockerd started",
		agentAfter.Round(100*time.Millisecond), upAfter.Round(100*time.Millisecond), time.Since(start).Round(100*time.Millisecond))
	log := fileFrom(t, h1.DockerLog(), logAt)
	t.Logf("dockerd's log: %d failed lookups of the plugin", strings.Count(log, "Unable to locate plugin: wgmesh"))
	if _, err := h1.Docker(ctx, "network", "inspect", "pl"); err != nil {
		t.Fatalf("network gone after the restart: %v", err)
	}
	ip3 := container(t, h1, "pl3", "pl", nil)
	ping(t, h2, "pl2", ip3)
}
