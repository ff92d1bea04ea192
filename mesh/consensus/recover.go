package consensus

import (
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// Recover makes this node the only voter of its cluster, keeping its copy
// of the catalog, for a cluster that has lost most of its voters for good
// and so cannot commit anything, not even the removal of the dead voters.
// The agent must be stopped. When it starts again it leads alone, and the
// autopilot adds the other nodes back, promoting voters as before.
//
// Entries that the lost voters had accepted but this node had not seen
// are lost; entries this node had but that were not committed become
// committed (Raft's RecoverCluster says so too). Run it on one node only:
// the one whose catalog is the most recent (`wgmesh status` shows each
// node's applied index while it runs).
func Recover(dir string, id crypto.Identity, logger *slog.Logger) (raft.Configuration, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	n := &Node{cfg: Config{Dir: dir, Identity: id, Raft: DefaultRaftConfig()}, id: id.ID(), log: logger}
	has, err := n.hasState()
	if err != nil {
		return raft.Configuration{}, err
	}
	if !has {
		return raft.Configuration{}, fmt.Errorf("no consensus state in %s: nothing to recover", filepath.Join(dir, "raft"))
	}
	logs, stable, snaps, closeLogs, err := n.stores()
	if err != nil {
		return raft.Configuration{}, err
	}
	defer closeLogs()
	conf := n.raftConfig()
	_, trans := raft.NewInmemTransport("")
	old, err := raft.GetConfiguration(conf, catalog.NewFSM(), logs, stable, snaps, trans)
	if err != nil {
		return raft.Configuration{}, fmt.Errorf("reading the last configuration: %w", err)
	}
	var self *raft.Server
	for i, s := range old.Servers {
		if s.ID == conf.LocalID {
			self = &old.Servers[i]
		}
	}
	if self == nil {
		return raft.Configuration{}, errors.New("this node is not in its own last configuration: recover on a node that was a member")
	}
	next := raft.Configuration{Servers: []raft.Server{{Suffrage: raft.Voter, ID: self.ID, Address: self.Address}}}
	if err := raft.RecoverCluster(conf, catalog.NewFSM(), logs, stable, snaps, trans, next); err != nil {
		return raft.Configuration{}, fmt.Errorf("recovering: %w", err)
	}
	return old, nil
}
