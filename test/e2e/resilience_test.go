//go:build e2e

package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/driver/dataplane"
	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// These tests disrupt the lab: they restart agents and engines, crash and
// partition hosts, and always leave it whole again. They run after the
// tests of e2e_test.go.

// TestAgentRestart: with a steady ping running between two hosts, the
// agent of one restarts, cleanly and then killed. Containers keep their
// addresses and connectivity comes back by itself, without restarting
// any container or Docker.
func TestAgentRestart(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	network(t, "ar", "10.81.0.0/16", nil, h1, h2)
	ip1 := container(t, h1, "ar1", "ar", nil)
	container(t, h2, "ar2", "ar", nil)
	ping(t, h2, "ar2", ip1)

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		p := startPing(t, h2, "ar2", ip1, 50*time.Millisecond, 200)
		time.Sleep(2 * time.Second)
		stopped := time.Now()
		h1.StopAgent(sig)
		if err := h1.StartAgent(ctx); err != nil {
			t.Fatal(err)
		}
		up := time.Since(stopped)
		r := p.wait(t)
		t.Logf("agent restart with %v: agent back after %s; %s", sig, up.Round(time.Millisecond), r)
		if r.Received < r.Sent-100 {
			t.Errorf("restart with %v lost %s", sig, r)
		}
		ping(t, h2, "ar2", ip1)
		if got, err := h1.ContainerIP(ctx, "ar1", "ar"); err != nil || got != ip1 {
			t.Fatalf("container address changed across the restart: %s -> %s (%v)", ip1, got, err)
		}
	}
}

