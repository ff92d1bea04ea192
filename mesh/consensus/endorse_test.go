package consensus

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
	"github.com/wgmesh/wgmesh/test/poll"
)

// TestHostileForget: a registered member signs, in its own name, a
// forget of a node that is up, and sends it to the leader. The leader
// sees the node alive and refuses; the node keeps its record and blocks.
// Once the node is down, the same forget goes through.
func TestHostileForget(t *testing.T) {
	c := newCluster(t)
	a, b, m := c.add("a", false), c.add("b", true), c.add("mallory", true)
	a.start()
	b.start()
	m.start()
	c.waitVoters(1, "a", "b", "mallory")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ensure(ctx, b, "10.60.0.0/16"); err != nil {
		t.Fatal(err)
	}
	blk, err := claim(ctx, b, "10.60.0.0/16")
	if err != nil {
		t.Fatal(err)
	}

	poll.Eventually(t, 10*time.Second, "b's block everywhere", func() error {
		for _, n := range []*tnode{a, b, m} {
			if n.node.FSM().Index() < b.node.FSM().Index() {
				return errors.New(n.name + " is behind")
			}
		}
		return nil
	})

	r, err := m.node.Propose(ctx, &catalog.Command{Op: catalog.OpForget, Forget: &catalog.Forget{Name: "b"}})
	if err != nil {
		t.Fatal(err)
	}
	if !errors.Is(r.Err(), catalog.ErrAlive) {
		t.Fatalf("forget of a live node by another member: %v, want code %s", r.Err(), catalog.CodeAlive)
	}
	for _, n := range []*tnode{a, b, m} {
		st := n.node.FSM().State()
		if st.Protocol != catalog.ProtocolEndorsed {
			t.Fatalf("%s: catalog protocol %d, want %d: the leader does not endorse", n.name, st.Protocol, catalog.ProtocolEndorsed)
		}
		if _, ok := st.Nodes["b"]; !ok || len(st.Forgotten) != 0 {
			t.Fatalf("%s: b forgotten while alive", n.name)
		}
		if owner := st.Networks[netip.MustParsePrefix("10.60.0.0/16")].Blocks[blk]; owner != "b" {
			t.Fatalf("%s: b's block %s belongs to %q", n.name, blk, owner)
		}
	}

	// Down for good: the leader endorses the forget.
	b.kill()
	r, err = m.node.Propose(ctx, &catalog.Command{Op: catalog.OpForget, Forget: &catalog.Forget{Name: "b"}})
	if err != nil || r.Err() != nil {
		t.Fatalf("forget of a stopped node: %v, %v", err, r.Err())
	}
	poll.Eventually(t, 10*time.Second, "b forgotten everywhere", func() error {
		for _, n := range []*tnode{a, m} {
			if _, ok := n.node.FSM().State().Nodes["b"]; ok {
				return errors.New(n.name + " still has b")
			}
		}
		return nil
	})
}

// fakeGossip is a Membership with network users.
type fakeGossip struct {
	members []Member
	users   map[netip.Prefix]map[string]int
}

func (f fakeGossip) Members() []Member                               { return f.members }
func (f fakeGossip) Joined() bool                                    { return true }
func (f fakeGossip) MissingSeeds() []string                          { return nil }
func (f fakeGossip) NetworkUsers(subnet netip.Prefix) map[string]int { return f.users[subnet] }

// TestEndorse: what the leader endorses, refuses, or appends as a
// protocol-1 entry, from its catalog and its gossip view.
func TestEndorse(t *testing.T) {
	ids := map[string]crypto.NodeID{}
	st := catalog.NewState()
	st.ClusterID = "c1"
	for _, name := range []string{"a", "b", "old"} {
		id, err := crypto.GenerateIdentity()
		if err != nil {
			t.Fatal(err)
		}
		ids[name] = id.ID()
		st.Nodes[name] = &catalog.Node{Name: name, ID: id.ID(), Protocol: catalog.Protocol}
	}
	st.Nodes["old"].Protocol = 0
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	st.Networks[subnet] = &catalog.Network{Subnet: subnet, BlockBits: 24, Blocks: map[netip.Prefix]string{}}
	g := fakeGossip{
		members: []Member{{Name: "a", ID: ids["a"], Alive: true, Self: true}, {Name: "b", ID: ids["b"], Alive: true}, {Name: "old", ID: ids["old"]}},
		users:   map[netip.Prefix]map[string]int{},
	}
	n := &Node{cfg: Config{Membership: g}, fsm: catalog.NewFSM()}
	n.fsm.Load(st)

	endorse := func(c *catalog.Command) (*catalog.Endorsement, *catalog.Result) {
		t.Helper()
		c.Node = "a"
		ext, refusal := n.endorse(c)
		e, err := catalog.DecodeEndorsement(ext)
		if err != nil {
			t.Fatal(err)
		}
		return e, refusal
	}
	forget := func(name string) *catalog.Command {
		return &catalog.Command{Op: catalog.OpForget, Forget: &catalog.Forget{Name: name}}
	}
	del := &catalog.Command{Op: catalog.OpDeleteNetwork, Delete: &catalog.DeleteNetwork{Subnet: subnet}}

	// A node advertises protocol 1: entries stay protocol 1, but the
	// leader's checks hold all the same.
	if e, r := endorse(forget("b")); r == nil || r.Code != catalog.CodeAlive || e != nil {
		t.Fatalf("forget of a live node: %v, %v", e, r)
	}
	if e, r := endorse(forget("old")); r != nil || e != nil {
		t.Fatalf("forget of a dead node before the switch: %v, %v", e, r)
	}
	reg := &catalog.Command{Op: catalog.OpRegister, Node: "old", Register: &catalog.Register{ID: ids["old"], Protocol: catalog.Protocol}}
	if ext, r := n.endorse(reg); r != nil || ext == nil {
		t.Fatalf("the last old node registers as new: %s, %v", ext, r)
	}

	// Every node advertises protocol 2.
	st.Nodes["old"].Protocol = catalog.Protocol
	n.fsm.Load(st)
	if e, r := endorse(forget("old")); r != nil || e == nil || !e.Checked {
		t.Fatalf("forget of a dead node: %v, %v", e, r)
	}
	g.users[subnet] = map[string]int{"b": 2}
	if e, r := endorse(del); r == nil || r.Code != catalog.CodeInUse || !strings.Contains(r.Message, "b (2)") {
		t.Fatalf("delete of a network in use: %v, %v", e, r)
	}
	delete(g.users, subnet)
	if e, r := endorse(del); r != nil || e == nil || !e.Checked {
		t.Fatalf("delete of an unused network: %v, %v", e, r)
	}
	// Without a view of network users, a delete is not checked.
	n.cfg.Membership = membershipOnly{g}
	if e, r := endorse(del); r != nil || e == nil || e.Checked {
		t.Fatalf("delete without users known: %v, %v", e, r)
	}

	// A registration as an old node does not switch the cluster back.
	st.Protocol = catalog.ProtocolEndorsed
	st.Nodes["old"].Protocol = 0
	n.fsm.Load(st)
	reg.Register.Protocol = 0
	if ext, r := n.endorse(reg); r != nil || ext == nil {
		t.Fatalf("after the switch, an old node's registration: %s, %v", ext, r)
	}
}

// membershipOnly hides NetworkUsers.
type membershipOnly struct{ Membership }
