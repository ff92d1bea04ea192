package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"
	"github.com/docker/go-plugins-helpers/network"
)

// Plugin talks to a host's wgmesh plugin socket the way dockerd does, so
// tests and benchmarks can drive agents without a Docker engine.
type Plugin struct {
	host *Host
	http *http.Client
}

// Plugin returns a client for the host's plugin socket.
func (h *Host) Plugin() *Plugin {
	sock := filepath.Join(h.PluginDir(), "wgmesh.sock")
	return &Plugin{host: h, http: &http.Client{
		Timeout: 2 * time.Minute,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
	}}
}

// Call posts a request to a plugin endpoint such as
// "NetworkDriver.CreateNetwork" and decodes the answer into out.
func (p *Plugin) Call(ctx context.Context, method string, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://plugin/"+method, bytes.NewReader(b))
	if err != nil {
		return err
	}
	resp, err := p.http.Do(req)
	if err != nil {
		return fmt.Errorf("%s on %s: %w", method, p.host.Name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var e struct{ Err, Error string }
		_ = json.Unmarshal(body, &e)
		return fmt.Errorf("%s on %s: %s: %s", method, p.host.Name, resp.Status, e.Err+e.Error)
	}
	if out != nil {
		return json.Unmarshal(body, out)
	}
	return nil
}

func randomID() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// PluginNetwork is a network created through the plugin API.
type PluginNetwork struct {
	ID, PoolID string
	Subnet     string
	Gateway    string
}

// CreateNetwork makes the calls of `docker network create -d wgmesh
// --ipam-driver wgmesh --subnet SUBNET`.
func (p *Plugin) CreateNetwork(ctx context.Context, subnet string) (*PluginNetwork, error) {
	var pool ipam.RequestPoolResponse
	if err := p.Call(ctx, "IpamDriver.RequestPool", ipam.RequestPoolRequest{AddressSpace: "wgmesh", Pool: subnet}, &pool); err != nil {
		return nil, err
	}
	var gw ipam.RequestAddressResponse
	if err := p.Call(ctx, "IpamDriver.RequestAddress", ipam.RequestAddressRequest{PoolID: pool.PoolID,
		Options: map[string]string{"RequestAddressType": "com.docker.network.gateway"}}, &gw); err != nil {
		return nil, err
	}
	n := &PluginNetwork{ID: randomID(), PoolID: pool.PoolID, Subnet: pool.Pool, Gateway: gw.Address}
	err := p.Call(ctx, "NetworkDriver.CreateNetwork", network.CreateNetworkRequest{
		NetworkID: n.ID,
		Options:   map[string]any{"com.docker.network.enable_ipv6": false, "com.docker.network.generic": map[string]any{}},
		IPv4Data:  []*network.IPAMData{{AddressSpace: "wgmesh", Pool: pool.Pool, Gateway: gw.Address}},
	}, nil)
	return n, err
}

// PluginEndpoint is a container attachment made through the plugin API.
type PluginEndpoint struct {
	ID      string
	Address string // CIDR, as Docker gives it to the container
	IfName  string // the veth end Docker would move into the container
}

// Attach makes the calls of `docker run --network`: an address, an
// endpoint and a join. The caller moves IfName into a container.
func (p *Plugin) Attach(ctx context.Context, n *PluginNetwork) (*PluginEndpoint, error) {
	return p.AttachTo(ctx, n, "/var/run/docker/netns/test")
}

// AttachTo is Attach with the sandbox key Docker would give for the
// container's network namespace (see Host.ContainerNS).
func (p *Plugin) AttachTo(ctx context.Context, n *PluginNetwork, sandboxKey string) (*PluginEndpoint, error) {
	return p.AttachAt(ctx, n, sandboxKey, "")
}

// AttachAt is AttachTo with the fixed address of `docker run --ip want`;
// "" lets the IPAM choose.
func (p *Plugin) AttachAt(ctx context.Context, n *PluginNetwork, sandboxKey, want string) (*PluginEndpoint, error) {
	mac := "02:42:" + strings.Join([]string{randomID()[:2], randomID()[:2], randomID()[:2], randomID()[:2]}, ":")
	var addr ipam.RequestAddressResponse
	// Docker sends the MAC address with every container's request, and
	// with it a fixed address tells wgmesh it is a container's --ip.
	if err := p.Call(ctx, "IpamDriver.RequestAddress", ipam.RequestAddressRequest{PoolID: n.PoolID, Address: want,
		Options: map[string]string{"com.docker.network.endpoint.macaddress": mac}}, &addr); err != nil {
		return nil, err
	}
	ep := &PluginEndpoint{ID: randomID(), Address: addr.Address}
	if err := p.Call(ctx, "NetworkDriver.CreateEndpoint", network.CreateEndpointRequest{NetworkID: n.ID, EndpointID: ep.ID,
		Interface: &network.EndpointInterface{Address: addr.Address, MacAddress: mac}}, nil); err != nil {
		return nil, err
	}
	var join network.JoinResponse
	if err := p.Call(ctx, "NetworkDriver.Join", network.JoinRequest{NetworkID: n.ID, EndpointID: ep.ID, SandboxKey: sandboxKey}, &join); err != nil {
		return nil, err
	}
	ep.IfName = join.InterfaceName.SrcName
	return ep, nil
}

// Detach makes the calls of removing a container from a network: a
// leave, the endpoint's deletion and the release of its address.
func (p *Plugin) Detach(ctx context.Context, n *PluginNetwork, ep *PluginEndpoint) error {
	if err := p.Call(ctx, "NetworkDriver.Leave", network.LeaveRequest{NetworkID: n.ID, EndpointID: ep.ID}, nil); err != nil {
		return err
	}
	if err := p.Call(ctx, "NetworkDriver.DeleteEndpoint", network.DeleteEndpointRequest{NetworkID: n.ID, EndpointID: ep.ID}, nil); err != nil {
		return err
	}
	return p.Call(ctx, "IpamDriver.ReleaseAddress", ipam.ReleaseAddressRequest{PoolID: n.PoolID, Address: strings.Split(ep.Address, "/")[0]}, nil)
}

// DeleteNetwork makes the calls of `docker network rm`: the network's
// deletion, then the release of its gateway address and its pool.
func (p *Plugin) DeleteNetwork(ctx context.Context, n *PluginNetwork) error {
	if err := p.Call(ctx, "NetworkDriver.DeleteNetwork", network.DeleteNetworkRequest{NetworkID: n.ID}, nil); err != nil {
		return err
	}
	if err := p.Call(ctx, "IpamDriver.ReleaseAddress", ipam.ReleaseAddressRequest{PoolID: n.PoolID, Address: strings.Split(n.Gateway, "/")[0]}, nil); err != nil {
		return err
	}
	return p.Call(ctx, "IpamDriver.ReleasePool", ipam.ReleasePoolRequest{PoolID: n.PoolID}, nil)
}

// Container is a stand-in for a container: a network namespace holding
// an endpoint's interface, as Docker would set it up.
type Container struct {
	Name string
	Path string // /run/netns/<name>
	IP   string
}

// ContainerNS is the network namespace NewContainer makes for a stand-in
// container of that name: its sandbox key.
func (h *Host) ContainerNS(name string) string { return "/run/netns/" + h.containerNSName(name) }

func (h *Host) containerNSName(name string) string { return h.lab.Prefix + "-" + h.Name + "-" + name }

// NewContainer moves an endpoint's interface from the host into a new
// namespace, names it eth0, and configures its address, like Docker.
func (h *Host) NewContainer(ctx context.Context, name string, ep *PluginEndpoint) (*Container, error) {
	ns := h.containerNSName(name)
	c := &Container{Name: ns, Path: h.ContainerNS(name), IP: strings.Split(ep.Address, "/")[0]}
	steps := [][]string{
		{"ip", "netns", "add", ns},
		{"ip", "-n", h.NetNS, "link", "set", ep.IfName, "netns", ns},
		{"ip", "-n", ns, "link", "set", ep.IfName, "name", "eth0"},
		{"ip", "-n", ns, "addr", "add", ep.Address, "dev", "eth0"},
		{"ip", "-n", ns, "link", "set", "eth0", "up"},
		{"ip", "-n", ns, "link", "set", "lo", "up"},
	}
	for _, s := range steps {
		if _, err := run(ctx, s[0], s[1:]...); err != nil {
			return nil, err
		}
	}
	h.mu.Lock()
	h.containers = append(h.containers, ns)
	h.mu.Unlock()
	return c, nil
}

// RemoveContainer deletes a stand-in container's namespace, and with it
// the container end of its veth pair, as removing a container does.
func (h *Host) RemoveContainer(ctx context.Context, c *Container) error {
	if _, err := run(ctx, "ip", "netns", "del", c.Name); err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.containers = slices.DeleteFunc(h.containers, func(ns string) bool { return ns == c.Name })
	return nil
}

// Exec runs a command inside the stand-in container.
func (c *Container) Exec(ctx context.Context, name string, args ...string) (string, error) {
	return run(ctx, "nsenter", append([]string{"--net=" + c.Path, name}, args...)...)
}
