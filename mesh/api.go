package mesh

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
	"github.com/wgmesh/wgmesh/mesh/consensus"
	"github.com/wgmesh/wgmesh/mesh/records"
)

// Errors of the cluster's decisions, for errors.Is.
var (
	ErrBlockTaken      = catalog.ErrBlockTaken
	ErrNoFreeBlock     = catalog.ErrNoFreeBlock
	ErrNoNetwork       = catalog.ErrNoNetwork
	ErrNetworkConflict = catalog.ErrNetworkConflict
	ErrNotMember       = consensus.ErrNotMember
	ErrNoLeader        = consensus.ErrNoLeader
	// ErrUnreachable is ErrNoLeader when the members asked are up but
	// consensus connections to them time out.
	ErrUnreachable = consensus.ErrUnreachable
	// ErrInUse refuses removing a network that containers use.
	ErrInUse = errors.New("network in use")
	// ErrAlive refuses forgetting a node that gossip sees.
	ErrAlive = errors.New("node is alive")
)

// Attach publishes that this node has subnet attached with its WireGuard
// listening on port. Port 0 detaches.
func (m *Mesh) Attach(subnet netip.Prefix, port uint16) error {
	if err := ValidSubnet(subnet); err != nil {
		return err
	}
	m.updateOwn(subnet, func(e *NetworkEntry) { e.Port = port })
	return nil
}

// SetEndpoints publishes how many containers this node has on subnet.
func (m *Mesh) SetEndpoints(subnet netip.Prefix, n int) {
	m.updateOwn(subnet, func(e *NetworkEntry) { e.Endpoints = n })
}

// updateOwn changes this node's entry for subnet and publishes it if it
// changed.
func (m *Mesh) updateOwn(subnet netip.Prefix, f func(*NetworkEntry)) {
	m.mu.Lock()
	changed := m.updateOwnLocked(subnet, f)
	m.mu.Unlock()
	if changed {
		m.kickLoop()
	}
}

func (m *Mesh) updateOwnLocked(subnet netip.Prefix, f func(*NetworkEntry)) bool {
	cur, ok := m.state.rep.Entry(m.cfg.Name, subnet)
	e := cur
	e.Relay = maps.Clone(e.Relay)
	if !ok {
		e = NetworkEntry{Node: m.cfg.Name, Subnet: subnet}
	}
	f(&e)
	if len(e.Relay) == 0 {
		e.Relay = nil
	}
	if ok && e.Equal(cur) || !ok && e.Port == 0 && e.Endpoints == 0 && len(e.Relay) == 0 {
		return false
	}
	if ok && e.Port == 0 && cur.Port != 0 {
		// Detached: what it said about its paths no longer holds.
		e.Seen, e.Relay = netip.AddrPort{}, nil
	}
	if ok && e.Port != cur.Port && m.state.reach.NAT().WG[subnet].IsValid() {
		e.Seen = netip.AddrPort{}
	}
	e.Version = m.versionLocked()
	s := records.Sign(m.cfg.Identity, records.PurposeEntry, e)
	m.state.rep.SetOwnEntry(e, s)
	m.state.outbox = append(m.state.outbox, outMsg{name: "entry/" + m.cfg.Name + "/" + subnet.String(), b: records.EncodeEntryMsg(s)})
	m.touchLocked()
	return true
}

// SetRelayWants publishes this node's wishes about its paths to peers of
// subnet (relay.go in the driver): which to reach through a relay, and
// which it is ready to try directly again. It does nothing on a network
// this node has not attached.
func (m *Mesh) SetRelayWants(subnet netip.Prefix, wants map[string]RelayWant) {
	if len(wants) > records.MaxRelayWants {
		names := slices.Sorted(maps.Keys(wants))
		wants = maps.Clone(wants)
		for _, n := range names[records.MaxRelayWants:] {
			delete(wants, n)
		}
	}
	m.mu.Lock()
	cur, ok := m.state.rep.Entry(m.cfg.Name, subnet)
	changed := false
	if ok && cur.Port != 0 {
		changed = m.updateOwnLocked(subnet, func(e *NetworkEntry) { e.Relay = maps.Clone(wants) })
	}
	m.mu.Unlock()
	if changed {
		m.kickLoop()
	}
}

