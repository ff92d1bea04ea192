package consensus

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/internal/durable"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// Every node keeps its own copy of the applied catalog in its state
// directory, so that after a restart the catalog is there at once, before
// Raft has learnt what is committed: the host's data plane must not lose
// its peers' allowed IPs while the agent restarts. The copy is written a
// moment after each change.
//
// Raft's snapshots and log are the only source of truth; the copy is a
// cache of it. It only ever holds applied, so committed, entries, which
// never change, so it is right as of its index; but it may be older than
// Raft's newest snapshot (Raft took or installed one and the node died
// before the next save), and Raft counts everything up to that snapshot as
// applied and no longer keeps it in its log. So a node starts from its
// copy only when the copy is at least as new as that snapshot, and from the
// snapshot otherwise; Raft then hands it the entries after the snapshot,
// and the catalog skips those its copy already holds. Nothing depends on
// the copy being written at any moment, so failing to write it loses
// nothing (the node still says so and claims nothing, see diskErr).
//
// Compatibility: the copy's format and name are those of 559f90d, whose
// state directories are read as they are; 559f90d wrote the copy when
// Raft took a snapshot as well, so a newer copy is simply the usual case.

const catalogFile = "catalog.json"

// saveCatalogEvery throttles writing the copy.
const saveCatalogEvery = 500 * time.Millisecond

func (n *Node) catalogPath() string { return filepath.Join(n.cfg.Dir, catalogFile) }

// readCatalog loads this node's copy of the catalog, if it has one.
func (n *Node) readCatalog() error {
	if n.cfg.Dir == "" {
		return nil
	}
	b, err := os.ReadFile(n.catalogPath())
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("reading %s: %w", n.catalogPath(), err)
	}
	s, err := catalog.DecodeState(bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("reading %s: %w (move it away to rebuild it from the cluster)", n.catalogPath(), err)
	}
	n.fsm.Load(s)
	n.savedIndex.Store(s.Index)
	return nil
}

// loadCatalog replaces the catalog loaded from this node's copy by Raft's
// newest snapshot if that is newer, or if there is no copy: Raft starts
// (NoSnapshotRestoreOnStart) counting the snapshot as applied.
func (n *Node) loadCatalog(snaps raft.SnapshotStore) error {
	if n.cfg.Dir == "" {
		return nil
	}
	list, err := snaps.List()
	if err != nil {
		return fmt.Errorf("listing Raft snapshots: %w", err)
	}
	// A copy at a lower index than the snapshot may hold all the same
	// commands (the snapshot ends with other entries); reading the
	// snapshot then costs a little and changes nothing.
	if len(list) == 0 || list[0].Index <= n.fsm.Index() {
		return nil
	}
	// Raft takes the newest snapshot as its starting point without
	// reading it; this one must be readable.
	_, rc, err := snaps.Open(list[0].ID)
	if err != nil {
		return fmt.Errorf("opening Raft snapshot %s: %w", list[0].ID, err)
	}
	if n.fsm.Index() > 0 {
		n.log.Info("this node's copy of the catalog is older than Raft's snapshot; starting from the snapshot",
			"copy_index", n.fsm.Index(), "snapshot_index", list[0].Index)
	}
	if err := n.fsm.Restore(rc); err != nil {
		return fmt.Errorf("reading Raft snapshot %s: %w", list[0].ID, err)
	}
	// The catalog's index is that of its last command; entries that are
	// not commands (configurations, no-ops) may follow it in the snapshot.
	if got := n.fsm.Index(); got > list[0].Index {
		return fmt.Errorf("raft snapshot %s holds the catalog at index %d, past its own index %d", list[0].ID, got, list[0].Index)
	}
	return nil
}

// loadSnapshotBeforeStart runs loadCatalog before Raft starts, so that the
// catalog is right from New on.
func (n *Node) loadSnapshotBeforeStart() error {
	if n.cfg.Dir == "" {
		return nil
	}
	if _, err := os.Stat(n.raftDir()); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	snaps, err := n.snapshotStore()
	if err != nil {
		return err
	}
	return n.loadCatalog(snaps)
}

// saveCatalog writes the copy if the catalog moved on since the last one.
func (n *Node) saveCatalog() {
	if n.cfg.Dir == "" {
		return
	}
	if err := n.fsm.Err(); err != nil {
		// The copy cannot be trusted to hold every command up to its
		// index: the next start reads Raft's snapshot and log instead.
		if rerr := os.Remove(n.catalogPath()); rerr == nil {
			n.log.Error("this node's replica of the catalog missed entries; it claims nothing until it restarts from Raft's own state", "err", err)
		}
		return
	}
	if n.fsm.Index() == n.savedIndex.Load() {
		return
	}
	st := n.fsm.State()
	n.writeCatalog(mustJSON(st), st.Index)
}

func (n *Node) writeCatalog(b []byte, index uint64) {
	n.saveMu.Lock()
	defer n.saveMu.Unlock()
	if index < n.savedIndex.Load() {
		return
	}
	if err := durable.WriteFile(n.catalogPath(), b, 0o600); err != nil {
		n.log.Error("saving this node's copy of the catalog; this node claims nothing until its disk works", "err", err)
		n.mu.Lock()
		n.diskErr = err
		n.mu.Unlock()
		return
	}
	n.savedIndex.Store(index)
	n.mu.Lock()
	n.diskErr = nil
	n.mu.Unlock()
}

// logGapCheck checks, for the FSM, that the entries from..to of logs hold
// no command: Raft hands the FSM only commands, so the FSM sees gaps in
// the indexes of what it applies, which must be made of other entries.
func logGapCheck(logs raft.LogStore) func(from, to uint64) error {
	return func(from, to uint64) error {
		for i := from; i <= to; i++ {
			var l raft.Log
			if err := logs.GetLog(i, &l); err != nil {
				return fmt.Errorf("entry %d, before the next one this replica is given, is in no log: %w", i, err)
			}
			if l.Type == raft.LogCommand {
				return fmt.Errorf("entry %d is a command this replica never applied", i)
			}
		}
		return nil
	}
}
