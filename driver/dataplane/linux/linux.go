// Package linux implements dataplane.DataPlane with network namespaces,
// veth pairs and WireGuard: the kernel module where it can create
// WireGuard links, else wireguard-go on a TUN device. Both are configured
// through wgctrl.
package linux

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/dataplane"
)

// Config configures the Linux data plane.
type Config struct {
	// RunDir holds the bind mounts that keep network namespaces alive,
	// in RunDir/netns. It must be unique per host.
	RunDir string
	// HostMountNS is the mount namespace in which network namespaces
	// are pinned: a path such as /proc/1/ns/mnt, the host's. Empty means
	// the process's own, which is right only where its mounts are the
	// host's (see mountNS).
	HostMountNS string
	// Mode is dataplane.ModeAuto, ModeKernel or ModeUserspace.
	Mode   string
	Logger *slog.Logger
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if c.RunDir == "" || !filepath.IsAbs(c.RunDir) {
		return fmt.Errorf("run directory %q must be an absolute path", c.RunDir)
	}
	if c.HostMountNS != "" && !filepath.IsAbs(c.HostMountNS) {
		return fmt.Errorf("host mount namespace %q must be an absolute path", c.HostMountNS)
	}
	switch c.Mode {
	case dataplane.ModeAuto, dataplane.ModeKernel, dataplane.ModeUserspace:
	default:
		return fmt.Errorf("WireGuard mode %q is not auto, kernel or userspace", c.Mode)
	}
	return nil
}

// routeProtocol marks the routes wgmesh installs, so that it removes only
// its own. (Any value the kernel does not use itself will do.)
const routeProtocol netlink.RouteProtocol = 0x77

// endpointAlias prefixes the alias of host-side veths; the alias carries
// the full endpoint ID, which the 15-byte link name cannot.
const endpointAlias = "wgmesh-ep:"

// nlh is the part of *netlink.Handle the data plane uses.
type nlh interface {
	LinkAdd(netlink.Link) error
	LinkDel(netlink.Link) error
	LinkByName(string) (netlink.Link, error)
	LinkList() ([]netlink.Link, error)
	LinkSetUp(netlink.Link) error
	LinkSetMTU(netlink.Link, int) error
	LinkSetAlias(netlink.Link, string) error
	LinkSetNsFd(netlink.Link, int) error
	AddrList(netlink.Link, int) ([]netlink.Addr, error)
	AddrReplace(netlink.Link, *netlink.Addr) error
	AddrDel(netlink.Link, *netlink.Addr) error
	RouteListFiltered(int, *netlink.Route, uint64) ([]netlink.Route, error)
	RouteReplace(*netlink.Route) error
	RouteDel(*netlink.Route) error
	Close()
}

var _ nlh = (*netlink.Handle)(nil)

// newHandle opens a netlink handle in the current namespace for routing
// only. Without a protocol list the netlink package also opens XFRM and
// netfilter sockets, which fail on a kernel without xfrm_user or
// nfnetlink loaded, and the data plane uses neither.
func newHandle() (*netlink.Handle, error) { return netlink.NewHandle(unix.NETLINK_ROUTE) }

// wgClient is the part of *wgctrl.Client the data plane uses.
type wgClient interface {
	Device(string) (*wgtypes.Device, error)
	ConfigureDevice(string, wgtypes.Config) error
	Close() error
}

var _ wgClient = (*wgctrl.Client)(nil)

// DataPlane is the Linux data plane.
type DataPlane struct {
	cfg  Config
	log  *slog.Logger
	mode string
	host nlh
	// mounts is where namespaces are pinned.
	mounts mountNS
	// user configures userspace devices, found by their UAPI sockets
	// wherever their TUN lives.
	user wgClient

	mu     sync.Mutex
	nets   map[string]*network
	closed bool
}

var _ dataplane.DataPlane = (*DataPlane)(nil)

// network is what the process holds for one network.
type network struct {
	id     string
	nsPath string
	ns     netns.NsHandle
	nl     nlh
	wg     wgClient // kernel: a client inside the namespace; userspace: DataPlane.user
	ownWG  bool     // wg belongs to this network and closes with it
	dev    *userDevice
	// have is what was last written to the WireGuard device; nil until
	// known.
	have *wgState
	// mss is the TCP MSS clamp last written (mss.go), mssErr why the
	// last write failed.
	mss, mssErr string
}

