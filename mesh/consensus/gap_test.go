package consensus

import (
	"io"
	"log/slog"
	"testing"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// TestApplyRefusesGap: a replica that is handed an entry past a command
// it never applied (its state was loaded from a copy older than what Raft
// counts as applied) stops applying rather than go on without it; entries
// Raft does not hand to the state machine (no-ops, barriers,
// configurations) are no gap.
func TestApplyRefusesGap(t *testing.T) {
	w, closeAll, err := openWAL(t.TempDir(), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer closeAll()
	if err := w.StoreLogs([]*raft.Log{
		{Index: 1, Term: 1, Type: raft.LogConfiguration},
		{Index: 2, Term: 1, Type: raft.LogCommand, Data: []byte("x")},
		{Index: 3, Term: 1, Type: raft.LogNoop},
		{Index: 4, Term: 1, Type: raft.LogBarrier},
		{Index: 5, Term: 1, Type: raft.LogCommand, Data: []byte("y")},
	}); err != nil {
		t.Fatal(err)
	}
	loaded := func(index uint64) *catalog.FSM {
		f := catalog.NewFSM()
		s := catalog.NewState()
		s.Index = index
		f.Load(s)
		f.SetGapCheck(logGapCheck(w))
		return f
	}

	// Loaded at 2: 3 and 4 are no commands.
	f := loaded(2)
	f.Apply(&raft.Log{Index: 5, Term: 1, Type: raft.LogCommand, Data: []byte("y")})
	if f.Index() != 5 || f.Err() != nil {
		t.Fatalf("after a gap of no-ops: index %d, err %v", f.Index(), f.Err())
	}

	// Loaded at 1: command 2 was never applied.
	f = loaded(1)
	f.Apply(&raft.Log{Index: 5, Term: 1, Type: raft.LogCommand, Data: []byte("y")})
	if f.Index() != 1 || f.Err() == nil {
		t.Fatalf("after a gap with a command: index %d, err %v", f.Index(), f.Err())
	}
	// It stays stopped.
	f.Apply(&raft.Log{Index: 6, Term: 1, Type: raft.LogCommand, Data: []byte("z")})
	if f.Index() != 1 {
		t.Fatalf("a broken replica applied entry 6")
	}

	// Loaded at 0 with a log that starts at 3 (compacted): 1 and 2 are
	// in no log, so unknown.
	if err := w.DeleteRange(1, 2); err != nil {
		t.Fatal(err)
	}
	f = loaded(0)
	f.Apply(&raft.Log{Index: 5, Term: 1, Type: raft.LogCommand, Data: []byte("y")})
	if f.Err() == nil {
		t.Fatal("applied past entries that are in no log")
	}
}
