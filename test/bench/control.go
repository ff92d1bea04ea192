package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// FirstPing is `docker run` to the first ping that crosses to another host.
type FirstPing struct {
	MedianMs float64   `json:"median_ms"`
	P95Ms    float64   `json:"p95_ms"`
	Samples  []float64 `json:"samples_ms"`
}

// uptime reads the kernel's monotonic clock: the same for the host and
// its containers, so a container can stamp a time the host compares.
func uptime() float64 {
	b, _ := os.ReadFile("/proc/uptime")
	v, _ := strconv.ParseFloat(strings.Fields(string(b))[0], 64)
	return v
}

// firstPing starts containers one at a time on h1 and times each from the
// start of `docker run` until it first gets an answer from a container
// on h2. The container stamps that moment itself (/proc/uptime has 10 ms
// resolution), so polling adds nothing.
func (b *Bench) firstPing(ctx context.Context, l *lab.Lab) (FirstPing, error) {
	h1, h2 := l.Hosts[0], l.Hosts[1]
	var r FirstPing
	if err := l.CreateNetwork(ctx, "fpnet", "10.95.0.0/16", nil, h1, h2); err != nil {
		return r, err
	}
	defer func() {
		_, _ = h2.Docker(context.Background(), "rm", "-f", "fp-target")
		_ = l.RemoveNetwork(context.Background(), "fpnet", h1, h2)
	}()
	target, err := h2.RunContainer(ctx, "fp-target", "fpnet", nil)
	if err != nil {
		return r, err
	}
	script := fmt.Sprintf("until ping -c 1 -W 1 %s >/dev/null 2>&1; do :; done; cat /proc/uptime > /tmp/t; exec sleep 600", target)
	for i := range b.cfg.FirstPingSamples {
		name := fmt.Sprintf("fp-%d", i)
		start := uptime()
		if _, err := h1.RunContainer(ctx, name, "fpnet", nil, "sh", "-c", script); err != nil {
			return r, err
		}
		var stamp float64
		if err := poll.Every(ctx, 50*time.Millisecond, 30*time.Second, "container "+name+" reaching "+target, func() error {
			out, err := h1.Docker(ctx, "exec", name, "cat", "/tmp/t")
			if err == nil {
				stamp, _ = strconv.ParseFloat(strings.Fields(out)[0], 64)
			}
			return err
		}); err != nil {
			return r, err
		}
		_, _ = h1.Docker(ctx, "rm", "-f", name)
		r.Samples = append(r.Samples, (stamp-start)*1000)
		b.logf("first ping %d: %.0f ms", i+1, (stamp-start)*1000)
	}
	sorted := slices.Clone(r.Samples)
	slices.Sort(sorted)
	r.MedianMs, r.P95Ms = median(sorted), percentile(sorted, 0.95)
	return r, nil
}

// Convergence is how fast N agents reach full WireGuard peer sets.
type Convergence struct {
	Hosts int `json:"hosts"`
	// StartMs: from launching all agents together (each creating the
	// network and attaching an endpoint as soon as it answers, as the
	// first `docker run` on a host does, which claims the host's block)
	// until every agent has every other as a WireGuard peer with its
	// block.
	StartMs float64 `json:"start_ms"`
	// StartCPUSeconds is the CPU time all agents used from their start
	// until then: against the machine's cores it shows how much of
	// StartMs was waiting for a CPU.
	StartCPUSeconds float64 `json:"start_cpu_seconds"`
	// JoinPeersMs and JoinReachableMs: one more host starts, creates the
	// network and attaches an endpoint; until every host has it as a
	// peer, and until every host completed a WireGuard handshake with it.
	JoinPeersMs     float64 `json:"join_peers_ms"`
	JoinReachableMs float64 `json:"join_reachable_ms"`
	// RSSMiB of the agent on the first host, with a peer per other host.
	RSSMiB float64 `json:"rss_mib"`
	// IdleRSSMiB of the joining agent after it joined, before it had any
	// network.
	IdleRSSMiB float64 `json:"idle_rss_mib"`
	// GossipBytesPerSec per node, all gossip (TCP and UDP 7946, memberlist
	// probes included), measured on one host while the cluster is idle.
	GossipBytesPerSec float64 `json:"gossip_bytes_per_sec"`
}