// New returns a Linux data plane operating on the current network
// namespace as the host's. It decides the WireGuard mode at once, so that
// a host that cannot run the requested one fails at start.
func New(cfg Config) (*DataPlane, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	log := cfg.Logger.With("component", "dataplane")
	host, err := newHandle()
	if err != nil {
		return nil, fmt.Errorf("opening netlink: %w", err)
	}
	d := &DataPlane{cfg: cfg, log: log, host: host, nets: map[string]*network{}}
	if d.mounts, err = hostMountNS(cfg.HostMountNS); err != nil {
		host.Close()
		return nil, err
	}
	if !d.mounts.own() {
		log.Info("pinning network namespaces in the host's mount namespace", "mount_ns", cfg.HostMountNS)
	}
	d.mode, err = d.chooseMode(cfg.Mode)
	if err != nil {
		host.Close()
		return nil, err
	}
	if d.mode == dataplane.ModeUserspace {
		if d.user, err = wgctrl.New(); err != nil {
			host.Close()
			return nil, fmt.Errorf("opening WireGuard control: %w", err)
		}
	}
	if err := d.mounts.ensureSharedMount(d.nsDir()); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

func (d *DataPlane) nsDir() string { return filepath.Join(d.cfg.RunDir, "netns") }

// chooseMode probes for kernel WireGuard by creating a throwaway link.
func (d *DataPlane) chooseMode(want string) (string, error) {
	if want == dataplane.ModeUserspace {
		return want, nil
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	probe := &netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: "wgmprobe" + hex.EncodeToString(b)[:7]}}
	err := d.host.LinkAdd(probe)
	if err == nil {
		_ = d.host.LinkDel(probe)
		d.log.Info("using kernel WireGuard")
		return dataplane.ModeKernel, nil
	}
	if want == dataplane.ModeKernel {
		return "", fmt.Errorf("kernel WireGuard requested but unavailable (is the wireguard module loaded?): %w", err)
	}
	d.log.Warn("kernel WireGuard unavailable, falling back to userspace wireguard-go", "err", err)
	return dataplane.ModeUserspace, nil
}

// Mode implements dataplane.DataPlane.
func (d *DataPlane) Mode() string { return d.mode }

// Apply implements dataplane.DataPlane.
func (d *DataPlane) Apply(ctx context.Context, cfg *dataplane.Config) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("data plane is closed")
	}
	var errs []error
	want := map[string]bool{}
	for i := range cfg.Networks {
		n := &cfg.Networks[i]
		want[n.ID] = true
		if err := n.Validate(); err != nil {
			errs = append(errs, &dataplane.NetworkError{ID: n.ID, Err: err})
			continue
		}
		if err := d.applyNetwork(ctx, cfg.PrivateKey, n); err != nil {
			errs = append(errs, &dataplane.NetworkError{ID: n.ID, Err: err})
		}
	}
	existing, err := d.existingNetworks()
	if err != nil {
		errs = append(errs, err)
	}
	for _, id := range existing {
		if !want[id] {
			if err := d.removeNetwork(id); err != nil {
				errs = append(errs, fmt.Errorf("removing network %s: %w", short(id), err))
			}
		}
	}
	return errors.Join(errs...)
}

