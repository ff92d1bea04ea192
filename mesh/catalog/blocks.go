package catalog

import (
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
)

// overlapping finds the lowest owned block of n overlapping p.
func (n *Network) overlapping(p netip.Prefix) (netip.Prefix, string, bool) {
	var found netip.Prefix
	for b := range n.Blocks {
		if b.Overlaps(p) && (!found.IsValid() || ComparePrefix(b, found) < 0) {
			found = b
		}
	}
	return found, n.Blocks[found], found.IsValid()
}

func (s *State) claim(e applying, node string, c *Claim) Result {
	n, ok := s.Live(c.Subnet)
	if !ok {
		return refuse(CodeNoNetwork, "no network %s in the cluster", c.Subnet)
	}
	full := e.rules2() && n.countBlocksOf(node) >= MaxBlocksPerNode
	if c.Containing.IsValid() {
		if owner, b, ok := n.Owner(c.Containing); ok {
			if owner == node {
				return Result{Block: b}
			}
			return refuse(CodeBlockTaken, "address %s is in block %s of node %s", c.Containing, b, owner)
		}
		if full {
			return blocksLimit(node, c.Subnet)
		}
		// The biggest free block up to the network's size: a smaller one
		// fits between blocks already taken.
		for bits := n.BlockBits; bits <= c.Subnet.Addr().BitLen(); bits++ {
			p := netip.PrefixFrom(c.Containing, bits).Masked()
			if _, _, taken := n.overlapping(p); !taken {
				n.Blocks[p] = node
				return Result{Block: p}
			}
		}
		return refuse(CodeBlockTaken, "address %s is taken", c.Containing)
	}
	if full {
		return blocksLimit(node, c.Subnet)
	}
	b, ok := pickBlock(n, node, c.Within)
	if !ok {
		within := c.Subnet
		if c.Within.IsValid() {
			within = c.Within
		}
		return refuse(CodeNoFreeBlock, "all blocks of /%d in %s are taken", max(n.BlockBits, within.Bits()), within)
	}
	n.Blocks[b] = node
	return Result{Block: b}
}

func (s *State) adopt(e applying, node string, a *Adopt) Result {
	n, ok := s.Live(a.Subnet)
	if !ok {
		return refuse(CodeNoNetwork, "no network %s in the cluster", a.Subnet)
	}
	var taken []string
	for _, b := range a.Blocks {
		if have, owner, ok := n.overlapping(b); ok && (owner != node || have != b) {
			taken = append(taken, fmt.Sprintf("%s (overlaps %s of %s)", b, have, owner))
		}
	}
	if len(taken) > 0 {
		slices.Sort(taken)
		return refuse(CodeBlockTaken, "blocks held by %s before the upgrade are taken: %v", node, taken)
	}
	if e.rules2() {
		have := n.countBlocksOf(node)
		for _, b := range a.Blocks {
			if n.Blocks[b] != node {
				have++
			}
		}
		if have > MaxBlocksPerNode {
			return blocksLimit(node, a.Subnet)
		}
	}
	for _, b := range a.Blocks {
		n.Blocks[b] = node
	}
	return Result{}
}

// pickBlock chooses a free block of n for node inside within (the whole
// subnet if zero). Each node starts its search at a block of its own
// (from a hash of its name), so a network's blocks spread over the
// subnet the same way whichever order hosts join in.
func pickBlock(n *Network, node string, within netip.Prefix) (netip.Prefix, bool) {
	if !within.IsValid() {
		within = n.Subnet
	}
	bits := max(n.BlockBits, within.Bits())
	owned := make([]netip.Prefix, 0, len(n.Blocks))
	for b := range n.Blocks {
		owned = append(owned, b)
	}
	slices.SortFunc(owned, ComparePrefix)
	count := 1 << (bits - within.Bits())
	h := fnv.New32a()
	h.Write([]byte(node))
	start := int(h.Sum32() % uint32(count))
	for i := range count {
		b, ok := nthBlock(within, bits, (start+i)%count)
		if ok && !overlapsSorted(owned, b) {
			return b, true
		}
	}
	return netip.Prefix{}, false
}

// overlapsSorted reports whether p overlaps one of blocks, which are
// sorted and do not overlap each other.
func overlapsSorted(blocks []netip.Prefix, p netip.Prefix) bool {
	// The first block that starts after p's first address, and the one
	// before it, are the only candidates: blocks never overlap, so one
	// that starts earlier and reaches into p is the one just before.
	i, _ := slices.BinarySearchFunc(blocks, p.Addr(), func(b netip.Prefix, a netip.Addr) int { return b.Addr().Compare(a) })
	for _, j := range []int{i - 1, i, i + 1} {
		if j >= 0 && j < len(blocks) && blocks[j].Overlaps(p) {
			return true
		}
	}
	// A big p may cover blocks further on.
	return i < len(blocks) && p.Contains(blocks[i].Addr())
}

// nthBlock returns the i-th block of the given size inside p (IPv4).
func nthBlock(p netip.Prefix, bits, i int) (netip.Prefix, bool) {
	if bits > 32 || bits < p.Bits() {
		return netip.Prefix{}, false
	}
	b := p.Masked().Addr().As4()
	base := uint64(b[0])<<24 | uint64(b[1])<<16 | uint64(b[2])<<8 | uint64(b[3])
	v := base + uint64(i)<<(32-bits)
	if v > 0xffffffff {
		return netip.Prefix{}, false
	}
	addr := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	if !p.Contains(addr) {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(addr, bits), true
}
