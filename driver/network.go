package driver

import (
	"context"
	"crypto/rand"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/wgmesh/wgmesh/driver/dataplane"
)

// capabilities is NetworkDriver.GetCapabilities' answer; go-plugins-helpers'
// type lacks GwAllocChecker, which Docker Engine 28 and later read.
type capabilities struct {
	Scope             string
	ConnectivityScope string
	GwAllocChecker    bool `json:",omitempty"`
}

// Capabilities answers NetworkDriver.GetCapabilities. The scope is local:
// each host's Docker keeps its own copy of the network, with no Swarm and
// no key-value store. Connectivity is global: containers on every host of
// the network reach each other. GwAllocChecker makes newer engines ask
// (GwAllocCheck) whether to allocate a gateway address.
func (d *Driver) Capabilities() *capabilities {
	return &capabilities{Scope: network.LocalScope, ConnectivityScope: network.GlobalScope, GwAllocChecker: true}
}

// gwAllocCheck is NetworkDriver.GwAllocCheck's request and answer.
type gwAllocCheckRequest struct {
	Options map[string]any
}

type gwAllocCheckResponse struct {
	SkipIPv4 bool
	SkipIPv6 bool
}

// GwAllocCheck answers Docker Engine 28+: keep the IPv4 gateway. It costs
// no block (every host shares the network's gateway, reserved in the
// catalog), it sources the ICMP errors the network's namespace sends
// containers, and it makes `docker network inspect` show the same gateway
// on every host whatever its engine. There is no IPv6 to allocate.
func (d *Driver) GwAllocCheck(ctx context.Context, req *gwAllocCheckRequest) (*gwAllocCheckResponse, error) {
	return &gwAllocCheckResponse{SkipIPv4: false, SkipIPv6: true}, nil
}

