package consensus

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// The leader's part in the catalog's protocol 2 (catalog.Protocol): it
// checks what only it can see before it appends a member's command, and
// says so in the entry's Raft log Extensions, which no member can set.
//
// Compatibility with wgmesh before protocol 2 (559f90d), host by host:
//   - the leader endorses entries only while its catalog shows that every
//     registered node advertises protocol 2 (catalog.Register.Protocol, a
//     field older nodes neither send nor read), or once the cluster
//     switched (catalog.State.Protocol); an older replica would ignore
//     the endorsement and apply the entry with older rules, so none is
//     written while one may exist. A node whose registration an older
//     replica applied shows no protocol in that replica's catalog until
//     it registers again: such a replica, become leader, waits longer
//     before it switches, never less;
//   - entries without endorsement, from an older leader or from this one
//     before the switch, apply with the rules of protocol 1 everywhere;
//   - the checks below refuse commands before they reach the log, which
//     changes no replica, so the leader makes them before the switch too.
//     Bounds (catalog.MaxNodes and the rest) hold from the switch on.

// NetworkUsers is an optional part of Membership: which members report,
// through gossip, containers on a network. With it the leader can check
// that a network is unused before it lets one member remove it for every
// host; without it, a member's removal gives back that member's blocks
// only.
type NetworkUsers interface {
	// NetworkUsers maps the members with containers on subnet to how
	// many they report.
	NetworkUsers(subnet netip.Prefix) map[string]int
}

// endorse checks c as the leader and returns the Extensions of its log
// entry (nil for a protocol-1 entry), or the refusal of c.
func (n *Node) endorse(c *catalog.Command) ([]byte, *catalog.Result) {
	// Gossip first: Members may read the state too.
	var members []Member
	var users map[string]int
	usersKnown := false
	switch c.Op {
	case catalog.OpForget:
		members = n.cfg.Membership.Members()
	case catalog.OpDeleteNetwork:
		if nu, ok := n.cfg.Membership.(NetworkUsers); ok {
			users, usersKnown = nu.NetworkUsers(c.Delete.Subnet), true
		}
	}
	var refusal *catalog.Result
	checked, v2 := false, false
	n.fsm.Read(func(s *catalog.State) {
		v2 = endorsing(s, c)
		switch c.Op {
		case catalog.OpForget:
			target, ok := s.Nodes[c.Forget.Name]
			if !ok || c.Forget.Name == c.Node {
				return // the state machine refuses it, with its own words
			}
			for _, m := range members {
				if m.Alive && (m.Name == target.Name || m.ID == target.ID) {
					refusal = &catalog.Result{Code: catalog.CodeAlive, Message: fmt.Sprintf(
						"node %s is alive as gossip sees it from the cluster's leader: stop its agent first, or wait until gossip reports it failed",
						target.Name)}
					return
				}
			}
			checked = true
		case catalog.OpDeleteNetwork:
			if _, ok := s.Live(c.Delete.Subnet); !ok || !usersKnown {
				return
			}
			if len(users) > 0 {
				var where []string
				for _, node := range slices.Sorted(maps.Keys(users)) {
					where = append(where, fmt.Sprintf("%s (%d)", node, users[node]))
				}
				refusal = &catalog.Result{Code: catalog.CodeInUse, Message: fmt.Sprintf(
					"containers still use network %s on %s", c.Delete.Subnet, strings.Join(where, ", "))}
				return
			}
			checked = true
		}
	})
	if refusal != nil {
		return nil, refusal
	}
	if !v2 {
		return nil, nil
	}
	return catalog.Endorsement{Protocol: catalog.Protocol, Checked: checked}.Encode(), nil
}

// endorsing reports whether the leader may append c with an endorsement:
// the cluster switched already, or every node, c's registration
// included, advertises protocol 2.
func endorsing(s *catalog.State, c *catalog.Command) bool {
	if s.Protocol >= catalog.ProtocolEndorsed {
		return true
	}
	var reg *catalog.Register
	switch c.Op {
	case catalog.OpInit:
		reg = &c.Init.Register
	case catalog.OpRegister:
		reg = c.Register
	}
	if reg != nil && reg.Protocol < catalog.ProtocolEndorsed {
		return false
	}
	for name, node := range s.Nodes {
		if reg != nil && name == c.Node {
			continue // registers again, with reg
		}
		if node.Protocol < catalog.ProtocolEndorsed {
			return false
		}
	}
	return true
}
