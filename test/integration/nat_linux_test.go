package integration

import (
	"context"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// natSites is the lab of the NAT tests: h1 reachable at its own address;
// h2 and h3 behind NATs that keep one mapping per source, h3's with an
// uplink of MTU 1280 (a black hole for larger packets coming in); h4
// behind a NAT that maps every destination to a port of its own.
var natSites = []lab.Site{{}, {NAT: lab.NATPreserving}, {NAT: lab.NATPreserving, UplinkMTU: 1280}, {NAT: lab.NATRandom}}

// wantPath is what a host's status should show of a peer.
type wantPath struct {
	path, via string
	mtu       int
}

// natPaths is what each host should see of each peer: direct where one
// end is reachable or both NATs keep their mapping (h2-h3, punched),
// relayed by h1 where one NAT maps per destination; a path MTU of 1280
// wherever h3's uplink is on the way.
var natPaths = map[string]map[string]wantPath{
	"h1": {"h2": {"direct", "", 1400}, "h3": {"direct", "", 1280}, "h4": {"direct", "", 1400}},
	"h2": {"h1": {"direct", "", 1400}, "h3": {"direct", "", 1280}, "h4": {"relayed", "h1", 1400}},
	"h3": {"h1": {"direct", "", 1280}, "h2": {"direct", "", 1280}, "h4": {"relayed", "h1", 1280}},
	"h4": {"h1": {"direct", "", 1400}, "h2": {"relayed", "h1", 1400}, "h3": {"relayed", "h1", 1280}},
}

// pathMTUIs says whether a path MTU found is the lab's. Where h3's
// uplink of 1280 is in the way, packets coming in over the bridge meet
// the kernel's forwarding check (is_skb_forwardable), which allows the
// length of a VLAN header beyond the MTU; some kernels (Debian's 6.1,
// in the VM) let those 4 bytes through, so the path is 1280 or 1284.
// Either gives the same route MTU (1216, rounded down to 16).
func pathMTUIs(found, want int) bool {
	if want == 1280 {
		return found >= 1280 && found <= 1284
	}
	return found == want
}

func status(ctx context.Context, h *lab.Host) (*driver.Status, error) {
	return driver.NewControlClient(h.ControlSock()).Status(ctx)
}

func peerOf(st *driver.Status, node string) (driver.PeerStatus, bool) {
	for _, n := range st.Networks {
		for _, p := range n.Peers {
			if p.Node == node {
				return p, true
			}
		}
	}
	return driver.PeerStatus{}, false
}

// TestNATTraversal runs four agents, three of them behind NAT routers of
// their own, none told its public address:
//
//   - every host learns how the others see it: none, consistent or
//     symmetric NAT, and its public address;
//   - the two hosts behind NATs that keep one mapping punch a direct
//     path; the host behind the NAT that maps per destination is relayed
//     by the reachable host to the other two, end to end encrypted;
//   - every host finds the path MTU to every other: 1280 across h3's
//     uplink, which drops larger packets without a word, so that a TCP
//     stream that crosses it works; and notices when another path shrinks
//     later;
//   - TCP transfers, direct and relayed, arrive intact;
//   - with UDP between h2's and h3's NATs blocked one way, the pair moves
//     to the relay, and back to direct when it is unblocked.
func TestNATTraversal(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	l := newLabWith(t, lab.Config{Hosts: 4, Sites: natSites,
		// Short timers, so that the test notices breakage and retries
		// in seconds rather than minutes.
		AgentArgs: []string{"--direct-retry", "5s", "--pmtu-interval", "2s", "--wg-keepalive", "5s"}})
	byName := map[string]*lab.Host{}
	for _, h := range l.Hosts {
		byName[h.Name] = h
	}

	// How each host is seen.
	wantNAT := map[string]mesh.NATKind{"h1": mesh.NATNone, "h2": mesh.NATConsistent, "h3": mesh.NATConsistent, "h4": mesh.NATSymmetric}
	waited := time.Now()
	poll.Eventually(t, 90*time.Second, "the cluster and every host's NAT", func() error {
		for _, h := range l.Hosts {
			st, err := status(ctx, h)
			if err != nil {
				return err
			}
			if len(st.Members) != 4 || !allAlive(st) {
				return fmt.Errorf("%s sees %d members, not all alive", h.Name, len(st.Members))
			}
			for _, m := range st.Members {
				if m.NAT != wantNAT[m.Name] {
					return fmt.Errorf("%s sees %s's NAT as %q, want %q", h.Name, m.Name, m.NAT, wantNAT[m.Name])
				}
				if m.NAT.Behind() && m.Public.Addr() != byName[m.Name].Public {
					return fmt.Errorf("%s sees %s at %s, its router is %s", h.Name, m.Name, m.Public, byName[m.Name].Public)
				}
			}
		}
		return nil
	})
	t.Logf("cluster formed and every host's NAT known after %s", time.Since(waited).Round(time.Millisecond))

	// A network on all four at once, a container on each.
	created := time.Now()
	ctrs := map[string]*lab.Container{}
	var mu sync.Mutex
	errs := make(chan error, len(l.Hosts))
	for _, h := range l.Hosts {
		go func() {
			p := h.Plugin()
			n, err := p.CreateNetwork(ctx, "10.90.0.0/16")
			if err == nil {
				var ep *lab.PluginEndpoint
				if ep, err = p.Attach(ctx, n); err == nil {
					var c *lab.Container
					c, err = h.NewContainer(ctx, "c", ep)
					mu.Lock()
					ctrs[h.Name] = c
					mu.Unlock()
				}
			}
			errs <- err
		}()
	}
	for range l.Hosts {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	names := []string{"h1", "h2", "h3", "h4"}
	for _, a := range names {
		for _, b := range names {
			if a != b {
				firstPing(ctx, t, ctrs[a], ctrs[b].IP)
			}
		}
	}
	t.Logf("every container reaches every other %s after the networks were created", time.Since(created).Round(time.Millisecond))

	// The paths, and their MTUs.
	checkPaths := func(want map[string]map[string]wantPath) func() error {
		return func() error {
			for _, h := range l.Hosts {
				st, err := status(ctx, h)
				if err != nil {
					return err
				}
				for peer, w := range want[h.Name] {
					p, ok := peerOf(st, peer)
					switch {
					case !ok:
						return fmt.Errorf("%s has no peer %s", h.Name, peer)
					case p.Path != w.path || p.Via != w.via || !pathMTUIs(p.PathMTU, w.mtu):
						return fmt.Errorf("%s sees %s: path %q via %q, path MTU %d; want %q via %q, %d", h.Name, peer, p.Path, p.Via, p.PathMTU, w.path, w.via, w.mtu)
					case w.mtu == 1280 && p.RouteMTU != 1216:
						return fmt.Errorf("%s sees %s: route MTU %d, want 1216", h.Name, peer, p.RouteMTU)
					case w.mtu > 1280 && p.RouteMTU != 0:
						return fmt.Errorf("%s sees %s: route MTU %d on a full path", h.Name, peer, p.RouteMTU)
					case p.LastHandshake.IsZero():
						return fmt.Errorf("%s: no handshake with %s", h.Name, peer)
					}
					if w.path == "relayed" && p.Endpoint.Addr() != byName[w.via].Addr {
						return fmt.Errorf("%s sends to %s at %s, not through %s", h.Name, peer, p.Endpoint, w.via)
					}
				}
			}
			return nil
		}
	}
	poll.Eventually(t, 60*time.Second, "paths and path MTUs", checkPaths(natPaths))
	st, _ := status(ctx, byName["h1"])
	if len(st.Relay) != 2 {
		t.Fatalf("h1 relays %+v, want the pairs h2-h4 and h3-h4", st.Relay)
	}

	// TCP across each kind of path; the punched one and a relayed one
	// cross h3's uplink, which silently drops packets over 1280 bytes.
	transfer := func(from, to string, port int) lab.Transfer {
		t.Helper()
		tr, err := lab.TCPTransfer(ctx, ctrs[from], ctrs[to], port, 16<<20, time.Minute)
		if err != nil {
			t.Fatalf("TCP %s -> %s: %v", from, to, err)
		}
		if !tr.OK() {
			t.Fatalf("TCP %s -> %s: sent %x, received %x", from, to, tr.Sent, tr.Received)
		}
		return tr
	}
	for _, c := range []struct {
		from, to, what string
	}{
		{"h2", "h3", "direct, punched through two NATs, 1280 path"},
		{"h3", "h2", "direct, punched through two NATs, 1280 path"},
		{"h4", "h3", "relayed by h1, 1280 path"},
		{"h2", "h4", "relayed by h1"},
		{"h1", "h4", "direct to a host behind a NAT that maps per destination"},
	} {
		tr := transfer(c.from, c.to, 5001)
		t.Logf("TCP %s -> %s (%s): 16 MiB intact, %.0f Mbit/s", c.from, c.to, c.what, tr.Mbps)
	}

	// UDP from h2 to h3 blocked at h3's router: the pair moves to the
	// relay...
	h3 := byName["h3"]
	block := []string{"FORWARD", "-i", "eth0", "-s", byName["h2"].Public.String(), "-p", "udp", "-j", "DROP"}
	if _, err := h3.RouterExec(ctx, "iptables", append([]string{"-I"}, block...)...); err != nil {
		t.Fatal(err)
	}
	relayedPair := func(path, via string) map[string]map[string]wantPath {
		return map[string]map[string]wantPath{"h2": {"h3": {path, via, 1280}}, "h3": {"h2": {path, via, 1280}}}
	}
	waited = time.Now()
	poll.Eventually(t, 90*time.Second, "h2-h3 relayed after UDP was blocked", checkPaths(relayedPair("relayed", "h1")))
	t.Logf("UDP h2 -> h3 blocked: relayed through h1 %s later", time.Since(waited).Round(time.Millisecond))
	transfer("h2", "h3", 5002)
	// ... and back to direct once it passes again.
	if _, err := h3.RouterExec(ctx, "iptables", append([]string{"-D"}, block...)...); err != nil {
		t.Fatal(err)
	}
	waited = time.Now()
	poll.Eventually(t, 90*time.Second, "h2-h3 direct again", checkPaths(relayedPair("direct", "")))
	t.Logf("unblocked: direct again %s later", time.Since(waited).Round(time.Millisecond))
	transfer("h3", "h2", 5003)

	// h2's path shrinks: its uplink goes down to 1280.
	h2 := byName["h2"]
	if out, err := exec.CommandContext(ctx, "ip", "-n", l.Switch, "link", "set", l.Prefix+"-r2", "mtu", "1280").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if _, err := h2.RouterExec(ctx, "ip", "link", "set", "eth0", "mtu", "1280"); err != nil {
		t.Fatal(err)
	}
	shrunk := map[string]map[string]wantPath{"h1": {"h2": {"direct", "", 1280}}, "h2": {"h1": {"direct", "", 1280}}}
	waited = time.Now()
	poll.Eventually(t, 60*time.Second, "h1-h2 path MTU 1280", checkPaths(shrunk))
	t.Logf("h2's uplink shrank to 1280: noticed %s later", time.Since(waited).Round(time.Millisecond))
	transfer("h1", "h2", 5004)

	// Nothing failed on the way.
	for _, h := range l.Hosts {
		st, err := status(ctx, h)
		if err != nil {
			t.Fatal(err)
		}
		if slices.ContainsFunc(st.Problems, func(p string) bool { return strings.Contains(p, "relay") }) {
			t.Errorf("%s: %v", h.Name, st.Problems)
		}
	}
}
