package mesh

// Upgrading a node's state from the wgmesh that claimed blocks by a
// quorum of gossiped promises (state file format 1, mesh.json) to the
// catalog: once the node is a registered member, it asks the cluster to
// adopt the blocks it owned, creates its networks in the catalog with
// the old gateway scheme (each host took its gateway from a block of its
// own, so a subnet's first address may belong to a container), and
// records their Docker definitions. A block another node already owns in
// the catalog is a conflict the old protocol should have prevented: the
// upgrade stops and says so in status, and the old file stays. On
// success the old file is renamed, so it is done once.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/wgmesh/wgmesh/internal/durable"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

const (
	legacyFile     = "mesh.json"
	legacyUpgraded = "mesh.json.v1-upgraded"
)

// legacyState is what an old state file says about this node.
type legacyState struct {
	path   string
	blocks map[netip.Prefix][]netip.Prefix
	specs  map[netip.Prefix]legacySpec
	// running, err and last are the upgrade's progress.
	running bool
	err     error
	last    time.Time
}

// legacyFileV1 is the part of format 1 that matters here.
type legacyFileV1 struct {
	V    int `json:"v"`
	Nets []struct {
		Node   string         `json:"n"`
		Subnet netip.Prefix   `json:"s"`
		Blocks []netip.Prefix `json:"b"`
		Spec   *legacySpec    `json:"spec"`
	} `json:"nets"`
}

type legacySpec struct {
	Version     uint64                `json:"v"`
	Deleted     bool                  `json:"d"`
	Name        string                `json:"n"`
	IPRange     netip.Prefix          `json:"r"`
	Gateway     netip.Addr            `json:"g"`
	Aux         map[string]netip.Addr `json:"a"`
	Options     map[string]string     `json:"o"`
	IPAMOptions map[string]string     `json:"io"`
	Labels      map[string]string     `json:"l"`
	Internal    bool                  `json:"i"`
}

// loadLegacy reads an old state file, if there is one.
func loadLegacy(path, self string) (*legacyState, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	var f legacyFileV1
	if err := json.Unmarshal(b, &f); err != nil || f.V != 1 {
		return nil, fmt.Errorf("%s is not a wgmesh state file this version can upgrade (format %d, %v): "+
			"move it away to start this node afresh, at the cost of its address blocks", path, f.V, err)
	}
	l := &legacyState{path: path, blocks: map[netip.Prefix][]netip.Prefix{}, specs: map[netip.Prefix]legacySpec{}}
	for _, e := range f.Nets {
		if catalog.ValidSubnet(e.Subnet) != nil {
			continue
		}
		if e.Node == self && len(e.Blocks) > 0 {
			l.blocks[e.Subnet] = append(l.blocks[e.Subnet], e.Blocks...)
		}
		if e.Spec != nil && (l.specs[e.Subnet].Version < e.Spec.Version) {
			l.specs[e.Subnet] = *e.Spec
		}
	}
	return l, nil
}

// legacyRetry is how long a failed upgrade waits before trying again.
const legacyRetry = 30 * time.Second

// migrateLegacy starts the upgrade once this node is registered.
func (m *Mesh) migrateLegacy(ctx context.Context) {
	m.mu.Lock()
	l := m.state.legacy
	if l == nil || l.running || l.err != nil && time.Since(l.last) < legacyRetry {
		m.mu.Unlock()
		return
	}
	if !m.node.Status().Registered {
		m.mu.Unlock()
		return
	}
	l.running = true
	m.mu.Unlock()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		err := m.upgrade(ctx, l)
		m.mu.Lock()
		l.running, l.err, l.last = false, err, time.Now()
		if err == nil {
			m.state.legacy = nil
		}
		m.mu.Unlock()
		if err != nil {
			m.log.Error("upgrading state from before consensus; will retry", "err", err)
		}
	}()
}

func (m *Mesh) upgrade(ctx context.Context, l *legacyState) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	subnets := map[netip.Prefix]bool{}
	for s := range l.blocks {
		subnets[s] = true
	}
	for s, spec := range l.specs {
		if !spec.Deleted {
			subnets[s] = true
		}
	}
	adopted := 0
	for _, subnet := range slices.SortedFunc(maps.Keys(subnets), catalog.ComparePrefix) {
		blocks := l.blocks[subnet]
		spec, hasSpec := l.specs[subnet]
		hasSpec = hasSpec && !spec.Deleted
		e := catalog.EnsureNetwork{Subnet: subnet, HostGateways: true}
		for _, b := range blocks {
			// Claims were never bigger than the network's block size.
			if e.BlockBits == 0 || b.Bits() < e.BlockBits {
				e.BlockBits = b.Bits()
			}
		}
		if hasSpec {
			e.Gateway = spec.Gateway
		}
		if _, err := m.EnsureNetwork(ctx, e); err != nil {
			return err
		}
		if hasSpec {
			for _, a := range slices.SortedFunc(maps.Values(spec.Aux), netip.Addr.Compare) {
				if err := m.Reserve(ctx, subnet, a); err != nil {
					return err
				}
			}
		}
		if len(blocks) > 0 {
			if _, err := m.propose(ctx, &catalog.Command{Op: catalog.OpAdopt, Adopt: &catalog.Adopt{Subnet: subnet, Blocks: blocks}}); err != nil {
				return fmt.Errorf("adopting this node's blocks of %s: %w", subnet, err)
			}
			adopted += len(blocks)
		}
		if hasSpec && catalog.ValidNetworkName(spec.Name) == nil {
			s := catalog.Spec{Name: spec.Name, IPRange: spec.IPRange, Options: spec.Options, IPAMOptions: spec.IPAMOptions,
				Labels: spec.Labels, Internal: spec.Internal}
			if err := m.PublishSpec(ctx, subnet, s); err != nil && !errors.Is(err, catalog.ErrNetworkConflict) {
				return fmt.Errorf("recording network %s: %w", spec.Name, err)
			}
		}
	}
	dst := l.path[:len(l.path)-len(legacyFile)] + legacyUpgraded
	if err := os.Rename(l.path, dst); err != nil {
		return fmt.Errorf("renaming the upgraded state file: %w", err)
	}
	if err := durable.SyncDir(m.cfg.StateDir); err != nil {
		return err
	}
	m.log.Info("upgraded this node's state from before consensus", "networks", len(subnets), "blocks_adopted", adopted, "old_file", dst)
	return nil
}
