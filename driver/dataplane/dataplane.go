// Package dataplane describes what a host's wgmesh data plane should look
// like and the interface that makes it so. The linux subpackage implements
// it with network namespaces, WireGuard and veth pairs; dataplanetest has
// a recording fake.
//
// Each wgmesh network gets, on each host that has it, a network namespace
// of its own holding the network's WireGuard link, the host ends of its
// containers' veth pairs and its routes:
//
//	 container ns          network ns (one per wgmesh network)          host ns
//	┌────────────┐        ┌──────────────────────────────────────┐
//	│ eth1       │◀─veth─▶│ wgh…  (proxy ARP)                    │
//	│ 10.60.1.5  │        │   10.60.1.5/32 dev wgh…              │
//	└────────────┘        │   10.60.0.0/16 dev wgm… (WireGuard)──┼──UDP──▶ peers
//	                      │   unreachable 10.60.1.0/24 (own block)│
//	                      └──────────────────────────────────────┘
//
// A container only has routes into its own network's namespace, and the
// host namespace has no route into any of them, so networks are isolated
// from each other and from the host without a single firewall rule.
package dataplane

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
)

// Modes of the WireGuard implementation.
const (
	ModeAuto      = "auto"
	ModeKernel    = "kernel"
	ModeUserspace = "userspace"
)

// Config is the desired state of every wgmesh network on this host.
type Config struct {
	PrivateKey crypto.PrivateKey
	Networks   []Network
}

// Network is one wgmesh network on this host.
type Network struct {
	// ID is the network's Docker ID on this host; link and namespace
	// names derive from it.
	ID     string
	Subnet netip.Prefix
	// Gateway is this host's own address in the network. It sits on the
	// WireGuard link and sources ICMP errors (e.g. "fragmentation
	// needed") sent back to containers.
	Gateway    netip.Addr
	MTU        int
	ListenPort uint16
	// LocalBlocks are the blocks this host owns: addresses in them with
	// no endpoint are unreachable rather than sent to a peer.
	LocalBlocks []netip.Prefix
	Peers       []Peer
	// Endpoints are the endpoints joined on this host.
	Endpoints []Endpoint
}

// Peer is another host with the network.
type Peer struct {
	PublicKey  crypto.PublicKey
	Endpoint   netip.AddrPort
	AllowedIPs []netip.Prefix
	Keepalive  time.Duration
	// MTU, if not 0, is the largest packet that reaches the peer through
	// WireGuard, when the path to it is smaller than the network's MTU.
	// The network's namespace routes the peer's allowed IPs with this
	// MTU: a container's larger packet is answered with ICMP
	// "fragmentation needed" when it has DF set, or fragmented before
	// WireGuard, while packets to other peers keep the network's MTU.
	MTU int
	// Generation starts the peer over when it changes: it is removed and
	// added again, which drops its session and makes WireGuard start a
	// handshake at once rather than after its retry timer (up to 5 s).
	// Used when the path to the peer changes (NAT traversal, a relay).
	Generation uint64
}

// Endpoint is a container's attachment to a network.
type Endpoint struct {
	ID   string
	Addr netip.Prefix // the container's address, with the subnet's mask
	MAC  net.HardwareAddr
}

// DataPlane applies desired state to the host.
//
// Implementations are safe for concurrent use, but callers are expected
// to serialise changes (one reconciler owns the data plane).
type DataPlane interface {
	// Apply converges the host to cfg: namespaces, WireGuard links and
	// peers, routes. It removes wgmesh networks that cfg does not list
	// and never touches anything else. It does not create endpoints'
	// veth pairs (CreateEndpoint does) but routes to the ones that exist.
	// Safe to call repeatedly with an unchanged cfg; it reconfigures
	// WireGuard only where something changed, since that can interrupt
	// sessions.
	Apply(ctx context.Context, cfg *Config) error

	// CreateEndpoint creates ep's veth pair: the host end, with proxy ARP
	// and a route, in the namespace of network netID (which Apply must
	// have created), and the container end in the host namespace, where
	// Docker finds it by the returned name and moves it into the
	// container. Idempotent.
	CreateEndpoint(ctx context.Context, netID string, ep Endpoint, mtu int) (ifName string, err error)

	// DeleteEndpoint removes an endpoint's veth pair. Removing one that
	// does not exist succeeds.
	DeleteEndpoint(ctx context.Context, netID, endpointID string) error

	// RepairEndpoint recreates the veth pair of an endpoint whose
	// container lost its interface (the network's namespace was
	// destroyed under it, say), while the container lives on. The host
	// end is made as CreateEndpoint makes it; the container end goes
	// straight into the container's network namespace, sandbox (a path
	// such as /proc/PID/ns/net), as Docker had set it up: named ifName,
	// with ep's MAC and address, mtu, and up. Apply must have created the
	// network. A veth pair of the endpoint that still exists is replaced.
	// An empty ifName takes the first free eth<N>; the name used is
	// returned. It returns ErrNoSandbox if sandbox does not exist.
	RepairEndpoint(ctx context.Context, netID string, ep Endpoint, mtu int, sandbox, ifName string) (string, error)

	// ContainerInterface returns the name the container end of an
	// endpoint's veth pair has inside the container's network namespace,
	// sandbox, once Docker has moved it there; "" until then. It returns
	// ErrNoSandbox if sandbox does not exist.
	ContainerInterface(ctx context.Context, netID, endpointID, sandbox string) (string, error)

	// Status reports each network's WireGuard peers and which endpoints
	// still have their veth pair (a container that died took its end of
	// the pair with it).
	Status(ctx context.Context) ([]NetworkStatus, error)

	// Mode is the WireGuard implementation in use: ModeKernel or
	// ModeUserspace.
	Mode() string

	// Close releases what the process holds. Kernel WireGuard links,
	// namespaces and veth pairs stay, so that containers keep their
	// network while the agent restarts; userspace WireGuard devices live
	// in the process and go with it. Idempotent.
	Close() error
}

