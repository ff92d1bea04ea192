package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/driver/dataplane"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// pair is a network on the first two hosts of a lab, with one stand-in
// container on each.
type pair struct {
	l    *lab.Lab
	nets [2]*lab.PluginNetwork
	eps  [2]*lab.PluginEndpoint
	ctrs [2]*lab.Container
}

func newPair(ctx context.Context, t *testing.T, l *lab.Lab, subnet string) *pair {
	t.Helper()
	return newPairNamed(ctx, t, l, subnet, "c")
}

// newPairNamed is newPair with stand-in containers named ctr.
func newPairNamed(ctx context.Context, t *testing.T, l *lab.Lab, subnet, ctr string) *pair {
	t.Helper()
	p := &pair{l: l}
	for i, h := range l.Hosts[:2] {
		var err error
		if p.nets[i], err = h.Plugin().CreateNetwork(ctx, subnet); err != nil {
			t.Fatal(err)
		}
		if p.eps[i], err = h.Plugin().AttachTo(ctx, p.nets[i], h.ContainerNS(ctr)); err != nil {
			t.Fatal(err)
		}
		if p.ctrs[i], err = h.NewContainer(ctx, ctr, p.eps[i]); err != nil {
			t.Fatal(err)
		}
	}
	firstPing(ctx, t, p.ctrs[0], p.ctrs[1].IP)
	firstPing(ctx, t, p.ctrs[1], p.ctrs[0].IP)
	return p
}

// wgLink returns the index of a host's WireGuard link of network n, in
// the network's namespace.
func wgLink(ctx context.Context, t *testing.T, h *lab.Host, n *lab.PluginNetwork) int {
	t.Helper()
	ns := filepath.Join(h.RunDir(), "netns", n.ID)
	out, err := exec.CommandContext(ctx, "nsenter", "--net="+ns, "ip", "-o", "link", "show", dataplane.WireGuardName(n.ID)).CombinedOutput()
	if err != nil {
		t.Fatalf("WireGuard link of %s on %s: %v: %s", n.ID[:12], h.Name, err, out)
	}
	idx, err := strconv.Atoi(strings.SplitN(string(out), ":", 2)[0])
	if err != nil {
		t.Fatalf("ip link: %q", out)
	}
	return idx
}

// steadyPing pings dst from a container every interval, count times,
// with iputils ping, which reports each reply's sequence number.
type steadyPing struct {
	count    int
	interval time.Duration
	done     chan struct{}
	out      string
}

func startPing(c *lab.Container, dst string, interval time.Duration, count int) *steadyPing {
	p := &steadyPing{count: count, interval: interval, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		total := time.Duration(count)*interval + 10*time.Second
		ctx, cancel := context.WithTimeout(context.Background(), total+time.Minute)
		defer cancel()
		// No -w: with a deadline, iputils ping ends at the first ICMP
		// error (a Destination Unreachable), and the pings it never
		// sent would count as lost. Without one it waits, after the
		// last request, at least an interval and twice the slowest
		// reply seen, so the last reply is still counted.
		p.out, _ = c.Exec(ctx, "ping", "-n", "-i", strconv.FormatFloat(interval.Seconds(), 'f', 3, 64),
			"-c", strconv.Itoa(count), "-W", "2", dst)
	}()
	return p
}

var (
	replyRE = regexp.MustCompile(`icmp_seq=(\d+) ttl`)
	// An ICMP error ping got instead of a reply, as iputils prints it:
	// "From 10.82.1.1 icmp_seq=42 Destination Host Unreachable".
	icmpErrorRE = regexp.MustCompile(`(?m)^From .*$`)
)

// lost waits for the ping to end and returns the sequence numbers that
// got no reply.
func (p *steadyPing) lost() []int {
	<-p.done
	got := map[int]bool{}
	for _, m := range replyRE.FindAllStringSubmatch(p.out, -1) {
		n, _ := strconv.Atoi(m[1])
		got[n] = true
	}
	var lost []int
	for seq := 1; seq <= p.count; seq++ {
		if !got[seq] {
			lost = append(lost, seq)
		}
	}
	return lost
}

