// Package integration runs real wgmesh agents in separate host network
// namespaces, without Docker: the test makes Docker's plugin calls itself
// and plays the containers with namespaces of its own.
package integration

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

// Settings from the environment:
//
//	WGMESH_BINARY   a wgmesh binary to test instead of building one (make
//	                vmtest passes one: nothing compiles inside the VM)
//	WGMESH_WG_MODE  the agents' --wg-mode: auto (the default), kernel or
//	                userspace; the tests check the agents run in it
var (
	binary string
	wgMode = "auto"
)

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("integration: skipped, needs root")
		return
	}
	if v := os.Getenv("WGMESH_WG_MODE"); v != "" {
		if v != "auto" && v != "kernel" && v != "userspace" {
			fmt.Printf("integration: WGMESH_WG_MODE=%q: want auto, kernel or userspace\n", v)
			os.Exit(2)
		}
		wgMode = v
	}
	dir, err := os.MkdirTemp("", "wgmesh-integration-")
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	if binary = os.Getenv("WGMESH_BINARY"); binary == "" {
		binary = filepath.Join(dir, "wgmesh")
		build := exec.Command("go", "build", "-trimpath", "-o", binary, "github.com/wgmesh/wgmesh/cmd/wgmesh")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			fmt.Printf("building wgmesh: %v\n%s", err, out)
			os.Exit(1)
		}
	} else if _, err := os.Stat(binary); err != nil {
		fmt.Printf("integration: WGMESH_BINARY: %v\n", err)
		os.Exit(2)
	}
	fmt.Printf("integration: agents in WireGuard mode %s, binary %s\n", wgMode, binary)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func newLab(t *testing.T, hosts int) *lab.Lab {
	t.Helper()
	return newLabWith(t, lab.Config{Hosts: hosts})
}

// newLabWith builds a lab of cfg (with this test run's binary, directory
// and WireGuard mode) and starts its agents.
func newLabWith(t *testing.T, cfg lab.Config) *lab.Lab {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cfg.Binary, cfg.Dir = binary, filepath.Join(t.TempDir(), "lab")
	cfg.AgentArgs = append([]string{"--wg-mode", wgMode}, cfg.AgentArgs...)
	l, err := lab.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("WGMESH_TEST_LOG") != "" {
			for _, h := range l.Hosts {
				b, _ := os.ReadFile(h.AgentLog())
				t.Logf("agent log of %s:\n%s", h.Name, tail(string(b), 60))
			}
		}
		if err := l.Close(); err != nil {
			t.Errorf("closing the lab: %v", err)
		}
	})
	if err := l.StartAgents(ctx); err != nil {
		t.Fatal(err)
	}
	return l
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestAgentsFormAClusterAndCarryTraffic: three agents gossip their way
// into one cluster; a network created on each carries pings and a TCP
// stream between stand-in containers over WireGuard (in WGMESH_WG_MODE).
func TestAgentsFormAClusterAndCarryTraffic(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	l := newLab(t, 3)

	// The cluster forms: every agent sees three alive members.
	deadline := time.Now().Add(30 * time.Second)
	for _, h := range l.Hosts {
		var st *driver.Status
		poll.Eventually(t, time.Until(deadline), h.Name+" seeing the cluster", func() error {
			var err error
			if st, err = driver.NewControlClient(h.ControlSock()).Status(ctx); err != nil {
				return err
			}
			if len(st.Members) != 3 || !allAlive(st) {
				return fmt.Errorf("members %+v", st.Members)
			}
			return nil
		})
		checkMode(t, h.Name, st.Node.WGMode)
	}

	// The network is created on all three hosts at once, so that they
	// configure each other as WireGuard peers at the same moment. Were
	// both sides of a pair to start a handshake then, both handshakes
	// would fail and wait out WireGuard's 5 s retry; the driver lets one
	// side go first (driver/stagger.go). Each first ping tells.
	created := time.Now()
	ctrs := make([]*lab.Container, len(l.Hosts))
	errs := make(chan error, len(l.Hosts))
	for i, h := range l.Hosts {
		go func() {
			p := h.Plugin()
			n, err := p.CreateNetwork(ctx, "10.80.0.0/16")
			if err != nil {
				errs <- err
				return
			}
			ep, err := p.Attach(ctx, n)
			if err != nil {
				errs <- err
				return
			}
			ctrs[i], err = h.NewContainer(ctx, "c", ep)
			errs <- err
		}()
	}
	for range l.Hosts {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	attached := time.Since(created)
	// A pair whose simultaneous handshakes collide waits out WireGuard's
	// 5 s retry in its own first ping; the pairs' times are not summed,
	// so that a slow (loaded, emulated) machine does not add up to it.
	var slowestPair time.Duration
	for i, a := range ctrs {
		for j, b := range ctrs {
			if i != j {
				slowestPair = max(slowestPair, firstPing(ctx, t, a, b.IP))
			}
		}
	}
	t.Logf("networks created and containers attached on all hosts at once in %s; every first cross-host ping answered %s after the start, the slowest pair in %s (WireGuard %s)",
		attached.Round(time.Millisecond), time.Since(created).Round(time.Millisecond), slowestPair.Round(time.Millisecond), wgMode)
	if slowestPair >= 5*time.Second {
		t.Errorf("a first ping took %s: simultaneous handshakes failed and waited out WireGuard's 5 s retry", slowestPair)
	}
	for i, a := range ctrs {
		for j, b := range ctrs {
			if i == j {
				continue
			}
			out, err := a.Exec(ctx, "ping", "-c", "3", "-W", "3", b.IP)
			if err != nil || !strings.Contains(out, " 0% packet loss") {
				t.Fatalf("h%d -> h%d (%s): %v\n%s", i+1, j+1, b.IP, err, out)
			}
		}
	}
	// A TCP stream, through iperf3 if the machine has it.
	if _, err := exec.LookPath("iperf3"); err == nil {
		srv := exec.CommandContext(ctx, "nsenter", "--net="+ctrs[1].Path, "iperf3", "-s", "-1", "-B", ctrs[1].IP)
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
		time.Sleep(500 * time.Millisecond)
		out, err := ctrs[0].Exec(ctx, "iperf3", "-c", ctrs[1].IP, "-t", "2")
		if err != nil || !strings.Contains(out, "receiver") {
			t.Fatalf("TCP stream across hosts: %v\n%s", err, out)
		}
		t.Logf("TCP over WireGuard (%s):\n%s", wgMode, tail(out, 4))
	}

	// Each host handed out addresses from a different block.
	seen := map[string]bool{}
	for _, h := range l.Hosts {
		st, err := driver.NewControlClient(h.ControlSock()).Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Networks) != 1 || len(st.Networks[0].Blocks) != 1 || len(st.Networks[0].Peers) != 2 {
			t.Fatalf("%s: %+v", h.Name, st.Networks)
		}
		b := st.Networks[0].Blocks[0].String()
		if seen[b] {
			t.Fatalf("block %s owned twice", b)
		}
		seen[b] = true
	}
}