// convergence measures a cluster of n agents plus one that joins.
func (b *Bench) convergence(ctx context.Context, n int) (Convergence, error) {
	c := Convergence{Hosts: n}
	l, err := lab.New(ctx, lab.Config{Hosts: n + 1, SeedHosts: n, Binary: b.cfg.Binary, Log: b.cfg.Log})
	if err != nil {
		return c, err
	}
	defer l.Close()
	hosts, joiner := l.Hosts[:n], l.Hosts[n]
	const subnet = "10.90.0.0/16"

	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for _, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := h.StartAgent(ctx); err != nil {
				errs <- err
				return
			}
			if err := createAndAttach(ctx, h, subnet); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return c, err
	}
	if err := waitPeers(ctx, hosts, subnet, n-1, false); err != nil {
		return c, err
	}
	c.StartMs = ms(time.Since(start))
	for _, h := range hosts {
		c.StartCPUSeconds += cpuOf(h.AgentPID())
	}
	b.logf("%d hosts: full peer sets %.0f ms after start; the agents used %.1f CPU seconds for it", n, c.StartMs, c.StartCPUSeconds)

	// Gossip of an idle cluster, from one host's point of view.
	time.Sleep(2 * time.Second)
	if c.GossipBytesPerSec, err = gossipRate(ctx, hosts[0], 10*time.Second); err != nil {
		return c, err
	}

	if err := joiner.StartAgent(ctx); err != nil {
		return c, err
	}
	// Joined and idle: no network yet.
	time.Sleep(3 * time.Second)
	c.IdleRSSMiB = rssMiB(joiner.AgentPID())
	start = time.Now()
	if err := createAndAttach(ctx, joiner, subnet); err != nil {
		return c, err
	}
	all := l.Hosts
	if err := waitPeers(ctx, all, subnet, n, false); err != nil {
		return c, err
	}
	c.JoinPeersMs = ms(time.Since(start))
	if err := waitPeers(ctx, all, subnet, n, true); err != nil {
		return c, err
	}
	c.JoinReachableMs = ms(time.Since(start))
	c.RSSMiB = rssMiB(hosts[0].AgentPID())
	b.logf("%d hosts: a joining host is a peer of all after %.0f ms, handshaken with all after %.0f ms",
		n, c.JoinPeersMs, c.JoinReachableMs)
	for _, h := range l.Hosts {
		h.StopAgent(syscall.SIGTERM)
	}
	return c, nil
}

// createAndAttach makes the plugin calls of creating a network on h and
// of a container's first attachment to it. A host is a WireGuard peer
// with a block from its first container on: creating a network claims
// no block.
func createAndAttach(ctx context.Context, h *lab.Host, subnet string) error {
	n, err := h.Plugin().CreateNetwork(ctx, subnet)
	if err != nil {
		return fmt.Errorf("%s: creating the network: %w", h.Name, err)
	}
	if _, err := h.Plugin().Attach(ctx, n); err != nil {
		return fmt.Errorf("%s: attaching an endpoint: %w", h.Name, err)
	}
	return nil
}

// waitPeers waits until every host's network has want peers, each with
// one block and, if handshake, a completed WireGuard handshake.
func waitPeers(ctx context.Context, hosts []*lab.Host, subnet string, want int, handshake bool) error {
	pending := slices.Clone(hosts)
	// Each poll costs the agent a status with WireGuard's view of every
	// peer: polling much faster would take the CPU that the agents, all
	// on this one machine, converge with.
	return poll.Every(ctx, 100*time.Millisecond, 2*time.Minute, "a full peer set on every host", func() error {
		var still []*lab.Host
		for _, h := range pending {
			st, err := driver.NewControlClient(h.ControlSock()).Status(ctx)
			if err != nil || !fullPeers(st, subnet, want, handshake) {
				still = append(still, h)
			}
		}
		if pending = still; len(pending) > 0 {
			return fmt.Errorf("%d hosts without one (first: %s)", len(pending), pending[0].Name)
		}
		return nil
	})
}

func fullPeers(st *driver.Status, subnet string, want int, handshake bool) bool {
	for _, n := range st.Networks {
		if n.Subnet.String() != subnet {
			continue
		}
		if len(n.Peers) != want {
			return false
		}
		for _, p := range n.Peers {
			if len(p.AllowedIPs) != 1 || handshake && p.LastHandshake.IsZero() {
				return false
			}
		}
		return true
	}
	return false
}

var lengthRE = regexp.MustCompile(`length (\d+)`)

// gossipRate captures a host's gossip for d and returns bytes per second
// (both directions, IP packet lengths).
func gossipRate(ctx context.Context, h *lab.Host, d time.Duration) (float64, error) {
	dir, err := os.MkdirTemp("", "wgbench-gossip-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	file := filepath.Join(dir, "g.pcap")
	cmd := exec.Command("nsenter", "--net="+h.NSPath(), "tcpdump", "--immediate-mode", "-i", "eth0", "-w", file, "port", "7946")
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	time.Sleep(d)
	_ = cmd.Process.Signal(syscall.SIGINT)
	_ = cmd.Wait()
	out, err := run(ctx, "tcpdump", "-nn", "-v", "-r", file)
	if err != nil {
		return 0, err
	}
	var total float64
	for _, line := range strings.Split(out, "\n") {
		// With -v, the IP header line carries the packet's total length.
		if m := lengthRE.FindStringSubmatch(line); m != nil && strings.Contains(line, "proto") {
			v, _ := strconv.ParseFloat(m[1], 64)
			total += v
		}
	}
	return total / d.Seconds(), nil
}

// cpuOf is the CPU time, user and system, a process has used.
func cpuOf(pid int) float64 {
	if pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The fields after the command name, which is in parentheses and
	// may hold spaces: utime and stime are the 12th and 13th of them.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

// rssMiB is a process's resident set size.
func rssMiB(pid int) float64 {
	if pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.Fields(v)[0], 64)
			return kb / 1024
		}
	}
	return 0
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
