package driver

import (
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/wgmesh/wgmesh/driver/dataplane"
)

// Option labels wgmesh understands.
const (
	optMTU       = "com.docker.network.driver.mtu"
	optBlockSize = "wgmesh.block-size"

	dockerGeneric  = "com.docker.network.generic"
	dockerIPv6     = "com.docker.network.enable_ipv6"
	dockerIPv4     = "com.docker.network.enable_ipv4"
	dockerInternal = "com.docker.network.internal"
)

// NetworkOptions are what `docker network create -o` set.
type NetworkOptions struct {
	// MTU of the network's interfaces; 0 means derived from the underlay.
	MTU      int  `json:"mtu,omitempty"`
	Internal bool `json:"internal,omitempty"`
}

// parseNetworkOptions parses CreateNetwork's Options. Each error names the
// label it is about.
func parseNetworkOptions(opts map[string]any) (NetworkOptions, error) {
	var o NetworkOptions
	for k, v := range opts {
		switch k {
		case dockerIPv6:
			if b, ok := v.(bool); !ok {
				return o, invalidParam("option %s must be a boolean, got %T", k, v)
			} else if b {
				return o, invalidParam("option %s=true: wgmesh networks are IPv4 only; create the network without --ipv6", k)
			}
		case dockerIPv4:
			if b, ok := v.(bool); !ok {
				return o, invalidParam("option %s must be a boolean, got %T", k, v)
			} else if !b {
				return o, invalidParam("option %s=false: wgmesh networks are IPv4 networks; create the network without --ipv4=false", k)
			}
		case dockerInternal:
			b, ok := v.(bool)
			if !ok {
				return o, invalidParam("option %s must be a boolean, got %T", k, v)
			}
			o.Internal = b
		case dockerGeneric:
			if v == nil {
				continue
			}
			generic, ok := v.(map[string]any)
			if !ok {
				return o, invalidParam("option %s must be an object, got %T", k, v)
			}
			if err := o.parseGeneric(generic); err != nil {
				return o, err
			}
		}
	}
	return o, nil
}

func (o *NetworkOptions) parseGeneric(generic map[string]any) error {
	for _, k := range slices.Sorted(maps.Keys(generic)) {
		v := generic[k]
		s, ok := v.(string)
		if !ok {
			return invalidParam("option %s must be a string, got %T", k, v)
		}
		switch {
		case k == dockerIPv6 || k == dockerIPv4:
			// Given with -o. Engine 29 reads these as --ipv6 and --ipv4
			// (and asks for an IPv6 pool, or none for IPv4, which fails
			// anyway); 20.10 ignores them and passes them on, so refuse
			// them here alike rather than create a network that is not
			// what was asked for.
			b, err := strconv.ParseBool(strings.TrimSpace(s))
			switch {
			case err != nil:
				return invalidParam("option %s=%q: not a boolean", k, s)
			case k == dockerIPv6 && b:
				return invalidParam("option %s=true: wgmesh networks are IPv4 only; create the network without it", k)
			case k == dockerIPv4 && !b:
				return invalidParam("option %s=false: wgmesh networks are IPv4 networks; create the network without it", k)
			}
		case k == optMTU:
			mtu, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil {
				return invalidParam("option %s=%q: not a number", k, s)
			}
			if mtu < dataplane.MinMTU || mtu > dataplane.MaxMTU {
				return invalidParam("option %s=%d: MTU must be between %d and %d", k, mtu, dataplane.MinMTU, dataplane.MaxMTU)
			}
			o.MTU = mtu
		case strings.HasPrefix(k, "wgmesh."), strings.HasPrefix(k, "com.docker.network.driver."):
			return invalidParam("unknown option %s (wgmesh understands -o %s)", k, optMTU)
		}
	}
	return nil
}

// PoolOptions are what `--ipam-opt` set.
type PoolOptions struct {
	// BlockBits is the prefix length of the blocks each host claims; 0
	// means catalog.DefaultBlockBits.
	BlockBits int `json:"block_bits,omitempty"`
}

func parsePoolOptions(opts map[string]string, subnet netip.Prefix) (PoolOptions, error) {
	var o PoolOptions
	for _, k := range slices.Sorted(maps.Keys(opts)) {
		v := opts[k]
		switch {
		case k == optBlockSize:
			bits, err := strconv.Atoi(strings.TrimPrefix(strings.TrimSpace(v), "/"))
			if err != nil {
				return o, invalidParam("ipam option %s=%q: want a prefix length such as 24", k, v)
			}
			if bits < subnet.Bits() || bits > maxBlockBits {
				return o, invalidParam("ipam option %s=/%d: blocks must be between /%d (the subnet) and /%d", k, bits, subnet.Bits(), maxBlockBits)
			}
			if bits-subnet.Bits() > 16 {
				return o, invalidParam("ipam option %s=/%d: splits %s into more than 65536 blocks", k, bits, subnet)
			}
			o.BlockBits = bits
		case strings.HasPrefix(k, "wgmesh."):
			return o, invalidParam("unknown ipam option %s (wgmesh understands --ipam-opt %s)", k, optBlockSize)
		}
	}
	return o, nil
}

// maxBlockBits: a /30 holds four addresses, the smallest useful block.
const maxBlockBits = 30

// parseSubnet parses the --subnet Docker passed to RequestPool.
func parseSubnet(s string) (netip.Prefix, error) {
	if s == "" {
		return netip.Prefix{}, invalidParam("wgmesh needs --subnet: the subnet is what identifies a wgmesh network " +
			"on every host, since Docker gives the same network a different ID on each one")
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, invalidParam("subnet %q: %v", s, err)
	}
	if !p.Addr().Is4() {
		return netip.Prefix{}, invalidParam("subnet %s: wgmesh networks are IPv4 only", p)
	}
	if p.Masked() != p {
		return netip.Prefix{}, invalidParam("subnet %s has host bits set; did you mean %s?", p, p.Masked())
	}
	if p.Bits() > 28 {
		return netip.Prefix{}, invalidParam("subnet %s is too small; wgmesh needs at least a /28 so hosts can own blocks of it", p)
	}
	if p.Bits() < 8 {
		return netip.Prefix{}, invalidParam("subnet %s is too large; use /8 or smaller", p)
	}
	return p, nil
}
