package consensus

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/test/poll"
)

// restoreDir replaces dir by a copy of backup.
func restoreDir(t *testing.T, dir, backup string) {
	t.Helper()
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.CopyFS(dir, os.DirFS(backup)); err != nil {
		t.Fatal(err)
	}
}

// TestRolledBackVoterDoesNotVote: a voter whose state directory is
// restored from an older copy must not vote with its old log. Here the
// entries it lost were committed by it and one other voter while the
// third was cut off; with the other one down, the restored voter and the
// third would elect a leader without them and lose them for good.
func TestRolledBackVoterDoesNotVote(t *testing.T) {
	c := newCluster(t)
	names := []string{"a", "b", "c"}
	for _, name := range names {
		c.add(name, name != "a").start()
	}
	c.waitVoters(3, names...)
	a, b, vc := c.nodes["a"], c.nodes["b"], c.nodes["c"]
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const subnet = "10.60.0.0/16"
	if err := ensure(ctx, a, subnet); err != nil {
		t.Fatal(err)
	}
	if _, err := claim(ctx, a, subnet); err != nil {
		t.Fatal(err)
	}

	// The "backup" of c, then a run of c after it that the cluster sees.
	vc.kill()
	backup := t.TempDir()
	if err := os.CopyFS(backup, os.DirFS(vc.dir)); err != nil {
		t.Fatal(err)
	}
	vc.start()
	c.waitVoters(3, names...)

	// b and c commit entries that a does not get.
	c.partition("a", 1)
	var lost []string
	for range 3 {
		blk, err := claim(ctx, b, subnet)
		if err != nil {
			t.Fatal(err)
		}
		lost = append(lost, blk.String())
	}

	// c is restored from the backup, b is down, a is back.
	vc.kill()
	restoreDir(t, vc.dir, backup)
	b.kill()
	c.partition("a", 0)
	vc.start()

	poll.Eventually(t, 10*time.Second, "restored c refused", func() error {
		st := vc.status()
		if st.State != "refused" || !strings.Contains(st.Problem, "older copy") {
			return fmt.Errorf("%+v", st)
		}
		return nil
	})
	// a alone is no majority: nobody leads until b is back.
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if st := a.status(); st.State == "leader" {
			t.Fatalf("a leads with the vote of the restored c: %+v", st)
		}
	}

	b.start()
	for _, n := range []*tnode{a, b} {
		poll.Eventually(t, 30*time.Second, n.name+" has the entries b and c committed", func() error {
			var got []string
			for _, blk := range blocksOf(n, subnet, "b") {
				got = append(got, blk.String())
			}
			for _, blk := range lost {
				if !slices.Contains(got, blk) {
					return fmt.Errorf("%s's blocks: %v; missing %s", n.name, got, blk)
				}
			}
			return nil
		})
	}
	short, cancelShort := context.WithTimeout(context.Background(), time.Second)
	defer cancelShort()
	if _, err := claim(short, vc, subnet); err == nil || !strings.Contains(err.Error(), "older copy") {
		t.Errorf("claim of the restored c: %v", err)
	}
	if r := vc.node.raftServer(); r != nil {
		t.Errorf("the restored c runs Raft (%s)", r.State())
	}
	// The refusal stands across restarts, though each start advances the
	// generation past the one the cluster saw.
	for range 2 {
		vc.kill()
		vc.start()
	}
	poll.Eventually(t, 10*time.Second, "restored c still refused", func() error {
		if st := vc.status(); st.State != "refused" || !strings.Contains(st.Problem, "older copy") {
			return fmt.Errorf("%+v", st)
		}
		return nil
	})
}

// TestWholeClusterRestarts: every voter restarting at once (a power
// loss) looks like no rollback at all: they start Raft and elect a leader.
func TestWholeClusterRestarts(t *testing.T) {
	c := newCluster(t)
	names := []string{"a", "b", "c"}
	for _, name := range names {
		c.add(name, name != "a").start()
	}
	c.waitVoters(3, names...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const subnet = "10.60.0.0/16"
	if err := ensure(ctx, c.nodes["a"], subnet); err != nil {
		t.Fatal(err)
	}
	before, err := claim(ctx, c.nodes["b"], subnet)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		c.nodes[name].kill()
	}
	for _, name := range names {
		c.nodes[name].start()
	}
	c.waitVoters(3, names...)
	for _, name := range names {
		if st := c.nodes[name].status(); st.Problem != "" {
			t.Fatalf("%s: %+v", name, st)
		}
	}
	after, err := claim(ctx, c.nodes["c"], subnet)
	if err != nil {
		t.Fatal(err)
	}
	if after == before {
		t.Fatalf("block %s granted twice", after)
	}
}

// TestCloneWithSameAddress: a host started with a copy of a running
// node's identity and state directory is refused while the node runs,
// even at the same address (hosts behind NAT in separate networks often
// have the same private address), and the node keeps its registration.
func TestCloneWithSameAddress(t *testing.T) {
	c := newCluster(t)
	a, b := c.add("a", false), c.add("b", true)
	a.start()
	b.start()
	c.waitVoters(1, "a", "b")
	regB := a.node.FSM().State().Nodes["b"]

	// The clone: b's identity and name, and b's generation as a copy of
	// its running state directory holds it. Its address is b's.
	clone := c.add("b-clone", true)
	c.set(func() { clone.id, clone.name = b.id, "b" })
	if err := writeNodeFile(clone.dir, nodeFile{Generation: regB.Generation}); err != nil {
		t.Fatal(err)
	}
	clone.start()
	poll.Eventually(t, 10*time.Second, "clone refused", func() error {
		st := clone.status()
		if st.State != "refused" || !strings.Contains(st.Problem, "copy of its identity") {
			return fmt.Errorf("%+v", st)
		}
		return nil
	})
	if now := a.node.FSM().State().Nodes["b"]; now.BootID != regB.BootID {
		t.Fatalf("b's registration was taken over: boot %s, was %s", now.BootID, regB.BootID)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ensure(ctx, b, "10.60.0.0/16"); err != nil {
		t.Fatalf("b after the clone tried: %v", err)
	}

	// Once b is gone, its own restart is no clone.
	clone.kill()
	b.kill()
	b.start()
	poll.Eventually(t, 10*time.Second, "b registered again", func() error {
		if st := b.status(); !st.Registered || st.Problem != "" {
			return fmt.Errorf("%+v", st)
		}
		return nil
	})
}