// CreateNetwork sets the network up on this host: its namespace and
// WireGuard link, its port announced to the mesh. It either completes or
// leaves nothing behind.
func (d *Driver) CreateNetwork(ctx context.Context, req *network.CreateNetworkRequest) error {
	if err := dataplane.ValidID(req.NetworkID); err != nil {
		return invalidParam("network ID: %v", err)
	}
	opts, err := parseNetworkOptions(req.Options)
	if err != nil {
		return err
	}
	if len(req.IPv6Data) > 0 {
		return invalidParam("wgmesh networks are IPv4 only; create the network without IPv6 subnets")
	}
	if len(req.IPv4Data) == 0 {
		return invalidParam("wgmesh networks are IPv4 networks: create the network without --ipv4=false, with --subnet and --ipam-driver wgmesh")
	}
	if len(req.IPv4Data) != 1 || req.IPv4Data[0] == nil {
		return invalidParam("a wgmesh network has exactly one IPv4 subnet, got %d", len(req.IPv4Data))
	}
	data := req.IPv4Data[0]
	if data.AddressSpace != AddressSpace {
		return invalidParam("wgmesh networks need wgmesh's IPAM: create it with --ipam-driver wgmesh (got address space %q)", data.AddressSpace)
	}
	subnet, err := netip.ParsePrefix(data.Pool)
	if err != nil {
		return invalidParam("pool %q: %v", data.Pool, err)
	}
	var gw netip.Addr
	if data.Gateway != "" {
		g, err := parseAddrMaybeCIDR(data.Gateway)
		if err != nil {
			return invalidParam("gateway %q: %v", data.Gateway, err)
		}
		gw = g
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	if n, ok := d.state.Networks[req.NetworkID]; ok {
		if n.Subnet == subnet {
			return nil
		}
		return forbidden("network %s already exists with subnet %s", short(req.NetworkID), n.Subnet)
	}
	pool := d.poolForSubnetLocked(subnet)
	if pool == nil {
		return invalidParam("no wgmesh address pool for %s on this host: create the network with --ipam-driver wgmesh", subnet)
	}
	if other := d.state.networkBySubnet(subnet); other != nil {
		return forbidden("subnet %s is already used by wgmesh network %s on this host", subnet, short(other.ID))
	}
	// The cluster learns of the network only now, once Docker's request
	// has passed every check: a refused creation leaves nothing behind.
	poolID := pool.ID
	d.mu.Unlock()
	cn, err := d.ensureNetwork(ctx, poolID, gw)
	if err == nil {
		err = d.reserveAux(ctx, poolID, cn)
	}
	d.mu.Lock()
	if err != nil {
		return err
	}
	if _, ok := d.state.Networks[req.NetworkID]; ok {
		return forbidden("network %s was created meanwhile", short(req.NetworkID))
	}
	if !gw.IsValid() {
		// A newer engine may skip the gateway; the network's namespace
		// still gets the catalog's.
		gw = cn.Gateway
	}
	mtu := opts.MTU
	if mtu == 0 {
		mtu = d.cfg.DefaultMTU
	}
	n := &Network{
		ID: req.NetworkID, Subnet: subnet, PoolID: pool.ID, Gateway: gw,
		Port: d.freePortLocked(), MTU: mtu, Options: opts,
	}
	d.state.Networks[n.ID] = n
	// Docker takes an error as "no network" and never deletes it, so a
	// failure at any step must undo the steps before it.
	rollback := func(cause error) error {
		delete(d.state.Networks, n.ID)
		if err := d.cfg.Mesh.Attach(subnet, 0); err != nil {
			d.log.Error("rolling back network creation: detaching", "network", short(n.ID), "err", err)
		}
		if err := d.applyLocked(ctx); err != nil {
			d.log.Error("rolling back network creation: data plane", "network", short(n.ID), "err", err)
			d.kickLoop()
		}
		return cause
	}
	if err := d.cfg.Mesh.Attach(subnet, n.Port); err != nil {
		return rollback(err)
	}
	// Only this network's own trouble fails its creation: another
	// network that cannot be set up right now is the loop's to retry.
	if err := dataplane.NetworkErr(d.applyLocked(ctx), n.ID); err != nil {
		return rollback(&Error{KindSystem, fmt.Errorf("setting up network %s: %w", subnet, err)})
	}
	if err := d.saveLocked(); err != nil {
		return rollback(err)
	}
	d.log.Info("network created", "network", short(n.ID), "subnet", subnet, "port", n.Port, "mtu", mtu, "gateway", gw)
	d.kickSync()
	return nil
}

func (d *Driver) poolForSubnetLocked(subnet netip.Prefix) *Pool {
	for _, p := range d.state.Pools {
		if p.Subnet == subnet {
			return p
		}
	}
	return nil
}

// freePortLocked is the lowest WireGuard port no local network uses.
func (d *Driver) freePortLocked() uint16 {
	used := map[uint16]bool{}
	for _, n := range d.state.Networks {
		used[n.Port] = true
	}
	p := d.cfg.PortBase
	for used[p] {
		p++
	}
	return p
}

// DeleteNetwork tears the network down on this host. Docker removes a
// network only once its endpoints are gone; unknown IDs succeed, since
// Docker retries and cleans up after crashes.
func (d *Driver) DeleteNetwork(ctx context.Context, req *network.DeleteNetworkRequest) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	n, ok := d.state.Networks[req.NetworkID]
	if !ok {
		return nil
	}
	endpoints := d.state.endpointsOf(n.ID)
	delete(d.state.Networks, n.ID)
	for _, e := range endpoints {
		delete(d.state.Endpoints, e.ID)
	}
	if err := d.saveLocked(); err != nil {
		// Keep memory and disk in agreement; Docker only logs this.
		d.state.Networks[n.ID] = n
		for _, e := range endpoints {
			d.state.Endpoints[e.ID] = e
		}
		return err
	}
	if err := d.cfg.Mesh.Attach(n.Subnet, 0); err != nil {
		d.log.Warn("detaching network from the mesh", "network", short(n.ID), "err", err)
	}
	d.cfg.Mesh.SetEndpoints(n.Subnet, 0)
	// Removing a network here removes this host's copy only: while the
	// cluster has the network, the sync loop puts it back, so that a
	// `docker network prune` never leaves a host unable to run a
	// container on it. `wgmesh network rm` removes it everywhere.
	d.kickSyncSoon()
	if err := d.applyLocked(ctx); err != nil {
		// The loop retries; the network is gone from our state either way.
		d.log.Error("tearing down network", "network", short(n.ID), "err", err)
		d.kickLoop()
	}
	d.log.Info("network deleted", "network", short(n.ID), "subnet", n.Subnet)
	return nil
}

