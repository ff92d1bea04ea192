// Package mesh is everything cluster-wide: membership through memberlist
// gossip, and the state every node replicates — each node's WireGuard key
// and address, and per network the WireGuard port it listens on and the
// address blocks it owns.
//
// The replicated state is a set of entries. Every entry has exactly one
// writer, the node it describes, and a version taken from that node's
// Lamport clock; merging keeps the higher version, so any two nodes that
// have seen the same entries agree, whatever order they saw them in. The
// one exception is Forget, a grow-only record any node may write.
//
// Address blocks are the only thing that must never be held twice, so
// they are claimed with a quorum protocol on top of these entries (see
// claims.go). mesh has no OS imports: no netlink, no WireGuard, no Docker.
package mesh

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"unicode"

	"github.com/wgmesh/wgmesh/crypto"
)

// Limits on decoded entries: peers are trusted members, but a bug on one of
// them must not make the others allocate without bound.
const (
	maxNameLen  = 128
	maxListLen  = 4096
	maxModeLen  = 16
	protocolV1  = 1
	maxAttempts = 1 << 62
)

// NodeInfo is what a node publishes about itself. It travels in memberlist
// node metadata, so a node's key arrives together with its membership.
type NodeInfo struct {
	Name      string           `json:"n"`
	Version   uint64           `json:"v"`
	PublicKey crypto.PublicKey `json:"k"`
	Addr      netip.Addr       `json:"a"` // WireGuard endpoint address
	// GossipPort lets peers reach a node they believe failed.
	GossipPort uint16 `json:"g,omitempty"`
	WGMode     string `json:"m,omitempty"`
	// Leaving is set just before a node leaves the cluster on purpose,
	// so that peers tell "left" from "failed".
	Leaving bool `json:"l,omitempty"`
}

// Claim is a pending request by its entry's node for a block. Attempt is
// the claimant's clock when it asked; it names the attempt so that
// promises made to an abandoned attempt are never counted for a new one,
// and orders competing claims.
type Claim struct {
	Block   netip.Prefix `json:"b"`
	Attempt uint64       `json:"a"`
}

// Promise is this node's vote for someone's claim. Promises are not
// replicated: a voter keeps its own in its state file and tells only the
// claimant (see claims.go).
type Promise struct {
	Block   netip.Prefix `json:"b"`
	To      string       `json:"t"`
	Attempt uint64       `json:"a"`
}

// NetworkEntry is one node's state in one network, keyed by the network's
// subnet: Docker gives the same network a different ID on every host, so
// the subnet is its identity across the mesh.
//
// A node with Port 0 does not have the network attached; its entry may
// still hold blocks, reserved addresses and a spec. Voting needs no entry:
// every member votes on every claim.
type NetworkEntry struct {
	Node    string         `json:"n"`
	Subnet  netip.Prefix   `json:"s"`
	Version uint64         `json:"v"`
	Port    uint16         `json:"p,omitempty"`
	Blocks  []netip.Prefix `json:"b,omitempty"`
	Claims  []Claim        `json:"c,omitempty"`
	// Reserved are addresses no node may give to a container: the
	// network's aux addresses and a gateway given with --gateway.
	Reserved []netip.Addr `json:"r,omitempty"`
	// Endpoints is how many containers the node has on the network.
	Endpoints int `json:"e,omitempty"`
	// Spec is how the node says the network is defined, when it created
	// (or removed) the network; see View.Spec.
	Spec *NetworkSpec `json:"spec,omitempty"`
}

// NetworkSpec defines a network so that every host can create the same
// Docker network: what `docker network create` was given. Specs of one
// subnet from different nodes are ordered by Version, a Lamport stamp, and
// the newest wins; a removal is a newer spec with Deleted set.
type NetworkSpec struct {
	Version     uint64                `json:"v"`
	Deleted     bool                  `json:"d,omitempty"`
	Name        string                `json:"n"`
	IPRange     netip.Prefix          `json:"r,omitzero"`
	Gateway     netip.Addr            `json:"g,omitzero"` // only one given with --gateway
	Aux         map[string]netip.Addr `json:"a,omitempty"`
	Options     map[string]string     `json:"o,omitempty"`
	IPAMOptions map[string]string     `json:"io,omitempty"`
	Labels      map[string]string     `json:"l,omitempty"`
	Internal    bool                  `json:"i,omitempty"`
}

