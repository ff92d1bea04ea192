// Package catalog is what the whole cluster agrees on, through Raft: which
// identity each node name belongs to, which networks exist, and which node
// owns which block of each network's subnet. Everything else a node
// publishes (its WireGuard key and endpoint, its ports, its containers)
// may differ between nodes for a while and travels by gossip; what must
// never be held twice is decided here, by committed log entries applied
// in the same order on every node.
//
// The package is the state machine and nothing else: commands, their
// validation and signatures, their deterministic application, and
// snapshots. It starts nothing and does no I/O; package consensus runs it
// under Raft.
package catalog

import (
	"cmp"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
)

// State is the committed state, as of log index Index.
type State struct {
	// ClusterID names the cluster: set by the node that bootstrapped it,
	// so that two clusters that meet by gossip can tell each other apart.
	ClusterID string `json:"cluster_id"`
	Index     uint64 `json:"index"`
	// Protocol is the highest protocol of an entry applied so far (0
	// until the first endorsed entry; see Protocol). Once the cluster
	// switched, its leaders endorse every entry, whatever the nodes
	// advertise: a member cannot switch the cluster back by
	// registering as an old node.
	Protocol int `json:"protocol,omitempty"`
	// Nodes by name.
	Nodes map[string]*Node `json:"nodes"`
	// Forgotten identities may never register again.
	Forgotten map[crypto.NodeID]Forgotten `json:"forgotten,omitempty"`
	// Networks by subnet: a subnet is one network across the cluster.
	Networks map[netip.Prefix]*Network `json:"networks"`
}

// Node binds a name to an identity.
type Node struct {
	Name string        `json:"name"`
	ID   crypto.NodeID `json:"id"`
	// Addr is the address the node advertised when it last registered.
	Addr netip.Addr `json:"addr"`
	// BootID names the node's current run, Generation counts its runs:
	// a node registers once per start with a higher generation, so one
	// that starts from an older copy of its state directory (a restored
	// backup or VM snapshot) is caught, and so is a second host running
	// with a copy of its identity.
	BootID     string `json:"boot_id"`
	Generation uint64 `json:"generation"`
	// Registered is when the name was first bound, Seen when the node
	// last registered (a start).
	Registered time.Time `json:"registered"`
	Seen       time.Time `json:"seen"`
	// LastSeq and LastResult make a node's commands apply exactly once:
	// a command is retried with the same sequence number when its answer
	// was lost, and gets the answer of the first application.
	LastSeq    uint64 `json:"last_seq,omitempty"`
	LastResult Result `json:"last_result,omitzero"`
	// Protocol is what the node advertised when it last registered, for
	// the leader's choice of entry format only: Apply never reads it,
	// since a replica of an older wgmesh did not record it.
	Protocol int `json:"protocol,omitempty"`
}

// Forgotten records a node an operator declared gone for good.
type Forgotten struct {
	Name string    `json:"name"`
	By   string    `json:"by"`
	At   time.Time `json:"at"`
	// Index is the log index of the forget, for dropping the oldest
	// tombstone first (0: forgotten by an entry of protocol 1).
	Index uint64 `json:"index,omitempty"`
}

// Network is a wgmesh network as the whole cluster knows it.
type Network struct {
	Subnet netip.Prefix `json:"subnet"`
	// BlockBits is the prefix length of the blocks hosts claim.
	BlockBits int `json:"block_bits"`
	// Gateway is the network's gateway address, the same on every host
	// and never given to a container.
	Gateway netip.Addr `json:"gateway"`
	// Aux are --aux-address reservations.
	Aux []netip.Addr `json:"aux,omitempty"`
	// Spec is how the network was defined with `docker network create`,
	// once a host's sync loop has read it from its Docker.
	Spec *Spec `json:"spec,omitempty"`
	// Blocks maps each owned block to its owner's name.
	Blocks    map[netip.Prefix]string `json:"blocks,omitempty"`
	CreatedBy string                  `json:"created_by"`
	Created   time.Time               `json:"created"`
	// Deleted marks a network removed from the cluster (`wgmesh network
	// rm`): its blocks are free, and hosts remove their copies. Creating
	// the subnet again replaces the record.
	Deleted   bool      `json:"deleted,omitempty"`
	DeletedBy string    `json:"deleted_by,omitempty"`
	DeletedAt time.Time `json:"deleted_at,omitzero"`
	// DeletedIndex is the log index of the deletion, for dropping the
	// oldest tombstone first (0: deleted by an entry of protocol 1).
	DeletedIndex uint64 `json:"deleted_index,omitempty"`
}

