package driver

import (
	"bytes"
	"hash/fnv"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/wgmesh/wgmesh/driver/dataplane"
	"github.com/wgmesh/wgmesh/mesh"
)

// Paths to WireGuard peers: direct, through NAT, or through a relay.
//
// Each host of a pair decides on its own, from the same gossip, and the
// two meet: a host publishes in its network entry, per peer, whether it
// wants the pair relayed (and through whom) or is ready to try direct
// again; the pair is relayed while either host wants it, through the
// relay the lower-named host names, and the relay opens a session for it
// (relayhost.go). Both hosts then point the peer at the relay's session
// port, and start it over (a new generation: WireGuard handshakes at once).
//
//	        new peer
//	           │ direct expected?
//	    yes ───┴─── no (both behind NAT, one maps per destination)
//	     ▼                       ▼
//	 ATTEMPT: endpoint = the  RELAYED: endpoint = relay session
//	 peer's direct address        ▲  │ retry due, direct expected, and
//	 (public one behind NAT)      │  │ the peer's gossip arrives directly:
//	     │ handshake within       │  │ ready to try direct; when both are
//	     │ PunchTimeout           │  ▼ ready, both ATTEMPT at once
//	     ▼                        │
//	  DIRECT ── no handshake for 200 s, or nothing received
//	            for two keepalives ──────▶ (a failure: retry after
//	 ATTEMPT ── no handshake in time ────▶  DirectRetry·2^(failures-1))
//
// Punching through two NATs that keep one mapping per source: both hosts
// start the peer over at the same moment (each when gossip shows the
// pair direct again), so both send handshakes to the other's public
// address; the first opens its own NAT and is dropped at the other, the
// second crosses both. Which host sends first alternates with every
// failed attempt (the stagger): a NAT whose own stack answers unsolicited
// packets keeps, from the first packet that reached it, a mapping that
// makes its host's reply leave from another port, which spoils the
// attempt where that host goes second.

// pathKey names a peer of a network.
type pathKey struct {
	subnet netip.Prefix
	peer   string
}

// path is what the driver knows and decided about one peer.
type path struct {
	// want is this host's published wish for the pair (when wanting).
	want    mesh.RelayWant
	wanting bool
	// relayed: the peer is pointed at relay via's session, endpoint.
	relayed  bool
	via      string
	endpoint netip.AddrPort
	relayEP  netip.AddrPort
	gen      uint64
	// attempt is when the current direct attempt began (zero: none);
	// retryAt when this host may try direct again; since when the
	// current mode began.
	attempt time.Time
	retryAt time.Time
	since   time.Time
	noRelay bool
	// From WireGuard: the last handshake, bytes received and when they
	// last grew, and the endpoint it sends to (after roaming).
	handshake time.Time
	rx        int64
	rxAt      time.Time
	inUse     netip.AddrPort
	// flip: the peer sends first (see the stagger).
	flip bool
	// started: step has seen the peer.
	started bool
	// pathMTU is the path MTU of the last decision.
	pathMTU int
	// failed are the relays that did not work for the pair (no session,
	// or no handshake through it, within the punch timeout), each left
	// out until its time; relayFails counts such failures in a row, for
	// the backoff. waitVia is the relay the pair is to go through, and
	// waitSince when it became so.
	failed     map[string]time.Time
	relayFails int
	waitVia    string
	waitSince  time.Time

	// tx is the bytes sent; trying is when they first grew after the
	// last handshake went stale (WireGuard sends handshake initiations
	// to send anything then).
	tx     int64
	trying time.Time
}

// excluded reports whether relay failed for the pair lately.
func (p *path) excluded(relay string, now time.Time) bool {
	until, ok := p.failed[relay]
	return ok && now.Before(until)
}

// paths holds every peer's path. Not safe for concurrent use: the driver
// calls it with its mutex held.
type paths struct {
	log          *slog.Logger
	punchTimeout time.Duration
	directRetry  time.Duration
	keepalive    time.Duration
	m            map[pathKey]*path
}

// maxRetry caps the wait before another direct attempt.
const maxRetry = 30 * time.Minute

// Broken-path detection.
const (
	// handshakeStale: WireGuard handshakes every 2 minutes while it
	// sends; older than this, the session is gone.
	handshakeStale = 200 * time.Second
	// sightingFresh: a handshake this recent makes its endpoint an
	// observation worth telling the peer.
	sightingFresh = 150 * time.Second
)

