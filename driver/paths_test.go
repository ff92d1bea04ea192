package driver

import (
	"bytes"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/dataplane"
	"github.com/wgmesh/wgmesh/mesh"
)

// pathWorld simulates two hosts x and y of one network, a relay r, the
// gossip between them (each host's wishes, the relay's sessions) and
// WireGuard: a session comes up when both hosts point at each other
// through a path that works.
type pathWorld struct {
	t      *testing.T
	now    time.Time
	subnet netip.Prefix
	hosts  map[string]*simHost
	// direct: whether WireGuard's packets pass directly between x and y;
	// gossip: whether their gossip does (what tells them to try).
	direct, gossip bool
	// relayPort is the session the relay r opens while asked.
	relayPort uint16
	// relays are the members that relay, r first.
	relays []*simRelay
	// punches counts the times the two hosts started over toward each
	// other directly.
	handshakes int
}

type simHost struct {
	name    string
	nat     mesh.NATKind
	addr    netip.Addr
	public  netip.AddrPort
	paths   *paths
	dec     decision
	wishes  map[string]mesh.RelayWant
	session time.Time // last handshake of its session with the other
	rx      int64
	inUse   netip.AddrPort
}

var relayAddr = netip.MustParseAddr("192.0.2.100")

// simRelay is a relay: alive in gossip; opens a session for the pair when
// asked unless refuses; forwards it unless dead (a firewalled relay port).
type simRelay struct {
	name     string
	addr     netip.Addr
	port     uint16
	refuses  bool
	dead     bool
	sessions int // other pairs' sessions it relays (its load)
}

func (r *simRelay) endpoint() netip.AddrPort { return netip.AddrPortFrom(r.addr, r.port) }

// addRelay adds a relay besides r.
func (w *pathWorld) addRelay(name string, i byte) *simRelay {
	r := &simRelay{name: name, addr: netip.AddrFrom4([4]byte{192, 0, 2, 100 + i}), port: 51900 + uint16(i)}
	w.relays = append(w.relays, r)
	return r
}

func newPathWorld(t *testing.T, natX, natY mesh.NATKind) *pathWorld {
	w := &pathWorld{t: t, now: time.Unix(1_000_000, 0), subnet: netip.MustParsePrefix("10.60.0.0/16"), hosts: map[string]*simHost{}, relayPort: 51907}
	w.relays = []*simRelay{{name: "r", addr: relayAddr, port: w.relayPort}}
	w.hosts["x"] = &simHost{name: "x", nat: natX, addr: netip.MustParseAddr("10.1.0.2"), public: netip.MustParseAddrPort("198.51.100.1:51820"),
		paths: newPaths(slog.New(slog.DiscardHandler), 8*time.Second, time.Minute, 25*time.Second)}
	w.hosts["y"] = &simHost{name: "y", nat: natY, addr: netip.MustParseAddr("10.2.0.2"), public: netip.MustParseAddrPort("198.51.100.2:51820"),
		paths: newPaths(slog.New(slog.DiscardHandler), 8*time.Second, time.Minute, 25*time.Second)}
	return w
}

func (w *pathWorld) other(h *simHost) *simHost {
	if h.name == "x" {
		return w.hosts["y"]
	}
	return w.hosts["x"]
}

