package driver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/docker/go-plugins-helpers/ipam"

	"github.com/wgmesh/wgmesh/mesh"
)

// Address spaces wgmesh answers GetDefaultAddressSpaces with. A network's
// IPv4Data carries its address space, which tells CreateNetwork whether
// the network's addresses came from wgmesh's IPAM.
const (
	AddressSpace       = "wgmesh"
	GlobalAddressSpace = "wgmesh-global"
)

// libnetwork option keys in RequestAddress.
const (
	optRequestAddressType = "RequestAddressType"
	addressTypeGateway    = "com.docker.network.gateway"
	optMACAddress         = "com.docker.network.endpoint.macaddress"
)

const poolIDPrefix = "wgmesh:"

// IpamCapabilities answers IpamDriver.GetCapabilities. Asking Docker for a
// MAC address is how wgmesh tells a container's request for a fixed
// address (--ip, which comes with the MAC) from an --aux-address (which
// comes with no options at all).
func (d *Driver) IpamCapabilities() *ipam.CapabilitiesResponse {
	return &ipam.CapabilitiesResponse{RequiresMACAddress: true}
}

// DefaultAddressSpaces answers IpamDriver.GetDefaultAddressSpaces.
func (d *Driver) DefaultAddressSpaces() *ipam.AddressSpacesResponse {
	return &ipam.AddressSpacesResponse{LocalDefaultAddressSpace: AddressSpace, GlobalDefaultAddressSpace: GlobalAddressSpace}
}

// RequestPool registers a network's subnet on this host.
func (d *Driver) RequestPool(ctx context.Context, req *ipam.RequestPoolRequest) (*ipam.RequestPoolResponse, error) {
	if req.V6 {
		return nil, invalidParam("wgmesh networks are IPv4 only; create the network without --ipv6")
	}
	subnet, err := parseSubnet(req.Pool)
	if err != nil {
		return nil, err
	}
	var rng netip.Prefix
	if req.SubPool != "" {
		rng, err = netip.ParsePrefix(req.SubPool)
		if err != nil {
			return nil, invalidParam("ip-range %q: %v", req.SubPool, err)
		}
		rng = rng.Masked()
		if rng.Bits() < subnet.Bits() || !subnet.Contains(rng.Addr()) {
			return nil, invalidParam("ip-range %s is not inside subnet %s", rng, subnet)
		}
	}
	opts, err := parsePoolOptions(req.Options, subnet)
	if err != nil {
		return nil, err
	}
	id := poolIDPrefix + subnet.String()
	if rng.IsValid() {
		id += ":" + rng.String()
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	for _, p := range d.state.Pools {
		if p.Subnet.Overlaps(subnet) {
			return nil, forbidden("subnet %s overlaps %s of another wgmesh network on this host; "+
				"a subnet is one network across the whole mesh", subnet, p.Subnet)
		}
	}
	d.state.Pools[id] = &Pool{ID: id, Subnet: subnet, Range: rng, Options: opts, Allocated: map[netip.Addr]Allocation{}}
	if err := d.saveLocked(); err != nil {
		delete(d.state.Pools, id)
		return nil, err
	}
	d.log.Info("address pool registered", "pool", id)
	return &ipam.RequestPoolResponse{PoolID: id, Pool: subnet.String(), Data: map[string]string{}}, nil
}

// ReleasePool gives up a pool and the blocks it held.
func (d *Driver) ReleasePool(ctx context.Context, req *ipam.ReleasePoolRequest) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.state.Pools[req.PoolID]
	if !ok {
		// Docker retries cleanups; releasing twice is not an error.
		return nil
	}
	if n := d.state.networkBySubnet(p.Subnet); n != nil && len(d.state.endpointsOf(n.ID)) > 0 {
		return forbidden("pool %s still has endpoints on this host", req.PoolID)
	}
	delete(d.state.Pools, req.PoolID)
	if err := d.saveLocked(); err != nil {
		d.state.Pools[req.PoolID] = p
		return err
	}
	if blocks := d.cfg.Mesh.View().OwnBlocks(p.Subnet); len(blocks) > 0 {
		d.cfg.Mesh.ReleaseBlocks(p.Subnet, blocks...)
	}
	d.log.Info("address pool released", "pool", req.PoolID)
	return nil
}

// RequestAddress hands out an address: the gateway, an aux address, or a
// container's, fixed (--ip) or not.
func (d *Driver) RequestAddress(ctx context.Context, req *ipam.RequestAddressRequest) (*ipam.RequestAddressResponse, error) {
	var want netip.Addr
	if req.Address != "" {
		a, err := netip.ParseAddr(req.Address)
		if err != nil {
			return nil, invalidParam("address %q: %v", req.Address, err)
		}
		want = a
	}
	kind := AllocEndpoint
	switch {
	case req.Options[optRequestAddressType] == addressTypeGateway:
		kind = AllocGateway
		if want.IsValid() {
			kind = AllocSharedGateway
		}
	case want.IsValid() && req.Options[optMACAddress] == "":
		kind = AllocAux
	}

	addr, err := d.allocate(ctx, req.PoolID, want, kind)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	p := d.state.Pools[req.PoolID]
	if p == nil {
		return nil, notFound("pool %s was released meanwhile", req.PoolID)
	}
	return &ipam.RequestAddressResponse{Address: netip.PrefixFrom(addr, p.Subnet.Bits()).String(), Data: map[string]string{}}, nil
}

