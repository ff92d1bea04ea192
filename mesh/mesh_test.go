package mesh

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
	"github.com/wgmesh/wgmesh/mesh/records"
	"github.com/wgmesh/wgmesh/test/poll"
)

var subnet = netip.MustParsePrefix("10.60.0.0/16")

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func ensure(t testing.TB, n *testNode, s netip.Prefix) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := n.m.EnsureNetwork(ctx, catalog.EnsureNetwork{Subnet: s}); err != nil {
		t.Fatalf("%s: ensure %s: %v", n.name, s, err)
	}
}

func claim(ctx context.Context, n *testNode) (netip.Prefix, error) {
	return n.m.ClaimBlock(ctx, BlockRequest{Subnet: subnet})
}

// TestClusterClaimsAndPeers: three nodes form a cluster; each claims a
// block and attaches the network; every node's peers are the other two,
// each allowed exactly the blocks the catalog gives it.
func TestClusterClaimsAndPeers(t *testing.T) {
	c := newCluster(t)
	names := []string{"a", "b", "c"}
	for _, name := range names {
		c.add(name)
	}
	for _, name := range names {
		c.nodes[name].start()
	}
	c.waitMembers(20*time.Second, names...)
	ensure(t, c.nodes["a"], subnet)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	got := map[string]netip.Prefix{}
	for i, name := range names {
		n := c.nodes[name]
		b, err := claim(ctx, n)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got[name] = b
		if err := n.m.Attach(subnet, uint16(51820+i)); err != nil {
			t.Fatal(err)
		}
	}
	poll.Eventually(t, 10*time.Second, "every node with the other two as peers", func() error {
		for i, name := range names {
			peers := c.nodes[name].m.View().Peers(subnet)
			if len(peers) != 2 {
				return fmt.Errorf("%s has %d peers", name, len(peers))
			}
			for _, p := range peers {
				j := slices.Index(names, p.Node)
				if !slices.Equal(p.AllowedIPs, []netip.Prefix{got[p.Node]}) || p.Endpoint.Port() != uint16(51820+j) || i == j {
					return fmt.Errorf("%s: peer %+v, want block %s", name, p, got[p.Node])
				}
				if p.PublicKey != c.nodes[p.Node].wgKey {
					return fmt.Errorf("%s: peer %s has the wrong key", name, p.Node)
				}
			}
		}
		return nil
	})
	if got["a"] == got["b"] || got["b"] == got["c"] || got["a"] == got["c"] {
		t.Fatalf("blocks overlap: %v", got)
	}
}

// TestPartitionMinorityCannotClaim: in a partition only the side holding
// a majority of the voters can claim; both keep their blocks; after the
// heal, nothing is held twice.
func TestPartitionMinorityCannotClaim(t *testing.T) {
	c := newCluster(t)
	names := []string{"a", "b", "c", "d", "e"}
	for _, name := range names {
		c.add(name)
	}
	for _, name := range names {
		c.nodes[name].start()
	}
	c.waitMembers(30*time.Second, names...)
	// Five voters once the autopilot has promoted them all.
	poll.Eventually(t, 30*time.Second, "five voters", func() error {
		voters := 0
		for _, s := range c.nodes["a"].m.Consensus().Servers {
			if s.Voter {
				voters++
			}
		}
		if voters != 5 {
			return fmt.Errorf("%d voters", voters)
		}
		return nil
	})
	ensure(t, c.nodes["a"], subnet)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	before := map[string]netip.Prefix{}
	for _, name := range names {
		b, err := claim(ctx, c.nodes[name])
		if err != nil {
			t.Fatal(err)
		}
		before[name] = b
	}
	c.net.setSide("d", 1)
	c.net.setSide("e", 1)
	short, cancelShort := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancelShort()
	if b, err := claim(short, c.nodes["d"]); err == nil {
		t.Fatalf("the minority claimed %s", b)
	}
	b, err := claim(ctx, c.nodes["a"])
	if err != nil {
		t.Fatalf("the majority could not claim: %v", err)
	}
	// Both sides still own what they had.
	for _, name := range names {
		if !slices.Contains(c.nodes[name].m.View().OwnBlocks(subnet), before[name]) {
			t.Errorf("%s lost %s in the partition", name, before[name])
		}
	}
	c.net.heal()
	poll.Eventually(t, 30*time.Second, fmt.Sprintf("%s owned by a everywhere", b), func() error {
		for _, name := range names {
			v := c.nodes[name].m.View()
			if owner, _, _ := v.Owner(subnet, b.Addr()); owner != "a" {
				return fmt.Errorf("%s: %s belongs to %q", name, b, owner)
			}
		}
		return nil
	})
	checkOwnership(t, c)
}