// view is what host h sees: itself, the other host, the relay, and the
// relay's session if either host asks it.
func (w *pathWorld) view(h *simHost) (*mesh.View, mesh.Peer) {
	o := w.other(h)
	v := &mesh.View{Self: h.name, Members: map[string]mesh.Member{}}
	for _, x := range []*simHost{h, o} {
		m := mesh.Member{NodeInfo: mesh.NodeInfo{Name: x.name, Addr: x.addr, NAT: x.nat}, State: mesh.Alive, Registered: true, Self: x == h, PathMTU: 1400}
		if x.nat.Behind() {
			m.Seen = netip.AddrPortFrom(x.public.Addr(), 7946)
		}
		if x != h && (w.direct || w.gossip) {
			m.Sighted, m.SightedAt = netip.AddrPortFrom(x.public.Addr(), 7946), w.now
		}
		v.Members[x.name] = m
	}
	for _, r := range w.relays {
		v.Members[r.name] = mesh.Member{NodeInfo: mesh.NodeInfo{Name: r.name, Addr: r.addr, NAT: mesh.NATNone, RelayPort: 51900, RelayPorts: 100},
			State: mesh.Alive, Registered: true, PathMTU: 1280}
		for i := range r.sessions {
			v.Sessions = append(v.Sessions, mesh.RelaySession{Relay: r.name, Subnet: w.subnet, A: "p" + strconv.Itoa(i), B: "q", Port: 51950 + uint16(i)})
		}
		asked := false
		for _, x := range []*simHost{h, o} {
			for _, want := range x.wishes {
				asked = asked || want.Via == r.name
			}
		}
		if asked && !r.refuses {
			v.Sessions = append(v.Sessions, mesh.RelaySession{Relay: r.name, Subnet: w.subnet, A: "x", B: "y", Port: r.port, MTU: 1400})
		}
	}
	p := mesh.Peer{Node: o.name, PublicKey: crypto.PublicKey{o.name[0]}, Endpoint: netip.AddrPortFrom(o.addr, 51820), NAT: o.nat, State: mesh.Alive}
	if o.nat == mesh.NATConsistent {
		p.Public = o.public
	}
	p.Wants, p.HasWant = o.wishes[h.name]
	return v, p
}

// tick advances time by d, then runs each host as the driver does: a
// decision (desiredLocked), WireGuard, then a step (evaluatePaths).
func (w *pathWorld) tick(d time.Duration) {
	w.now = w.now.Add(d)
	for _, h := range []*simHost{w.hosts["x"], w.hosts["y"]} {
		v, p := w.view(h)
		prev := h.dec.gen
		h.dec = h.paths.decide(w.now, v, w.subnet, p)
		if h.dec.gen != prev {
			h.session, h.inUse = time.Time{}, netip.AddrPort{}
		}
	}
	x, y := w.hosts["x"], w.hosts["y"]
	viaRelay := false
	for _, r := range w.relays {
		viaRelay = viaRelay || !r.dead && x.dec.endpoint == r.endpoint() && y.dec.endpoint == r.endpoint()
	}
	directly := w.direct && x.dec.endpoint == y.public && y.dec.endpoint == x.public
	if viaRelay || directly {
		for _, h := range []*simHost{x, y} {
			if h.session.IsZero() {
				w.handshakes++
			}
			h.session, h.inUse = w.now, h.dec.endpoint
			h.rx += 100
		}
	}
	for _, h := range []*simHost{x, y} {
		v, p := w.view(h)
		k := pathKey{w.subnet, p.Node}
		if _, ok := h.paths.m[k]; ok {
			h.paths.observe(k, dataplane.PeerStatus{LastHandshake: h.session, RxBytes: h.rx, Endpoint: h.inUse}, w.now, w.now)
		}
		h.paths.step(w.now, v, w.subnet, p)
		h.wishes = h.paths.wishes(w.subnet)
	}
}

// run ticks until cond holds, and returns how long it took.
func (w *pathWorld) run(limit time.Duration, what string, cond func() bool) time.Duration {
	w.t.Helper()
	start := w.now
	for w.now.Sub(start) <= limit {
		w.tick(250 * time.Millisecond)
		if cond() {
			return w.now.Sub(start)
		}
	}
	w.t.Fatalf("%s: not after %s; x %+v %+v, y %+v %+v", what, limit, w.hosts["x"].dec, w.hosts["x"].wishes, w.hosts["y"].dec, w.hosts["y"].wishes)
	return 0
}

func (w *pathWorld) both(mode string) bool {
	for _, h := range w.hosts {
		o := w.other(h)
		v, p := w.view(h)
		_ = v
		if h.paths.info(pathKey{w.subnet, o.name}, p, h.name, w.now).mode != mode || h.session.IsZero() {
			return false
		}
	}
	return true
}

func TestPathPunchesThroughConsistentNATs(t *testing.T) {
	w := newPathWorld(t, mesh.NATConsistent, mesh.NATConsistent)
	w.direct = true
	took := w.run(5*time.Second, "direct", func() bool { return w.both("direct") })
	if took > time.Second {
		t.Errorf("punching took %s", took)
	}
	for _, h := range w.hosts {
		if h.dec.endpoint != w.other(h).public || len(h.wishes) != 0 || h.dec.relayed {
			t.Fatalf("%s: %+v wishes %v", h.name, h.dec, h.wishes)
		}
	}
	// It stays so, without starting over.
	for range 1200 {
		w.tick(250 * time.Millisecond)
	}
	if !w.both("direct") || w.handshakes != 2 {
		t.Fatalf("not steady: handshakes %d, %+v", w.handshakes, w.hosts["x"].dec)
	}
}