// Clone returns a deep copy.
func (s *NetworkSpec) Clone() *NetworkSpec {
	if s == nil {
		return nil
	}
	c := *s
	c.Aux = maps.Clone(s.Aux)
	c.Options = maps.Clone(s.Options)
	c.IPAMOptions = maps.Clone(s.IPAMOptions)
	c.Labels = maps.Clone(s.Labels)
	return &c
}

// Limits of a spec: Docker's own limits are higher, but a spec travels in
// every gossip message about its network.
const (
	maxSpecItems   = 64
	maxSpecTextLen = 256
)

func (s *NetworkSpec) validate(subnet netip.Prefix) error {
	if s.Version == 0 || s.Version > maxAttempts {
		return invalid("network spec: version out of range")
	}
	if err := validNetworkName(s.Name); err != nil {
		return err
	}
	if s.IPRange.IsValid() && (s.IPRange.Masked() != s.IPRange || s.IPRange.Bits() < subnet.Bits() || !subnet.Contains(s.IPRange.Addr())) {
		return invalid("network spec: range %s not inside %s", s.IPRange, subnet)
	}
	if s.Gateway.IsValid() && !subnet.Contains(s.Gateway) {
		return invalid("network spec: gateway %s not inside %s", s.Gateway, subnet)
	}
	if len(s.Aux)+len(s.Options)+len(s.IPAMOptions)+len(s.Labels) > maxSpecItems {
		return invalid("network spec: more than %d options", maxSpecItems)
	}
	for k, a := range s.Aux {
		if len(k) == 0 || len(k) > maxSpecTextLen || !subnet.Contains(a) {
			return invalid("network spec: bad aux address %q=%s", k, a)
		}
	}
	for _, m := range []map[string]string{s.Options, s.IPAMOptions, s.Labels} {
		for k, v := range m {
			if len(k) == 0 || len(k) > maxSpecTextLen || len(v) > maxSpecTextLen {
				return invalid("network spec: option %.32q too long or empty", k)
			}
		}
	}
	return nil
}

// validNetworkName accepts Docker's network names.
func validNetworkName(s string) error {
	if s == "" || len(s) > maxSpecTextLen {
		return invalid("network name must be 1 to %d bytes", maxSpecTextLen)
	}
	for i, r := range s {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || i > 0 && (r == '_' || r == '.' || r == '-')
		if !ok {
			return invalid("network name %q has a character Docker does not allow", s)
		}
	}
	return nil
}

// Forget removes a node that is gone for good: every entry of Node with a
// version up to Version is void, and its blocks are free again.
type Forget struct {
	Node    string `json:"n"`
	Version uint64 `json:"v"`
}

type entryKey struct {
	node   string
	subnet netip.Prefix
}

func (e *NetworkEntry) key() entryKey { return entryKey{e.Node, e.Subnet} }

// Clone returns a deep copy.
func (e NetworkEntry) Clone() NetworkEntry {
	e.Blocks = slices.Clone(e.Blocks)
	e.Claims = slices.Clone(e.Claims)
	e.Reserved = slices.Clone(e.Reserved)
	e.Spec = e.Spec.Clone()
	return e
}

