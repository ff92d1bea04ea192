//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

const pluginName = "wgmesh:latest"

// installPlugin builds the managed plugin with `make plugin` in the
// host's engine and configures it for the lab: its own state and config
// directories, the host's Docker socket, and the other plugin host as seed.
func installPlugin(t *testing.T, h, seed *lab.Host) {
	t.Helper()
	ctx := testCtx(t)
	make := exec.CommandContext(ctx, "make", "-C", "../..", "plugin",
		"DOCKER="+h.DockerCommand(), "PLUGIN="+pluginName)
	if out, err := make.CombinedOutput(); err != nil {
		t.Fatalf("make plugin on %s: %v\n%s", h.Name, err, out)
	}
	state, config := filepath.Join(h.Dir, "plugin-state"), filepath.Join(h.Dir, "plugin-config")
	for _, d := range []string{state, config} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// As docs/var-lib-wgmesh.mount does on a host: the state directory is
	// a shared mount point, so the network namespaces the plugin pins
	// there reach the host and outlive the plugin.
	if out, err := h.InDockerMountNS(ctx, "sh", "-c", "mount --bind "+state+" "+state+" && mount --make-rshared "+state); err != nil {
		t.Fatalf("making %s a shared mount: %v\n%s", state, err, out)
	}
	t.Cleanup(func() { _, _ = h.InDockerMountNS(context.Background(), "umount", "-l", state) })
	key, err := os.ReadFile(theLab.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(config, "cluster.key"), key, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := h.Docker(ctx, "plugin", "set", pluginName,
		"WGMESH_NODE_NAME=p"+h.Name[1:], "WGMESH_ADVERTISE_ADDR="+h.Addr.String(), "WGMESH_JOIN="+seed.Addr.String(),
		"WGMESH_LOG_LEVEL=debug", "state.source="+state, "config.source="+config, "docker.source="+h.DockerSock()); err != nil {
		t.Fatalf("plugin set on %s: %v\n%s", h.Name, err, out)
	}
	if out, err := h.Docker(ctx, "plugin", "enable", pluginName); err != nil {
		t.Fatalf("plugin enable on %s: %v\n%s", h.Name, err, out)
	}
}

// pluginControl is the control socket of the host's managed plugin: in
// its state directory, on the host.
func pluginControl(t *testing.T, h *lab.Host) *driver.ControlClient {
	t.Helper()
	return driver.NewControlClient(filepath.Join(h.Dir, "plugin-state", "run", "control.sock"))
}

// TestManagedPlugin runs the cross-host scenario with wgmesh installed as
// a managed (v2) Docker plugin instead of an agent: network created once
// and synced, containers on both hosts, then `docker plugin disable -f` /
// `enable` and a dockerd restart with the plugin enabled.
func TestManagedPlugin(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	// The plugins form a cluster of their own: stop the agents for the
	// duration of the test.
	for _, h := range theLab.Hosts {
		h.StopAgent(syscall.SIGTERM)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		for _, h := range []*lab.Host{h1, h2} {
			out, _ := h.Docker(ctx, "ps", "-aq")
			if ids := strings.Fields(out); len(ids) > 0 {
				_, _ = h.Docker(ctx, append([]string{"rm", "-f"}, ids...)...)
			}
			_, _ = h.Docker(ctx, "network", "rm", "mp")
		}
		for _, h := range []*lab.Host{h1, h2} {
			_, _ = h.Docker(ctx, "plugin", "disable", "-f", pluginName)
			if out, err := h.Docker(ctx, "plugin", "rm", "-f", pluginName); err != nil {
				t.Errorf("removing the plugin from %s: %v\n%s", h.Name, err, out)
			}
		}
		if err := theLab.StartAgents(ctx); err != nil {
			t.Error(err)
		}
	})
	installPlugin(t, h1, h2)
	installPlugin(t, h2, h1)
	poll.Eventually(t, 60*time.Second, "both plugins seeing each other alive", func() error {
		for _, h := range []*lab.Host{h1, h2} {
			st, err := pluginControl(t, h).Status(ctx)
			if err != nil {
				return err
			}
			if len(st.Members) != 2 || !allAliveStatus(st) {
				return fmt.Errorf("%s's plugin sees %+v", h.Name, st.Members)
			}
		}
		return nil
	})

	if _, err := h1.Docker(ctx, "network", "create", "-d", pluginName, "--ipam-driver", pluginName, "--subnet", "10.96.0.0/16", "mp"); err != nil {
		t.Fatal(err)
	}
	poll.Eventually(t, 60*time.Second, "network mp on h2", func() error {
		_, err := h2.Docker(ctx, "network", "inspect", "mp")
		return err
	})
	ip1, err := h1.RunContainer(ctx, "mp1", "mp", []string{"--restart=always"})
	if err != nil {
		t.Fatal(err)
	}
	ip2, err := h2.RunContainer(ctx, "mp2", "mp", nil)
	if err != nil {
		t.Fatal(err)
	}
	ping(t, h1, "mp1", ip2)
	ping(t, h2, "mp2", ip1)

	// disable -f stops the plugin under a running container; enabled
	// again, it finds its network namespaces pinned in its state directory
	// and the container's network comes back without restarting it.
	if out, err := h1.Docker(ctx, "plugin", "disable", "-f", pluginName); err != nil {
		t.Fatalf("plugin disable: %v\n%s", err, out)
	}
	if out, err := h1.Docker(ctx, "plugin", "enable", pluginName); err != nil {
		t.Fatalf("plugin enable: %v\n%s", err, out)
	}
	start := time.Now()
	poll.Eventually(t, 60*time.Second, "mp1 reachable after the plugin's enable", func() error {
		_, err := h2.Docker(ctx, "exec", "mp2", "ping", "-c", "1", "-W", "1", ip1)
		return err
	})
	t.Logf("plugin disable/enable: traffic back %s after enable, container not restarted", time.Since(start).Round(100*time.Millisecond))

	// dockerd restart with the plugin enabled: the plugin and the
	// --restart=always container come back, with the network.
	h1.StopDocker(syscall.SIGTERM)
	if err := h1.StartDocker(ctx); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	poll.Eventually(t, 90*time.Second, "mp1 restarted and reachable", func() error {
		ip, err := h1.ContainerIP(ctx, "mp1", "mp")
		if err != nil {
			return err
		}
		_, err = h2.Docker(ctx, "exec", "mp2", "ping", "-c", "1", "-W", "1", ip)
		return err
	})
	t.Logf("dockerd restart with the plugin: container reachable %s after dockerd was back", time.Since(start).Round(100*time.Millisecond))
	if _, err := h1.Docker(ctx, "network", "inspect", "mp"); err != nil {
		t.Fatal("network gone after the restart")
	}
}

func allAliveStatus(st *driver.Status) bool {
	for _, m := range st.Members {
		if !m.Self && m.State.String() != "alive" {
			return false
		}
	}
	return true
}