// existingNetworks lists networks with a namespace on this host.
func (d *DataPlane) existingNetworks() ([]string, error) {
	entries, err := os.ReadDir(d.nsDir())
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", d.nsDir(), err)
	}
	ids := slices.Collect(maps.Keys(d.nets))
	for _, e := range entries {
		if dataplane.ValidID(e.Name()) == nil && !slices.Contains(ids, e.Name()) {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// open returns the network's state, opening or creating its namespace.
func (d *DataPlane) open(id string, create bool) (*network, error) {
	if st, ok := d.nets[id]; ok {
		return st, nil
	}
	path := filepath.Join(d.nsDir(), id)
	ns, err := d.mounts.openNS(path)
	switch {
	case err == nil:
	case !errors.Is(err, errNotPinned):
	case !create:
		return nil, fmt.Errorf("network %s has no namespace on this host", short(id))
	default:
		// A file that is not a mounted namespace is a leftover of an
		// interrupted creation.
		_ = d.mounts.removeNS(path)
		ns, err = d.mounts.createNS(path, setupNetworkNS)
		if err == nil {
			d.log.Info("network namespace created", "network", short(id), "path", path)
		}
	}
	if err != nil {
		return nil, err
	}
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("netlink in namespace %s: %w", path, err)
	}
	st := &network{id: id, nsPath: path, ns: ns, nl: h, wg: d.user}
	if d.mode == dataplane.ModeKernel {
		// Kernel WireGuard is configured over generic netlink, which is
		// per namespace: the client must be opened inside.
		var c *wgctrl.Client
		if err := inNS(ns, func() (err error) { c, err = wgctrl.New(); return err }); err != nil {
			h.Close()
			ns.Close()
			return nil, fmt.Errorf("opening WireGuard control in namespace: %w", err)
		}
		st.wg, st.ownWG = c, true
	}
	d.nets[id] = st
	return st, nil
}

func (st *network) close() {
	if st.dev != nil {
		st.dev.close()
		st.dev = nil
	}
	if st.ownWG {
		st.wg.Close()
	}
	st.nl.Close()
	st.ns.Close()
}

func (d *DataPlane) applyNetwork(ctx context.Context, key crypto.PrivateKey, n *dataplane.Network) error {
	st, err := d.open(n.ID, true)
	if err != nil {
		return err
	}
	link, err := d.ensureWireGuard(st, n)
	if err != nil {
		return err
	}
	if err := d.configureWireGuard(st, key, n); err != nil {
		return err
	}
	if st.dev != nil {
		// The TUN reports "up" only by polling once a second; start the
		// device now rather than up to a second later.
		if err := st.dev.dev.Up(); err != nil {
			return fmt.Errorf("starting wireguard-go: %w", err)
		}
	}
	present, err := d.syncEndpoints(st, n)
	if err != nil {
		return err
	}
	if err := d.syncRoutes(st, n, link, present); err != nil {
		return err
	}
	// A kernel without nftables runs the network without the clamp:
	// containers that take ICMP still find the path MTU themselves.
	if err := d.syncMSS(st, wantMSS(link.Attrs().Name, n)); err != nil {
		if err.Error() != st.mssErr {
			d.log.Warn("no TCP MSS clamp in the network's namespace: containers that drop ICMP may stall across smaller paths",
				"network", short(n.ID), "err", err)
		}
		st.mssErr = err.Error()
	} else {
		st.mssErr = ""
	}
	return nil
}

// ensureWireGuard makes sure the network's WireGuard link exists in its
// namespace with the right MTU and address, and is up.
func (d *DataPlane) ensureWireGuard(st *network, n *dataplane.Network) (netlink.Link, error) {
	name := dataplane.WireGuardName(n.ID)
	link, err := st.nl.LinkByName(name)
	if err != nil && !isNotFound(err) {
		return nil, fmt.Errorf("looking up %s: %w", name, err)
	}
	if link == nil {
		st.have = nil
		if st.dev != nil {
			// The link vanished under a running device; start over.
			st.dev.close()
			st.dev = nil
		}
		switch d.mode {
		case dataplane.ModeKernel:
			err = d.createKernelLink(st, name, n.MTU)
		default:
			st.dev, err = newUserDevice(st.ns, name, n.MTU, d.log.With("iface", name))
		}
		if err != nil {
			return nil, err
		}
		if link, err = st.nl.LinkByName(name); err != nil {
			return nil, fmt.Errorf("looking up new %s: %w", name, err)
		}
		d.log.Info("WireGuard link created", "network", short(n.ID), "iface", name, "mode", d.mode)
	} else if d.mode == dataplane.ModeUserspace && st.dev == nil {
		// A TUN from a previous process: nothing serves it any more.
		if err := st.nl.LinkDel(link); err != nil {
			return nil, fmt.Errorf("removing stale %s: %w", name, err)
		}
		return d.ensureWireGuard(st, n)
	}
	if st.have == nil {
		// New link, or new to this process: make sure it forwards what it
		// receives to the veths.
		if err := setRoutingConf(st.ns, link.Attrs().Index, false); err != nil {
			return nil, err
		}
	}
	if link.Attrs().MTU != n.MTU {
		if st.dev != nil {
			st.dev.setMTU(n.MTU)
		}
		if err := st.nl.LinkSetMTU(link, n.MTU); err != nil {
			return nil, fmt.Errorf("setting MTU of %s: %w", name, err)
		}
	}
	if err := d.syncAddrs(st, link, n.Gateway); err != nil {
		return nil, err
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := st.nl.LinkSetUp(link); err != nil {
			return nil, fmt.Errorf("bringing up %s: %w", name, err)
		}
	}
	return link, nil
}

// createKernelLink creates a WireGuard link in the host namespace and
// moves it into the network's. WireGuard keeps its UDP socket in the
// namespace it was created in, so encrypted traffic leaves through the
// host's interfaces while the link itself is only reachable from inside.
func (d *DataPlane) createKernelLink(st *network, name string, mtu int) error {
	if old, err := d.host.LinkByName(name); err == nil {
		// Left over from a creation interrupted before the move.
		_ = d.host.LinkDel(old)
	}
	link := &netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}}
	if err := d.host.LinkAdd(link); err != nil {
		return fmt.Errorf("creating WireGuard link %s: %w", name, err)
	}
	created, err := d.host.LinkByName(name)
	if err == nil {
		err = d.host.LinkSetNsFd(created, int(st.ns))
	}
	if err != nil {
		_ = d.host.LinkDel(link)
		return fmt.Errorf("moving %s into the network namespace: %w", name, err)
	}
	return nil
}

