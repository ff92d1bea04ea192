package driver

import (
	"cmp"
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/dns"
	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/mesh/consensus"
)

// Status is what `wgmesh status` shows: the node, the cluster as gossip
// sees it, and each local network with its WireGuard peers.
type Status struct {
	Node NodeStatus `json:"node"`
	// Consensus is this node's part in the cluster's Raft.
	Consensus consensus.Status `json:"consensus"`
	Members   []MemberStatus   `json:"members"`
	Networks  []NetworkStatus  `json:"networks"`
	Gossip    mesh.Stats       `json:"gossip"`
	// Relay lists the pairs this host relays for others.
	Relay    []RelayStatus `json:"relay,omitempty"`
	Problems []string      `json:"problems,omitempty"`
	Healthy  bool          `json:"healthy"`

	// DNS is the DNS service of container names, when it is on.
	DNS *dns.Status `json:"dns,omitempty"`
}

// RelayStatus is one pair this host relays.
type RelayStatus struct {
	Network netip.Prefix   `json:"network"`
	A       string         `json:"a"`
	B       string         `json:"b"`
	Port    uint16         `json:"port"`
	AddrA   netip.AddrPort `json:"addr_a,omitzero"`
	AddrB   netip.AddrPort `json:"addr_b,omitzero"`
	BytesAB uint64         `json:"bytes_ab"`
	BytesBA uint64         `json:"bytes_ba"`
	Dropped uint64         `json:"dropped"`
}

// NodeStatus describes this node.
type NodeStatus struct {
	Name      string           `json:"name"`
	Addr      netip.Addr       `json:"addr"`
	PublicKey crypto.PublicKey `json:"public_key"`
	WGMode    string           `json:"wg_mode"`
	ClusterID string           `json:"cluster_id,omitempty"`
}

// MemberStatus describes a member of the cluster.
type MemberStatus struct {
	Name      string           `json:"name"`
	Addr      netip.Addr       `json:"addr"`
	State     mesh.Liveness    `json:"state"`
	Since     time.Time        `json:"since,omitzero"`
	RTT       time.Duration    `json:"rtt_ns,omitempty"`
	WGMode    string           `json:"wg_mode,omitempty"`
	PublicKey crypto.PublicKey `json:"public_key"`
	Self      bool             `json:"self,omitempty"`
	// NAT is how the member's NAT maps ports; Public where members
	// outside it see its gossip port.
	NAT    mesh.NATKind   `json:"nat,omitempty"`
	Public netip.AddrPort `json:"public,omitzero"`
	// PathMTU is the largest IP packet that crosses from this host to
	// the member, if measured.
	PathMTU int `json:"path_mtu,omitempty"`
	// Relay: the member relays for others.
	Relay bool `json:"relay,omitempty"`
}

// NetworkStatus describes a local network.
type NetworkStatus struct {
	ID        string           `json:"id"`
	Subnet    netip.Prefix     `json:"subnet"`
	Interface string           `json:"interface"`
	Port      uint16           `json:"port"`
	MTU       int              `json:"mtu"`
	Gateway   netip.Addr       `json:"gateway,omitzero"`
	Blocks    []netip.Prefix   `json:"blocks"`
	Endpoints []EndpointStatus `json:"endpoints"`
	Peers     []PeerStatus     `json:"peers"`
}

// EndpointStatus describes a container's endpoint.
type EndpointStatus struct {
	ID     string       `json:"id"`
	Addr   netip.Prefix `json:"addr"`
	MAC    string       `json:"mac"`
	Joined bool         `json:"joined"`
	// Interface is its name inside the container, once known.
	Interface string `json:"interface,omitempty"`
	// Broken says why its container, which lost its interface, could
	// not get it back.
	Broken string `json:"broken,omitempty"`
}

