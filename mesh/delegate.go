package mesh

import (
	"context"
	"log/slog"
	"slices"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
	"github.com/wgmesh/wgmesh/mesh/records"
)

// delegate adapts Mesh to memberlist's callbacks. Every method returns
// quickly and never calls into memberlist while holding m.mu (see the
// locking rule on Mesh).
type delegate struct{ m *Mesh }

var (
	_ memberlist.Delegate         = (*delegate)(nil)
	_ memberlist.EventDelegate    = (*delegate)(nil)
	_ memberlist.AliveDelegate    = (*delegate)(nil)
	_ memberlist.ConflictDelegate = (*delegate)(nil)
	_ memberlist.PingDelegate     = (*delegate)(nil)
)

// bound returns the identity the catalog binds to a node name. It reads
// the catalog, which code holding m.mu may do.
func (m *Mesh) bound(name string) (crypto.NodeID, bool) {
	var id crypto.NodeID
	var ok bool
	m.node.FSM().Read(func(s *catalog.State) {
		if n, found := s.Nodes[name]; found {
			id, ok = n.ID, true
		}
	})
	return id, ok
}

func (d *delegate) NodeMeta(limit int) []byte {
	d.m.mu.Lock()
	defer d.m.mu.Unlock()
	if len(d.m.state.own.meta) > limit {
		d.m.log.Error("node metadata too large", "bytes", len(d.m.state.own.meta), "limit", limit)
		return nil
	}
	return d.m.state.own.meta
}

func (d *delegate) NotifyMsg(b []byte) {
	d.m.gossip.stats.received(len(b))
	if len(b) > 0 && b[0] == records.KindName {
		d.notifyName(b)
		return
	}
	msg, err := records.DecodeMessage(b)
	if err != nil {
		d.m.mu.Lock()
		d.m.state.rep.Refuse("message-invalid")
		d.m.mu.Unlock()
		d.m.log.Debug("dropping gossip message", "err", err)
		return
	}
	if msg.Kind == records.KindObservation {
		d.m.receiveObservation(msg.Signed)
		return
	}
	var changed bool
	var name string
	d.m.mu.Lock()
	switch msg.Kind {
	case records.KindEntry:
		changed = d.m.state.rep.MergeEntry(msg.Signed, d.m.bound)
		if changed {
			e, _ := records.DecodeEntry(msg.Signed)
			name = "entry/" + e.Node + "/" + e.Subnet.String()
		}
	case records.KindSession:
		changed = d.m.state.rep.MergeSession(msg.Signed, d.m.bound)
		if changed {
			r, _ := records.DecodeSession(msg.Signed)
			name = sessionBroadcastName(r)
		}
	}
	if changed {
		d.m.touchLocked()
	}
	d.m.mu.Unlock()
	if changed {
		// Pass news on, as Serf does: memberlist sends a node's
		// broadcasts to a few random members only, so past the direct
		// fan-out a message would reach a fraction of the cluster until
		// the next push/pull. Only what was news here is relayed, so
		// every node relays a version at most once, and a newer version
		// replaces an older one still queued.
		if len(b) <= maxBroadcast {
			d.m.gossip.queue.QueueBroadcast(&broadcast{name: name, msg: slices.Clone(b)})
		}
		d.m.kickLoop()
	}
}

func sessionBroadcastName(r RelaySession) string {
	return "session/" + r.Relay + "/" + r.Subnet.String() + "/" + r.A + "/" + r.B
}

func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte {
	out := d.m.gossip.queue.GetBroadcasts(overhead, limit)
	for _, b := range out {
		d.m.gossip.stats.sent(len(b))
		if len(b) > 0 && b[0] == records.KindName {
			d.m.gossip.stats.nameSent(len(b))
		}
	}
	return out
}

func (d *delegate) LocalState(join bool) []byte {
	d.m.mu.Lock()
	defer d.m.mu.Unlock()
	s := d.m.state.rep.Snapshot(false)
	for _, n := range s.Names {
		d.m.gossip.stats.nameStateBytes.Add(uint64(len(n.Data) + len(n.Sig)))
	}
	return mustJSON(s)
}

func (d *delegate) MergeRemoteState(buf []byte, join bool) {
	d.m.gossip.stats.received(len(buf))
	s, err := records.DecodeStateMsg(buf)
	if err != nil {
		d.m.log.Warn("dropping state from push/pull", "err", err)
		return
	}
	changed := false
	now := time.Now()
	d.m.mu.Lock()
	for _, e := range s.Entries {
		changed = d.m.state.rep.MergeEntry(e, d.m.bound) || changed
	}
	for _, r := range s.Sessions {
		changed = d.m.state.rep.MergeSession(r, d.m.bound) || changed
	}
	if changed {
		d.m.touchLocked()
	}
	for _, n := range s.Names {
		d.m.mergeNameLocked(n, now)
	}
	d.m.mu.Unlock()
	if changed {
		d.m.kickLoop()
	}
}

