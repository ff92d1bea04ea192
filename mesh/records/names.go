package records

import (
	"cmp"
	"encoding/json"
	"fmt"
	"iter"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// Names are the DNS names of containers: each node publishes, signed with
// its identity like its other records, one NameRecord per container
// endpoint it runs on a wgmesh network, and every node answers DNS
// queries from them. A record's key is its node and endpoint; versions
// order a node's own records as for NetworkEntry.
//
// Removing a name publishes the record once more as a tombstone: deleted,
// without names or address. Receivers keep a tombstone for a
// while (the TTL Mesh passes to PruneNames), so that an older copy of the live record still making
// its way through gossip cannot bring the name back, and then drop it.
// After that, a node that receives a live record of its own that it does
// not hold (its tombstone expired, or its disk lost it) refutes it with a
// new tombstone, as memberlist refutes a suspicion: a stale copy that
// comes back is taken away again as soon as it reaches its node.
//
// A node keeps its own records in its saved gossip, so that an agent
// restart neither drops its names nor forgets which ones to take back:
// the first look at Docker after the restart publishes what changed
// meanwhile, tombstones included.
//
// The names of a node that gossip declares failed, or that left, are not
// used: they come back when the node does.

// PurposeName is the signature purpose of name records.
const PurposeName = "name record"

// KindName marks a gossip message that carries a name record.
const KindName byte = 'N'

// NameRecord is one container endpoint's DNS names on one network.
type NameRecord struct {
	Node   string       `json:"n"`
	Subnet netip.Prefix `json:"s"`
	// Endpoint is Docker's endpoint ID, shortened: unique on its node.
	Endpoint string `json:"e"`
	Version  uint64 `json:"v"`
	// Name is the container's name; Aliases are its other DNS names on
	// the network (network aliases, compose service names).
	Name    string     `json:"m,omitempty"`
	Aliases []string   `json:"l,omitempty"`
	Addr    netip.Addr `json:"a,omitzero"`
	// Deleted marks a tombstone: the endpoint is gone.
	Deleted bool `json:"x,omitempty"`
}

// Limits on name records.
const (
	// MaxNames bounds a record's names, its container name included.
	MaxNames = 16
	// MaxNameLen is DNS's limit on a name's length.
	MaxNameLen = 253
	// maxNameRecords bounds the records kept per node, tombstones
	// included.
	maxNameRecords = 8192
	minEndpointLen = 12
	maxEndpointLen = 64
)

// ValidDNSName reports whether s can be a container's name in DNS:
// labels of letters, digits, '-' and '_' (Docker's container names and
// compose's use it), at most 63 bytes each, at most MaxNameLen in all.
func ValidDNSName(s string) error {
	if s == "" || len(s) > MaxNameLen {
		return fmt.Errorf("name %.64q: length %d not in 1..%d", s, len(s), MaxNameLen)
	}
	for label := range strings.SplitSeq(s, ".") {
		if label == "" || len(label) > 63 {
			return fmt.Errorf("name %.64q: empty label or label longer than 63 bytes", s)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return fmt.Errorf("name %.64q: byte %q is not a letter, digit, '-' or '_'", s, c)
			}
		}
	}
	return nil
}

func validEndpoint(s string) bool {
	if len(s) < minEndpointLen || len(s) > maxEndpointLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !(s[i] >= '0' && s[i] <= '9' || s[i] >= 'a' && s[i] <= 'f') {
			return false
		}
	}
	return true
}

func (n *NameRecord) Validate() error {
	if err := catalog.ValidName(n.Node); err != nil {
		return invalid("%v", err)
	}
	if err := catalog.ValidSubnet(n.Subnet); err != nil {
		return invalid("%v", err)
	}
	if !validEndpoint(n.Endpoint) {
		return invalid("name record of %s: endpoint %.70q is not a hex ID of %d to %d digits", n.Node, n.Endpoint, minEndpointLen, maxEndpointLen)
	}
	if n.Version == 0 || n.Version > maxVersion {
		return invalid("name record %s/%s: version %d out of range", n.Node, n.Endpoint, n.Version)
	}
	if n.Deleted {
		if n.Name != "" || len(n.Aliases) > 0 || n.Addr.IsValid() {
			return invalid("name record %s/%s: a tombstone has no names and no address", n.Node, n.Endpoint)
		}
		return nil
	}
	if 1+len(n.Aliases) > MaxNames {
		return invalid("name record %s/%s: %d names, at most %d", n.Node, n.Endpoint, 1+len(n.Aliases), MaxNames)
	}
	for _, s := range append([]string{n.Name}, n.Aliases...) {
		if err := ValidDNSName(s); err != nil {
			return invalid("name record %s/%s: %v", n.Node, n.Endpoint, err)
		}
	}
	if !n.Addr.Is4() || !n.Subnet.Contains(n.Addr) {
		return invalid("name record %s/%s: address %s is not in %s", n.Node, n.Endpoint, n.Addr, n.Subnet)
	}
	return nil
}

func (n *NameRecord) Equal(o *NameRecord) bool {
	return n.Node == o.Node && n.Subnet == o.Subnet && n.Endpoint == o.Endpoint && n.Name == o.Name &&
		slices.Equal(n.Aliases, o.Aliases) && n.Addr == o.Addr && n.Deleted == o.Deleted
}

