package driver

import (
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/driver/dataplane"
)

// TestIdleDirectPairWithoutKeepalive: with --wg-keepalive 0 WireGuard
// handshakes only while it sends, so an idle direct pair shows no fresh
// handshake; it used to count as broken after 200 s and go to a relay.
// It is broken when WireGuard tries to send (its handshake initiations
// count as bytes sent) and no handshake comes.
func TestIdleDirectPairWithoutKeepalive(t *testing.T) {
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	k := pathKey{subnet, "y"}
	ps := newPaths(slog.New(slog.DiscardHandler), 8*time.Second, time.Minute, 0)
	start := time.Unix(1_000_000, 0)
	p := ps.get(k)
	p.started, p.since = true, start
	ep := netip.MustParseAddrPort("198.51.100.2:51820")
	hs := start.Add(time.Second)
	st := dataplane.PeerStatus{Endpoint: ep, LastHandshake: hs, RxBytes: 1000, TxBytes: 1000}
	for now := start; now.Before(start.Add(10 * time.Minute)); now = now.Add(5 * time.Second) {
		ps.observe(k, st, now, now)
		if ps.broken(p, now) {
			t.Fatalf("an idle direct pair counts as broken %s after its last handshake", now.Sub(hs))
		}
	}
	// Traffic again, and WireGuard's handshake initiations go unanswered:
	// broken once the punch timeout has passed.
	now := start.Add(10 * time.Minute)
	for i := range 4 {
		st.TxBytes += 148
		ps.observe(k, st, now, now)
		if i == 3 && !ps.broken(p, now) {
			t.Fatalf("a pair whose handshakes go unanswered for %s is not broken", 15*time.Second)
		}
		now = now.Add(5 * time.Second)
	}
}
