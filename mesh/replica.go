package mesh

import (
	"bytes"
	"cmp"
	"encoding/json"
	"maps"
	"net/netip"
	"slices"
)

// replica is the merged state one node knows. It is not safe for
// concurrent use; Mesh guards it with its mutex.
//
// Merge rule: for every (node, subnet) key the entry with the higher
// version wins; equal versions with different contents (possible only if
// a node lost its state file) are ordered by their encoding, so every node
// picks the same one. Entries that a node receives about itself are
// special: they can only be newer than its own if it lost state, and then
// it adopts them (keeping its blocks, dropping claims no one waits for)
// and republishes them with a fresh version.
type replica struct {
	self      string
	clock     uint64
	nodes     map[string]NodeInfo
	nets      map[entryKey]NetworkEntry
	forgotten map[string]uint64
	// republish lists own entries that must be sent again because a peer
	// held a stale or foreign copy of them.
	republish map[entryKey]bool
	// selfInfoStale is set when a peer held a newer NodeInfo of ours.
	selfInfoStale bool
	// lostState is set when peers know a newer version of this node than
	// it does: it lost its state file, and with it its promises.
	lostState bool
}

func newReplica(self string) *replica {
	return &replica{
		self:      self,
		nodes:     map[string]NodeInfo{},
		nets:      map[entryKey]NetworkEntry{},
		forgotten: map[string]uint64{},
		republish: map[entryKey]bool{},
	}
}

// observe advances the Lamport clock past a version seen from a peer.
func (r *replica) observe(v uint64) {
	if v > r.clock {
		r.clock = v
	}
}

// tick returns a fresh version for a local write.
func (r *replica) tick() uint64 {
	r.clock++
	return r.clock
}

func (r *replica) isForgotten(node string, version uint64) bool {
	fv, ok := r.forgotten[node]
	return ok && version <= fv
}

// wins reports whether a beats b under the merge rule.
func wins[T any](av, bv uint64, a, b T) bool {
	if av != bv {
		return av > bv
	}
	ab, _ := json.Marshal(a)
	bb, _ := json.Marshal(b)
	return bytes.Compare(ab, bb) > 0
}

// mergeNode merges a peer's NodeInfo and reports whether the state changed.
func (r *replica) mergeNode(n NodeInfo) bool {
	if r.isForgotten(n.Name, n.Version) {
		return false
	}
	r.observe(n.Version)
	cur, ok := r.nodes[n.Name]
	if ok && !wins(n.Version, cur.Version, n, cur) {
		return false
	}
	if n.Name == r.self {
		// Only this node writes its NodeInfo; a newer copy means we
		// restarted without state. Our clock has moved past it now, so
		// publishing ours again makes it win.
		r.selfInfoStale = true
		r.lostState = true
		return false
	}
	r.nodes[n.Name] = n
	return true
}

// setSelf installs this node's own NodeInfo with a fresh version.
func (r *replica) setSelf(n NodeInfo) NodeInfo {
	n.Name = r.self
	n.Version = r.tick()
	r.nodes[r.self] = n
	r.selfInfoStale = false
	return n
}

// mergeNet merges a peer's NetworkEntry and reports whether the state changed.
func (r *replica) mergeNet(e NetworkEntry) bool {
	if r.isForgotten(e.Node, e.Version) {
		return false
	}
	r.observe(e.Version)
	e = e.Clone()
	e.normalize()
	k := e.key()
	cur, ok := r.nets[k]
	if ok && !wins(e.Version, cur.Version, e, cur) {
		if e.Node == r.self && e.Version == cur.Version && !entriesEqual(e, cur) {
			r.republish[k] = true
		}
		return false
	}
	if e.Node == r.self {
		// Adopt what the cluster remembers of us: we lost state. Claims
		// are dropped because nothing waits for them any more; blocks
		// are kept because others rely on them.
		e.Claims = nil
		e.Version = r.tick()
		r.republish[k] = true
		r.lostState = true
	}
	r.nets[k] = e
	return true
}

// mergeForget merges a Forget and reports whether the state changed.
func (r *replica) mergeForget(f Forget) bool {
	if cur, ok := r.forgotten[f.Node]; ok && cur >= f.Version {
		return false
	}
	r.observe(f.Version)
	r.forgotten[f.Node] = f.Version
	if f.Node == r.self {
		// The cluster was told we are gone for good, yet here we are.
		// Our clock is past the forget now: republishing everything makes
		// us a member again, and any block someone took meanwhile shows up
		// as a conflict in View.Conflicts.
		r.selfInfoStale = true
		for k, e := range r.nets {
			if k.node == r.self {
				e.Version = r.tick()
				r.nets[k] = e
				r.republish[k] = true
			}
		}
		return true
	}
	if n, ok := r.nodes[f.Node]; ok && n.Version <= f.Version {
		delete(r.nodes, f.Node)
	}
	for k, e := range r.nets {
		if k.node == f.Node && e.Version <= f.Version {
			delete(r.nets, k)
		}
	}
	return true
}

// maxVersion is the highest version known of any of node's state.
func (r *replica) maxVersion(node string) uint64 {
	v := r.nodes[node].Version
	for k, e := range r.nets {
		if k.node == node && e.Version > v {
			v = e.Version
		}
	}
	return v
}

// own returns a copy of this node's entry for subnet, creating an empty one.
func (r *replica) own(subnet netip.Prefix) NetworkEntry {
	e, ok := r.nets[entryKey{r.self, subnet}]
	if !ok {
		return NetworkEntry{Node: r.self, Subnet: subnet}
	}
	return e.Clone()
}

// putOwn stores an updated own entry under a fresh version.
func (r *replica) putOwn(e NetworkEntry) NetworkEntry {
	e.Node = r.self
	e.normalize()
	e.Version = r.tick()
	r.nets[e.key()] = e
	return e
}

// snapshotState is the serialised form of a replica, used for push/pull
// and for the state file.
type snapshotState struct {
	V         int            `json:"v"`
	Clock     uint64         `json:"clock,omitempty"`
	Nodes     []NodeInfo     `json:"nodes,omitempty"`
	Networks  []NetworkEntry `json:"nets,omitempty"`
	Forgotten []Forget       `json:"forgotten,omitempty"`
}

func (r *replica) snapshot() snapshotState {
	s := snapshotState{V: protocolV1}
	for _, name := range slices.Sorted(maps.Keys(r.nodes)) {
		s.Nodes = append(s.Nodes, r.nodes[name])
	}
	keys := slices.SortedFunc(maps.Keys(r.nets), func(a, b entryKey) int {
		return cmp.Or(comparePrefix(a.subnet, b.subnet), cmp.Compare(a.node, b.node))
	})
	for _, k := range keys {
		s.Networks = append(s.Networks, r.nets[k].Clone())
	}
	for _, name := range slices.Sorted(maps.Keys(r.forgotten)) {
		s.Forgotten = append(s.Forgotten, Forget{Node: name, Version: r.forgotten[name]})
	}
	return s
}

// mergeSnapshot merges a full state and reports whether anything changed.
// Forgets go first so that they void the entries that come with them.
func (r *replica) mergeSnapshot(s snapshotState) bool {
	changed := false
	for _, f := range s.Forgotten {
		changed = r.mergeForget(f) || changed
	}
	for _, n := range s.Nodes {
		changed = r.mergeNode(n) || changed
	}
	for _, e := range s.Networks {
		changed = r.mergeNet(e) || changed
	}
	return changed
}

func entriesEqual(a, b NetworkEntry) bool {
	ab, _ := json.Marshal(a)
	bb, _ := json.Marshal(b)
	return bytes.Equal(ab, bb)
}
