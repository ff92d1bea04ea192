package mesh

import (
	"context"
	"net/netip"
	"strings"
	"testing"

	"github.com/wgmesh/wgmesh/mesh/gossipnet"
)

func TestJudgeDialbacks(t *testing.T) {
	local := netip.MustParseAddr("10.0.0.5")
	pub := netip.MustParseAddr("203.0.113.5")
	other := netip.MustParseAddr("198.51.100.9")
	ans := func(seen netip.Addr, reached bool) gossipnet.DialbackAnswer {
		return gossipnet.DialbackAnswer{Seen: seen, Reached: reached}
	}
	none := gossipnet.DialbackAnswer{}
	for _, tc := range []struct {
		name    string
		answers []gossipnet.DialbackAnswer
		saved   netip.Addr
		want    netip.Addr
	}{
		{"two seeds reach it at its public address", []gossipnet.DialbackAnswer{ans(pub, true), ans(pub, true)}, netip.Addr{}, pub},
		{"one seed answers and reaches it", []gossipnet.DialbackAnswer{ans(pub, true)}, netip.Addr{}, pub},
		{"one of two seeds reaches it: not enough", []gossipnet.DialbackAnswer{ans(pub, true), ans(pub, false)}, netip.Addr{}, netip.Addr{}},
		{"one of three answers and reaches it: its word is taken", []gossipnet.DialbackAnswer{ans(pub, true), none, none}, netip.Addr{}, pub},
		{"one of two answers, without reaching it", []gossipnet.DialbackAnswer{ans(pub, false), none}, netip.Addr{}, netip.Addr{}},
		{"two answer, one reaches it, the saved address", []gossipnet.DialbackAnswer{ans(pub, true), ans(pub, false)}, pub, pub},
		{"two answer, one reaches it, another saved address", []gossipnet.DialbackAnswer{ans(pub, true), ans(pub, false)}, other, netip.Addr{}},
		{"a seed names another address (a hostile seed)", []gossipnet.DialbackAnswer{ans(pub, true), ans(pub, true), ans(other, true)}, netip.Addr{}, netip.Addr{}},
		{"a hostile seed disagrees, not reaching it", []gossipnet.DialbackAnswer{ans(pub, true), ans(pub, true), ans(other, false)}, netip.Addr{}, netip.Addr{}},
		{"behind NAT: seen elsewhere, nobody gets in", []gossipnet.DialbackAnswer{ans(pub, false), ans(pub, false)}, netip.Addr{}, netip.Addr{}},
		{"behind NAT now, although it was reachable before", []gossipnet.DialbackAnswer{ans(pub, false), ans(pub, false)}, pub, netip.Addr{}},
		{"seen at its own address", []gossipnet.DialbackAnswer{ans(local, true), ans(local, true)}, netip.Addr{}, netip.Addr{}},
		{"seen at its own address, a stale saved one", []gossipnet.DialbackAnswer{ans(local, true)}, pub, netip.Addr{}},
		{"no seed answers, none saved", []gossipnet.DialbackAnswer{none, none}, netip.Addr{}, netip.Addr{}},
		{"no seed answers: the saved address", []gossipnet.DialbackAnswer{none, none}, pub, pub},
	} {
		got, why := judgeDialbacks(local, tc.answers, tc.saved)
		if got != tc.want {
			t.Errorf("%s: got %v (%s), want %v", tc.name, got, why, tc.want)
		}
	}
}

func TestResolveSeedsLeavesOutThisHost(t *testing.T) {
	own := func(a netip.Addr) bool { return a == netip.MustParseAddr("10.0.0.5") }
	got := resolveSeeds(context.Background(), []string{"10.0.0.5", "10.0.0.6", "10.0.0.5:8000", "10.0.0.6:7946", "bad:port:x"}, 7946, own)
	var s []string
	for _, g := range got {
		s = append(s, g.Addr.String())
	}
	if strings.Join(s, " ") != "10.0.0.6:7946 10.0.0.5:8000" {
		t.Fatalf("seeds %v", s)
	}
}

func TestSavedPublicAddr(t *testing.T) {
	dir := t.TempDir()
	if a := loadPublicAddr(dir); a.IsValid() {
		t.Fatalf("nothing saved, loaded %v", a)
	}
	pub := netip.MustParseAddr("203.0.113.5")
	if err := savePublicAddr(dir, pub); err != nil {
		t.Fatal(err)
	}
	if a := loadPublicAddr(dir); a != pub {
		t.Fatalf("loaded %v, saved %v", a, pub)
	}
	if err := savePublicAddr(dir, netip.Addr{}); err != nil {
		t.Fatal(err)
	}
	if a := loadPublicAddr(dir); a.IsValid() {
		t.Fatalf("removed, loaded %v", a)
	}
}
