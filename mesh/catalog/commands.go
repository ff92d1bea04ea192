package catalog

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"unicode"

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

// Validate checks a command's shape; whether it may apply depends on the
// state and is decided by Apply.
func (c *Command) Validate() error {
	if err := ValidName(c.Node); err != nil {
		return err
	}
	if c.BootID == "" || len(c.BootID) > maxBootIDLen {
		return invalid("boot ID must be 1 to %d bytes", maxBootIDLen)
	}
	set := 0
	for _, p := range []bool{c.Init != nil, c.Register != nil, c.Network != nil, c.Spec != nil, c.Delete != nil, c.Reserve != nil,
		c.Claim != nil, c.Release != nil, c.Adopt != nil, c.Forget != nil} {
		if p {
			set++
		}
	}
	if set != 1 {
		return invalid("command %q must carry exactly one operation, has %d", c.Op, set)
	}
	switch c.Op {
	case OpInit:
		if c.Init == nil {
			break
		}
		if c.Init.ClusterID == "" || len(c.Init.ClusterID) > maxBootIDLen {
			return invalid("cluster ID must be 1 to %d bytes", maxBootIDLen)
		}
		return c.Init.Register.validate()
	case OpRegister:
		if c.Register == nil {
			break
		}
		return c.Register.validate()
	case OpEnsureNetwork:
		if c.Network == nil {
			break
		}
		return c.Network.validate()
	case OpSetSpec:
		if c.Spec == nil {
			break
		}
		if err := ValidSubnet(c.Spec.Subnet); err != nil {
			return err
		}
		return c.Spec.Spec.validate(c.Spec.Subnet)
	case OpDeleteNetwork:
		if c.Delete == nil {
			break
		}
		return ValidSubnet(c.Delete.Subnet)
	case OpReserve:
		if c.Reserve == nil {
			break
		}
		if err := ValidSubnet(c.Reserve.Subnet); err != nil {
			return err
		}
		if !c.Reserve.Subnet.Contains(c.Reserve.Addr) {
			return invalid("address %s is not inside %s", c.Reserve.Addr, c.Reserve.Subnet)
		}
		return nil
	case OpClaim:
		if c.Claim == nil {
			break
		}
		return c.Claim.validate()
	case OpRelease:
		if c.Release == nil {
			break
		}
		return validBlocks(c.Release.Subnet, c.Release.Blocks)
	case OpAdopt:
		if c.Adopt == nil {
			break
		}
		return validBlocks(c.Adopt.Subnet, c.Adopt.Blocks)
	case OpForget:
		if c.Forget == nil {
			break
		}
		return ValidName(c.Forget.Name)
	default:
		return invalid("unknown command %q", c.Op)
	}
	return invalid("command %q without its operation", c.Op)
}

func (r *Register) validate() error {
	if r.ID.IsZero() {
		return invalid("registration without identity")
	}
	if !r.Addr.IsValid() || r.Addr.IsUnspecified() || r.Addr.Zone() != "" {
		return invalid("registration with bad address %s", r.Addr)
	}
	if r.Generation == 0 || r.Generation > 1<<62 {
		return invalid("registration generation out of range")
	}
	if r.Protocol < 0 || r.Protocol > 1<<20 {
		return invalid("registration protocol out of range")
	}
	return nil
}

func (e *EnsureNetwork) validate() error {
	if err := ValidSubnet(e.Subnet); err != nil {
		return err
	}
	if e.BlockBits != 0 {
		if err := validBlockBits(e.Subnet, e.BlockBits); err != nil {
			return err
		}
	}
	if e.Gateway.IsValid() && !e.Subnet.Contains(e.Gateway) {
		return invalid("gateway %s is not inside %s", e.Gateway, e.Subnet)
	}
	return nil
}

