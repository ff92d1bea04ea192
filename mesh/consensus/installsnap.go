package consensus

import (
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/hashicorp/raft"
)

// A work-around for hashicorp/raft#697 (1.8) and a limit next to it.
//
// When a leader installs a snapshot on a follower, Raft removes the
// follower's whole log if the log store is monotonic, as raft-wal is, yet
// keeps believing it holds every entry up to its old last index. A
// follower whose log reached past the snapshot then accepts the next
// append after that stale index and panics at the next commit, reading
// entries that are gone: the agent dies, and dies again at every start.
// Raft's rule for an installed snapshot is to keep the entries after it
// when the entry at its index matches; the log's deletion does that here,
// and when the log starts right after the snapshot's index too: the same
// snapshot installed again (a leader's replication that outlived the
// follower's removal from the configuration sends its old state's
// snapshot after the new one has sent it and the entries after it).
//
// And a follower answers an append that follows its snapshot's index only
// if that entry is still in its log or is its last: after an install its
// log starts right after the snapshot, and when such a follower restarts
// or a new leader probes back, it refuses every append down to the
// leader's compacted entries, takes the same snapshot again, and loops.
// The entry at the snapshot's index is committed, and its term is the
// snapshot's: the log answers for it with an entry of that term that
// carries nothing. No leader ever sends that entry: a leader sends a
// snapshot to a follower that needs entries its log lacks, and processes
// only entries after its snapshot.
//
// A snapshot older than the start of the log (the follower's own snapshot
// is newer and its log starts after it) would leave a hole between the two
// that Raft would try to apply: that install is refused, and the leader
// tries again with a later snapshot.
//
// Nothing on disk or on the wire changes: only which entries a node
// deletes from its own log, and what it answers itself.

// keepLog is a monotonic log store that keeps the entries after the last
// snapshot written when Raft deletes past it.
type keepLog struct {
	raft.LogStore
	mu    sync.Mutex
	index uint64 // the last snapshot written, 0: none
	term  uint64
}

// keepAfterSnapshot wraps a node's log and snapshot stores.
func keepAfterSnapshot(logs raft.LogStore, snaps raft.SnapshotStore) (raft.LogStore, raft.SnapshotStore, error) {
	k := &keepLog{LogStore: logs}
	list, err := snaps.List()
	if err != nil {
		return nil, nil, fmt.Errorf("listing Raft snapshots: %w", err)
	}
	if len(list) > 0 {
		k.index, k.term = list[0].Index, list[0].Term
	}
	return k, &keepSnaps{SnapshotStore: snaps, log: k}, nil
}

// IsMonotonic: raft-wal takes no gaps.
func (k *keepLog) IsMonotonic() bool { return true }

func (k *keepLog) snapshot() (index, term uint64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.index, k.term
}

func (k *keepLog) GetLog(index uint64, l *raft.Log) error {
	err := k.LogStore.GetLog(index, l)
	if !errors.Is(err, raft.ErrLogNotFound) {
		return err
	}
	// Index 1 is what a leader sends a new follower without a snapshot.
	if s, term := k.snapshot(); index == s && index > 1 {
		*l = raft.Log{Index: index, Term: term, Type: raft.LogNoop}
		return nil
	}
	return err
}

func (k *keepLog) DeleteRange(lo, hi uint64) error {
	s, term := k.snapshot()
	// Only Raft's removal of the whole log after a snapshot is installed
	// deletes past a snapshot; compaction stops at it, and a conflict
	// never reaches back over committed entries.
	if s > 0 && hi > s && lo <= s+1 {
		first, err := k.LogStore.FirstIndex()
		if err != nil {
			return err
		}
		var l raft.Log
		switch err := k.LogStore.GetLog(s, &l); {
		case lo <= s && err == nil && l.Term == term:
			hi = s - 1 // the entry at the snapshot's index stays, to answer appends after it
		case errors.Is(err, raft.ErrLogNotFound) && first == s+1:
			// The log starts right after the snapshot: the entry at its
			// index was this node's own snapshot or compacted, so
			// committed, so the snapshot's; the entries after it stay.
			// Deleting them while Raft believes it holds them panics
			// ("log not found") at the next commit, as above.
			return nil
		}
	}
	if hi < lo {
		return nil
	}
	return k.LogStore.DeleteRange(lo, hi)
}

// StoreLogs appends after what Raft believes is its last entry. Entries
// the log still holds from there on are ones Raft deleted and DeleteRange
// kept: a conflict with the entries right after the snapshot, which only
// Raft's next append tells apart from the removal of its log after an
// install. They go now.
func (k *keepLog) StoreLogs(logs []*raft.Log) error {
	if len(logs) > 0 {
		last, err := k.LogStore.LastIndex()
		if err != nil {
			return err
		}
		if i := logs[0].Index; i > 0 && i <= last {
			if err := k.LogStore.DeleteRange(i, last); err != nil {
				return err
			}
		}
	}
	return k.LogStore.StoreLogs(logs)
}

func (k *keepLog) StoreLog(l *raft.Log) error { return k.StoreLogs([]*raft.Log{l}) }

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
