package consensus

import (
	"slices"
	"strings"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// Status is this node's view of consensus, for `wgmesh status`.
type Status struct {
	ClusterID string `json:"cluster_id,omitempty"`
	// State is leader, follower, candidate, non-voter, joining,
	// refused or stopped.
	State      string         `json:"state"`
	Leader     string         `json:"leader,omitempty"`
	Servers    []ServerStatus `json:"servers,omitempty"`
	Registered bool           `json:"registered"`
	// Problem says why this node is not (yet) a working member.
	Problem      string `json:"problem,omitempty"`
	CommitIndex  uint64 `json:"commit_index,omitempty"`
	AppliedIndex uint64 `json:"applied_index,omitempty"`
	Generation   uint64 `json:"generation"`
	Stats        Stats  `json:"stats"`
	// Unreachable lists members whose consensus connections time out
	// (health.go), with their names where gossip knows the address.
	Unreachable []Unreachable `json:"unreachable,omitempty"`
}

// ServerStatus is a server of the Raft configuration.
type ServerStatus struct {
	Name    string `json:"name"`
	Address string `json:"address"`
	Voter   bool   `json:"voter"`
}

// Status reports this node's consensus state.
func (n *Node) Status() Status {
	n.mu.Lock()
	r, registered, fatal, joinErr, shutdown, diskErr := n.raft.r, n.member.registered, n.member.fatal, n.member.joinErr, n.member.shutdown, n.diskErr
	n.mu.Unlock()
	st := Status{Registered: registered, Generation: n.run.gen, Stats: n.metrics.stats(), Unreachable: n.unreachable()}
	var state *catalog.State
	n.fsm.Read(func(s *catalog.State) {
		st.ClusterID = s.ClusterID
		st.AppliedIndex = s.Index
		state = s.Clone()
	})
	switch {
	case fatal != nil:
		st.State, st.Problem = "refused", fatal.Error()
	case shutdown:
		st.State = "stopped"
	case r == nil:
		st.State = "joining"
	default:
		st.State = strings.ToLower(r.State().String())
		st.CommitIndex = r.CommitIndex()
		_, lid := r.LeaderWithID()
		st.Leader = n.nameOf(state, lid)
		if lid == "" {
			st.Leader = ""
		}
		if f := r.GetConfiguration(); f.Error() == nil {
			self := false
			for _, s := range f.Configuration().Servers {
				st.Servers = append(st.Servers, ServerStatus{Name: n.nameOf(state, s.ID), Address: string(s.Address), Voter: s.Suffrage == raft.Voter})
				if s.ID == raft.ServerID(n.id.String()) {
					self = true
					if s.Suffrage != raft.Voter && st.State == "follower" {
						st.State = "non-voter"
					}
				}
			}
			if !self && st.State == "follower" {
				st.State = "joining"
			}
			slices.SortFunc(st.Servers, func(a, b ServerStatus) int { return strings.Compare(a.Name, b.Name) })
		}
	}
	if joinErr != nil && st.Problem == "" && (!registered || st.State == "joining") {
		st.Problem = joinErr.Error()
	}
	if err := n.fsm.Err(); err != nil && st.Problem == "" {
		st.Problem = "this node's replica of the catalog missed entries, so this node claims nothing; restart the agent: " + err.Error()
	}
	if diskErr != nil && st.Problem == "" {
		st.Problem = "the state directory cannot be written, so this node claims nothing: " + diskErr.Error()
	}
	return st
}

// peerStatus answers a status request.
func (n *Node) peerStatus() PeerStatus {
	st := PeerStatus{ClusterID: n.ClusterID(), State: "joining", AppliedIndex: n.fsm.Index(), BootID: n.run.bootID}
	if r := n.raftServer(); r != nil {
		st.State = strings.ToLower(r.State().String())
		st.LastIndex = r.LastIndex()
		addr, id := r.LeaderWithID()
		st.LeaderAddr = string(addr)
		st.LeaderID, _ = crypto.ParseNodeID(string(id))
	}
	if low, ok := n.lowestAlive(n.cfg.Membership.Members()); ok {
		st.LowestName, st.LowestID = low.Name, low.ID
	}
	if len(n.cfg.ServerKey) > 0 {
		st.ServerProof = crypto.ServerProof(n.cfg.ServerKey, n.id)
	}
	return st
}

// Identity returns this node's boot ID and generation (for gossip).
func (n *Node) Identity() (bootID string, generation uint64) { return n.run.bootID, n.run.gen }

// unreachable lists the members whose consensus connections time out,
// named by the addresses members advertise.
func (n *Node) unreachable() []Unreachable {
	out := n.mux.health.list()
	if len(out) == 0 {
		return nil
	}
	names := map[string]string{}
	for _, m := range n.cfg.Membership.Members() {
		if !m.Self && m.RaftAddr != "" {
			names[m.RaftAddr] = m.Name
		}
	}
	for i := range out {
		out[i].Name = names[out[i].Addr]
	}
	return out
}
