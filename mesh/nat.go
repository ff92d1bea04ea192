package mesh

import (
	"cmp"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/wgmesh/wgmesh/mesh/gossipnet"
	"github.com/wgmesh/wgmesh/mesh/records"
)

// How a node learns how others see it. A host behind NAT does not know
// the address and ports its packets leave the NAT with; its peers do. So
// every node tells each member it hears from directly where that
// member's gossip comes from, and where its WireGuard handshakes come
// from on each network (an Observation, signed by the observer, sent to
// the subject alone). A node also asks relays (members that relay,
// reachable at the address they advertise) to reflect its gossip port's
// source back from a port of theirs other than the gossip port: what one
// destination sees against what another sees tells a NAT that maps each
// destination to a port of its own from one that keeps one mapping.
//
// From all of it the node decides itself, and publishes in its own
// signed records, how its NAT behaves and where members outside reach it:
// nobody can make a node publish an address its observers did not see,
// and no member can redirect another's traffic.

// Timing of observations.
const (
	// observeEvery: an observer repeats an unchanged observation this
	// often, so that its subject knows it still holds.
	observeEvery = 20 * time.Second
	// observationTTL: an observation not repeated for this long is
	// dropped.
	observationTTL = 90 * time.Second
	// reflectEvery: how often a node asks each relay to reflect its
	// gossip port's source.
	reflectEvery = 30 * time.Second
)

// natState is a node's judgement of its own NAT.
type natState struct {
	Kind NATKind
	// Seen is where members outside see the gossip port.
	Seen netip.AddrPort
	// WG is where they see each network's WireGuard port.
	WG map[netip.Prefix]netip.AddrPort
}

func (s natState) equal(o natState) bool {
	return s.Kind == o.Kind && s.Seen == o.Seen && maps.Equal(s.WG, o.WG)
}

// assessNAT judges a node's NAT from the sightings of its gossip port
// (observers' and relays' reflections: each from another destination)
// and of its WireGuard ports, against the addresses it advertises.
func assessNAT(local netip.AddrPort, gossip []netip.AddrPort, wgLocal map[netip.Prefix]netip.AddrPort, wg map[netip.Prefix][]netip.AddrPort) natState {
	st := natState{}
	if len(gossip) == 0 {
		return st
	}
	var outside []netip.AddrPort
	for _, a := range gossip {
		if a != local {
			outside = append(outside, a)
		}
	}
	if len(outside) == 0 {
		st.Kind = NATNone
	} else {
		ip := mostCommon(outside, func(a netip.AddrPort) netip.Addr { return a.Addr() }, netip.Addr.Compare)
		var same []netip.AddrPort
		for _, a := range outside {
			if a.Addr() == ip {
				same = append(same, a)
			}
		}
		port := mostCommon(same, netip.AddrPort.Port, cmp.Compare[uint16])
		st.Kind, st.Seen = NATConsistent, netip.AddrPortFrom(ip, port)
		for _, a := range same {
			if a.Port() != port {
				st.Kind = NATSymmetric
			}
		}
	}
	for subnet, seen := range wg {
		var out []netip.AddrPort
		for _, a := range seen {
			if a != wgLocal[subnet] {
				out = append(out, a)
			}
		}
		if len(out) == 0 {
			continue
		}
		if st.WG == nil {
			st.WG = map[netip.Prefix]netip.AddrPort{}
		}
		st.WG[subnet] = mostCommon(out, func(a netip.AddrPort) netip.AddrPort { return a }, netip.AddrPort.Compare)
	}
	return st
}

// mostCommon returns the key of xs seen most often; ties go to the lowest.
func mostCommon[T any, K comparable](xs []T, key func(T) K, compare func(K, K) int) K {
	count := map[K]int{}
	for _, x := range xs {
		count[key(x)]++
	}
	var best K
	n := 0
	for k, c := range count {
		if c > n || c == n && compare(k, best) < 0 {
			best, n = k, c
		}
	}
	return best
}

