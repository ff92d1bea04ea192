package driver

// Network sync: a wgmesh network created on one host appears on every
// host, with the same name and options, and a removal follows the same
// path.
//
// The plugin never learns a network's name (Docker does not send it), so
// the sync loop reads local networks from Docker's API and publishes each
// one's definition in the mesh (mesh.NetworkSpec, newest version wins).
// Every host compares the newest spec of each subnet with its own Docker:
//
//	local network    newest spec                   action
//	none             a network                     create it through Docker
//	L (version v)    none, or older than v         publish L's definition
//	L (version v)    a removal newer than v        remove L, unless containers use it
//	L (version v)    a network as new as v or more nothing: L is a copy of it
//
// A local network's version is the stamp of its creation here, or, for a
// copy this loop made, the version of the spec it copies: a copy must
// never look newer than a later removal.

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
}

// syncAction is one step of a sync plan.
type syncAction struct {
	kind   string // "publish", "create", "remove"
	subnet netip.Prefix
	spec   mesh.NetworkSpec // publish: what to publish; create: what to copy
	local  DockerNetwork    // publish, remove: the local network
}

// localNet is a local wgmesh network with the version it stands for.
type localNet struct {
	DockerNetwork
	version uint64
	// sharedGateway is set when the gateway was given with --gateway.
	sharedGateway bool
}

// planSync decides what to do; problems are reported in status.
func planSync(locals []localNet, v *mesh.View) (actions []syncAction, problems []string) {
	bySubnet := map[netip.Prefix]localNet{}
	names := map[string]netip.Prefix{}
	for _, l := range locals {
		bySubnet[l.Subnet] = l
		names[l.Name] = l.Subnet
	}
	for _, subnet := range slices.SortedFunc(maps.Keys(bySubnet), func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) }) {
		l := bySubnet[subnet]
		spec, from := v.Spec(subnet)
		switch {
		case spec == nil || spec.Version < l.version:
			actions = append(actions, syncAction{kind: "publish", subnet: subnet, spec: specOf(l), local: l.DockerNetwork})
		case spec.Deleted:
			if len(l.Containers) == 0 {
				actions = append(actions, syncAction{kind: "remove", subnet: subnet, local: l.DockerNetwork})
			} else {
				problems = append(problems, fmt.Sprintf("network %s (%s) was removed on %s, but containers here still use it: %s; it goes once they do",
					l.Name, subnet, from, strings.Join(l.Containers, ", ")))
			}
		case spec.Name != l.Name:
			problems = append(problems, fmt.Sprintf("network %s here is called %s on %s; a subnet is one network, give it one name", l.Name, spec.Name, from))
		}
	}
	for _, subnet := range v.Subnets() {
		spec, from := v.Spec(subnet)
		if spec == nil {
			continue
		}
		if _, ok := bySubnet[subnet]; ok {
			continue
		}
		if spec.Deleted {
			if users := v.Users(subnet); len(users) > 0 {
				var where []string
				for _, node := range slices.Sorted(maps.Keys(users)) {
					where = append(where, fmt.Sprintf("%s (%d)", node, users[node]))
				}
				problems = append(problems, fmt.Sprintf("network %s (%s) was removed on %s, but containers still use it on %s",
					spec.Name, subnet, from, strings.Join(where, ", ")))
			}
			continue
		}
		if other, taken := names[spec.Name]; taken {
			problems = append(problems, fmt.Sprintf("cannot create network %s (%s) here: a network of that name already has %s", spec.Name, subnet, other))
			continue
		}
		actions = append(actions, syncAction{kind: "create", subnet: subnet, spec: *spec.Clone()})
	}
	return actions, problems
}

// specOf is the definition of a local network.
func specOf(l localNet) mesh.NetworkSpec {
	s := mesh.NetworkSpec{
		Version: l.version, Name: l.Name, IPRange: l.IPRange, Aux: maps.Clone(l.Aux),
		Options: maps.Clone(l.Options), IPAMOptions: maps.Clone(l.IPAMOptions), Labels: maps.Clone(l.Labels), Internal: l.Internal,
	}
	if l.sharedGateway {
		s.Gateway = l.Gateway
	}
	return s
}

