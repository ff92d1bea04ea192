package records

import (
	"cmp"
	"encoding/json"
	"iter"
	"maps"
	"net/netip"
	"slices"

	"github.com/wgmesh/wgmesh/crypto"
)

// replica holds the verified gossip records this node knows. It is not
// safe for concurrent use; Mesh guards it with its mutex.
//
// A record is kept only if it is signed by the identity of its node: the
// identity the catalog binds to the node's name or, for a node the
// catalog does not know yet, the one its own metadata names. A record in
// another identity's name is refused and counted, never merged; newer
// versions of a node's records replace older ones.
type Replica struct {
	self     string
	infos    map[string]infoRec
	entries  map[entryKey]entryRec
	sessions map[SessionKey]sessionRec
	// names are the name records (names.go); nameCount counts them
	// by node.
	names     map[nameKey]nameRec
	nameCount map[string]int
	// refused counts records refused, by reason.
	refused map[string]uint64
}

type infoRec struct {
	info NodeInfo
	s    Signed
}

type entryRec struct {
	e NetworkEntry
	s Signed
}

type entryKey struct {
	node   string
	subnet netip.Prefix
}

type sessionRec struct {
	r RelaySession
	s Signed
}

// SessionKey identifies a relay session: its relay, network and pair.
type SessionKey struct {
	relay  string
	subnet netip.Prefix
	a, b   string
}

// KeyOf is the key of a relay session.
func KeyOf(r RelaySession) SessionKey { return SessionKey{r.Relay, r.Subnet, r.A, r.B} }

// BoundFunc returns the identity the catalog binds to a name.
type BoundFunc func(name string) (crypto.NodeID, bool)

func NewReplica(self string) *Replica {
	return &Replica{self: self, infos: map[string]infoRec{}, entries: map[entryKey]entryRec{}, sessions: map[SessionKey]sessionRec{},
		names: map[nameKey]nameRec{}, nameCount: map[string]int{}, refused: map[string]uint64{}}
}

func (r *Replica) Refuse(reason string) { r.refused[reason]++ }

// MergeInfo merges a node's self-signed info and reports whether it changed.
func (r *Replica) MergeInfo(n NodeInfo, s Signed, bound BoundFunc) bool {
	if n.Name == r.self {
		return false // only this node writes its own
	}
	if id, ok := bound(n.Name); ok && id != n.ID {
		r.Refuse("info-wrong-identity")
		return false
	}
	cur, ok := r.infos[n.Name]
	if ok && cur.info.ID == n.ID && n.Version <= cur.info.Version {
		return false
	}
	if ok && cur.info.ID != n.ID {
		// Another identity under this name (the old one was forgotten):
		// the old identity's entries go with it.
		for k, e := range r.entries {
			if k.node == n.Name && !n.ID.Verify(PurposeEntry, e.s.Data, e.s.Sig) {
				delete(r.entries, k)
			}
		}
		for k, rec := range r.sessions {
			if k.relay == n.Name && !n.ID.Verify(PurposeSession, rec.s.Data, rec.s.Sig) {
				delete(r.sessions, k)
			}
		}
		r.forgetNames(n.Name, func(s Signed) bool { return n.ID.Verify(PurposeName, s.Data, s.Sig) })
	}
	r.infos[n.Name] = infoRec{n, s}
	return true
}

// IdentityOf is the identity a node's records must be signed with.
func (r *Replica) IdentityOf(name string, bound BoundFunc) (crypto.NodeID, bool) {
	if id, ok := bound(name); ok {
		return id, true
	}
	if rec, ok := r.infos[name]; ok {
		return rec.info.ID, true
	}
	return crypto.NodeID{}, false
}

// MergeEntry merges a signed entry and reports whether it changed.
func (r *Replica) MergeEntry(s Signed, bound BoundFunc) bool {
	e, err := DecodeEntry(s)
	if err != nil {
		r.Refuse("entry-invalid")
		return false
	}
	if e.Node == r.self {
		// Our own entries come back through push/pull; ours are newer.
		return false
	}
	id, ok := r.IdentityOf(e.Node, bound)
	if !ok {
		// Its node's info has not arrived yet; push/pull brings the
		// entry again.
		r.Refuse("entry-unknown-node")
		return false
	}
	if !id.Verify(PurposeEntry, s.Data, s.Sig) {
		r.Refuse("entry-forged")
		return false
	}
	k := entryKey{e.Node, e.Subnet}
	if cur, ok := r.entries[k]; ok && e.Version <= cur.e.Version {
		return false
	}
	r.entries[k] = entryRec{e, s}
	return true
}

// MergeSession merges a relay's signed session and reports whether it
// changed.
func (r *Replica) MergeSession(s Signed, bound BoundFunc) bool {
	rs, err := DecodeSession(s)
	if err != nil {
		r.Refuse("session-invalid")
		return false
	}
	if rs.Relay == r.self {
		return false
	}
	id, ok := r.IdentityOf(rs.Relay, bound)
	if !ok {
		r.Refuse("session-unknown-node")
		return false
	}
	if !id.Verify(PurposeSession, s.Data, s.Sig) {
		r.Refuse("session-forged")
		return false
	}
	k := KeyOf(rs)
	if cur, ok := r.sessions[k]; ok && rs.Version <= cur.r.Version {
		return false
	}
	r.sessions[k] = sessionRec{rs, s}
	return true
}

