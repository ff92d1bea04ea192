package consensus

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/mesh/catalog"
	"github.com/wgmesh/wgmesh/test/poll"
)

// memSink collects a snapshot in memory.
type memSink struct{ bytes.Buffer }

func (*memSink) ID() string    { return "mem" }
func (*memSink) Cancel() error { return nil }
func (*memSink) Close() error  { return nil }

// TestInstallSnapshotKeepsLaterEntries: a follower whose log already
// reaches past the snapshot a leader installs on it, with the entry at
// the snapshot's index of the snapshot's term, keeps the entries after
// it (Raft's rule for InstallSnapshot). hashicorp/raft 1.8 empties a
// monotonic log store there but goes on believing it holds them, and
// panics ("log not found") at the next commit (hashicorp/raft#697): the
// randomized safety test hit it on a node that installed a snapshot
// after a power cut.
// follower is a Raft follower on this node's real stores, and a leader's
// end of its transport that a test drives by hand.
type follower struct {
	r      *raft.Raft
	logs   raft.LogStore
	leader *raft.InmemTransport
	header raft.RPCHeader
	conf   []byte
}

func newFollower(t *testing.T) *follower {
	t.Helper()
	dir := t.TempDir()
	n := &Node{cfg: Config{Dir: dir}, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	logs, stable, snaps, closeAll, err := n.stores()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = closeAll() })
	_, followerTrans := raft.NewInmemTransport("f")
	leaderAddr, leaderTrans := raft.NewInmemTransport("L")
	followerTrans.Connect(leaderAddr, leaderTrans)
	leaderTrans.Connect("f", followerTrans)
	conf := raft.DefaultConfig()
	conf.LocalID = "f"
	conf.HeartbeatTimeout = time.Hour // it never stands for election
	conf.ElectionTimeout = time.Hour
	conf.LeaderLeaseTimeout = time.Hour
	conf.Logger = hclog.NewNullLogger()
	conf.NoSnapshotRestoreOnStart = true
	r, err := raft.NewRaft(conf, catalog.NewFSM(), logs, stable, snaps, followerTrans)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Shutdown().Error() })
	configuration := raft.Configuration{Servers: []raft.Server{
		{Suffrage: raft.Voter, ID: "L", Address: leaderAddr},
		{Suffrage: raft.Voter, ID: "f", Address: "f"},
	}}
	return &follower{r: r, logs: logs, leader: leaderTrans, conf: raft.EncodeConfiguration(configuration),
		header: raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("L"), Addr: []byte(leaderAddr)}}
}

// appendNoops sends no-ops from..to after prev, and says whether the
// follower took them.
func (f *follower) appendNoops(t *testing.T, prev, from, to, commit uint64) bool {
	t.Helper()
	var entries []*raft.Log
	for i := from; i <= to; i++ {
		if i == 1 {
			entries = append(entries, &raft.Log{Index: 1, Term: 1, Type: raft.LogConfiguration, Data: f.conf})
			continue
		}
		entries = append(entries, &raft.Log{Index: i, Term: 1, Type: raft.LogNoop})
	}
	var prevTerm uint64
	if prev > 0 {
		prevTerm = 1
	}
	var resp raft.AppendEntriesResponse
	if err := f.leader.AppendEntries("f", "f", &raft.AppendEntriesRequest{RPCHeader: f.header, Term: 1,
		PrevLogEntry: prev, PrevLogTerm: prevTerm, Entries: entries, LeaderCommitIndex: commit}, &resp); err != nil {
		t.Fatal(err)
	}
	return resp.Success
}

// install installs a leader's snapshot at index (term 1).
func (f *follower) install(t *testing.T, index uint64) {
	t.Helper()
	var snap memSink
	s, err := catalog.NewFSM().Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Persist(&snap); err != nil {
		t.Fatal(err)
	}
	var resp raft.InstallSnapshotResponse
	if err := f.leader.InstallSnapshot("f", "f", &raft.InstallSnapshotRequest{RPCHeader: f.header, SnapshotVersion: 1, Term: 1,
		LastLogIndex: index, LastLogTerm: 1, Configuration: f.conf, ConfigurationIndex: 1,
		Size: int64(snap.Len())}, &resp, bytes.NewReader(snap.Bytes())); err != nil || !resp.Success {
		t.Fatalf("installing the snapshot at %d: %v, %+v", index, err, resp)
	}
}

func (f *follower) waitApplied(t *testing.T, index uint64) {
	t.Helper()
	poll.Eventually(t, 5*time.Second, fmt.Sprintf("entry %d applied", index), func() error {
		if got := f.r.AppliedIndex(); got != index {
			return fmt.Errorf("applied %d, want %d", got, index)
		}
		return nil
	})
}

