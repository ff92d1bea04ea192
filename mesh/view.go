package mesh

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
	"github.com/wgmesh/wgmesh/mesh/gossipnet"
	"github.com/wgmesh/wgmesh/mesh/reachability"
	"github.com/wgmesh/wgmesh/mesh/records"
)

// Liveness is what gossip says about a node right now.
type Liveness int

const (
	// Unknown: known from the catalog or saved gossip but not (yet) seen
	// by this node's memberlist, e.g. right after a restart.
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
	// Registered: the catalog binds the member's name to its identity.
	// What an unregistered member says is not used.
	Registered bool
	// Sighted is where this node last received the member's gossip
	// from, directly, and SightedAt when; zero if it never did.
	Sighted   netip.AddrPort
	SightedAt time.Time
	// PathMTU is the largest IP packet that crosses from this node to
	// the member (package reachability); 0 if not measured.
	PathMTU int
}

// Direct reports whether this node hears from the member directly: its
// gossip arrived from it (not through another member) lately.
func (m Member) Direct(now time.Time) bool {
	return m.SightedAt.After(now.Add(-reachability.DirectFor))
}

// Relay reports whether the member relays for others: it offers relay
// ports and members see it at the address it advertises.
func (m Member) Relay() bool { return m.RelayPort != 0 && m.NAT == NATNone }

// View is an immutable snapshot of the mesh as this node sees it: the
// committed catalog, and the gossip records that the catalog vouches for.
type View struct {
	Self      string
	ClusterID string
	Members   map[string]Member
	Catalog   *catalog.State
	// Entries are the trusted network entries, by subnet, sorted by node.
	Entries map[netip.Prefix][]NetworkEntry
	// Sessions are the open relay sessions of registered relays.
	Sessions []RelaySession
}

// Session returns the open session relay offers the pair a, b on subnet.
func (v *View) Session(relay string, subnet netip.Prefix, a, b string) (RelaySession, bool) {
	if a > b {
		a, b = b, a
	}
	for _, r := range v.Sessions {
		if r.Relay == relay && r.Subnet == subnet && r.A == a && r.B == b {
			return r, true
		}
	}
	return RelaySession{}, false
}

// Network returns the catalog's record of subnet's network, or nil if
// there is none or it was deleted.
func (v *View) Network(subnet netip.Prefix) *catalog.Network {
	if n, ok := v.Catalog.Live(subnet); ok {
		return n
	}
	return nil
}

// Deleted reports whether subnet's network was removed from the cluster.
func (v *View) Deleted(subnet netip.Prefix) bool {
	n, ok := v.Catalog.Networks[subnet]
	return ok && n.Deleted
}

// BlocksOf returns the blocks node owns in subnet.
func (v *View) BlocksOf(subnet netip.Prefix, node string) []netip.Prefix {
	if n := v.Network(subnet); n != nil {
		return n.BlocksOf(node)
	}
	return nil
}

// OwnBlocks returns the blocks this node owns in subnet.
//
// Also of a deleted network: a host keeps its blocks of a network removed
// from the cluster until it gives them back (catalog's deleteNetwork).
func (v *View) OwnBlocks(subnet netip.Prefix) []netip.Prefix {
	if n, ok := v.Catalog.Networks[subnet]; ok {
		return n.BlocksOf(v.Self)
	}
	return nil
}

// Reserved returns the addresses no container of subnet may get.
func (v *View) Reserved(subnet netip.Prefix) []netip.Addr {
	if n := v.Network(subnet); n != nil {
		return n.Reserved()
	}
	return nil
}

// Owner returns the node whose block contains addr.
func (v *View) Owner(subnet netip.Prefix, addr netip.Addr) (node string, block netip.Prefix, ok bool) {
	if n := v.Network(subnet); n != nil {
		return n.Owner(addr)
	}
	return "", netip.Prefix{}, false
}

// Spec returns subnet's Docker definition, once known.
func (v *View) Spec(subnet netip.Prefix) *catalog.Spec {
	if n := v.Network(subnet); n != nil {
		return n.Spec
	}
	return nil
}

// Subnets lists the cluster's live networks.
func (v *View) Subnets() []netip.Prefix {
	var out []netip.Prefix
	for _, s := range v.Catalog.Subnets() {
		if !v.Catalog.Networks[s].Deleted {
			out = append(out, s)
		}
	}
	return out
}

// Entry returns node's trusted entry for subnet.
func (v *View) Entry(subnet netip.Prefix, node string) (NetworkEntry, bool) {
	for _, e := range v.Entries[subnet] {
		if e.Node == node {
			return e, true
		}
	}
	return NetworkEntry{}, false
}

// Users lists the members with containers on subnet, and how many.
func (v *View) Users(subnet netip.Prefix) map[string]int {
	out := map[string]int{}
	for _, e := range v.Entries[subnet] {
		if e.Endpoints > 0 {
			out[e.Node] = e.Endpoints
		}
	}
	return out
}

// Peer is another node that has a network attached: a WireGuard peer.
type Peer struct {
	Node      string
	PublicKey crypto.PublicKey
	// Endpoint is the address and WireGuard port the node advertises.
	Endpoint netip.AddrPort
	// Public is where members outside the node's NAT see its WireGuard
	// port, as it says; or, if it says nothing of it but is behind a
	// consistent NAT, a guess: its public address with its own port.
	Public netip.AddrPort
	NAT    NATKind
	// AllowedIPs are the blocks the catalog says the node owns: what it
	// says of itself does not matter.
	AllowedIPs []netip.Prefix
	State      Liveness
	// Wants is what the node wishes for its path to this node, if it
	// said anything (HasWant).
	Wants   RelayWant
	HasWant bool
}