// PeerStatus describes a WireGuard peer of a network.
type PeerStatus struct {
	Node      string           `json:"node"`
	State     mesh.Liveness    `json:"state"`
	PublicKey crypto.PublicKey `json:"public_key"`
	// Path is how traffic to the peer goes: direct, relayed (through
	// Via), trying (a direct attempt under way) or waiting for relay.
	Path string `json:"path"`
	Via  string `json:"via,omitempty"`
	// Endpoint is where WireGuard sends the peer's packets.
	Endpoint netip.AddrPort `json:"endpoint"`
	// PathMTU is the largest IP packet that crosses the path to the peer
	// (through a relay, the smaller of its two legs), if measured;
	// RouteMTU the MTU of packets to the peer's blocks, when the path
	// makes it smaller than the network's.
	PathMTU       int            `json:"path_mtu,omitempty"`
	RouteMTU      int            `json:"route_mtu,omitempty"`
	AllowedIPs    []netip.Prefix `json:"allowed_ips"`
	LastHandshake time.Time      `json:"last_handshake,omitzero"`
	RxBytes       int64          `json:"rx_bytes"`
	TxBytes       int64          `json:"tx_bytes"`
}

// A live peer with no handshake for this long is a problem: with
// keepalives on, WireGuard re-handshakes at least every two minutes.
const staleHandshake = 3*time.Minute + 30*time.Second

// handshakeGrace is how long a new peer may take to complete its first
// handshake before that is a problem.
const handshakeGrace = 30 * time.Second

