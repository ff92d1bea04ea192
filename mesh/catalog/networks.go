package catalog

// The commands on a network as a whole: ensureNetwork creates it,
// setSpec names it, reserve keeps an address from containers, and
// deleteNetwork removes it. Claims of its blocks are in blocks.go.

import (
	"net/netip"
	"slices"
	"strings"
)

func (s *State) ensureNetwork(ap applying, node string, e *EnsureNetwork) Result {
	at := ap.at
	bits := e.BlockBits
	if bits == 0 {
		bits = DefaultBlockBits(e.Subnet)
	}
	if n, ok := s.Live(e.Subnet); ok {
		switch {
		case e.BlockBits != 0 && e.BlockBits != n.BlockBits:
			return refuse(CodeNetworkConflict, "network %s exists in the cluster with blocks of /%d, not /%d: create it with the same "+
				"--ipam-opt wgmesh.block-size, or without it", e.Subnet, n.BlockBits, e.BlockBits)
		case e.Gateway.IsValid() && e.Gateway != n.Gateway:
			return refuse(CodeNetworkConflict, "network %s exists in the cluster with gateway %s, not %s", e.Subnet, n.Gateway, e.Gateway)
		}
		return Result{Network: n.Clone()}
	}
	if old, ok := s.Networks[e.Subnet]; ok && old.Deleted && len(old.Blocks) > 0 {
		return refuse(CodeNetworkConflict, "network %s was removed from the cluster, but %s still hold blocks of it: "+
			"remove it on those hosts (docker network rm) before creating it again", e.Subnet, strings.Join(old.holders(), ", "))
	}
	for _, subnet := range s.Subnets() {
		if other := s.Networks[subnet]; (!other.Deleted || len(other.Blocks) > 0) && other.Subnet.Overlaps(e.Subnet) {
			return refuse(CodeNetworkConflict, "subnet %s overlaps network %s (%s) of the cluster; a subnet is one network across the mesh",
				e.Subnet, other.Subnet, other.name())
		}
	}
	if ap.rules2() {
		if r, ok := s.makeRoomForNetwork(node, e.Subnet); !ok {
			return r
		}
	}
	n := &Network{Subnet: e.Subnet, BlockBits: bits, Gateway: e.Gateway,
		Blocks: map[netip.Prefix]string{}, CreatedBy: node, Created: at}
	if !n.Gateway.IsValid() && !e.HostGateways {
		n.Gateway = e.Subnet.Addr().Next()
	}
	s.Networks[e.Subnet] = n
	return Result{Network: n.Clone()}
}

func (n *Network) name() string {
	if n.Spec != nil {
		return n.Spec.Name
	}
	return "unnamed"
}

func (s *State) reserve(e applying, node string, r *Reserve) Result {
	n, ok := s.Live(r.Subnet)
	if !ok {
		return refuse(CodeNoNetwork, "no network %s in the cluster", r.Subnet)
	}
	if slices.Contains(n.Aux, r.Addr) || n.Gateway == r.Addr {
		return Result{Network: n.Clone()}
	}
	if owner, b, ok := n.Owner(r.Addr); ok && owner != node {
		return refuse(CodeBlockTaken, "address %s is in block %s of node %s, which may have given it to a container", r.Addr, b, owner)
	}
	if e.rules2() && len(n.Aux) >= MaxAux {
		return refuse(CodeLimit, "network %s has %d reserved addresses, the most it can", r.Subnet, MaxAux)
	}
	n.Aux = append(n.Aux, r.Addr)
	slices.SortFunc(n.Aux, netip.Addr.Compare)
	return Result{Network: n.Clone()}
}

func (s *State) setSpec(c *SetSpec) Result {
	n, ok := s.Live(c.Subnet)
	if !ok {
		return refuse(CodeNoNetwork, "no network %s in the cluster", c.Subnet)
	}
	if other, ok := s.NetworkByName(c.Spec.Name); ok && other.Subnet != c.Subnet {
		return refuse(CodeNetworkConflict, "a network named %s already exists in the cluster, with subnet %s", c.Spec.Name, other.Subnet)
	}
	if n.Spec != nil && n.Spec.Name != c.Spec.Name {
		return refuse(CodeNetworkConflict, "network %s is called %s in the cluster, not %s; a subnet is one network, give it one name",
			c.Subnet, n.Spec.Name, c.Spec.Name)
	}
	if n.Spec == nil {
		n.Spec = c.Spec.Clone()
	}
	return Result{Network: n.Clone()}
}

// deleteNetwork removes a network. Under protocol 2, a member's command
// gives back the member's own blocks only, unless the leader checked that
// no host uses the network; the network goes once no host holds a block
// of it. (Under protocol 1 it goes at once, with every block.)
func (s *State) deleteNetwork(e applying, node string, subnet netip.Prefix) Result {
	n, ok := s.Live(subnet)
	if !ok {
		return Result{}
	}
	if e.rules2() && !e.checked() {
		for b, owner := range n.Blocks {
			if owner == node {
				delete(n.Blocks, b)
			}
		}
		if len(n.Blocks) > 0 {
			return Result{Network: n.Clone()}
		}
	}
	n.Deleted, n.DeletedBy, n.DeletedAt = true, node, e.at
	if e.rules2() {
		// The leader saw no containers on the network, but gossip may
		// lag behind a container started a moment ago: other hosts keep
		// their blocks until each gives them back itself (its --sync-
		// networks removes the network, Docker releases the pool), so
		// no address can be handed out twice, whoever asked. The signer
		// gives its own back at once.
		n.DeletedIndex = e.index
		for b, owner := range n.Blocks {
			if owner == node {
				delete(n.Blocks, b)
			}
		}
		return Result{Network: n.Clone()}
	}
	clear(n.Blocks)
	return Result{Network: n.Clone()}
}

// holders lists the nodes that hold blocks of n, sorted.
func (n *Network) holders() []string {
	var out []string
	for _, owner := range n.Blocks {
		if !slices.Contains(out, owner) {
			out = append(out, owner)
		}
	}
	slices.Sort(out)
	return out
}
