package mesh

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
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

func (d *delegate) NodeMeta(limit int) []byte {
	d.m.mu.Lock()
	defer d.m.mu.Unlock()
	if len(d.m.meta) > limit {
		d.m.log.Error("node metadata too large", "bytes", len(d.m.meta), "limit", limit)
		return nil
	}
	return d.m.meta
}

func (d *delegate) NotifyMsg(b []byte) {
	d.m.stats.received(len(b))
	msg, err := decodeMessage(b)
	if err != nil {
		d.m.log.Warn("dropping gossip message", "err", err)
		return
	}
	d.m.mu.Lock()
	var changed bool
	var relay string
	switch {
	case msg.Net != nil:
		changed = d.m.rep.mergeNet(*msg.Net)
		relay = "net/" + msg.Net.Node + "/" + msg.Net.Subnet.String()
	case msg.Forget != nil:
		changed = d.m.rep.mergeForget(*msg.Forget)
		if changed {
			delete(d.m.live, msg.Forget.Node)
		}
		relay = "forget/" + msg.Forget.Node
	case msg.Vote != nil:
		vt := msg.Vote
		if vt.To == d.m.cfg.Name {
			// A vote changes nothing replicated: it only wakes the loop.
			voted := d.m.recordVoteLocked(claimKey{vt.Subnet, Claim{vt.Block, vt.Attempt}}, vt.From)
			d.m.mu.Unlock()
			if voted {
				d.m.kickLoop()
			}
			return
		}
	}
	if changed {
		d.m.dirty = true
	}
	d.m.mu.Unlock()
	if changed {
		// Pass news on, as Serf does: memberlist sends a node's
		// broadcasts to a few random members only, so past the
		// direct fan-out a message would reach a fraction of the
		// cluster until the next push/pull. Only what was news here
		// is relayed, so every node relays a version at most once, and
		// a newer version replaces an older one still queued.
		if len(b) <= maxBroadcast {
			d.m.queue.QueueBroadcast(&broadcast{name: relay, msg: slices.Clone(b)})
		}
		d.m.kickLoop()
	}
}

func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte {
	out := d.m.queue.GetBroadcasts(overhead, limit)
	for _, b := range out {
		d.m.stats.sent(len(b))
	}
	return out
}

func (d *delegate) LocalState(join bool) []byte {
	d.m.mu.Lock()
	defer d.m.mu.Unlock()
	return encodeState(d.m.rep.snapshot())
}

func (d *delegate) MergeRemoteState(buf []byte, join bool) {
	d.m.stats.received(len(buf))
	s, err := decodeState(buf)
	if err != nil {
		d.m.log.Warn("dropping state from push/pull", "err", err)
		return
	}
	d.m.mu.Lock()
	changed := d.m.rep.mergeSnapshot(s)
	if changed {
		d.m.dirty = true
	}
	d.m.mu.Unlock()
	if changed {
		d.m.kickLoop()
	}
}

// NotifyAlive refuses nodes whose metadata this node cannot read: they
// speak another protocol version, or are not wgmesh at all.
func (d *delegate) NotifyAlive(n *memberlist.Node) error {
	if n.Name == d.m.cfg.Name {
		return nil
	}
	if _, err := decodeMeta(n.Meta); err != nil {
		return fmt.Errorf("refusing node %s: %w", n.Name, err)
	}
	return nil
}

// memberlist v0.7 never fills in Node.State (its nodeState.State shadows
// it), so liveness comes from which event fired, and "left" from the
// Leaving flag a node publishes in its metadata before it leaves.

func (d *delegate) NotifyJoin(n *memberlist.Node) { d.nodeEvent(n, Alive) }

func (d *delegate) NotifyUpdate(n *memberlist.Node) { d.nodeEvent(n, Alive) }

func (d *delegate) NotifyLeave(n *memberlist.Node) {
	state := Dead
	if info, err := decodeMeta(n.Meta); err == nil && info.Leaving {
		state = Left
	}
	d.nodeEvent(n, state)
}

