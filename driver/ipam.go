package driver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/docker/go-plugins-helpers/ipam"

	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/mesh/catalog"
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

// RequestPool registers a network's subnet on this host. Identical
// requests get the same pool, as the IPAM protocol asks (Docker Engine 29
// repeats a request in some cases); each is released once.
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
	if p, ok := d.state.Pools[id]; ok && p.Options == opts {
		p.Requests++
		if err := d.saveLocked(); err != nil {
			p.Requests--
			return nil, err
		}
		return &ipam.RequestPoolResponse{PoolID: id, Pool: subnet.String(), Data: map[string]string{}}, nil
	}
	for _, p := range d.state.Pools {
		if p.Subnet.Overlaps(subnet) {
			if n := d.state.networkBySubnet(p.Subnet); n != nil && d.isCopy(n.Subnet) {
				return nil, forbidden("subnet %s is network %s of the wgmesh cluster, which this host is creating by itself right now "+
					"(a network created on one host appears on every host); use it as it is", subnet, d.copyName(n.Subnet))
			}
			return nil, forbidden("subnet %s overlaps %s of another wgmesh network on this host; "+
				"a subnet is one network across the whole mesh", subnet, p.Subnet)
		}
	}
	d.state.Pools[id] = &Pool{ID: id, Subnet: subnet, Range: rng, Options: opts, Allocated: map[netip.Addr]Allocation{}, Requests: 1}
	if err := d.saveLocked(); err != nil {
		delete(d.state.Pools, id)
		return nil, err
	}
	d.log.Info("address pool registered", "pool", id)
	return &ipam.RequestPoolResponse{PoolID: id, Pool: subnet.String(), Data: map[string]string{}}, nil
}

// ReleasePool gives up a pool, once every request of it is released, and
// the blocks this host held in it.
func (d *Driver) ReleasePool(ctx context.Context, req *ipam.ReleasePoolRequest) error {
	d.mu.Lock()
	p, ok := d.state.Pools[req.PoolID]
	if !ok {
		d.mu.Unlock()
		// Docker retries cleanups; releasing twice is not an error.
		return nil
	}
	if p.Requests > 1 {
		p.Requests--
		err := d.saveLocked()
		if err != nil {
			p.Requests++
		}
		d.mu.Unlock()
		return err
	}
	if n := d.state.networkBySubnet(p.Subnet); n != nil && len(d.state.endpointsOf(n.ID)) > 0 {
		d.mu.Unlock()
		return forbidden("pool %s still has endpoints on this host", req.PoolID)
	}
	delete(d.state.Pools, req.PoolID)
	if err := d.saveLocked(); err != nil {
		d.state.Pools[req.PoolID] = p
		d.mu.Unlock()
		return err
	}
	d.mu.Unlock()
	d.log.Info("address pool released", "pool", req.PoolID)
	if blocks := d.cfg.Mesh.View().OwnBlocks(p.Subnet); len(blocks) > 0 {
		// Giving blocks back needs the cluster; a host that cannot reach
		// it keeps them, which wastes addresses but breaks nothing.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.cfg.ClaimTimeout)
		defer cancel()
		if err := d.cfg.Mesh.ReleaseBlocks(cctx, p.Subnet, blocks...); err != nil {
			d.log.Warn("giving back address blocks", "network", p.Subnet, "err", err)
		}
	}
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
		kind = AllocSharedGateway
	case want.IsValid() && req.Options[optMACAddress] == "":
		kind = AllocAux
	}

	var addr netip.Addr
	var err error
	switch kind {
	case AllocSharedGateway:
		addr, err = d.gateway(ctx, req.PoolID, want)
	case AllocAux:
		addr, err = d.aux(ctx, req.PoolID, want)
	default:
		addr, err = d.allocate(ctx, req.PoolID, want, kind)
	}
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