// checkOwnership asserts that no two nodes' views disagree about an owner
// and that no block is owned twice.
func checkOwnership(t testing.TB, c *cluster) {
	t.Helper()
	owner := map[netip.Prefix]string{}
	for _, n := range c.nodes {
		if n.m == nil {
			continue
		}
		v := n.m.View()
		for _, s := range v.Subnets() {
			nw := v.Network(s)
			var blocks []netip.Prefix
			for b, o := range nw.Blocks {
				blocks = append(blocks, b)
				if prev, ok := owner[b]; ok && prev != o {
					t.Fatalf("block %s: %s says %s, another node says %s", b, n.name, o, prev)
				}
				owner[b] = o
			}
			for i, a := range blocks {
				for _, b := range blocks[i+1:] {
					if a.Overlaps(b) && nw.Blocks[a] != nw.Blocks[b] {
						t.Fatalf("%s sees overlapping blocks %s (%s) and %s (%s)", n.name, a, nw.Blocks[a], b, nw.Blocks[b])
					}
				}
			}
		}
	}
}

// TestForget: a node that is gone for good is forgotten through the
// cluster, refused while it is alive; its blocks become free, and it can
// never come back under its old identity.
func TestForget(t *testing.T) {
	c := newCluster(t)
	for _, name := range []string{"a", "b", "c"} {
		c.add(name).start()
	}
	c.waitMembers(20*time.Second, "a", "b", "c")
	ensure(t, c.nodes["a"], subnet)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bc, err := claim(ctx, c.nodes["c"])
	if err != nil {
		t.Fatal(err)
	}
	if err := c.nodes["a"].m.Forget(ctx, "c"); !errors.Is(err, ErrAlive) {
		t.Fatalf("forgetting a live node: %v", err)
	}
	c.nodes["c"].crash()
	poll.Eventually(t, 20*time.Second, "a forgetting the crashed c", func() error {
		return c.nodes["a"].m.Forget(ctx, "c")
	})
	for _, name := range []string{"a", "b"} {
		poll.Eventually(t, 10*time.Second, name+" without c and its block", func() error {
			v := c.nodes[name].m.View()
			if owner, _, ok := v.Owner(subnet, bc.Addr()); ok {
				return fmt.Errorf("%s: %s still belongs to %s", name, bc, owner)
			}
			if _, ok := v.Members["c"]; ok {
				return fmt.Errorf("%s still lists c", name)
			}
			return nil
		})
	}
	// c comes back with its old state: the cluster refuses it, and its
	// agent stops with a clear error.
	c.nodes["c"].start()
	select {
	case err := <-c.nodes["c"].done:
		c.nodes["c"].done <- err
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "forgotten") {
			t.Fatalf("forgotten node stopped with %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a forgotten node kept running")
	}
}

