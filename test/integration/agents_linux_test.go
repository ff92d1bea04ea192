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
)

var binary string

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("integration: skipped, needs root")
		return
	}
	dir, err := os.MkdirTemp("", "wgmesh-integration-")
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "wgmesh")
	build := exec.Command("go", "build", "-trimpath", "-o", binary, "github.com/wgmesh/wgmesh/cmd/wgmesh")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Printf("building wgmesh: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func newLab(t *testing.T, hosts int) *lab.Lab {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l, err := lab.New(ctx, lab.Config{Hosts: hosts, Binary: binary, Dir: filepath.Join(t.TempDir(), "lab")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
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
// stream between stand-in containers over userspace WireGuard.
func TestAgentsFormAClusterAndCarryTraffic(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	l := newLab(t, 3)

	// The cluster forms: every agent sees three alive members.
	deadline := time.Now().Add(30 * time.Second)
	for _, h := range l.Hosts {
		for {
			st, err := driver.NewControlClient(h.ControlSock()).Status(ctx)
			if err == nil && len(st.Members) == 3 && allAlive(st) {
				if st.Node.WGMode != "userspace" && st.Node.WGMode != "kernel" {
					t.Fatalf("%s reports WireGuard mode %q", h.Name, st.Node.WGMode)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s did not see the cluster: %+v %v", h.Name, st, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}

	var ctrs []*lab.Container
	for _, h := range l.Hosts {
		p := h.Plugin()
		n, err := p.CreateNetwork(ctx, "10.80.0.0/16")
		if err != nil {
			t.Fatal(err)
		}
		ep, err := p.Attach(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		c, err := h.NewContainer(ctx, "c", ep)
		if err != nil {
			t.Fatal(err)
		}
		ctrs = append(ctrs, c)
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
		t.Logf("TCP over userspace WireGuard:\n%s", tail(out, 4))
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
