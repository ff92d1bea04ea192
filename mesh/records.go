package mesh

import (
	"encoding/json"
	"errors"
	"fmt"
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
	purposeInfo  = "node info"
	purposeEntry = "network entry"
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
}

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
	return nil
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
