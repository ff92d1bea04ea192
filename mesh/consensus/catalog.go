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
// moment after each change and whenever Raft takes a snapshot, so it is
// never older than the snapshot; Raft replays the log after the snapshot
// and the catalog skips entries its copy already holds.

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

// loadCatalog, as Raft starts, falls back to the newest Raft snapshot for
// a node that has no copy of its own.
func (n *Node) loadCatalog(snaps raft.SnapshotStore) error {
	if n.cfg.Dir == "" || n.fsm.Index() > 0 {
		return nil
	}
	list, err := snaps.List()
	if err != nil || len(list) == 0 {
		return err
	}
	_, rc, err := snaps.Open(list[0].ID)
	if err != nil {
		return fmt.Errorf("opening Raft snapshot %s: %w", list[0].ID, err)
	}
	return n.fsm.Restore(rc)
}

// saveCatalog writes the copy if the catalog moved on since the last one.
func (n *Node) saveCatalog() {
	if n.cfg.Dir == "" || n.fsm.Index() == n.savedIndex.Load() {
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
