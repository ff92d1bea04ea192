package mesh

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
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
	purposeInfo        = "node info"
	purposeEntry       = "network entry"
	purposeSession     = "relay session"
	purposeObservation = "observation"
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
	// featureHeader: the node reads the sender header in front of
	// gossip datagrams (package gossipnet).
	featureHeader uint32 = 1 << iota
	// featureServerAlways and featureServerNever: the node runs with
	// --server=always or never (none of them: auto); featureServerKey:
	// it says it holds the server key (consensus/servers.go). They ride
	// in Features because memberlist caps the metadata at 512 bytes.
	featureServerAlways
	featureServerNever
	featureServerKey
	// featureRelayBind: the node sends its relays binds (driver/relay),
	// and as a relay requires them of ends that have this bit. Old
	// agents lack it: their relays get no binds, and as ends they are
	// learned from handshakes alone.
	featureRelayBind
	// featureReplayProof: the node reads header version 2, which
	// carries its sender's generation (package gossipnet), and echoes
	// reflection requests' nonces.
	featureReplayProof
)

// FeatureRelayBind is featureRelayBind, for tests elsewhere.
const FeatureRelayBind = featureRelayBind

// RelayBinds reports whether the node's software sends and checks relay
// binds (featureRelayBind).
func (n NodeInfo) RelayBinds() bool { return n.Features&featureRelayBind != 0 }

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