func (c *Claim) validate() error {
	if err := ValidSubnet(c.Subnet); err != nil {
		return err
	}
	if c.Within.IsValid() && (c.Within.Masked() != c.Within || c.Within.Bits() < c.Subnet.Bits() || !c.Subnet.Contains(c.Within.Addr())) {
		return invalid("range %s is not inside %s", c.Within, c.Subnet)
	}
	if c.Containing.IsValid() && !c.Subnet.Contains(c.Containing) {
		return invalid("address %s is not inside %s", c.Containing, c.Subnet)
	}
	return nil
}

func validBlocks(subnet netip.Prefix, blocks []netip.Prefix) error {
	if err := ValidSubnet(subnet); err != nil {
		return err
	}
	if len(blocks) == 0 || len(blocks) > maxListLen {
		return invalid("1 to %d blocks expected", maxListLen)
	}
	for _, b := range blocks {
		if err := validBlock(subnet, b); err != nil {
			return err
		}
	}
	return nil
}

func (s *Spec) validate(subnet netip.Prefix) error {
	if err := ValidNetworkName(s.Name); err != nil {
		return err
	}
	if s.IPRange.IsValid() && (s.IPRange.Masked() != s.IPRange || s.IPRange.Bits() < subnet.Bits() || !subnet.Contains(s.IPRange.Addr())) {
		return invalid("range %s not inside %s", s.IPRange, subnet)
	}
	if len(s.Options)+len(s.IPAMOptions)+len(s.Labels) > maxSpecItems {
		return invalid("more than %d options", maxSpecItems)
	}
	for _, m := range []map[string]string{s.Options, s.IPAMOptions, s.Labels} {
		for k, v := range m {
			if k == "" || len(k) > maxTextLen || len(v) > maxTextLen {
				return invalid("option %.32q too long or empty", k)
			}
		}
	}
	return nil
}

// ValidNetworkName accepts Docker's network names.
func ValidNetworkName(s string) error {
	if s == "" || len(s) > maxTextLen {
		return invalid("network name must be 1 to %d bytes", maxTextLen)
	}
	for i, r := range s {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || i > 0 && (r == '_' || r == '.' || r == '-')
		if !ok {
			return invalid("network name %q has a character Docker does not allow", s)
		}
	}
	return nil
}

// ValidName checks a node name: printable, no spaces, at most 64 bytes
// (it travels in every node's gossip metadata, which memberlist caps).
func ValidName(s string) error {
	if s == "" || len(s) > maxNameLen {
		return invalid("node name must be 1 to %d bytes", maxNameLen)
	}
	for _, r := range s {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) {
			return invalid("node name %q has a space or non-printable character", s)
		}
	}
	return nil
}

// ValidSubnet reports whether p can identify a wgmesh network.
func ValidSubnet(p netip.Prefix) error {
	if !p.IsValid() {
		return invalid("bad subnet")
	}
	if p.Masked() != p {
		return invalid("subnet %s has host bits set (did you mean %s?)", p, p.Masked())
	}
	if p.Addr().Zone() != "" || !p.Addr().Is4() {
		return invalid("subnet %s is not IPv4", p)
	}
	if p.Bits() > 30 {
		return invalid("subnet %s is too small for a network", p)
	}
	return nil
}

func validBlock(subnet, b netip.Prefix) error {
	if !b.IsValid() || b.Masked() != b || b.Addr().Zone() != "" {
		return invalid("bad block %s", b)
	}
	if b.Bits() < subnet.Bits() || !subnet.Contains(b.Addr()) {
		return invalid("block %s is not inside %s", b, subnet)
	}
	return nil
}

// maxBlocksBits bounds how finely a subnet is split: 2^16 blocks.
const maxBlocksBits = 16

func validBlockBits(subnet netip.Prefix, bits int) error {
	if bits < subnet.Bits() || bits > subnet.Addr().BitLen() {
		return invalid("block size /%d does not fit subnet %s", bits, subnet)
	}
	if bits-subnet.Bits() > maxBlocksBits {
		return invalid("block size /%d splits %s into more than %d blocks", bits, subnet, 1<<maxBlocksBits)
	}
	return nil
}

