package records

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// Limits on records from peers.
const (
	maxModeLen     = 16
	maxClusterID   = 64
	maxVersion     = 1 << 62
	maxEndpoints   = 1 << 20
	protocol       = 2
	maxRecordBytes = 2048
	MaxRelayWants  = 48
	maxTries       = 1000
)

// ErrInvalid is wrapped by every validation error of a peer's record.
var ErrInvalid = errors.New("invalid gossip record")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

func (n *NodeInfo) validate() error {
	if err := catalog.ValidName(n.Name); err != nil {
		return invalid("%v", err)
	}
	if n.ID.IsZero() {
		return invalid("node %s: no identity", n.Name)
	}
	if n.Version == 0 || n.Version > maxVersion {
		return invalid("node %s: version %d out of range", n.Name, n.Version)
	}
	if n.PublicKey.IsZero() {
		return invalid("node %s: no WireGuard key", n.Name)
	}
	if !n.Addr.IsValid() || n.Addr.IsUnspecified() || n.Addr.Zone() != "" {
		return invalid("node %s: bad address %s", n.Name, n.Addr)
	}
	if len(n.WGMode) > maxModeLen || len(n.ClusterID) > maxClusterID {
		return invalid("node %s: field too long", n.Name)
	}
	if !n.NAT.valid() {
		return invalid("node %s: unknown NAT kind %q", n.Name, n.NAT)
	}
	if n.Seen.IsValid() && !usableAddrPort(n.Seen) {
		return invalid("node %s: bad public address %s", n.Name, n.Seen)
	}
	if n.RelayPort == 0 && n.RelayPorts != 0 || n.RelayPort != 0 && (n.RelayPorts < 2 || int(n.RelayPort)+int(n.RelayPorts) > 65536) {
		return invalid("node %s: relay ports %d+%d out of range", n.Name, n.RelayPort, n.RelayPorts)
	}
	return nil
}

// usableAddrPort: an address and port a packet can be sent to.
func usableAddrPort(a netip.AddrPort) bool {
	ip := a.Addr()
	return a.Port() != 0 && ip.IsValid() && !ip.IsUnspecified() && !ip.IsMulticast() && ip.Zone() == ""
}

func (e *NetworkEntry) validate() error {
	if err := catalog.ValidName(e.Node); err != nil {
		return invalid("%v", err)
	}
	if err := catalog.ValidSubnet(e.Subnet); err != nil {
		return invalid("%v", err)
	}
	if e.Version == 0 || e.Version > maxVersion {
		return invalid("entry %s/%s: version %d out of range", e.Node, e.Subnet, e.Version)
	}
	if e.Endpoints < 0 || e.Endpoints > maxEndpoints {
		return invalid("entry %s/%s: endpoint count out of range", e.Node, e.Subnet)
	}
	if e.Seen.IsValid() && !usableAddrPort(e.Seen) {
		return invalid("entry %s/%s: bad public address %s", e.Node, e.Subnet, e.Seen)
	}
	if len(e.Relay) > MaxRelayWants {
		return invalid("entry %s/%s: %d relay wishes", e.Node, e.Subnet, len(e.Relay))
	}
	for peer, w := range e.Relay {
		if catalog.ValidName(peer) != nil || peer == e.Node || w.Via != "" && (catalog.ValidName(w.Via) != nil || w.Via == e.Node || w.Via == peer) ||
			w.Tries < 0 || w.Tries > maxTries {
			return invalid("entry %s/%s: bad relay wish for %q", e.Node, e.Subnet, peer)
		}
	}
	return nil
}

func (r *RelaySession) Validate() error {
	for _, n := range []string{r.Relay, r.A, r.B} {
		if err := catalog.ValidName(n); err != nil {
			return invalid("relay session: %v", err)
		}
	}
	if err := catalog.ValidSubnet(r.Subnet); err != nil {
		return invalid("relay session: %v", err)
	}
	if r.A >= r.B || r.Relay == r.A || r.Relay == r.B {
		return invalid("relay session %s: bad pair %s, %s", r.Relay, r.A, r.B)
	}
	if r.Version == 0 || r.Version > maxVersion {
		return invalid("relay session %s: version %d out of range", r.Relay, r.Version)
	}
	if r.MTU < 0 || r.MTU > 65535 {
		return invalid("relay session %s: MTU %d out of range", r.Relay, r.MTU)
	}
	return nil
}

func (o *Observation) validate() error {
	if err := catalog.ValidName(o.Observer); err != nil {
		return invalid("observation: %v", err)
	}
	if err := catalog.ValidName(o.Subject); err != nil || o.Subject == o.Observer {
		return invalid("observation by %s: bad subject %q", o.Observer, o.Subject)
	}
	if o.Version == 0 || o.Version > maxVersion {
		return invalid("observation by %s: version %d out of range", o.Observer, o.Version)
	}
	if o.Gossip.IsValid() && !usableAddrPort(o.Gossip) {
		return invalid("observation by %s: bad address %s", o.Observer, o.Gossip)
	}
	if len(o.WG) > MaxRelayWants {
		return invalid("observation by %s: %d networks", o.Observer, len(o.WG))
	}
	for s, a := range o.WG {
		if catalog.ValidSubnet(s) != nil || !usableAddrPort(a) {
			return invalid("observation by %s: bad WireGuard sighting %s %s", o.Observer, s, a)
		}
	}
	return nil
}