// SetRelaySessions publishes the sessions this node relays, replacing
// those it published before: a session no longer listed is closed (a
// record with port 0 says so).
func (m *Mesh) SetRelaySessions(sessions []RelaySession) {
	m.mu.Lock()
	want := map[records.SessionKey]RelaySession{}
	for _, r := range sessions {
		r.Relay = m.cfg.Name
		if r.A > r.B {
			r.A, r.B = r.B, r.A
		}
		want[records.KeyOf(r)] = r
	}
	changed := false
	publish := func(r RelaySession) {
		r.Version = m.versionLocked()
		if err := r.Validate(); err != nil {
			m.log.Error("not publishing an invalid relay session", "err", err)
			return
		}
		s := records.Sign(m.cfg.Identity, records.PurposeSession, r)
		m.state.rep.SetOwnSession(r, s)
		m.state.outbox = append(m.state.outbox, outMsg{name: sessionBroadcastName(r), b: records.EncodeMsg(records.KindSession, s)})
		changed = true
	}
	for cur := range m.state.rep.Sessions() {
		if cur.Relay != m.cfg.Name || cur.Port == 0 {
			continue
		}
		if _, ok := want[records.KeyOf(cur)]; !ok {
			closed := cur
			closed.Port, closed.MTU = 0, 0
			publish(closed)
		}
	}
	for k, r := range want {
		cur, ok := m.state.rep.Session(k)
		if ok && cur.Port == r.Port && cur.MTU == r.MTU {
			continue
		}
		publish(r)
	}
	if changed {
		m.touchLocked()
	}
	m.mu.Unlock()
	if changed {
		m.kickLoop()
	}
}

// propose sends a command to the cluster and returns its refusal, if any,
// as an error.
func (m *Mesh) propose(ctx context.Context, c *catalog.Command) (catalog.Result, error) {
	r, err := m.node.Propose(ctx, c)
	if err != nil {
		return r, err
	}
	return r, r.Err()
}

// EnsureNetwork makes sure the cluster has the network e describes: it
// creates it, or checks that the existing one is compatible. A network the
// catalog already has needs no consensus, so this works in a partition.
func (m *Mesh) EnsureNetwork(ctx context.Context, e catalog.EnsureNetwork) (*catalog.Network, error) {
	if n := m.View().Network(e.Subnet); n != nil && compatible(n, &e) {
		return n, nil
	}
	r, err := m.propose(ctx, &catalog.Command{Op: catalog.OpEnsureNetwork, Network: &e})
	if err != nil {
		return nil, fmt.Errorf("network %s: %w", e.Subnet, err)
	}
	return r.Network, nil
}

func compatible(n *catalog.Network, e *catalog.EnsureNetwork) bool {
	return (e.BlockBits == 0 || e.BlockBits == n.BlockBits) && (!e.Gateway.IsValid() || e.Gateway == n.Gateway)
}

// Reserve keeps addr of subnet from every container in the cluster (an
// --aux-address). Reserving an address twice is fine.
func (m *Mesh) Reserve(ctx context.Context, subnet netip.Prefix, addr netip.Addr) error {
	if n := m.View().Network(subnet); n != nil && (n.Gateway == addr || slices.Contains(n.Aux, addr)) {
		return nil
	}
	_, err := m.propose(ctx, &catalog.Command{Op: catalog.OpReserve, Reserve: &catalog.Reserve{Subnet: subnet, Addr: addr}})
	if err != nil {
		return fmt.Errorf("reserving %s: %w", addr, err)
	}
	return nil
}

// PublishSpec records subnet's Docker definition in the cluster, if it
// has none yet.
func (m *Mesh) PublishSpec(ctx context.Context, subnet netip.Prefix, spec catalog.Spec) error {
	if cur := m.View().Spec(subnet); cur != nil && cur.Name == spec.Name {
		return nil
	}
	_, err := m.propose(ctx, &catalog.Command{Op: catalog.OpSetSpec, Spec: &catalog.SetSpec{Subnet: subnet, Spec: spec}})
	return err
}

