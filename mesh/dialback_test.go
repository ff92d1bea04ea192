package mesh

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestJudgeDialbacks(t *testing.T) {
	local := netip.MustParseAddr("10.0.0.5")
	pub := netip.MustParseAddr("203.0.113.5")
	other := netip.MustParseAddr("198.51.100.9")
	ans := func(seen netip.Addr, reached bool) dialbackAnswer {
		return dialbackAnswer{Seen: seen, Reached: reached}
	}
	none := dialbackAnswer{}
	for _, tc := range []struct {
		name    string
		answers []dialbackAnswer
		saved   netip.Addr
		want    netip.Addr
	}{
		{"two seeds reach it at its public address", []dialbackAnswer{ans(pub, true), ans(pub, true)}, netip.Addr{}, pub},
		{"one seed answers and reaches it", []dialbackAnswer{ans(pub, true)}, netip.Addr{}, pub},
		{"one of two seeds reaches it: not enough", []dialbackAnswer{ans(pub, true), ans(pub, false)}, netip.Addr{}, netip.Addr{}},
		{"one of three answers and reaches it: its word is taken", []dialbackAnswer{ans(pub, true), none, none}, netip.Addr{}, pub},
		{"one of two answers, without reaching it", []dialbackAnswer{ans(pub, false), none}, netip.Addr{}, netip.Addr{}},
		{"two answer, one reaches it, the saved address", []dialbackAnswer{ans(pub, true), ans(pub, false)}, pub, pub},
		{"two answer, one reaches it, another saved address", []dialbackAnswer{ans(pub, true), ans(pub, false)}, other, netip.Addr{}},
		{"a seed names another address (a hostile seed)", []dialbackAnswer{ans(pub, true), ans(pub, true), ans(other, true)}, netip.Addr{}, netip.Addr{}},
		{"a hostile seed disagrees, not reaching it", []dialbackAnswer{ans(pub, true), ans(pub, true), ans(other, false)}, netip.Addr{}, netip.Addr{}},
		{"behind NAT: seen elsewhere, nobody gets in", []dialbackAnswer{ans(pub, false), ans(pub, false)}, netip.Addr{}, netip.Addr{}},
		{"behind NAT now, although it was reachable before", []dialbackAnswer{ans(pub, false), ans(pub, false)}, pub, netip.Addr{}},
		{"seen at its own address", []dialbackAnswer{ans(local, true), ans(local, true)}, netip.Addr{}, netip.Addr{}},
		{"seen at its own address, a stale saved one", []dialbackAnswer{ans(local, true)}, pub, netip.Addr{}},
		{"no seed answers, none saved", []dialbackAnswer{none, none}, netip.Addr{}, netip.Addr{}},
		{"no seed answers: the saved address", []dialbackAnswer{none, none}, pub, pub},
	} {
		got, why := judgeDialbacks(local, tc.answers, tc.saved)
		if got != tc.want {
			t.Errorf("%s: got %v (%s), want %v", tc.name, got, why, tc.want)
		}
	}
}

// seedTransport is a seed's gossip transport on real sockets on
// 127.0.0.1, serving dialback requests.
func seedTransport(t *testing.T, ring [][]byte) (*gossipTransport, netip.AddrPort) {
	t.Helper()
	nt, err := newNetTransport("127.0.0.1", 0, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	g := newGossipTransport(nt, "seed")
	g.setKeyring(ring)
	nt.start()
	g.start()
	t.Cleanup(func() { _ = g.Shutdown() })
	return g, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(nt.Port()))
}

// TestDialback runs the protocol over loopback: the asker pretends it
// would advertise 10.0.0.5, the seed sees it at 127.0.0.1 and reaches it
// there at its consensus port, or not; streams that are not dialback
// requests still reach memberlist, first byte and all.
func TestDialback(t *testing.T) {
	ring := keys("k")
	seed, seedAddr := seedTransport(t, ring)
	local := netip.MustParseAddr("10.0.0.5")
	ctx := context.Background()
	log := slog.New(slog.DiscardHandler)
	seeds := []dialbackSeed{{"seed", seedAddr}}
	asker := newSealer("asker")
	asker.setKeyring(ring)

	listen := func(addr string) *net.TCPListener {
		l, err := net.Listen("tcp", addr+":0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		return l.(*net.TCPListener)
	}

	t.Run("reachable", func(t *testing.T) {
		l := listen("127.0.0.1")
		got := askDialbacks(ctx, asker, seeds, l, local, log)
		if len(got) != 1 || got[0].Seen != seedAddr.Addr() || !got[0].Reached {
			t.Fatalf("answers %+v, want seen at 127.0.0.1 and reached", got)
		}
		// The listener is left as it was: it accepts again.
		go func() {
			if c, err := net.Dial("tcp", l.Addr().String()); err == nil {
				c.Close()
			}
		}()
		_ = l.SetDeadline(time.Now().Add(2 * time.Second))
		c, err := l.Accept()
		if err != nil {
			t.Fatalf("the consensus listener no longer accepts after dialback: %v", err)
		}
		c.Close()
	})

	t.Run("not reachable", func(t *testing.T) {
		// Listening on 127.0.0.2 only: the seed's connection back to
		// where it sees the request come from (127.0.0.1) is refused,
		// as a NAT refuses what its host did not begin.
		l := listen("127.0.0.2")
		start := time.Now()
		got := askDialbacks(ctx, asker, seeds, l, local, log)
		if len(got) != 1 || got[0].Seen != seedAddr.Addr() || got[0].Reached {
			t.Fatalf("answers %+v, want seen at 127.0.0.1 and not reached", got)
		}
		if d := time.Since(start); d > 3*dialbackWait {
			t.Errorf("asking took %s", d)
		}
	})

	t.Run("another cluster key", func(t *testing.T) {
		stranger := newSealer("stranger")
		stranger.setKeyring(keys("other"))
		got := askDialbacks(ctx, stranger, seeds, listen("127.0.0.1"), local, log)
		if len(got) != 1 || got[0].Seen.IsValid() || got[0].Reached {
			t.Fatalf("a seed answered a request sealed with another key: %+v", got)
		}
	})

	t.Run("memberlist streams pass", func(t *testing.T) {
		c, err := net.Dial("tcp", seedAddr.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("\x01hello")); err != nil {
			t.Fatal(err)
		}
		select {
		case s := <-seed.StreamCh():
			defer s.Close()
			_ = s.SetReadDeadline(time.Now().Add(2 * time.Second))
			b := make([]byte, 6)
			n := 0
			for n < len(b) {
				k, err := s.Read(b[n:])
				if err != nil {
					t.Fatal(err)
				}
				n += k
			}
			if string(b) != "\x01hello" {
				t.Fatalf("memberlist read %q", b)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("a memberlist stream never reached memberlist")
		}
	})
}

func TestResolveSeedsLeavesOutThisHost(t *testing.T) {
	own := func(a netip.Addr) bool { return a == netip.MustParseAddr("10.0.0.5") }
	got := resolveSeeds(context.Background(), []string{"10.0.0.5", "10.0.0.6", "10.0.0.5:8000", "10.0.0.6:7946", "bad:port:x"}, 7946, own)
	var s []string
	for _, g := range got {
		s = append(s, g.addr.String())
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
