package dockerapi

import (
	"context"
	"errors"
	"net/netip"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/moby/moby/api/types/events"
	"github.com/moby/moby/client"

	"github.com/wgmesh/wgmesh/driver/dns"
)

var _ dns.Docker = (*Client)(nil)

// gatewayBridge is the network libnetwork connects containers of
// networks without a gateway (wgmesh's, overlay's) to for the outside
// world; their default route, and so their DNS queries to the host, go
// through it.
const gatewayBridge = "docker_gwbridge"

// Endpoints implements dns.Docker.
func (c *Client) Endpoints(ctx context.Context, driverName string) ([]dns.Endpoint, map[string]netip.Addr, error) {
	list, err := c.c.NetworkList(ctx, client.NetworkListOptions{Filters: make(client.Filters).Add("driver", driverName)})
	if err != nil {
		return nil, nil, err
	}
	var out []dns.Endpoint
	for _, s := range list.Items {
		res, err := c.c.NetworkInspect(ctx, s.ID, client.NetworkInspectOptions{})
		if err != nil {
			continue // removed meanwhile
		}
		n := res.Network
		if len(n.IPAM.Config) == 0 {
			continue
		}
		subnet := n.IPAM.Config[0].Subnet
		for id, ep := range n.Containers {
			if strings.HasPrefix(id, "ep-") || !ep.IPv4Address.IsValid() {
				continue // an endpoint without a container
			}
			out = append(out, dns.Endpoint{NetworkID: n.ID, Subnet: subnet, ContainerID: id, EndpointID: ep.EndpointID, Addr: ep.IPv4Address.Addr()})
		}
	}
	gw := map[string]netip.Addr{}
	res, err := c.c.NetworkInspect(ctx, gatewayBridge, client.NetworkInspectOptions{})
	switch {
	case errdefs.IsNotFound(err):
		// No container needed it yet.
	case err != nil:
		return nil, nil, err
	default:
		for id, ep := range res.Network.Containers {
			if ep.IPv4Address.IsValid() {
				gw[id] = ep.IPv4Address.Addr()
			}
		}
	}
	return out, gw, nil
}

// Container implements dns.Docker.
func (c *Client) Container(ctx context.Context, id string) (dns.Container, error) {
	res, err := c.c.ContainerInspect(ctx, id, client.ContainerInspectOptions{})
	if err != nil {
		return dns.Container{}, err
	}
	ci := res.Container
	out := dns.Container{ID: ci.ID, Name: strings.TrimPrefix(ci.Name, "/"), Networks: map[string]dns.Attachment{}}
	if ci.NetworkSettings == nil {
		return out, nil
	}
	for _, es := range ci.NetworkSettings.Networks {
		if es == nil || es.NetworkID == "" {
			continue
		}
		// Docker 25 and later list every name in DNSNames; earlier
		// engines have the aliases (with the short ID and hostname).
		names := append(append([]string{}, es.Aliases...), es.DNSNames...)
		out.Networks[es.NetworkID] = dns.Attachment{EndpointID: es.EndpointID, Addr: es.IPAddress, Names: names}
	}
	return out, nil
}

// Events implements dns.Docker.
func (c *Client) Events(ctx context.Context) (<-chan dns.Event, <-chan error) {
	ctx, cancel := context.WithCancel(ctx)
	res := c.c.Events(ctx, client.EventsListOptions{Filters: make(client.Filters).
		Add("type", string(events.ContainerEventType), string(events.NetworkEventType)).
		Add("event", string(events.ActionStart), string(events.ActionDie), string(events.ActionDestroy), string(events.ActionRename),
			string(events.ActionConnect), string(events.ActionDisconnect))})
	out := make(chan dns.Event)
	errc := make(chan error, 1)
	go func() {
		defer cancel()
		defer close(out)
		for {
			select {
			case m := <-res.Messages:
				id := m.Actor.ID
				if m.Type == events.NetworkEventType {
					id = m.Actor.Attributes["container"]
				}
				if id == "" {
					continue
				}
				select {
				case out <- dns.Event{ContainerID: id}:
				case <-ctx.Done():
					errc <- ctx.Err()
					return
				}
			case err := <-res.Err:
				if errors.Is(err, context.Canceled) {
					err = nil
				}
				errc <- err
				return
			case <-ctx.Done():
				errc <- nil
				return
			}
		}
	}()
	return out, errc
}

var _ dns.BridgeLister = (*Client)(nil)

// BridgeSubnets implements dns.BridgeLister: the IPv4 subnets of the
// networks of Docker's bridge driver (docker0, user-defined bridges,
// docker_gwbridge), whose containers reach the DNS server through
// their bridge. Other drivers' subnets are not the host's alone: a
// macvlan network's may be the LAN's.
func (c *Client) BridgeSubnets(ctx context.Context) ([]netip.Prefix, error) {
	list, err := c.c.NetworkList(ctx, client.NetworkListOptions{Filters: make(client.Filters).Add("driver", "bridge")})
	if err != nil {
		return nil, err
	}
	var out []netip.Prefix
	for _, n := range list.Items {
		// Whatever the filter takes, only the bridge driver's count.
		if n.Driver != "bridge" {
			continue
		}
		for _, cfg := range n.IPAM.Config {
			if cfg.Subnet.IsValid() && cfg.Subnet.Addr().Is4() {
				out = append(out, cfg.Subnet.Masked())
			}
		}
	}
	return out, nil
}