func TestPathFallsBackToRelayAndReturns(t *testing.T) {
	w := newPathWorld(t, mesh.NATConsistent, mesh.NATConsistent)
	took := w.run(20*time.Second, "relayed", func() bool { return w.both("relayed") })
	if took < 8*time.Second || took > 10*time.Second {
		t.Errorf("falling back took %s, want the punch timeout (8 s) and little more", took)
	}
	x := w.hosts["x"]
	if x.dec.endpoint != netip.AddrPortFrom(relayAddr, w.relayPort) || x.dec.via != "r" || x.wishes["y"].Tries != 1 {
		t.Fatalf("x: %+v %v", x.dec, x.wishes)
	}
	// The relayed path's MTU is the smaller of this host's to the relay
	// and the relay's to the pair.
	if x.dec.pathMTU != 1280 {
		t.Errorf("relayed path MTU %d, want 1280", x.dec.pathMTU)
	}
	// The next direct attempt goes the other way round (the stagger).
	if !x.dec.flip {
		t.Error("after one failure the peer does not go first")
	}
	// Direct starts working: after the retry delay both try again, at
	// once, and stay direct.
	w.direct = true
	took = w.run(3*time.Minute, "direct again", func() bool { return w.both("direct") })
	if took < time.Minute-time.Second || took > time.Minute+5*time.Second {
		t.Errorf("back to direct after %s, want about the retry delay (1m)", took)
	}
	for _, h := range w.hosts {
		if len(h.wishes) != 0 {
			t.Fatalf("%s still wishes %v", h.name, h.wishes)
		}
	}
}

func TestPathRetriesBackOff(t *testing.T) {
	w := newPathWorld(t, mesh.NATConsistent, mesh.NATConsistent)
	w.run(20*time.Second, "relayed", func() bool { return w.both("relayed") })
	// Gossip flows directly, WireGuard does not (its port is blocked):
	// every retry fails, and waits twice as long as the one before.
	w.gossip = true
	var attempts []time.Time
	wasTrying := false
	start := w.now
	for w.now.Sub(start) < 10*time.Minute {
		w.tick(250 * time.Millisecond)
		_, p := w.view(w.hosts["x"])
		trying := w.hosts["x"].paths.info(pathKey{w.subnet, "y"}, p, "x", w.now).mode == "trying"
		if trying && !wasTrying {
			attempts = append(attempts, w.now)
		}
		wasTrying = trying
	}
	if len(attempts) != 3 {
		t.Fatalf("%d attempts in 10 minutes, want 3 (after 1, 2 and 4 minutes): %v", len(attempts), attempts)
	}
	gap1, gap2 := attempts[1].Sub(attempts[0]), attempts[2].Sub(attempts[1])
	// Each wait starts when the attempt before failed, 8 s after it began.
	if gap1 < 2*time.Minute || gap1 > 2*time.Minute+12*time.Second || gap2 < 4*time.Minute || gap2 > 4*time.Minute+12*time.Second {
		t.Fatalf("retries %s and %s apart", gap1, gap2)
	}
	if w.hosts["x"].wishes["y"].Tries != 4 {
		t.Fatalf("wishes %v", w.hosts["x"].wishes)
	}
}

func TestPathSymmetricNATGoesStraightToRelay(t *testing.T) {
	w := newPathWorld(t, mesh.NATSymmetric, mesh.NATConsistent)
	w.gossip = true // gossip flows; WireGuard through both NATs would not
	took := w.run(5*time.Second, "relayed", func() bool { return w.both("relayed") })
	if took > time.Second {
		t.Errorf("relaying took %s: a direct attempt was made", took)
	}
	// It never tries direct: one side maps a port per destination.
	for range 2400 {
		w.tick(250 * time.Millisecond)
		if !w.both("relayed") {
			t.Fatalf("left the relay: %+v", w.hosts["x"].dec)
		}
	}
}