// allocate records an address of the given kind in a pool, claiming a new
// block from the mesh when this host's blocks are full.
func (d *Driver) allocate(ctx context.Context, poolID string, want netip.Addr, kind Allocation) (netip.Addr, error) {
	// Each pass either allocates or claims a block; claims are bounded by
	// the subnet's size and ctx by the request's deadline.
	for {
		d.mu.Lock()
		p, ok := d.state.Pools[poolID]
		if !ok {
			d.mu.Unlock()
			return netip.Addr{}, notFound("no wgmesh address pool %s on this host", poolID)
		}
		addr, needBlock, err := d.pickLocked(p, want, kind)
		if err == nil && !needBlock {
			p.Allocated[addr] = kind
			if err := d.saveLocked(); err != nil {
				delete(p.Allocated, addr)
				d.mu.Unlock()
				return netip.Addr{}, err
			}
			if kind == AllocAux || kind == AllocSharedGateway {
				d.publishReservedLocked(p)
			}
			d.mu.Unlock()
			return addr, nil
		}
		subnet, rng, bits := p.Subnet, p.Range, p.blockBits()
		d.mu.Unlock()
		if err != nil {
			return netip.Addr{}, err
		}
		// Claim outside the lock: it waits for the cluster. Concurrent
		// requests of the same pool share one claim.
		req := mesh.BlockRequest{Subnet: subnet, Bits: bits, Within: rng}
		key := poolID
		if want.IsValid() {
			req.Containing, req.Within = want, netip.Prefix{}
			key += "/" + want.String()
		}
		_, err, _ = d.claims.Do(key, func() (any, error) {
			cctx, cancel := context.WithTimeout(ctx, d.cfg.ClaimTimeout)
			defer cancel()
			return d.cfg.Mesh.ClaimBlock(cctx, req)
		})
		if err != nil {
			if errors.Is(err, mesh.ErrBlockTaken) {
				return netip.Addr{}, forbidden("address %s: %v", want, err)
			}
			if errors.Is(err, mesh.ErrNoFreeBlock) {
				return netip.Addr{}, forbidden("network %s is full: %v", subnet, err)
			}
			return netip.Addr{}, &Error{KindSystem, fmt.Errorf("getting an address block of %s: %w", subnet, err)}
		}
	}
}

// pickLocked chooses the address to allocate, or says that a block must
// be claimed first.
func (d *Driver) pickLocked(p *Pool, want netip.Addr, kind Allocation) (addr netip.Addr, needBlock bool, err error) {
	v := d.cfg.Mesh.View()
	reserved := v.Reserved(p.Subnet)
	own := v.OwnBlocks(p.Subnet)
	if !want.IsValid() {
		if a, ok := p.firstFree(own, reserved); ok {
			return a, false, nil
		}
		return netip.Addr{}, true, nil
	}
	if !p.Subnet.Contains(want) {
		return netip.Addr{}, false, invalidParam("address %s is not in subnet %s", want, p.Subnet)
	}
	if !p.usable(want) {
		return netip.Addr{}, false, invalidParam("address %s is the network or broadcast address of %s", want, p.Subnet)
	}
	if holder, taken := p.Allocated[want]; taken {
		return netip.Addr{}, false, forbidden("address %s is already in use on this host (%s)", want, holder)
	}
	if kind == AllocAux || kind == AllocSharedGateway {
		// Reserved everywhere; it need not lie in a block of ours.
		return want, false, nil
	}
	for _, r := range reserved {
		if r == want {
			return netip.Addr{}, false, forbidden("address %s is reserved in %s (an --aux-address or --gateway of some host)", want, p.Subnet)
		}
	}
	for _, b := range own {
		if b.Contains(want) {
			return want, false, nil
		}
	}
	return netip.Addr{}, true, nil
}

// publishReservedLocked tells the mesh which addresses this host reserves.
func (d *Driver) publishReservedLocked(p *Pool) {
	if n := d.state.networkBySubnet(p.Subnet); n != nil {
		if err := d.cfg.Mesh.Attach(n.Subnet, n.Port, p.reserved()); err != nil {
			d.log.Warn("publishing reserved addresses", "err", err)
		}
	}
}

// ReleaseAddress returns an address to the pool.
func (d *Driver) ReleaseAddress(ctx context.Context, req *ipam.ReleaseAddressRequest) error {
	addr, err := parseAddrMaybeCIDR(req.Address)
	if err != nil {
		return invalidParam("address %q: %v", req.Address, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.state.Pools[req.PoolID]
	if !ok {
		return nil
	}
	kind, ok := p.Allocated[addr]
	if !ok {
		return nil
	}
	delete(p.Allocated, addr)
	if err := d.saveLocked(); err != nil {
		p.Allocated[addr] = kind
		return err
	}
	if kind == AllocAux || kind == AllocSharedGateway {
		d.publishReservedLocked(p)
	}
	return nil
}

// parseAddrMaybeCIDR accepts "10.0.0.1" or "10.0.0.1/16".
func parseAddrMaybeCIDR(s string) (netip.Addr, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		return p.Addr(), err
	}
	return netip.ParseAddr(s)
}
