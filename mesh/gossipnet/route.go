package gossipnet

import (
	"maps"
	"net/netip"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
)

// Routing: a member's packets go to where its packets were last seen
// coming from (its sighting, which only a sealed packet newer than any
// before from that member moves), else to where members see it, else to
// the address it advertises.

// Sighting is where a member's packets last came from (Addr), and when;
// id, gen and seq mark the newest packet believed.
type Sighting struct {
	Addr netip.AddrPort
	At   time.Time
	id   crypto.NodeID
	gen  uint64
	seq  uint64
}

// RouteHint is what the member's own published info says about reaching
// it: how members see it (Public, if behind NAT), and whether it reads
// the header at all.
type RouteHint struct {
	// Advertised is its gossip address as it advertises it; Public
	// where members see it, if that is consistent.
	Advertised netip.AddrPort
	Public     netip.AddrPort
	// BehindNAT: it cannot be dialled (unless seen at Advertised).
	BehindNAT bool
	// Header: it reads the header (version 1 at least).
	Header bool
	// ReplayProof: it reads header version 2. ID and Gen are its
	// identity and the generation it publishes (0: unknown).
	ReplayProof bool
	ID          crypto.NodeID
	Gen         uint64
}

// sightingTTL is how long a sighting is used to route to a member.
const sightingTTL = 2 * time.Minute

// version is the header version the member reads, 0 for none.
func (h RouteHint) version() byte {
	switch {
	case h.ReplayProof:
		return hdrV2
	case h.Header:
		return hdrV1
	}
	return 0
}

// versionFor is the header version of probes and reflection requests
// for the member name: the newest it reads; version 1, which every
// version reads, for a member whose info has not arrived yet (its
// answer matters, not its sighting of this node).
func (t *Transport) versionFor(name string) byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	if h := t.hints[name]; h.ReplayProof {
		return hdrV2
	}
	return hdrV1
}

// SetHints replaces what is known of reaching each member, by name: the
// members' published info, which the transport cannot read itself.
func (t *Transport) SetHints(h map[string]RouteHint) {
	t.mu.Lock()
	t.hints = h
	t.mu.Unlock()
}

// sighted records where a member's packet came from, if it is newer than
// every packet of that member so far.
func (t *Transport) sighted(h header, from netip.AddrPort, at time.Time) {
	if !from.IsValid() || h.name == t.self || len(h.name) > maxNameLen {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	gen, ok := t.freshLocked(h)
	if !ok {
		return
	}
	if at.IsZero() {
		at = time.Now()
	}
	id := t.hints[h.name].ID
	if id == (crypto.NodeID{}) {
		id = t.sightings[h.name].id
	}
	t.sightings[h.name] = Sighting{Addr: from, At: at, id: id, gen: gen, seq: h.seq}
}

// freshLocked reports whether a packet is newer than every packet of its
// sender believed so far, and its sender's generation.
func (t *Transport) freshLocked(h header) (uint64, bool) {
	hint := t.hints[h.name]
	gen := h.gen
	if h.ver < hdrV2 {
		if hint.ReplayProof {
			// Sent to a node of an older version, or replayed.
			return 0, false
		}
		gen = hint.Gen
	} else if gen < hint.Gen {
		// A packet of an earlier run.
		return 0, false
	}
	cur, ok := t.sightings[h.name]
	var none crypto.NodeID
	if !ok || cur.id != none && hint.ID != none && cur.id != hint.ID {
		// A new sender, or a name taken over by a new identity.
		return gen, true
	}
	if gen < cur.gen || gen == cur.gen && h.seq <= cur.seq {
		return 0, false
	}
	return gen, true
}

// Sightings returns where each member's packets last came from.
func (t *Transport) Sightings() map[string]Sighting {
	t.mu.Lock()
	defer t.mu.Unlock()
	return maps.Clone(t.sightings)
}

// Forget drops a member's sighting (it was forgotten).
func (t *Transport) Forget(name string) {
	t.mu.Lock()
	delete(t.sightings, name)
	t.mu.Unlock()
}

// route is where packets for the member name go: where its packets come
// from, else where it says members see it, else addr (the address it
// advertises); and the header version it reads (0: none).
func (t *Transport) route(name, addr string) (string, byte) {
	if name == "" {
		return addr, 0
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	h := t.hints[name]
	header := h.version()
	if s, ok := t.sightings[name]; ok && time.Since(s.At) < sightingTTL {
		return s.Addr.String(), header
	}
	if h.Public.IsValid() {
		return h.Public.String(), header
	}
	return addr, header
}

// Dialable reports whether a member can be dialled: it is not behind
// NAT, or this node sees it at the address it advertises (a host of the
// same private network).
func (t *Transport) Dialable(name string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	h, ok := t.hints[name]
	if !ok || !h.BehindNAT {
		return true
	}
	s, seen := t.sightings[name]
	return seen && s.Addr == h.Advertised && time.Since(s.At) < sightingTTL
}