// Spec is what `docker network create` was given, so that every host can
// create the same Docker network.
type Spec struct {
	Name        string            `json:"name"`
	IPRange     netip.Prefix      `json:"ip_range,omitzero"`
	Options     map[string]string `json:"options,omitempty"`
	IPAMOptions map[string]string `json:"ipam_options,omitempty"`
	Labels      map[string]string `json:"labels,omitempty"`
	Internal    bool              `json:"internal,omitempty"`
}

// Clone returns a deep copy.
func (s *Spec) Clone() *Spec {
	if s == nil {
		return nil
	}
	c := *s
	c.Options = maps.Clone(s.Options)
	c.IPAMOptions = maps.Clone(s.IPAMOptions)
	c.Labels = maps.Clone(s.Labels)
	return &c
}

// Equal reports whether two specs define the same network.
func (s *Spec) Equal(o *Spec) bool {
	if s == nil || o == nil {
		return s == o
	}
	return s.Name == o.Name && s.IPRange == o.IPRange && s.Internal == o.Internal &&
		maps.Equal(s.Options, o.Options) && maps.Equal(s.IPAMOptions, o.IPAMOptions) && maps.Equal(s.Labels, o.Labels)
}

// Clone returns a deep copy.
func (n *Network) Clone() *Network {
	if n == nil {
		return nil
	}
	c := *n
	c.Aux = slices.Clone(n.Aux)
	c.Spec = n.Spec.Clone()
	c.Blocks = maps.Clone(n.Blocks)
	return &c
}

// Reserved lists the addresses no host may give to a container: the
// gateway and the aux addresses.
func (n *Network) Reserved() []netip.Addr {
	var out []netip.Addr
	if n.Gateway.IsValid() {
		out = append(out, n.Gateway)
	}
	out = append(out, n.Aux...)
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// BlocksOf lists the blocks node owns, sorted.
func (n *Network) BlocksOf(node string) []netip.Prefix {
	var out []netip.Prefix
	for b, owner := range n.Blocks {
		if owner == node {
			out = append(out, b)
		}
	}
	slices.SortFunc(out, ComparePrefix)
	return out
}

// Owner returns the owner of the block holding addr.
func (n *Network) Owner(addr netip.Addr) (node string, block netip.Prefix, ok bool) {
	for b, owner := range n.Blocks {
		if b.Contains(addr) {
			return owner, b, true
		}
	}
	return "", netip.Prefix{}, false
}

// NewState returns an empty state.
func NewState() *State {
	return &State{Nodes: map[string]*Node{}, Forgotten: map[crypto.NodeID]Forgotten{}, Networks: map[netip.Prefix]*Network{}}
}

// Clone returns a deep copy: readers get one and may keep it.
func (s *State) Clone() *State {
	c := &State{ClusterID: s.ClusterID, Index: s.Index, Protocol: s.Protocol,
		Nodes:     make(map[string]*Node, len(s.Nodes)),
		Forgotten: maps.Clone(s.Forgotten),
		Networks:  make(map[netip.Prefix]*Network, len(s.Networks)),
	}
	if c.Forgotten == nil {
		c.Forgotten = map[crypto.NodeID]Forgotten{}
	}
	for k, n := range s.Nodes {
		nc := *n
		c.Nodes[k] = &nc
	}
	for k, n := range s.Networks {
		c.Networks[k] = n.Clone()
	}
	return c
}

// NodeByID finds the node registered with id.
func (s *State) NodeByID(id crypto.NodeID) (*Node, bool) {
	for _, n := range s.Nodes {
		if n.ID == id {
			return n, true
		}
	}
	return nil, false
}

// Live returns the network of subnet unless there is none or it was
// deleted.
func (s *State) Live(subnet netip.Prefix) (*Network, bool) {
	n, ok := s.Networks[subnet]
	return n, ok && !n.Deleted
}

// NetworkByName finds a live network by its Docker name.
func (s *State) NetworkByName(name string) (*Network, bool) {
	for _, n := range s.Networks {
		if !n.Deleted && n.Spec != nil && n.Spec.Name == name {
			return n, true
		}
	}
	return nil, false
}

// Subnets lists the networks' subnets, sorted.
func (s *State) Subnets() []netip.Prefix {
	return slices.SortedFunc(maps.Keys(s.Networks), ComparePrefix)
}

// ComparePrefix orders prefixes by address, then length.
func ComparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}