type obsRec struct {
	o  Observation
	at time.Time
}

type sentObs struct {
	o  Observation
	at time.Time
}

// receiveObservation takes an observation of this node from its observer.
func (m *Mesh) receiveObservation(s records.Signed) {
	o, err := records.DecodeObservation(s)
	if err != nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if o.Subject != m.cfg.Name {
		m.rep.Refuse("observation-misdirected")
		return
	}
	id, ok := m.rep.IdentityOf(o.Observer, m.bound)
	if !ok {
		m.rep.Refuse("observation-unknown-node")
		return
	}
	if !id.Verify(records.PurposeObservation, s.Data, s.Sig) {
		m.rep.Refuse("observation-forged")
		return
	}
	if cur, ok := m.obs[o.Observer]; ok && o.Version <= cur.o.Version {
		return
	}
	m.obs[o.Observer] = obsRec{o, time.Now()}
}

// SetWGSightings tells the mesh where this node sees its WireGuard peers'
// handshakes come from: by peer, by network. The mesh passes each peer
// what it sees of it.
func (m *Mesh) SetWGSightings(s map[string]map[netip.Prefix]netip.AddrPort) {
	m.mu.Lock()
	m.wgSights = s
	m.mu.Unlock()
}

// reassessNATLocked judges this node's NAT from what its observers and
// relays report, and publishes a change.
func (m *Mesh) reassessNATLocked(now time.Time) {
	for name, r := range m.obs {
		if now.Sub(r.at) > observationTTL {
			delete(m.obs, name)
		}
	}
	local := netip.AddrPortFrom(m.addr, uint16(m.cfg.BindPort))
	var gossip []netip.AddrPort
	wg := map[netip.Prefix][]netip.AddrPort{}
	for _, r := range m.obs {
		if r.o.Gossip.IsValid() {
			gossip = append(gossip, r.o.Gossip)
		}
		for s, a := range r.o.WG {
			wg[s] = append(wg[s], a)
		}
	}
	if t := m.gossipNet; t != nil {
		for _, r := range t.Reflections() {
			if now.Sub(r.At) < observationTTL {
				gossip = append(gossip, r.Addr)
			}
		}
	}
	wgLocal := map[netip.Prefix]netip.AddrPort{}
	for e := range m.rep.Entries() {
		if e.Node == m.cfg.Name && e.Port != 0 {
			wgLocal[e.Subnet] = netip.AddrPortFrom(m.addr, e.Port)
		}
	}
	st := assessNAT(local, gossip, wgLocal, wg)
	if st.equal(m.nat) {
		return
	}
	if st.Kind != m.nat.Kind || st.Seen != m.nat.Seen {
		m.log.Info("how members see this node", "nat", string(st.Kind), "public", st.Seen, "observers", len(m.obs))
	}
	m.nat = st
	m.setSelfInfoLocked()
	for cur := range m.rep.Entries() {
		if cur.Node == m.cfg.Name && cur.Seen != st.WG[cur.Subnet] {
			m.updateOwnLocked(cur.Subnet, func(e *NetworkEntry) { e.Seen = st.WG[cur.Subnet] })
		}
	}
}

