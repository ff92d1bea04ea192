package mesh

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/wgmesh/wgmesh/mesh/records"
)

// This node's side of container names (records/names.go says what a name
// record is and how the replica merges them): publishing its own,
// refuting stale copies of them, expiring tombstones, and which names DNS
// may answer with.

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
		if err := rec.Validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		for len(records.EncodeNameMsg(records.Sign(m.cfg.Identity, records.PurposeName, rec))) > maxBroadcast && len(rec.Aliases) > 0 {
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
		if cur, _, ok := m.state.rep.Name(m.cfg.Name, ep); ok && cur.Equal(&rec) {
			continue
		}
		m.publishNameLocked(rec, now)
	}
	for cur := range m.state.rep.NameRecords() {
		if _, ok := want[cur.Endpoint]; cur.Node == m.cfg.Name && !ok && !cur.Deleted {
			m.publishNameLocked(NameRecord{Subnet: cur.Subnet, Endpoint: cur.Endpoint, Deleted: true}, now)
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
	s := records.Sign(m.cfg.Identity, records.PurposeName, rec)
	m.state.rep.SetOwnName(rec, s, now)
	m.state.outbox = append(m.state.outbox, outMsg{name: "name/" + rec.Node + "/" + rec.Endpoint, b: records.EncodeNameMsg(s)})
	m.namesTouchedLocked()
	m.kickLoop() // never blocks, so it may run under mu
}

// namesTouchedLocked records that the name records changed: the saved
// gossip is behind and NameChanges is signalled. The driver's loop is not
// woken: names are not its business.
func (m *Mesh) namesTouchedLocked() {
	m.state.gossipDirty = true
	m.notifyNames()
}

func (m *Mesh) notifyNames() {
	select {
	case m.signals.names <- struct{}{}:
	default:
	}
}

// mergeNameLocked merges a peer's name record and refutes a stale one of
// this node's.
func (m *Mesh) mergeNameLocked(s records.Signed, now time.Time) bool {
	res, n := m.state.rep.MergeName(s, m.bound, now)
	switch res {
	case records.NameChanged:
		m.namesTouchedLocked()
		return true
	case records.NameRefute:
		m.log.Debug("refuting a stale name record of this node", "endpoint", n.Endpoint, "version", n.Version)
		m.publishNameLocked(NameRecord{Subnet: n.Subnet, Endpoint: n.Endpoint, Deleted: true}, now)
		return false
	}
	return false
}

// pruneNamesLocked drops expired tombstones.
func (m *Mesh) pruneNamesLocked(now time.Time) {
	if m.state.rep.PruneNames(now, m.nameTTL()) {
		m.namesTouchedLocked()
	}
}

// nameTombstoneTTL is how long a tombstone is kept.
const nameTombstoneTTL = 5 * time.Minute

func (m *Mesh) nameTTL() time.Duration {
	if m.cfg.NameTombstoneTTL > 0 {
		return m.cfg.NameTombstoneTTL
	}
	return nameTombstoneTTL
}

// NameChanges is signalled whenever LiveNames may have changed: a record
// merged or removed, a member's liveness. Like Changes, it has a buffer
// of one and is never blocked on.
func (m *Mesh) NameChanges() <-chan struct{} { return m.signals.names }

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
	for rec := range m.state.rep.NameRecords() {
		if rec.Deleted {
			continue
		}
		mem, ok := v.Members[rec.Node]
		if !ok || !mem.Self && (!mem.Registered || !mem.State.Routable()) {
			continue
		}
		out = append(out, rec)
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
	for rec := range m.state.rep.NameRecords() {
		switch {
		case rec.Deleted:
			s.Tombstones++
		case rec.Node == m.cfg.Name:
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
	d.m.gossip.stats.nameRecvMsgs.Add(1)
	d.m.gossip.stats.nameRecvBytes.Add(uint64(len(b)))
	s, n, err := records.DecodeNameMsg(b)
	if err != nil {
		d.m.mu.Lock()
		d.m.state.rep.Refuse("message-invalid")
		d.m.mu.Unlock()
		d.m.log.Debug("dropping gossip message", "err", err)
		return
	}
	d.m.mu.Lock()
	changed := d.m.mergeNameLocked(s, time.Now())
	d.m.mu.Unlock()
	if changed && len(b) <= maxBroadcast {
		d.m.gossip.queue.QueueBroadcast(&broadcast{name: "name/" + n.Node + "/" + n.Endpoint, msg: slices.Clone(b)})
	}
	if changed {
		d.m.kickLoop()
	}
}
