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

// engineVersion is what the engine under test says it is.
var engineVersion lab.EngineVersion

// suiteStart is when the suite began: what is older in machine-wide
// directories is not this suite's.
var suiteStart time.Time

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("e2e: skipped, needs root")
		return
	}
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	suiteStart = time.Now()
	dir, err := os.MkdirTemp("", "wgmesh-e2e-")
	if err != nil {
		fmt.Println(err)
		return 1
	}
	if os.Getenv("WGMESH_E2E_KEEP") == "" {
		defer os.RemoveAll(dir)
	} else {
		fmt.Println("e2e: keeping", dir)
	}
	binary = filepath.Join(dir, "wgmesh")
	build := exec.Command("go", "build", "-trimpath", "-o", binary, "github.com/wgmesh/wgmesh/cmd/wgmesh")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Printf("e2e: building wgmesh: %v\n%s", err, out)
		return 1
	}
	engine, err := engineFromEnv()
	if err != nil {
		fmt.Println("e2e:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	theLab, err = lab.New(ctx, lab.Config{Hosts: 3, Binary: binary, Docker: true, Engine: engine, Dir: filepath.Join(dir, "lab"), Log: os.Stdout})
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
	v, err := theLab.Hosts[0].EngineVersion(ctx)
	if err != nil {
		fmt.Println("e2e: wrong engine:", err)
		return 1
	}
	engineVersion = v
	fmt.Printf("e2e: engine %s: %s\n", engine.Label, v)
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

// engineFromEnv is the engine WGMESH_E2E_ENGINE names: "20.10" (the
// default) is Debian's docker.io; "29" is Docker Engine 29 as
// .ci/engine29.sh builds it, in WGMESH_E2E_ENGINE_DIR.
func engineFromEnv() (lab.Engine, error) {
	switch label := os.Getenv("WGMESH_E2E_ENGINE"); label {
	case "", "20.10":
		return lab.DebianEngine(), nil
	case "29":
		dir := os.Getenv("WGMESH_E2E_ENGINE_DIR")
		if dir == "" {
			return lab.Engine{}, fmt.Errorf("WGMESH_E2E_ENGINE=29 needs WGMESH_E2E_ENGINE_DIR, the directory .ci/engine29.sh prints")
		}
		return lab.DirEngine(label, dir), nil
	default:
		return lab.Engine{}, fmt.Errorf("WGMESH_E2E_ENGINE=%q: want 20.10 or 29", label)
	}
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