// icmpErrors returns the ICMP errors the ping got, the first few: they
// say where a lost packet was dropped.
func (p *steadyPing) icmpErrors() []string {
	<-p.done
	return icmpErrorRE.FindAllString(p.out, 5)
}

func lostString(lost []int, of int, interval time.Duration) string {
	s := fmt.Sprintf("%d of %d pings lost at %s intervals", len(lost), of, interval)
	if len(lost) > 0 && len(lost) <= 12 {
		s += fmt.Sprintf(" (seq %v)", lost)
	}
	return s
}

// TestAgentRestartKeepsKernelLinks: an agent restarts (stopped, then
// killed) under a steady ping. With kernel WireGuard the link belongs to
// the kernel: the restarted agent adopts the very same link, and
// traffic hardly notices. With wireguard-go the link dies with the agent
// and comes back with it.
func TestAgentRestartKeepsKernelLinks(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l := newLab(t, 2)
	p := newPair(ctx, t, l, "10.81.0.0/16")
	h2 := l.Hosts[1]
	const interval, count = 50 * time.Millisecond, 120
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		before := wgLink(ctx, t, h2, p.nets[1])
		ping := startPing(p.ctrs[0], p.ctrs[1].IP, interval, count)
		time.Sleep(2 * time.Second)
		stopped := time.Now()
		h2.StopAgent(sig)
		if err := h2.StartAgent(ctx); err != nil {
			t.Fatal(err)
		}
		back := time.Since(stopped)
		lost := ping.lost()
		after := wgLink(ctx, t, h2, p.nets[1])
		st, err := driver.NewControlClient(h2.ControlSock()).Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		checkMode(t, h2.Name, st.Node.WGMode)
		t.Logf("agent restart (%v, %s WireGuard): agent back after %s; %s; WireGuard link ifindex %d, then %d",
			sig, st.Node.WGMode, back.Round(time.Millisecond), lostString(lost, count, interval), before, after)
		if st.Node.WGMode == dataplane.ModeKernel {
			if after != before {
				t.Errorf("restart with %v replaced the kernel WireGuard link (ifindex %d, then %d)", sig, before, after)
			}
			if len(lost) > 2 {
				t.Errorf("restart with %v lost %d pings; kernel WireGuard runs on without the agent", sig, len(lost))
			}
		} else if len(lost) > count/2 {
			t.Errorf("restart with %v lost %d of %d pings", sig, len(lost), count)
		}
		// Either way the path works afterwards.
		firstPing(ctx, t, p.ctrs[0], p.ctrs[1].IP)
	}
}

