// Package dockerapi is driver.DockerAPI on the local Docker engine's API,
// through moby's client library.
package dockerapi

import (
	"context"
	"fmt"
	"maps"
	"slices"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/network"
	"github.com/moby/moby/client"

	"github.com/wgmesh/wgmesh/driver"
)

// Client talks to one Docker engine.
type Client struct{ c *client.Client }

var _ driver.DockerAPI = (*Client)(nil)

// New returns a client of the engine at host (for example
// unix:///var/run/docker.sock). The client negotiates the API version
// (the library's default; WithAPIVersionNegotiation is a deprecated
// no-op), so engines from 20.10 on work; it connects lazily.
func New(host string) (*Client, error) {
	c, err := client.New(client.WithHost(host))
	if err != nil {
		return nil, fmt.Errorf("docker client for %s: %w", host, err)
	}
	return &Client{c: c}, nil
}

// Close releases the client's connections.
func (c *Client) Close() error { return c.c.Close() }

// Networks implements driver.DockerAPI.
func (c *Client) Networks(ctx context.Context, driverName string) ([]driver.DockerNetwork, error) {
	list, err := c.c.NetworkList(ctx, client.NetworkListOptions{Filters: make(client.Filters).Add("driver", driverName)})
	if err != nil {
		return nil, err
	}
	var out []driver.DockerNetwork
	for _, s := range list.Items {
		// The list leaves out containers; inspect has them.
		res, err := c.c.NetworkInspect(ctx, s.ID, client.NetworkInspectOptions{})
		if err != nil {
			continue // removed meanwhile
		}
		n := res.Network
		dn := driver.DockerNetwork{
			ID: n.ID, Name: n.Name, Options: maps.Clone(n.Options), Labels: maps.Clone(n.Labels),
			IPAMOptions: maps.Clone(n.IPAM.Options), Internal: n.Internal,
		}
		if len(n.IPAM.Config) > 0 {
			cfg := n.IPAM.Config[0]
			dn.Subnet, dn.IPRange, dn.Gateway, dn.Aux = cfg.Subnet, cfg.IPRange, cfg.Gateway, maps.Clone(cfg.AuxAddress)
		}
		for _, ep := range n.Containers {
			dn.Containers = append(dn.Containers, ep.Name)
		}
		slices.Sort(dn.Containers)
		out = append(out, dn)
	}
	return out, nil
}

// CreateNetwork implements driver.DockerAPI.
func (c *Client) CreateNetwork(ctx context.Context, driverName string, n driver.DockerNetwork) error {
	cfg := network.IPAMConfig{Subnet: n.Subnet, IPRange: n.IPRange, Gateway: n.Gateway, AuxAddress: maps.Clone(n.Aux)}
	_, err := c.c.NetworkCreate(ctx, n.Name, client.NetworkCreateOptions{
		Driver:   driverName,
		IPAM:     &network.IPAM{Driver: driverName, Options: maps.Clone(n.IPAMOptions), Config: []network.IPAMConfig{cfg}},
		Options:  maps.Clone(n.Options),
		Labels:   maps.Clone(n.Labels),
		Internal: n.Internal,
	})
	return err
}

// RemoveNetwork implements driver.DockerAPI.
func (c *Client) RemoveNetwork(ctx context.Context, id string) error {
	_, err := c.c.NetworkRemove(ctx, id, client.NetworkRemoveOptions{})
	return err
}

// EndpointPID implements driver.DockerAPI.
func (c *Client) EndpointPID(ctx context.Context, netID, endpointID string) (int, error) {
	res, err := c.c.NetworkInspect(ctx, netID, client.NetworkInspectOptions{})
	if cerrdefs.IsNotFound(err) {
		return 0, driver.ErrEndpointGone
	}
	if err != nil {
		return 0, err
	}
	for id, ep := range res.Network.Containers {
		if ep.EndpointID != endpointID {
			continue
		}
		ctr, err := c.c.ContainerInspect(ctx, id, client.ContainerInspectOptions{})
		if cerrdefs.IsNotFound(err) {
			return 0, driver.ErrEndpointGone
		}
		if err != nil {
			return 0, err
		}
		if st := ctr.Container.State; st == nil || !st.Running || st.Pid == 0 {
			return 0, driver.ErrEndpointGone
		}
		return ctr.Container.State.Pid, nil
	}
	return 0, driver.ErrEndpointGone
}