// TestPathHostsOfOnePrivateNetwork: two hosts behind the same NAT that
// hear each other at their own addresses go direct there, whatever their
// NAT does to the outside.
func TestPathHostsOfOnePrivateNetwork(t *testing.T) {
	w := newPathWorld(t, mesh.NATSymmetric, mesh.NATSymmetric)
	x, y := w.hosts["x"], w.hosts["y"]
	x.public, y.public = netip.AddrPortFrom(x.addr, 51820), netip.AddrPortFrom(y.addr, 51820)
	w.direct = true
	w.run(5*time.Second, "direct", func() bool { return w.both("direct") })
	if x.dec.endpoint != netip.AddrPortFrom(y.addr, 51820) {
		t.Fatalf("x sends to %s", x.dec.endpoint)
	}
}

func TestRouteMTU(t *testing.T) {
	v4 := netip.MustParseAddrPort("192.0.2.1:51820")
	v6 := netip.MustParseAddrPort("[2001:db8::1]:51820")
	for _, c := range []struct {
		path int
		ep   netip.AddrPort
		want int
	}{
		{0, v4, 0},       // not measured
		{1400, v4, 0},    // 1340 is the network's
		{1500, v4, 0},    // larger than the network's
		{1280, v4, 1216}, // 1220, rounded down to 16
		{1280, v6, 1200}, // IPv6 costs 20 more
		{600, v4, 576},   // never below the minimum
		{1399, v4, 1328}, // 1339 rounded down
	} {
		if got := routeMTU(c.path, c.ep, 1340); got != c.want {
			t.Errorf("path %d to %s: route MTU %d, want %d", c.path, c.ep, got, c.want)
		}
	}
}

func TestFlipFirst(t *testing.T) {
	low, high := crypto.PublicKey{1}, crypto.PublicKey{2}
	view := func(selfKey crypto.PublicKey, nat mesh.NATKind) *mesh.View {
		return &mesh.View{Self: "me", Members: map[string]mesh.Member{"me": {NodeInfo: mesh.NodeInfo{Name: "me", PublicKey: selfKey, NAT: nat}}}}
	}
	// first reports whether this host starts first.
	first := func(selfKey crypto.PublicKey, selfNAT mesh.NATKind, peerKey crypto.PublicKey, peerNAT mesh.NATKind, tries int) bool {
		flip := flipFirst(view(selfKey, selfNAT), mesh.Peer{PublicKey: peerKey, NAT: peerNAT}, tries)
		return (bytes.Compare(selfKey[:], peerKey[:]) < 0) != flip
	}
	for _, c := range []struct {
		name             string
		selfKey, peerKey crypto.PublicKey
		selfNAT, peerNAT mesh.NATKind
		tries            int
		want             bool
	}{
		{"both reachable: the lower key", low, high, mesh.NATNone, mesh.NATNone, 0, true},
		{"both reachable: not the higher key", high, low, mesh.NATNone, mesh.NATNone, 0, false},
		{"the reachable one, though its key is higher", high, low, mesh.NATNone, mesh.NATSymmetric, 0, true},
		{"not the one behind NAT, though its key is lower", low, high, mesh.NATConsistent, mesh.NATNone, 0, false},
		{"both behind NAT: the lower key first", low, high, mesh.NATConsistent, mesh.NATConsistent, 0, true},
		{"both behind NAT, after one failure: the other", low, high, mesh.NATConsistent, mesh.NATConsistent, 1, false},
		{"both behind NAT, after two: the lower again", low, high, mesh.NATConsistent, mesh.NATConsistent, 2, true},
	} {
		if got := first(c.selfKey, c.selfNAT, c.peerKey, c.peerNAT, c.tries); got != c.want {
			t.Errorf("%s: this host first %v", c.name, got)
		}
		// The peer, deciding the same, must come out the other way.
		if got := first(c.peerKey, c.peerNAT, c.selfKey, c.selfNAT, c.tries); got == c.want {
			t.Errorf("%s: both hosts decide the same", c.name)
		}
	}
}

// pairVia is the relay the pair x, y is relayed through, when both are.
func (w *pathWorld) pairVia() string {
	x, y := w.hosts["x"], w.hosts["y"]
	if !w.both("relayed") || x.dec.via != y.dec.via {
		return ""
	}
	return x.dec.via
}