// ForgetNode drops a node's records.
func (r *Replica) ForgetNode(name string) {
	delete(r.infos, name)
	for k := range r.entries {
		if k.node == name {
			delete(r.entries, k)
		}
	}
	for k := range r.sessions {
		if k.relay == name {
			delete(r.sessions, k)
		}
	}
	r.forgetNames(name, nil)
}

// StateMsg is the push/pull state and the saved gossip: signed records.
type StateMsg struct {
	V        int      `json:"v"`
	Infos    []Signed `json:"infos,omitempty"`
	Entries  []Signed `json:"entries"`
	Sessions []Signed `json:"sessions,omitempty"`
	// Names are name records (names.go), tombstones included.
	Names []Signed `json:"names,omitempty"`
}

// snapshot lists every entry (and, for the saved copy, every info).
func (r *Replica) Snapshot(withInfos bool) StateMsg {
	s := StateMsg{V: protocol}
	keys := slices.SortedFunc(maps.Keys(r.entries), func(a, b entryKey) int {
		return cmp.Or(cmp.Compare(a.node, b.node), a.subnet.Addr().Compare(b.subnet.Addr()), cmp.Compare(a.subnet.Bits(), b.subnet.Bits()))
	})
	for _, k := range keys {
		s.Entries = append(s.Entries, r.entries[k].s)
	}
	skeys := slices.SortedFunc(maps.Keys(r.sessions), func(a, b SessionKey) int {
		return cmp.Or(cmp.Compare(a.relay, b.relay), a.subnet.Addr().Compare(b.subnet.Addr()), cmp.Compare(a.subnet.Bits(), b.subnet.Bits()),
			cmp.Compare(a.a, b.a), cmp.Compare(a.b, b.b))
	})
	for _, k := range skeys {
		s.Sessions = append(s.Sessions, r.sessions[k].s)
	}
	s.Names = r.nameSnapshot()
	if withInfos {
		for _, name := range slices.Sorted(maps.Keys(r.infos)) {
			s.Infos = append(s.Infos, r.infos[name].s)
		}
	}
	return s
}

// maxStateBytes bounds a push/pull state or saved file.
const maxStateBytes = 16 << 20

func DecodeStateMsg(b []byte) (StateMsg, error) {
	if len(b) > maxStateBytes {
		return StateMsg{}, invalid("state of %d bytes exceeds %d", len(b), maxStateBytes)
	}
	var s StateMsg
	if err := json.Unmarshal(b, &s); err != nil {
		return StateMsg{}, invalid("state: %v", err)
	}
	if s.V != protocol {
		return StateMsg{}, invalid("state of protocol %d, this node speaks %d", s.V, protocol)
	}
	return s, nil
}

// The accessors below let Mesh read the replica and write this node's own
// records, which it signs itself; every peer's record goes through a
// Merge method and its signature check.

// Refused returns a copy of the counts of records refused, by reason.
func (r *Replica) Refused() map[string]uint64 { return maps.Clone(r.refused) }

// Info returns a peer's info.
func (r *Replica) Info(name string) (NodeInfo, bool) {
	rec, ok := r.infos[name]
	return rec.info, ok
}

// Infos yields every peer's info, by name, in no particular order.
func (r *Replica) Infos() iter.Seq2[string, NodeInfo] {
	return func(yield func(string, NodeInfo) bool) {
		for name, rec := range r.infos {
			if !yield(name, rec.info) {
				return
			}
		}
	}
}

// Entry returns a node's entry for subnet.
func (r *Replica) Entry(node string, subnet netip.Prefix) (NetworkEntry, bool) {
	rec, ok := r.entries[entryKey{node, subnet}]
	return rec.e, ok
}

// Entries yields every entry, this node's included, in no particular
// order.
func (r *Replica) Entries() iter.Seq[NetworkEntry] {
	return func(yield func(NetworkEntry) bool) {
		for _, rec := range r.entries {
			if !yield(rec.e) {
				return
			}
		}
	}
}

// SetOwnEntry stores an entry of this node, signed by it.
func (r *Replica) SetOwnEntry(e NetworkEntry, s Signed) {
	r.entries[entryKey{e.Node, e.Subnet}] = entryRec{e, s}
}

// Session returns the relay session of key k.
func (r *Replica) Session(k SessionKey) (RelaySession, bool) {
	rec, ok := r.sessions[k]
	return rec.r, ok
}

// Sessions yields every relay session, this node's included, in no
// particular order.
func (r *Replica) Sessions() iter.Seq[RelaySession] {
	return func(yield func(RelaySession) bool) {
		for _, rec := range r.sessions {
			if !yield(rec.r) {
				return
			}
		}
	}
}

// SetOwnSession stores a relay session of this node, signed by it.
func (r *Replica) SetOwnSession(rs RelaySession, s Signed) { r.sessions[KeyOf(rs)] = sessionRec{rs, s} }
