//go:build e2e

// Package e2e tests wgmesh against real Docker engines: three simulated
// hosts (network namespaces), each with its own dockerd and wgmesh agent,
// on an underlay with an MTU of 1400. It needs root.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
)

// theLab is shared by the tests: starting three dockerd is what takes
// time. Each test uses networks and containers of its own and removes
// them.
var theLab *lab.Lab

// binary is the wgmesh binary under test.
var binary string

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("e2e: skipped, needs root")
		return
	}
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "wgmesh-e2e-")
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer os.RemoveAll(dir)
	binary = filepath.Join(dir, "wgmesh")
	build := exec.Command("go", "build", "-trimpath", "-o", binary, "github.com/wgmesh/wgmesh/cmd/wgmesh")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Printf("e2e: building wgmesh: %v\n%s", err, out)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	theLab, err = lab.New(ctx, lab.Config{Hosts: 3, Binary: binary, Docker: true, Dir: filepath.Join(dir, "lab"), Log: os.Stdout})
	if err != nil {
		fmt.Println("e2e:", err)
		return 1
	}
	code := 1
	defer func() {
		if code != 0 {
			dumpLogs()
		}
		if err := theLab.Close(); err != nil {
			fmt.Println("e2e: closing the lab:", err)
			code = 1
		}
	}()
	if err := theLab.StartAgents(ctx); err != nil {
		fmt.Println("e2e:", err)
		return 1
	}
	code = m.Run()
	if code == 0 {
		// Every test removed its networks: nothing of wgmesh may remain.
		if err := checkNoLeftovers(context.Background(), theLab.Hosts...); err != nil {
			fmt.Println("e2e: leftovers after all tests:", err)
			code = 1
		}
	}
	return code
}

// dumpLogs prints the tail of every agent's and dockerd's log, for a
// failed run in CI.
func dumpLogs() {
	for _, h := range theLab.Hosts {
		for _, f := range []string{h.AgentLog(), h.DockerLog()} {
			b, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
			if len(lines) > 80 {
				lines = lines[len(lines)-80:]
			}
			fmt.Printf("\n===== %s (last %d lines)\n%s\n", f, len(lines), strings.Join(lines, "\n"))
		}
	}
}

// checkNoLeftovers fails if any host has wgmesh namespaces, links, UAPI
// sockets or endpoints left.
func checkNoLeftovers(ctx context.Context, hosts ...*lab.Host) error {
	var problems []string
	for _, h := range hosts {
		entries, _ := os.ReadDir(filepath.Join(h.Dir, "run", "netns"))
		for _, e := range entries {
			problems = append(problems, fmt.Sprintf("%s: namespace %s", h.Name, e.Name()))
		}
		out, err := h.Exec(ctx, "ip", "-o", "link")
		if err != nil {
			problems = append(problems, err.Error())
		}
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) > 1 && (strings.HasPrefix(f[1], "wgm") || strings.HasPrefix(f[1], "wgc") || strings.HasPrefix(f[1], "wgh")) {
				problems = append(problems, fmt.Sprintf("%s: link %s", h.Name, f[1]))
			}
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("%s", strings.Join(problems, "; "))
	}
	return nil
}
