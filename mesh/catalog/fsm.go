package catalog

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"sync"

	"github.com/hashicorp/raft"
)

// FSM runs the catalog as a Raft state machine. Raft calls Apply,
// Snapshot and Restore from one goroutine; everything else may be called
// from anywhere.
type FSM struct {
	mu      sync.RWMutex
	state   *State
	changed chan struct{} // closed and replaced at every change
	// onApply, if set, is told of every applied command and its result
	// (metrics and logs); it must not block.
	onApply func(*Command, Result)
	// gapCheck, if set, checks that the entries from..to, which Raft did
	// not hand to Apply, hold no command (see Apply).
	gapCheck func(from, to uint64) error
	// restored is set by Restore: the entries up to the snapshot's index,
	// which Raft does not say, are in the state and maybe in no log.
	restored bool
	// broken is why this replica stopped applying entries.
	broken error
}

var _ raft.FSM = (*FSM)(nil)

// NewFSM returns an FSM with an empty state.
func NewFSM() *FSM { return &FSM{state: NewState(), changed: make(chan struct{})} }

// OnApply sets a function told of every applied command. Call it before
// Raft starts.
func (f *FSM) OnApply(fn func(*Command, Result)) { f.onApply = fn }

// SetGapCheck sets the function that Apply asks whether entries it was not
// handed held commands. Call it before Raft starts.
func (f *FSM) SetGapCheck(fn func(from, to uint64) error) { f.gapCheck = fn }

// Err is why this replica stopped applying entries, if it did.
func (f *FSM) Err() error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.broken
}

// Load installs a state saved earlier, before Raft starts: entries up to
// its index are then skipped when Raft replays its log.
func (f *FSM) Load(s *State) {
	f.mu.Lock()
	f.state = s
	f.notifyLocked()
	f.mu.Unlock()
}

// Apply implements raft.FSM. Its return value is the Result, which
// reaches whoever proposed the entry.
//
// Raft hands it commands only, so the indexes it applies have gaps (no-ops,
// barriers, configurations), and it does not say which index it counts as
// applied: a state loaded at start from an older copy than that would
// silently go on without the commands in between. So every gap is checked
// against the log (gapCheck), but the first one after a Restore, which the
// snapshot covers up to an index Raft does not tell the FSM; and a replica
// that finds a command it never applied stops applying anything.
func (f *FSM) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	f.mu.Lock()
	if f.broken != nil {
		f.mu.Unlock()
		return Result{Code: CodeInvalid, Message: "this replica of the catalog stopped applying entries: " + f.broken.Error()}
	}
	if l.Index <= f.state.Index {
		// Already in the state this node loaded at start.
		f.mu.Unlock()
		return nil
	}
	if l.Index > f.state.Index+1 && !f.restored && f.gapCheck != nil {
		if err := f.gapCheck(f.state.Index+1, l.Index-1); err != nil {
			f.broken = fmt.Errorf("applying entry %d on the state at %d: %w", l.Index, f.state.Index, err)
			f.notifyLocked()
			err := f.broken
			f.mu.Unlock()
			return Result{Code: CodeInvalid, Message: "this replica of the catalog stopped applying entries: " + err.Error()}
		}
	}
	f.restored = false
	r := f.state.ApplyLog(l.Index, l.AppendedAt, l.Data, l.Extensions)
	f.notifyLocked()
	f.mu.Unlock()
	if f.onApply != nil {
		if _, c, err := DecodeSigned(l.Data); err == nil {
			f.onApply(c, r)
		}
	}
	return r
}

func (f *FSM) notifyLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// State returns a copy of the current state.
func (f *FSM) State() *State {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.Clone()
}

// Read calls fn with the current state, which fn must not keep or change.
func (f *FSM) Read(fn func(*State)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	fn(f.state)
}

// Changed returns a channel closed at the next change of the state.
func (f *FSM) Changed() <-chan struct{} {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.changed
}

// Index is the index of the last applied entry.
func (f *FSM) Index() uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.Index
}

// WaitIndex waits until the entry at index is applied here.
func (f *FSM) WaitIndex(ctx context.Context, index uint64) error {
	for {
		f.mu.RLock()
		done, ch := f.state.Index >= index, f.changed
		f.mu.RUnlock()
		if done {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting for entry %d to be applied here: %w", index, ctx.Err())
		}
	}
}

// Snapshot implements raft.FSM. It writes nothing but Raft's snapshot:
// that and Raft's log are the only source of truth.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	b, err := json.Marshal(f.state)
	if err != nil {
		return nil, fmt.Errorf("encoding catalog snapshot: %w", err)
	}
	return snapshot(b), nil
}

// Restore implements raft.FSM.
func (f *FSM) Restore(r io.ReadCloser) error {
	defer r.Close()
	s, err := DecodeState(r)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.state, f.restored = s, true
	f.notifyLocked()
	f.mu.Unlock()
	return nil
}

// maxSnapshotBytes bounds a snapshot read from disk or from the leader.
const maxSnapshotBytes = 256 << 20

// DecodeState decodes a snapshot.
func DecodeState(r io.Reader) (*State, error) {
	b, err := io.ReadAll(io.LimitReader(r, maxSnapshotBytes+1))
	if err != nil {
		return nil, fmt.Errorf("reading catalog snapshot: %w", err)
	}
	if len(b) > maxSnapshotBytes {
		return nil, fmt.Errorf("catalog snapshot exceeds %d bytes", maxSnapshotBytes)
	}
	s := NewState()
	if err := json.Unmarshal(b, s); err != nil {
		return nil, fmt.Errorf("decoding catalog snapshot: %w", err)
	}
	if s.Nodes == nil {
		s.Nodes = map[string]*Node{}
	}
	if s.Networks == nil {
		s.Networks = map[netip.Prefix]*Network{}
	}
	for k, n := range s.Networks {
		if n == nil || n.Subnet != k {
			return nil, fmt.Errorf("catalog snapshot: network %s is inconsistent", k)
		}
		if n.Blocks == nil {
			n.Blocks = map[netip.Prefix]string{}
		}
	}
	for k, n := range s.Nodes {
		if n == nil || n.Name != k {
			return nil, fmt.Errorf("catalog snapshot: node %s is inconsistent", k)
		}
	}
	return s, nil
}

type snapshot []byte

func (s snapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s); err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("writing catalog snapshot: %w", err)
	}
	return sink.Close()
}

func (snapshot) Release() {}