// normalize sorts the lists so that equal entries encode equally.
func (e *NetworkEntry) normalize() {
	slices.SortFunc(e.Blocks, comparePrefix)
	e.Blocks = slices.Compact(e.Blocks)
	slices.SortFunc(e.Claims, func(a, b Claim) int {
		return cmp.Or(comparePrefix(a.Block, b.Block), cmp.Compare(a.Attempt, b.Attempt))
	})
	e.Claims = slices.Compact(e.Claims)
	slices.SortFunc(e.Reserved, netip.Addr.Compare)
	e.Reserved = slices.Compact(e.Reserved)
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

// ErrInvalid is wrapped by every validation error of decoded state.
var ErrInvalid = errors.New("invalid mesh state")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

func validName(s string) error {
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

// Validate checks a NodeInfo received from a peer.
func (n *NodeInfo) Validate() error {
	if err := validName(n.Name); err != nil {
		return err
	}
	if n.Version == 0 || n.Version > maxAttempts {
		return invalid("node %s: version %d out of range", n.Name, n.Version)
	}
	if n.PublicKey.IsZero() {
		return invalid("node %s: no public key", n.Name)
	}
	if !n.Addr.IsValid() || n.Addr.IsUnspecified() || n.Addr.Zone() != "" {
		return invalid("node %s: bad address %s", n.Name, n.Addr)
	}
	if len(n.WGMode) > maxModeLen {
		return invalid("node %s: mode too long", n.Name)
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
	if p.Addr().Zone() != "" {
		return invalid("subnet %s has a zone", p)
	}
	return nil
}

func (e *NetworkEntry) validBlock(b netip.Prefix) error { return validBlock(e.Subnet, b) }

func validBlock(subnet, b netip.Prefix) error {
	if !b.IsValid() || b.Masked() != b || b.Addr().Zone() != "" {
		return invalid("bad block %s", b)
	}
	if b.Bits() < subnet.Bits() || !subnet.Contains(b.Addr()) {
		return invalid("block %s is not inside %s", b, subnet)
	}
	return nil
}

// validate checks a promise of subnet, read from a peer or from disk.
func (p *Promise) validate(subnet netip.Prefix) error {
	if err := validBlock(subnet, p.Block); err != nil {
		return err
	}
	if err := validName(p.To); err != nil {
		return err
	}
	if p.Attempt == 0 || p.Attempt > maxAttempts {
		return invalid("promise attempt out of range")
	}
	return nil
}

func comparePromise(a, b Promise) int {
	return cmp.Or(comparePrefix(a.Block, b.Block), cmp.Compare(a.To, b.To), cmp.Compare(a.Attempt, b.Attempt))
}

// Validate checks a NetworkEntry received from a peer.
func (e *NetworkEntry) Validate() error {
	if err := validName(e.Node); err != nil {
		return err
	}
	if err := ValidSubnet(e.Subnet); err != nil {
		return err
	}
	if e.Version == 0 || e.Version > maxAttempts {
		return invalid("entry %s/%s: version %d out of range", e.Node, e.Subnet, e.Version)
	}
	if len(e.Blocks)+len(e.Claims)+len(e.Reserved) > maxListLen {
		return invalid("entry %s/%s: more than %d items", e.Node, e.Subnet, maxListLen)
	}
	for _, b := range e.Blocks {
		if err := e.validBlock(b); err != nil {
			return err
		}
	}
	for _, c := range e.Claims {
		if err := e.validBlock(c.Block); err != nil {
			return err
		}
		if c.Attempt == 0 || c.Attempt > maxAttempts {
			return invalid("claim attempt out of range")
		}
	}
	for _, a := range e.Reserved {
		if !e.Subnet.Contains(a) {
			return invalid("reserved address %s is not inside %s", a, e.Subnet)
		}
	}
	if e.Endpoints < 0 || e.Endpoints > 1<<20 {
		return invalid("entry %s/%s: endpoint count out of range", e.Node, e.Subnet)
	}
	if e.Spec != nil {
		if err := e.Spec.validate(e.Subnet); err != nil {
			return err
		}
	}
	return nil
}

// Validate checks a Forget received from a peer.
func (f *Forget) Validate() error {
	if err := validName(f.Node); err != nil {
		return err
	}
	if f.Version > maxAttempts {
		return invalid("forget %s: version out of range", f.Node)
	}
	return nil
}
