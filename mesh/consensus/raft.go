package consensus

import (
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/internal/logbridge"
)

// raftConfig is the Raft configuration of this node.
func (n *Node) raftConfig() *raft.Config {
	c := *n.cfg.Raft
	c.LocalID = raft.ServerID(n.id.String())
	c.Logger = logbridge.Hclog(n.log, "raft", hclog.Info)
	// A node removed from the configuration keeps running as a
	// non-voter candidate for re-admission rather than shutting down.
	c.ShutdownOnRemove = false
	// The catalog is loaded from this node's own copy or, when that is
	// older, from Raft's newest snapshot (catalog.go), before Raft starts:
	// Raft then replays only what came after, and the catalog is there
	// from the first moment.
	c.NoSnapshotRestoreOnStart = true
	return &c
}

// newRaft is raft.NewRaft with its panics (a store it cannot read)
// turned into errors that say what failed, for the agent to report.
func newRaft(conf *raft.Config, fsm raft.FSM, logs raft.LogStore, stable raft.StableStore, snaps raft.SnapshotStore, trans raft.Transport) (r *raft.Raft, err error) {
	defer func() {
		if p := recover(); p != nil {
			r, err = nil, fmt.Errorf("raft: %v", p)
		}
	}()
	return raft.NewRaft(conf, fsm, logs, stable, snaps, trans)
}

// startRaft starts this node's Raft server; with boot set it bootstraps a
// new cluster of which it is the only voter.
func (n *Node) startRaft(boot *raft.Configuration) error {
	logs, stable, snaps, closeLogs, err := n.stores()
	if err != nil {
		return err
	}
	trans := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  &streamLayer{m: n.mux, addr: tcpAddr(n.cfg.Advertise)},
		MaxPool: 3,
		Timeout: 10 * time.Second,
		Logger:  logbridge.Hclog(n.log, "raft-net", hclog.Warn),
	})
	if err := n.loadCatalog(snaps); err != nil {
		trans.Close()
		_ = closeLogs()
		return err
	}
	if n.cfg.Dir != "" {
		// Set before Raft runs the FSM.
		n.fsm.SetGapCheck(logGapCheck(logs))
	}
	conf := n.raftConfig()
	if boot != nil {
		if err := raft.BootstrapCluster(conf, logs, stable, snaps, trans, *boot); err != nil {
			trans.Close()
			_ = closeLogs()
			return fmt.Errorf("bootstrapping the cluster: %w", err)
		}
	}
	r, err := newRaft(conf, n.fsm, logs, stable, snaps, trans)
	if err != nil {
		trans.Close()
		_ = closeLogs()
		return fmt.Errorf("starting Raft: %w", err)
	}
	n.mu.Lock()
	n.raft.r, n.raft.trans, n.raft.closer = r, trans, closeLogs
	n.mu.Unlock()
	done := make(chan struct{})
	n.mu.Lock()
	n.raft.done = done
	n.mu.Unlock()
	go n.watchLeader(r, done)
	n.log.Info("consensus started", "raft_addr", n.cfg.Advertise, "bootstrap", boot != nil)
	n.notify()
	return nil
}

// watchLeader reports leadership changes until Raft shuts down.
func (n *Node) watchLeader(r *raft.Raft, done <-chan struct{}) {
	ch := make(chan raft.Observation, 16)
	obs := raft.NewObserver(ch, false, func(o *raft.Observation) bool {
		_, ok := o.Data.(raft.LeaderObservation)
		return ok
	})
	r.RegisterObserver(obs)
	defer r.DeregisterObserver(obs)
	for {
		select {
		case o := <-ch:
			lo := o.Data.(raft.LeaderObservation)
			n.log.Info("consensus leader", "leader_id", shortID(string(lo.LeaderID)), "leader_addr", string(lo.LeaderAddr))
			n.metrics.leaderChanges.Add(1)
			n.notify()
		case <-done:
			return
		}
	}
}

func shortID(s string) string {
	if len(s) > 10 {
		return s[:10]
	}
	return s
}

func (n *Node) stop() {
	n.mu.Lock()
	r, trans, closer, done := n.raft.r, n.raft.trans, n.raft.closer, n.raft.done
	n.raft.r, n.raft.done, n.member.shutdown = nil, nil, true
	n.mu.Unlock()
	if done != nil {
		close(done)
	}
	if r != nil {
		if err := r.Shutdown().Error(); err != nil {
			n.log.Warn("stopping Raft", "err", err)
		}
	}
	if trans != nil {
		trans.Close()
	}
	n.mux.close()
	if closer != nil {
		if err := closer(); err != nil {
			n.log.Warn("closing the Raft log", "err", err)
		}
	}
}

// raftServer returns the running Raft server, or nil.
func (n *Node) raftServer() *raft.Raft {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.raft.r
}

func (n *Node) isLeader() bool {
	r := n.raftServer()
	return r != nil && r.State() == raft.Leader
}

// leader returns the leader's consensus address and ID, as this node's
// Raft knows them.
func (n *Node) leader() (string, crypto.NodeID) {
	r := n.raftServer()
	if r == nil {
		return "", crypto.NodeID{}
	}
	addr, id := r.LeaderWithID()
	nid, _ := crypto.ParseNodeID(string(id))
	return string(addr), nid
}
