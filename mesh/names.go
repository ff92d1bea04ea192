package mesh

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
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
// without names or address. Receivers keep a tombstone for
// nameTombstoneTTL, so that an older copy of the live record still making
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

// purposeName is the signature purpose of name records.
const purposeName = "name record"

// kindName marks a gossip message that carries a name record.
const kindName byte = 'N'

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

// nameTombstoneTTL is how long a tombstone is kept.
const nameTombstoneTTL = 5 * time.Minute

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

func (n *NameRecord) validate() error {
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

func (n *NameRecord) equal(o *NameRecord) bool {
	return n.Node == o.Node && n.Subnet == o.Subnet && n.Endpoint == o.Endpoint && n.Name == o.Name &&
		slices.Equal(n.Aliases, o.Aliases) && n.Addr == o.Addr && n.Deleted == o.Deleted
}

func encodeNameMsg(s signed) []byte {
	b, _ := json.Marshal(s)
	return append([]byte{kindName}, b...)
}

// decodeNameMsg decodes a name message from a peer; the signature is
// checked when it is merged.
func decodeNameMsg(b []byte) (signed, NameRecord, error) {
	if len(b) == 0 || b[0] != kindName {
		return signed{}, NameRecord{}, invalid("not a name message")
	}
	if len(b) > maxRecordBytes {
		return signed{}, NameRecord{}, invalid("message of %d bytes", len(b))
	}
	var s signed
	if err := json.Unmarshal(b[1:], &s); err != nil {
		return signed{}, NameRecord{}, invalid("message: %v", err)
	}
	n, err := decodeName(s)
	return s, n, err
}

// decodeName decodes a signed name record without checking its
// signature, which needs the identity of its node.
func decodeName(s signed) (NameRecord, error) {
	if len(s.Data) > maxRecordBytes {
		return NameRecord{}, invalid("name record of %d bytes", len(s.Data))
	}
	var n NameRecord
	if err := json.Unmarshal(s.Data, &n); err != nil {
		return NameRecord{}, invalid("name record: %v", err)
	}
	if err := n.validate(); err != nil {
		return NameRecord{}, err
	}
	return n, nil
}

type nameKey struct{ node, endpoint string }

type nameRec struct {
	n NameRecord
	s signed
	// seen is when this node got the record: tombstones expire from it.
	seen time.Time
}

// nameMerge is what merging a name record did.
type nameMerge int

const (
	nameIgnored nameMerge = iota
	nameChanged
	// nameRefute: a live record of this node that it does not hold.
	nameRefute
)

// mergeName merges a signed name record.
func (r *replica) mergeName(s signed, bound boundFunc, now time.Time) (nameMerge, NameRecord) {
	n, err := decodeName(s)
	if err != nil {
		r.refuse("name-invalid")
		return nameIgnored, n
	}
	k := nameKey{n.Node, n.Endpoint}
	cur, have := r.names[k]
	if n.Node == r.self {
		if !n.Deleted && (!have || cur.n.Version < n.Version) {
			return nameRefute, n
		}
		return nameIgnored, n
	}
	id, ok := r.identityOf(n.Node, bound)
	if !ok {
		r.refuse("name-unknown-node")
		return nameIgnored, n
	}
	if !id.Verify(purposeName, s.Data, s.Sig) {
		r.refuse("name-forged")
		return nameIgnored, n
	}
	if have && n.Version <= cur.n.Version {
		return nameIgnored, n
	}
	if !have && r.nameCount[n.Node] >= maxNameRecords {
		r.refuse("name-too-many")
		return nameIgnored, n
	}
	if !have {
		r.nameCount[n.Node]++
	}
	r.names[k] = nameRec{n, s, now}
	return nameChanged, n
}

// setOwnName stores a record of this node.
func (r *replica) setOwnName(n NameRecord, s signed, now time.Time) {
	k := nameKey{n.Node, n.Endpoint}
	if _, ok := r.names[k]; !ok {
		r.nameCount[n.Node]++
	}
	r.names[k] = nameRec{n, s, now}
}

func (r *replica) dropName(k nameKey) {
	if _, ok := r.names[k]; ok {
		delete(r.names, k)
		if r.nameCount[k.node]--; r.nameCount[k.node] <= 0 {
			delete(r.nameCount, k.node)
		}
	}
}

// pruneNames drops expired tombstones and reports whether it dropped
// any.
func (r *replica) pruneNames(now time.Time, ttl time.Duration) bool {
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
func (r *replica) forgetNames(node string, keep func(signed) bool) {
	for k, rec := range r.names {
		if k.node == node && (keep == nil || !keep(rec.s)) {
			r.dropName(k)
		}
	}
}

// nameSnapshot lists every name record, in a stable order.
func (r *replica) nameSnapshot() []signed {
	keys := slices.SortedFunc(maps.Keys(r.names), func(a, b nameKey) int {
		return cmp.Or(cmp.Compare(a.node, b.node), cmp.Compare(a.endpoint, b.endpoint))
	})
	var out []signed
	for _, k := range keys {
		out = append(out, r.names[k].s)
	}
	return out
}

// Name is one of this node's container endpoints and its DNS names, for
// SetNames.
type Name struct {
	Subnet   netip.Prefix
	Endpoint string
	Name     string
	Aliases  []string
	Addr     netip.Addr
}

// SetNames publishes this node's container names: names is the complete
// set. A record that is new or changed is published, one that is no
// longer in names gets a tombstone; calling it again with the same names
// sends nothing. A name that is not valid, or a record that would not fit
// one gossip message, is left out (aliases first) and reported in the
// error; the others are published all the same.
func (m *Mesh) SetNames(names []Name) error {
	var errs []error
	want := map[string]NameRecord{}
	for _, n := range names {
		rec := NameRecord{Node: m.cfg.Name, Subnet: n.Subnet, Endpoint: n.Endpoint, Name: n.Name, Addr: n.Addr, Version: 1}
		dropped := 0
		for _, a := range n.Aliases {
			switch {
			case a == n.Name || slices.Contains(rec.Aliases, a):
			case ValidDNSName(a) != nil || len(rec.Aliases)+1 >= MaxNames:
				dropped++
			default:
				rec.Aliases = append(rec.Aliases, a)
			}
		}
		if err := rec.validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		for len(encodeNameMsg(sign(m.cfg.Identity, purposeName, rec))) > maxBroadcast && len(rec.Aliases) > 0 {
			rec.Aliases = rec.Aliases[:len(rec.Aliases)-1]
			dropped++
		}
		if dropped > 0 {
			errs = append(errs, fmt.Errorf("container %s: %d of its names left out of DNS (not valid DNS names, or too many to fit)", n.Name, dropped))
		}
		want[n.Endpoint] = rec
	}
	now := time.Now()
	m.mu.Lock()
	for ep, rec := range want {
		if cur, ok := m.rep.names[nameKey{m.cfg.Name, ep}]; ok && cur.n.equal(&rec) {
			continue
		}
		m.publishNameLocked(rec, now)
	}
	for k, cur := range m.rep.names {
		if _, ok := want[k.endpoint]; k.node == m.cfg.Name && !ok && !cur.n.Deleted {
			m.publishNameLocked(NameRecord{Subnet: cur.n.Subnet, Endpoint: k.endpoint, Deleted: true}, now)
		}
	}
	m.mu.Unlock()
	if len(errs) > 0 {
		return fmt.Errorf("publishing names: %w", errors.Join(errs...))
	}
	return nil
}

// publishNameLocked signs a record of this node with a new version, keeps
// it and queues it for sending.
func (m *Mesh) publishNameLocked(rec NameRecord, now time.Time) {
	rec.Node = m.cfg.Name
	rec.Version = m.versionLocked()
	s := sign(m.cfg.Identity, purposeName, rec)
	m.rep.setOwnName(rec, s, now)
	m.outbox = append(m.outbox, outMsg{name: "name/" + rec.Node + "/" + rec.Endpoint, b: encodeNameMsg(s)})
	m.namesTouchedLocked()
	m.kickLoop() // never blocks, so it may run under mu
}

// namesTouchedLocked records that the name records changed: the saved
// gossip is behind and NameChanges is signalled. The driver's loop is not
// woken: names are not its business.
func (m *Mesh) namesTouchedLocked() {
	m.gossipDirty = true
	m.notifyNames()
}

func (m *Mesh) notifyNames() {
	select {
	case m.nameChanges <- struct{}{}:
	default:
	}
}

// mergeNameLocked merges a peer's name record and refutes a stale one of
// this node's.
func (m *Mesh) mergeNameLocked(s signed, now time.Time) bool {
	res, n := m.rep.mergeName(s, m.bound, now)
	switch res {
	case nameChanged:
		m.namesTouchedLocked()
		return true
	case nameRefute:
		m.log.Debug("refuting a stale name record of this node", "endpoint", n.Endpoint, "version", n.Version)
		m.publishNameLocked(NameRecord{Subnet: n.Subnet, Endpoint: n.Endpoint, Deleted: true}, now)
		return false
	}
	return false
}

// pruneNamesLocked drops expired tombstones.
func (m *Mesh) pruneNamesLocked(now time.Time) {
	if m.rep.pruneNames(now, m.nameTTL()) {
		m.namesTouchedLocked()
	}
}

func (m *Mesh) nameTTL() time.Duration {
	if m.cfg.NameTombstoneTTL > 0 {
		return m.cfg.NameTombstoneTTL
	}
	return nameTombstoneTTL
}

// NameChanges is signalled whenever LiveNames may have changed: a record
// merged or removed, a member's liveness. Like Changes, it has a buffer
// of one and is never blocked on.
func (m *Mesh) NameChanges() <-chan struct{} { return m.nameChanges }

// LiveNames returns the names DNS may answer with: those of this node
// and of registered members that gossip does not know to be down (alive,
// suspect, or not yet heard from since this node started, as for
// WireGuard peers), in a stable order. Tombstones and the names of failed
// or departed members are left out.
func (m *Mesh) LiveNames() []NameRecord {
	v := m.View()
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []NameRecord
	for k, rec := range m.rep.names {
		if rec.n.Deleted {
			continue
		}
		mem, ok := v.Members[k.node]
		if !ok || !mem.Self && (!mem.Registered || !mem.State.Routable()) {
			continue
		}
		out = append(out, rec.n)
	}
	slices.SortFunc(out, func(a, b NameRecord) int {
		return cmp.Or(cmp.Compare(a.Node, b.Node), cmp.Compare(a.Endpoint, b.Endpoint))
	})
	return out
}

// NameStats counts this node's name records.
type NameStats struct {
	// Own is how many live names this node publishes; Known how many
	// live records of every node it holds, and Tombstones how many
	// removals it remembers.
	Own, Known, Tombstones int
}

// NameStats reports how many name records this node holds.
func (m *Mesh) NameStats() NameStats {
	m.mu.Lock()
	defer m.mu.Unlock()
	var s NameStats
	for k, rec := range m.rep.names {
		switch {
		case rec.n.Deleted:
			s.Tombstones++
		case k.node == m.cfg.Name:
			s.Own++
			s.Known++
		default:
			s.Known++
		}
	}
	return s
}

// notifyName merges a name record from a peer and relays it once if it
// was news, as NotifyMsg does entries.
func (d *delegate) notifyName(b []byte) {
	d.m.stats.nameRecvMsgs.Add(1)
	d.m.stats.nameRecvBytes.Add(uint64(len(b)))
	s, n, err := decodeNameMsg(b)
	if err != nil {
		d.m.mu.Lock()
		d.m.rep.refuse("message-invalid")
		d.m.mu.Unlock()
		d.m.log.Debug("dropping gossip message", "err", err)
		return
	}
	d.m.mu.Lock()
	changed := d.m.mergeNameLocked(s, time.Now())
	d.m.mu.Unlock()
	if changed && len(b) <= maxBroadcast {
		d.m.queue.QueueBroadcast(&broadcast{name: "name/" + n.Node + "/" + n.Endpoint, msg: slices.Clone(b)})
	}
	if changed {
		d.m.kickLoop()
	}
}
