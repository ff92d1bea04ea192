package hostaddr

import (
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/wgmesh/wgmesh/test/netnstest"
)

func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }

func addrsOf(t *testing.T) []string {
	t.Helper()
	link, err := netlink.LinkByName(LinkName)
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, a := range addrs {
		out = append(out, a.IPNet.String()+" "+a.Label)
	}
	slices.Sort(out)
	return out
}

func TestEnsure(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	// Someone else's address on lo stays.
	lo, _ := netlink.LinkByName(LinkName)
	other := &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(192, 0, 2, 1), Mask: net.CIDRMask(32, 32)}}
	if err := netlink.AddrAdd(lo, other); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := Ensure(netip.MustParseAddr("169.254.53.53")); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{"127.0.0.1/8 lo", "169.254.53.53/32 " + Label, "192.0.2.1/32 lo"}
	if got := addrsOf(t); !slices.Equal(got, want) {
		t.Fatalf("addresses %v, want %v", got, want)
	}
	// Another address replaces the first.
	if err := Ensure(netip.MustParseAddr("169.254.53.54")); err != nil {
		t.Fatal(err)
	}
	want[1] = "169.254.53.54/32 " + Label
	if got := addrsOf(t); !slices.Equal(got, want) {
		t.Fatalf("addresses %v, want %v", got, want)
	}
	for _, bad := range []string{"fd00::53", "127.0.0.53", "0.0.0.0"} {
		if err := Ensure(netip.MustParseAddr(bad)); err == nil {
			t.Errorf("%s was accepted", bad)
		}
	}
	for range 2 {
		if err := Remove(); err != nil {
			t.Fatal(err)
		}
	}
	if got := addrsOf(t); !slices.Equal(got, []string{"127.0.0.1/8 lo", "192.0.2.1/32 lo"}) {
		t.Fatalf("after removal: %v", got)
	}
}

// TestList: the host's IPv4 addresses by link, wgmesh's among lo's.
func TestList(t *testing.T) {
	netnstest.SkipUnlessRoot(t)
	if err := Ensure(netip.MustParseAddr("169.254.53.53")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Remove() })
	links, err := List()
	if err != nil {
		t.Fatal(err)
	}
	lo, _ := net.InterfaceByName(LinkName)
	var got []netip.Prefix
	for _, l := range links {
		if l.Index == lo.Index {
			got = l.Addrs
		}
	}
	// Other tests may leave addresses of their own.
	for _, w := range []string{"127.0.0.1/8", "169.254.53.53/32"} {
		if !slices.Contains(got, netip.MustParsePrefix(w)) {
			t.Errorf("lo (%d) has %v, without %s; all: %+v", lo.Index, got, w, links)
		}
	}
}