// RunSync keeps this host's Docker networks in step with the mesh until
// ctx is done. It does nothing without a Docker API.
func (d *Driver) RunSync(ctx context.Context) error {
	if d.cfg.Docker == nil {
		return nil
	}
	t := time.NewTicker(5 * time.Second)
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

func (d *Driver) syncOnce(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, d.cfg.RequestTimeout)
	defer cancel()
	docker, err := d.cfg.Docker.Networks(ctx, d.cfg.DriverName)
	if err != nil {
		return fmt.Errorf("listing Docker networks: %w", err)
	}
	v := d.cfg.Mesh.View()
	d.mu.Lock()
	var locals []localNet
	for _, dn := range docker {
		n, ok := d.state.Networks[dn.ID]
		if !ok {
			// Docker knows it, this agent does not (yet): CreateNetwork
			// is still running, or it was made by another agent.
			continue
		}
		dn.Subnet = n.Subnet
		l := localNet{DockerNetwork: dn, version: n.SpecVersion}
		if p := d.state.Pools[n.PoolID]; p != nil && p.Allocated[n.Gateway] == AllocSharedGateway {
			l.sharedGateway = true
		}
		locals = append(locals, l)
	}
	d.mu.Unlock()

	actions, problems := planSync(locals, v)
	var errs []error
	for _, a := range actions {
		switch a.kind {
		case "publish":
			if err := d.cfg.Mesh.PublishSpec(a.subnet, a.spec); err != nil {
				errs = append(errs, fmt.Errorf("publishing network %s: %w", a.spec.Name, err))
			}
		case "remove":
			d.log.Info("removing network removed elsewhere", "name", a.local.Name, "subnet", a.subnet)
			d.mu.Lock()
			d.syncing[a.subnet] = true
			d.mu.Unlock()
			if err := d.cfg.Docker.RemoveNetwork(ctx, a.local.ID); err != nil {
				errs = append(errs, fmt.Errorf("removing network %s: %w", a.local.Name, err))
			}
			d.mu.Lock()
			delete(d.syncing, a.subnet)
			d.mu.Unlock()
		case "create":
			d.log.Info("creating network created elsewhere", "name", a.spec.Name, "subnet", a.subnet)
			d.mu.Lock()
			d.pendingCopies[a.subnet] = a.spec.Version
			d.mu.Unlock()
			err := d.cfg.Docker.CreateNetwork(ctx, d.cfg.DriverName, dockerNetworkOf(a.subnet, a.spec))
			d.mu.Lock()
			delete(d.pendingCopies, a.subnet)
			d.mu.Unlock()
			if err != nil {
				problems = append(problems, fmt.Sprintf("creating network %s (%s) here: %v", a.spec.Name, a.subnet, err))
			}
		}
	}
	d.mu.Lock()
	d.syncProblems = problems
	d.mu.Unlock()
	return errors.Join(errs...)
}

func dockerNetworkOf(subnet netip.Prefix, s mesh.NetworkSpec) DockerNetwork {
	return DockerNetwork{
		Name: s.Name, Subnet: subnet, IPRange: s.IPRange, Gateway: s.Gateway, Aux: maps.Clone(s.Aux),
		Options: maps.Clone(s.Options), IPAMOptions: maps.Clone(s.IPAMOptions), Labels: maps.Clone(s.Labels), Internal: s.Internal,
	}
}

// publishRemovalLocked publishes that a network was removed on this host,
// unless the removal came from the mesh in the first place.
func (d *Driver) publishRemovalLocked(n *Network) {
	if d.cfg.Docker == nil || d.syncing[n.Subnet] {
		return
	}
	spec, _ := d.cfg.Mesh.View().Spec(n.Subnet)
	if spec != nil && spec.Deleted && spec.Version >= n.SpecVersion {
		return
	}
	removal := mesh.NetworkSpec{Deleted: true, Name: "removed"}
	if spec != nil {
		removal.Name = spec.Name
	}
	if err := d.cfg.Mesh.PublishSpec(n.Subnet, removal); err != nil {
		d.log.Warn("publishing network removal", "subnet", n.Subnet, "err", err)
	}
}

// publishEndpointsLocked tells the mesh how many containers this host has
// on a network, so that a removal elsewhere can say where it is in use.
func (d *Driver) publishEndpointsLocked(netID string) {
	if n, ok := d.state.Networks[netID]; ok {
		d.cfg.Mesh.SetEndpoints(n.Subnet, len(d.state.endpointsOf(netID)))
	}
}
