package mesh

import (
	"net/netip"

	"github.com/wgmesh/wgmesh/mesh/catalog"
	"github.com/wgmesh/wgmesh/mesh/records"
)

// The signed records live in package records; these names keep mesh's
// API as the driver and cmd knew it before the split.

// NodeInfo is what a node publishes about itself (records.NodeInfo).
type NodeInfo = records.NodeInfo

// NetworkEntry is one node's state in one network (records.NetworkEntry).
type NetworkEntry = records.NetworkEntry

// RelayWant is one node's wish about its path to one peer (records.RelayWant).
type RelayWant = records.RelayWant

// RelaySession is a relay's record of a pair it forwards (records.RelaySession).
type RelaySession = records.RelaySession

// Observation is what one node sees of another (records.Observation).
type Observation = records.Observation

// NameRecord is one container endpoint's DNS names on one network
// (records.NameRecord).
type NameRecord = records.NameRecord

// NATKind is how a node's NAT maps its ports, as its peers see it
// (records.NATKind).
type NATKind = records.NATKind

// The kinds of NAT (records.NATUnknown and the others).
const (
	NATUnknown    = records.NATUnknown
	NATNone       = records.NATNone
	NATConsistent = records.NATConsistent
	NATSymmetric  = records.NATSymmetric
)

// FeatureRelayBind is records.FeatureRelayBind, for tests elsewhere.
const FeatureRelayBind = records.FeatureRelayBind

// Limits on name records (records.MaxNames, records.MaxNameLen).
const (
	MaxNames   = records.MaxNames
	MaxNameLen = records.MaxNameLen
)

// ErrInvalid is wrapped by every validation error of a peer's record
// (records.ErrInvalid).
var ErrInvalid = records.ErrInvalid

// ValidDNSName reports whether s can be a container's name in DNS
// (records.ValidDNSName).
func ValidDNSName(s string) error { return records.ValidDNSName(s) }

// ValidSubnet reports whether p can identify a wgmesh network.
func ValidSubnet(p netip.Prefix) error { return catalog.ValidSubnet(p) }