// CreateEndpoint records a container's endpoint. Docker has already got
// its address from RequestAddress; the veth pair comes with Join.
func (d *Driver) CreateEndpoint(ctx context.Context, req *network.CreateEndpointRequest) (*network.CreateEndpointResponse, error) {
	if err := dataplane.ValidID(req.EndpointID); err != nil {
		return nil, invalidParam("endpoint ID: %v", err)
	}
	if req.Interface == nil || req.Interface.Address == "" {
		return nil, invalidParam("endpoint %s has no IPv4 address; wgmesh endpoints get theirs from --ipam-driver wgmesh", short(req.EndpointID))
	}
	if req.Interface.AddressIPv6 != "" {
		return nil, invalidParam("wgmesh networks are IPv4 only")
	}
	addr, err := netip.ParsePrefix(req.Interface.Address)
	if err != nil {
		return nil, invalidParam("endpoint address %q: %v", req.Interface.Address, err)
	}
	resp := &network.CreateEndpointResponse{}
	mac := req.Interface.MacAddress
	if mac == "" {
		// Docker lets a driver fill in only what it left empty.
		mac = randomMAC().String()
		resp.Interface = &network.EndpointInterface{MacAddress: mac}
	} else if _, err := net.ParseMAC(mac); err != nil {
		return nil, invalidParam("MAC address %q: %v", mac, err)
	}

	d.mu.Lock()
	defer d.mu.Unlock()
	n, ok := d.state.Networks[req.NetworkID]
	if !ok {
		return nil, notFound("network %s is not a wgmesh network on this host", short(req.NetworkID))
	}
	if !n.Subnet.Contains(addr.Addr()) {
		return nil, invalidParam("endpoint address %s is not in %s", addr, n.Subnet)
	}
	if e, ok := d.state.Endpoints[req.EndpointID]; ok {
		if e.Addr == addr {
			return resp, nil
		}
		return nil, forbidden("endpoint %s already exists with address %s", short(req.EndpointID), e.Addr)
	}
	ifName, _ := req.Options[optIfName].(string)
	if ifName != "" && !validIfName(ifName) {
		return nil, invalidParam("interface name %q: at most 15 letters, digits and ._- characters", ifName)
	}
	d.state.Endpoints[req.EndpointID] = &Endpoint{ID: req.EndpointID, NetworkID: n.ID, Addr: addr, MAC: mac, IfName: ifName}
	if err := d.saveLocked(); err != nil {
		delete(d.state.Endpoints, req.EndpointID)
		return nil, err
	}
	d.publishEndpointsLocked(n.ID)
	return resp, nil
}

// DeleteEndpoint removes an endpoint and its veth pair.
func (d *Driver) DeleteEndpoint(ctx context.Context, req *network.DeleteEndpointRequest) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	e, ok := d.state.Endpoints[req.EndpointID]
	if !ok {
		return nil
	}
	if err := d.cfg.DataPlane.DeleteEndpoint(ctx, e.NetworkID, e.ID); err != nil {
		return &Error{KindSystem, fmt.Errorf("removing endpoint %s: %w", short(e.ID), err)}
	}
	delete(d.state.Endpoints, e.ID)
	if err := d.saveLocked(); err != nil {
		return err
	}
	d.publishEndpointsLocked(e.NetworkID)
	if err := d.applyLocked(ctx); err != nil {
		d.log.Warn("applying after endpoint removal", "err", err)
		d.kickLoop()
	}
	return nil
}

