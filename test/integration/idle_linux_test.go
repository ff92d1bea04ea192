package integration

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
)

// TestIdleCPU measures what idle agents cost: two hosts with ten networks
// and a container on each, then the agents' CPU time over a quiet
// stretch. It runs only when WGMESH_IDLE_CPU names that stretch (60s,
// say): it proves nothing by itself, it gives a figure to compare.
func TestIdleCPU(t *testing.T) {
	idle, err := time.ParseDuration(os.Getenv("WGMESH_IDLE_CPU"))
	if err != nil || idle <= 0 {
		t.Skip("set WGMESH_IDLE_CPU=60s to measure idle agents")
	}
	ctx, cancel := context.WithTimeout(context.Background(), idle+5*time.Minute)
	defer cancel()
	l := newLab(t, 2)
	const networks = 10
	for i := range networks {
		subnet := fmt.Sprintf("10.%d.0.0/16", 100+i)
		for _, h := range l.Hosts {
			n, err := h.Plugin().CreateNetwork(ctx, subnet)
			if err != nil {
				t.Fatal(err)
			}
			ep, err := h.Plugin().Attach(ctx, n)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := h.NewContainer(ctx, fmt.Sprintf("c%d", i), ep); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Let handshakes and claims settle.
	time.Sleep(10 * time.Second)
	before := make([]float64, len(l.Hosts))
	for i, h := range l.Hosts {
		before[i] = cpuSeconds(t, h)
	}
	time.Sleep(idle)
	for i, h := range l.Hosts {
		used := cpuSeconds(t, h) - before[i]
		t.Logf("%s: agent with %d networks used %.3f CPU s in %s idle: %.3f CPU s per minute",
			h.Name, networks, used, idle, used/idle.Minutes())
	}
}

// cpuSeconds is the user and system time of a host's agent so far.
func cpuSeconds(t *testing.T, h *lab.Host) float64 {
	t.Helper()
	pid := h.AgentPID()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil || pid == 0 {
		t.Fatalf("agent of %s: %v", h.Name, err)
	}
	// Fields after the command name, which is in parentheses: state is
	// field 3, utime 14 and stime 15.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) / userHZ
}

// userHZ is the unit of /proc/PID/stat's times: 100 on every Linux
// architecture Go supports (sysconf(_SC_CLK_TCK) needs cgo).
const userHZ = 100
