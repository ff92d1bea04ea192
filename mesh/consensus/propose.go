package consensus

// Commands of this node to the catalog: Propose, through which package
// mesh sends every one, the wait for this node's registration that comes
// first, and the errors a command fails with before it reaches a leader.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// ErrNotMember is returned for commands of a node that is not (yet) a
// registered member of a cluster.
var ErrNotMember = errors.New("this node is not a member of the cluster yet")

// ErrDisk refuses commands of a node whose state directory cannot be
// written.
var ErrDisk = errors.New("this node cannot write its state directory")

// Propose sends a command of this node to the leader and returns its
// result once it is applied here too. The command is signed with this
// node's identity and numbered; a command whose answer was lost is sent
// again with the same number, so it applies once. Propose waits for this
// node's registration, up to ctx.
func (n *Node) Propose(ctx context.Context, c *catalog.Command) (catalog.Result, error) {
	if err := n.waitRegistered(ctx); err != nil {
		return catalog.Result{}, err
	}
	n.run.seqMu.Lock()
	defer n.run.seqMu.Unlock()
	n.run.seq++
	c.Node, c.BootID, c.Seq = n.cfg.Name, n.run.bootID, n.run.seq
	s, err := catalog.Sign(c, n.cfg.Identity)
	if err != nil {
		return catalog.Result{}, err
	}
	entry := s.Encode()
	start := time.Now()
	for {
		res, index, err := n.send(ctx, entry)
		if err == nil {
			if err := n.fsm.WaitIndex(ctx, index); err != nil {
				return catalog.Result{}, err
			}
			n.metrics.proposal(c.Op, time.Since(start))
			return res, nil
		}
		select {
		case <-ctx.Done():
			return catalog.Result{}, fmt.Errorf("%w (%w)", ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// waitRegistered waits until this node is a registered member.
func (n *Node) waitRegistered(ctx context.Context) error {
	for {
		n.mu.Lock()
		ok, fatal, joinErr, shutdown, diskErr := n.member.registered, n.member.fatal, n.member.joinErr, n.member.shutdown, n.diskErr
		n.mu.Unlock()
		switch {
		case fatal != nil:
			return fatal
		case diskErr != nil:
			return fmt.Errorf("%w: %w", ErrDisk, diskErr)
		case n.fsm.Err() != nil:
			return fmt.Errorf("this node's replica of the catalog missed entries: %w", n.fsm.Err())
		case shutdown:
			return errClosed
		case ok:
			return nil
		}
		select {
		case <-ctx.Done():
			if joinErr != nil {
				return fmt.Errorf("%w: %w (%w)", ErrNotMember, joinErr, ctx.Err())
			}
			return fmt.Errorf("%w (%w)", ErrNotMember, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// SubmitSigned sends an entry that was signed elsewhere to the leader
// and returns its result, without waiting for it to apply here (tests use
// it to play a member that forges commands).
func (n *Node) SubmitSigned(ctx context.Context, entry []byte) (catalog.Result, error) {
	res, _, err := n.send(ctx, entry)
	return res, err
}