func (d *DataPlane) syncAddrs(st *network, link netlink.Link, gw netip.Addr) error {
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return st.nl.AddrList(link, netlink.FAMILY_V4) })
	if err != nil {
		return fmt.Errorf("listing addresses: %w", err)
	}
	want := netip.Prefix{}
	if gw.IsValid() {
		want = netip.PrefixFrom(gw, gw.BitLen())
	}
	found := false
	for _, a := range addrs {
		p := prefixOf(*a.IPNet)
		if p == want {
			found = true
			continue
		}
		if err := st.nl.AddrDel(link, &a); err != nil && !isNotFound(err) {
			return fmt.Errorf("removing address %s: %w", p, err)
		}
	}
	if want.IsValid() && !found {
		if err := st.nl.AddrReplace(link, &netlink.Addr{IPNet: &ipNets([]netip.Prefix{want})[0]}); err != nil {
			return fmt.Errorf("adding address %s: %w", want, err)
		}
	}
	return nil
}

// configureWireGuard makes the network's WireGuard device run n. It
// diffs with the device itself, read each time, so that a change made by
// hand (a peer removed with `wg set`) is undone; st.have, what was last
// written, only decides whether that was drift, and keeps each peer's
// endpoint as it was set: WireGuard moves a peer's endpoint to where its
// packets come from (roaming), and that is no drift to undo.
func (d *DataPlane) configureWireGuard(st *network, key crypto.PrivateKey, n *dataplane.Network) error {
	name := dataplane.WireGuardName(n.ID)
	dev, err := st.wg.Device(name)
	if err != nil {
		return fmt.Errorf("reading WireGuard device %s: %w", name, err)
	}
	want := desiredWG(key, n)
	have := adoptWG(dev, st.have, want)
	cfg, changed := wgDiff(have, want, key)
	if !changed {
		st.have = &want
		return nil
	}
	if st.have != nil {
		if _, meant := wgDiff(*st.have, want, key); !meant {
			d.log.Warn("WireGuard device drifted from its configuration; repairing", "network", short(n.ID), "iface", name, "peer_changes", len(cfg.Peers))
		}
	}
	if err := st.wg.ConfigureDevice(name, cfg); err != nil {
		st.have = nil
		return fmt.Errorf("configuring WireGuard device %s: %w", name, err)
	}
	st.have = &want
	d.log.Debug("WireGuard configured", "network", short(n.ID), "iface", name, "peer_changes", len(cfg.Peers))
	return nil
}

// syncEndpoints removes veth pairs of endpoints no longer joined, sets up
// the rest, and returns the host-side links that exist, by endpoint ID.
func (d *DataPlane) syncEndpoints(st *network, n *dataplane.Network) (map[string]netlink.Link, error) {
	links, err := retryDump(st.nl.LinkList)
	if err != nil {
		return nil, fmt.Errorf("listing links: %w", err)
	}
	want := map[string]bool{}
	for _, ep := range n.Endpoints {
		want[ep.ID] = true
	}
	present := map[string]netlink.Link{}
	var errs []error
	for _, l := range links {
		id, ok := strings.CutPrefix(l.Attrs().Alias, endpointAlias)
		if !ok {
			continue
		}
		if !want[id] {
			if err := st.nl.LinkDel(l); err != nil && !isNotFound(err) {
				errs = append(errs, fmt.Errorf("removing veth of endpoint %s: %w", short(id), err))
			}
			d.log.Info("stale endpoint veth removed", "network", short(n.ID), "endpoint", short(id))
			continue
		}
		present[id] = l
		if l.Attrs().Flags&net.FlagUp == 0 {
			if err := st.nl.LinkSetUp(l); err != nil {
				errs = append(errs, fmt.Errorf("bringing up %s: %w", l.Attrs().Name, err))
			}
		}
	}
	return present, errors.Join(errs...)
}