// TestWireGuardKeyRotation: `wgmesh rotate-keys` gives a node a new key
// pair under a steady ping; its peer learns the new key by gossip.
func TestWireGuardKeyRotation(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l := newLab(t, 2)
	p := newPair(ctx, t, l, "10.82.0.0/16")
	h1, h2 := l.Hosts[0], l.Hosts[1]
	status := func(h *lab.Host) *driver.Status {
		t.Helper()
		st, err := driver.NewControlClient(h.ControlSock()).Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	old := status(h1).Node.PublicKey
	const interval, count = 50 * time.Millisecond, 120
	ping := startPing(p.ctrs[1], p.ctrs[0].IP, interval, count)
	time.Sleep(2 * time.Second)
	if _, err := h1.Wgmesh(ctx, "rotate-keys"); err != nil {
		t.Fatal(err)
	}
	lost := ping.lost()
	t.Logf("WireGuard key rotation (%s WireGuard): %s", status(h1).Node.WGMode, lostString(lost, count, interval))
	if errs := ping.icmpErrors(); len(errs) > 0 {
		t.Logf("ICMP errors during the rotation: %q", errs)
	}
	fresh := status(h1).Node.PublicKey
	if fresh == old {
		t.Fatal("public key unchanged after rotate-keys")
	}
	poll.Eventually(t, 20*time.Second, "h1's new key on h2", func() error {
		var peerKeys []string
		for _, n := range status(h2).Networks {
			for _, pr := range n.Peers {
				peerKeys = append(peerKeys, pr.PublicKey.String())
			}
		}
		if len(peerKeys) != 1 || peerKeys[0] != fresh.String() {
			return fmt.Errorf("h2's peer keys %v, want only h1's new key", peerKeys)
		}
		return nil
	})
	if len(lost) > count/4 {
		t.Errorf("key rotation lost %d of %d pings", len(lost), count)
	}
	firstPing(ctx, t, p.ctrs[1], p.ctrs[0].IP)
}

// TestTeardownLeavesNothing: once containers are gone, the networks
// deleted and the agents stopped, nothing of wgmesh is left: no
// WireGuard, host or container links, no namespace pinned under the run
// directory, no UAPI socket.
func TestTeardownLeavesNothing(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l := newLab(t, 2)
	p := newPair(ctx, t, l, "10.83.0.0/16")
	// A second network on h1 only, with no container.
	extra, err := l.Hosts[0].Plugin().CreateNetwork(ctx, "10.84.0.0/16")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for i, h := range l.Hosts[:2] {
		names = append(names, dataplane.WireGuardName(p.nets[i].ID), dataplane.HostVethName(p.eps[i].ID), dataplane.ContainerVethName(p.eps[i].ID))
		if err := h.RemoveContainer(ctx, p.ctrs[i]); err != nil {
			t.Fatal(err)
		}
		if err := h.Plugin().Detach(ctx, p.nets[i], p.eps[i]); err != nil {
			t.Fatal(err)
		}
		if err := h.Plugin().DeleteNetwork(ctx, p.nets[i]); err != nil {
			t.Fatal(err)
		}
	}
	names = append(names, dataplane.WireGuardName(extra.ID))
	if err := l.Hosts[0].Plugin().DeleteNetwork(ctx, extra); err != nil {
		t.Fatal(err)
	}
	for _, h := range l.Hosts {
		h.StopAgent(syscall.SIGTERM)
	}

	// Links: in every host's namespace (all wgmesh prefixes) and in this
	// one (the names of this test: other tests may run beside it).
	for _, h := range l.Hosts {
		out, err := h.Exec(ctx, "ip", "-o", "link", "show")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			name := strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0]
			for _, prefix := range []string{"wgm", "wgh", "wgc"} {
				if strings.HasPrefix(name, prefix) {
					t.Errorf("link %s left in %s's namespace", name, h.Name)
				}
			}
		}
	}
	out, err := exec.CommandContext(ctx, "ip", "-o", "link", "show").CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		if strings.Contains(string(out), " "+n+":") || strings.Contains(string(out), " "+n+"@") {
			t.Errorf("link %s left in the machine's namespace", n)
		}
	}
	// Namespace pins and mounts.
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range l.Hosts {
		nsDir := filepath.Join(h.RunDir(), "netns")
		if entries, err := os.ReadDir(nsDir); err == nil && len(entries) > 0 {
			t.Errorf("%s: namespaces left pinned in %s: %v", h.Name, nsDir, entries)
		}
		if strings.Contains(string(mounts), " "+nsDir+"/") || strings.Contains(string(mounts), " "+nsDir+" ") {
			t.Errorf("%s: mounts left under %s", h.Name, nsDir)
		}
	}
	// UAPI sockets of userspace WireGuard.
	for _, n := range names {
		if strings.HasPrefix(n, "wgm") {
			if _, err := os.Stat("/var/run/wireguard/" + n + ".sock"); err == nil {
				t.Errorf("UAPI socket of %s left behind", n)
			}
		}
	}
	t.Logf("teardown (WireGuard %s): no link, namespace pin, mount or UAPI socket left of %d names", wgMode, len(names))
}
