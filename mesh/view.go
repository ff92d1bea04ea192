package mesh

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
)

// Liveness is what gossip says about a node right now.
type Liveness int

const (
	// Unknown: known from replicated state but not (yet) seen by this
	// node's memberlist, e.g. right after a restart.
	Unknown Liveness = iota
	Alive
	// Suspect: gossip still counts the node alive, but it has not
	// answered a direct probe for several probe rounds.
	Suspect
	Dead
	Left
)

func (l Liveness) String() string {
	switch l {
	case Alive:
		return "alive"
	case Suspect:
		return "suspect"
	case Dead:
		return "dead"
	case Left:
		return "left"
	}
	return "unknown"
}

// MarshalText implements encoding.TextMarshaler.
func (l Liveness) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (l *Liveness) UnmarshalText(b []byte) error {
	for c := Unknown; c <= Left; c++ {
		if c.String() == string(b) {
			*l = c
			return nil
		}
	}
	return fmt.Errorf("unknown liveness %q", b)
}

// Reachable reports whether gossip has positive evidence that the node
// is up.
func (l Liveness) Reachable() bool { return l == Alive || l == Suspect }

// Routable reports whether a node in this state stays a WireGuard peer.
// Unknown counts: right after an agent restart every member is unknown
// until gossip catches up, and dropping them would cut the sessions of a
// kernel WireGuard link that outlived the agent.
func (l Liveness) Routable() bool { return l.Reachable() || l == Unknown }

// Member is a known node.
type Member struct {
	NodeInfo
	State Liveness
	// Since is when State last changed, as seen by this node.
	Since time.Time
	// LastAck is when the node last answered a direct probe, and RTT
	// how long that took.
	LastAck time.Time
	RTT     time.Duration
	Self    bool
}

// View is an immutable snapshot of the mesh as this node sees it. Entries
// of nodes that are not known members (no NodeInfo, or forgotten) are left
// out: a claim or a key from outside the membership counts for nothing.
type View struct {
	Self     string
	Members  map[string]Member
	Networks map[netip.Prefix][]NetworkEntry // sorted by node
}

// Quorum is the number of promises a claim needs: a strict majority of
// all known nodes, alive or not. Any two majorities of the same set share
// a node, and a node promises a block to one claim at a time.
func (v *View) Quorum() int { return len(v.Members)/2 + 1 }

// Entry returns node's entry for subnet.
func (v *View) Entry(subnet netip.Prefix, node string) (NetworkEntry, bool) {
	for _, e := range v.Networks[subnet] {
		if e.Node == node {
			return e, true
		}
	}
	return NetworkEntry{}, false
}

// OwnBlocks returns the blocks this node owns in subnet.
func (v *View) OwnBlocks(subnet netip.Prefix) []netip.Prefix {
	e, _ := v.Entry(subnet, v.Self)
	return e.Blocks
}

// Reserved returns every address some node reserved in subnet.
func (v *View) Reserved(subnet netip.Prefix) []netip.Addr {
	var out []netip.Addr
	for _, e := range v.Networks[subnet] {
		out = append(out, e.Reserved...)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// Owner returns the node whose block contains addr.
func (v *View) Owner(subnet netip.Prefix, addr netip.Addr) (node string, block netip.Prefix, ok bool) {
	for _, e := range v.Networks[subnet] {
		for _, b := range e.Blocks {
			if b.Contains(addr) {
				return e.Node, b, true
			}
		}
	}
	return "", netip.Prefix{}, false
}

// Spec returns the newest definition any member published for subnet,
// and who published it; a removed network's is Deleted.
func (v *View) Spec(subnet netip.Prefix) (spec *NetworkSpec, node string) {
	for _, e := range v.Networks[subnet] {
		if e.Spec == nil {
			continue
		}
		if spec == nil || e.Spec.Version > spec.Version || e.Spec.Version == spec.Version && e.Node > node {
			spec, node = e.Spec, e.Node
		}
	}
	return spec, node
}

// Users lists the members with endpoints on subnet, and how many.
func (v *View) Users(subnet netip.Prefix) map[string]int {
	out := map[string]int{}
	for _, e := range v.Networks[subnet] {
		if e.Endpoints > 0 {
			out[e.Node] = e.Endpoints
		}
	}
	return out
}

// Subnets lists every subnet the view has entries for.
func (v *View) Subnets() []netip.Prefix {
	return slices.SortedFunc(maps.Keys(v.Networks), comparePrefix)
}

// Peer is another node that has a network attached: a WireGuard peer.
type Peer struct {
	Node       string
	PublicKey  crypto.PublicKey
	Endpoint   netip.AddrPort
	AllowedIPs []netip.Prefix
	State      Liveness
}

// Peers returns the WireGuard peers of subnet: other nodes that have it
// attached and are not known to be down. Dead nodes are left out so that
// nothing is sent into the void; their blocks stay theirs.
func (v *View) Peers(subnet netip.Prefix) []Peer {
	var out []Peer
	for _, e := range v.Networks[subnet] {
		m, ok := v.Members[e.Node]
		if !ok || m.Self || e.Port == 0 || !m.State.Routable() {
			continue
		}
		out = append(out, Peer{
			Node:       e.Node,
			PublicKey:  m.PublicKey,
			Endpoint:   netip.AddrPortFrom(m.Addr, e.Port),
			AllowedIPs: slices.Clone(e.Blocks),
			State:      m.State,
		})
	}
	return out
}

// Conflict is two nodes owning overlapping blocks: the protocol prevents
// it, so one showing up means an operator forgot a node that was alive.
type Conflict struct {
	Subnet       netip.Prefix
	NodeA, NodeB string
	BlockA       netip.Prefix
	BlockB       netip.Prefix
}

// Conflicts lists overlapping blocks held by different nodes.
func (v *View) Conflicts() []Conflict {
	var out []Conflict
	for subnet, entries := range v.Networks {
		for i, a := range entries {
			for _, b := range entries[i+1:] {
				for _, ba := range a.Blocks {
					for _, bb := range b.Blocks {
						if ba.Overlaps(bb) {
							out = append(out, Conflict{subnet, a.Node, b.Node, ba, bb})
						}
					}
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b Conflict) int {
		return cmp.Or(comparePrefix(a.Subnet, b.Subnet), cmp.Compare(a.NodeA, b.NodeA), comparePrefix(a.BlockA, b.BlockA))
	})
	return out
}

// buildView assembles a View from the replica and liveness.
func buildView(r *replica, live map[string]liveRecord) *View {
	v := &View{
		Self:     r.self,
		Members:  make(map[string]Member, len(r.nodes)),
		Networks: map[netip.Prefix][]NetworkEntry{},
	}
	for name, n := range r.nodes {
		l := live[name]
		m := Member{NodeInfo: n, State: l.state, Since: l.since, LastAck: l.lastAck, RTT: l.rtt, Self: name == r.self}
		if m.Self {
			m.State = Alive
		}
		v.Members[name] = m
	}
	for k, e := range r.nets {
		if _, ok := v.Members[k.node]; !ok {
			continue
		}
		v.Networks[k.subnet] = append(v.Networks[k.subnet], e.Clone())
	}
	for _, entries := range v.Networks {
		slices.SortFunc(entries, func(a, b NetworkEntry) int { return cmp.Compare(a.Node, b.Node) })
	}
	return v
}

type liveRecord struct {
	state   Liveness
	since   time.Time
	lastAck time.Time
	rtt     time.Duration
}