// syncRoutes converges the network namespace's routes: the whole subnet
// into WireGuard (cryptokey routing picks the peer), own blocks
// unreachable unless an endpoint is there, and one host route per local
// endpoint.
func (d *DataPlane) syncRoutes(st *network, n *dataplane.Network, wg netlink.Link, veths map[string]netlink.Link) error {
	var want []netlink.Route
	want = append(want, netlink.Route{
		LinkIndex: wg.Attrs().Index, Dst: ipNet(n.Subnet), Scope: netlink.SCOPE_LINK, Protocol: routeProtocol,
	})
	for _, b := range n.LocalBlocks {
		want = append(want, netlink.Route{Dst: ipNet(b), Type: unix.RTN_UNREACHABLE, Protocol: routeProtocol})
	}
	for _, p := range n.Peers {
		if p.MTU == 0 {
			continue
		}
		// A smaller path to this peer: its blocks get a route of their
		// own with that MTU, and the kernel answers oversized packets to
		// them as any router on a smaller link would.
		for _, a := range p.AllowedIPs {
			want = append(want, netlink.Route{
				LinkIndex: wg.Attrs().Index, Dst: ipNet(a), Scope: netlink.SCOPE_LINK, Protocol: routeProtocol, MTU: p.MTU,
			})
		}
	}
	for _, ep := range n.Endpoints {
		l, ok := veths[ep.ID]
		if !ok {
			continue
		}
		host := netip.PrefixFrom(ep.Addr.Addr(), ep.Addr.Addr().BitLen())
		want = append(want, netlink.Route{
			LinkIndex: l.Attrs().Index, Dst: ipNet(host), Scope: netlink.SCOPE_LINK, Protocol: routeProtocol,
		})
	}
	have, err := retryDump(func() ([]netlink.Route, error) {
		return st.nl.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: routeProtocol}, netlink.RT_FILTER_PROTOCOL)
	})
	if err != nil {
		return fmt.Errorf("listing routes: %w", err)
	}
	// A route that differs is replaced in place, and only a route whose
	// destination is no longer wanted is deleted: between deleting a
	// route and adding it again, the namespace would route its packets
	// elsewhere (a local container's into its block's unreachable route).
	var errs []error
	for _, w := range want {
		if slices.ContainsFunc(have, func(h netlink.Route) bool { return sameRoute(h, w) }) {
			continue
		}
		if err := st.nl.RouteReplace(&w); err != nil {
			errs = append(errs, fmt.Errorf("adding route %s: %w", w.Dst, err))
		}
	}
	for _, h := range have {
		if slices.ContainsFunc(want, func(w netlink.Route) bool { return h.Dst.String() == w.Dst.String() }) {
			continue
		}
		if err := st.nl.RouteDel(&h); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("removing route %s: %w", h.Dst, err))
		}
	}
	return errors.Join(errs...)
}

// sameRoute reports whether two routes of wgmesh's are the same. A route
// asked for without a type is a unicast route, as the kernel lists it.
func sameRoute(a, b netlink.Route) bool {
	return a.Dst.String() == b.Dst.String() && routeType(a) == routeType(b) && a.MTU == b.MTU &&
		(routeType(a) == unix.RTN_UNREACHABLE || a.LinkIndex == b.LinkIndex)
}

func routeType(r netlink.Route) int {
	if r.Type == 0 {
		return unix.RTN_UNICAST
	}
	return r.Type
}