func newPaths(log *slog.Logger, punch, retry, keepalive time.Duration) *paths {
	return &paths{log: log, punchTimeout: punch, directRetry: retry, keepalive: keepalive, m: map[pathKey]*path{}}
}

func (ps *paths) get(k pathKey) *path {
	p, ok := ps.m[k]
	if !ok {
		p = &path{}
		ps.m[k] = p
	}
	return p
}

// observe records WireGuard's view of a peer's session, read at taken.
// A view older than the peer's current attempt is of the session before
// it (a started-over peer shows no handshake until its new one), and is
// ignored.
func (ps *paths) observe(k pathKey, st dataplane.PeerStatus, taken, now time.Time) {
	p, ok := ps.m[k]
	if !ok || taken.Before(p.attempt) || taken.Before(p.since) {
		return
	}
	p.handshake, p.inUse = st.LastHandshake, st.Endpoint
	if st.RxBytes != p.rx || p.rxAt.IsZero() {
		if st.RxBytes > p.rx || p.rxAt.IsZero() {
			p.rxAt = now
		}
		p.rx = st.RxBytes
	}
	if st.TxBytes > p.tx && (p.handshake.IsZero() || now.Sub(p.handshake) > handshakeStale) && !p.trying.After(p.handshake) {
		p.trying = now
	}
	p.tx = st.TxBytes
}

// forget drops the paths of subnet's peers not in keep; with keep nil,
// all of subnet's.
func (ps *paths) forget(subnet netip.Prefix, keep map[string]bool) {
	for k := range ps.m {
		if k.subnet == subnet && !keep[k.peer] {
			delete(ps.m, k)
		}
	}
}

// forgetSubnetsExcept drops the paths of networks not in keep.
func (ps *paths) forgetSubnetsExcept(keep map[netip.Prefix]bool) {
	for k := range ps.m {
		if !keep[k.subnet] {
			delete(ps.m, k)
		}
	}
}

// busy reports whether a path is changing: direct attempts, relays being
// set up. The driver then looks at WireGuard every second.
func (ps *paths) busy() bool {
	for _, p := range ps.m {
		if !p.attempt.IsZero() || p.wanting && !p.relayed && p.want.Via != "" {
			return true
		}
	}
	return false
}

// expectDirect reports whether a direct path to the peer can work: one of
// the two is reachable at its own address (the other then reaches it),
// or both are behind NATs that keep one mapping per source and can punch
// through; not when both are behind NAT and one maps each destination to
// a port of its own. A peer this host hears directly at the address it
// advertises (the same private network) is always direct.
func expectDirect(self mesh.NATKind, p mesh.Peer, peerMember mesh.Member, now time.Time) bool {
	if peerMember.Direct(now) && peerMember.Sighted.Addr() == p.Endpoint.Addr() {
		return true
	}
	if !self.Behind() || !p.NAT.Behind() {
		return true
	}
	return self != mesh.NATSymmetric && p.NAT != mesh.NATSymmetric
}

// directEndpoint is where to send the peer's WireGuard packets directly:
// its own address if this host hears it there (a public host, or one of
// the same private network), else where members outside its NAT see it,
// else its own address.
func directEndpoint(p mesh.Peer, peerMember mesh.Member, now time.Time) netip.AddrPort {
	switch {
	case peerMember.Direct(now) && peerMember.Sighted.Addr() == p.Endpoint.Addr():
		return p.Endpoint
	case p.Public.IsValid():
		return p.Public
	}
	return p.Endpoint
}

// usableRelay reports whether a member may relay the pair a, b: it
// relays, is registered and alive, and is neither of the pair.
func usableRelay(v *mesh.View, name, a, b string) bool {
	m, ok := v.Members[name]
	return ok && name != a && name != b && m.Relay() && m.Registered && m.State == mesh.Alive
}

