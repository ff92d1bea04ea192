package consensus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/internal/durable"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// A node whose state directory was restored from an older copy (a backup,
// a VM snapshot) has an old Raft log, term and vote. Were it to vote with
// them, it could elect, with a voter that missed them, a leader without
// the entries it had itself helped commit, and they would be lost for good.
// The catalog refuses its registration (its generation is not higher than
// the one the cluster saw), but a node registers only after its Raft has
// started, and a leader must exist to refuse it. So before Raft starts, a
// node with Raft state asks the servers of its last configuration and the
// members gossip shows which generation of it their catalog holds; if any
// has seen this generation or a later one, the state directory is an older
// copy and the node does not start Raft at all.
//
// What cannot be told from a normal start, and so starts Raft as before:
//   - nobody who knows is reachable: every server restored at once, or the
//     members that saw the later generation are down or cut off (a whole
//     cluster restarting after a power loss looks the same). If one of them
//     comes back, the node's registration is refused then, after it may
//     have voted;
//   - a copy taken of a running node that has not started since: its
//     generation is the one the cluster saw (generations count starts).
//
// The operator then restores the cluster from the voter with the newest
// log: `wgmesh recover` on it (recover.go), and the others started with
// empty state directories. A refused node stays refused across restarts
// (it is written down in node.json): its generation grows at each start,
// and would soon pass the cluster's again.
//
// Compatibility: members of 559f90d do not answer the generation (the
// field is new and optional), which counts as not knowing; 559f90d reads
// node.json with the new field and ignores it.

// rollbackCheckTimeout bounds asking one member.
const rollbackCheckTimeout = 2 * time.Second

// checkRollback asks the members this node can reach which generation of
// it they have seen, and returns the refusal if one has seen this one or a
// later one.
func (n *Node) checkRollback(ctx context.Context) error {
	addrs, err := n.rollbackWitnesses()
	if err != nil {
		return err
	}
	type answer struct {
		addr string
		gen  uint64
	}
	answers := make(chan answer, len(addrs))
	var wg sync.WaitGroup
	for _, addr := range addrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, rollbackCheckTimeout)
			defer cancel()
			resp, _, err := n.call(cctx, addr, &request{Method: methodStatus})
			if err != nil || resp.Status == nil {
				n.log.Debug("asking a member which generation of this node it saw", "addr", addr, "err", err)
				return
			}
			answers <- answer{addr, resp.Status.YourGeneration}
		}()
	}
	wg.Wait()
	close(answers)
	asked := 0
	for a := range answers {
		asked++
		if a.gen >= n.run.gen {
			return &catalog.Error{Code: catalog.CodeRolledBack, Message: fmt.Sprintf(
				"node %s starts from state generation %d, but the member at %s has seen generation %d of it: "+
					"its state directory is an older copy (a restored backup or VM snapshot), or another host runs with a copy of it; "+
					"this node takes no part in consensus and claims nothing until an operator fixes it (see docs/operations.md, Failures)",
				n.cfg.Name, n.run.gen, a.addr, a.gen)}
		}
	}
	n.log.Info("checked this node's generation with the members before starting Raft", "generation", n.run.gen, "answered", asked, "asked", len(addrs))
	return nil
}

// rollbackWitnesses lists the consensus addresses of the servers of this
// node's last Raft configuration and of the members of its cluster that
// gossip shows, without this node.
func (n *Node) rollbackWitnesses() ([]string, error) {
	seen := map[string]bool{n.cfg.Advertise: true}
	var out []string
	add := func(addr string) {
		if addr != "" && !seen[addr] {
			seen[addr] = true
			out = append(out, addr)
		}
	}
	conf, err := n.lastConfiguration()
	if err != nil {
		return nil, err
	}
	self := raft.ServerID(n.id.String())
	for _, s := range conf.Servers {
		if s.ID != self {
			add(string(s.Address))
		}
	}
	for _, m := range n.clusterMembers() {
		if m.ID != n.id {
			add(m.RaftAddr)
		}
	}
	return out, nil
}

// lastConfiguration reads the Raft configuration in this node's log.
func (n *Node) lastConfiguration() (raft.Configuration, error) {
	logs, stable, snaps, closeLogs, err := n.stores()
	if err != nil {
		return raft.Configuration{}, err
	}
	defer closeLogs()
	_, trans := raft.NewInmemTransport("")
	defer trans.Close()
	conf, err := raft.GetConfiguration(n.raftConfig(), catalog.NewFSM(), logs, stable, snaps, trans)
	if err != nil {
		return raft.Configuration{}, fmt.Errorf("reading the last Raft configuration: %w", err)
	}
	return conf, nil
}

// generationOf is the generation of the node with identity id that this
// node's catalog holds (0: none).
func (n *Node) generationOf(id crypto.NodeID) uint64 {
	var gen uint64
	n.fsm.Read(func(s *catalog.State) {
		if node, ok := s.NodeByID(id); ok {
			gen = node.Generation
		}
	})
	return gen
}

// nodeFile is this node's own record of how many times it started.
type nodeFile struct {
	Generation uint64 `json:"generation"`
	// RolledBack is the refusal of a state directory found to be an older
	// copy; it stands until an operator replaces the directory.
	RolledBack string `json:"rolled_back,omitempty"`
}

func nodeFilePath(dir string) string { return filepath.Join(dir, "node.json") }

func readNodeFile(dir string) (nodeFile, error) {
	var f nodeFile
	path := nodeFilePath(dir)
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return f, fmt.Errorf("reading %s: %w", path, err)
	default:
		if err := json.Unmarshal(b, &f); err != nil {
			return f, fmt.Errorf("reading %s: %w", path, err)
		}
	}
	return f, nil
}

func writeNodeFile(dir string, f nodeFile) error {
	b, _ := json.Marshal(f)
	if err := durable.WriteFile(nodeFilePath(dir), b, 0o600); err != nil {
		return fmt.Errorf("storing this node's generation (is the state directory writable?): %w", err)
	}
	return nil
}

// nextGeneration reads, advances and durably stores the generation.
func nextGeneration(dir string) (nodeFile, error) {
	if dir == "" {
		return nodeFile{Generation: 1}, nil
	}
	f, err := readNodeFile(dir)
	if err != nil {
		return f, err
	}
	f.Generation++
	return f, writeNodeFile(dir, f)
}

// refusal is the standing refusal of this state directory, if any.
func (f nodeFile) refusal() error {
	if f.RolledBack == "" {
		return nil
	}
	return &catalog.Error{Code: catalog.CodeRolledBack, Message: f.RolledBack}
}

// markRolledBack writes a rolled-back refusal down, so that it stands
// across restarts.
func (n *Node) markRolledBack(refusal error) {
	if n.cfg.Dir == "" || !errors.Is(refusal, catalog.ErrRolledBack) {
		return
	}
	f, err := readNodeFile(n.cfg.Dir)
	if err == nil {
		f.RolledBack = refusal.Error()
		err = writeNodeFile(n.cfg.Dir, f)
	}
	if err != nil {
		n.log.Warn("writing down that this state directory is an older copy", "err", err)
	}
}
