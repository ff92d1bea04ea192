package gossipnet

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"
)

// seedTransport is a seed's gossip transport on real sockets on
// 127.0.0.1, serving dialback requests.
func seedTransport(t *testing.T, ring [][]byte) (*Transport, netip.AddrPort) {
	t.Helper()
	nt, err := NewNetTransport("127.0.0.1", 0, nil, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	g := New(nt, "seed")
	g.setKeyring(ring)
	nt.Start()
	g.Start()
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
	seeds := []Seed{{"seed", seedAddr}}
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
		if d := time.Since(start); d > 3*DialbackWait {
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

func TestDialbackWaitFor(t *testing.T) {
	for _, c := range []struct {
		slowest time.Duration
		reached bool
		want    time.Duration
	}{
		{time.Millisecond, false, dialbackWaitMin},              // near seeds: the least wait
		{300 * time.Millisecond, false, 900 * time.Millisecond}, // three asks
		{time.Second, false, DialbackWait},                      // bounded
		{time.Millisecond, true, DialbackWait},                  // one seed reached it: wait for the others
	} {
		if got := dialbackWaitFor(c.slowest, c.reached); got != c.want {
			t.Errorf("slowest ask %s, reached %v: wait %s, want %s", c.slowest, c.reached, got, c.want)
		}
	}
}
