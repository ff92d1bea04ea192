package catalog

import (
	"net/netip"
	"unicode"
)

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
