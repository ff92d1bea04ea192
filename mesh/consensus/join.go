package consensus

// How a node becomes a member of the cluster's Raft, without anyone
// designating servers:
//
//	no Raft state ──gossip shows a cluster──▶ register through a member
//	     │                                     (forwarded to the leader),
//	     │                                     start Raft, ask to be admitted
//	     │                                     as a non-voter
//	     └──no cluster anywhere, view stable,─▶ bootstrap: sole voter,
//	        every seed in it, this node the     first entry initialises the
//	        lowest, no member knows a lower one cluster and registers it
//
//	Raft state ──────────────────────────────▶ register this run (a new
//	                                            generation) with the leader
//
// Two hosts started at the same moment do not both bootstrap: only the
// lowest-named node of a view that has stayed the same for a while, and
// that holds every one of its seeds, does, after asking every other member
// whether it knows of a cluster or of a lower node. The others join the
// cluster it advertises by gossip. A node whose seeds are out of reach
// waits: the cluster they belong to may well exist.

import (
	"cmp"
	"context"
	cryptorand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/mesh/catalog"
)

func lower(a, b Member) bool {
	return cmp.Or(cmp.Compare(a.Name, b.Name), strings.Compare(a.ID.String(), b.ID.String())) < 0
}

// lowestAlive is the lowest alive member of a gossip view that may vote
// (servers.go), not counting members behind NAT while there are others:
// the node that starts a cluster is its first voter, and voters must be
// reachable.
func (n *Node) lowestAlive(members []Member) (Member, bool) {
	var low Member
	found := false
	for _, m := range members {
		if !m.Alive || !n.mayBootstrap(m, members) {
			continue
		}
		if !found || low.BehindNAT && !m.BehindNAT || low.BehindNAT == m.BehindNAT && lower(m, low) {
			low, found = m, true
		}
	}
	return low, found
}

func (n *Node) setJoinErr(err error) {
	n.mu.Lock()
	changed := (err == nil) != (n.member.joinErr == nil) || err != nil && n.member.joinErr != nil && err.Error() != n.member.joinErr.Error()
	n.member.joinErr = err
	n.mu.Unlock()
	if changed && err != nil {
		n.log.Info("not a member of the cluster yet", "why", err)
	}
}

