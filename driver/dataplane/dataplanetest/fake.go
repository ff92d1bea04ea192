// Package dataplanetest provides a recording, strict fake of
// dataplane.DataPlane for tests that cannot touch the kernel.
package dataplanetest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/dataplane"
)

// Fake records the applied configuration and the endpoints created. It
// rejects what the real data plane would: endpoints in networks that were
// never applied, invalid networks, use after Close.
type Fake struct {
	mu        sync.Mutex
	applied   dataplane.Config
	endpoints map[string]fakeEndpoint // by endpoint ID
	closed    bool
	// FailApply makes Apply fail for networks with these IDs.
	FailApply map[string]error
	// Applies counts Apply calls.
	Applies int
	// sandboxes are the containers' network namespaces that exist, by
	// path, with the interface names in them (Sandbox, Move).
	sandboxes map[string]map[string]string // path -> ifName -> endpoint ID
	// FailRepair makes RepairEndpoint fail for these endpoint IDs.
	FailRepair map[string]error
	// Repairs counts successful RepairEndpoint calls.
	Repairs int
	// AfterStatus, if set, runs after each Status has taken its snapshot,
	// outside the fake's lock.
	AfterStatus func()
	// handshakes are what Status reports of peers' WireGuard sessions,
	// by public key (Handshake).
	handshakes map[crypto.PublicKey]PeerSession
}

// PeerSession is what the fake reports of a peer's WireGuard session.
type PeerSession struct {
	LastHandshake time.Time
	RxBytes       int64
	// Endpoint, if set, is where the peer's packets come from (roaming);
	// else the configured endpoint.
	Endpoint netip.AddrPort
}

// Handshake sets what Status reports of a peer's session, on every
// network.
func (f *Fake) Handshake(pub crypto.PublicKey, s PeerSession) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.handshakes == nil {
		f.handshakes = map[crypto.PublicKey]PeerSession{}
	}
	f.handshakes[pub] = s
}

type fakeEndpoint struct {
	netID string
	ep    dataplane.Endpoint
	mtu   int
	// gone simulates a veth pair that vanished: its container died, or
	// the network's namespace was destroyed under it.
	gone bool
}

var _ dataplane.DataPlane = (*Fake)(nil)

// New returns an empty fake.
func New() *Fake {
	return &Fake{endpoints: map[string]fakeEndpoint{}, FailApply: map[string]error{},
		sandboxes: map[string]map[string]string{}, FailRepair: map[string]error{}}
}

// Apply implements dataplane.DataPlane.
func (f *Fake) Apply(_ context.Context, cfg *dataplane.Config) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return errors.New("fake: apply after close")
	}
	f.Applies++
	var errs []error
	var ok []dataplane.Network
	for _, n := range cfg.Networks {
		if err := n.Validate(); err != nil {
			errs = append(errs, &dataplane.NetworkError{ID: n.ID, Err: err})
			continue
		}
		if err := f.FailApply[n.ID]; err != nil {
			errs = append(errs, &dataplane.NetworkError{ID: n.ID, Err: err})
			continue
		}
		ok = append(ok, n)
	}
	f.applied = dataplane.Config{PrivateKey: cfg.PrivateKey, Networks: ok}
	// Like the real one, removing a network removes its endpoints.
	for id, e := range f.endpoints {
		if !slices.ContainsFunc(ok, func(n dataplane.Network) bool { return n.ID == e.netID }) {
			delete(f.endpoints, id)
		}
	}
	return errors.Join(errs...)
}

func (f *Fake) hasNetworkLocked(id string) bool {
	return slices.ContainsFunc(f.applied.Networks, func(n dataplane.Network) bool { return n.ID == id })
}

// CreateEndpoint implements dataplane.DataPlane.
func (f *Fake) CreateEndpoint(_ context.Context, netID string, ep dataplane.Endpoint, mtu int) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return "", errors.New("fake: create endpoint after close")
	}
	if !f.hasNetworkLocked(netID) {
		return "", fmt.Errorf("fake: endpoint in network %s that was never applied", netID)
	}
	if err := dataplane.ValidID(ep.ID); err != nil {
		return "", err
	}
	f.endpoints[ep.ID] = fakeEndpoint{netID: netID, ep: ep, mtu: mtu}
	return dataplane.ContainerVethName(ep.ID), nil
}

// DeleteEndpoint implements dataplane.DataPlane.
func (f *Fake) DeleteEndpoint(_ context.Context, netID, epID string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return errors.New("fake: delete endpoint after close")
	}
	delete(f.endpoints, epID)
	return nil
}

// Kill makes an endpoint's veth pair vanish, both ends, as when its
// container dies or the network's namespace is destroyed.
func (f *Fake) Kill(epID string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if e, ok := f.endpoints[epID]; ok {
		e.gone = true
		f.endpoints[epID] = e
	}
	for _, ifs := range f.sandboxes {
		for name, id := range ifs {
			if id == epID {
				delete(ifs, name)
			}
		}
	}
}

// Sandbox makes a container's network namespace exist at path, or,
// with exists false, vanish with everything in it (its container died).
func (f *Fake) Sandbox(path string, exists bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !exists {
		for _, epID := range f.sandboxes[path] {
			if e, ok := f.endpoints[epID]; ok {
				e.gone = true
				f.endpoints[epID] = e
			}
		}
		delete(f.sandboxes, path)
		return
	}
	if f.sandboxes[path] == nil {
		f.sandboxes[path] = map[string]string{}
	}
}

