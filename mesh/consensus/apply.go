package consensus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// applyTimeout bounds one Raft apply on the leader.
const applyTimeout = 10 * time.Second

// applyLocal appends a signed command to the log, as leader, and returns
// its result once committed and applied here.
func (n *Node) applyLocal(ctx context.Context, entry []byte) (catalog.Result, uint64, error) {
	r := n.raftServer()
	if r == nil || r.State() != raft.Leader {
		return catalog.Result{}, 0, errNotLeader
	}
	refusal, ext, ok := n.precheck(entry)
	if !ok {
		return refusal, 0, nil
	}
	timeout := applyTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(d))
	}
	// The member's signed command goes into the log as it came; the
	// leader's endorsement, if any, goes into the entry's Extensions
	// (endorse.go), which no member can set.
	f := r.ApplyLog(raft.Log{Data: entry, Extensions: ext}, timeout)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) || errors.Is(err, raft.ErrLeadershipTransferInProgress) {
			return catalog.Result{}, 0, errNotLeader
		}
		return catalog.Result{}, 0, fmt.Errorf("committing: %w", err)
	}
	// Followers learn that an entry committed from the next append the
	// leader sends them, which an idle leader sends only every
	// CommitTimeout; the node that asked waits to apply the entry
	// itself. A barrier is such an append, sent at once. Nothing waits
	// for it to commit.
	r.Barrier(timeout)
	res, _ := f.Response().(catalog.Result)
	return res, f.Index(), nil
}

// precheck refuses, before it reaches the log, a command that the state
// machine would refuse for its signature, a registration of a node
// whose registered run is still alive (a cloned host with a copy of the
// node's identity, clone.go), and what the leader's own checks refuse
// (endorse.go); it returns the Extensions of the command's log entry.
func (n *Node) precheck(entry []byte) (catalog.Result, []byte, bool) {
	sig, c, err := catalog.DecodeSigned(entry)
	if err != nil {
		n.metrics.refused("command-invalid")
		return catalog.Result{Code: catalog.CodeInvalid, Message: err.Error()}, nil, false
	}
	var refusal *catalog.Result
	var registered catalog.Node
	n.fsm.Read(func(s *catalog.State) {
		id, registering := c.SignerID()
		node, known := s.Nodes[c.Node]
		if !registering {
			if !known {
				refusal = &catalog.Result{Code: catalog.CodeNotRegistered, Message: fmt.Sprintf("node %s is not registered in the cluster", c.Node)}
				return
			}
			id = node.ID
		}
		if !sig.VerifiedBy(id) {
			refusal = &catalog.Result{Code: catalog.CodeBadSignature, Message: fmt.Sprintf("command in the name of node %s is not signed by its identity", c.Node)}
			return
		}
		if known {
			registered = *node
		}
	})
	if refusal == nil && registered.Name != "" {
		// Outside the read: it asks members (clone.go).
		refusal = n.cloneRefusal(context.Background(), c, registered)
	}
	if refusal != nil {
		n.metrics.refused(string(refusal.Code))
		return *refusal, nil, false
	}
	ext, refusal := n.endorse(c)
	if refusal != nil {
		n.metrics.refused(string(refusal.Code))
		return *refusal, nil, false
	}
	return catalog.Result{}, ext, true
}