// NetworkStatus is the observed state of one network.
type NetworkStatus struct {
	ID        string
	Interface string
	// PublicKey and ListenPort are what the WireGuard link is running with.
	PublicKey  crypto.PublicKey
	ListenPort int
	Peers      []PeerStatus
	// Endpoints lists IDs of endpoints whose veth pair exists.
	Endpoints []string
}

// PeerStatus is WireGuard's view of a peer.
type PeerStatus struct {
	PublicKey     crypto.PublicKey
	Endpoint      netip.AddrPort
	LastHandshake time.Time
	RxBytes       int64
	TxBytes       int64
	AllowedIPs    []netip.Prefix
}

// Interface names are derived from Docker IDs, which are 64 hex digits
// and unique per host; 12 of them keep names within Linux's 15 bytes.
const idChars = 12

func shortID(id string) string {
	if len(id) > idChars {
		return id[:idChars]
	}
	return id
}

// WireGuardName is the WireGuard link of a network.
func WireGuardName(netID string) string { return "wgm" + shortID(netID) }

// HostVethName is the host end of an endpoint's veth pair.
func HostVethName(epID string) string { return "wgh" + shortID(epID) }

// ContainerVethName is the container end of an endpoint's veth pair, as
// named in the host namespace before Docker moves it.
func ContainerVethName(epID string) string { return "wgc" + shortID(epID) }

// ErrNoSandbox says a container's network namespace does not exist: the
// container is gone.
var ErrNoSandbox = errors.New("container network namespace does not exist")

// ErrInvalidID is returned for IDs that cannot name links.
var ErrInvalidID = errors.New("invalid ID")

// ValidID checks a Docker network or endpoint ID: link and namespace names
// are built from it, so it must be plain hex-like text.
func ValidID(id string) error {
	if len(id) < idChars || len(id) > 128 {
		return fmt.Errorf("%w: %q must have %d to 128 characters", ErrInvalidID, id, idChars)
	}
	for _, r := range id {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			return fmt.Errorf("%w: %q has a character other than a letter or digit", ErrInvalidID, id)
		}
	}
	return nil
}

// Validate checks a Network before it is applied.
func (n *Network) Validate() error {
	if err := ValidID(n.ID); err != nil {
		return err
	}
	if !n.Subnet.IsValid() || n.Subnet.Masked() != n.Subnet {
		return fmt.Errorf("network %s: bad subnet %s", shortID(n.ID), n.Subnet)
	}
	if n.Gateway.IsValid() && !n.Subnet.Contains(n.Gateway) {
		return fmt.Errorf("network %s: gateway %s outside %s", shortID(n.ID), n.Gateway, n.Subnet)
	}
	if n.MTU < MinMTU || n.MTU > MaxMTU {
		return fmt.Errorf("network %s: MTU %d outside %d..%d", shortID(n.ID), n.MTU, MinMTU, MaxMTU)
	}
	if n.ListenPort == 0 {
		return fmt.Errorf("network %s: no WireGuard port", shortID(n.ID))
	}
	for _, p := range n.Peers {
		if p.MTU != 0 && (p.MTU < MinMTU || p.MTU > n.MTU) {
			return fmt.Errorf("network %s: peer %s: MTU %d outside %d..%d", shortID(n.ID), p.PublicKey.Short(), p.MTU, MinMTU, n.MTU)
		}
	}
	for _, ep := range n.Endpoints {
		if err := ValidID(ep.ID); err != nil {
			return err
		}
		if !n.Subnet.Contains(ep.Addr.Addr()) {
			return fmt.Errorf("endpoint %s: address %s outside %s", shortID(ep.ID), ep.Addr, n.Subnet)
		}
	}
	return nil
}

// MTU bounds for container interfaces. 576 is the smallest MTU every IPv4
// host must accept; 9000 covers jumbo-frame underlays.
const (
	MinMTU = 576
	MaxMTU = 9000
)

// WireGuard's encapsulation overhead: outer IP header, UDP header, and
// WireGuard's 16-byte header plus 16-byte authentication tag.
const (
	OverheadIPv4 = 20 + 8 + 32
	OverheadIPv6 = 40 + 8 + 32
)

// MTUFor is the container MTU for an underlay MTU, so that an encrypted
// full-size packet still fits the underlay without fragmenting.
func MTUFor(underlayMTU int, underlayIPv6 bool) int {
	if underlayIPv6 {
		return underlayMTU - OverheadIPv6
	}
	return underlayMTU - OverheadIPv4
}

// NetworkError is Apply's failure to converge one network.
type NetworkError struct {
	ID  string
	Err error
}

func (e *NetworkError) Error() string { return fmt.Sprintf("network %s: %v", shortID(e.ID), e.Err) }
func (e *NetworkError) Unwrap() error { return e.Err }

// NetworkErr returns the part of an Apply error that concerns network id:
// its own NetworkError and any error tied to no network, but not other
// networks' failures.
func NetworkErr(err error, id string) error {
	if err == nil {
		return nil
	}
	var parts []error
	if joined, ok := err.(interface{ Unwrap() []error }); ok {
		parts = joined.Unwrap()
	} else {
		parts = []error{err}
	}
	var mine []error
	for _, e := range parts {
		var ne *NetworkError
		if errors.As(e, &ne) && ne.ID != id {
			continue
		}
		mine = append(mine, e)
	}
	return errors.Join(mine...)
}