// NotifyAlive refuses nodes whose metadata this node cannot read (they
// speak another protocol, or are not wgmesh, or sign with an identity
// their info does not name), and nodes whose name the catalog binds to
// another identity: a second host with a taken name never becomes a
// member here, and the refusal shows in status.
func (d *delegate) NotifyAlive(n *memberlist.Node) error {
	if n.Name == d.m.cfg.Name {
		return nil
	}
	info, _, err := records.DecodeMeta(n.Meta)
	if err != nil {
		d.m.mu.Lock()
		d.m.state.rep.Refuse("meta-invalid")
		d.m.mu.Unlock()
		return err
	}
	if id, ok := d.m.bound(n.Name); ok && id != info.ID {
		d.m.problems.nameTaken(n.Name, n.Addr.String(), id, info.ID)
		d.m.mu.Lock()
		d.m.state.rep.Refuse("info-wrong-identity")
		d.m.mu.Unlock()
		return errNameTaken(n.Name)
	}
	return nil
}

type errNameTaken string

func (e errNameTaken) Error() string {
	return "refusing node " + string(e) + ": the cluster binds that name to another identity"
}

// memberlist v0.7 never fills in Node.State (its nodeState.State shadows
// it), so liveness comes from which event fired, and "left" from the
// Leaving flag a node publishes in its metadata before it leaves.

func (d *delegate) NotifyJoin(n *memberlist.Node) { d.nodeEvent(n, Alive) }

func (d *delegate) NotifyUpdate(n *memberlist.Node) { d.nodeEvent(n, Alive) }

func (d *delegate) NotifyLeave(n *memberlist.Node) {
	state := Dead
	if info, _, err := records.DecodeMeta(n.Meta); err == nil && info.Leaving {
		state = Left
	}
	d.nodeEvent(n, state)
}

func (d *delegate) nodeEvent(n *memberlist.Node, state Liveness) {
	if n.Name == d.m.cfg.Name {
		return
	}
	info, s, err := records.DecodeMeta(n.Meta)
	now := time.Now()
	d.m.mu.Lock()
	if err == nil && info.Name == n.Name && d.m.state.rep.MergeInfo(info, s, d.m.bound) {
		d.m.touchLocked()
	}
	rec := d.m.state.live[n.Name]
	rec.addr = n.Address()
	prev := rec.state
	if prev != state {
		rec.state, rec.since = state, now
		d.m.touchLocked()
	}
	if state == Alive {
		// Joining counts as contact; suspicion is measured from here.
		rec.lastAck = now
		if !d.m.state.joined {
			// Another member is alive: this node has seen its cluster,
			// also if that member joined it before it reached its seeds.
			d.m.state.joined = true
			d.m.log.Info("joined the cluster", "via", n.Name)
		}
	}
	d.m.state.live[n.Name] = rec
	d.m.mu.Unlock()
	if prev != state {
		level := slog.LevelInfo
		if state == Dead {
			level = slog.LevelWarn
		}
		d.m.log.Log(context.Background(), level, "member "+state.String(), "peer", n.Name, "addr", n.Addr.String())
	}
	d.m.kickLoop()
}

// AckPayload implements memberlist.PingDelegate.
func (d *delegate) AckPayload() []byte { return nil }

// NotifyPingComplete records a direct probe answer: its time feeds the
// suspect state and its round trip goes into status.
func (d *delegate) NotifyPingComplete(n *memberlist.Node, rtt time.Duration, _ []byte) {
	d.m.mu.Lock()
	defer d.m.mu.Unlock()
	rec, ok := d.m.state.live[n.Name]
	if !ok {
		return
	}
	rec.lastAck, rec.rtt = time.Now(), rtt
	d.m.state.live[n.Name] = rec
}

// NotifyConflict: two hosts claim one node name at two addresses. The
// first stays a member; the problem shows in status on every host that
// sees it.
func (d *delegate) NotifyConflict(existing, other *memberlist.Node) {
	d.m.log.Error("two hosts use the same node name; give each a unique --node-name and a state directory of its own",
		"name", existing.Name, "addr", existing.Addr.String(), "other_addr", other.Addr.String())
	d.m.problems.conflict(existing.Name, existing.Addr.String(), other.Addr.String())
}
