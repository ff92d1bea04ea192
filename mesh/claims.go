package mesh

// Block claims: how a node comes to own part of a network's subnet without
// ever sharing it, even across a network partition.
//
// A claim lives in the claimant's own entry and moves like this:
//
//	             ClaimBlock
//	  (none) ─────────────────▶ Claims{block, attempt}
//	                              │              │
//	      a majority of known     │              │ a committed overlapping
//	      nodes promised it       │              │ block, a competing claim
//	                              ▼              │ that ranks first, or timeout
//	                           Blocks            ▼
//	                              │            (none)
//	              ReleaseBlock    ▼
//	                            (none)
//
// Every node (the claimant too) votes by promising. It promises a block to
// at most one pending claim at a time, never for a block that some node
// owns, and keeps a promise until it sees that claim withdrawn or
// committed. Two claims for overlapping blocks therefore cannot both
// gather a majority of the same membership. Competing claims rank by
// (attempt, node): the lower-ranked claimant withdraws and tries another
// block, so votes are never stuck between two live claims.
//
// Promises are not replicated. A voter writes them to its state file
// before telling anyone, and sends each one straight to its claimant,
// again every few seconds while the claim is pending; the claimant counts
// the votes it has received. Gossiping them instead would put every
// voter's promises in its entry and resend whole entries to every node for
// each vote: with many nodes claiming at once that grows as the square of
// the cluster. A voter that lost its state file no longer knows what it
// promised, so when it finds out (the cluster knows a newer version of
// it) it abstains until any claim it may have voted for is settled.
//
// During a partition only a side holding a majority of the known nodes can
// claim; every side keeps allocating addresses from blocks it already owns.

import (
	"cmp"
	"errors"
	"fmt"
	"hash/fnv"
	"math/big"
	"net/netip"
	"slices"
)

// pendingClaim is a claim together with its claimant.
type pendingClaim struct {
	Node string
	Claim
}

// ranksBefore reports whether claim a wins over claim b.
func ranksBefore(a, b pendingClaim) bool {
	return cmp.Or(cmp.Compare(a.Attempt, b.Attempt), cmp.Compare(a.Node, b.Node)) < 0
}

func (v *View) pendingClaims(subnet netip.Prefix) []pendingClaim {
	var out []pendingClaim
	for _, e := range v.Networks[subnet] {
		for _, c := range e.Claims {
			out = append(out, pendingClaim{e.Node, c})
		}
	}
	slices.SortFunc(out, func(a, b pendingClaim) int {
		if ranksBefore(a, b) {
			return -1
		}
		if ranksBefore(b, a) {
			return 1
		}
		return comparePrefix(a.Block, b.Block)
	})
	return out
}

// committedOverlap returns a node other than except that owns a block
// overlapping b.
func (v *View) committedOverlap(subnet, b netip.Prefix, except string) (string, bool) {
	for _, e := range v.Networks[subnet] {
		if e.Node == except {
			continue
		}
		for _, owned := range e.Blocks {
			if owned.Overlaps(b) {
				return e.Node, true
			}
		}
	}
	return "", false
}

// desiredPromises computes the promises this node should hold in subnet,
// given those it holds. It is level-triggered: the result depends only on
// the view and held. A node that abstains (grant false) keeps its promises
// but makes no new ones.
func desiredPromises(v *View, subnet netip.Prefix, held []Promise, grant bool) []Promise {
	pending := v.pendingClaims(subnet)
	isPending := make(map[pendingClaim]bool, len(pending))
	for _, c := range pending {
		isPending[c] = true
	}

	var out []Promise
	for _, p := range held {
		if isPending[pendingClaim{p.To, Claim{p.Block, p.Attempt}}] {
			out = append(out, p)
		}
	}
	if !grant {
		return out
	}
	for _, c := range pending {
		p := Promise{Block: c.Block, To: c.Node, Attempt: c.Attempt}
		if slices.Contains(out, p) {
			continue
		}
		if slices.ContainsFunc(out, func(q Promise) bool { return q.Block.Overlaps(c.Block) }) {
			continue
		}
		if _, owned := v.committedOverlap(subnet, c.Block, ""); owned {
			continue
		}
		out = append(out, p)
	}
	slices.SortFunc(out, comparePromise)
	return out
}

// Outcome is where a pending claim stands.
type Outcome int

const (
	Pending Outcome = iota
	Committed
	Lost
)

// claimOutcome decides a claim of this node, given who voted for it.
// Only votes of known members count. rival names the node that made it
// lose.
func claimOutcome(v *View, subnet netip.Prefix, c Claim, voters map[string]bool) (o Outcome, rival string, votes int) {
	if node, ok := v.committedOverlap(subnet, c.Block, v.Self); ok {
		return Lost, node, 0
	}
	for name := range voters {
		if _, ok := v.Members[name]; ok {
			votes++
		}
	}
	if votes >= v.Quorum() {
		return Committed, "", votes
	}
	me := pendingClaim{v.Self, c}
	for _, other := range v.pendingClaims(subnet) {
		if other.Node != v.Self && other.Block.Overlaps(c.Block) && ranksBefore(other, me) {
			return Lost, other.Node, votes
		}
	}
	return Pending, "", votes
}

