package catalog

import (
	"hash/fnv"
	"net/netip"
	"slices"
)

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