// ensureNetwork makes sure the cluster's catalog has the pool's network
// (a network the catalog has needs no consensus), with gateway gw unless
// the network gives each host a gateway of its own.
func (d *Driver) ensureNetwork(ctx context.Context, poolID string, gw netip.Addr) (*catalog.Network, error) {
	d.mu.Lock()
	p, ok := d.state.Pools[poolID]
	if !ok {
		d.mu.Unlock()
		return nil, notFound("no wgmesh address pool %s on this host", poolID)
	}
	e := catalog.EnsureNetwork{Subnet: p.Subnet, BlockBits: p.Options.BlockBits, Gateway: gw, HostGateways: p.hostGateways()}
	if e.HostGateways {
		e.Gateway = netip.Addr{}
	}
	d.mu.Unlock()
	cctx, cancel := context.WithTimeout(ctx, d.cfg.ClaimTimeout)
	defer cancel()
	n, err := d.cfg.Mesh.EnsureNetwork(cctx, e)
	if err != nil {
		return nil, meshError(fmt.Sprintf("creating network %s in the cluster", e.Subnet), err)
	}
	return n, nil
}

// reserveAux reserves the pool's aux addresses in the cluster's network.
func (d *Driver) reserveAux(ctx context.Context, poolID string, n *catalog.Network) error {
	d.mu.Lock()
	var aux []netip.Addr
	if p, ok := d.state.Pools[poolID]; ok {
		for a, kind := range p.Allocated {
			if kind == AllocAux && !slices.Contains(n.Aux, a) {
				aux = append(aux, a)
			}
		}
	}
	d.mu.Unlock()
	slices.SortFunc(aux, netip.Addr.Compare)
	for _, a := range aux {
		cctx, cancel := context.WithTimeout(ctx, d.cfg.ClaimTimeout)
		err := d.cfg.Mesh.Reserve(cctx, n.Subnet, a)
		cancel()
		if err != nil {
			return meshError("reserving aux address "+a.String(), err)
		}
	}
	return nil
}

// gateway answers a gateway request. Every host gives the network the
// same gateway, reserved in the catalog, so a host that runs no container
// on a network takes no block for it: the catalog's if it has the
// network, else the one asked for or the subnet's first address, which
// CreateNetwork records. Networks made before the catalog keep giving
// each host a gateway from a block of its own.
func (d *Driver) gateway(ctx context.Context, poolID string, want netip.Addr) (netip.Addr, error) {
	d.mu.Lock()
	p, ok := d.state.Pools[poolID]
	if !ok {
		d.mu.Unlock()
		return netip.Addr{}, notFound("no wgmesh address pool %s on this host", poolID)
	}
	subnet := p.Subnet
	d.mu.Unlock()
	gw := subnet.Addr().Next()
	if want.IsValid() {
		gw = want
	}
	if n := d.cfg.Mesh.View().Network(subnet); n != nil {
		if !n.Gateway.IsValid() {
			return d.allocate(ctx, poolID, want, AllocGateway)
		}
		if want.IsValid() && want != n.Gateway {
			return netip.Addr{}, forbidden("network %s exists in the cluster with gateway %s: create it with --gateway %s, or without --gateway",
				n.Subnet, n.Gateway, n.Gateway)
		}
		gw = n.Gateway
	}
	return d.record(poolID, gw, AllocSharedGateway)
}

// aux records an --aux-address, reserved in the whole cluster: at once
// if the cluster has the network, else by CreateNetwork.
func (d *Driver) aux(ctx context.Context, poolID string, want netip.Addr) (netip.Addr, error) {
	d.mu.Lock()
	var refusal error
	var subnet netip.Prefix
	if p := d.state.Pools[poolID]; p != nil {
		subnet = p.Subnet
		if kind, taken := p.Allocated[want]; taken && kind != AllocAux {
			refusal = forbidden("address %s is already in use on this host (%s)", want, kind)
		} else if !p.usable(want) {
			refusal = invalidParam("aux address %s is not a usable address of %s", want, p.Subnet)
		}
	}
	d.mu.Unlock()
	if refusal != nil {
		return netip.Addr{}, refusal
	}
	if n := d.cfg.Mesh.View().Network(subnet); n != nil {
		cctx, cancel := context.WithTimeout(ctx, d.cfg.ClaimTimeout)
		defer cancel()
		if err := d.cfg.Mesh.Reserve(cctx, subnet, want); err != nil {
			return netip.Addr{}, meshError("reserving an aux address", err)
		}
	}
	return d.record(poolID, want, AllocAux)
}