func EncodeNameMsg(s Signed) []byte {
	b, _ := json.Marshal(s)
	return append([]byte{KindName}, b...)
}

// DecodeNameMsg decodes a name message from a peer; the signature is
// checked when it is merged.
func DecodeNameMsg(b []byte) (Signed, NameRecord, error) {
	if len(b) == 0 || b[0] != KindName {
		return Signed{}, NameRecord{}, invalid("not a name message")
	}
	if len(b) > maxRecordBytes {
		return Signed{}, NameRecord{}, invalid("message of %d bytes", len(b))
	}
	var s Signed
	if err := json.Unmarshal(b[1:], &s); err != nil {
		return Signed{}, NameRecord{}, invalid("message: %v", err)
	}
	n, err := DecodeName(s)
	return s, n, err
}

// DecodeName decodes a signed name record without checking its
// signature, which needs the identity of its node.
func DecodeName(s Signed) (NameRecord, error) {
	if len(s.Data) > maxRecordBytes {
		return NameRecord{}, invalid("name record of %d bytes", len(s.Data))
	}
	var n NameRecord
	if err := json.Unmarshal(s.Data, &n); err != nil {
		return NameRecord{}, invalid("name record: %v", err)
	}
	if err := n.Validate(); err != nil {
		return NameRecord{}, err
	}
	return n, nil
}

type nameKey struct{ node, endpoint string }

type nameRec struct {
	n NameRecord
	s Signed
	// seen is when this node got the record: tombstones expire from it.
	seen time.Time
}

// NameMerge is what merging a name record did.
type NameMerge int

const (
	NameIgnored NameMerge = iota
	NameChanged
	// NameRefute: a live record of this node that it does not hold.
	NameRefute
)

// MergeName merges a signed name record.
func (r *Replica) MergeName(s Signed, bound BoundFunc, now time.Time) (NameMerge, NameRecord) {
	n, err := DecodeName(s)
	if err != nil {
		r.Refuse("name-invalid")
		return NameIgnored, n
	}
	k := nameKey{n.Node, n.Endpoint}
	cur, have := r.names[k]
	if n.Node == r.self {
		if !n.Deleted && (!have || cur.n.Version < n.Version) {
			return NameRefute, n
		}
		return NameIgnored, n
	}
	id, ok := r.IdentityOf(n.Node, bound)
	if !ok {
		r.Refuse("name-unknown-node")
		return NameIgnored, n
	}
	if !id.Verify(PurposeName, s.Data, s.Sig) {
		r.Refuse("name-forged")
		return NameIgnored, n
	}
	if have && n.Version <= cur.n.Version {
		return NameIgnored, n
	}
	if !have && r.nameCount[n.Node] >= maxNameRecords {
		r.Refuse("name-too-many")
		return NameIgnored, n
	}
	if !have {
		r.nameCount[n.Node]++
	}
	r.names[k] = nameRec{n, s, now}
	return NameChanged, n
}

// SetOwnName stores a record of this node.
func (r *Replica) SetOwnName(n NameRecord, s Signed, now time.Time) {
	k := nameKey{n.Node, n.Endpoint}
	if _, ok := r.names[k]; !ok {
		r.nameCount[n.Node]++
	}
	r.names[k] = nameRec{n, s, now}
}

func (r *Replica) dropName(k nameKey) {
	if _, ok := r.names[k]; ok {
		delete(r.names, k)
		if r.nameCount[k.node]--; r.nameCount[k.node] <= 0 {
			delete(r.nameCount, k.node)
		}
	}
}

// PruneNames drops expired tombstones and reports whether it dropped
// any.
func (r *Replica) PruneNames(now time.Time, ttl time.Duration) bool {
	dropped := false
	for k, rec := range r.names {
		if rec.n.Deleted && now.Sub(rec.seen) > ttl {
			r.dropName(k)
			dropped = true
		}
	}
	return dropped
}

// forgetNames drops a node's name records; with keep, only those not
// signed by it.
func (r *Replica) forgetNames(node string, keep func(Signed) bool) {
	for k, rec := range r.names {
		if k.node == node && (keep == nil || !keep(rec.s)) {
			r.dropName(k)
		}
	}
}

// nameSnapshot lists every name record, in a stable order.
func (r *Replica) nameSnapshot() []Signed {
	keys := slices.SortedFunc(maps.Keys(r.names), func(a, b nameKey) int {
		return cmp.Or(cmp.Compare(a.node, b.node), cmp.Compare(a.endpoint, b.endpoint))
	})
	var out []Signed
	for _, k := range keys {
		out = append(out, r.names[k].s)
	}
	return out
}

// Name returns the name record of a node's endpoint, with its signature.
func (r *Replica) Name(node, endpoint string) (NameRecord, Signed, bool) {
	rec, ok := r.names[nameKey{node, endpoint}]
	return rec.n, rec.s, ok
}

// NameRecords yields every name record, tombstones included, in no
// particular order.
func (r *Replica) NameRecords() iter.Seq[NameRecord] {
	return func(yield func(NameRecord) bool) {
		for _, rec := range r.names {
			if !yield(rec.n) {
				return
			}
		}
	}
}
