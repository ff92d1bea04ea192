package reachability

import (
	"cmp"
	"maps"
	"net/netip"
	"slices"
	"time"

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

// NAT is a node's judgement of its own NAT.
type NAT struct {
	Kind records.NATKind
	// Seen is where members outside see the gossip port.
	Seen netip.AddrPort
	// WG is where they see each network's WireGuard port.
	WG map[netip.Prefix]netip.AddrPort
}

// Equal reports whether two judgements are the same.
func (s NAT) Equal(o NAT) bool {
	return s.Kind == o.Kind && s.Seen == o.Seen && maps.Equal(s.WG, o.WG)
}

// Receive takes an observation of this node from its observer, if the
// observer signed it.
func (t *Tracker) Receive(s records.Signed, now time.Time) {
	o, err := records.DecodeObservation(s)
	if err != nil {
		return
	}
	if o.Subject != t.cfg.Name {
		t.cfg.Cluster.Refuse("observation-misdirected")
		return
	}
	id, ok := t.cfg.Cluster.IdentityOf(o.Observer)
	if !ok {
		t.cfg.Cluster.Refuse("observation-unknown-node")
		return
	}
	if !id.Verify(records.PurposeObservation, s.Data, s.Sig) {
		t.cfg.Cluster.Refuse("observation-forged")
		return
	}
	if cur, ok := t.obs[o.Observer]; ok && o.Version <= cur.o.Version {
		return
	}
	t.obs[o.Observer] = timedObs{o, now}
}

// Reassess judges this node's NAT from what its observers and relays
// report, against local, the gossip address it advertises, and wgLocal,
// its WireGuard ports by network. It reports whether the judgement
// changed: the caller publishes it.
func (t *Tracker) Reassess(now time.Time, local netip.AddrPort, wgLocal map[netip.Prefix]netip.AddrPort) bool {
	for name, r := range t.obs {
		if now.Sub(r.at) > observationTTL {
			delete(t.obs, name)
		}
	}
	var gossip []netip.AddrPort
	wg := map[netip.Prefix][]netip.AddrPort{}
	for _, r := range t.obs {
		if r.o.Gossip.IsValid() {
			gossip = append(gossip, r.o.Gossip)
		}
		for s, a := range r.o.WG {
			wg[s] = append(wg[s], a)
		}
	}
	for _, r := range t.cfg.Transport.Reflections() {
		if now.Sub(r.At) < observationTTL {
			gossip = append(gossip, r.Addr)
		}
	}
	st := assess(local, gossip, wgLocal, wg)
	if st.Equal(t.nat) {
		return false
	}
	if st.Kind != t.nat.Kind || st.Seen != t.nat.Seen {
		t.cfg.Logger.Info("how members see this node", "nat", string(st.Kind), "public", st.Seen, "observers", len(t.obs))
	}
	t.nat = st
	return true
}

// Message is an observation to send to one member.
type Message struct {
	To   string
	Data []byte
}

// Observations returns the observations due to be sent: to every member
// seen directly or over WireGuard, when what this node sees changed or
// was last said observeEvery ago.
func (t *Tracker) Observations(now time.Time) []Message {
	sightings := t.cfg.Transport.Sightings()
	subjects := map[string]bool{}
	for name, s := range sightings {
		if now.Sub(s.At) < DirectFor {
			subjects[name] = true
		}
	}
	for name := range t.wg {
		subjects[name] = true
	}
	var out []Message
	for _, name := range slices.Sorted(maps.Keys(subjects)) {
		if name == t.cfg.Name {
			continue
		}
		if _, ok := t.cfg.Cluster.Info(name); !ok {
			continue
		}
		o := records.Observation{Observer: t.cfg.Name, Subject: name}
		if s, ok := sightings[name]; ok && now.Sub(s.At) < DirectFor {
			o.Gossip = s.Addr
		}
		if w := t.wg[name]; len(w) > 0 {
			o.WG = maps.Clone(w)
		}
		if !o.Gossip.IsValid() && len(o.WG) == 0 {
			continue
		}
		last, sent := t.sent[name]
		if sent && last.o.Gossip == o.Gossip && maps.Equal(last.o.WG, o.WG) && now.Sub(last.at) < observeEvery {
			continue
		}
		o.Version = t.cfg.Cluster.Version()
		t.sent[name] = timedObs{o, now}
		out = append(out, Message{To: name, Data: records.EncodeMsg(records.KindObservation, records.Sign(t.cfg.Identity, records.PurposeObservation, o))})
	}
	for name := range t.sent {
		if !subjects[name] {
			delete(t.sent, name)
		}
	}
	return out
}

// assess judges a node's NAT from the sightings of its gossip port
// (observers' and relays' reflections: each from another destination)
// and of its WireGuard ports, against the addresses it advertises.
func assess(local netip.AddrPort, gossip []netip.AddrPort, wgLocal map[netip.Prefix]netip.AddrPort, wg map[netip.Prefix][]netip.AddrPort) NAT {
	st := NAT{}
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
		st.Kind = records.NATNone
	} else {
		ip := mostCommon(outside, func(a netip.AddrPort) netip.Addr { return a.Addr() }, netip.Addr.Compare)
		var same []netip.AddrPort
		for _, a := range outside {
			if a.Addr() == ip {
				same = append(same, a)
			}
		}
		port := mostCommon(same, netip.AddrPort.Port, cmp.Compare[uint16])
		st.Kind, st.Seen = records.NATConsistent, netip.AddrPortFrom(ip, port)
		for _, a := range same {
			if a.Port() != port {
				st.Kind = records.NATSymmetric
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
