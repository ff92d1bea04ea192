package consensus

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/test/poll"
)

// voterNames lists the voters in n's configuration.
func voterNames(n *tnode) []string {
	var out []string
	for _, s := range n.status().Servers {
		if s.Voter {
			out = append(out, s.Name)
		}
	}
	slices.Sort(out)
	return out
}

func waitVoterSet(t *testing.T, timeout time.Duration, n *tnode, want ...string) {
	t.Helper()
	slices.Sort(want)
	poll.Eventually(t, timeout, fmt.Sprintf("voters %v", want), func() error {
		if got := voterNames(n); !slices.Equal(got, want) {
			return fmt.Errorf("voters %v (servers %+v)", got, n.status().Servers)
		}
		return nil
	})
}

// TestServerKeyNamesTheVoters: with a server key on three hosts, only they
// vote; a member without it never becomes a voter, even one that says it
// holds the key, and even when it was a voter first.
func TestServerKeyNamesTheVoters(t *testing.T) {
	c := newCluster(t)
	key := []byte("0123456789abcdef0123456789abcdef")
	// d joins first and becomes a voter while a has no key peers yet.
	a := c.add("a", false)
	c.set(func() { a.serverKey = key })
	a.start()
	d := c.add("d", true)
	e := c.add("e", true)
	c.set(func() { e.claimsKey = true }) // hostile: says it holds the key
	d.start()
	e.start()
	b := c.add("b", true)
	cc := c.add("c", true)
	c.set(func() { b.serverKey, cc.serverKey = key, key })
	b.start()
	cc.start()
	waitVoterSet(t, 40*time.Second, a, "a", "b", "c")
	// And it stays so.
	time.Sleep(2 * time.Second)
	if got := voterNames(a); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("voters became %v", got)
	}
}

// TestServerNeverAndAlways: a --server=never host is demoted and never
// promoted; an --server=always host takes the place of an auto voter.
func TestServerNeverAndAlways(t *testing.T) {
	c := newCluster(t)
	a := c.add("a", false)
	a.start()
	b := c.add("b", true)
	cc := c.add("c", true)
	b.start()
	cc.start()
	waitVoterSet(t, 30*time.Second, a, "a", "b", "c")
	// c restarts as --server=never: it is demoted.
	cc.kill()
	c.set(func() { cc.server = ServerNever })
	cc.start()
	waitVoterSet(t, 30*time.Second, a, "a", "b")
	// d comes with --server=always: it becomes the third voter.
	d := c.add("d", true)
	c.set(func() { d.server = ServerAlways })
	d.start()
	waitVoterSet(t, 30*time.Second, a, "a", "b", "d")
	// e also --server=always: an auto voter (never the leader) makes room.
	e := c.add("e", true)
	c.set(func() { e.server = ServerAlways })
	e.start()
	poll.Eventually(t, 30*time.Second, "e a voter", func() error {
		v := voterNames(a)
		if !slices.Contains(v, "e") || !slices.Contains(v, "d") || slices.Contains(v, "c") || len(v) != 3 {
			return fmt.Errorf("voters %v", v)
		}
		return nil
	})
}

// TestLaggingNodeTakesNewLeader: a node that was down while the voters
// changed knows only the old ones, and took Raft traffic only from those:
// the new leader, whose traffic would bring it the new configuration, was
// refused for ever, and the node never caught up. It now takes that
// traffic once most members it asks confirm that node leads.
func TestLaggingNodeTakesNewLeader(t *testing.T) {
	c := newCluster(t)
	a := c.add("a", false)
	a.start()
	b, cc := c.add("b", true), c.add("c", true)
	b.start()
	cc.start()
	waitVoterSet(t, 30*time.Second, a, "a", "b", "c")
	d := c.add("d", true)
	c.set(func() { d.server = ServerNever })
	d.start()
	poll.Eventually(t, 30*time.Second, "d registered and caught up", func() error {
		if st := d.status(); !st.Registered || st.AppliedIndex < a.status().AppliedIndex {
			return fmt.Errorf("d: registered %v, applied %d of %d", st.Registered, st.AppliedIndex, a.status().AppliedIndex)
		}
		return nil
	})
	d.kill()

	// While d is down, e (--server=always) takes an auto voter's place,
	// and then the lead.
	e := c.add("e", true)
	c.set(func() { e.server = ServerAlways })
	e.start()
	poll.Eventually(t, 30*time.Second, "e a voter", func() error {
		if v := voterNames(a); !slices.Contains(v, "e") || len(v) != 3 {
			return fmt.Errorf("voters %v", v)
		}
		return nil
	})
	poll.Eventually(t, 30*time.Second, "e leads", func() error {
		for _, n := range []*tnode{a, b, cc, e} {
			if r := n.node.raftServer(); r != nil && r.State() == raft.Leader && n != e {
				if err := r.LeadershipTransferToServer(raft.ServerID(e.id.ID().String()), raft.ServerAddress(e.addr)).Error(); err != nil {
					return err
				}
			}
		}
		if e.status().State != "leader" {
			return fmt.Errorf("e is %s", e.status().State)
		}
		return nil
	})
	var gone string
	for _, n := range []*tnode{a, b, cc} {
		if !slices.Contains(voterNames(e), n.name) {
			gone = n.name
		}
	}
	want := e.status().AppliedIndex

	// d comes back: its configuration has voters a, b and c, not e.
	d.start()
	poll.Eventually(t, 30*time.Second, "d caught up with leader e", func() error {
		if st := d.status(); st.AppliedIndex < want {
			return fmt.Errorf("d applied %d of %d (%s, leader %q, refused Raft streams %d)", st.AppliedIndex, want, st.State, st.Leader, st.Stats.Refused["raft-not-voter"])
		}
		return nil
	})
	t.Logf("d, down while %s made room for e and e took the lead, caught up with e", gone)
}
