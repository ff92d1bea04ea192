package catalog

import (
	"encoding/json"
	"fmt"
	"net/netip"

	"github.com/wgmesh/wgmesh/crypto"
)

// Op names a command.
type Op string

const (
	// OpInit is the first entry of a cluster: its ID and the
	// registration of the node that bootstrapped it.
	OpInit Op = "init"
	// OpRegister binds a name to an identity, once per start of a node.
	OpRegister Op = "register"
	// OpEnsureNetwork creates a network, or checks that the existing one
	// of its subnet is the same.
	OpEnsureNetwork Op = "ensure-network"
	// OpSetSpec records a network's Docker definition.
	OpSetSpec Op = "set-spec"
	// OpDeleteNetwork removes a network everywhere, with its blocks.
	OpDeleteNetwork Op = "delete-network"
	// OpReserve keeps an address of a network from every container
	// (an --aux-address).
	OpReserve Op = "reserve"
	// OpClaim asks for a block; OpRelease gives blocks back.
	OpClaim   Op = "claim"
	OpRelease Op = "release"
	// OpAdopt takes over blocks a node held under the quorum protocol of
	// wgmesh before Raft, once, when its state is upgraded.
	OpAdopt Op = "adopt"
	// OpForget declares a node gone for good: its blocks are freed and
	// its identity may never come back.
	OpForget Op = "forget"
)

// Command is a request of one node, applied by every node in log order.
// Exactly one of the operation fields is set, matching Op.
type Command struct {
	Op Op `json:"op"`
	// Node is the name of the asking node; the command is signed with
	// that node's identity (or, for OpInit and OpRegister, with the
	// identity being registered).
	Node string `json:"node"`
	// BootID and Seq make commands apply once: BootID must be the asking
	// node's current run and Seq must grow within it.
	BootID string `json:"boot"`
	Seq    uint64 `json:"seq,omitempty"`

	Init     *Init          `json:"init,omitempty"`
	Register *Register      `json:"register,omitempty"`
	Network  *EnsureNetwork `json:"network,omitempty"`
	Spec     *SetSpec       `json:"spec,omitempty"`
	Delete   *DeleteNetwork `json:"delete,omitempty"`
	Reserve  *Reserve       `json:"reserve,omitempty"`
	Claim    *Claim         `json:"claim,omitempty"`
	Release  *Release       `json:"release,omitempty"`
	Adopt    *Adopt         `json:"adopt,omitempty"`
	Forget   *Forget        `json:"forget,omitempty"`
}

// Init starts a cluster.
type Init struct {
	ClusterID string   `json:"cluster_id"`
	Register  Register `json:"register"`
}

// Register binds Command.Node to ID.
type Register struct {
	ID         crypto.NodeID `json:"id"`
	Addr       netip.Addr    `json:"addr"`
	Generation uint64        `json:"generation"`
	// Protocol is the highest catalog protocol the registering node
	// speaks (see Protocol). wgmesh before it sent none (0, read as
	// ProtocolLegacy); older replicas ignore the field.
	Protocol int `json:"protocol,omitempty"`
}

// EnsureNetwork creates a network. BlockBits 0 takes the default for the
// subnet; Gateway, if valid, was given with --gateway, and otherwise the
// subnet's first address is every host's gateway.
type EnsureNetwork struct {
	Subnet    netip.Prefix `json:"subnet"`
	BlockBits int          `json:"block_bits,omitempty"`
	Gateway   netip.Addr   `json:"gateway,omitzero"`
	// HostGateways keeps the scheme of networks made before Raft, where
	// each host took its gateway address from a block of its own: their
	// subnet's first address may belong to a container.
	HostGateways bool `json:"host_gateways,omitempty"`
}

// Reserve reserves Addr in Subnet.
type Reserve struct {
	Subnet netip.Prefix `json:"subnet"`
	Addr   netip.Addr   `json:"addr"`
}

// SetSpec records a network's Docker definition.
type SetSpec struct {
	Subnet netip.Prefix `json:"subnet"`
	Spec   Spec         `json:"spec"`
}

// DeleteNetwork removes a network.
type DeleteNetwork struct {
	Subnet netip.Prefix `json:"subnet"`
}

// Claim asks for a block of Subnet for the asking node.
type Claim struct {
	Subnet netip.Prefix `json:"subnet"`
	// Within restricts the block to a range (Docker's --ip-range).
	Within netip.Prefix `json:"within,omitzero"`
	// Containing asks for the block that holds this address (a static
	// --ip); a smaller block is taken if the full size would overlap
	// another owner's.
	Containing netip.Addr `json:"containing,omitzero"`
}

// Release gives blocks back.
type Release struct {
	Subnet netip.Prefix   `json:"subnet"`
	Blocks []netip.Prefix `json:"blocks"`
}

// Adopt takes over blocks held before the upgrade.
type Adopt struct {
	Subnet netip.Prefix   `json:"subnet"`
	Blocks []netip.Prefix `json:"blocks"`
}

// Forget declares Name gone for good.
type Forget struct {
	Name string `json:"name"`
}

// Signed is a command as it travels and as it is logged: its encoding and
// the asking node's signature over exactly those bytes.
type Signed struct {
	Cmd []byte `json:"cmd"`
	Sig []byte `json:"sig"`
}

// signPurpose separates command signatures from every other signature.
const signPurpose = "catalog command"

// Sign encodes and signs c with id.
func Sign(c *Command, id crypto.Identity) (Signed, error) {
	if err := c.Validate(); err != nil {
		return Signed{}, err
	}
	b, err := json.Marshal(c)
	if err != nil {
		return Signed{}, fmt.Errorf("encoding command: %w", err)
	}
	return Signed{Cmd: b, Sig: id.Sign(signPurpose, b)}, nil
}

// VerifiedBy reports whether id signed the command.
func (s Signed) VerifiedBy(id crypto.NodeID) bool { return id.Verify(signPurpose, s.Cmd, s.Sig) }

// Encode is the log entry of a signed command.
func (s Signed) Encode() []byte {
	b, _ := json.Marshal(s)
	return b
}

// Limits on decoded commands, which come from other nodes.
const (
	MaxEntryBytes = 64 << 10
	maxNameLen    = 64
	maxListLen    = 4096
	maxSpecItems  = 64
	maxTextLen    = 256
	maxBootIDLen  = 64
)

// DecodeSigned decodes a log entry or a request. The signature is checked
// later, against the identity the state binds to the asking node.
func DecodeSigned(b []byte) (Signed, *Command, error) {
	if len(b) > MaxEntryBytes {
		return Signed{}, nil, invalid("command of %d bytes exceeds %d", len(b), MaxEntryBytes)
	}
	var s Signed
	if err := json.Unmarshal(b, &s); err != nil {
		return Signed{}, nil, invalid("command envelope: %v", err)
	}
	var c Command
	if err := json.Unmarshal(s.Cmd, &c); err != nil {
		return Signed{}, nil, invalid("command: %v", err)
	}
	if err := c.Validate(); err != nil {
		return Signed{}, nil, err
	}
	return s, &c, nil
}

// SignerID is the identity a command must be signed with when the state
// does not know the asking node yet: the one it registers.
func (c *Command) SignerID() (crypto.NodeID, bool) {
	switch c.Op {
	case OpInit:
		return c.Init.Register.ID, true
	case OpRegister:
		return c.Register.ID, true
	}
	return crypto.NodeID{}, false
}