// outgoingObservationsLocked returns the observations due to be sent:
// to every member seen directly or over WireGuard, when what this node
// sees changed or was last said observeEvery ago.
func (m *Mesh) outgoingObservationsLocked(now time.Time) []outObs {
	var sightings map[string]gossipnet.Sighting
	if m.gossipNet != nil {
		sightings = m.gossipNet.Sightings()
	}
	subjects := map[string]bool{}
	for name, s := range sightings {
		if now.Sub(s.At) < directFor {
			subjects[name] = true
		}
	}
	for name := range m.wgSights {
		subjects[name] = true
	}
	var out []outObs
	for _, name := range slices.Sorted(maps.Keys(subjects)) {
		if name == m.cfg.Name {
			continue
		}
		if _, ok := m.rep.Info(name); !ok {
			continue
		}
		o := Observation{Observer: m.cfg.Name, Subject: name}
		if s, ok := sightings[name]; ok && now.Sub(s.At) < directFor {
			o.Gossip = s.Addr
		}
		if w := m.wgSights[name]; len(w) > 0 {
			o.WG = maps.Clone(w)
		}
		if !o.Gossip.IsValid() && len(o.WG) == 0 {
			continue
		}
		last, sent := m.sentObs[name]
		if sent && last.o.Gossip == o.Gossip && maps.Equal(last.o.WG, o.WG) && now.Sub(last.at) < observeEvery {
			continue
		}
		o.Version = m.versionLocked()
		m.sentObs[name] = sentObs{o, now}
		out = append(out, outObs{to: name, b: records.EncodeMsg(records.KindObservation, records.Sign(m.cfg.Identity, records.PurposeObservation, o))})
	}
	for name := range m.sentObs {
		if !subjects[name] {
			delete(m.sentObs, name)
		}
	}
	return out
}

type outObs struct {
	to string
	b  []byte
}

// sendDirect sends messages to single members, best effort, by the
// address nodeEvent copied (see send: memberlist's live *Node is not
// safe to read).
func (m *Mesh) sendDirect(ml *memberlist.Memberlist, msgs []outObs) {
	if ml == nil || len(msgs) == 0 {
		return
	}
	for _, msg := range msgs {
		m.mu.Lock()
		rec, ok := m.live[msg.to]
		m.mu.Unlock()
		if !ok || rec.addr == "" {
			continue
		}
		if err := ml.SendToAddress(memberlist.Address{Addr: rec.addr, Name: msg.to}, msg.b); err != nil {
			m.log.Debug("sending an observation", "peer", msg.to, "err", err)
		}
		m.stats.sent(len(msg.b))
	}
}

// reflectTarget is a relay to ask for a reflection, and where.
type reflectTarget struct {
	name string
	to   netip.AddrPort
}

// reflectTargetsLocked lists the relays to ask for a reflection now: each
// every reflectEvery, a new one at once.
func (m *Mesh) reflectTargetsLocked(now time.Time) []reflectTarget {
	var out []reflectTarget
	seen := map[netip.AddrPort]bool{}
	for name, n := range m.rep.Infos() {
		if name == m.cfg.Name || n.RelayPort == 0 || n.NAT != NATNone || !m.live[name].state.Reachable() {
			continue
		}
		to := netip.AddrPortFrom(n.Addr, n.RelayPort)
		seen[to] = true
		if now.Sub(m.reflectAsked[to]) >= reflectEvery {
			m.reflectAsked[to] = now
			out = append(out, reflectTarget{name, to})
		}
	}
	for to := range m.reflectAsked {
		if !seen[to] {
			delete(m.reflectAsked, to)
		}
	}
	slices.SortFunc(out, func(a, b reflectTarget) int { return a.to.Compare(b.to) })
	return out
}

// routeHintsLocked is what the gossip transport needs to reach members.
func (m *Mesh) routeHintsLocked() map[string]gossipnet.RouteHint {
	h := map[string]gossipnet.RouteHint{}
	for name, n := range m.rep.Infos() {
		hint := gossipnet.RouteHint{Advertised: netip.AddrPortFrom(n.Addr, n.GossipPort), BehindNAT: n.NAT.Behind(),
			Header: n.Features&records.FeatureHeader != 0, ReplayProof: n.Features&records.FeatureReplayProof != 0,
			// The upper half of an info's version is its node's
			// generation (versionLocked), in every version so far.
			ID: n.ID, Gen: n.Version >> 32}
		if n.NAT == NATConsistent {
			hint.Public = n.Seen
		}
		h[name] = hint
	}
	return h
}
