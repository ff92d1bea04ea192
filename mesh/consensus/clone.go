package consensus

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// A host started with a copy of a running node's identity and state
// directory (a cloned VM) registers under the node's name with a higher
// generation, which the catalog accepts as the node's next run: the node
// would lose its registration to the copy. The leader refuses such a
// registration while the registered run is demonstrably alive: it is the
// leader itself, or a member with that identity answers with the boot ID
// of the registered run. Addresses prove nothing either way (hosts behind
// NAT in separate networks often share a private address), so they are
// not compared. A node's own restart is no clone: its previous run is
// gone, and whatever answers at its address answers with the new boot ID
// or not at all.
//
// What cannot be caught: the registered run is alive but unreachable from
// the leader (then the copy takes over the registration, and the original
// finds its commands refused as stale), or is an agent of 559f90d, which
// does not answer its boot ID (the field is new and optional).

// cloneCheckTimeout bounds asking one member for its boot ID.
const cloneCheckTimeout = 2 * time.Second

// cloneRefusal refuses the registration c of node reg (its current
// registration) if the run reg records is still alive.
func (n *Node) cloneRefusal(ctx context.Context, c *catalog.Command, reg catalog.Node) *catalog.Result {
	if c.Op != catalog.OpRegister || c.Register == nil || reg.ID != c.Register.ID || reg.BootID == c.BootID {
		return nil
	}
	refusal := func(where string) *catalog.Result {
		return &catalog.Result{Code: catalog.CodeNameTaken, Message: fmt.Sprintf(
			"node %s with this identity is running (%s, since %s); this host has a copy of its identity (a cloned VM?): "+
				"give it a state directory of its own and another --node-name", c.Node, where, reg.Seen.UTC().Format(time.RFC3339))}
	}
	if reg.ID == n.id && reg.BootID == n.run.bootID {
		return refusal("it is the cluster's leader")
	}
	var addrs []string
	for _, m := range n.cfg.Membership.Members() {
		if m.ID == reg.ID && m.Alive && !m.Self && m.RaftAddr != "" {
			addrs = append(addrs, m.RaftAddr)
		}
	}
	alive := make(chan string, len(addrs))
	var wg sync.WaitGroup
	for _, addr := range addrs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if n.answersAs(ctx, addr, reg.ID, reg.BootID) {
				alive <- addr
			}
		}()
	}
	wg.Wait()
	close(alive)
	if addr, ok := <-alive; ok {
		return refusal("it answers at " + addr)
	}
	return nil
}

// answersAs reports whether the node at addr is the run of identity id
// with boot ID boot.
func (n *Node) answersAs(ctx context.Context, addr string, id crypto.NodeID, boot string) bool {
	cctx, cancel := context.WithTimeout(ctx, cloneCheckTimeout)
	defer cancel()
	resp, peer, err := n.call(cctx, addr, &request{Method: methodStatus})
	return err == nil && peer == id && resp.Status != nil && resp.Status.BootID == boot
}