// DeleteNetwork removes a network from the whole cluster, with its blocks.
// It is refused while containers use it on any host, naming them.
func (m *Mesh) DeleteNetwork(ctx context.Context, subnet netip.Prefix) error {
	v := m.View()
	if v.Network(subnet) == nil {
		return fmt.Errorf("no network %s in the cluster: %w", subnet, ErrNoNetwork)
	}
	if users := v.Users(subnet); len(users) > 0 {
		var where []string
		for _, node := range slices.Sorted(maps.Keys(users)) {
			where = append(where, fmt.Sprintf("%s (%d)", node, users[node]))
		}
		return fmt.Errorf("containers still use network %s on %s: %w", subnet, strings.Join(where, ", "), ErrInUse)
	}
	r, err := m.propose(ctx, &catalog.Command{Op: catalog.OpDeleteNetwork, Delete: &catalog.DeleteNetwork{Subnet: subnet}})
	switch {
	case errors.Is(err, catalog.ErrInUse):
		// The leader's gossip view saw containers that this node's did not.
		return fmt.Errorf("%w (%w)", err, ErrInUse)
	case err != nil:
		return err
	case r.Network != nil && !r.Network.Deleted:
		// A leader that could not check the network unused removes only
		// this node's blocks (catalog protocol 2).
		holders := map[string]bool{}
		for _, owner := range r.Network.Blocks {
			holders[owner] = true
		}
		return fmt.Errorf("this host's blocks of network %s are given back, but %s still hold blocks of it and the cluster's leader "+
			"could not check that they are unused; the network goes once they give them back: %w",
			subnet, strings.Join(slices.Sorted(maps.Keys(holders)), ", "), ErrInUse)
	}
	return nil
}

// NetworkUsers lets the cluster's leader check, from its own gossip view,
// that no host has containers on a network before it removes it for every
// host (consensus.NetworkUsers).
func (ms membership) NetworkUsers(subnet netip.Prefix) map[string]int {
	return ms.m.View().Users(subnet)
}

var _ consensus.NetworkUsers = membership{}

// BlockRequest says which block a node wants.
type BlockRequest struct {
	Subnet netip.Prefix
	// Within restricts the block to a range (Docker's --ip-range).
	Within netip.Prefix
	// Containing asks for the block that holds this address (a static
	// --ip). Zero means any free block.
	Containing netip.Addr
}

// ClaimBlock asks the cluster for a block of req.Subnet for this node and
// returns it once committed and applied here. A block this node already
// owns that holds req.Containing is returned at once.
func (m *Mesh) ClaimBlock(ctx context.Context, req BlockRequest) (netip.Prefix, error) {
	if req.Containing.IsValid() {
		for _, b := range m.View().OwnBlocks(req.Subnet) {
			if b.Contains(req.Containing) {
				return b, nil
			}
		}
	}
	r, err := m.propose(ctx, &catalog.Command{Op: catalog.OpClaim, Claim: &catalog.Claim{Subnet: req.Subnet, Within: req.Within, Containing: req.Containing}})
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("claiming a block of %s: %w", req.Subnet, err)
	}
	m.log.Info("address block claimed", "network", req.Subnet, "block", r.Block)
	return r.Block, nil
}

// ReleaseBlocks gives up blocks this node owns in subnet.
func (m *Mesh) ReleaseBlocks(ctx context.Context, subnet netip.Prefix, blocks ...netip.Prefix) error {
	if len(blocks) == 0 {
		return nil
	}
	_, err := m.propose(ctx, &catalog.Command{Op: catalog.OpRelease, Release: &catalog.Release{Subnet: subnet, Blocks: blocks}})
	if err == nil {
		m.log.Info("address blocks released", "network", subnet, "blocks", blocks)
	}
	return err
}