// TestWrongKeyCannotJoin: a node with another cluster key cannot join
// gossip nor consensus.
func TestWrongKeyCannotJoin(t *testing.T) {
	c := newCluster(t)
	c.add("a").start()
	c.waitRegistered(10*time.Second, "a")
	other, _ := crypto.GenerateClusterKey()
	k, _ := crypto.ParseClusterKey(other)
	x := c.add("x", func(cfg *Config) { cfg.Keyring = crypto.Keyring{k} }).start()
	time.Sleep(2 * time.Second)
	if _, ok := c.nodes["a"].m.View().Members["x"]; ok {
		t.Fatal("a node with another key became a member")
	}
	if st := x.m.Consensus(); st.Registered {
		t.Fatalf("a node with another key registered: %+v", st)
	}
}

// TestRestartKeepsPeers: an agent restart keeps the catalog and the
// gossip records, so the restarted node has its peers before gossip has
// caught up, and its own blocks at once.
func TestRestartKeepsPeers(t *testing.T) {
	c := newCluster(t)
	a, b := c.add("a").start(), c.add("b").start()
	c.waitMembers(20*time.Second, "a", "b")
	ensure(t, a, subnet)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ba, err := claim(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	bb, err := claim(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	_ = a.m.Attach(subnet, 51820)
	_ = b.m.Attach(subnet, 51821)
	poll.Eventually(t, 10*time.Second, "b a peer of a", func() error {
		if len(a.m.View().Peers(subnet)) != 1 {
			return errors.New("no peer yet")
		}
		return nil
	})
	time.Sleep(saveEvery + time.Second) // the saved gossip catches up
	a.stop()
	// Restart a with b unreachable: what it knows comes from its disk.
	c.net.setSide("b", 1)
	a.start()
	v := a.m.View()
	if !slices.Equal(v.OwnBlocks(subnet), []netip.Prefix{ba}) {
		t.Errorf("own blocks after restart: %v", v.OwnBlocks(subnet))
	}
	peers := v.Peers(subnet)
	if len(peers) != 1 || peers[0].Node != "b" || !slices.Equal(peers[0].AllowedIPs, []netip.Prefix{bb}) {
		t.Fatalf("peers right after restart: %+v", peers)
	}
}

// TestClusterKeyRotation: the key is rotated node by node while claims
// keep working, over gossip and consensus alike.
func TestClusterKeyRotation(t *testing.T) {
	c := newCluster(t)
	names := []string{"a", "b", "c"}
	for _, name := range names {
		c.add(name).start()
	}
	c.waitMembers(20*time.Second, names...)
	ensure(t, c.nodes["a"], subnet)
	oldKey := c.keyring.Primary()
	nk, _ := crypto.GenerateClusterKey()
	newKey, _ := crypto.ParseClusterKey(nk)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, ring := range []crypto.Keyring{{oldKey, newKey}, {newKey, oldKey}, {newKey}} {
		for _, name := range names {
			if err := c.nodes[name].m.SetKeyring(ring); err != nil {
				t.Fatal(err)
			}
		}
		for _, name := range names {
			if _, err := claim(ctx, c.nodes[name]); err != nil {
				t.Fatalf("claim after rotating to %d keys: %v", len(ring), err)
			}
		}
	}
	c.waitMembers(10*time.Second, names...)
}

// TestDuplicateNameRefused: a second host started with a taken name and a
// fresh identity (a clone with the same hostname) is refused: its agent
// stops with an error naming both addresses, and the healthy hosts list
// the attempt as a problem.
func TestDuplicateNameRefused(t *testing.T) {
	c := newCluster(t)
	c.add("a").start()
	c.add("b").start()
	c.waitMembers(20*time.Second, "a", "b")
	twin := c.add("b-twin")
	twin.name = "b"
	twin.start()
	var err error
	select {
	case err = <-twin.done:
		twin.done <- err
	case <-time.After(30 * time.Second):
		t.Fatal("the twin kept running")
	}
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "taken") || !strings.Contains(err.Error(), "127.0.0.1") {
		t.Fatalf("twin stopped with %v", err)
	}
	poll.Eventually(t, 10*time.Second, "a's problems naming node b", func() error {
		probs := strings.Join(c.nodes["a"].m.Problems(), "\n")
		if !strings.Contains(probs, "node b") {
			return fmt.Errorf("problems of a: %q", probs)
		}
		return nil
	})
	c.waitMembers(5*time.Second, "a", "b")
}

// TestForgedRecords: a member signs records in another node's name and
// sends them to everyone; they are refused, counted and shown, and the
// real node's records are untouched. A record with a version near 2^62
// in its own name holds back nothing but its own records.
func TestForgedRecords(t *testing.T) {
	c := newCluster(t)
	names := []string{"a", "b", "evil"}
	for _, name := range names {
		c.add(name).start()
	}
	c.waitMembers(20*time.Second, names...)
	ensure(t, c.nodes["a"], subnet)
	a, evil := c.nodes["a"], c.nodes["evil"]
	_ = a.m.Attach(subnet, 51820)
	poll.Eventually(t, 10*time.Second, "a's entry on b", func() error {
		if _, ok := c.nodes["b"].m.View().Entry(subnet, "a"); !ok {
			return errors.New("b has no entry of a")
		}
		return nil
	})
	forged := NetworkEntry{Node: "a", Subnet: subnet, Version: 1 << 61, Port: 4444}
	evil.sendToAll(records.EncodeEntryMsg(records.Sign(evil.id, records.PurposeEntry, forged)))
	huge := NetworkEntry{Node: "evil", Subnet: subnet, Version: 1<<62 - 1, Port: 5555}
	evil.sendToAll(records.EncodeEntryMsg(records.Sign(evil.id, records.PurposeEntry, huge)))
	tooHuge := NetworkEntry{Node: "evil", Subnet: subnet, Version: 1<<63 + 1, Port: 6666}
	evil.sendToAll(records.EncodeEntryMsg(records.Sign(evil.id, records.PurposeEntry, tooHuge)))
	poll.Eventually(t, 10*time.Second, "b refusing the forged entry", func() error {
		st := c.nodes["b"].m.Stats()
		if st.Refused["entry-forged"] == 0 {
			return fmt.Errorf("b refused %v", st.Refused)
		}
		return nil
	})
	// a's entry keeps its port, and a's later changes still arrive.
	_ = a.m.Attach(subnet, 51830)
	poll.Eventually(t, 10*time.Second, "a's new port on b", func() error {
		e, _ := c.nodes["b"].m.View().Entry(subnet, "a")
		if e.Port != 51830 {
			return fmt.Errorf("b has a's port %d", e.Port)
		}
		return nil
	})
	if !strings.Contains(strings.Join(c.nodes["b"].m.Problems(), "\n"), "forging") {
		t.Errorf("b's problems do not mention the forgery: %q", c.nodes["b"].m.Problems())
	}
	// A claim in a's name, signed by evil, is refused by the leader.
	cmd := &catalog.Command{Op: catalog.OpClaim, Node: "a", BootID: "x", Seq: 1, Claim: &catalog.Claim{Subnet: subnet}}
	s, _ := catalog.Sign(cmd, evil.id)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := evil.m.node.SubmitSigned(ctx, s.Encode())
	if err == nil {
		err = r.Err()
	}
	if !errors.Is(err, catalog.ErrBadSignature) {
		t.Fatalf("forged claim: %v", err)
	}
	if blocks := c.nodes["b"].m.View().BlocksOf(subnet, "a"); len(blocks) != 0 {
		t.Fatalf("a owns %v after a forged claim", blocks)
	}
}

// sendToAll sends raw gossip to every other member, by address as
// Mesh.send does.
func (n *testNode) sendToAll(b []byte) {
	ml := n.m.memberlist()
	n.m.mu.Lock()
	var to []memberlist.Address
	for name, rec := range n.m.state.live {
		if name != n.name && rec.addr != "" {
			to = append(to, memberlist.Address{Addr: rec.addr, Name: name})
		}
	}
	n.m.mu.Unlock()
	for _, a := range to {
		_ = ml.SendToAddress(a, b)
	}
}

// TestTwoViewsRegression is the scenario in which the quorum protocol
// before Raft gave one block to two hosts: hosts learn of new members at
// different moments, and a claim counted against a smaller membership
// raced one counted against a larger one. Host a knows {a,b,c}; d and e
// join while a and d claim the same address at the same moment. Exactly
// one of them gets it.
func TestTwoViewsRegression(t *testing.T) {
	for round := range 3 {
		t.Run(fmt.Sprint(round), func(t *testing.T) {
			c := newCluster(t)
			for _, name := range []string{"a", "b", "c"} {
				c.add(name).start()
			}
			c.waitMembers(20*time.Second, "a", "b", "c")
			ensure(t, c.nodes["a"], subnet)
			d, e := c.add("d"), c.add("e")
			d.seeds, e.seeds = []string{c.nodes["c"].gossipAddr()}, []string{c.nodes["c"].gossipAddr()}
			d.start()
			e.start()
			want := netip.MustParseAddr("10.60.77.7")
			var wg sync.WaitGroup
			results := map[string]error{}
			var mu sync.Mutex
			for _, n := range []*testNode{c.nodes["a"], d} {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					defer cancel()
					_, err := n.m.ClaimBlock(ctx, BlockRequest{Subnet: subnet, Containing: want})
					mu.Lock()
					results[n.name] = err
					mu.Unlock()
				}()
			}
			wg.Wait()
			won := 0
			for name, err := range results {
				switch {
				case err == nil:
					won++
				case !errors.Is(err, ErrBlockTaken):
					t.Fatalf("%s: %v", name, err)
				}
			}
			if won != 1 {
				t.Fatalf("%d hosts got %s: %v", won, want, results)
			}
			checkOwnership(t, c)
		})
	}
}

