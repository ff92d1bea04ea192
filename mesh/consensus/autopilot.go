package consensus

// The autopilot keeps the voter set small and healthy without an
// operator, as Consul's autopilot does for its servers. The leader runs
// it about once a second and makes at most one configuration change per
// run:
//
//  1. servers whose node is no longer registered (forgotten) go;
//  2. registered nodes that gossip sees alive join as non-voters;
//  3. while fewer voters are alive than the target (1 below 3 servers,
//     3 below 5, then 5; servers dead past their timeout not counted),
//     the longest-alive caught-up non-voter not behind NAT becomes a
//     voter;
//  4. a voter dead for DeadVoterTimeout is removed, once a replacement
//     was promoted (or none is available);
//  5. a non-voter dead for DeadNonvoterTimeout is removed (it is added
//     again when it returns);
//  6. voters beyond the target are demoted (never for a partition: a
//     server only stops counting once it is dead past its timeout);
//  7. a voter that may not vote (servers.go) is demoted, and an auto
//     voter gives way to an --server=always host waiting to vote; a
//     leader that may not vote hands leadership to a voter that may.
//
// A change needs a quorum of the current voters, so none of this helps a
// cluster that lost most of its voters for good: that takes `wgmesh
// recover` (recover.go).

import (
	"context"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// targetVoters is the voter count for a number of eligible servers:
// always odd, so that no extra voter is spent on a tie.
func targetVoters(eligible, maxVoters int) int {
	switch {
	case eligible >= 5 && maxVoters >= 5:
		return 5
	case eligible >= 3 && maxVoters >= 3:
		return 3
	}
	return 1
}

// stabilization is how long a node must have been alive before it is
// promoted: a node that flaps must not become a voter.
func (n *Node) stabilization() time.Duration { return 3 * n.cfg.Tick * 4 }

type serverInfo struct {
	raft.Server
	id        crypto.NodeID
	alive     bool
	behindNAT bool
	// eligible: it may be promoted (servers.go); barred: it may not
	// vote, as far as this leader knows (a server whose proof of the
	// server key it has not checked yet is neither); always: it asked.
	eligible bool
	barred   bool
	always   bool
	deadFor  time.Duration
	aliveFor time.Duration
}

func (n *Node) autopilot(ctx context.Context) {
	r := n.raftServer()
	if r == nil || r.State() != raft.Leader {
		return
	}
	f := r.GetConfiguration()
	if err := f.Error(); err != nil {
		return
	}
	n.checkProofs(ctx, f.Configuration().Servers)
	now := time.Now()
	state := n.fsm.State()
	members := map[crypto.NodeID]Member{}
	for _, m := range n.cfg.Membership.Members() {
		members[m.ID] = m
	}
	inConfig := map[crypto.NodeID]bool{}
	var servers []serverInfo
	n.mu.Lock()
	for _, s := range f.Configuration().Servers {
		id, err := crypto.ParseNodeID(string(s.ID))
		if err != nil {
			continue
		}
		inConfig[id] = true
		m, ok := members[id]
		si := serverInfo{Server: s, id: id, alive: id == n.id || ok && m.Alive, behindNAT: ok && m.BehindNAT}
		// A server gossip does not show keeps what it had: a partition
		// must not make voters look ineligible.
		si.eligible = true
		if ok {
			si.eligible, si.barred, _ = n.eligibleLocked(m)
			si.always = m.Server == ServerAlways
		}
		if si.alive {
			delete(n.servers.dead, id)
			if _, seen := n.servers.aliveSince[id]; !seen {
				n.servers.aliveSince[id] = now
			}
			si.aliveFor = now.Sub(n.servers.aliveSince[id])
		} else {
			delete(n.servers.aliveSince, id)
			if _, seen := n.servers.dead[id]; !seen {
				n.servers.dead[id] = now
			}
			si.deadFor = now.Sub(n.servers.dead[id])
		}
		servers = append(servers, si)
	}
	for id := range n.servers.dead {
		if !inConfig[id] {
			delete(n.servers.dead, id)
		}
	}
	n.mu.Unlock()
	slices.SortFunc(servers, func(a, b serverInfo) int { return strings.Compare(string(a.ID), string(b.ID)) })

	change := func(what string, s raft.ServerID, fut raft.IndexFuture) {
		if err := fut.Error(); err != nil {
			n.log.Warn("autopilot: "+what, "server", shortID(string(s)), "err", err)
			return
		}
		n.log.Info("autopilot: "+what, "server", shortID(string(s)), "node", n.nameOf(state, s))
		n.metrics.configChanges.Add(1)
	}
	const timeout = 5 * time.Second

	// 1. Forgotten nodes leave the configuration.
	for _, s := range servers {
		if s.id == n.id {
			continue
		}
		if _, ok := state.NodeByID(s.id); !ok {
			change("removing a server that is not a registered node", s.ID, r.RemoveServer(s.ID, 0, timeout))
			return
		}
	}
	// 2. Alive registered nodes join as non-voters.
	for _, name := range slices.Sorted(maps.Keys(state.Nodes)) {
		node := state.Nodes[name]
		m, ok := members[node.ID]
		if !ok || !m.Alive || m.RaftAddr == "" || inConfig[node.ID] || m.ID != node.ID {
			continue
		}
		change("adding a non-voter", raft.ServerID(node.ID.String()), r.AddNonvoter(raft.ServerID(node.ID.String()), raft.ServerAddress(m.RaftAddr), 0, timeout))
		return
	}
	// 3. and 4. Voters. The target counts every server not yet given up
	// on, dead or not: a partition must not shrink the voter set, or the
	// side that keeps the leader could lose its quorum to a demotion.
	counted, aliveVoters := 0, 0
	var deadVoter *serverInfo
	for i, s := range servers {
		timeout := n.cfg.DeadNonvoterTimeout
		if s.Suffrage == raft.Voter {
			timeout = n.cfg.DeadVoterTimeout
		}
		if (s.alive || s.deadFor < timeout) && !s.barred {
			counted++
		}
		if s.alive && s.Suffrage == raft.Voter {
			aliveVoters++
		}
		if !s.alive && s.Suffrage == raft.Voter && s.deadFor >= n.cfg.DeadVoterTimeout && deadVoter == nil {
			deadVoter = &servers[i]
		}
	}
	target := targetVoters(counted, n.cfg.MaxVoters)
	if aliveVoters < target {
		if s, ok := n.promotable(ctx, r, servers); ok {
			change("promoting a non-voter to voter", s.ID, r.AddVoter(s.ID, s.Address, 0, timeout))
			return
		}
	}
	if deadVoter != nil {
		change("removing a voter dead for "+deadVoter.deadFor.Round(time.Second).String(), deadVoter.ID, r.RemoveServer(deadVoter.ID, 0, timeout))
		return
	}
	// 5. Long-dead non-voters.
	for _, s := range servers {
		if !s.alive && s.Suffrage != raft.Voter && s.deadFor >= n.cfg.DeadNonvoterTimeout {
			change("removing a non-voter dead for "+s.deadFor.Round(time.Second).String(), s.ID, r.RemoveServer(s.ID, 0, timeout))
			return
		}
	}
	// 6. Too many voters (servers were removed): demote one that is not
	// us. Only voters dead long enough to be removed are not counted, so
	// this never happens because of a partition.
	voters := 0
	for _, s := range servers {
		if s.Suffrage == raft.Voter {
			voters++
		}
	}
	if voters > target && deadVoter == nil {
		// Those that may not vote go first, then auto ones, then always.
		for _, pass := range []func(serverInfo) bool{
			func(s serverInfo) bool { return s.barred },
			func(s serverInfo) bool { return !s.always },
			func(serverInfo) bool { return true },
		} {
			for _, s := range slices.Backward(servers) {
				if s.alive && s.Suffrage == raft.Voter && s.id != n.id && pass(s) {
					change("demoting a voter beyond the target", s.ID, r.DemoteVoter(s.ID, 0, timeout))
					return
				}
			}
		}
	}
	n.enforceServers(ctx, r, servers, change)
}

// enforceServers is step 7: voters that may not vote go, and auto voters
// make room for always hosts. One change per run; the promotion steps
// above fill the voter set again on the next runs.
func (n *Node) enforceServers(ctx context.Context, r *raft.Raft, servers []serverInfo, change func(string, raft.ServerID, raft.IndexFuture)) {
	const timeout = 5 * time.Second
	var self *serverInfo
	otherEligibleVoter := false
	for i, s := range servers {
		if s.id == n.id {
			self = &servers[i]
		} else if s.Suffrage == raft.Voter && s.alive && s.eligible {
			otherEligibleVoter = true
		}
	}
	for _, s := range servers {
		if s.id != n.id && s.alive && s.Suffrage == raft.Voter && s.barred {
			change("demoting a voter that may not vote", s.ID, r.DemoteVoter(s.ID, 0, timeout))
			return
		}
	}
	if self != nil && self.barred && otherEligibleVoter {
		n.log.Info("autopilot: this node may not vote; handing leadership over")
		if err := r.LeadershipTransfer().Error(); err != nil {
			n.log.Warn("autopilot: handing leadership over", "err", err)
		}
		return
	}
	// An always host waits to vote while the voter set is full of auto
	// hosts: one of those (never this leader) steps down for it.
	waiting := false
	for _, s := range servers {
		if s.always && s.eligible && s.alive && !s.behindNAT && s.Suffrage != raft.Voter && s.aliveFor >= n.stabilization() {
			waiting = true
		}
	}
	if !waiting {
		return
	}
	if _, ok := n.promotable(ctx, r, servers); !ok {
		return // not caught up yet: demoting now would only shrink the voter set
	}
	for _, s := range slices.Backward(servers) {
		if s.id != n.id && s.alive && s.Suffrage == raft.Voter && !s.always {
			change("demoting an auto voter to make room for an --server=always host", s.ID, r.DemoteVoter(s.ID, 0, timeout))
			return
		}
	}
}

// promotable picks the non-voter to promote: alive for long enough,
// caught up with the log, longest alive first.
func (n *Node) promotable(ctx context.Context, r *raft.Raft, servers []serverInfo) (serverInfo, bool) {
	cands := slices.Clone(servers)
	slices.SortStableFunc(cands, func(a, b serverInfo) int {
		if a.always != b.always {
			if a.always {
				return -1
			}
			return 1
		}
		return -int(a.aliveFor - b.aliveFor)
	})
	last := r.LastIndex()
	for _, s := range cands {
		if s.Suffrage == raft.Voter || !s.alive || !s.eligible || s.aliveFor < n.stabilization() || s.behindNAT {
			// A node behind NAT is reached only through connections it
			// parks (reverse.go); a voter must be reachable by every
			// other voter, some of which may be behind NAT too.
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		resp, peer, err := n.call(cctx, string(s.Address), &request{Method: methodStatus})
		cancel()
		if err != nil || resp.Status == nil || peer != s.id {
			continue
		}
		if resp.Status.AppliedIndex+64 < last {
			continue // still catching up
		}
		return s, true
	}
	return serverInfo{}, false
}

func (n *Node) nameOf(s *catalog.State, id raft.ServerID) string {
	nid, err := crypto.ParseNodeID(string(id))
	if err != nil {
		return "?"
	}
	if node, ok := s.NodeByID(nid); ok {
		return node.Name
	}
	return "(unregistered)"
}