// Move does what Docker does after Join: it moves an endpoint's
// container end into the sandbox at path and names it ifName.
func (f *Fake) Move(epID, path, ifName string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.sandboxes[path] == nil {
		f.sandboxes[path] = map[string]string{}
	}
	f.sandboxes[path][ifName] = epID
}

// ContainerInterface implements dataplane.DataPlane.
func (f *Fake) ContainerInterface(_ context.Context, netID, epID, sandbox string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return "", errors.New("fake: container interface after close")
	}
	ifs, ok := f.sandboxes[sandbox]
	if !ok {
		return "", dataplane.ErrNoSandbox
	}
	if e, ok := f.endpoints[epID]; !ok || e.gone || e.netID != netID {
		return "", nil
	}
	for name, id := range ifs {
		if id == epID {
			return name, nil
		}
	}
	return "", nil
}

// RepairEndpoint implements dataplane.DataPlane.
func (f *Fake) RepairEndpoint(_ context.Context, netID string, ep dataplane.Endpoint, mtu int, sandbox, ifName string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return "", errors.New("fake: repair after close")
	}
	if !f.hasNetworkLocked(netID) {
		return "", fmt.Errorf("fake: repair in network %s that was never applied", netID)
	}
	ifs, ok := f.sandboxes[sandbox]
	if !ok {
		return "", dataplane.ErrNoSandbox
	}
	if err := f.FailRepair[ep.ID]; err != nil {
		return "", err
	}
	for i := 0; ifName == ""; i++ {
		if _, taken := ifs[fmt.Sprintf("eth%d", i)]; !taken {
			ifName = fmt.Sprintf("eth%d", i)
		}
	}
	if id, taken := ifs[ifName]; taken && id != ep.ID {
		return "", fmt.Errorf("fake: the container has another interface named %s", ifName)
	}
	f.endpoints[ep.ID] = fakeEndpoint{netID: netID, ep: ep, mtu: mtu}
	ifs[ifName] = ep.ID
	f.Repairs++
	return ifName, nil
}

// Status implements dataplane.DataPlane.
func (f *Fake) Status(context.Context) ([]dataplane.NetworkStatus, error) {
	out := f.status()
	f.mu.Lock()
	after := f.AfterStatus
	f.mu.Unlock()
	if after != nil {
		after()
	}
	return out, nil
}

func (f *Fake) status() []dataplane.NetworkStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []dataplane.NetworkStatus
	for _, n := range f.applied.Networks {
		st := dataplane.NetworkStatus{ID: n.ID, Interface: dataplane.WireGuardName(n.ID), PublicKey: f.applied.PrivateKey.Public(), ListenPort: int(n.ListenPort)}
		for _, p := range n.Peers {
			ps := dataplane.PeerStatus{PublicKey: p.PublicKey, Endpoint: p.Endpoint, AllowedIPs: p.AllowedIPs}
			if h, ok := f.handshakes[p.PublicKey]; ok {
				ps.LastHandshake, ps.RxBytes = h.LastHandshake, h.RxBytes
				if h.Endpoint.IsValid() {
					ps.Endpoint = h.Endpoint
				}
			}
			st.Peers = append(st.Peers, ps)
		}
		for _, id := range slices.Sorted(maps.Keys(f.endpoints)) {
			if e := f.endpoints[id]; e.netID == n.ID && !e.gone {
				st.Endpoints = append(st.Endpoints, id)
			}
		}
		out = append(out, st)
	}
	return out
}

// Mode implements dataplane.DataPlane.
func (f *Fake) Mode() string { return dataplane.ModeUserspace }

// Close implements dataplane.DataPlane.
func (f *Fake) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

// Config returns the last applied configuration.
func (f *Fake) Config() dataplane.Config {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.applied
}

// Render prints the applied state like `ip` and `wg` would show it, one
// line per fact, for comparison with golden strings.
func (f *Fake) Render() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var lines []string
	for _, n := range f.applied.Networks {
		wg := dataplane.WireGuardName(n.ID)
		lines = append(lines, fmt.Sprintf("link %s mtu %d port %d addr %s", wg, n.MTU, n.ListenPort, n.Gateway))
		lines = append(lines, fmt.Sprintf("route %s dev %s", n.Subnet, wg))
		for _, b := range n.LocalBlocks {
			lines = append(lines, fmt.Sprintf("route unreachable %s", b))
		}
		for _, p := range n.Peers {
			line := fmt.Sprintf("peer %s endpoint %s allowed-ips %v", p.PublicKey.Short(), p.Endpoint, p.AllowedIPs)
			if p.MTU != 0 {
				line += fmt.Sprintf(" mtu %d", p.MTU)
			}
			if p.Generation != 0 {
				line += fmt.Sprintf(" generation %d", p.Generation)
			}
			lines = append(lines, line)
		}
		for _, ep := range n.Endpoints {
			e, ok := f.endpoints[ep.ID]
			state := "missing"
			if ok && !e.gone {
				state = fmt.Sprintf("mtu %d mac %s", e.mtu, e.ep.MAC)
			}
			lines = append(lines, fmt.Sprintf("veth %s addr %s %s", dataplane.HostVethName(ep.ID), ep.Addr, state))
		}
	}
	return strings.Join(lines, "\n")
}
