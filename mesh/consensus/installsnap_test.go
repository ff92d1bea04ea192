package consensus

import (
	"bytes"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/mesh/catalog"
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
func TestInstallSnapshotKeepsLaterEntries(t *testing.T) {
	dir := t.TempDir()
	n := &Node{cfg: Config{Dir: dir}, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	logs, stable, snaps, closeAll, err := n.stores()
	if err != nil {
		t.Fatal(err)
	}
	defer closeAll()

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
	defer r.Shutdown()

	configuration := raft.Configuration{Servers: []raft.Server{
		{Suffrage: raft.Voter, ID: "L", Address: leaderAddr},
		{Suffrage: raft.Voter, ID: "f", Address: "f"},
	}}
	header := raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("L"), Addr: []byte(leaderAddr)}
	entries := []*raft.Log{{Index: 1, Term: 1, Type: raft.LogConfiguration, Data: raft.EncodeConfiguration(configuration)}}
	for i := uint64(2); i <= 10; i++ {
		entries = append(entries, &raft.Log{Index: i, Term: 1, Type: raft.LogNoop})
	}
	var resp raft.AppendEntriesResponse
	if err := leaderTrans.AppendEntries("f", "f", &raft.AppendEntriesRequest{RPCHeader: header, Term: 1,
		Entries: entries, LeaderCommitIndex: 6}, &resp); err != nil || !resp.Success {
		t.Fatalf("appending 1..10: %v, %+v", err, resp)
	}

	// The leader installs its snapshot at 8 (the follower's answers got
	// lost, say): a catalog, and the configuration.
	var snap memSink
	s, err := catalog.NewFSM().Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Persist(&snap); err != nil {
		t.Fatal(err)
	}
	var sresp raft.InstallSnapshotResponse
	if err := leaderTrans.InstallSnapshot("f", "f", &raft.InstallSnapshotRequest{RPCHeader: header, SnapshotVersion: 1, Term: 1,
		LastLogIndex: 8, LastLogTerm: 1, Configuration: raft.EncodeConfiguration(configuration), ConfigurationIndex: 1,
		Size: int64(snap.Len())}, &sresp, bytes.NewReader(snap.Bytes())); err != nil || !sresp.Success {
		t.Fatalf("installing the snapshot at 8: %v, %+v", err, sresp)
	}

	// Raft still counts 9 and 10 as its own: they must be in the log.
	if last := r.LastIndex(); last != 10 {
		t.Fatalf("after the install Raft's last index is %d, want 10", last)
	}
	for i := uint64(9); i <= 10; i++ {
		var l raft.Log
		if err := logs.GetLog(i, &l); err != nil {
			t.Fatalf("entry %d, after the snapshot at 8, is gone from the log: %v", i, err)
		}
	}
	// And the next commit applies them.
	if err := leaderTrans.AppendEntries("f", "f", &raft.AppendEntriesRequest{RPCHeader: header, Term: 1,
		PrevLogEntry: 10, PrevLogTerm: 1, Entries: []*raft.Log{{Index: 11, Term: 1, Type: raft.LogNoop}},
		LeaderCommitIndex: 11}, &resp); err != nil || !resp.Success {
		t.Fatalf("appending 11: %v, %+v", err, resp)
	}
	deadline := time.Now().Add(5 * time.Second)
	for r.AppliedIndex() != 11 {
		if time.Now().After(deadline) {
			t.Fatalf("applied %d, want 11", r.AppliedIndex())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
