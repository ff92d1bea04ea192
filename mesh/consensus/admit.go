package consensus

// The leader's side of a join or a leave (rpc.go's methodJoin and
// methodLeave): the changes to the Raft configuration it makes for them.

import (
	"errors"
	"fmt"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
)

// admit adds a registered node to the configuration as a non-voter, for
// a join that who asked for itself: over TLS (direct), or by a claim it
// signed that a member passed on. It never gives one server's address to
// another, and never moves a voter for a member that passed a join on: a
// node answering at a voter's address could vote in its place. A voter
// that asks itself to move (a new address after a restart) is moved as a
// non-voter; the autopilot promotes it again once it answers there.
func (n *Node) admit(who crypto.NodeID, addr string, direct bool) error {
	if _, ok := n.registeredID(who); !ok {
		return fmt.Errorf("node %s is not registered", who.Short())
	}
	if addr == "" {
		return errors.New("no consensus address")
	}
	if who == n.id {
		return errors.New("the leader does not admit itself")
	}
	r := n.raftServer()
	if r == nil {
		return errNotLeader
	}
	f := r.GetConfiguration()
	if err := f.Error(); err != nil {
		return err
	}
	id := raft.ServerID(who.String())
	moveVoter, move := false, false
	for _, s := range f.Configuration().Servers {
		switch {
		case s.ID == id && s.Address == raft.ServerAddress(addr):
			return nil
		case s.Address == raft.ServerAddress(addr):
			n.metrics.refused("join-address-taken")
			return fmt.Errorf("address %s is server %s's", addr, shortID(string(s.ID)))
		case s.ID == id:
			move = true
			moveVoter = s.Suffrage != raft.Nonvoter
		}
	}
	if moveVoter && !direct {
		n.metrics.refused("join-moves-voter")
		return fmt.Errorf("node %s is a voter at another address; only its own request over TLS moves it", who.Short())
	}
	if move {
		// Out, then in at the new address: hashicorp/raft changes a
		// server's address in place on a running replication without a
		// lock (a data race the race detector reports), and a voter that
		// moves is to come back as a non-voter anyway.
		if moveVoter {
			n.log.Warn("a voter asks to move: making it a non-voter at its new address", "node_id", who.Short(), "addr", addr)
		}
		if err := r.RemoveServer(id, 0, applyTimeout).Error(); err != nil {
			if errors.Is(err, raft.ErrNotLeader) {
				return errNotLeader
			}
			return fmt.Errorf("removing server %s to move it: %w", who.Short(), err)
		}
	}
	if err := r.AddNonvoter(id, raft.ServerAddress(addr), 0, applyTimeout).Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) {
			return errNotLeader
		}
		return fmt.Errorf("admitting %s: %w", who.Short(), err)
	}
	return nil
}

// removeServer takes a node out of the configuration.
func (n *Node) removeServer(who crypto.NodeID) error {
	r := n.raftServer()
	if r == nil {
		return errNotLeader
	}
	if err := r.RemoveServer(raft.ServerID(who.String()), 0, applyTimeout).Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) {
			return errNotLeader
		}
		return err
	}
	return nil
}