// chooseRelay picks the relay for a pair on a network: of the usable
// relays that skip does not leave out and that have a port left, the one
// least loaded (its open sessions, other than the pair's, per port it
// has), and of those equally loaded the one with the highest hash of its
// name and the pair's. Both hosts of the pair pick the same while their
// views agree; where they differ, the lower-named host's pick counts
// (pairRelay). A pair keeps its relay while it works (pickRelay): load
// steers only new choices, so pairs do not chase each other around.
func chooseRelay(v *mesh.View, subnet netip.Prefix, a, b string, skip func(string) bool) string {
	if a > b {
		a, b = b, a
	}
	load := map[string]int{}
	for _, r := range v.Sessions {
		if r.Port != 0 && !(r.Subnet == subnet && r.A == a && r.B == b) {
			load[r.Relay]++
		}
	}
	best, bestLoad, bestScore := "", 0.0, uint64(0)
	for _, name := range slices.Sorted(maps.Keys(v.Members)) {
		if !usableRelay(v, name, a, b) || skip != nil && skip(name) {
			continue
		}
		ports := max(int(v.Members[name].RelayPorts)-1, 1)
		if load[name] >= ports {
			continue
		}
		l := float64(load[name]) / float64(ports)
		h := fnv.New64a()
		h.Write([]byte(name + "|" + a + "|" + b + "|" + subnet.String()))
		if s := h.Sum64(); best == "" || l < bestLoad || l == bestLoad && s > bestScore {
			best, bestLoad, bestScore = name, l, s
		}
	}
	return best
}

// pickRelay is the relay this host names for the pair: the lower-named
// peer's choice if it names one (so that both name the same and no
// second relay opens a session for nothing), else the one this host
// named, else a new choice; never one that failed for the pair lately.
func (p *path) pickRelay(now time.Time, v *mesh.View, subnet netip.Prefix, peer mesh.Peer) string {
	ok := func(name string) bool {
		return name != "" && usableRelay(v, name, v.Self, peer.Node) && !p.excluded(name, now)
	}
	switch {
	case peer.Node < v.Self && peer.HasWant && ok(peer.Wants.Via):
		return peer.Wants.Via
	case p.wanting && ok(p.want.Via):
		return p.want.Via
	}
	return chooseRelay(v, subnet, v.Self, peer.Node, func(name string) bool { return p.excluded(name, now) })
}

// pairRelay is the pair's decision: relayed while either host wants it,
// through the relay the lower-named host names (else the other's).
func pairRelay(self string, p *path, peer mesh.Peer) (bool, string) {
	mine := ""
	if p.wanting {
		mine = p.want.Via
	}
	theirs := ""
	if peer.HasWant {
		theirs = peer.Wants.Via
	}
	if mine == "" && theirs == "" {
		return false, ""
	}
	lower, higher := mine, theirs
	if peer.Node < self {
		lower, higher = theirs, mine
	}
	if lower != "" {
		return true, lower
	}
	return true, higher
}

func (p *path) tries(peer mesh.Peer) int {
	t := 0
	if p.wanting {
		t = p.want.Tries
	}
	if peer.HasWant {
		t = max(t, peer.Wants.Tries)
	}
	return t
}

func (ps *paths) backoff(tries int) time.Duration {
	d := ps.directRetry
	for i := 1; i < tries && d < maxRetry; i++ {
		d *= 2
	}
	return min(d, maxRetry)
}

