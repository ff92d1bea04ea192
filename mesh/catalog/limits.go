package catalog

import (
	"cmp"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/wgmesh/wgmesh/crypto"
)

// Bounds on what members can make the catalog hold. Every replica keeps
// the whole catalog in memory, writes it to disk, and sends it to every
// joining host as a snapshot (at most maxSnapshotBytes): a table any
// member can grow without bound would, past that size, keep every new
// host out. Commands that would exceed a bound are refused with
// CodeLimit (entries of protocol 2 and later; see Protocol).
const (
	// MaxNodes bounds node records. Registering needs only an identity
	// the registering host makes itself, so one member holding the
	// cluster key could register identities without end: the bound is
	// on the whole table. A record goes away with `wgmesh forget`.
	MaxNodes = 2048
	// MaxNetworksPerNode bounds the live networks one member created.
	MaxNetworksPerNode = 64
	// MaxNetworks bounds network records, live and deleted. A deleted
	// network's record (its tombstone) only tells hosts to remove their
	// copies; when the table is full, creating a network drops the
	// oldest tombstone, and only live networks can fill it.
	MaxNetworks = 1024
	// MaxBlocksPerNode bounds the blocks one member owns in one
	// network: at the smallest default block size (/28) that is 16384
	// addresses, far more than one host runs containers.
	MaxBlocksPerNode = 1024
	// MaxAux bounds a network's --aux-address reservations.
	MaxAux = 256
	// MaxForgotten bounds the tombstones of forgotten identities. When
	// it is reached, a forget drops the oldest tombstone (by the log
	// index of the forget): that identity could then register again,
	// which matters only for a host forgotten long ago that comes back
	// with its old state directory.
	MaxForgotten = 1024
)

func (n *Network) countBlocksOf(node string) int {
	count := 0
	for _, owner := range n.Blocks {
		if owner == node {
			count++
		}
	}
	return count
}

func blocksLimit(node string, subnet netip.Prefix) Result {
	return refuse(CodeLimit, "node %s holds %d blocks of network %s, the most one node can: give back blocks it does not use",
		node, MaxBlocksPerNode, subnet)
}

// makeRoomForNetwork checks that node may create a network of subnet,
// dropping the oldest deleted network's record if the table is full.
func (s *State) makeRoomForNetwork(node string, subnet netip.Prefix) (Result, bool) {
	own := 0
	for _, n := range s.Networks {
		if !n.Deleted && n.CreatedBy == node {
			own++
		}
	}
	if own >= MaxNetworksPerNode {
		return refuse(CodeLimit, "node %s created %d networks of the cluster, the most one node can: remove networks it does not use",
			node, MaxNetworksPerNode), false
	}
	if _, replaces := s.Networks[subnet]; replaces || len(s.Networks) < MaxNetworks {
		return Result{}, true
	}
	var oldest *Network
	for _, n := range s.Networks {
		if n.Deleted && len(n.Blocks) == 0 && (oldest == nil || n.DeletedIndex < oldest.DeletedIndex ||
			n.DeletedIndex == oldest.DeletedIndex && ComparePrefix(n.Subnet, oldest.Subnet) < 0) {
			oldest = n
		}
	}
	if oldest == nil {
		return refuse(CodeLimit, "the cluster holds %d networks, the most it can: remove networks that are not used", MaxNetworks), false
	}
	delete(s.Networks, oldest.Subnet)
	return Result{}, true
}

// pruneForgotten drops the oldest tombstones of forgotten identities
// (by the log index of the forget, then identity) until at most keep
// remain. The order depends on the state alone, so every replica drops
// the same ones.
func (s *State) pruneForgotten(keep int) {
	if len(s.Forgotten) <= keep {
		return
	}
	ids := slices.Collect(maps.Keys(s.Forgotten))
	slices.SortFunc(ids, func(a, b crypto.NodeID) int {
		return cmp.Or(cmp.Compare(s.Forgotten[a].Index, s.Forgotten[b].Index), strings.Compare(a.String(), b.String()))
	})
	for _, id := range ids[:len(ids)-keep] {
		delete(s.Forgotten, id)
	}
}