// TestPathRelayThatDoesNotForward: the relay the pair picks is alive in
// gossip and opens the session, but its port is blocked. With no
// handshake through it within the punch timeout the pair moves to the
// next relay, and stays there.
func TestPathRelayThatDoesNotForward(t *testing.T) {
	w := newPathWorld(t, mesh.NATSymmetric, mesh.NATSymmetric)
	w.gossip = true
	w.addRelay("r2", 2)
	w.addRelay("r3", 3)
	v, _ := w.view(w.hosts["x"])
	first := chooseRelay(v, w.subnet, "x", "y", nil)
	for _, r := range w.relays {
		r.dead = r.name == first
	}
	took := w.run(time.Minute, "relayed through a live relay", func() bool { v := w.pairVia(); return v != "" && v != first })
	if took > 20*time.Second {
		t.Errorf("leaving the dead relay %s took %s, want about the punch timeout (8 s)", first, took)
	}
	via := w.pairVia()
	for range 2400 {
		w.tick(250 * time.Millisecond)
		if w.pairVia() != via {
			t.Fatalf("left the working relay %s: %+v", via, w.hosts["x"].dec)
		}
	}
}

// TestPathRelayRefuses: the relay picked never opens a session (its
// ports are exhausted): the pair asks the next one.
func TestPathRelayRefuses(t *testing.T) {
	w := newPathWorld(t, mesh.NATSymmetric, mesh.NATSymmetric)
	w.gossip = true
	w.addRelay("r2", 2)
	v, _ := w.view(w.hosts["x"])
	first := chooseRelay(v, w.subnet, "x", "y", nil)
	for _, r := range w.relays {
		r.refuses = r.name == first
	}
	took := w.run(time.Minute, "relayed through the other relay", func() bool { v := w.pairVia(); return v != "" && v != first })
	if took > 20*time.Second {
		t.Errorf("leaving the refusing relay %s took %s", first, took)
	}
}

// TestPathNoRelayWorks: every relay is dead. Status says so, and the
// relays are tried again, backing off; once one works the pair uses it.
func TestPathNoRelayWorks(t *testing.T) {
	w := newPathWorld(t, mesh.NATSymmetric, mesh.NATSymmetric)
	w.gossip = true
	w.addRelay("r2", 2)
	for _, r := range w.relays {
		r.dead = true
	}
	info := func() pathInfo {
		_, p := w.view(w.hosts["x"])
		return w.hosts["x"].paths.info(pathKey{w.subnet, "y"}, p, "x", w.now)
	}
	w.run(time.Minute, "no relay works", func() bool { return len(info().failedRelays) == 2 && info().noRelay })
	asks, last := 0, ""
	for range 4 * 60 * 20 {
		w.tick(250 * time.Millisecond)
		if via := w.hosts["x"].wishes["y"].Via; via != last {
			if via != "" {
				asks++
			}
			last = via
		}
	}
	// Without backoff a relay would be asked every 8 s, 150 times in 20
	// minutes; backing off from 1 minute, doubling, far fewer.
	if asks < 2 || asks > 12 {
		t.Errorf("%d relays asked in 20 minutes with every relay dead, want a few, backing off", asks)
	}
	for _, r := range w.relays {
		r.dead = false
	}
	w.run(40*time.Minute, "relayed again", func() bool { return w.pairVia() != "" })
	for range 40 {
		w.tick(250 * time.Millisecond)
	}
	if in := info(); in.noRelay || in.mode != "relayed" {
		t.Errorf("relayed, yet status says no relay works: %+v", in)
	}
}

// TestPathSpreadsPairsByLoad: of two relays, new pairs go to the one with
// fewer sessions, whatever the hash says.
func TestPathSpreadsPairsByLoad(t *testing.T) {
	for i := range 12 {
		w := newPathWorld(t, mesh.NATSymmetric, mesh.NATSymmetric)
		w.subnet = netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/16", 60+i))
		w.gossip = true
		w.relays[0].sessions = 40
		w.addRelay("r2", 2)
		w.run(30*time.Second, "relayed", func() bool { return w.pairVia() != "" })
		if via := w.pairVia(); via != "r2" {
			t.Errorf("network %s: relayed through %s (40 sessions), not r2 (none)", w.subnet, via)
		}
	}
}
