package driver

import (
	"net/netip"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
)

func TestStagger(t *testing.T) {
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	low, high := crypto.PublicKey{1}, crypto.PublicKey{2}
	const want = 25 * time.Second
	now := time.Unix(1000, 0)

	s := newStagger()
	// The lower key starts at once.
	if ka, again := s.keepalive(subnet, low, high, want, now, false); ka != want || again != 0 {
		t.Fatalf("lower key: keepalive %v, recheck %v", ka, again)
	}
	// The higher key waits, then starts.
	if ka, again := s.keepalive(subnet, high, low, want, now, false); ka != 0 || again != initiateDelay {
		t.Fatalf("higher key, new peer: keepalive %v, recheck %v", ka, again)
	}
	if ka, again := s.keepalive(subnet, high, low, want, now.Add(initiateDelay/2), false); ka != 0 || again != initiateDelay/2 {
		t.Fatalf("higher key, half-way: keepalive %v, recheck %v", ka, again)
	}
	if ka, _ := s.keepalive(subnet, high, low, want, now.Add(initiateDelay), false); ka != want {
		t.Fatalf("higher key, after the delay: keepalive %v", ka)
	}
	// A peer that goes away and comes back is new again.
	s.forget(subnet, nil)
	if ka, _ := s.keepalive(subnet, high, low, want, now.Add(time.Hour), false); ka != 0 {
		t.Fatal("returning peer not delayed")
	}
	// Peers known at start are not delayed.
	s2 := newStagger()
	s2.known(subnet, low)
	if ka, _ := s2.keepalive(subnet, high, low, want, now, false); ka != want {
		t.Fatal("peer known at start delayed")
	}
	// Flipped (after a failed attempt to punch through NAT), the higher
	// key goes first and the lower waits; a restart delays it again.
	s3 := newStagger()
	if ka, _ := s3.keepalive(subnet, high, low, want, now, true); ka != want {
		t.Fatal("flipped: the higher key waits")
	}
	if ka, again := s3.keepalive(subnet, low, high, want, now, true); ka != 0 || again != initiateDelay {
		t.Fatalf("flipped: the lower key: keepalive %v, recheck %v", ka, again)
	}
	s3.restart(subnet, high, now.Add(time.Hour))
	if ka, _ := s3.keepalive(subnet, low, high, want, now.Add(time.Hour), true); ka != 0 {
		t.Fatal("a restarted peer is not delayed")
	}
	// No keepalive wanted: nothing to stagger.
	if ka, again := s2.keepalive(subnet, high, crypto.PublicKey{0}, 0, now, false); ka != 0 || again != 0 {
		t.Fatal("keepalive 0 staggered")
	}
}
