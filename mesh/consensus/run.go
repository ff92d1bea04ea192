package consensus

import (
	"context"
	"time"
)

// Run serves consensus until ctx is done.
func (n *Node) Run(ctx context.Context) error {
	n.mux.wg.Add(1)
	go n.mux.serve()
	defer n.stop()
	parkCtx, stopParking := context.WithCancel(ctx)
	defer stopParking()
	n.mux.wg.Add(1)
	go n.loopPark(parkCtx)

	has, err := n.hasState()
	if err != nil {
		return err
	}
	if has && n.Refusal() == nil {
		// A node with Raft state has voted and acknowledged entries
		// before: it must not vote with an older copy of them.
		if err := n.checkRollback(ctx); err != nil {
			n.refused(err)
		} else if err := n.startRaft(nil); err != nil {
			return err
		}
	}
	// A node that is a settled member has little to do: it wakes every
	// few ticks (the leader's autopilot runs once a second), and at once
	// when the catalog changes, to save its copy.
	timer := time.NewTimer(0)
	defer timer.Stop()
	lastPilot, lastSave := time.Time{}, time.Time{}
	defer n.saveCatalog()
	for {
		changed := n.fsm.Changed()
		n.step(ctx)
		n.confirmRefusedLeader(ctx)
		if time.Since(lastSave) >= saveCatalogEvery {
			lastSave = time.Now()
			n.saveCatalog()
		}
		if n.isLeader() && time.Since(lastPilot) >= time.Second {
			lastPilot = time.Now()
			n.autopilot(ctx)
		}
		next := n.cfg.Tick
		if n.settled() {
			next = 4 * n.cfg.Tick
		}
		timer.Reset(next)
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		case <-changed:
			// Let a burst of entries pass before saving.
			select {
			case <-ctx.Done():
				return nil
			case <-timer.C:
			case <-time.After(saveCatalogEvery):
				timer.Stop()
			}
		}
	}
}

// settled reports whether this node is a registered member in its own
// copy of the configuration.
func (n *Node) settled() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.member.registered && n.raft.r != nil && n.member.admitted && n.member.fatal == nil
}

// step moves this node towards being a registered member of a cluster.
func (n *Node) step(ctx context.Context) {
	n.mu.Lock()
	r, registered, fatal := n.raft.r, n.member.registered, n.member.fatal
	n.mu.Unlock()
	if fatal != nil {
		return
	}
	switch {
	case r == nil:
		n.joinOrBootstrap(ctx)
	case !registered:
		n.register(ctx)
	default:
		n.ensureAdmitted(ctx)
	}
}
