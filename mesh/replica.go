package mesh

import (
	"cmp"
	"encoding/json"
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
type replica struct {
	self     string
	infos    map[string]infoRec
	entries  map[entryKey]entryRec
	sessions map[sessionKey]sessionRec
	// names are the name records (names.go); nameCount counts them
	// by node.
	names     map[nameKey]nameRec
	nameCount map[string]int
	// refused counts records refused, by reason.
	refused map[string]uint64
}

type infoRec struct {
	info NodeInfo
	s    signed
}

type entryRec struct {
	e NetworkEntry
	s signed
}

type entryKey struct {
	node   string
	subnet netip.Prefix
}

type sessionRec struct {
	r RelaySession
	s signed
}

type sessionKey struct {
	relay  string
	subnet netip.Prefix
	a, b   string
}

func keyOf(r RelaySession) sessionKey { return sessionKey{r.Relay, r.Subnet, r.A, r.B} }

// boundFunc returns the identity the catalog binds to a name.
type boundFunc func(name string) (crypto.NodeID, bool)

func newReplica(self string) *replica {
	return &replica{self: self, infos: map[string]infoRec{}, entries: map[entryKey]entryRec{}, sessions: map[sessionKey]sessionRec{},
		names: map[nameKey]nameRec{}, nameCount: map[string]int{}, refused: map[string]uint64{}}
}

func (r *replica) refuse(reason string) { r.refused[reason]++ }

// mergeInfo merges a node's self-signed info and reports whether it changed.
func (r *replica) mergeInfo(n NodeInfo, s signed, bound boundFunc) bool {
	if n.Name == r.self {
		return false // only this node writes its own
	}
	if id, ok := bound(n.Name); ok && id != n.ID {
		r.refuse("info-wrong-identity")
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
			if k.node == n.Name && !n.ID.Verify(purposeEntry, e.s.Data, e.s.Sig) {
				delete(r.entries, k)
			}
		}
		for k, rec := range r.sessions {
			if k.relay == n.Name && !n.ID.Verify(purposeSession, rec.s.Data, rec.s.Sig) {
				delete(r.sessions, k)
			}
		}
		r.forgetNames(n.Name, func(s signed) bool { return n.ID.Verify(purposeName, s.Data, s.Sig) })
	}
	r.infos[n.Name] = infoRec{n, s}
	return true
}

// identityOf is the identity a node's records must be signed with.
func (r *replica) identityOf(name string, bound boundFunc) (crypto.NodeID, bool) {
	if id, ok := bound(name); ok {
		return id, true
	}
	if rec, ok := r.infos[name]; ok {
		return rec.info.ID, true
	}
	return crypto.NodeID{}, false
}

// mergeEntry merges a signed entry and reports whether it changed.
func (r *replica) mergeEntry(s signed, bound boundFunc) bool {
	e, err := decodeEntry(s)
	if err != nil {
		r.refuse("entry-invalid")
		return false
	}
	if e.Node == r.self {
		// Our own entries come back through push/pull; ours are newer.
		return false
	}
	id, ok := r.identityOf(e.Node, bound)
	if !ok {
		// Its node's info has not arrived yet; push/pull brings the
		// entry again.
		r.refuse("entry-unknown-node")
		return false
	}
	if !id.Verify(purposeEntry, s.Data, s.Sig) {
		r.refuse("entry-forged")
		return false
	}
	k := entryKey{e.Node, e.Subnet}
	if cur, ok := r.entries[k]; ok && e.Version <= cur.e.Version {
		return false
	}
	r.entries[k] = entryRec{e, s}
	return true
}

// mergeSession merges a relay's signed session and reports whether it
// changed.
func (r *replica) mergeSession(s signed, bound boundFunc) bool {
	rs, err := decodeSession(s)
	if err != nil {
		r.refuse("session-invalid")
		return false
	}
	if rs.Relay == r.self {
		return false
	}
	id, ok := r.identityOf(rs.Relay, bound)
	if !ok {
		r.refuse("session-unknown-node")
		return false
	}
	if !id.Verify(purposeSession, s.Data, s.Sig) {
		r.refuse("session-forged")
		return false
	}
	k := keyOf(rs)
	if cur, ok := r.sessions[k]; ok && rs.Version <= cur.r.Version {
		return false
	}
	r.sessions[k] = sessionRec{rs, s}
	return true
}

// forgetNode drops a node's records.
func (r *replica) forgetNode(name string) {
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

// stateMsg is the push/pull state and the saved gossip: signed records.
type stateMsg struct {
	V        int      `json:"v"`
	Infos    []signed `json:"infos,omitempty"`
	Entries  []signed `json:"entries"`
	Sessions []signed `json:"sessions,omitempty"`
	// Names are name records (names.go), tombstones included.
	Names []signed `json:"names,omitempty"`
}

// snapshot lists every entry (and, for the saved copy, every info).
func (r *replica) snapshot(withInfos bool) stateMsg {
	s := stateMsg{V: protocol}
	keys := slices.SortedFunc(maps.Keys(r.entries), func(a, b entryKey) int {
		return cmp.Or(cmp.Compare(a.node, b.node), a.subnet.Addr().Compare(b.subnet.Addr()), cmp.Compare(a.subnet.Bits(), b.subnet.Bits()))
	})
	for _, k := range keys {
		s.Entries = append(s.Entries, r.entries[k].s)
	}
	skeys := slices.SortedFunc(maps.Keys(r.sessions), func(a, b sessionKey) int {
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

func decodeStateMsg(b []byte) (stateMsg, error) {
	if len(b) > maxStateBytes {
		return stateMsg{}, invalid("state of %d bytes exceeds %d", len(b), maxStateBytes)
	}
	var s stateMsg
	if err := json.Unmarshal(b, &s); err != nil {
		return stateMsg{}, invalid("state: %v", err)
	}
	if s.V != protocol {
		return stateMsg{}, invalid("state of protocol %d, this node speaks %d", s.V, protocol)
	}
	return s, nil
}