// joinOrBootstrap runs while this node has no Raft state.
func (n *Node) joinOrBootstrap(ctx context.Context) {
	members := n.cfg.Membership.Members()
	if cluster := n.clusterMembers(); len(cluster) > 0 {
		n.join(ctx, cluster)
		return
	}
	if !n.cfg.Membership.Joined() {
		n.setJoinErr(errors.New("waiting to reach a seed (--join)"))
		return
	}
	var alive []string
	for _, m := range members {
		if m.Alive {
			alive = append(alive, m.Name+"/"+m.ID.String())
		}
	}
	slices.Sort(alive)
	view := strings.Join(alive, ",")
	now := time.Now()
	n.mu.Lock()
	if view != n.member.view {
		n.member.view, n.member.viewSince = view, now
	}
	since := n.member.viewSince
	n.mu.Unlock()
	if now.Sub(since) < n.cfg.StableWait {
		n.setJoinErr(errors.New("waiting for the membership to settle before starting a cluster"))
		return
	}
	// Every seed must be here to agree: a fresh node cut off from the
	// seeds of an existing cluster must not start a second one with the
	// other fresh nodes it happens to see.
	if missing := n.cfg.Membership.MissingSeeds(); len(missing) > 0 {
		n.setJoinErr(fmt.Errorf("no cluster in sight; not starting one while seeds %v are unreachable", missing))
		return
	}
	low, ok := n.lowestAlive(members)
	if !ok {
		n.setJoinErr(errors.New("no member that may vote is in sight to start the cluster (every one runs with --server=never, or holds no server key)"))
		return
	}
	if !low.Self {
		n.setJoinErr(fmt.Errorf("waiting for node %s to start the cluster", low.Name))
		return
	}
	for _, m := range members {
		if m.Self || !m.Alive {
			continue
		}
		if m.RaftAddr == "" {
			n.setJoinErr(fmt.Errorf("node %s advertises no consensus address", m.Name))
			return
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		resp, _, err := n.call(cctx, m.RaftAddr, &request{Method: methodStatus})
		cancel()
		if err != nil || resp.Status == nil {
			n.setJoinErr(fmt.Errorf("cannot ask node %s whether it knows a cluster (is TCP %s open?): %v", m.Name, m.RaftAddr, err))
			return
		}
		if resp.Status.ClusterID != "" {
			return // gossip will show its cluster soon
		}
		if resp.Status.LowestName != "" && lower(Member{Name: resp.Status.LowestName, ID: resp.Status.LowestID}, Member{Name: n.cfg.Name, ID: n.id}) {
			n.setJoinErr(fmt.Errorf("waiting for node %s, which %s knows, to start the cluster", resp.Status.LowestName, m.Name))
			return
		}
	}
	n.bootstrap(ctx)
}

// bootstrap starts a new cluster with this node as its only voter.
func (n *Node) bootstrap(ctx context.Context) {
	conf := raft.Configuration{Servers: []raft.Server{{Suffrage: raft.Voter, ID: raft.ServerID(n.id.String()), Address: raft.ServerAddress(n.cfg.Advertise)}}}
	if err := n.startRaft(&conf); err != nil {
		n.setJoinErr(err)
		n.log.Error("starting a cluster", "err", err)
		return
	}
	n.log.Info("no cluster found: started one")
	n.register(ctx)
}

func newClusterID() string {
	b := make([]byte, 8)
	_, _ = cryptorand.Read(b)
	return hex.EncodeToString(b)
}

// registration is this run's registration entry (or, for the node that
// bootstrapped, the cluster's first entry).
func (n *Node) registration(init bool) ([]byte, error) {
	reg := catalog.Register{ID: n.id, Addr: n.cfg.Addr, Generation: n.run.gen, Protocol: catalog.Protocol}
	c := &catalog.Command{Op: catalog.OpRegister, Node: n.cfg.Name, BootID: n.run.bootID, Register: &reg}
	if init {
		c = &catalog.Command{Op: catalog.OpInit, Node: n.cfg.Name, BootID: n.run.bootID, Init: &catalog.Init{ClusterID: newClusterID(), Register: reg}}
	}
	s, err := catalog.Sign(c, n.cfg.Identity)
	if err != nil {
		return nil, err
	}
	return s.Encode(), nil
}

// fatalCodes are refusals that a retry cannot fix.
var fatalCodes = []catalog.Code{catalog.CodeNameTaken, catalog.CodeIdentityInUse, catalog.CodeForgotten, catalog.CodeRolledBack}

func (n *Node) refused(err error) {
	var ce *catalog.Error
	if errors.As(err, &ce) && slices.Contains(fatalCodes, ce.Code) {
		n.mu.Lock()
		n.member.fatal = err
		r := n.raft.r
		n.mu.Unlock()
		n.log.Error("the cluster refuses this node", "err", err)
		n.markRolledBack(err)
		if ce.Code == catalog.CodeRolledBack && r != nil {
			// Its Raft state may be as old as the rest: it must not vote.
			_ = r.Shutdown().Error()
		}
		n.notify()
		return
	}
	n.setJoinErr(err)
}

// join registers with the leader of an existing cluster, then starts Raft
// and asks to be admitted. The leader is the one most members name, and
// the joining node checks over TLS that it answers at its address: a
// single member's word could make any node this node's leader, from
// which it would take its configuration and catalog.
func (n *Node) join(ctx context.Context, cluster []Member) {
	entry, err := n.registration(false)
	if err != nil {
		n.setJoinErr(err)
		return
	}
	lid, laddr, err := n.confirmedLeader(ctx, cluster)
	if err != nil {
		n.setJoinErr(err)
		return
	}
	resp, direct, err := n.toLeader(ctx, lid, laddr, cluster, &request{Method: methodApply, Entry: entry})
	if err != nil {
		n.setJoinErr(fmt.Errorf("registering with the cluster: %w", err))
		return
	}
	if refusal := resp.Result.Err(); refusal != nil {
		if !direct {
			// A member that passed the entry on could have made the
			// refusal up: only the leader's own is final.
			n.setJoinErr(fmt.Errorf("registering through a member: %w", refusal))
			return
		}
		n.refused(refusal)
		return
	}
	n.mu.Lock()
	n.raft.admittedBy = lid
	n.mu.Unlock()
	if err := n.startRaft(nil); err != nil {
		n.setJoinErr(err)
		return
	}
	n.mu.Lock()
	n.member.registered = true
	n.mu.Unlock()
	n.setJoinErr(nil)
	n.log.Info("joined the cluster", "cluster", clusterOf(cluster), "leader_id", lid.Short(), "direct", direct, "generation", n.run.gen)
	n.askAdmission(ctx)
	n.notify()
}

// register registers this run with the leader (a node with Raft state).
func (n *Node) register(ctx context.Context) {
	init := false
	if n.isLeader() {
		n.fsm.Read(func(s *catalog.State) { init = s.ClusterID == "" })
	}
	entry, err := n.registration(init)
	if err != nil {
		n.setJoinErr(err)
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	res, index, err := n.send(cctx, entry)
	if err != nil {
		n.setJoinErr(fmt.Errorf("registering with the cluster's leader: %w", err))
		return
	}
	if refusal := res.Err(); refusal != nil {
		n.refused(refusal)
		return
	}
	_ = n.fsm.WaitIndex(cctx, index)
	n.mu.Lock()
	n.member.registered = true
	n.mu.Unlock()
	n.setJoinErr(nil)
	n.log.Info("registered with the cluster", "generation", n.run.gen, "init", init)
	n.notify()
}

// ensureAdmitted asks again to be admitted while this node is not in its
// own copy of the Raft configuration.
func (n *Node) ensureAdmitted(ctx context.Context) {
	r := n.raftServer()
	if r == nil {
		return
	}
	if r.State() == raft.Leader {
		n.mu.Lock()
		n.member.admitted = true
		n.mu.Unlock()
		return
	}
	f := r.GetConfiguration()
	if f.Error() != nil {
		return
	}
	for _, s := range f.Configuration().Servers {
		if s.ID == raft.ServerID(n.id.String()) {
			n.mu.Lock()
			n.member.admitted = true
			n.mu.Unlock()
			return
		}
	}
	n.mu.Lock()
	n.member.admitted = false
	n.mu.Unlock()
	n.askAdmission(ctx)
}

// askAdmission asks the leader to add this node to the Raft
// configuration: directly, else through members. Until this node has a
// configuration of its own, it takes Raft traffic only from that leader.
func (n *Node) askAdmission(ctx context.Context) {
	members := n.clusterMembers()
	lid, laddr, err := n.knownLeader(ctx, members)
	if err != nil {
		n.log.Debug("asking to be admitted", "err", err)
		return
	}
	n.mu.Lock()
	n.raft.admittedBy = lid
	n.mu.Unlock()
	if _, _, err := n.toLeader(ctx, lid, laddr, members, &request{Method: methodJoin, RaftAddr: n.cfg.Advertise}); err != nil {
		n.log.Debug("asking to be admitted", "leader_id", lid.Short(), "err", err)
	}
}

// Leave takes this node out of the Raft configuration, for a node that
// leaves the cluster on purpose: a leader hands over leadership first.
func (n *Node) Leave(ctx context.Context) error {
	r := n.raftServer()
	if r == nil {
		return nil
	}
	if r.State() == raft.Leader {
		if err := r.LeadershipTransfer().Error(); err != nil {
			return fmt.Errorf("handing over leadership: %w", err)
		}
	}
	members := n.clusterMembers()
	lid, laddr, err := n.knownLeader(ctx, members)
	if err != nil {
		n.log.Debug("leaving: no leader confirmed; asking members to pass it on", "err", err)
	}
	if _, _, err := n.toLeader(ctx, lid, laddr, members, &request{Method: methodLeave}); err != nil {
		return fmt.Errorf("no member could take this node out of the configuration: %w", err)
	}
	return nil
}
