package driver

// Network sync: a wgmesh network created on one host appears on every
// host, with the same name and options, for as long as the cluster has
// it; `wgmesh network rm` removes it everywhere.
//
// The plugin never learns a network's name (Docker does not send it), so
// the sync loop reads local networks from Docker's API and records each
// one's definition in the catalog (catalog.Spec) the first time. Every
// host compares the catalog with its own Docker:
//
//	local network      catalog                       action
//	none               a network with a definition   create it through Docker
//	L                  a network, no definition yet  record L's definition
//	L                  deleted                       remove L, unless containers use it
//	L                  a network named otherwise     report it
//
// Removing a network on one host (`docker network rm`, or a `docker
// network prune` from cron) removes that host's copy only, and the loop
// puts it back: no host decides for the others, and no prune leaves a
// host unable to run a container on a network the cluster has.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// DockerNetwork is a network as Docker's API shows it.
type DockerNetwork struct {
	ID          string
	Name        string
	Subnet      netip.Prefix
	IPRange     netip.Prefix
	Gateway     netip.Addr
	Aux         map[string]netip.Addr
	Options     map[string]string
	IPAMOptions map[string]string
	Labels      map[string]string
	Internal    bool
	// Containers lists the names of the containers attached to it.
	Containers []string
}

// DockerAPI is what network sync needs of the local Docker engine.
type DockerAPI interface {
	// Networks lists the networks of driver (as Docker names it).
	Networks(ctx context.Context, driver string) ([]DockerNetwork, error)
	// CreateNetwork creates a network with driver and IPAM driver.
	CreateNetwork(ctx context.Context, driver string, n DockerNetwork) error
	// RemoveNetwork removes a network by ID.
	RemoveNetwork(ctx context.Context, id string) error
	// EndpointPID returns the process ID of the running container that
	// holds endpoint endpointID of network netID (Docker's IDs), whose
	// /proc/PID/ns/net is the container's network namespace wherever
	// dockerd keeps its sandbox keys. It returns ErrEndpointGone when
	// Docker knows no such endpoint or its container is not running.
	EndpointPID(ctx context.Context, netID, endpointID string) (int, error)
}

// ErrEndpointGone says Docker has no running container on an endpoint.
var ErrEndpointGone = errors.New("no running container has the endpoint")

// syncAction is one step of a sync plan.
type syncAction struct {
	kind   string // "publish", "create", "remove"
	subnet netip.Prefix
	spec   catalog.Spec  // publish: what to record
	create DockerNetwork // create: what to create
	local  DockerNetwork // publish, remove: the local network
}

// planSync decides what to do; problems are reported in status.
func planSync(locals []DockerNetwork, v *mesh.View) (actions []syncAction, problems []string) {
	bySubnet := map[netip.Prefix]DockerNetwork{}
	names := map[string]netip.Prefix{}
	for _, l := range locals {
		bySubnet[l.Subnet] = l
		names[l.Name] = l.Subnet
	}
	for _, subnet := range slices.SortedFunc(maps.Keys(bySubnet), catalog.ComparePrefix) {
		l := bySubnet[subnet]
		n := v.Network(subnet)
		switch {
		case n == nil && v.Deleted(subnet):
			del := v.Catalog.Networks[subnet]
			if len(l.Containers) == 0 {
				actions = append(actions, syncAction{kind: "remove", subnet: subnet, local: l})
			} else {
				problems = append(problems, fmt.Sprintf("network %s (%s) was removed from the cluster (by %s), but containers here still use it: %s; it goes once they do",
					l.Name, subnet, del.DeletedBy, strings.Join(l.Containers, ", ")))
			}
		case n == nil:
			// Not in this node's catalog yet.
		case n.Spec == nil:
			actions = append(actions, syncAction{kind: "publish", subnet: subnet, spec: specOf(l), local: l})
		case n.Spec.Name != l.Name:
			problems = append(problems, fmt.Sprintf("network %s here is called %s in the cluster; a subnet is one network, give it one name "+
				"(remove this copy; the agent creates it under the cluster's name)", l.Name, n.Spec.Name))
		}
	}
	for _, subnet := range v.Subnets() {
		n := v.Network(subnet)
		if n.Spec == nil {
			continue
		}
		if _, ok := bySubnet[subnet]; ok {
			continue
		}
		if other, taken := names[n.Spec.Name]; taken {
			problems = append(problems, fmt.Sprintf("cannot create network %s (%s) here: a network of that name already has %s", n.Spec.Name, subnet, other))
			continue
		}
		actions = append(actions, syncAction{kind: "create", subnet: subnet, create: dockerNetworkOf(n)})
	}
	return actions, problems
}

// specOf is the definition of a local network.
func specOf(l DockerNetwork) catalog.Spec {
	return catalog.Spec{Name: l.Name, IPRange: l.IPRange, Options: maps.Clone(l.Options), IPAMOptions: maps.Clone(l.IPAMOptions),
		Labels: maps.Clone(l.Labels), Internal: l.Internal}
}

// dockerNetworkOf is what to create for a network of the catalog.
func dockerNetworkOf(n *catalog.Network) DockerNetwork {
	s := n.Spec
	dn := DockerNetwork{Name: s.Name, Subnet: n.Subnet, IPRange: s.IPRange,
		Options: maps.Clone(s.Options), IPAMOptions: maps.Clone(s.IPAMOptions), Labels: maps.Clone(s.Labels), Internal: s.Internal}
	if n.Gateway != n.Subnet.Addr().Next() {
		// Given with --gateway where it was created; the default needs no
		// asking, so the copy looks like the original in Docker.
		dn.Gateway = n.Gateway
	}
	if len(n.Aux) > 0 {
		dn.Aux = map[string]netip.Addr{}
		for i, a := range n.Aux {
			dn.Aux[fmt.Sprintf("aux%d", i+1)] = a
		}
	}
	return dn
}