// Forget declares node gone for good: its address blocks become free and
// its identity may never join again. It is refused while gossip sees the
// node alive or suspect, since its containers may still use the blocks.
func (m *Mesh) Forget(ctx context.Context, node string) error {
	if node == m.cfg.Name {
		return errors.New("a node cannot forget itself")
	}
	v := m.View()
	mem, ok := v.Members[node]
	if !ok {
		return fmt.Errorf("forgetting %s: no such node", node)
	}
	if mem.State.Reachable() {
		return fmt.Errorf("forgetting %s: %w (gossip says %s); stop its agent first, or wait until gossip reports it failed", node, ErrAlive, mem.State)
	}
	if _, err := m.propose(ctx, &catalog.Command{Op: catalog.OpForget, Forget: &catalog.Forget{Name: node}}); err != nil {
		if errors.Is(err, catalog.ErrAlive) {
			// The leader's gossip view sees the node, this one's not.
			return fmt.Errorf("forgetting %s: %w (%w)", node, err, ErrAlive)
		}
		return fmt.Errorf("forgetting %s: %w", node, err)
	}
	m.mu.Lock()
	m.state.rep.ForgetNode(node)
	delete(m.state.live, node)
	m.state.reach.Forget(node)
	m.touchLocked()
	m.mu.Unlock()
	m.gossip.net.Forget(node)
	m.log.Info("node forgotten", "peer", node)
	m.kickLoop()
	return nil
}

// checkForgotten stops using the records of nodes the catalog forgot, and
// reports whether the catalog forgot this node.
func (m *Mesh) checkForgotten() error {
	var forgotten map[crypto.NodeID]catalog.Forgotten
	m.node.FSM().Read(func(s *catalog.State) { forgotten = maps.Clone(s.Forgotten) })
	if f, ok := forgotten[m.cfg.Identity.ID()]; ok {
		return fmt.Errorf("%w: this node was forgotten by the cluster (by %s at %s): a forgotten node cannot come back; "+
			"remove its state directory to join as a new node", ErrRefused, f.By, f.At.UTC().Format("2006-01-02 15:04:05 UTC"))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for name, info := range m.state.rep.Infos() {
		if f, ok := forgotten[info.ID]; ok && f.Name == name {
			m.state.rep.ForgetNode(name)
			delete(m.state.live, name)
			m.touchLocked()
		}
	}
	return nil
}

// SetPublicKey publishes a new WireGuard public key for this node.
func (m *Mesh) SetPublicKey(pub crypto.PublicKey) {
	m.mu.Lock()
	m.cfg.PublicKey = pub
	m.setSelfInfoLocked()
	m.mu.Unlock()
	m.kickLoop()
}

// SetKeyring replaces the cluster keyring, for key rotation: install the
// new key everywhere, make it primary everywhere, then remove the old.
// It applies to gossip encryption and to consensus TLS alike.
func (m *Mesh) SetKeyring(ring crypto.Keyring) error {
	kr := m.gossip.keyring.Load()
	if kr == nil {
		return errors.New("gossip runs without encryption (--insecure); restart with a cluster key to enable it")
	}
	for _, k := range ring {
		if err := kr.AddKey(k); err != nil {
			return fmt.Errorf("installing cluster key: %w", err)
		}
	}
	if err := kr.UseKey(ring.Primary()); err != nil {
		return fmt.Errorf("switching primary cluster key: %w", err)
	}
	for _, k := range kr.GetKeys() {
		if !slices.ContainsFunc(ring, func(r []byte) bool { return string(r) == string(k) }) {
			if err := kr.RemoveKey(k); err != nil {
				return fmt.Errorf("removing cluster key: %w", err)
			}
		}
	}
	// Consensus connections of peers whose certificate only a removed
	// key signed are cut: an evicted host keeps none of them.
	cut, err := m.tls.Rekey(ring)
	if err != nil {
		return err
	}
	m.gossip.net.SetKeyring(ring)
	m.mu.Lock()
	m.cfg.Keyring = ring
	m.mu.Unlock()
	m.log.Info("cluster keyring updated", "keys", len(ring), "consensus_connections_cut", cut)
	return nil
}

// Consensus reports this node's consensus state.
func (m *Mesh) Consensus() consensus.Status { return m.node.Status() }
