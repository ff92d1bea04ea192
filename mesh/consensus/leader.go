package consensus

// Reaching the leader: which members to ask, the leader most of them
// name, and how a request or an entry gets to it, directly or passed on
// by a member.

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// ErrNoLeader is returned when no leader of the cluster can be reached:
// most voters are down, or cut off from this node.
var ErrNoLeader = errors.New("no leader of the cluster can be reached")

// ErrUnreachable is ErrNoLeader when the members this node asked are up
// (gossip reaches them) but its consensus connections to them time out:
// not a lost quorum but a path or a firewall that loses packets (see
// Status.Unreachable).
var ErrUnreachable = fmt.Errorf("%w: members are up, but this node's consensus connections to them time out", ErrNoLeader)

// leaderAsks caps how many members a node asks who leads.
const leaderAsks = 5

// confirmedLeader asks members who leads the cluster and returns the
// leader that most of those that answered name, and at least two of them
// when two members not behind NAT exist (a member behind NAT may be out
// of this node's reach). The leader must be such a member itself: voters
// never are behind NAT. One hostile member cannot make itself, or anyone,
// this node's leader.
func (n *Node) confirmedLeader(ctx context.Context, members []Member) (crypto.NodeID, string, error) {
	members = n.askable(members)
	public := map[crypto.NodeID]bool{}
	for _, m := range members {
		if !m.BehindNAT {
			public[m.ID] = true
		}
	}
	// Members this node can surely dial first.
	ask := slices.Clone(members)
	slices.SortStableFunc(ask, func(a, b Member) int {
		switch {
		case a.BehindNAT == b.BehindNAT:
			return 0
		case b.BehindNAT:
			return -1
		}
		return 1
	})
	ask = ask[:min(len(ask), leaderAsks)]
	if len(ask) == 0 {
		return crypto.NodeID{}, "", errors.New("no member of the cluster in sight")
	}
	type named struct {
		id   crypto.NodeID
		addr string
	}
	answers := make([]*named, len(ask))
	var wg sync.WaitGroup
	for i, m := range ask {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			resp, err := n.callID(cctx, m.RaftAddr, m.ID, &request{Method: methodStatus})
			if err != nil || resp.Status == nil {
				return
			}
			answers[i] = &named{resp.Status.LeaderID, resp.Status.LeaderAddr}
		}()
	}
	wg.Wait()
	votes := map[named]int{}
	answered := 0
	var best named
	for _, a := range answers {
		if a == nil {
			continue
		}
		answered++
		if a.id.IsZero() {
			continue
		}
		votes[*a]++
		if votes[*a] > votes[best] {
			best = *a
		}
	}
	need := min(2, len(public))
	switch {
	case answered == 0:
		return crypto.NodeID{}, "", fmt.Errorf("none of %d members asked says who leads the cluster (are their consensus ports open?)", len(ask))
	case votes[best] == 0:
		return crypto.NodeID{}, "", fmt.Errorf("none of %d members that answered knows a leader", answered)
	case 2*votes[best] <= answered || votes[best] < need:
		return crypto.NodeID{}, "", fmt.Errorf("members disagree on the leader: %d of %d that answered name node %s", votes[best], answered, best.id.Short())
	case !public[best.id]:
		return crypto.NodeID{}, "", fmt.Errorf("the leader members name, node %s, is not a member this node sees reachable", best.id.Short())
	}
	return best.id, best.addr, nil
}

// knownLeader is the leader this node's Raft follows (its voters are the
// only nodes it takes Raft traffic from), else the one members confirm.
func (n *Node) knownLeader(ctx context.Context, members []Member) (crypto.NodeID, string, error) {
	if addr, id := n.leader(); addr != "" && !id.IsZero() {
		return id, addr, nil
	}
	return n.confirmedLeader(ctx, members)
}