// TestDockerRestart: dockerd restarts on one host. Docker does not replay
// CreateNetwork, yet the network is still there, and --restart=always
// containers come back with cross-host connectivity.
func TestDockerRestart(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	network(t, "dr", "10.82.0.0/16", nil, h1, h2)
	container(t, h1, "dr1", "dr", []string{"--restart=always"})
	ip2 := container(t, h2, "dr2", "dr", nil)
	ping(t, h1, "dr1", ip2)

	h1.StopDocker(syscall.SIGTERM)
	start := time.Now()
	if err := h1.StartDocker(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := h1.Docker(ctx, "network", "inspect", "dr"); err != nil {
		t.Fatalf("network gone after the engine restart: %v", err)
	}
	poll.Eventually(t, 60*time.Second, "dr1 restarted and reaching h2", func() error {
		_, err := h1.Docker(ctx, "exec", "dr1", "ping", "-c", "1", "-W", "1", ip2)
		return err
	})
	t.Logf("engine restart: --restart=always container reached the other host %s after dockerd was back",
		time.Since(start).Round(time.Millisecond))
	// The plugin still answers for the network: a new container works.
	ip3 := container(t, h1, "dr3", "dr", nil)
	ping(t, h2, "dr2", ip3)
}

// TestHostCrash: one host's agent, engine and containers are killed at
// once. Its peers notice within gossip's failure timeouts, stop sending to
// it and report it failed; when it comes back, everything reconverges.
func TestHostCrash(t *testing.T) {
	ctx := testCtx(t)
	h1, h3 := theLab.Hosts[0], theLab.Hosts[2]
	network(t, "hc", "10.83.0.0/16", nil)
	container(t, h1, "hc1", "hc", nil)
	ip3 := container(t, h3, "hc3", "hc", []string{"--restart=always"})
	ping(t, h1, "hc1", ip3)

	h3.Crash()
	crashed := time.Now()
	var detected time.Duration
	poll.Eventually(t, 60*time.Second, "h3 dead and no peer of h1's", func() error {
		st := status(t, h1)
		if m := member(st, h3.Name); m == nil || m.State != mesh.Dead {
			return fmt.Errorf("h1 sees %s as %v", h3.Name, m)
		}
		for _, n := range st.Networks {
			for _, p := range n.Peers {
				if p.Node == h3.Name {
					return fmt.Errorf("%s is still a WireGuard peer of %s", h3.Name, n.Subnet)
				}
			}
		}
		detected = time.Since(crashed)
		return nil
	})
	out, err := h1.Wgmesh(ctx, "status")
	if err == nil || !strings.Contains(out, "node h3") {
		t.Fatalf("status does not report the failed host as a problem (err %v):\n%s", err, out)
	}
	t.Logf("host crash: peers declared it failed and dropped it as a WireGuard peer after %s", detected.Round(100*time.Millisecond))

	// The agent first, as its systemd unit orders it: Docker gives up on
	// a --restart=always container whose network plugin is not there.
	back := time.Now()
	if err := h3.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h3.StartDocker(ctx); err != nil {
		t.Fatal(err)
	}
	var ip3b string
	poll.Eventually(t, 90*time.Second, "hc3 restarted and reachable from h1", func() error {
		var err error
		if ip3b, err = h3.ContainerIP(ctx, "hc3", "hc"); err != nil {
			return err
		}
		_, err = h1.Docker(ctx, "exec", "hc1", "ping", "-c", "1", "-W", "1", ip3b)
		return err
	})
	t.Logf("host return: reconverged (container restarted by Docker, reachable from h1) %s after starting dockerd and the agent",
		time.Since(back).Round(100*time.Millisecond))
	poll.Eventually(t, 30*time.Second, "h1 healthy", func() error {
		if st := status(t, h1); !st.Healthy {
			return fmt.Errorf("h1 unhealthy: %v", st.Problems)
		}
		return nil
	})
}

func member(st *driver.Status, name string) *driver.MemberStatus {
	for i := range st.Members {
		if st.Members[i].Name == name {
			return &st.Members[i]
		}
	}
	return nil
}

// TestPartitionAndHeal: the underlay between {h1,h2} and {h3} is cut.
// Containers start on both sides, from blocks each side owns; the
// minority side cannot claim new space. After the heal, every container
// reaches every other and no address is held twice.
func TestPartitionAndHeal(t *testing.T) {
	ctx := testCtx(t)
	h1, h2, h3 := theLab.Hosts[0], theLab.Hosts[1], theLab.Hosts[2]
	network(t, "ph", "10.84.0.0/16", nil)
	container(t, h1, "ph1", "ph", nil)
	container(t, h3, "ph3", "ph", nil)

	if err := h3.Cut(ctx, h1, h2); err != nil {
		t.Fatal(err)
	}
	healed := false
	heal := func() {
		if !healed {
			healed = true
			if err := h3.Heal(ctx); err != nil {
				t.Error(err)
			}
		}
	}
	t.Cleanup(heal)
	cut := time.Now()
	poll.Eventually(t, 60*time.Second, "each side seeing the other failed", func() error {
		if m := member(status(t, h1), h3.Name); m == nil || m.State.Reachable() {
			return fmt.Errorf("h1 still sees h3 as %v", m)
		}
		if m := member(status(t, h3), h1.Name); m == nil || m.State.Reachable() {
			return fmt.Errorf("h3 still sees h1 as %v", m)
		}
		return nil
	})
	t.Logf("partition: both sides saw the other as failed after %s", time.Since(cut).Round(100*time.Millisecond))

	// Both sides start containers, from the blocks they own.
	ips := map[string]string{}
	ips["ph1b"] = container(t, h1, "ph1b", "ph", nil)
	ips["ph2b"] = container(t, h2, "ph2b", "ph", nil)
	ips["ph3b"] = container(t, h3, "ph3b", "ph", nil)
	// The minority cannot claim address space for a new network.
	out, err := h3.Docker(ctx, "network", "create", "-d", "wgmesh", "--ipam-driver", "wgmesh", "--subnet", "10.85.0.0/16", "minority")
	if err == nil || !strings.Contains(out, "no quorum") {
		t.Fatalf("the minority side created a network: %v\n%s", err, out)
	}
	// The majority can.
	network(t, "majority", "10.86.0.0/16", nil, h1, h2)

	heal()
	healedAt := time.Now()
	for _, name := range []string{"ph1", "ph3"} {
		h := h1
		if name == "ph3" {
			h = h3
		}
		ip, err := h.ContainerIP(ctx, name, "ph")
		if err != nil {
			t.Fatal(err)
		}
		ips[name] = ip
	}
	seen := map[string]string{}
	for name, ip := range ips {
		if other, dup := seen[ip]; dup {
			t.Fatalf("address %s given to both %s and %s", ip, other, name)
		}
		seen[ip] = name
	}
	poll.Eventually(t, 60*time.Second, "every container reaching the others", func() error {
		for _, target := range []string{"ph1b", "ph2b"} {
			if _, err := h3.Docker(ctx, "exec", "ph3b", "ping", "-c", "1", "-W", "1", ips[target]); err != nil {
				return fmt.Errorf("h3 cannot reach %s yet", target)
			}
		}
		_, err := h1.Docker(ctx, "exec", "ph1b", "ping", "-c", "1", "-W", "1", ips["ph3b"])
		return err
	})
	t.Logf("heal: all containers reached each other %s after the heal", time.Since(healedAt).Round(100*time.Millisecond))
	for _, h := range theLab.Hosts {
		for _, p := range status(t, h).Problems {
			if strings.Contains(p, "conflict") {
				t.Errorf("%s reports %s", h.Name, p)
			}
		}
	}
}

// TestKeyRotation: the cluster key rotates in three steps, and a node's
// WireGuard key is rotated, while a steady ping runs.
func TestKeyRotation(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	network(t, "kr", "10.87.0.0/16", nil, h1, h2)
	container(t, h1, "kr1", "kr", nil)
	ip2 := container(t, h2, "kr2", "kr", nil)
	ping(t, h1, "kr1", ip2)

	old, err := os.ReadFile(theLab.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx, binary, "keygen").Output()
	if err != nil {
		t.Fatal(err)
	}
	newKey := string(out)
	retiredSecrets = append(retiredSecrets, strings.TrimSpace(string(old)))
	p := startPing(t, h1, "kr1", ip2, 50*time.Millisecond, 240)
	for _, content := range []string{string(old) + newKey, newKey + string(old), newKey} {
		if err := os.WriteFile(theLab.KeyFile, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		// Agents poll the file every 2 s; let all of them pick it up.
		time.Sleep(3 * time.Second)
		for _, h := range theLab.Hosts {
			for _, m := range status(t, h).Members {
				if !m.Self && m.State != mesh.Alive {
					t.Fatalf("during rotation %s sees %s as %s", h.Name, m.Name, m.State)
				}
			}
		}
	}
	r := p.wait(t)
	t.Logf("cluster key rotation: %s", r)
	if r.Received != r.Sent {
		t.Errorf("cluster key rotation disturbed traffic: %s", r)
	}

	before := status(t, h1).Node.PublicKey
	p = startPing(t, h1, "kr1", ip2, 50*time.Millisecond, 120)
	time.Sleep(time.Second)
	if _, err := h1.Wgmesh(ctx, "rotate-keys"); err != nil {
		t.Fatal(err)
	}
	r = p.wait(t)
	t.Logf("WireGuard key rotation: %s", r)
	if after := status(t, h1).Node.PublicKey; after == before {
		t.Fatal("public key unchanged after rotate-keys")
	}
	poll.Eventually(t, 10*time.Second, "h1's new key on h2", func() error {
		for _, n := range status(t, h2).Networks {
			for _, pr := range n.Peers {
				if pr.Node == h1.Name && pr.PublicKey != status(t, h1).Node.PublicKey {
					return fmt.Errorf("h2 still has h1's old key")
				}
			}
		}
		return nil
	})
	ping(t, h1, "kr1", ip2)
}

// TestForgetDeadHost: a crashed host's address blocks stay reserved;
// `wgmesh forget` is refused while the host is alive, and once it has
// failed it frees them. A replacement host then joins afresh.
func TestForgetDeadHost(t *testing.T) {
	ctx := testCtx(t)
	h1, h3 := theLab.Hosts[0], theLab.Hosts[2]
	// Not network(): the replacement host has no such network to remove.
	if err := theLab.CreateNetwork(ctx, "fg", "10.88.0.0/16", nil, h1, h3); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = h1.Docker(context.Background(), "rm", "-f", "fg-reuse")
		if _, err := h1.Docker(context.Background(), "network", "rm", "fg"); err != nil {
			t.Errorf("removing fg: %v", err)
		}
	})
	ip3, err := h3.RunContainer(ctx, "fg3", "fg", nil)
	if err != nil {
		t.Fatal(err)
	}

	if out, err := h1.Wgmesh(ctx, "forget", h3.Name); err == nil || !strings.Contains(out, "alive") {
		t.Fatalf("forgetting a live host: %v\n%s", err, out)
	}
	h3.Crash()
	poll.Eventually(t, 60*time.Second, "h3 dead on h1", func() error {
		if m := member(status(t, h1), h3.Name); m == nil || m.State != mesh.Dead {
			return fmt.Errorf("h3 is %v", m)
		}
		return nil
	})
	// Its block is still reserved: an address in it cannot be taken.
	if out, err := h1.Docker(ctx, "run", "-d", "--name", "fg-steal", "--network", "fg", "--ip", ip3, lab.Image, "sleep", "60"); err == nil {
		t.Fatalf("took an address of a failed host's block:\n%s", out)
	}
	_, _ = h1.Docker(ctx, "rm", "-f", "fg-steal")
	if out, err := h1.Wgmesh(ctx, "forget", h3.Name); err != nil {
		t.Fatalf("forget: %v\n%s", err, out)
	}
	if m := member(status(t, h1), h3.Name); m != nil {
		t.Fatalf("forgotten host still listed: %+v", m)
	}
	// Now the space is free for the cluster.
	if _, err := h1.RunContainer(ctx, "fg-reuse", "fg", []string{"--ip", ip3}); err != nil {
		t.Fatalf("reusing a forgotten host's address: %v", err)
	}

	// A replacement host with a fresh identity joins under the same name.
	replaceHost(t, h3)
	poll.Eventually(t, 60*time.Second, "the replacement h3 alive on h1", func() error {
		if m := member(status(t, h1), h3.Name); m == nil || m.State != mesh.Alive {
			return fmt.Errorf("replacement h3 is %v on h1", m)
		}
		return nil
	})
}