// step advances this host's wish for one peer from what WireGuard and
// gossip show, and reports whether the wish changed.
func (ps *paths) step(now time.Time, v *mesh.View, subnet netip.Prefix, peer mesh.Peer) bool {
	k := pathKey{subnet, peer.Node}
	p := ps.get(k)
	self := v.Members[v.Self]
	peerMember := v.Members[peer.Node]
	expect := expectDirect(self.NAT, peer, peerMember, now)
	relay := p.pickRelay(now, v, subnet, peer)
	before, wasWanting := p.want, p.wanting
	relayed, via := pairRelay(v.Self, p, peer)
	fail := func(why string) {
		tries := min(p.tries(peer)+1, 1000)
		p.attempt = time.Time{}
		p.retryAt = now.Add(ps.backoff(tries))
		ps.log.Info("no direct path to peer: "+why, "network", subnet, "peer", peer.Node, "relay", relay, "failures", tries,
			"retry_in", ps.backoff(tries))
		if relay == "" {
			// Nobody to relay: try direct again later.
			p.noRelay = true
			p.want, p.wanting = mesh.RelayWant{Tries: tries}, true
			return
		}
		p.noRelay = false
		p.want, p.wanting = mesh.RelayWant{Via: relay, Tries: tries}, true
	}
	if relayed && p.attempt.IsZero() && p.started {
		ps.checkRelay(now, v, subnet, p, peer, via)
		relayed, _ = pairRelay(v.Self, p, peer)
		relay = p.pickRelay(now, v, subnet, peer)
	} else if !relayed {
		p.waitVia = ""
	}
	if !p.started {
		// A new peer: try direct (decide has begun the attempt), unless
		// it cannot work.
		p.started = true
		if p.since.IsZero() {
			p.since = now
		}
		if !expect && relay != "" && !relayed {
			ps.log.Info("peer behind NAT that cannot be punched through: asking a relay", "network", subnet, "peer", peer.Node,
				"relay", relay, "nat", string(self.NAT), "peer_nat", string(peer.NAT))
			p.want, p.wanting, p.attempt = mesh.RelayWant{Via: relay}, true, time.Time{}
			return true
		}
		if p.attempt.IsZero() && !relayed && !p.relayed {
			p.attempt = now
		}
	}
	switch {
	case !p.attempt.IsZero():
		switch {
		case relayed:
			// The peer chose the relay meanwhile.
			p.attempt = time.Time{}
		case !p.handshake.IsZero() && now.Sub(p.handshake) < handshakeStale && p.inUse != p.relayEP:
			// Observations older than the attempt were ignored: this
			// is a handshake of the path being tried.
			ps.log.Info("direct path to peer", "network", subnet, "peer", peer.Node, "endpoint", p.inUse, "took", now.Sub(p.attempt).Round(time.Millisecond))
			p.attempt = time.Time{}
			p.want, p.wanting, p.noRelay = mesh.RelayWant{}, false, false
		case now.Sub(p.attempt) >= ps.punchTimeout:
			fail("no handshake within " + ps.punchTimeout.String())
		}
	case !relayed:
		if p.noRelay && now.After(p.retryAt) {
			if relay != "" {
				fail("a relay is available now")
			} else {
				p.attempt = now
			}
			break
		}
		if ps.broken(p, now) {
			fail("the session stopped")
		}
	case p.wanting && p.want.Via != "":
		if relay != "" && relay != p.want.Via {
			p.want.Via = relay
		}
		if expect && !now.Before(p.retryAt) && peerMember.Direct(now) {
			// Ready to try direct again; the pair goes direct when the
			// peer is ready too.
			ps.log.Debug("ready to try a direct path again", "network", subnet, "peer", peer.Node)
			p.want.Via = ""
		}
	case p.wanting && p.want.Via == "":
		if !expect && relay != "" {
			p.want.Via = relay
		}
	}
	return p.wanting != wasWanting || p.want != before
}

// checkRelay checks the relay the pair goes through, as a direct path is
// checked: a relay that opens no session for the pair (it refused, its
// ports exhausted), or through which no handshake comes within the punch
// timeout (its relay port firewalled, a bind that failed), or whose
// session stops, is left out for a while (backing off like direct
// retries) and this host names the next one; with none left, the pair
// has no relay that works (status says so) until one is let in again.
func (ps *paths) checkRelay(now time.Time, v *mesh.View, subnet netip.Prefix, p *path, peer mesh.Peer, via string) {
	if via != p.waitVia {
		p.waitVia, p.waitSince = via, now
	}
	var why string
	switch {
	case p.relayed && p.via == via:
		if ps.broken(p, now) {
			why = "no WireGuard handshake through it within " + ps.punchTimeout.String()
		} else if !p.handshake.IsZero() && !p.handshake.Before(p.since) {
			p.relayFails, p.noRelay = 0, false
			delete(p.failed, via)
		}
	case now.Sub(p.waitSince) >= ps.punchTimeout:
		why = "it opened no session for the pair within " + ps.punchTimeout.String()
	}
	if why == "" || p.excluded(via, now) {
		return
	}
	p.relayFails = min(p.relayFails+1, 1000)
	if p.failed == nil {
		p.failed = map[string]time.Time{}
	}
	p.failed[via] = now.Add(ps.backoff(p.relayFails))
	next := p.pickRelay(now, v, subnet, peer)
	ps.log.Warn("relay does not work for peer: "+why, "network", subnet, "peer", peer.Node, "relay", via, "next", next,
		"retry_in", ps.backoff(p.relayFails))
	p.waitVia, p.waitSince = next, now
	p.want, p.wanting, p.noRelay = mesh.RelayWant{Via: next, Tries: p.tries(peer)}, true, next == ""
	if next == "" {
		p.retryAt = now.Add(ps.backoff(p.relayFails))
	}
}