// CreateEndpoint implements dataplane.DataPlane.
func (d *DataPlane) CreateEndpoint(ctx context.Context, netID string, ep dataplane.Endpoint, mtu int) (string, error) {
	if err := dataplane.ValidID(ep.ID); err != nil {
		return "", err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	st, err := d.open(netID, false)
	if err != nil {
		return "", err
	}
	hostName, ctrName := dataplane.HostVethName(ep.ID), dataplane.ContainerVethName(ep.ID)
	link, err := st.nl.LinkByName(hostName)
	if err != nil && !isNotFound(err) {
		return "", fmt.Errorf("looking up %s: %w", hostName, err)
	}
	if link == nil {
		if old, err := d.host.LinkByName(ctrName); err == nil {
			// Left over from an attempt that failed half-way.
			_ = d.host.LinkDel(old)
		}
		veth := &netlink.Veth{
			LinkAttrs:        netlink.LinkAttrs{Name: hostName, MTU: mtu, Namespace: netlink.NsFd(st.ns)},
			PeerName:         ctrName,
			PeerHardwareAddr: ep.MAC,
			PeerMTU:          uint32(mtu),
		}
		if err := d.host.LinkAdd(veth); err != nil {
			return "", fmt.Errorf("creating veth pair %s/%s: %w", hostName, ctrName, err)
		}
		if link, err = st.nl.LinkByName(hostName); err != nil {
			return "", fmt.Errorf("looking up new %s: %w", hostName, err)
		}
	}
	if err := d.setupHostEnd(st, link, ep); err != nil {
		return "", err
	}
	return ctrName, nil
}

// setupHostEnd labels the host end of an endpoint's veth pair with the
// endpoint's ID, makes it route with proxy ARP, brings it up and routes
// the endpoint's address to it.
func (d *DataPlane) setupHostEnd(st *network, link netlink.Link, ep dataplane.Endpoint) error {
	name := link.Attrs().Name
	if err := st.nl.LinkSetAlias(link, endpointAlias+ep.ID); err != nil {
		return fmt.Errorf("labelling %s: %w", name, err)
	}
	if err := setRoutingConf(st.ns, link.Attrs().Index, true); err != nil {
		return err
	}
	if err := st.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("bringing up %s: %w", name, err)
	}
	host := netip.PrefixFrom(ep.Addr.Addr(), ep.Addr.Addr().BitLen())
	route := netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(host), Scope: netlink.SCOPE_LINK, Protocol: routeProtocol}
	if err := st.nl.RouteReplace(&route); err != nil {
		return fmt.Errorf("adding route to %s: %w", host, err)
	}
	return nil
}

// openSandbox opens a container's network namespace. path is looked up
// in the process's own mount namespace, then in the host's: a sandbox key
// is a mount of dockerd's, which need not reach the agent's.
func (d *DataPlane) openSandbox(path string) (netns.NsHandle, error) {
	ns, err := netns.GetFromPath(path)
	if errors.Is(err, unix.ENOENT) && !d.mounts.own() {
		err = d.mounts.do(func() (err error) {
			ns, err = netns.GetFromPath(path)
			return err
		})
	}
	switch {
	case errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH):
		return netns.None(), fmt.Errorf("%w: %s", dataplane.ErrNoSandbox, path)
	case err != nil:
		return netns.None(), fmt.Errorf("opening container network namespace %s: %w", path, err)
	}
	// A sandbox key whose mount is gone is a plain file.
	var fs unix.Statfs_t
	if err := unix.Fstatfs(int(ns), &fs); err != nil || fs.Type != unix.NSFS_MAGIC {
		ns.Close()
		return netns.None(), fmt.Errorf("%w: %s is no namespace", dataplane.ErrNoSandbox, path)
	}
	return ns, nil
}