// EndpointInfo answers NetworkDriver.EndpointOperInfo, which Docker
// requires to succeed for every endpoint it shows.
func (d *Driver) EndpointInfo(ctx context.Context, req *network.InfoRequest) (*network.InfoResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	info := map[string]string{}
	if e, ok := d.state.Endpoints[req.EndpointID]; ok {
		info["wgmesh.host-interface"] = dataplane.HostVethName(e.ID)
		info["wgmesh.address"] = e.Addr.String()
	}
	return &network.InfoResponse{Value: info}, nil
}

// Join creates the endpoint's veth pair. Docker moves the container end,
// named in the answer, into the container and names it eth<N>.
//
// The answer sets no gateway: libnetwork then also connects the container
// to docker_gwbridge, its own NAT bridge, for the outside world, while
// the wgmesh subnet is on-link through the veth.
func (d *Driver) Join(ctx context.Context, req *network.JoinRequest) (*joinResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e, ok := d.state.Endpoints[req.EndpointID]
	if !ok || e.NetworkID != req.NetworkID {
		return nil, notFound("endpoint %s does not exist in network %s", short(req.EndpointID), short(req.NetworkID))
	}
	n := d.state.Networks[e.NetworkID]
	ifName, err := d.cfg.DataPlane.CreateEndpoint(ctx, n.ID, dataplane.Endpoint{ID: e.ID, Addr: e.Addr, MAC: parseMAC(e.MAC)}, n.MTU)
	if err != nil {
		return nil, &Error{KindSystem, fmt.Errorf("creating the container's interface: %w", err)}
	}
	e.Joined, e.JoinedAt = true, time.Now()
	e.SandboxKey, e.CtrIfName = req.SandboxKey, ""
	if err := d.saveLocked(); err != nil {
		return nil, err
	}
	// Docker names the interface once it has moved it into the
	// container, after this answer; learn the name soon after.
	time.AfterFunc(2*time.Second, d.kickCheck)
	if err := d.applyLocked(ctx); err != nil {
		// The endpoint is set up; other networks' trouble must not fail it.
		d.log.Warn("applying after join", "err", err)
		d.kickLoop()
	}
	d.log.Debug("endpoint joined", "endpoint", short(e.ID), "network", short(n.ID), "addr", e.Addr)
	resp := &joinResponse{InterfaceName: interfaceName{SrcName: ifName, DstPrefix: "eth"}}
	if e.IfName != "" {
		resp.InterfaceName.DstName, resp.InterfaceName.DstPrefix = e.IfName, ""
	}
	return resp, nil
}

// joinResponse is NetworkDriver.Join's answer. go-plugins-helpers' type
// lacks DstName, with which Docker Engine 28 and later name the
// container's interface as the user asked.
type joinResponse struct {
	InterfaceName interfaceName
	Gateway       string `json:",omitempty"`
}

type interfaceName struct {
	SrcName   string
	DstPrefix string `json:",omitempty"`
	DstName   string `json:",omitempty"`
}

// optIfName is the endpoint option with the container interface name.
const optIfName = "com.docker.network.endpoint.ifname"

// validIfName accepts Linux interface names.
func validIfName(s string) bool {
	if s == "" || len(s) > 15 || s == "." || s == ".." {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

// Leave is a no-op: Docker moves the interface back to the host after we
// answer, and DeleteEndpoint removes it.
func (d *Driver) Leave(ctx context.Context, req *network.LeaveRequest) error { return nil }

// randomMAC returns a locally administered unicast MAC.
func randomMAC() net.HardwareAddr {
	m := make(net.HardwareAddr, 6)
	_, _ = rand.Read(m)
	m[0] = m[0]&0xfe | 0x02
	return m
}

func parseMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(strings.TrimSpace(s))
	if err != nil {
		return nil
	}
	return m
}
