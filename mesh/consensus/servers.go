package consensus

// Which hosts may vote. Voters decide what the cluster agrees on, so they
// are trusted, as Consul trusts its servers: a voter that lies can break
// any crash-tolerant protocol. By default (--server=auto) every reachable
// host may become one, which is right for a fleet whose hosts trust each
// other. An operator who does not trust every host names the ones that
// may vote:
//
//   - --server=never on a host: it never votes (it publishes so, and the
//     leader honours it). A host that is taken over can lie about this,
//     so it protects against mistakes, not attacks.
//   - a server key (--server-key-file) given to the trusted hosts only:
//     each publishes a proof bound to its identity (crypto.ServerProof),
//     and a leader that holds the key promotes only members whose proof
//     checks out, and demotes voters without one. A member without the
//     key cannot become a voter, whatever it publishes.
//   - --server=always: the host is promoted ahead of auto hosts, and an
//     auto voter gives way to it.

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
)

// ServerMode is a host's --server setting.
type ServerMode string

const (
	ServerAuto   ServerMode = "auto"
	ServerAlways ServerMode = "always"
	ServerNever  ServerMode = "never"
)

// ParseServerMode parses a --server value.
func ParseServerMode(s string) (ServerMode, error) {
	m := ServerMode(s)
	if err := m.validate(); err != nil {
		return "", err
	}
	if m == "" {
		m = ServerAuto
	}
	return m, nil
}

func (m ServerMode) validate() error {
	switch m {
	case "", ServerAuto, ServerAlways, ServerNever:
		return nil
	}
	return fmt.Errorf("--server %q: want auto, always or never", string(m))
}

// eligibleLocked says whether member m may be promoted to voter, whether
// it is barred from voting, and if not eligible why. Reachability (NAT) is
// judged apart. With a server key, a member whose proof this leader has
// not checked yet is neither eligible nor barred: checkProofs checks it,
// and until then a voter keeps its vote (a new leader knows no proofs).
func (n *Node) eligibleLocked(m Member) (eligible, barred bool, why string) {
	if m.Server == ServerNever {
		return false, true, "it runs with --server=never"
	}
	if len(n.cfg.ServerKey) > 0 {
		proved, checked := n.servers.proofs[m.ID]
		switch {
		case !checked:
			return false, false, "its proof of the server key is not checked yet"
		case !proved:
			return false, true, "it holds no proof of the server key"
		}
	}
	return true, false, ""
}

// proveServer asks the server at addr for its proof of the server key and
// records the answer; an unreachable server keeps what it had.
func (n *Node) proveServer(ctx context.Context, id crypto.NodeID, addr string) {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	resp, peer, err := n.call(cctx, addr, &request{Method: methodStatus})
	cancel()
	if err != nil || resp.Status == nil || peer != id {
		return
	}
	ok := crypto.VerifyServerProof(n.cfg.ServerKey, id, resp.Status.ServerProof)
	n.mu.Lock()
	n.servers.proofs[id] = ok
	n.mu.Unlock()
}

// checkProofs has the leader learn, one server a run, the proofs of the
// servers in its configuration it has not checked yet.
func (n *Node) checkProofs(ctx context.Context, servers []raft.Server) {
	if len(n.cfg.ServerKey) == 0 {
		return
	}
	n.mu.Lock()
	n.servers.proofs[n.id] = true
	var next *raft.Server
	for i, s := range servers {
		id, err := crypto.ParseNodeID(string(s.ID))
		if err != nil {
			continue
		}
		if _, checked := n.servers.proofs[id]; !checked {
			next = &servers[i]
			break
		}
	}
	n.mu.Unlock()
	if next != nil {
		id, _ := crypto.ParseNodeID(string(next.ID))
		n.proveServer(ctx, id, string(next.Address))
	}
}

// mayBootstrap says whether m may start a cluster, by what every member
// can tell from gossip: never a host that may not vote; and while some
// member says it holds the server key, only such a member. The claim is
// checked only later, when the leader promotes voters: a cluster should
// be started with its servers first (docs/threat-model.md).
func (n *Node) mayBootstrap(m Member, members []Member) bool {
	if m.Server == ServerNever {
		return false
	}
	for _, o := range members {
		if o.Alive && o.ClaimsServerKey {
			return m.ClaimsServerKey
		}
	}
	return true
}