// replaceHost brings a crashed host back as a new machine would come up:
// no wgmesh state, an empty Docker.
func replaceHost(t *testing.T, h *lab.Host) {
	t.Helper()
	ctx := testCtx(t)
	for _, f := range []string{"private.key", "identity.key"} {
		if b, err := os.ReadFile(filepath.Join(h.Dir, "state", f)); err == nil {
			retiredSecrets = append(retiredSecrets, strings.TrimSpace(string(b)))
		}
	}
	for _, d := range []string{"state", "data", "exec"} {
		if err := os.RemoveAll(filepath.Join(h.Dir, d)); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(h.Dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.StartDocker(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.LoadImage(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestSecretsNeverLeak: no private key, identity key or cluster key
// (current or retired) appears in any log, status output or error of the
// whole run; key files and the control socket are private.
func TestSecretsNeverLeak(t *testing.T) {
	ctx := testCtx(t)
	var secrets []string
	keys, err := os.ReadFile(theLab.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	secrets = append(secrets, strings.Fields(string(keys))...)
	secrets = append(secrets, retiredSecrets...)
	var outputs []string
	for _, h := range theLab.Hosts {
		key := filepath.Join(h.Dir, "state", "private.key")
		identity := filepath.Join(h.Dir, "state", "identity.key")
		for _, f := range []string{key, identity} {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			secrets = append(secrets, strings.TrimSpace(string(b)))
		}
		for path, want := range map[string]os.FileMode{key: 0o600, identity: 0o600, h.ControlSock(): 0o600, filepath.Join(h.Dir, "state"): 0o700} {
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode().Perm() != want {
				t.Errorf("%s has mode %#o, want %#o", path, st.Mode().Perm(), want)
			}
		}
		for _, f := range []string{h.AgentLog(), h.DockerLog()} {
			b, _ := os.ReadFile(f)
			outputs = append(outputs, string(b))
		}
		for _, args := range [][]string{{"status"}, {"status", "--json"}, {"forget", "nosuchnode"}} {
			out, _ := h.Wgmesh(ctx, args...)
			outputs = append(outputs, out)
		}
	}
	for _, s := range secrets {
		if len(s) < 16 {
			t.Fatalf("implausible secret %q", s)
		}
		for i, out := range outputs {
			if strings.Contains(out, s) {
				t.Errorf("a secret appears in output %d", i)
			}
		}
	}
	t.Logf("checked %d secrets against %d logs and outputs (%d bytes)", len(secrets), len(outputs), totalLen(outputs))
}

func totalLen(ss []string) int {
	n := 0
	for _, s := range ss {
		n += len(s)
	}
	return n
}

// retiredSecrets are keys rotated or wiped out during the run.
var retiredSecrets []string

// TestNoLeaksAfterStop runs last: with every network of the run removed,
// agents that stop leave no namespace, mount, link, TUN or socket behind.
func TestNoLeaksAfterStop(t *testing.T) {
	ctx := testCtx(t)
	for _, h := range theLab.Hosts {
		if st := status(t, h); len(st.Networks) != 0 {
			t.Fatalf("%s still has networks: %+v", h.Name, st.Networks)
		}
	}
	for _, h := range theLab.Hosts {
		h.StopAgent(syscall.SIGTERM)
	}
	t.Cleanup(func() {
		if err := theLab.StartAgents(context.Background()); err != nil {
			t.Error(err)
		}
	})
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range theLab.Hosts {
		run := filepath.Join(h.Dir, "run")
		if strings.Contains(string(mounts), run) {
			t.Errorf("%s: mounts under %s left", h.Name, run)
		}
		for _, sock := range []string{h.ControlSock(), filepath.Join(h.PluginDir(), "wgmesh.sock")} {
			if _, err := os.Stat(sock); err == nil {
				t.Errorf("%s: socket %s left", h.Name, sock)
			}
		}
		out, err := h.Exec(ctx, "ip", "-o", "link")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "wgm") || strings.Contains(line, "wgh") || strings.Contains(line, "wgc") || strings.Contains(line, "tun") {
				t.Errorf("%s: link left: %s", h.Name, line)
			}
		}
		out, err = h.Exec(ctx, "ip", "-o", "route")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(out, "10.") {
			t.Errorf("%s: routes into wgmesh subnets left in the host:\n%s", h.Name, out)
		}
	}
	if err := checkNoLeftovers(ctx, theLab.Hosts...); err != nil {
		t.Error(err)
	}
	if socks := staleUAPISockets(suiteStart); len(socks) > 0 {
		t.Errorf("WireGuard UAPI sockets left: %v", socks)
	}
}

// staleUAPISockets lists the WireGuard UAPI sockets of this lab's
// networks made since the suite started that nothing listens on. The
// directory is the machine's, not the lab's: another lab running at the
// same time (the e2e suite on the other engine, a benchmark) has sockets
// there, live or, while it restarts an agent, dead, and one killed before
// this suite started may have left dead ones. With this lab's agents
// stopped, a socket of theirs that is left behind is one that refuses
// connections.
func staleUAPISockets(since time.Time) []string {
	var socks []string
	for _, id := range theLab.NetworkIDs() {
		socks = append(socks, filepath.Join("/var/run/wireguard", dataplane.WireGuardName(id)+".sock"))
	}
	var stale []string
	for _, s := range socks {
		if fi, err := os.Lstat(s); err != nil || fi.ModTime().Before(since) {
			continue
		}
		c, err := net.DialTimeout("unix", s, time.Second)
		if err == nil {
			c.Close()
			continue
		}
		if errors.Is(err, syscall.ECONNREFUSED) {
			stale = append(stale, s)
		}
	}
	return stale
}
