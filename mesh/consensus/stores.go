package consensus

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	wal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
	"github.com/hashicorp/raft-wal/segment"

	"github.com/wgmesh/wgmesh/internal/logbridge"
)

func (n *Node) hasState() (bool, error) {
	if n.cfg.Dir == "" {
		return false, nil
	}
	_, err := os.Stat(filepath.Join(n.raftDir(), "wal"))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

func (n *Node) raftDir() string { return filepath.Join(n.cfg.Dir, "raft") }

// stores opens Raft's log, stable and snapshot stores.
func (n *Node) stores() (raft.LogStore, raft.StableStore, raft.SnapshotStore, func() error, error) {
	if n.cfg.Dir == "" {
		s := raft.NewInmemStore()
		return s, s, raft.NewInmemSnapshotStore(), func() error { return nil }, nil
	}
	if err := os.MkdirAll(filepath.Join(n.raftDir(), "wal"), 0o700); err != nil {
		return nil, nil, nil, nil, fmt.Errorf("creating Raft directory: %w", err)
	}
	w, closeAll, err := openWAL(filepath.Join(n.raftDir(), "wal"), n.log)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	snaps, err := n.snapshotStore()
	if err != nil {
		_ = closeAll()
		return nil, nil, nil, nil, err
	}
	logs, wrapped, err := keepAfterSnapshot(w, snaps)
	if err != nil {
		_ = closeAll()
		return nil, nil, nil, nil, err
	}
	return logs, w, wrapped, closeAll, nil
}

func (n *Node) snapshotStore() (*raft.FileSnapshotStore, error) {
	snaps, err := raft.NewFileSnapshotStoreWithLogger(n.raftDir(), 2, logbridge.Hclog(n.log, "raft-snapshot", hclog.Warn))
	if err != nil {
		return nil, fmt.Errorf("opening Raft snapshots: %w", err)
	}
	return snaps, nil
}

// openWAL opens Raft's log and stable store in dir and checks that the
// log can be read at both ends, as Raft does when it starts (and panics
// when it cannot).
func openWAL(dir string, log *slog.Logger) (*wal.WAL, func() error, error) {
	// The WAL does not close a meta store it opened itself, which would
	// keep its lock past Close: give it one we close.
	meta := &metadb.BoltMetaDB{}
	files, size := func(*wal.WAL) {}, 4<<20 // the real file system
	if WALForTest != nil {
		vfs, testSize := WALForTest(dir)
		files = wal.WithSegmentFiler(segment.NewFiler(dir, vfs))
		size = cmp.Or(testSize, size)
	}
	w, err := wal.Open(dir, wal.WithSegmentSize(size), wal.WithMetaStore(meta),
		wal.WithLogger(logbridge.Hclog(log, "raft-wal", hclog.Warn)), files)
	if err != nil {
		meta.Close()
		return nil, nil, fmt.Errorf("opening Raft log %s: %w", dir, err)
	}
	closeAll := func() error { return errors.Join(w.Close(), meta.Close()) }
	if err := checkLog(w); err != nil {
		_ = closeAll()
		return nil, nil, fmt.Errorf("the Raft log %s is damaged, so this node cannot take part in consensus: %w", dir, err)
	}
	return w, closeAll, nil
}

// checkLog reads a log's first and last entries.
func checkLog(logs raft.LogStore) error {
	first, err := logs.FirstIndex()
	if err != nil {
		return fmt.Errorf("reading its first index: %w", err)
	}
	last, err := logs.LastIndex()
	if err != nil {
		return fmt.Errorf("reading its last index: %w", err)
	}
	for _, i := range []uint64{first, last} {
		if i == 0 {
			continue
		}
		var l raft.Log
		if err := logs.GetLog(i, &l); err != nil {
			return fmt.Errorf("reading entry %d: %w", i, err)
		}
	}
	return nil
}