// BlockRequest says which block a node wants.
type BlockRequest struct {
	Subnet netip.Prefix
	// Bits is the prefix length of the block.
	Bits int
	// Within restricts the block to a range (Docker's --ip-range). Zero
	// means the whole subnet.
	Within netip.Prefix
	// Containing asks for the block that holds this address (a static
	// --ip, or a --gateway). Zero means any free block.
	Containing netip.Addr
}

// Errors of block selection.
var (
	ErrNoFreeBlock = errors.New("no free address block")
	ErrBlockTaken  = errors.New("address block is taken")
)

// maxBlocksPerSubnet bounds the search for a free block.
const maxBlocksPerSubnet = 1 << 16

// Validate checks a request against its subnet.
func (r *BlockRequest) Validate() error {
	if err := ValidSubnet(r.Subnet); err != nil {
		return err
	}
	maxBits := r.Subnet.Addr().BitLen()
	if r.Bits < r.Subnet.Bits() || r.Bits > maxBits {
		return fmt.Errorf("block size /%d does not fit subnet %s", r.Bits, r.Subnet)
	}
	if r.Bits-r.Subnet.Bits() > 16 {
		return fmt.Errorf("block size /%d splits %s into more than %d blocks", r.Bits, r.Subnet, maxBlocksPerSubnet)
	}
	if r.Within.IsValid() && (r.Within.Bits() < r.Subnet.Bits() || !r.Subnet.Contains(r.Within.Addr())) {
		return fmt.Errorf("range %s is not inside subnet %s", r.Within, r.Subnet)
	}
	if r.Containing.IsValid() && !r.Subnet.Contains(r.Containing) {
		return fmt.Errorf("address %s is not inside subnet %s", r.Containing, r.Subnet)
	}
	return nil
}

// busyBlocks is everything in subnet that a new claim must not overlap:
// blocks owned or claimed by anyone, this node included, and blocks this
// node promised.
func (v *View) busyBlocks(subnet netip.Prefix, promised []Promise) []netip.Prefix {
	var out []netip.Prefix
	for _, e := range v.Networks[subnet] {
		out = append(out, e.Blocks...)
		for _, c := range e.Claims {
			out = append(out, c.Block)
		}
	}
	for _, p := range promised {
		out = append(out, p.Block)
	}
	return out
}

// pickBlock chooses a block to claim, avoiding the ones this node promised
// to others.
func pickBlock(v *View, req BlockRequest, promised []Promise) (netip.Prefix, error) {
	if err := req.Validate(); err != nil {
		return netip.Prefix{}, err
	}
	within := req.Subnet
	if req.Within.IsValid() {
		within = req.Within.Masked()
	}
	bits := max(req.Bits, within.Bits())
	busy := v.busyBlocks(req.Subnet, promised)
	overlapsBusy := func(b netip.Prefix) bool {
		return slices.ContainsFunc(busy, b.Overlaps)
	}

	if req.Containing.IsValid() {
		if !within.Contains(req.Containing) {
			return netip.Prefix{}, fmt.Errorf("address %s is outside range %s", req.Containing, within)
		}
		// The biggest free block up to the requested size: a smaller
		// one fits between blocks already taken, this node's included.
		for b := bits; b <= req.Subnet.Addr().BitLen(); b++ {
			if p := netip.PrefixFrom(req.Containing, b).Masked(); !overlapsBusy(p) {
				return p, nil
			}
		}
		holder := "another node"
		if node, _, ok := v.Owner(req.Subnet, req.Containing); ok {
			holder = "node " + node
		}
		return netip.Prefix{}, fmt.Errorf("address %s belongs to or is being claimed by %s: %w", req.Containing, holder, ErrBlockTaken)
	}

	n := 1 << (bits - within.Bits())
	// Start each node at a different block so that nodes creating a
	// network together rarely compete for the same one.
	h := fnv.New32a()
	h.Write([]byte(v.Self))
	start := int(h.Sum32() % uint32(n))
	for i := range n {
		b, ok := nthBlock(within, bits, (start+i)%n)
		if ok && !overlapsBusy(b) {
			return b, nil
		}
	}
	return netip.Prefix{}, fmt.Errorf("all %d blocks of /%d in %s are taken: %w", n, bits, within, ErrNoFreeBlock)
}

// nthBlock returns the i-th block of the given size inside p.
func nthBlock(p netip.Prefix, bits, i int) (netip.Prefix, bool) {
	base := new(big.Int).SetBytes(p.Addr().AsSlice())
	off := new(big.Int).Lsh(big.NewInt(int64(i)), uint(p.Addr().BitLen()-bits))
	sum := base.Add(base, off).Bytes()
	buf := make([]byte, p.Addr().BitLen()/8)
	if len(sum) > len(buf) {
		return netip.Prefix{}, false
	}
	copy(buf[len(buf)-len(sum):], sum)
	addr, _ := netip.AddrFromSlice(buf)
	if !p.Contains(addr) {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(addr, bits), true
}
