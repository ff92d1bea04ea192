package reachability

import (
	"context"
	"iter"
	"log/slog"
	"net/netip"
	"slices"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/gossipnet"
	"github.com/wgmesh/wgmesh/mesh/records"
)

// Transport is what this package uses of the gossip port.
type Transport interface {
	// Sightings: where each member's gossip last came from, directly.
	Sightings() map[string]gossipnet.Sighting
	// Reflections: where relays saw this node's gossip port.
	Reflections() map[string]gossipnet.Sighting
	// Probe and Fits send path MTU probes (gossipnet.Transport.Probe).
	Probe(ctx context.Context, name string, to netip.AddrPort, size, copies int, timeout time.Duration) (bool, error)
	Fits(name string, to netip.AddrPort, size int) bool
}

var _ Transport = (*gossipnet.Transport)(nil)

// Cluster is what the Tracker reads of the members, and the versions it
// stamps on this node's observations. The Tracker calls it only from its
// own methods, that is with the caller's lock held, so an implementation
// must not take that lock again.
type Cluster interface {
	// IdentityOf is the identity a member's records must be signed by.
	IdentityOf(name string) (crypto.NodeID, bool)
	// Refuse counts a record refused, by reason.
	Refuse(reason string)
	// Info and Infos are the members' published infos.
	Info(name string) (records.NodeInfo, bool)
	Infos() iter.Seq2[string, records.NodeInfo]
	// Reachable reports whether gossip sees the member alive or suspect.
	Reachable(name string) bool
	// Version returns a new version for one of this node's records.
	Version() uint64
}

// Config is what a Tracker needs.
type Config struct {
	// Name and Identity are this node's: observations of others are
	// signed with Identity.
	Name     string
	Identity crypto.Identity
	// Transport is the gossip port, Cluster the members.
	Transport Transport
	Cluster   Cluster
	Logger    *slog.Logger
}

// Tracker is this node's view of how members reach it. It has no lock:
// its caller serialises every call (mesh holds its own lock), which is
// also what lets it read the Cluster.
type Tracker struct {
	cfg Config
	// obs are the observations of this node, by observer; sent what this
	// node last told each member it observes.
	obs  map[string]timedObs
	sent map[string]timedObs
	// wg is where this node sees its peers' WireGuard handshakes come
	// from, by peer and network.
	wg  map[string]map[netip.Prefix]netip.AddrPort
	nat NAT
	// reflectAsked is when each relay was last asked for a reflection.
	reflectAsked map[netip.AddrPort]time.Time
}

type timedObs struct {
	o  records.Observation
	at time.Time
}

// NewTracker returns a Tracker that has observed nothing yet.
func NewTracker(cfg Config) *Tracker {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Tracker{cfg: cfg, obs: map[string]timedObs{}, sent: map[string]timedObs{}, reflectAsked: map[netip.AddrPort]time.Time{}}
}

// NAT is this node's judgement of its own NAT, as of the last Reassess.
func (t *Tracker) NAT() NAT { return t.nat }

// SetWGSightings sets where this node sees its WireGuard peers'
// handshakes come from: by peer, by network. Each peer is told what this
// node sees of it.
func (t *Tracker) SetWGSightings(s map[string]map[netip.Prefix]netip.AddrPort) { t.wg = s }

// Forget drops what a member forgotten by the cluster said of this node.
func (t *Tracker) Forget(name string) { delete(t.obs, name) }

// ReflectTarget is a relay to ask for a reflection, and where.
type ReflectTarget struct {
	Name string
	To   netip.AddrPort
}

// ReflectTargets lists the relays to ask for a reflection now: each
// every reflectEvery, a new one at once.
func (t *Tracker) ReflectTargets(now time.Time) []ReflectTarget {
	var out []ReflectTarget
	seen := map[netip.AddrPort]bool{}
	for name, n := range t.cfg.Cluster.Infos() {
		if name == t.cfg.Name || n.RelayPort == 0 || n.NAT != records.NATNone || !t.cfg.Cluster.Reachable(name) {
			continue
		}
		to := netip.AddrPortFrom(n.Addr, n.RelayPort)
		seen[to] = true
		if now.Sub(t.reflectAsked[to]) >= reflectEvery {
			t.reflectAsked[to] = now
			out = append(out, ReflectTarget{name, to})
		}
	}
	for to := range t.reflectAsked {
		if !seen[to] {
			delete(t.reflectAsked, to)
		}
	}
	slices.SortFunc(out, func(a, b ReflectTarget) int { return a.To.Compare(b.To) })
	return out
}

// RouteHints is what the gossip transport needs to reach members, from
// what they publish.
func (t *Tracker) RouteHints() map[string]gossipnet.RouteHint {
	h := map[string]gossipnet.RouteHint{}
	for name, n := range t.cfg.Cluster.Infos() {
		hint := gossipnet.RouteHint{Advertised: netip.AddrPortFrom(n.Addr, n.GossipPort), BehindNAT: n.NAT.Behind(),
			Header: n.Features&records.FeatureHeader != 0, ReplayProof: n.Features&records.FeatureReplayProof != 0,
			// The upper half of an info's version is its node's
			// generation (mesh's versionLocked), in every version so far.
			ID: n.ID, Gen: n.Version >> 32}
		if n.NAT == records.NATConsistent {
			hint.Public = n.Seen
		}
		h[name] = hint
	}
	return h
}
