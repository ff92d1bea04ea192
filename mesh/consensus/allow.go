package consensus

import (
	"context"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
)

// allowRaft decides whether id may send this node Raft traffic: the
// voters of its latest configuration, or, before it has one, the leader
// that admitted it. Non-voters never send Raft requests, so a member
// that is not a voter cannot pose as a leader or a candidate.
func (n *Node) allowRaft(id crypto.NodeID) bool {
	r := n.raftServer()
	if r == nil {
		return false
	}
	n.mu.Lock()
	fresh := time.Since(n.raft.votersAt) < time.Second
	voters, admitted := n.raft.voters, n.raft.admittedBy
	n.mu.Unlock()
	if !fresh || !voters[id] {
		voters = n.refreshVoters(r)
	}
	if voters[id] || len(voters) == 0 && id == admitted {
		return true
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if id == n.raft.confirmed && time.Since(n.raft.confirmedAt) < leaderConfirmValid {
		return true
	}
	n.raft.refused, n.raft.refusedAt = id, time.Now()
	return false
}

// leaderConfirmValid is how long members' confirmation that a node leads
// lets it send Raft traffic to a node whose configuration does not list
// it; leaderConfirmEvery paces the asking.
const (
	leaderConfirmValid = 30 * time.Second
	leaderConfirmEvery = time.Second
)

// confirmRefusedLeader asks the members who leads when this node lately
// refused Raft traffic from a node its configuration does not list as a
// voter. A node that was down or cut off while the voters changed knows
// only the old ones; the new leader's traffic is what would bring it the
// new configuration. It takes that traffic only from the leader most
// members it asks name, as a joining node does (confirmedLeader): one
// hostile member cannot pose as its leader.
func (n *Node) confirmRefusedLeader(ctx context.Context) {
	n.mu.Lock()
	id, at := n.raft.refused, n.raft.refusedAt
	if id.IsZero() || time.Since(at) > 5*time.Second || time.Since(n.raft.confirmTried) < leaderConfirmEvery {
		n.mu.Unlock()
		return
	}
	n.raft.refused = crypto.NodeID{}
	n.raft.confirmTried = time.Now()
	n.mu.Unlock()
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	lid, _, err := n.confirmedLeader(cctx, n.clusterMembers())
	if err != nil || lid != id {
		n.log.Debug("refused Raft traffic from a node that is not a voter here; the members do not confirm it leads",
			"peer_id", id.Short(), "confirmed_leader", lid.Short(), "err", err)
		return
	}
	n.mu.Lock()
	n.raft.confirmed, n.raft.confirmedAt = id, time.Now()
	n.mu.Unlock()
	n.log.Info("taking Raft traffic from the leader the members confirm, which this node's configuration does not list as a voter yet (it fell behind)",
		"leader_id", id.Short())
}

func (n *Node) refreshVoters(r *raft.Raft) map[crypto.NodeID]bool {
	f := r.GetConfiguration()
	voters := map[crypto.NodeID]bool{}
	if f.Error() == nil {
		for _, s := range f.Configuration().Servers {
			if s.Suffrage != raft.Voter {
				continue
			}
			if id, err := crypto.ParseNodeID(string(s.ID)); err == nil {
				voters[id] = true
			}
		}
	}
	n.mu.Lock()
	n.raft.voters, n.raft.votersAt = voters, time.Now()
	n.mu.Unlock()
	return voters
}