// record notes an address that needs no block of this host.
func (d *Driver) record(poolID string, addr netip.Addr, kind Allocation) (netip.Addr, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, ok := d.state.Pools[poolID]
	if !ok {
		return netip.Addr{}, notFound("no wgmesh address pool %s on this host", poolID)
	}
	if have, taken := p.Allocated[addr]; taken {
		if have == kind {
			return addr, nil
		}
		return netip.Addr{}, forbidden("address %s is already in use on this host (%s)", addr, have)
	}
	p.Allocated[addr] = kind
	if err := d.saveLocked(); err != nil {
		delete(p.Allocated, addr)
		return netip.Addr{}, err
	}
	return addr, nil
}

// allocate records an address of the given kind in a pool, claiming a new
// block from the cluster when this host's blocks are full.
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
		addr, needBlock, err := d.pickLocked(p, want)
		if err == nil && !needBlock {
			p.Allocated[addr] = kind
			if err := d.saveLocked(); err != nil {
				delete(p.Allocated, addr)
				d.mu.Unlock()
				return netip.Addr{}, err
			}
			d.mu.Unlock()
			return addr, nil
		}
		subnet, rng := p.Subnet, p.Range
		d.mu.Unlock()
		if err != nil {
			return netip.Addr{}, err
		}
		if _, err := d.ensureNetwork(ctx, poolID, netip.Addr{}); err != nil {
			return netip.Addr{}, err
		}
		// Claim outside the lock: it waits for the cluster. Concurrent
		// requests of the same pool share one claim.
		req := mesh.BlockRequest{Subnet: subnet, Within: rng}
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
			if want.IsValid() && errors.Is(err, mesh.ErrBlockTaken) {
				return netip.Addr{}, forbidden("address %s: %v", want, err)
			}
			return netip.Addr{}, meshError(fmt.Sprintf("getting an address block of %s", subnet), err)
		}
	}
}

// meshError turns an error of the cluster into one Docker shows.
func meshError(what string, err error) error {
	switch {
	case errors.Is(err, mesh.ErrNoFreeBlock):
		return forbidden("%s: the network is full: %v", what, err)
	case errors.Is(err, mesh.ErrBlockTaken), errors.Is(err, mesh.ErrNetworkConflict):
		return forbidden("%s: %v", what, err)
	case errors.Is(err, catalog.ErrInvalid):
		return invalidParam("%s: %v", what, err)
	case errors.Is(err, mesh.ErrUnreachable):
		return &Error{KindSystem, fmt.Errorf("%s: the cluster's members are up, but this host's consensus connections to them time out: "+
			"packets are lost on the way (see `wgmesh status`); networks already here keep working: %w", what, err)}
	case errors.Is(err, mesh.ErrNoLeader):
		return &Error{KindSystem, fmt.Errorf("%s: no quorum: the cluster's leader cannot be reached, because most of its voters are down "+
			"or cut off from this host (see `wgmesh status`); networks already here keep working: %w", what, err)}
	case errors.Is(err, mesh.ErrNotMember):
		return &Error{KindSystem, fmt.Errorf("%s: this host is not a member of the wgmesh cluster yet (see `wgmesh status`): %w", what, err)}
	}
	return &Error{KindSystem, fmt.Errorf("%s: %w", what, err)}
}

// pickLocked chooses the address to allocate, or says that a block must
// be claimed first.
func (d *Driver) pickLocked(p *Pool, want netip.Addr) (addr netip.Addr, needBlock bool, err error) {
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
	for _, r := range reserved {
		if r == want {
			return netip.Addr{}, false, forbidden("address %s is reserved in %s (the gateway or an --aux-address of the network)", want, p.Subnet)
		}
	}
	for _, b := range own {
		if b.Contains(want) {
			return want, false, nil
		}
	}
	return netip.Addr{}, true, nil
}

// ReleaseAddress returns an address to the pool. Reservations in the
// catalog (the gateway, aux addresses) stay: other hosts have the network
// too.
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