// Status reports the node, the cluster and the local networks.
func (d *Driver) Status(ctx context.Context) (*Status, error) {
	v := d.cfg.Mesh.View()
	planes, dpErr := d.cfg.DataPlane.Status(ctx)
	now := time.Now()
	self := v.Members[v.Self]
	st := &Status{
		Node: NodeStatus{Name: v.Self, Addr: self.Addr, PublicKey: d.currentKey().Public(),
			WGMode: d.cfg.DataPlane.Mode(), ClusterID: v.ClusterID},
		Consensus: d.cfg.Mesh.Consensus(),
		Gossip:    d.cfg.Mesh.Stats(),
	}
	st.Problems = append(st.Problems, d.cfg.Mesh.Problems()...)
	if dpErr != nil {
		st.Problems = append(st.Problems, fmt.Sprintf("reading the data plane: %v", dpErr))
	}
	for _, m := range v.Members {
		ms := MemberStatus{Name: m.Name, Addr: m.Addr, State: m.State, Since: m.Since,
			RTT: m.RTT, WGMode: m.WGMode, PublicKey: m.PublicKey, Self: m.Self, NAT: m.NAT, PathMTU: m.PathMTU, Relay: m.Relay()}
		if m.NAT.Behind() {
			ms.Public = m.Seen
		}
		st.Members = append(st.Members, ms)
		switch m.State {
		case mesh.Dead:
			st.Problems = append(st.Problems, fmt.Sprintf("node %s (%s) failed %s ago; its address blocks stay reserved until it returns or `wgmesh forget %s`",
				m.Name, m.Addr, now.Sub(m.Since).Round(time.Second), m.Name))
		case mesh.Suspect:
			st.Problems = append(st.Problems, fmt.Sprintf("node %s (%s) does not answer gossip probes (last answer %s ago): check UDP to its gossip port",
				m.Name, m.Addr, now.Sub(m.LastAck).Round(time.Second)))
		case mesh.Unknown:
			st.Problems = append(st.Problems, fmt.Sprintf("node %s (%s) has not been heard from since this agent started", m.Name, m.Addr))
		}
	}
	slices.SortFunc(st.Members, func(a, b MemberStatus) int { return cmp.Compare(a.Name, b.Name) })

	byID := map[string]int{}
	for i, p := range planes {
		byID[p.ID] = i
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, n := range d.state.Networks {
		ns := NetworkStatus{ID: n.ID, Subnet: n.Subnet, Port: n.Port, MTU: n.MTU, Gateway: n.Gateway, Blocks: v.OwnBlocks(n.Subnet)}
		for _, e := range d.state.endpointsOf(n.ID) {
			es := EndpointStatus{ID: e.ID, Addr: e.Addr, MAC: e.MAC, Joined: e.Joined, Interface: e.containerIfName(), Broken: d.broken[e.ID]}
			if es.Broken != "" {
				st.Problems = append(st.Problems, fmt.Sprintf("network %s: the container of endpoint %s (%s) lost its interface and it could not be repaired: %s",
					n.Subnet, short(e.ID), e.Addr, es.Broken))
			}
			ns.Endpoints = append(ns.Endpoints, es)
		}
		i, applied := byID[n.ID]
		if !applied {
			st.Problems = append(st.Problems, fmt.Sprintf("network %s (%s) has no data plane yet", short(n.ID), n.Subnet))
		} else {
			ns.Interface = planes[i].Interface
		}
		for _, p := range v.Peers(n.Subnet) {
			path := d.paths.info(pathKey{n.Subnet, p.Node}, p, v.Self, now)
			ps := PeerStatus{Node: p.Node, State: p.State, PublicKey: p.PublicKey, Endpoint: path.endpoint, AllowedIPs: p.AllowedIPs,
				Path: path.mode, Via: path.via, PathMTU: path.pathMTU, RouteMTU: routeMTU(path.pathMTU, path.endpoint, n.MTU)}
			if !ps.Endpoint.IsValid() {
				ps.Endpoint = p.Endpoint
			}
			if applied {
				for _, wp := range planes[i].Peers {
					if wp.PublicKey == p.PublicKey {
						ps.LastHandshake, ps.RxBytes, ps.TxBytes = wp.LastHandshake, wp.RxBytes, wp.TxBytes
						if wp.Endpoint.IsValid() {
							ps.Endpoint = wp.Endpoint
						}
					}
				}
			}
			switch {
			case path.noRelay && len(path.failedRelays) > 0:
				st.Problems = append(st.Problems, fmt.Sprintf("network %s: no direct path to %s, and no relay works: %s opened no session "+
					"for the pair or passed no handshake within --punch-timeout (each is tried again later; 'wgmesh status' on it tells why)",
					n.Subnet, p.Node, strings.Join(path.failedRelays, ", ")))
			case path.noRelay:
				st.Problems = append(st.Problems, fmt.Sprintf("network %s: no direct path to %s, and no member relays (a host members reach at its own address relays with --relay-ports open)",
					n.Subnet, p.Node))
			case path.mode == "waiting for relay" && now.Sub(path.since) > handshakeGrace:
				st.Problems = append(st.Problems, fmt.Sprintf("network %s: %s is to be reached through relay %s, which has not opened a session for the pair",
					n.Subnet, p.Node, path.via))
			}
			age := now.Sub(ps.LastHandshake)
			joined := v.Members[p.Node].Since
			switch {
			case ps.LastHandshake.IsZero() && now.Sub(joined) > handshakeGrace:
				st.Problems = append(st.Problems, fmt.Sprintf("network %s: no WireGuard handshake with %s at %s yet: is UDP port %d open on it?",
					n.Subnet, p.Node, p.Endpoint, p.Endpoint.Port()))
			case !ps.LastHandshake.IsZero() && age > staleHandshake:
				st.Problems = append(st.Problems, fmt.Sprintf("network %s: last WireGuard handshake with %s was %s ago", n.Subnet, p.Node, age.Round(time.Second)))
			}
			ns.Peers = append(ns.Peers, ps)
		}
		st.Networks = append(st.Networks, ns)
	}
	slices.SortFunc(st.Networks, func(a, b NetworkStatus) int { return a.Subnet.Addr().Compare(b.Subnet.Addr()) })
	st.Relay = d.relayStatusLocked()
	if err := d.relayHost.setErr; err != nil {
		st.Problems = append(st.Problems, fmt.Sprintf("relaying for others: %v", err))
	}
	st.Problems = append(st.Problems, d.syncProblems...)
	if d.cfg.DNS != nil {
		st.DNS = d.cfg.DNS()
		st.Problems = append(st.Problems, st.DNS.Problems...)
	}
	st.Healthy = len(st.Problems) == 0
	return st, nil
}

func (d *Driver) currentKey() crypto.PrivateKey {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.key
}

// relayStatusLocked lists the pairs this host relays.
func (d *Driver) relayStatusLocked() []RelayStatus {
	if d.cfg.Relay == nil {
		return nil
	}
	byPort := map[uint16]relayPair{}
	for pair, port := range d.relayHost.ports {
		byPort[port] = pair
	}
	var out []RelayStatus
	for _, s := range d.cfg.Relay.Stats() {
		pair, ok := byPort[s.Port]
		if !ok {
			continue
		}
		out = append(out, RelayStatus{Network: pair.subnet, A: pair.a, B: pair.b, Port: s.Port, AddrA: s.AddrA, AddrB: s.AddrB,
			BytesAB: s.BytesAB, BytesBA: s.BytesBA, Dropped: s.Dropped})
	}
	return out
}