// Peers returns the WireGuard peers of subnet: other registered nodes
// that have it attached and are not known to be down. Dead nodes are left
// out so that nothing is sent into the void; their blocks stay theirs.
func (v *View) Peers(subnet netip.Prefix) []Peer {
	var out []Peer
	for _, e := range v.Entries[subnet] {
		m, ok := v.Members[e.Node]
		if !ok || m.Self || !m.Registered || e.Port == 0 || !m.State.Routable() || m.PublicKey.IsZero() {
			continue
		}
		p := Peer{
			Node:       e.Node,
			PublicKey:  m.PublicKey,
			Endpoint:   netip.AddrPortFrom(m.Addr, e.Port),
			NAT:        m.NAT,
			AllowedIPs: v.BlocksOf(subnet, e.Node),
			State:      m.State,
		}
		switch {
		case e.Seen.IsValid():
			p.Public = e.Seen
		case m.NAT == NATConsistent && m.Seen.IsValid():
			p.Public = netip.AddrPortFrom(m.Seen.Addr(), e.Port)
		}
		p.Wants, p.HasWant = e.Relay[v.Self]
		out = append(out, p)
	}
	return out
}

type liveRecord struct {
	state   Liveness
	since   time.Time
	lastAck time.Time
	rtt     time.Duration
	// addr is the member's gossip address as memberlist last reported
	// it, copied while memberlist held its lock: see Mesh.send.
	addr string
}

// buildView assembles a View from the catalog, the replica and liveness.
func buildView(self string, cat *catalog.State, r *records.Replica, selfInfo NodeInfo, live map[string]liveRecord) *View {
	v := &View{Self: self, ClusterID: cat.ClusterID, Catalog: cat, Members: map[string]Member{}, Entries: map[netip.Prefix][]NetworkEntry{}}
	registered := func(name string, id crypto.NodeID) bool {
		n, ok := cat.Nodes[name]
		return ok && n.ID == id
	}
	infos := maps.Collect(r.Infos())
	infos[self] = selfInfo
	for name, info := range infos {
		l := live[name]
		m := Member{NodeInfo: info, State: l.state, Since: l.since, LastAck: l.lastAck, RTT: l.rtt, Self: name == self,
			Registered: registered(name, info.ID)}
		if m.Self {
			m.State = Alive
		}
		v.Members[name] = m
	}
	for name, n := range cat.Nodes {
		if _, ok := v.Members[name]; !ok {
			l := live[name]
			v.Members[name] = Member{NodeInfo: NodeInfo{Name: name, ID: n.ID, Addr: n.Addr}, State: l.state, Since: l.since, Registered: true, Self: name == self}
		}
	}
	for e := range r.Entries() {
		if m, ok := v.Members[e.Node]; ok && m.Registered {
			v.Entries[e.Subnet] = append(v.Entries[e.Subnet], e)
		}
	}
	for _, entries := range v.Entries {
		slices.SortFunc(entries, func(a, b NetworkEntry) int { return cmp.Compare(a.Node, b.Node) })
	}
	for rs := range r.Sessions() {
		if m, ok := v.Members[rs.Relay]; ok && m.Registered && rs.Port != 0 {
			v.Sessions = append(v.Sessions, rs)
		}
	}
	slices.SortFunc(v.Sessions, func(a, b RelaySession) int {
		return cmp.Or(cmp.Compare(a.Relay, b.Relay), a.Subnet.Addr().Compare(b.Subnet.Addr()), cmp.Compare(a.A, b.A), cmp.Compare(a.B, b.B))
	})
	return v
}

// View returns a snapshot of the mesh as this node sees it.
func (m *Mesh) View() *View {
	cat := m.node.FSM().State()
	m.mu.Lock()
	defer m.mu.Unlock()
	v := buildView(m.cfg.Name, cat, m.state.rep, m.state.own.info, m.state.live)
	var sightings map[string]gossipnet.Sighting
	var pmtus map[string]PathMTU
	if m.gossip.net != nil {
		sightings = m.gossip.net.Sightings()
	}
	if m.pmtu != nil {
		pmtus = m.pmtu.Results()
	}
	for name, mem := range v.Members {
		s, seen := sightings[name]
		p, measured := pmtus[name]
		if !seen && !measured {
			continue
		}
		mem.Sighted, mem.SightedAt, mem.PathMTU = s.Addr, s.At, p.MTU
		v.Members[name] = mem
	}
	// memberlist probes one member per interval, so a member normally
	// answers once every len(members) intervals; three missed rounds make
	// it suspect.
	suspectAfter := 3 * time.Duration(max(len(v.Members), 2)) * m.gossip.probeInterval
	now := time.Now()
	selfNAT := v.Members[v.Self].NAT
	for name, mem := range v.Members {
		// Two hosts behind NAT may have no direct path at all; memberlist
		// then probes one through others, which answers no direct probe.
		natted := selfNAT.Behind() && mem.NAT.Behind() && !mem.Direct(now)
		switch {
		case mem.State == Alive && !mem.Self && !natted && now.Sub(mem.LastAck) > suspectAfter:
			mem.State = Suspect
		case mem.State == Unknown && !m.state.started.IsZero() && now.Sub(m.state.started) > m.unknownGrace():
			// Gossip has had time to find it and has not: treat it as
			// failed, like memberlist would have.
			mem.State, mem.Since = Dead, m.state.started
		default:
			continue
		}
		v.Members[name] = mem
	}
	return v
}

// unknownGrace is how long a member known only from the catalog or saved
// gossip may stay unconfirmed before it counts as failed: long enough for
// the seeds to be joined and a reconnect round to reach it.
func (m *Mesh) unknownGrace() time.Duration {
	return 3*m.cfg.ReconnectInterval + 10*m.gossip.probeInterval
}
