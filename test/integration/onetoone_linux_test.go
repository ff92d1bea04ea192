package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// TestOneToOneNAT is the cross-cloud case: h1, h2 and h3 are VMs whose
// public addresses are mapped 1:1 onto private ones (the address is on
// none of their interfaces), all started at once, seeding each other at
// their public addresses, none told what to advertise. h4 sits behind a
// NAT that lets in only what it began.
//
// Each of h1-h3 finds out from its seeds that it is reachable at its
// public address and advertises it: members see it there with no NAT,
// it votes and it relays. h4 is seen at its router's address too but
// nobody reaches it there: it stays behind NAT. Containers on h1 and h4
// ping each other; and h1, restarted while the other VMs are down,
// keeps the address confirmed before.
func TestOneToOneNAT(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	sites := []lab.Site{{NAT: lab.NATOneToOne}, {NAT: lab.NATOneToOne}, {NAT: lab.NATOneToOne}, {NAT: lab.NATPreserving}}
	l := newLabWith(t, lab.Config{Hosts: 4, Sites: sites, NoNames: true})
	byName := map[string]*lab.Host{}
	for _, h := range l.Hosts {
		byName[h.Name] = h
	}
	wantNAT := map[string]mesh.NATKind{"h1": mesh.NATNone, "h2": mesh.NATNone, "h3": mesh.NATNone, "h4": mesh.NATConsistent}

	waited := time.Now()
	poll.Eventually(t, 90*time.Second, "every host's address and NAT, three voters", func() error {
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
				o := byName[m.Name]
				want := o.Public
				if o.Site.NAT != lab.NATOneToOne {
					want = o.Addr
				}
				if m.Addr != want {
					return fmt.Errorf("%s sees %s advertise %s, want %s", h.Name, m.Name, m.Addr, want)
				}
				if m.Relay != (o.Site.NAT == lab.NATOneToOne) {
					return fmt.Errorf("%s sees %s relay: %v", h.Name, m.Name, m.Relay)
				}
			}
			voters := 0
			for _, s := range st.Consensus.Servers {
				if s.Voter {
					voters++
					if s.Name == "h4" {
						return fmt.Errorf("%s sees h4, behind NAT, vote", h.Name)
					}
				}
			}
			if voters != 3 {
				return fmt.Errorf("%s sees %d voters, want 3 (%+v)", h.Name, voters, st.Consensus.Servers)
			}
		}
		return nil
	})
	t.Logf("h1-h3 advertise their public addresses, h4 is behind NAT, three voters: after %s", time.Since(waited).Round(time.Millisecond))
	for _, h := range l.Hosts[:3] {
		if !strings.Contains(readLog(t, h), "advertising the address seeds reach this host at") {
			t.Errorf("%s: no log line saying why it advertises its public address", h.Name)
		}
	}

	// A network across a 1:1 host and the host behind NAT, which reach
	// each other directly (h1 is reachable).
	nets, ctrs := map[string]*lab.PluginNetwork{}, map[string]*lab.Container{}
	for _, h := range []*lab.Host{byName["h1"], byName["h4"]} {
		n, err := h.Plugin().CreateNetwork(ctx, "10.71.0.0/16")
		if err != nil {
			t.Fatal(err)
		}
		ep, err := h.Plugin().AttachTo(ctx, n, h.ContainerNS("c"))
		if err != nil {
			t.Fatal(err)
		}
		c, err := h.NewContainer(ctx, "c", ep)
		if err != nil {
			t.Fatal(err)
		}
		nets[h.Name], ctrs[h.Name] = n, c
	}
	firstPing(ctx, t, ctrs["h1"], ctrs["h4"].IP)
	firstPing(ctx, t, ctrs["h4"], ctrs["h1"].IP)

	// h1 restarts while h2 and h3 are down: no seed answers, and it
	// advertises the address confirmed on its last start.
	h1 := byName["h1"]
	for _, h := range []*lab.Host{h1, byName["h2"], byName["h3"]} {
		h.StopAgent(15)
	}
	saved, err := os.ReadFile(filepath.Join(h1.Dir, "state", "public-addr.json"))
	if err != nil || !strings.Contains(string(saved), h1.Public.String()) {
		t.Fatalf("h1 saved no public address (%v): %s", err, saved)
	}
	if err := h1.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	poll.Eventually(t, 30*time.Second, "h1 advertising its public address again", func() error {
		st, err := status(ctx, h1)
		if err != nil {
			return err
		}
		for _, m := range st.Members {
			if m.Self && m.Addr != h1.Public {
				return fmt.Errorf("h1 advertises %s", m.Addr)
			}
		}
		return nil
	})
}

func readLog(t *testing.T, h *lab.Host) string {
	t.Helper()
	b, err := os.ReadFile(h.AgentLog())
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