func (d *delegate) nodeEvent(n *memberlist.Node, state Liveness) {
	if n.Name == d.m.cfg.Name {
		return
	}
	info, err := decodeMeta(n.Meta)
	now := time.Now()
	d.m.mu.Lock()
	if err == nil && info.Name == n.Name {
		if d.m.rep.mergeNode(info) {
			d.m.dirty = true
		}
	}
	rec := d.m.live[n.Name]
	prev := rec.state
	if prev != state {
		rec.state, rec.since = state, now
		if state == Alive {
			d.m.greet = append(d.m.greet, n.Name)
		}
	}
	if state == Alive {
		// Joining counts as contact; suspicion is measured from here.
		rec.lastAck = now
		if !d.m.joined {
			// Another member is alive: this node has seen its cluster,
			// also if that member joined it before it reached its seeds.
			d.m.joined = true
			d.m.dirty = true
			d.m.log.Info("joined the cluster", "via", n.Name)
		}
	}
	d.m.live[n.Name] = rec
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
	rec, ok := d.m.live[n.Name]
	if !ok {
		return
	}
	rec.lastAck, rec.rtt = time.Now(), rtt
	d.m.live[n.Name] = rec
}

func (d *delegate) NotifyConflict(existing, other *memberlist.Node) {
	d.m.log.Error("two nodes use the same name; give each a unique --node-name",
		"name", existing.Name, "addr", existing.Addr.String(), "other_addr", other.Addr.String())
}

// broadcast is a gossip message; a newer one with the same name replaces
// an older one still in the queue.
type broadcast struct {
	name string
	msg  []byte
}

var _ memberlist.NamedBroadcast = (*broadcast)(nil)

func (b *broadcast) Invalidates(other memberlist.Broadcast) bool {
	o, ok := other.(*broadcast)
	return ok && o.name == b.name
}
func (b *broadcast) Name() string    { return b.name }
func (b *broadcast) Message() []byte { return b.msg }
func (b *broadcast) Finished()       {}

// gossipStats counts wgmesh's own gossip payload (not memberlist's probes).
type gossipStats struct {
	sentMsgs, sentBytes, recvMsgs, recvBytes atomic.Uint64
}

func (s *gossipStats) sent(n int) {
	s.sentMsgs.Add(1)
	s.sentBytes.Add(uint64(n))
}

func (s *gossipStats) received(n int) {
	s.recvMsgs.Add(1)
	s.recvBytes.Add(uint64(n))
}

// Stats are counters of wgmesh's gossip payload since start.
type Stats struct {
	SentMessages, SentBytes, ReceivedMessages, ReceivedBytes uint64
}

// Stats returns gossip counters.
func (m *Mesh) Stats() Stats {
	return Stats{
		SentMessages: m.stats.sentMsgs.Load(), SentBytes: m.stats.sentBytes.Load(),
		ReceivedMessages: m.stats.recvMsgs.Load(), ReceivedBytes: m.stats.recvBytes.Load(),
	}
}

// newStdLogger routes memberlist's log.Logger output into slog, mapping
// its "[DEBUG]"/"[INFO]"/"[WARN]"/"[ERR]" prefixes to levels.
func newStdLogger(l *slog.Logger) *log.Logger {
	return log.New(&slogWriter{l.With("component", "memberlist")}, "", 0)
}

type slogWriter struct{ l *slog.Logger }

func (w *slogWriter) Write(p []byte) (int, error) {
	msg := string(bytes.TrimSpace(p))
	level := slog.LevelInfo
	for _, pfx := range []struct {
		tag   string
		level slog.Level
	}{{"[DEBUG] ", slog.LevelDebug}, {"[INFO] ", slog.LevelInfo}, {"[WARN] ", slog.LevelWarn}, {"[ERR] ", slog.LevelError}, {"[ERROR] ", slog.LevelError}} {
		if rest, ok := bytes.CutPrefix([]byte(msg), []byte(pfx.tag)); ok {
			msg, level = string(rest), pfx.level
			break
		}
	}
	msg = strings.TrimPrefix(msg, "memberlist: ")
	w.l.Log(context.Background(), level, msg)
	return len(p), nil
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only our own plain types are marshalled
	}
	return b
}