func TestInstallSnapshotKeepsLaterEntries(t *testing.T) {
	f := newFollower(t)
	if !f.appendNoops(t, 0, 1, 10, 6) {
		t.Fatal("the follower refused entries 1..10")
	}
	// The leader installs its snapshot at 8 (the follower's answers got
	// lost, say).
	f.install(t, 8)
	// Raft still counts 9 and 10 as its own: they must be in the log.
	if last := f.r.LastIndex(); last != 10 {
		t.Fatalf("after the install Raft's last index is %d, want 10", last)
	}
	for i := uint64(9); i <= 10; i++ {
		var l raft.Log
		if err := f.logs.GetLog(i, &l); err != nil {
			t.Fatalf("entry %d, after the snapshot at 8, is gone from the log: %v", i, err)
		}
	}
	// And the next commit applies them.
	if !f.appendNoops(t, 10, 11, 11, 11) {
		t.Fatal("the follower refused entry 11")
	}
	f.waitApplied(t, 11)
}

// TestAppendAfterInstalledSnapshot: a follower that installed a snapshot
// past its log and took entries after it takes an append that follows the
// snapshot's index again (a new leader probing back). Raft 1.8 refuses it
// (the entry is in no log), the leader walks back to its compacted
// entries, installs the same snapshot, and around it goes.
func TestAppendAfterInstalledSnapshot(t *testing.T) {
	f := newFollower(t)
	f.entriesAfterSnapshot(t, 15)
	f.waitApplied(t, 15)
	if !f.appendNoops(t, 12, 13, 16, 16) {
		t.Fatal("the follower refused entries 13..16 after the snapshot at 12, once it had 13..15")
	}
	f.waitApplied(t, 16)
}

// TestSameSnapshotInstalledAgain: a follower whose log starts right after
// an installed snapshot (it installed it, then took entries after it) is
// sent the same snapshot again. It must keep those entries, as it keeps
// them when its log reaches back to the snapshot's index: Raft goes on
// believing it holds them, takes the leader's next append after them, and
// panics ("log not found" in processLogs) at the commit. A real leader
// sends it twice when a node is removed and re-admitted: the replication
// of its removal goes on with the old next index, after a backoff of up
// to 40s, and sends the snapshot after the new replication installed it
// and sent the entries after it. The safety test met it under load.
func TestSameSnapshotInstalledAgain(t *testing.T) {
	f := newFollower(t)
	f.entriesAfterSnapshot(t, 15)
	f.waitApplied(t, 15)
	f.install(t, 12)
	for i := f.r.AppliedIndex() + 1; i <= f.r.LastIndex(); i++ {
		var l raft.Log
		if err := f.logs.GetLog(i, &l); err != nil {
			t.Fatalf("after installing the snapshot at 12 again, Raft counts entries up to %d as its own, but entry %d is gone from the log: %v",
				f.r.LastIndex(), i, err)
		}
	}
	if !f.appendNoops(t, 15, 16, 16, 16) {
		t.Fatal("the follower refused entry 16")
	}
	f.waitApplied(t, 16)
}

// TestConflictRightAfterInstalledSnapshot: a follower whose log starts
// right after an installed snapshot with entries no leader committed
// takes a later leader's different entries there: the log keeps the
// entries after a snapshot when Raft removes its log after an install,
// not when Raft clears them for a conflict.
func TestConflictRightAfterInstalledSnapshot(t *testing.T) {
	f := newFollower(t)
	f.entriesAfterSnapshot(t, 12)
	// A leader of term 2 has other entries from 13 on.
	var resp raft.AppendEntriesResponse
	if err := f.leader.AppendEntries("f", "f", &raft.AppendEntriesRequest{RPCHeader: f.header, Term: 2,
		PrevLogEntry: 12, PrevLogTerm: 1, LeaderCommitIndex: 14, Entries: []*raft.Log{
			{Index: 13, Term: 2, Type: raft.LogNoop}, {Index: 14, Term: 2, Type: raft.LogNoop},
		}}, &resp); err != nil {
		t.Fatal(err)
	}
	if !resp.Success {
		t.Fatal("the follower refused the leader's entries 13..14 of term 2")
	}
	f.waitApplied(t, 14)
	if last := f.r.LastIndex(); last != 14 {
		t.Fatalf("Raft's last index is %d, want 14", last)
	}
	for i := uint64(13); i <= 14; i++ {
		var l raft.Log
		if err := f.logs.GetLog(i, &l); err != nil || l.Term != 2 {
			t.Fatalf("entry %d is %+v (%v), want the leader's of term 2", i, l, err)
		}
	}
	if last, err := f.logs.LastIndex(); err != nil || last != 14 {
		t.Fatalf("the log ends at %d (%v), want 14", last, err)
	}
}

// entriesAfterSnapshot brings the follower to entries 1..5 of its own, an
// installed snapshot at 12 past them, and entries 13..15 after it, of
// which the leader has committed those up to commit.
func (f *follower) entriesAfterSnapshot(t *testing.T, commit uint64) {
	t.Helper()
	if !f.appendNoops(t, 0, 1, 5, 5) {
		t.Fatal("the follower refused entries 1..5")
	}
	f.install(t, 12)
	if !f.appendNoops(t, 12, 13, 15, commit) {
		t.Fatal("the follower refused entries 13..15 after the snapshot at 12")
	}
}
