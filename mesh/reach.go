package mesh

import (
	"iter"
	"net/netip"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/reachability"
	"github.com/wgmesh/wgmesh/mesh/records"
)

// How members reach this node, and how large a packet reaches them, is
// package reachability's to judge; publishing the judgement in this
// node's signed records and sending its observations is done here.

// PathMTU is the path MTU to a member (reachability.PathMTU).
type PathMTU = reachability.PathMTU

// reachCluster is what the reachability tracker reads of the mesh. The
// tracker is called with m.mu held, and so are these.
type reachCluster struct{ m *Mesh }

var _ reachability.Cluster = reachCluster{}

func (c reachCluster) IdentityOf(name string) (crypto.NodeID, bool) {
	return c.m.state.rep.IdentityOf(name, c.m.bound)
}
func (c reachCluster) Refuse(reason string)                      { c.m.state.rep.Refuse(reason) }
func (c reachCluster) Info(name string) (records.NodeInfo, bool) { return c.m.state.rep.Info(name) }
func (c reachCluster) Infos() iter.Seq2[string, records.NodeInfo] {
	return c.m.state.rep.Infos()
}
func (c reachCluster) Reachable(name string) bool { return c.m.state.live[name].state.Reachable() }
func (c reachCluster) Version() uint64            { return c.m.versionLocked() }

// receiveObservation takes an observation of this node from its observer.
func (m *Mesh) receiveObservation(s records.Signed) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.state.reach.Receive(s, time.Now())
}

// SetWGSightings tells the mesh where this node sees its WireGuard peers'
// handshakes come from: by peer, by network. The mesh passes each peer
// what it sees of it.
func (m *Mesh) SetWGSightings(s map[string]map[netip.Prefix]netip.AddrPort) {
	m.mu.Lock()
	m.state.reach.SetWGSightings(s)
	m.mu.Unlock()
}

// reassessNATLocked judges this node's NAT from what its observers and
// relays report, and publishes a change.
func (m *Mesh) reassessNATLocked(now time.Time) {
	wgLocal := map[netip.Prefix]netip.AddrPort{}
	for e := range m.state.rep.Entries() {
		if e.Node == m.cfg.Name && e.Port != 0 {
			wgLocal[e.Subnet] = netip.AddrPortFrom(m.addr, e.Port)
		}
	}
	if !m.state.reach.Reassess(now, netip.AddrPortFrom(m.addr, uint16(m.cfg.BindPort)), wgLocal) {
		return
	}
	st := m.state.reach.NAT()
	m.setSelfInfoLocked()
	for cur := range m.state.rep.Entries() {
		if cur.Node == m.cfg.Name && cur.Seen != st.WG[cur.Subnet] {
			m.updateOwnLocked(cur.Subnet, func(e *NetworkEntry) { e.Seen = st.WG[cur.Subnet] })
		}
	}
}
