package consensus

import (
	"io"
	"log/slog"
	"testing"

	"github.com/hashicorp/raft"
)

// TestLogTailTruncatedThenReopened: a follower that gets entries which
// conflict with the tail of its log truncates the tail ("clearing log
// suffix"). raft-wal v0.4.0 then sealed the segment without an index, and
// the next start panicked inside raft.NewRaft ("sealed segment has no
// index block"); the e2e suite met it after an agent restart.
func TestLogTailTruncatedThenReopened(t *testing.T) {
	dir := t.TempDir()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	w, closeAll, err := openWAL(dir, log)
	if err != nil {
		t.Fatal(err)
	}
	var logs []*raft.Log
	for i := uint64(1); i <= 20; i++ {
		logs = append(logs, &raft.Log{Index: i, Term: 1, Type: raft.LogCommand, Data: []byte("entry")})
	}
	if err := w.StoreLogs(logs); err != nil {
		t.Fatal(err)
	}
	if err := w.DeleteRange(20, 20); err != nil {
		t.Fatal(err)
	}
	// The leader's version of entry 20, in a later term.
	if err := w.StoreLog(&raft.Log{Index: 20, Term: 2, Type: raft.LogCommand, Data: []byte("leader's")}); err != nil {
		t.Fatal(err)
	}
	if err := closeAll(); err != nil {
		t.Fatal(err)
	}

	w, closeAll, err = openWAL(dir, log)
	if err != nil {
		t.Fatalf("reopening after a tail truncation: %v", err)
	}
	defer closeAll()
	for _, i := range []uint64{1, 19, 20} {
		var l raft.Log
		if err := w.GetLog(i, &l); err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
		if i == 20 && (l.Term != 2 || string(l.Data) != "leader's") {
			t.Fatalf("entry 20 is %+v, want the leader's", l)
		}
	}
}
