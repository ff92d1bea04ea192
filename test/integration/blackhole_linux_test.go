package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// TestControlPlaneBlackHole: the agent's own TCP (consensus over TLS,
// gossip push/pull) survives a path-MTU black hole between a host and
// the leader, as its containers' traffic does.
//
// h1 and h2 sit on the underlay (the voters); h3 behind a NAT router that
// drops ICMP "fragmentation needed" both ways. Once the cluster runs,
// h3's uplink shrinks to 1280 bytes: neither end of a TCP connection
// across it then hears that its larger segments vanish. h3 must still
// claim an address block, and full gossip state syncs with it must still
// succeed. Before that, with TCP to the consensus port dropped on the
// way, h3's claims fail and say why, and so does its status.
func TestControlPlaneBlackHole(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	l := newLabWith(t, lab.Config{Hosts: 3, Sites: []lab.Site{{}, {}, {NAT: lab.NATPreserving, DropFragNeeded: true}},
		AgentArgs: []string{"--pmtu-interval", "2s"}})
	h1, h3 := l.Hosts[0], l.Hosts[2]

	waited := time.Now()
	poll.Eventually(t, 90*time.Second, "the cluster, every host registered", func() error {
		for _, h := range l.Hosts {
			st, err := status(ctx, h)
			if err != nil {
				return err
			}
			if len(st.Members) != 3 || !allAlive(st) {
				return fmt.Errorf("%s sees %d members, not all alive", h.Name, len(st.Members))
			}
			if !st.Consensus.Registered || st.Consensus.Leader == "" {
				return fmt.Errorf("%s: consensus %s, registered %v, leader %q: %s", h.Name, st.Consensus.State, st.Consensus.Registered, st.Consensus.Leader, st.Consensus.Problem)
			}
		}
		return nil
	})
	t.Logf("cluster formed after %s", time.Since(waited).Round(time.Millisecond))

	// Networks made on h1, so that the Raft log h3 follows and the gossip
	// state are larger than one packet across the black hole.
	for i := range 6 {
		if _, err := h1.Plugin().CreateNetwork(ctx, fmt.Sprintf("10.%d.0.0/16", 60+i)); err != nil {
			t.Fatalf("a network on h1: %v", err)
		}
	}

	// First a firewall that drops h3's TCP to the consensus port while
	// gossip passes: claims fail, and both the error and the status say
	// that connections time out, not that voters are down.
	block := []string{"FORWARD", "-o", "eth0", "-p", "tcp", "--dport", "7947", "-j", "DROP"}
	if _, err := h3.RouterExec(ctx, "iptables", append([]string{"-I"}, block...)...); err != nil {
		t.Fatal(err)
	}
	cctx, ccancel := context.WithTimeout(ctx, 60*time.Second)
	_, err := h3.Plugin().CreateNetwork(cctx, "10.80.0.0/16")
	ccancel()
	if err == nil || !strings.Contains(err.Error(), "connections to them time out") || strings.Contains(err.Error(), "voters are down") {
		t.Fatalf("a claim of h3 with TCP to port 7947 dropped: %v; want an error that names connections timing out", err)
	}
	t.Logf("claim with TCP to 7947 dropped: %v", err)
	poll.Eventually(t, 30*time.Second, "h3's status naming the consensus connections", func() error {
		st, err := status(ctx, h3)
		if err != nil {
			return err
		}
		for _, p := range st.Problems {
			if strings.Contains(p, "consensus connections to it") {
				t.Logf("h3's status: %s", p)
				return nil
			}
		}
		return fmt.Errorf("h3's problems: %q", st.Problems)
	})
	if _, err := h3.RouterExec(ctx, "iptables", append([]string{"-D"}, block...)...); err != nil {
		t.Fatal(err)
	}

	// The black hole: h3's uplink goes down to 1280, both ends of it.
	shrunk := time.Now()
	if out, err := exec.CommandContext(ctx, "ip", "-n", l.Switch, "link", "set", l.Prefix+"-r3", "mtu", "1280").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if _, err := h3.RouterExec(ctx, "ip", "link", "set", "eth0", "mtu", "1280"); err != nil {
		t.Fatal(err)
	}
	waited = time.Now()
	poll.Eventually(t, 60*time.Second, "h3's path MTU to h1 of 1280", func() error {
		st, err := status(ctx, h3)
		if err != nil {
			return err
		}
		for _, m := range st.Members {
			if m.Name == "h1" && !pathMTUIs(m.PathMTU, 1280) {
				return fmt.Errorf("h3 sees a path MTU of %d to h1", m.PathMTU)
			}
		}
		return nil
	})
	t.Logf("h3's uplink shrank to 1280: path MTU found %s later", time.Since(waited).Round(time.Millisecond))

	// h3 claims a block: it creates a network and attaches a container.
	start := time.Now()
	p := h3.Plugin()
	cctx, ccancel = context.WithTimeout(ctx, 90*time.Second)
	n, err := p.CreateNetwork(cctx, "10.90.0.0/16")
	if err == nil {
		_, err = p.Attach(cctx, n)
	}
	ccancel()
	if err != nil {
		st, _ := status(ctx, h3)
		var problems []string
		if st != nil {
			problems = st.Problems
		}
		t.Fatalf("h3 claims a block through the black hole: %v after %s (h3's status problems: %q)", err, time.Since(start).Round(time.Millisecond), problems)
	}
	t.Logf("h3 claimed a block through the black hole in %s", time.Since(start).Round(time.Millisecond))

	// Gossip: full state syncs (TCP push/pull, every 30 s) with h3
	// succeed both ways.
	if d := 65*time.Second - time.Since(shrunk); d > 0 {
		time.Sleep(d)
	}
	for _, h := range l.Hosts {
		b, err := os.ReadFile(h.AgentLog())
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			// (Push/pull to a host behind NAT is never tried, by
			// design, and logged at debug level.)
			if strings.Contains(line, "Push/Pull") && !strings.Contains(line, "level=DEBUG") {
				t.Errorf("%s: %s", h.Name, line)
			}
		}
	}
}