// equal compares entries, map included.
func (e NetworkEntry) equal(o NetworkEntry) bool {
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

// signed is a record with its signature over exactly Data.
type signed struct {
	Data json.RawMessage `json:"d"`
	Sig  []byte          `json:"s"`
}

// Limits on records from peers.
const (
	maxModeLen     = 16
	maxClusterID   = 64
	maxVersion     = 1 << 62
	maxEndpoints   = 1 << 20
	protocol       = 2
	maxRecordBytes = 2048
	maxRelayWants  = 48
	maxTries       = 1000
)

// ErrInvalid is wrapped by every validation error of a peer's record.
var ErrInvalid = errors.New("invalid gossip record")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// ValidSubnet reports whether p can identify a wgmesh network.
func ValidSubnet(p netip.Prefix) error { return catalog.ValidSubnet(p) }

func (n *NodeInfo) validate() error {
	if err := catalog.ValidName(n.Name); err != nil {
		return invalid("%v", err)
	}
	if n.ID.IsZero() {
		return invalid("node %s: no identity", n.Name)
	}
	if n.Version == 0 || n.Version > maxVersion {
		return invalid("node %s: version %d out of range", n.Name, n.Version)
	}
	if n.PublicKey.IsZero() {
		return invalid("node %s: no WireGuard key", n.Name)
	}
	if !n.Addr.IsValid() || n.Addr.IsUnspecified() || n.Addr.Zone() != "" {
		return invalid("node %s: bad address %s", n.Name, n.Addr)
	}
	if len(n.WGMode) > maxModeLen || len(n.ClusterID) > maxClusterID {
		return invalid("node %s: field too long", n.Name)
	}
	if !n.NAT.valid() {
		return invalid("node %s: unknown NAT kind %q", n.Name, n.NAT)
	}
	if n.Seen.IsValid() && !usableAddrPort(n.Seen) {
		return invalid("node %s: bad public address %s", n.Name, n.Seen)
	}
	if n.RelayPort == 0 && n.RelayPorts != 0 || n.RelayPort != 0 && (n.RelayPorts < 2 || int(n.RelayPort)+int(n.RelayPorts) > 65536) {
		return invalid("node %s: relay ports %d+%d out of range", n.Name, n.RelayPort, n.RelayPorts)
	}
	return nil
}

// usableAddrPort: an address and port a packet can be sent to.
func usableAddrPort(a netip.AddrPort) bool {
	ip := a.Addr()
	return a.Port() != 0 && ip.IsValid() && !ip.IsUnspecified() && !ip.IsMulticast() && ip.Zone() == ""
}

func (e *NetworkEntry) validate() error {
	if err := catalog.ValidName(e.Node); err != nil {
		return invalid("%v", err)
	}
	if err := catalog.ValidSubnet(e.Subnet); err != nil {
		return invalid("%v", err)
	}
	if e.Version == 0 || e.Version > maxVersion {
		return invalid("entry %s/%s: version %d out of range", e.Node, e.Subnet, e.Version)
	}
	if e.Endpoints < 0 || e.Endpoints > maxEndpoints {
		return invalid("entry %s/%s: endpoint count out of range", e.Node, e.Subnet)
	}
	if e.Seen.IsValid() && !usableAddrPort(e.Seen) {
		return invalid("entry %s/%s: bad public address %s", e.Node, e.Subnet, e.Seen)
	}
	if len(e.Relay) > maxRelayWants {
		return invalid("entry %s/%s: %d relay wishes", e.Node, e.Subnet, len(e.Relay))
	}
	for peer, w := range e.Relay {
		if catalog.ValidName(peer) != nil || peer == e.Node || w.Via != "" && (catalog.ValidName(w.Via) != nil || w.Via == e.Node || w.Via == peer) ||
			w.Tries < 0 || w.Tries > maxTries {
			return invalid("entry %s/%s: bad relay wish for %q", e.Node, e.Subnet, peer)
		}
	}
	return nil
}

func (r *RelaySession) validate() error {
	for _, n := range []string{r.Relay, r.A, r.B} {
		if err := catalog.ValidName(n); err != nil {
			return invalid("relay session: %v", err)
		}
	}
	if err := catalog.ValidSubnet(r.Subnet); err != nil {
		return invalid("relay session: %v", err)
	}
	if r.A >= r.B || r.Relay == r.A || r.Relay == r.B {
		return invalid("relay session %s: bad pair %s, %s", r.Relay, r.A, r.B)
	}
	if r.Version == 0 || r.Version > maxVersion {
		return invalid("relay session %s: version %d out of range", r.Relay, r.Version)
	}
	if r.MTU < 0 || r.MTU > 65535 {
		return invalid("relay session %s: MTU %d out of range", r.Relay, r.MTU)
	}
	return nil
}

func (o *Observation) validate() error {
	if err := catalog.ValidName(o.Observer); err != nil {
		return invalid("observation: %v", err)
	}
	if err := catalog.ValidName(o.Subject); err != nil || o.Subject == o.Observer {
		return invalid("observation by %s: bad subject %q", o.Observer, o.Subject)
	}
	if o.Version == 0 || o.Version > maxVersion {
		return invalid("observation by %s: version %d out of range", o.Observer, o.Version)
	}
	if o.Gossip.IsValid() && !usableAddrPort(o.Gossip) {
		return invalid("observation by %s: bad address %s", o.Observer, o.Gossip)
	}
	if len(o.WG) > maxRelayWants {
		return invalid("observation by %s: %d networks", o.Observer, len(o.WG))
	}
	for s, a := range o.WG {
		if catalog.ValidSubnet(s) != nil || !usableAddrPort(a) {
			return invalid("observation by %s: bad WireGuard sighting %s %s", o.Observer, s, a)
		}
	}
	return nil
}

func sign(id crypto.Identity, purpose string, v any) signed {
	b, _ := json.Marshal(v)
	return signed{Data: b, Sig: id.Sign(purpose, b)}
}

// metaV2 is the memberlist node metadata: protocol version and the signed
// NodeInfo. memberlist caps it at 512 bytes.
type metaV2 struct {
	Proto int `json:"p"`
	signed
}

func encodeMeta(s signed) []byte {
	b, _ := json.Marshal(metaV2{Proto: protocol, signed: s})
	return b
}

// decodeMeta decodes a node's metadata and checks its self-signature:
// the info is signed by the identity it names. Whether that identity is
// the one the catalog binds to the name is for the View to decide.
func decodeMeta(b []byte) (NodeInfo, signed, error) {
	if len(b) > maxRecordBytes {
		return NodeInfo{}, signed{}, invalid("metadata of %d bytes", len(b))
	}
	var m metaV2
	if err := json.Unmarshal(b, &m); err != nil {
		return NodeInfo{}, signed{}, invalid("node metadata: %v", err)
	}
	if m.Proto != protocol {
		return NodeInfo{}, signed{}, invalid("node metadata of protocol %d, this node speaks %d (upgrade every node)", m.Proto, protocol)
	}
	var n NodeInfo
	if err := json.Unmarshal(m.Data, &n); err != nil {
		return NodeInfo{}, signed{}, invalid("node info: %v", err)
	}
	if err := n.validate(); err != nil {
		return NodeInfo{}, signed{}, err
	}
	if !n.ID.Verify(purposeInfo, m.Data, m.Sig) {
		return NodeInfo{}, signed{}, invalid("node %s: info not signed by its identity", n.Name)
	}
	return n, m.signed, nil
}

// decodeSession decodes a signed relay session without checking its
// signature.
func decodeSession(s signed) (RelaySession, error) {
	var r RelaySession
	if err := json.Unmarshal(s.Data, &r); err != nil {
		return RelaySession{}, invalid("relay session: %v", err)
	}
	if err := r.validate(); err != nil {
		return RelaySession{}, err
	}
	return r, nil
}

// decodeObservation decodes a signed observation without checking its
// signature.
func decodeObservation(s signed) (Observation, error) {
	var o Observation
	if err := json.Unmarshal(s.Data, &o); err != nil {
		return Observation{}, invalid("observation: %v", err)
	}
	if err := o.validate(); err != nil {
		return Observation{}, err
	}
	return o, nil
}

// decodeEntry decodes a signed entry without checking its signature,
// which needs the identity of its node.
func decodeEntry(s signed) (NetworkEntry, error) {
	var e NetworkEntry
	if err := json.Unmarshal(s.Data, &e); err != nil {
		return NetworkEntry{}, invalid("network entry: %v", err)
	}
	if err := e.validate(); err != nil {
		return NetworkEntry{}, err
	}
	return e, nil
}
