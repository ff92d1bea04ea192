package consensus

import (
	"fmt"
	"io"
	"sync"

	"github.com/hashicorp/raft"
)

// A work-around for hashicorp/raft#697 (1.8). When a leader installs a
// snapshot on a follower, Raft removes the follower's whole log if the log
// store is monotonic, as raft-wal is, yet keeps believing it holds every
// entry up to its old last index. A follower whose log reached past the
// snapshot (it had a snapshot of its own and refused an append below its
// log's start, so the leader walked back to a snapshot: the safety test's
// power cut after a snapshot install does it) then accepts the next append
// after that stale index and panics at the next commit, reading entries
// that are gone: the agent dies, and dies again at every start. Raft's rule
// for an installed snapshot is to keep the entries after it when the entry
// at its index matches; keepAfterSnapshot makes the deletion do that.
//
// A snapshot older than the start of the log (the follower's own snapshot
// is newer and its log starts after it) would leave a hole between the two
// that Raft would try to apply: that install is refused, and the leader
// tries again with a later snapshot.
//
// Nothing on disk or on the wire changes: only which entries a node
// deletes from its own log.

// keepLog is a monotonic log store that keeps the entries after the last
// snapshot written when Raft deletes past it.
type keepLog struct {
	raft.LogStore
	mu    sync.Mutex
	index uint64 // the last snapshot written, 0: none
	term  uint64
}

// keepAfterSnapshot wraps a node's log and snapshot stores.
func keepAfterSnapshot(logs raft.LogStore, snaps raft.SnapshotStore) (raft.LogStore, raft.SnapshotStore) {
	k := &keepLog{LogStore: logs}
	return k, &keepSnaps{SnapshotStore: snaps, log: k}
}

// IsMonotonic: raft-wal takes no gaps.
func (k *keepLog) IsMonotonic() bool { return true }

func (k *keepLog) DeleteRange(lo, hi uint64) error {
	k.mu.Lock()
	index, term := k.index, k.term
	k.mu.Unlock()
	// Only Raft's removal of the whole log after a snapshot is installed
	// deletes past a snapshot; compaction stops at it, and a conflict
	// never reaches back over committed entries.
	if index > 0 && hi > index && lo <= index {
		var l raft.Log
		if err := k.LogStore.GetLog(index, &l); err == nil && l.Term == term {
			hi = index
		}
	}
	return k.LogStore.DeleteRange(lo, hi)
}

// keepSnaps notes every snapshot written, and refuses one that would
// leave a hole before the log.
type keepSnaps struct {
	raft.SnapshotStore
	log *keepLog
}

func (s *keepSnaps) Create(version raft.SnapshotVersion, index, term uint64, configuration raft.Configuration,
	configurationIndex uint64, trans raft.Transport) (raft.SnapshotSink, error) {
	first, err := s.log.FirstIndex()
	if err != nil {
		return nil, fmt.Errorf("reading the log's first index: %w", err)
	}
	last, err := s.log.LastIndex()
	if err != nil {
		return nil, fmt.Errorf("reading the log's last index: %w", err)
	}
	if first > 0 && index+1 < first && last >= first {
		return nil, fmt.Errorf("a snapshot at index %d is older than this node's log, which starts at %d: it would leave a gap (hashicorp/raft#697)", index, first)
	}
	sink, err := s.SnapshotStore.Create(version, index, term, configuration, configurationIndex, trans)
	if err != nil {
		return nil, err
	}
	return &keepSink{SnapshotSink: sink, log: s.log, index: index, term: term}, nil
}

type keepSink struct {
	raft.SnapshotSink
	log         *keepLog
	index, term uint64
}

var _ io.WriteCloser = (*keepSink)(nil)

func (s *keepSink) Close() error {
	if err := s.SnapshotSink.Close(); err != nil {
		return err
	}
	s.log.mu.Lock()
	s.log.index, s.log.term = s.index, s.term
	s.log.mu.Unlock()
	return nil
}
