package integration

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// TestContainerMSSClamp: containers that drop ICMP "fragmentation
// needed" (many images' firewalls do) still carry TCP across a path
// smaller than their network's MTU. h2 sits behind a router whose uplink
// takes 1280 bytes and which drops that ICMP itself: wgmesh finds the
// path MTU and gives the route to h2's blocks a smaller MTU, but a
// container that never hears of it keeps sending full-size segments into
// the network's namespace, which answers them with ICMP the container
// drops. The network's namespace clamps the MSS of TCP handshakes to the
// route's MTU, so the segments fit from the start.
func TestContainerMSSClamp(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l := newLabWith(t, lab.Config{Hosts: 2, Sites: []lab.Site{{}, {NAT: lab.NATPreserving, UplinkMTU: 1280, DropFragNeeded: true}},
		AgentArgs: []string{"--pmtu-interval", "2s"}})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	poll.Eventually(t, 90*time.Second, "the cluster", func() error {
		for _, h := range l.Hosts {
			st, err := status(ctx, h)
			if err != nil {
				return err
			}
			if len(st.Members) != 2 || !allAlive(st) || !st.Consensus.Registered {
				return fmt.Errorf("%s: %d members, registered %v", h.Name, len(st.Members), st.Consensus.Registered)
			}
		}
		return nil
	})
	ctrs := map[string]*lab.Container{}
	for _, h := range l.Hosts {
		p := h.Plugin()
		n, err := p.CreateNetwork(ctx, "10.90.0.0/16")
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
		// The container's firewall drops what would tell it of the
		// smaller path.
		if _, err := c.Exec(ctx, "iptables", "-A", "INPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP"); err != nil {
			t.Fatal(err)
		}
		ctrs[h.Name] = c
	}
	firstPing(ctx, t, ctrs["h1"], ctrs["h2"].IP)
	firstPing(ctx, t, ctrs["h2"], ctrs["h1"].IP)
	poll.Eventually(t, 60*time.Second, "route MTUs of the 1280 path", func() error {
		for _, h := range []*lab.Host{h1, h2} {
			st, err := status(ctx, h)
			if err != nil {
				return err
			}
			for _, n := range st.Networks {
				for _, p := range n.Peers {
					if p.RouteMTU != 1216 {
						return fmt.Errorf("%s sees %s with route MTU %d", h.Name, p.Node, p.RouteMTU)
					}
				}
			}
		}
		return nil
	})
	for _, c := range []struct{ from, to string }{{"h1", "h2"}, {"h2", "h1"}} {
		tr, err := lab.TCPTransfer(ctx, ctrs[c.from], ctrs[c.to], 5001, 4<<20, 45*time.Second)
		if err != nil {
			t.Fatalf("TCP %s -> %s between containers that drop ICMP: %v", c.from, c.to, err)
		}
		if !tr.OK() {
			t.Fatalf("TCP %s -> %s: sent %x, received %x", c.from, c.to, tr.Sent, tr.Received)
		}
		t.Logf("TCP %s -> %s, containers dropping ICMP, 1280 path: 4 MiB intact in %s", c.from, c.to, tr.Took.Round(time.Millisecond))
	}
}