// TestLegacyUpgrade: state files of the wgmesh before consensus (made by
// it, in testdata) are upgraded in place: each node's blocks are adopted,
// the network keeps per-host gateways, its definition is kept, and new
// claims avoid the old blocks.
func TestLegacyUpgrade(t *testing.T) {
	c := newCluster(t)
	for _, name := range []string{"host-a", "host-b"} {
		n := c.add(name)
		b, err := os.ReadFile(filepath.Join("testdata", "legacy", name+".json"))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(n.dir, legacyFile), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c.nodes["host-a"].start()
	c.nodes["host-b"].start()
	want := map[netip.Prefix]string{pfx("10.60.133.0/24"): "host-a", pfx("10.60.200.0/24"): "host-a", pfx("10.60.204.0/24"): "host-b"}
	poll.Eventually(t, 30*time.Second, "the legacy blocks adopted", func() error {
		for _, name := range []string{"host-a", "host-b"} {
			nw := c.nodes[name].m.View().Network(subnet)
			if nw == nil {
				return fmt.Errorf("%s: no network", name)
			}
			for b, owner := range want {
				if nw.Blocks[b] != owner {
					return fmt.Errorf("%s: %s owned by %q", name, b, nw.Blocks[b])
				}
			}
			if nw.Gateway.IsValid() || nw.Spec == nil || nw.Spec.Name != "app" {
				return fmt.Errorf("%s: network %+v", name, nw)
			}
		}
		return nil
	})
	// The old file is renamed once the node's adoption committed, which
	// a loaded machine may show a moment after the catalog has it.
	poll.Eventually(t, 10*time.Second, "the legacy files renamed", func() error {
		for _, name := range []string{"host-a", "host-b"} {
			if _, err := os.Stat(filepath.Join(c.nodes[name].dir, legacyUpgraded)); err != nil {
				return fmt.Errorf("%s: old file not renamed: %w", name, err)
			}
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	b, err := claim(ctx, c.nodes["host-b"])
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := want[b]; ok {
		t.Fatalf("new claim got old block %s", b)
	}
}