// ContainerInterface implements dataplane.DataPlane. The container end
// is the host end's peer: the link of the host end's peer index in the
// container's namespace, if it is a veth.
func (d *DataPlane) ContainerInterface(ctx context.Context, netID, epID, sandbox string) (string, error) {
	if err := dataplane.ValidID(epID); err != nil {
		return "", err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	st, err := d.open(netID, false)
	if err != nil {
		return "", err
	}
	host, err := st.nl.LinkByName(dataplane.HostVethName(epID))
	if err != nil {
		if isNotFound(err) {
			return "", nil
		}
		return "", err
	}
	ns, err := d.openSandbox(sandbox)
	if err != nil {
		return "", err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return "", fmt.Errorf("netlink in %s: %w", sandbox, err)
	}
	defer h.Close()
	peer, err := h.LinkByIndex(host.Attrs().ParentIndex)
	if err != nil {
		if isNotFound(err) {
			return "", nil
		}
		return "", err
	}
	if peer.Type() != "veth" {
		return "", nil
	}
	return peer.Attrs().Name, nil
}

// RepairEndpoint implements dataplane.DataPlane.
func (d *DataPlane) RepairEndpoint(ctx context.Context, netID string, ep dataplane.Endpoint, mtu int, sandbox, ifName string) (string, error) {
	if err := dataplane.ValidID(ep.ID); err != nil {
		return "", err
	}
	if len(ifName) > 15 || strings.ContainsAny(ifName, "/ \x00") {
		return "", fmt.Errorf("container interface name %q", ifName)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	st, err := d.open(netID, false)
	if err != nil {
		return "", err
	}
	ns, err := d.openSandbox(sandbox)
	if err != nil {
		return "", err
	}
	defer ns.Close()
	ctr, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return "", fmt.Errorf("netlink in %s: %w", sandbox, err)
	}
	defer ctr.Close()

	if ifName == "" {
		if ifName, err = freeEthName(ctr); err != nil {
			return "", err
		}
	}
	// Whatever is left of the pair goes: one end alone is of no use.
	hostName, tmpName := dataplane.HostVethName(ep.ID), dataplane.ContainerVethName(ep.ID)
	if l, err := st.nl.LinkByName(hostName); err == nil {
		_ = st.nl.LinkDel(l)
	}
	if l, err := d.host.LinkByName(tmpName); err == nil {
		_ = d.host.LinkDel(l)
	}
	if l, err := ctr.LinkByName(ifName); err == nil {
		if l.Type() != "veth" || !bytes.Equal(l.Attrs().HardwareAddr, ep.MAC) {
			return "", fmt.Errorf("the container has another interface named %s", ifName)
		}
		_ = ctr.LinkDel(l)
	}
	veth := &netlink.Veth{
		LinkAttrs:        netlink.LinkAttrs{Name: hostName, MTU: mtu, Namespace: netlink.NsFd(st.ns)},
		PeerName:         ifName,
		PeerHardwareAddr: ep.MAC,
		PeerMTU:          uint32(mtu),
		PeerNamespace:    netlink.NsFd(ns),
	}
	if err := d.host.LinkAdd(veth); err != nil {
		return "", fmt.Errorf("creating veth pair %s/%s: %w", hostName, ifName, err)
	}
	link, err := st.nl.LinkByName(hostName)
	if err != nil {
		return "", fmt.Errorf("looking up new %s: %w", hostName, err)
	}
	if err := d.setupHostEnd(st, link, ep); err != nil {
		return "", err
	}
	in, err := ctr.LinkByName(ifName)
	if err != nil {
		return "", fmt.Errorf("looking up %s in the container: %w", ifName, err)
	}
	if err := ctr.AddrReplace(in, &netlink.Addr{IPNet: ipNet(ep.Addr)}); err != nil {
		return "", fmt.Errorf("adding address %s to %s in the container: %w", ep.Addr, ifName, err)
	}
	if err := ctr.LinkSetUp(in); err != nil {
		return "", fmt.Errorf("bringing up %s in the container: %w", ifName, err)
	}
	return ifName, nil
}

// freeEthName is the first eth<N> the namespace of h does not have.
func freeEthName(h *netlink.Handle) (string, error) {
	links, err := retryDump(h.LinkList)
	if err != nil {
		return "", fmt.Errorf("listing the container's links: %w", err)
	}
	for i := range 100 {
		name := fmt.Sprintf("eth%d", i)
		if !slices.ContainsFunc(links, func(l netlink.Link) bool { return l.Attrs().Name == name }) {
			return name, nil
		}
	}
	return "", errors.New("the container has eth0 to eth99")
}

// DeleteEndpoint implements dataplane.DataPlane.
func (d *DataPlane) DeleteEndpoint(ctx context.Context, netID, epID string) error {
	if err := dataplane.ValidID(epID); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	if st, err := d.open(netID, false); err == nil {
		if l, err := st.nl.LinkByName(dataplane.HostVethName(epID)); err == nil {
			if err := st.nl.LinkDel(l); err != nil && !isNotFound(err) {
				errs = append(errs, fmt.Errorf("removing host end of endpoint %s: %w", short(epID), err))
			}
		}
	}
	// Docker moves the container end back to the host after Leave.
	if l, err := d.host.LinkByName(dataplane.ContainerVethName(epID)); err == nil {
		if err := d.host.LinkDel(l); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("removing container end of endpoint %s: %w", short(epID), err))
		}
	}
	return errors.Join(errs...)
}

// removeNetwork tears down a network: its WireGuard device and namespace.
func (d *DataPlane) removeNetwork(id string) error {
	st, err := d.open(id, false)
	if err != nil {
		// Nothing usable to clean inside; just unpin it.
		removeStaleUAPISocket(dataplane.WireGuardName(id))
		return d.mounts.removeNS(filepath.Join(d.nsDir(), id))
	}
	if l, err := st.nl.LinkByName(dataplane.WireGuardName(id)); err == nil {
		// Deleting the namespace would destroy the link too, but only
		// once every reference to the namespace is gone.
		_ = st.nl.LinkDel(l)
	}
	st.close()
	delete(d.nets, id)
	removeStaleUAPISocket(dataplane.WireGuardName(id))
	if err := d.mounts.removeNS(st.nsPath); err != nil {
		return err
	}
	d.log.Info("network removed", "network", short(id))
	return nil
}

