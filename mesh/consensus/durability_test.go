package consensus

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/mesh/catalog"
	"github.com/wgmesh/wgmesh/test/poll"
)

// blocksOf lists the blocks n's replica gives to owner in subnet.
func blocksOf(n *tnode, subnet, owner string) []netip.Prefix {
	nw := n.node.FSM().State().Networks[netip.MustParsePrefix(subnet)]
	if nw == nil {
		return nil
	}
	b := nw.BlocksOf(owner)
	slices.SortFunc(b, func(x, y netip.Prefix) int { return x.Addr().Compare(y.Addr()) })
	return b
}

// savedCopy waits until n's copy of the catalog holds everything its
// replica applied, and returns the copy.
func savedCopy(t *testing.T, n *tnode) []byte {
	t.Helper()
	var b []byte
	poll.Eventually(t, 10*time.Second, "copy of the catalog saved", func() error {
		var err error
		if b, err = os.ReadFile(n.node.catalogPath()); err != nil {
			return err
		}
		s, err := catalog.DecodeState(bytes.NewReader(b))
		if err != nil {
			return err
		}
		if want := n.node.FSM().Index(); s.Index != want {
			return fmt.Errorf("copy at %d, replica at %d", s.Index, want)
		}
		return nil
	})
	return b
}

// TestCopyOlderThanSnapshot: a crash that leaves the node's copy of the
// catalog older than Raft's newest snapshot (the copy was being written
// when the snapshot was taken, or Raft installed a snapshot from the
// leader and the node died before saving its copy) must not lose the
// entries between the two: Raft's log no longer holds them, and Raft
// counts them as applied.
func TestCopyOlderThanSnapshot(t *testing.T) {
	c := newCluster(t)
	c.raft = func() *raft.Config {
		r := testRaft()
		// Only the snapshot the test takes, and a log that keeps almost
		// nothing before it.
		r.SnapshotThreshold = 1 << 20
		r.SnapshotInterval = time.Hour
		r.TrailingLogs = 1
		return r
	}
	a := c.add("a", false)
	a.start()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const subnet = "10.60.0.0/16"
	if err := ensure(ctx, a, subnet); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := claim(ctx, a, subnet); err != nil {
			t.Fatal(err)
		}
	}
	early := savedCopy(t, a)
	for range 5 {
		if _, err := claim(ctx, a, subnet); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.node.raftServer().Snapshot().Error(); err != nil {
		t.Fatal(err)
	}
	want := blocksOf(a, subnet, "a")
	a.kill()
	// The disk as the crash left it.
	if err := os.WriteFile(filepath.Join(a.dir, catalogFile), early, 0o600); err != nil {
		t.Fatal(err)
	}
	a.start()
	poll.Eventually(t, 10*time.Second, "a registered again", func() error {
		if st := a.status(); !st.Registered {
			return errors.New("not yet")
		}
		return nil
	})
	if got := blocksOf(a, subnet, "a"); !slices.Equal(got, want) {
		t.Fatalf("after the restart a's replica gives a %v, before it %v", got, want)
	}
	// And it goes on granting only free blocks.
	b, err := claim(ctx, a, subnet)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(want, b) {
		t.Fatalf("block %s granted twice", b)
	}
}
