package records

import (
	"maps"
	"net/netip"

	"github.com/wgmesh/wgmesh/crypto"
)

// Records are what a node says about itself by gossip, signed with its
// identity key: its NodeInfo (in memberlist's node metadata, so that it
// arrives with the node's membership) and one NetworkEntry per network it
// has. Only the node a record describes can sign it, and a receiver
// trusts a record only if the catalog binds the record's node name to the
// identity that signed it.
//
// A record's version orders the node's own records and nothing else:
// there is no clock shared between nodes, so no message of one node can
// hold back the records of another. Versions are the node's run
// (generation, which grows at every start) in the upper half and a
// counter within the run in the lower half, so a restarted node's records
// replace those of its previous run without it having to remember them.

// Signature purposes.
const (
	PurposeInfo        = "node info"
	PurposeEntry       = "network entry"
	PurposeSession     = "relay session"
	PurposeObservation = "observation"
)

// NodeInfo is what a node publishes about itself.
type NodeInfo struct {
	Name string        `json:"n"`
	ID   crypto.NodeID `json:"i"`
	// Version orders this node's infos (see above).
	Version   uint64           `json:"v"`
	PublicKey crypto.PublicKey `json:"k"`
	// Addr is the node's WireGuard and gossip address.
	Addr       netip.Addr `json:"a"`
	GossipPort uint16     `json:"g,omitempty"`
	// RaftPort is where it serves consensus (TCP).
	RaftPort uint16 `json:"r,omitempty"`
	WGMode   string `json:"m,omitempty"`
	// Leaving is set just before a node leaves on purpose, so that peers
	// tell "left" from "failed".
	Leaving bool `json:"l,omitempty"`
	// ClusterID is the cluster the node belongs to, once registered.
	ClusterID string `json:"c,omitempty"`
	// Features are what the node's software can do (feature bits).
	Features uint32 `json:"f,omitempty"`
	// NAT is how the node's NAT maps its ports, as its peers see it;
	// empty until known.
	NAT NATKind `json:"t,omitempty"`
	// Seen is where members outside the node's NAT see its gossip port
	// (when NAT is not none).
	Seen netip.AddrPort `json:"o,omitzero"`
	// RelayPort and RelayPorts: the node relays for other members on
	// UDP ports RelayPort to RelayPort+RelayPorts-1 (relay.go). 0: it
	// does not.
	RelayPort  uint16 `json:"y,omitempty"`
	RelayPorts uint16 `json:"yn,omitempty"`
}

// Feature bits of NodeInfo.Features.
const (
	// FeatureHeader: the node reads the sender header in front of
	// gossip datagrams (package gossipnet).
	FeatureHeader uint32 = 1 << iota
	// FeatureServerAlways and FeatureServerNever: the node runs with
	// --server=always or never (none of them: auto); FeatureServerKey:
	// it says it holds the server key (consensus/servers.go). They ride
	// in Features because memberlist caps the metadata at 512 bytes.
	FeatureServerAlways
	FeatureServerNever
	FeatureServerKey
	// FeatureRelayBind: the node sends its relays binds (driver/relay),
	// and as a relay requires them of ends that have this bit. Old
	// agents lack it: their relays get no binds, and as ends they are
	// learned from handshakes alone.
	FeatureRelayBind
	// FeatureReplayProof: the node reads header version 2, which
	// carries its sender's generation (package gossipnet), and echoes
	// reflection requests' nonces.
	FeatureReplayProof
)

// RelayBinds reports whether the node's software sends and checks relay
// binds (FeatureRelayBind).
func (n NodeInfo) RelayBinds() bool { return n.Features&FeatureRelayBind != 0 }

// NetworkEntry is one node's state in one network. The subnet is the
// network's identity across the mesh: Docker gives the same network a
// different ID on every host.
type NetworkEntry struct {
	Node    string       `json:"n"`
	Subnet  netip.Prefix `json:"s"`
	Version uint64       `json:"v"`
	// Port is the node's WireGuard port for the network; 0 means the
	// network is not attached there.
	Port uint16 `json:"p,omitempty"`
	// Endpoints is how many containers the node has on the network.
	Endpoints int `json:"e,omitempty"`
	// Seen is where members see the node's WireGuard port, when that is
	// not its address and port (it is behind NAT).
	Seen netip.AddrPort `json:"o,omitzero"`
	// Relay lists the peers of the network the node wants to reach
	// through a relay, and those it is ready to try directly again.
	Relay map[string]RelayWant `json:"r,omitempty"`
}

// RelayWant is one node's wish about its path to one peer.
type RelayWant struct {
	// Via is the relay the node wants the pair's traffic to go through;
	// empty: it is ready to try the direct path again.
	Via string `json:"v,omitempty"`
	// Tries counts the direct attempts that failed.
	Tries int `json:"t,omitempty"`
}

// Equal compares entries, map included.
func (e NetworkEntry) Equal(o NetworkEntry) bool {
	return e.Node == o.Node && e.Subnet == o.Subnet && e.Version == o.Version && e.Port == o.Port &&
		e.Endpoints == o.Endpoints && e.Seen == o.Seen && maps.Equal(e.Relay, o.Relay)
}

// RelaySession is a relay's record of a pair of members whose traffic on
// one network it forwards, on a port of its own. Only the relay signs it.
type RelaySession struct {
	Relay  string       `json:"y"`
	Subnet netip.Prefix `json:"s"`
	// A and B are the pair, A < B.
	A       string `json:"a"`
	B       string `json:"b"`
	Version uint64 `json:"v"`
	// Port is where the relay forwards the pair; 0 closes the session.
	Port uint16 `json:"p,omitempty"`
	// MTU is the smaller of the relay's path MTUs to A and B; 0 unknown.
	MTU int `json:"m,omitempty"`
}

// Observation is what one node sees of another: where the subject's
// gossip and WireGuard packets come from. The observer signs it and
// sends it to the subject only, which learns from its observers how it
// is seen from outside its NAT.
type Observation struct {
	Observer string `json:"o"`
	Subject  string `json:"n"`
	// Version orders the observer's observations.
	Version uint64 `json:"v"`
	// Gossip is the source of the subject's gossip packets.
	Gossip netip.AddrPort `json:"g,omitzero"`
	// WG is the source of the subject's WireGuard handshakes, by network.
	WG map[netip.Prefix]netip.AddrPort `json:"w,omitempty"`
}

// NATKind is how a node's NAT maps its ports, as its peers see it.
type NATKind string

const (
	// NATUnknown: no observer has reported yet.
	NATUnknown NATKind = ""
	// NATNone: every observer sees the node at the address it
	// advertises; it can be reached there.
	NATNone NATKind = "none"
	// NATConsistent: observers outside see the node's port mapped, to
	// the same public port whatever the destination (endpoint-
	// independent mapping); two such hosts can punch a direct path.
	NATConsistent NATKind = "consistent"
	// NATSymmetric: each destination sees another public port; only a
	// host reachable at its own address, or a relay, gets through.
	NATSymmetric NATKind = "symmetric"
)

func (k NATKind) valid() bool {
	switch k {
	case NATUnknown, NATNone, NATConsistent, NATSymmetric:
		return true
	}
	return false
}

// Behind reports whether the node is known to be behind NAT.
func (k NATKind) Behind() bool { return k == NATConsistent || k == NATSymmetric }
