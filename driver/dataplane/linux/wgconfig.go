package linux

import (
	"cmp"
	"maps"
	"net"
	"net/netip"
	"slices"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/dataplane"
)

// wgState is a WireGuard device's configuration as wgmesh set it.
type wgState struct {
	publicKey crypto.PublicKey // of the device's private key
	port      int
	peers     map[crypto.PublicKey]peerState
}

type peerState struct {
	endpoint  netip.AddrPort
	allowed   []netip.Prefix // sorted
	keepalive time.Duration
	gen       uint64
}

func (a peerState) equal(b peerState) bool {
	return a.endpoint == b.endpoint && a.keepalive == b.keepalive && a.gen == b.gen && slices.Equal(a.allowed, b.allowed)
}

func desiredWG(key crypto.PrivateKey, n *dataplane.Network) wgState {
	s := wgState{publicKey: key.Public(), port: int(n.ListenPort), peers: map[crypto.PublicKey]peerState{}}
	for _, p := range n.Peers {
		allowed := slices.Clone(p.AllowedIPs)
		slices.SortFunc(allowed, func(a, b netip.Prefix) int {
			return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
		})
		s.peers[p.PublicKey] = peerState{endpoint: p.Endpoint, allowed: slices.Compact(allowed), keepalive: p.Keepalive, gen: p.Generation}
	}
	return s
}

// wgDiff returns the wgctrl configuration that takes a device from have
// to want, touching only what differs: reconfiguring a peer's endpoint
// resets where WireGuard sends, replacing the whole peer set would drop
// every session, and replacing a peer's allowed IPs leaves a moment in
// which the kernel has no peer for them and drops what goes there. So a
// peer's allowed IPs are written only when they changed, and blocks that
// are only added are added to those it has.
func wgDiff(have, want wgState, key crypto.PrivateKey) (cfg wgtypes.Config, changed bool) {
	if have.publicKey != want.publicKey {
		k := wgtypes.Key(key.Bytes())
		cfg.PrivateKey = &k
		changed = true
	}
	if have.port != want.port {
		p := want.port
		cfg.ListenPort = &p
		changed = true
	}
	for _, pub := range slices.SortedFunc(maps.Keys(want.peers), comparePub) {
		w := want.peers[pub]
		h, ok := have.peers[pub]
		if ok && h.equal(w) {
			continue
		}
		pc := wgtypes.PeerConfig{PublicKey: wgtypes.Key(pub)}
		if ok && h.gen != w.gen {
			// Start over: remove it, then add it as new.
			cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: wgtypes.Key(pub), Remove: true})
			ok = false
		}
		switch added, grown := addedPrefixes(h.allowed, w.allowed); {
		case ok && grown:
			pc.AllowedIPs = ipNets(added)
		case !ok || !slices.Equal(h.allowed, w.allowed):
			pc.ReplaceAllowedIPs = true
			pc.AllowedIPs = ipNets(w.allowed)
		}
		if !ok || h.endpoint != w.endpoint {
			pc.Endpoint = net.UDPAddrFromAddrPort(w.endpoint)
		}
		if !ok || h.keepalive != w.keepalive {
			ka := w.keepalive
			pc.PersistentKeepaliveInterval = &ka
		}
		cfg.Peers = append(cfg.Peers, pc)
		changed = true
	}
	for _, pub := range slices.SortedFunc(maps.Keys(have.peers), comparePub) {
		if _, ok := want.peers[pub]; !ok {
			cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: wgtypes.Key(pub), Remove: true})
			changed = true
		}
	}
	return cfg, changed
}

func comparePub(a, b crypto.PublicKey) int { return slices.Compare(a[:], b[:]) }

// addedPrefixes returns what want has that have has not, and whether
// want only adds to have: then adding those is all it takes.
func addedPrefixes(have, want []netip.Prefix) ([]netip.Prefix, bool) {
	var added []netip.Prefix
	for _, p := range want {
		if !slices.Contains(have, p) {
			added = append(added, p)
		}
	}
	for _, p := range have {
		if !slices.Contains(want, p) {
			return nil, false
		}
	}
	return added, len(added) > 0
}

func ipNets(ps []netip.Prefix) []net.IPNet {
	out := make([]net.IPNet, 0, len(ps))
	for _, p := range ps {
		out = append(out, net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())})
	}
	return out
}

func prefixOf(n net.IPNet) netip.Prefix {
	a, _ := netip.AddrFromSlice(n.IP)
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones)
}

// observedWG reads back a device's state, used after an agent restart to
// diff against what a surviving kernel device already runs.
func observedWG(d *wgtypes.Device) wgState {
	s := wgState{publicKey: crypto.PublicKey(d.PublicKey), port: d.ListenPort, peers: map[crypto.PublicKey]peerState{}}
	for _, p := range d.Peers {
		ps := peerState{keepalive: p.PersistentKeepaliveInterval}
		if p.Endpoint != nil {
			ps.endpoint = p.Endpoint.AddrPort()
			ps.endpoint = netip.AddrPortFrom(ps.endpoint.Addr().Unmap(), ps.endpoint.Port())
		}
		for _, a := range p.AllowedIPs {
			ps.allowed = append(ps.allowed, prefixOf(a))
		}
		slices.SortFunc(ps.allowed, func(a, b netip.Prefix) int {
			return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
		})
		s.peers[crypto.PublicKey(p.PublicKey)] = ps
	}
	return s
}

// adoptWG is the state of a device to diff with want: as the device
// reports it, with each peer's endpoint as it was last written (set),
// since WireGuard moves it where the peer's packets come from. A device
// does not know the generation of its peers: it is the one last written
// or, with nothing written yet (an agent restart), the one wanted: a
// surviving kernel link keeps its sessions.
func adoptWG(dev *wgtypes.Device, set *wgState, want wgState) wgState {
	have := observedWG(dev)
	for pub, p := range have.peers {
		if s, ok := set.peerState(pub); ok {
			p.endpoint, p.gen = s.endpoint, s.gen
		} else if w, ok := want.peers[pub]; ok {
			p.gen = w.gen
		}
		have.peers[pub] = p
	}
	return have
}

// peerState returns what was last written for a peer; a nil state knows
// nothing.
func (s *wgState) peerState(pub crypto.PublicKey) (peerState, bool) {
	if s == nil {
		return peerState{}, false
	}
	p, ok := s.peers[pub]
	return p, ok
}
