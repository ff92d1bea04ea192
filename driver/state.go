package driver

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/wgmesh/wgmesh/internal/durable"
)

// State is what this host must remember across restarts of the agent and
// of Docker: Docker replays none of its network calls after a restart,
// and the addresses given to running containers must stay theirs.
type State struct {
	Pools     map[string]*Pool     `json:"pools"`
	Networks  map[string]*Network  `json:"networks"`
	Endpoints map[string]*Endpoint `json:"endpoints"`
}

// Pool is an IPAM pool: one subnet (and optionally a range of it) that a
// Docker network on this host allocates from.
type Pool struct {
	ID      string       `json:"id"`
	Subnet  netip.Prefix `json:"subnet"`
	Range   netip.Prefix `json:"range,omitzero"`
	Options PoolOptions  `json:"options"`
	// Allocated are addresses handed out on this host.
	Allocated map[netip.Addr]Allocation `json:"allocated"`
	// Requests counts RequestPool calls not yet released: the IPAM
	// protocol gives identical requests the same pool.
	Requests int `json:"requests,omitempty"`
}

// Allocation says what holds an address.
type Allocation string

const (
	// AllocGateway is a gateway taken from a block of this host, as
	// networks made before the catalog had (see catalog.EnsureNetwork).
	AllocGateway  Allocation = "gateway"
	AllocAux      Allocation = "aux"
	AllocEndpoint Allocation = "endpoint"
	// AllocSharedGateway is the network's gateway: the same address on
	// every host, reserved in the catalog rather than taken from a block.
	AllocSharedGateway Allocation = "shared-gateway"
)

// Network is a wgmesh network on this host.
type Network struct {
	ID      string         `json:"id"`
	Subnet  netip.Prefix   `json:"subnet"`
	PoolID  string         `json:"pool_id"`
	Gateway netip.Addr     `json:"gateway"`
	Port    uint16         `json:"port"`
	MTU     int            `json:"mtu"`
	Options NetworkOptions `json:"options"`
}

// Endpoint is a container's attachment on this host.
type Endpoint struct {
	ID        string       `json:"id"`
	NetworkID string       `json:"network_id"`
	Addr      netip.Prefix `json:"addr"`
	MAC       string       `json:"mac"`
	// IfName is the container interface name asked for with
	// --network name=N,driver-opt=com.docker.network.endpoint.ifname=IF
	// (honoured by Docker Engine 28 and later).
	IfName string `json:"ifname,omitempty"`
	// Joined is set once its veth pair exists; JoinedAt is when.
	Joined   bool      `json:"joined,omitempty"`
	JoinedAt time.Time `json:"joined_at,omitzero"`
	// SandboxKey is the container's network namespace as Docker named
	// it at Join: a path in dockerd's mount namespace, which may not be
	// the agent's.
	SandboxKey string `json:"sandbox_key,omitempty"`
	// CtrIfName is the name Docker gave the container end of the veth
	// pair inside the container, learnt after Join; a repair reuses it.
	CtrIfName string `json:"container_ifname,omitempty"`
}

// containerIfName is the name of the endpoint's interface in its
// container, "" if not known.
func (e *Endpoint) containerIfName() string {
	if e.CtrIfName != "" {
		return e.CtrIfName
	}
	return e.IfName
}

func newState() *State {
	return &State{Pools: map[string]*Pool{}, Networks: map[string]*Network{}, Endpoints: map[string]*Endpoint{}}
}

// loadState reads the state file; a missing one is an empty state.
func loadState(path string) (*State, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return newState(), nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading driver state: %w", err)
	}
	s := newState()
	if err := json.Unmarshal(b, s); err != nil {
		return nil, fmt.Errorf("reading driver state %s: %w", path, err)
	}
	for _, p := range s.Pools {
		if p.Allocated == nil {
			p.Allocated = map[netip.Addr]Allocation{}
		}
		p.Requests = max(p.Requests, 1)
	}
	return s, nil
}

// save writes the state durably: Docker is told of an address only once
// it is on disk, or a crash could hand it out twice.
func (s *State) save(path string) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding driver state: %w", err)
	}
	if err := durable.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("writing driver state: %w", err)
	}
	return nil
}

// networkBySubnet finds the local network of a subnet.
func (s *State) networkBySubnet(subnet netip.Prefix) *Network {
	for _, n := range s.Networks {
		if n.Subnet == subnet {
			return n
		}
	}
	return nil
}

// endpointsOf lists a network's endpoints, sorted by ID.
func (s *State) endpointsOf(netID string) []*Endpoint {
	var out []*Endpoint
	for _, e := range s.Endpoints {
		if e.NetworkID == netID {
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(a, b *Endpoint) int {
		switch {
		case a.ID < b.ID:
			return -1
		case a.ID > b.ID:
			return 1
		}
		return 0
	})
	return out
}

// hostGateways reports whether the pool's network gives each host a
// gateway from a block of its own: networks made before the catalog.
func (p *Pool) hostGateways() bool {
	for _, kind := range p.Allocated {
		if kind == AllocGateway {
			return true
		}
	}
	return false
}

// usable reports whether addr may go to a container or gateway: inside
// the subnet and not its network or broadcast address.
func (p *Pool) usable(addr netip.Addr) bool {
	if !p.Subnet.Contains(addr) || addr == p.Subnet.Addr() {
		return false
	}
	return addr != lastAddr(p.Subnet)
}

// preferred reports whether addr is a good pick for dynamic allocation:
// addresses ending in .0 or .255 are valid inside a larger subnet, but
// people and some tools take them for network or broadcast addresses.
func preferred(addr netip.Addr) bool {
	last := addr.As4()[3]
	return last != 0 && last != 255
}

// inRange reports whether addr is in the pool's --ip-range, if any.
func (p *Pool) inRange(addr netip.Addr) bool {
	return !p.Range.IsValid() || p.Range.Contains(addr)
}

// firstFree returns the lowest address of blocks that is usable, in
// range, not allocated here and not reserved anywhere in the cluster.
func (p *Pool) firstFree(blocks []netip.Prefix, reserved []netip.Addr) (netip.Addr, bool) {
	blocks = slices.Clone(blocks)
	slices.SortFunc(blocks, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	for _, b := range blocks {
		for a := b.Addr(); b.Contains(a); a = a.Next() {
			if !p.usable(a) || !preferred(a) || !p.inRange(a) || slices.Contains(reserved, a) {
				continue
			}
			if _, taken := p.Allocated[a]; !taken {
				return a, true
			}
		}
	}
	return netip.Addr{}, false
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v |= host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