// checkMode fails the test unless an agent runs the WireGuard mode the
// test asked for.
func checkMode(t *testing.T, host, got string) {
	t.Helper()
	if (wgMode == "auto" && got != "userspace" && got != "kernel") || (wgMode != "auto" && got != wgMode) {
		t.Fatalf("%s reports WireGuard mode %q; WGMESH_WG_MODE is %s", host, got, wgMode)
	}
}

// firstPing pings dst from c once a 100 ms until it answers, and returns
// how long that took.
func firstPing(ctx context.Context, t *testing.T, c *lab.Container, dst string) time.Duration {
	t.Helper()
	start := time.Now()
	for range 300 {
		if _, err := c.Exec(ctx, "ping", "-n", "-c", "1", "-W", "0.1", dst); err == nil {
			return time.Since(start)
		}
	}
	t.Fatalf("%s never answered %s", dst, c.Name)
	return 0
}

func allAlive(st *driver.Status) bool {
	for _, m := range st.Members {
		if !m.Self && m.State.String() != "alive" {
			return false
		}
	}
	return true
}

// TestWrongClusterKeyCannotJoin: an agent with another cluster key stays
// outside, and the cluster never lists it.
func TestWrongClusterKeyCannotJoin(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := newLab(t, 3)
	intruder := l.Hosts[2]
	intruder.StopAgent(syscall.SIGTERM)
	other := filepath.Join(t.TempDir(), "other.key")
	key, err := exec.Command(binary, "keygen").Output()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(other, key, 0o600); err != nil {
		t.Fatal(err)
	}
	// A fresh identity with the wrong key, and a fresh log to judge it by.
	os.RemoveAll(filepath.Join(intruder.Dir, "state"))
	os.Remove(intruder.AgentLog())
	if err := intruder.StartAgent(ctx, "--node-name", "intruder", "--cluster-key-file", other); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Second)
	st, err := driver.NewControlClient(l.Hosts[0].ControlSock()).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range st.Members {
		if m.Name == "intruder" {
			t.Fatalf("the intruder got into the cluster: %+v", m)
		}
	}
	b, _ := os.ReadFile(intruder.AgentLog())
	if strings.Contains(string(b), "joined the cluster") {
		t.Fatalf("the intruder believes it joined:\n%s", tail(string(b), 20))
	}
	if !strings.Contains(string(b), "joining seeds") {
		t.Fatalf("the intruder did not even try to join, so this proves nothing:\n%s", tail(string(b), 20))
	}
}