// syncInterval is how often the loop looks at Docker without being asked
// to; local changes and the catalog's wake it at once.
const syncInterval = 30 * time.Second

// RunSync keeps this host's Docker networks in step with the catalog
// until ctx is done. It does nothing without a Docker API or with
// SyncNetworks off.
func (d *Driver) RunSync(ctx context.Context) error {
	if d.cfg.Docker == nil || !d.cfg.SyncNetworks {
		return nil
	}
	t := time.NewTicker(syncInterval)
	defer t.Stop()
	failing := false
	for {
		err := d.syncOnce(ctx)
		switch {
		case err != nil && !failing:
			d.log.Warn("syncing networks with Docker; retrying", "err", err)
			failing = true
		case err == nil && failing:
			d.log.Info("syncing networks with Docker works again")
			failing = false
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-d.syncKick:
		}
	}
}

func (d *Driver) kickSync() {
	select {
	case d.syncKick <- struct{}{}:
	default:
	}
}

// kickSyncSoon kicks the sync loop once Docker has finished what it was
// doing when it called the plugin.
func (d *Driver) kickSyncSoon() { time.AfterFunc(time.Second, d.kickSync) }

// isCopy reports whether the sync loop is creating subnet's network.
func (d *Driver) isCopy(subnet netip.Prefix) bool {
	_, ok := d.copying[subnet]
	return ok
}

func (d *Driver) copyName(subnet netip.Prefix) string { return d.copying[subnet] }

func (d *Driver) syncOnce(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, d.cfg.RequestTimeout)
	defer cancel()
	docker, err := d.cfg.Docker.Networks(ctx, d.cfg.DriverName)
	if err != nil {
		return fmt.Errorf("listing Docker networks: %w", err)
	}
	v := d.cfg.Mesh.View()
	d.mu.Lock()
	var locals []DockerNetwork
	for _, dn := range docker {
		n, ok := d.state.Networks[dn.ID]
		if !ok {
			// Docker knows it, this agent does not (yet): CreateNetwork
			// is still running, or it was made by another agent.
			continue
		}
		dn.Subnet = n.Subnet
		locals = append(locals, dn)
	}
	d.mu.Unlock()

	actions, problems := planSync(locals, v)
	var errs []error
	for _, a := range actions {
		switch a.kind {
		case "publish":
			if err := d.cfg.Mesh.PublishSpec(ctx, a.subnet, a.spec); err != nil {
				if errors.Is(err, catalog.ErrNetworkConflict) {
					problems = append(problems, fmt.Sprintf("network %s (%s): %v", a.spec.Name, a.subnet, err))
					continue
				}
				errs = append(errs, fmt.Errorf("recording network %s in the cluster: %w", a.spec.Name, err))
			}
		case "remove":
			d.log.Info("removing network removed from the cluster", "name", a.local.Name, "subnet", a.subnet)
			if err := d.cfg.Docker.RemoveNetwork(ctx, a.local.ID); err != nil {
				errs = append(errs, fmt.Errorf("removing network %s: %w", a.local.Name, err))
			}
		case "create":
			d.log.Info("creating network of the cluster", "name", a.create.Name, "subnet", a.subnet)
			d.mu.Lock()
			d.copying[a.subnet] = a.create.Name
			d.mu.Unlock()
			err := d.cfg.Docker.CreateNetwork(ctx, d.cfg.DriverName, a.create)
			d.mu.Lock()
			delete(d.copying, a.subnet)
			d.mu.Unlock()
			if err != nil {
				problems = append(problems, fmt.Sprintf("creating network %s (%s) here: %v", a.create.Name, a.subnet, err))
			}
		}
	}
	d.mu.Lock()
	d.syncProblems = problems
	d.mu.Unlock()
	return errors.Join(errs...)
}

// publishEndpointsLocked tells the mesh how many containers this host has
// on a network, so that a removal elsewhere can say where it is in use.
func (d *Driver) publishEndpointsLocked(netID string) {
	if n, ok := d.state.Networks[netID]; ok {
		d.cfg.Mesh.SetEndpoints(n.Subnet, len(d.state.endpointsOf(netID)))
	}
}

// RemoveClusterNetwork removes a network, by name or subnet, from the
// whole cluster: every host removes its copy. It is refused while
// containers use the network on any host, naming the hosts.
func (d *Driver) RemoveClusterNetwork(ctx context.Context, network string) (netip.Prefix, error) {
	v := d.cfg.Mesh.View()
	var subnet netip.Prefix
	if n, ok := v.Catalog.NetworkByName(network); ok {
		subnet = n.Subnet
	} else if p, err := netip.ParsePrefix(network); err == nil && v.Network(p) != nil {
		subnet = p
	} else {
		return netip.Prefix{}, fmt.Errorf("no network %q in the cluster (give its name or subnet)", network)
	}
	if err := d.cfg.Mesh.DeleteNetwork(ctx, subnet); err != nil {
		return netip.Prefix{}, err
	}
	d.log.Info("network removed from the cluster", "network", network, "subnet", subnet)
	d.kickSync()
	return subnet, nil
}