// removeStaleUAPISocket removes the control socket a wireguard-go device
// left when its agent was killed: a closed device unlinks its own, but a
// killed one cannot, and no later device of that name will replace it
// once its network is gone.
func removeStaleUAPISocket(name string) {
	path := filepath.Join("/var/run/wireguard", name+".sock")
	if _, err := os.Stat(path); err != nil {
		return
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return
	}
	_ = os.Remove(path)
}

// Status implements dataplane.DataPlane.
func (d *DataPlane) Status(ctx context.Context) ([]dataplane.NetworkStatus, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []dataplane.NetworkStatus
	var errs []error
	for _, id := range slices.Sorted(maps.Keys(d.nets)) {
		st := d.nets[id]
		ns := dataplane.NetworkStatus{ID: id, Interface: dataplane.WireGuardName(id)}
		if dev, err := st.wg.Device(ns.Interface); err == nil {
			ns.PublicKey = crypto.PublicKey(dev.PublicKey)
			ns.ListenPort = dev.ListenPort
			for _, p := range dev.Peers {
				ps := dataplane.PeerStatus{
					PublicKey: crypto.PublicKey(p.PublicKey), LastHandshake: p.LastHandshakeTime,
					RxBytes: p.ReceiveBytes, TxBytes: p.TransmitBytes,
				}
				if p.Endpoint != nil {
					// wireguard-go's sockets are dual-stack: IPv4
					// endpoints come mapped.
					ap := p.Endpoint.AddrPort()
					ps.Endpoint = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
				}
				for _, a := range p.AllowedIPs {
					ps.AllowedIPs = append(ps.AllowedIPs, prefixOf(a))
				}
				ns.Peers = append(ns.Peers, ps)
			}
		} else {
			errs = append(errs, fmt.Errorf("reading WireGuard device %s: %w", ns.Interface, err))
		}
		links, err := retryDump(st.nl.LinkList)
		if err != nil {
			errs = append(errs, err)
		}
		for _, l := range links {
			if id, ok := strings.CutPrefix(l.Attrs().Alias, endpointAlias); ok {
				ns.Endpoints = append(ns.Endpoints, id)
			}
		}
		slices.Sort(ns.Endpoints)
		out = append(out, ns)
	}
	return out, errors.Join(errs...)
}

// Close implements dataplane.DataPlane.
func (d *DataPlane) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	for id, st := range d.nets {
		st.close()
		delete(d.nets, id)
	}
	if d.user != nil {
		d.user.Close()
	}
	d.host.Close()
	return d.mounts.releaseSharedMount(d.nsDir())
}

func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENODEV)
}

// retryDump repeats a netlink dump the kernel interrupted because the
// table changed under it; the partial result cannot be trusted.
func retryDump[T any](f func() (T, error)) (T, error) {
	var v T
	var err error
	for range 5 {
		v, err = f()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
	}
	return v, err
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// UnderlayMTU returns the MTU of the host interface that holds addr or,
// when addr is not local (an address advertised through NAT), of the
// interface of the default route.
func UnderlayMTU(addr netip.Addr) (int, error) {
	h, err := newHandle()
	if err != nil {
		return 0, err
	}
	defer h.Close()
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return h.AddrList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return 0, fmt.Errorf("listing addresses: %w", err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == addr.Unmap() {
			l, err := h.LinkByIndex(a.LinkIndex)
			if err != nil {
				return 0, err
			}
			return l.Attrs().MTU, nil
		}
	}
	family := netlink.FAMILY_V4
	if addr.Is6() && !addr.Is4In6() {
		family = netlink.FAMILY_V6
	}
	routes, err := retryDump(func() ([]netlink.Route, error) {
		return h.RouteListFiltered(family, &netlink.Route{Dst: nil}, netlink.RT_FILTER_DST)
	})
	if err != nil {
		return 0, fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil || r.Dst.IP.IsUnspecified() {
			l, err := h.LinkByIndex(r.LinkIndex)
			if err != nil {
				return 0, err
			}
			return l.Attrs().MTU, nil
		}
	}
	return 0, fmt.Errorf("no interface holds %s and there is no default route", addr)
}