// DefaultBlockBits is the block size for a subnet: /24 blocks for big
// subnets (256 addresses per host), 16 blocks for small ones, never
// smaller than /28.
func DefaultBlockBits(subnet netip.Prefix) int {
	return min(max(24, subnet.Bits()+4), 28)
}

// Code classifies a refused command, so that callers can tell the user
// what to do.
type Code string

const (
	CodeOK              Code = ""
	CodeInvalid         Code = "invalid"
	CodeBadSignature    Code = "bad-signature"
	CodeNotRegistered   Code = "not-registered"
	CodeNameTaken       Code = "name-taken"
	CodeIdentityInUse   Code = "identity-in-use"
	CodeRolledBack      Code = "rolled-back"
	CodeForgotten       Code = "forgotten"
	CodeStale           Code = "stale"
	CodeNoNetwork       Code = "no-network"
	CodeNetworkConflict Code = "network-conflict"
	CodeNoFreeBlock     Code = "no-free-block"
	CodeBlockTaken      Code = "block-taken"
	CodeNotInitialised  Code = "not-initialised"
	// Codes of protocol 2 (see Protocol). wgmesh before it shows them
	// as the message they come with.
	CodeNotEndorsed Code = "not-endorsed"
	CodeAlive       Code = "alive"
	CodeInUse       Code = "in-use"
	CodeLimit       Code = "limit"
	CodeOutdated    Code = "outdated"
)

// Result is a command's outcome.
type Result struct {
	Code    Code         `json:"code,omitempty"`
	Message string       `json:"message,omitempty"`
	Block   netip.Prefix `json:"block,omitzero"`
	Network *Network     `json:"network,omitempty"`
}

// Err returns the refusal as an error, or nil.
func (r Result) Err() error {
	if r.Code == CodeOK {
		return nil
	}
	return &Error{Code: r.Code, Message: r.Message}
}

func refuse(code Code, format string, args ...any) Result {
	return Result{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Error is a refused command.
type Error struct {
	Code    Code
	Message string
}

func (e *Error) Error() string { return e.Message }

// Is makes errors.Is(err, &Error{Code: c}) match any refusal with code c.
func (e *Error) Is(target error) bool {
	var t *Error
	return errors.As(target, &t) && t.Message == "" && t.Code == e.Code
}

// Sentinels for errors.Is.
var (
	ErrInvalid         = &Error{Code: CodeInvalid}
	ErrNameTaken       = &Error{Code: CodeNameTaken}
	ErrIdentityInUse   = &Error{Code: CodeIdentityInUse}
	ErrRolledBack      = &Error{Code: CodeRolledBack}
	ErrForgotten       = &Error{Code: CodeForgotten}
	ErrNotRegistered   = &Error{Code: CodeNotRegistered}
	ErrBadSignature    = &Error{Code: CodeBadSignature}
	ErrStale           = &Error{Code: CodeStale}
	ErrNoNetwork       = &Error{Code: CodeNoNetwork}
	ErrNetworkConflict = &Error{Code: CodeNetworkConflict}
	ErrNoFreeBlock     = &Error{Code: CodeNoFreeBlock}
	ErrBlockTaken      = &Error{Code: CodeBlockTaken}
	ErrNotInitialised  = &Error{Code: CodeNotInitialised}
	ErrNotEndorsed     = &Error{Code: CodeNotEndorsed}
	ErrAlive           = &Error{Code: CodeAlive}
	ErrInUse           = &Error{Code: CodeInUse}
	ErrLimit           = &Error{Code: CodeLimit}
	ErrOutdated        = &Error{Code: CodeOutdated}
)

func invalid(format string, args ...any) error {
	return &Error{Code: CodeInvalid, Message: fmt.Sprintf(format, args...)}
}