// broken reports whether an established direct session stopped working.
func (ps *paths) broken(p *path, now time.Time) bool {
	if p.handshake.IsZero() || now.Sub(p.handshake) > handshakeStale {
		if ps.keepalive <= 0 && !p.handshake.IsZero() {
			// Without keepalives WireGuard handshakes only while it
			// sends: an idle session goes stale and still works. It is
			// broken when WireGuard has tried to send for a punch
			// timeout and no handshake came.
			return p.trying.After(p.handshake) && now.Sub(p.trying) > ps.punchTimeout
		}
		return !p.since.IsZero() && now.Sub(p.since) > ps.punchTimeout
	}
	if ps.keepalive > 0 && !p.rxAt.IsZero() && now.Sub(p.rxAt) > 2*ps.keepalive+15*time.Second {
		return true
	}
	return false
}

// decision is what the data plane gets for one peer.
type decision struct {
	endpoint netip.AddrPort
	gen      uint64
	relayed  bool
	via      string
	pathMTU  int
	// flip: the peer sends first after the peer starts over.
	flip bool
	// restarted: the peer starts over now (the stagger starts again).
	restarted bool
}

// decide returns the endpoint for one peer, and starts the peer over
// when its path changes: to a relay, back to direct, or to another
// direct address while no session runs.
func (ps *paths) decide(now time.Time, v *mesh.View, subnet netip.Prefix, peer mesh.Peer) decision {
	p := ps.get(pathKey{subnet, peer.Node})
	if p.since.IsZero() {
		p.since = now
		p.attempt = now
	}
	peerMember := v.Members[peer.Node]
	relayed, via := pairRelay(v.Self, p, peer)
	d := decision{}
	if relayed {
		relayMember, ok := v.Members[via]
		sess, hasSession := v.Session(via, subnet, v.Self, peer.Node)
		if ok && hasSession {
			ep := netip.AddrPortFrom(relayMember.Addr, sess.Port)
			if !p.relayed || p.endpoint != ep {
				ps.log.Info("peer reached through a relay", "network", subnet, "peer", peer.Node, "relay", via, "endpoint", ep)
				p.relayed, p.via, p.relayEP, p.since, p.attempt = true, via, ep, now, time.Time{}
				p.gen++
				d.restarted = true
			}
			d.endpoint, d.relayed, d.via = ep, true, via
			d.pathMTU = minPositive(relayMember.PathMTU, sess.MTU)
		} else {
			// The relay has not opened the session yet: keep what runs.
			d.endpoint = p.endpoint
			if !d.endpoint.IsValid() {
				d.endpoint = directEndpoint(peer, peerMember, now)
			}
			d.relayed, d.via = p.relayed, p.via
			if p.relayed {
				d.pathMTU = v.Members[p.via].PathMTU
			} else {
				d.pathMTU = peerMember.PathMTU
			}
		}
	} else {
		ep := directEndpoint(peer, peerMember, now)
		live := !p.handshake.IsZero() && now.Sub(p.handshake) < handshakeStale && p.inUse != p.relayEP
		switch {
		case p.relayed:
			// Both hosts are ready to try direct: both start over now.
			ps.log.Info("trying a direct path to peer again", "network", subnet, "peer", peer.Node, "endpoint", ep)
			p.relayed, p.via, p.since, p.attempt = false, "", now, now
			p.gen++
			d.restarted = true
		case p.endpoint.IsValid() && ep != p.endpoint && !live:
			// A better address (a public one learned) and no session to
			// lose: try it at once.
			p.attempt = now
			p.gen++
			d.restarted = true
		case live && p.endpoint.IsValid():
			// Keep the address the session runs on.
			ep = p.endpoint
		}
		d.endpoint = ep
		d.pathMTU = peerMember.PathMTU
	}
	p.endpoint, p.pathMTU = d.endpoint, d.pathMTU
	d.gen = p.gen
	d.flip = flipFirst(v, peer, p.tries(peer))
	p.flip = d.flip
	return d
}