// toLeader sends a request to the leader lid, checking that lid answers
// at laddr; failing that, through the members, which pass it on (a join
// or leave then carries this node's signed claim). direct says whether
// the answer is the leader's own.
func (n *Node) toLeader(ctx context.Context, lid crypto.NodeID, laddr string, members []Member, req *request) (resp response, direct bool, err error) {
	var last error = errNoLeader
	if !lid.IsZero() && laddr != "" {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := n.callID(cctx, laddr, lid, req)
		cancel()
		if err == nil && resp.Err == "" {
			return resp, true, nil
		}
		last = errors.Join(err, errString(resp.Err))
	}
	if req.Method == methodJoin || req.Method == methodLeave {
		n.sign(req, clusterOf(members))
	}
	for _, m := range n.askable(members) {
		if m.ID == lid || ctx.Err() != nil {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := n.callID(cctx, m.RaftAddr, m.ID, req)
		cancel()
		if err == nil && resp.Err == "" {
			return resp, false, nil
		}
		last = errors.Join(err, errString(resp.Err))
		n.log.Debug("sending to the leader through a member", "method", req.Method, "via", m.Name, "err", last)
	}
	return response{}, false, last
}

// askable drops, when this node is behind NAT, the members behind NAT:
// neither can dial the other, and they park connections only at members
// that can be dialled (reverse.go). Asking one cost a wait for a parked
// connection and a dial that times out, seconds each, and made a host
// behind NAT miss a leader it could reach.
func (n *Node) askable(members []Member) []Member {
	selfBehind := false
	for _, m := range n.cfg.Membership.Members() {
		if m.Self {
			selfBehind = m.BehindNAT
		}
	}
	if !selfBehind {
		return members
	}
	return slices.DeleteFunc(slices.Clone(members), func(m Member) bool { return m.BehindNAT })
}

// clusterOf is the cluster of members (clusterMembers lists one).
func clusterOf(members []Member) string {
	for _, m := range members {
		if m.ClusterID != "" {
			return m.ClusterID
		}
	}
	return ""
}

// clusterMembers lists the alive members of this node's cluster with a
// consensus address, the known leader first. A node without a cluster yet
// takes the one most members it sees belong to: should two clusters ever
// meet by gossip, nobody joins both.
func (n *Node) clusterMembers() []Member {
	_, leaderID := n.leader()
	members := n.cfg.Membership.Members()
	own := n.ClusterID()
	if own == "" {
		count := map[string]int{}
		for _, m := range members {
			if !m.Self && m.Alive && m.ClusterID != "" {
				count[m.ClusterID]++
			}
		}
		for id, c := range count {
			if own == "" || c > count[own] || c == count[own] && id < own {
				own = id
			}
		}
	}
	var out []Member
	for _, m := range members {
		if !m.Self && m.Alive && m.RaftAddr != "" && m.ClusterID != "" && m.ClusterID == own {
			out = append(out, m)
		}
	}
	rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	slices.SortStableFunc(out, func(a, b Member) int {
		if a.ID == leaderID {
			return -1
		}
		if b.ID == leaderID {
			return 1
		}
		return 0
	})
	return out
}

// send delivers a signed entry to the leader: applied here if this node
// leads, else sent to the leader it knows, else through any member.
func (n *Node) send(ctx context.Context, entry []byte) (catalog.Result, uint64, error) {
	if n.isLeader() {
		res, index, err := n.applyLocal(ctx, entry)
		if !errors.Is(err, errNotLeader) {
			return res, index, err
		}
	}
	var last error = errNoLeader
	// stalled: every member asked, and there was one, timed out.
	asked, stalled := 0, 0
	note := func(resp response, err error) {
		asked++
		if err != nil && isTimeout(err) {
			stalled++
		}
		last = errors.Join(err, errString(resp.Err))
	}
	if addr, _ := n.leader(); addr != "" {
		resp, err := n.callLeader(ctx, &request{Method: methodApply, Entry: entry})
		if err == nil && resp.Err == "" {
			return resp.Result, resp.Index, nil
		}
		note(resp, err)
	}
	for _, m := range n.clusterMembers() {
		if ctx.Err() != nil {
			break
		}
		resp, _, err := n.call(ctx, m.RaftAddr, &request{Method: methodApply, Entry: entry})
		if err == nil && resp.Err == "" {
			return resp.Result, resp.Index, nil
		}
		note(resp, err)
	}
	if asked > 0 && stalled == asked {
		return catalog.Result{}, 0, fmt.Errorf("%w: %w", ErrUnreachable, last)
	}
	return catalog.Result{}, 0, fmt.Errorf("%w: %w", ErrNoLeader, last)
}

func errString(s string) error {
	if s == "" {
		return nil
	}
	return errors.New(s)
}