// flipFirst decides which host of a pair starts the first handshake of a
// started-over peer (see the stagger): normally the one with the lower
// key, flip makes it the other. Its handshake is dropped if the other
// host does not know it yet, and the other's, a moment later, must then
// reach it: so where only one of the two is reachable at its own
// address, that one goes first. Between two hosts behind NAT it
// alternates with every failed attempt.
func flipFirst(v *mesh.View, peer mesh.Peer, tries int) bool {
	self := v.Members[v.Self]
	selfLower := bytes.Compare(self.PublicKey[:], peer.PublicKey[:]) < 0
	var selfFirst bool
	switch {
	case self.NAT == mesh.NATNone && peer.NAT.Behind():
		selfFirst = true
	case self.NAT.Behind() && peer.NAT == mesh.NATNone:
		selfFirst = false
	default:
		selfFirst = selfLower != (tries%2 == 1)
	}
	return selfFirst != selfLower
}

func minPositive(a, b int) int {
	switch {
	case a <= 0:
		return max(b, 0)
	case b <= 0:
		return a
	}
	return min(a, b)
}

// routeMTU is the inner MTU for a peer whose path takes pathMTU-byte IP
// packets, 0 when that is no less than the network's: WireGuard's
// overhead off, rounded down to 16 bytes, since wireguard-go pads a
// packet up to a multiple of 16 within the link's MTU, not the route's.
func routeMTU(pathMTU int, endpoint netip.AddrPort, networkMTU int) int {
	if pathMTU <= 0 {
		return 0
	}
	overhead := dataplane.OverheadIPv4
	if a := endpoint.Addr(); a.Is6() && !a.Is4In6() {
		overhead = dataplane.OverheadIPv6
	}
	if pathMTU-overhead >= networkMTU {
		return 0
	}
	return max((pathMTU-overhead)&^15, dataplane.MinMTU)
}

// pathInfo is how a peer is reached, for status.
type pathInfo struct {
	mode     string // "direct", "relayed", "trying" (a direct attempt), "waiting for relay"
	via      string
	pathMTU  int
	noRelay  bool
	since    time.Time
	endpoint netip.AddrPort
	// failedRelays are the relays that did not work for the pair lately.
	failedRelays []string
}

func (ps *paths) info(k pathKey, peer mesh.Peer, self string, now time.Time) pathInfo {
	p, ok := ps.m[k]
	if !ok {
		return pathInfo{mode: "trying"}
	}
	in := pathInfo{mode: "direct", via: p.via, pathMTU: p.pathMTU, noRelay: p.noRelay, since: p.since, endpoint: p.endpoint}
	for _, name := range slices.Sorted(maps.Keys(p.failed)) {
		if p.excluded(name, now) {
			in.failedRelays = append(in.failedRelays, name)
		}
	}
	relayed, via := pairRelay(self, p, peer)
	switch {
	case p.relayed:
		in.mode = "relayed"
	case relayed:
		in.mode, in.via = "waiting for relay", via
	case !p.attempt.IsZero():
		in.mode = "trying"
	}
	return in
}

// wishes returns this host's wishes for the peers of subnet.
func (ps *paths) wishes(subnet netip.Prefix) map[string]mesh.RelayWant {
	out := map[string]mesh.RelayWant{}
	for k, p := range ps.m {
		if k.subnet == subnet && p.wanting && (p.want.Via != "" || p.want.Tries > 0) {
			out[k.peer] = p.want
		}
	}
	return out
}

// sightings returns where this host sees each peer's WireGuard packets
// come from, by peer and network: its peers learn from it where they are
// seen (mesh.SetWGSightings). Relayed sessions tell nothing of that.
func (ps *paths) sightings(now time.Time) map[string]map[netip.Prefix]netip.AddrPort {
	out := map[string]map[netip.Prefix]netip.AddrPort{}
	for k, p := range ps.m {
		if p.relayed || !p.inUse.IsValid() || p.inUse == p.relayEP || p.handshake.IsZero() || now.Sub(p.handshake) > sightingFresh {
			continue
		}
		if out[k.peer] == nil {
			out[k.peer] = map[netip.Prefix]netip.AddrPort{}
		}
		out[k.peer][k.subnet] = p.inUse
	}
	return out
}
