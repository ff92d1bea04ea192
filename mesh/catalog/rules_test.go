package catalog

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// v2 applies entries through the FSM, as Raft does, each with the
// endorsement a leader of protocol 2 gives it.
type v2 struct {
	f     *FSM
	index uint64
}

func newV2() *v2 { return &v2{f: NewFSM()} }

func (a *v2) apply(entry []byte, e *Endorsement) Result {
	a.index++
	l := &raft.Log{Index: a.index, Type: raft.LogCommand, AppendedAt: time.Unix(1700000000+int64(a.index), 0), Data: entry}
	if e != nil {
		l.Extensions = e.Encode()
	}
	r, _ := a.f.Apply(l).(Result)
	return r
}

var (
	plain   = &Endorsement{Protocol: ProtocolEndorsed}
	checked = &Endorsement{Protocol: ProtocolEndorsed, Checked: true}
)

func (a *v2) ok(t testing.TB, entry []byte, e *Endorsement) Result {
	t.Helper()
	r := a.apply(entry, e)
	if err := r.Err(); err != nil {
		t.Fatalf("entry %d refused: %v", a.index, err)
	}
	return r
}

func (a *v2) refused(t testing.TB, entry []byte, e *Endorsement, want *Error, mention ...string) {
	t.Helper()
	r := a.apply(entry, e)
	err := r.Err()
	if !errors.Is(err, want) {
		t.Fatalf("entry %d: got %v, want code %s", a.index, err, want.Code)
	}
	for _, m := range mention {
		if !strings.Contains(err.Error(), m) {
			t.Errorf("error %q does not mention %q", err, m)
		}
	}
}

func (n *node) forget(t testing.TB, name string) []byte {
	return n.sign(t, &Command{Op: OpForget, Forget: &Forget{Name: name}})
}

func (n *node) deleteNetwork(t testing.TB, subnet string) []byte {
	return n.sign(t, &Command{Op: OpDeleteNetwork, Delete: &DeleteNetwork{Subnet: netip.MustParsePrefix(subnet)}})
}

// TestForgetNeedsLeaderCheck: a member signs, in its own name, a forget
// of another node. Only the leader can tell whether that node is down;
// without its endorsement, no replica applies the forget.
func TestForgetNeedsLeaderCheck(t *testing.T) {
	a, b, mallory := newNode(t, "a"), newNode(t, "b"), newNode(t, "mallory")
	ap := newV2()
	ap.ok(t, a.init(t, "c1"), plain)
	ap.ok(t, b.register(t), plain)
	ap.ok(t, mallory.register(t), plain)
	ap.ok(t, b.ensure(t, "10.60.0.0/16"), plain)
	blk := ap.ok(t, b.claim(t, "10.60.0.0/16"), plain).Block

	ap.refused(t, mallory.forget(t, "b"), plain, ErrNotEndorsed, "b")
	st := ap.f.State()
	if _, ok := st.Nodes["b"]; !ok || len(st.Forgotten) != 0 {
		t.Fatalf("b forgotten without the leader's check: nodes %v, forgotten %v", st.Nodes, st.Forgotten)
	}
	if owner := st.Networks[netip.MustParsePrefix("10.60.0.0/16")].Blocks[blk]; owner != "b" {
		t.Fatalf("b's block %s now belongs to %q", blk, owner)
	}
	// With the leader's check, the same kind of command applies.
	ap.ok(t, mallory.forget(t, "b"), checked)
	if _, ok := ap.f.State().Nodes["b"]; ok {
		t.Fatal("endorsed forget not applied")
	}
}

// TestDeleteNetworkOwnBlocks: a member's unendorsed removal of a network
// gives back its own blocks only; the network goes when no host holds a
// block of it, or at once when the leader checked no host uses it.
func TestDeleteNetworkOwnBlocks(t *testing.T) {
	a, b := newNode(t, "a"), newNode(t, "b")
	ap := newV2()
	ap.ok(t, a.init(t, "c1"), plain)
	ap.ok(t, b.register(t), plain)
	const subnet = "10.60.0.0/16"
	p := netip.MustParsePrefix(subnet)
	ap.ok(t, a.ensure(t, subnet), plain)
	ba := ap.ok(t, a.claim(t, subnet), plain).Block
	bb := ap.ok(t, b.claim(t, subnet), plain).Block

	ap.ok(t, b.deleteNetwork(t, subnet), plain)
	n := ap.f.State().Networks[p]
	if n.Deleted || n.Blocks[ba] != "a" || n.Blocks[bb] != "" {
		t.Fatalf("after b's unendorsed delete: deleted %v, blocks %v (a had %s, b had %s)", n.Deleted, n.Blocks, ba, bb)
	}
	ap.ok(t, a.deleteNetwork(t, subnet), plain)
	if n := ap.f.State().Networks[p]; !n.Deleted || len(n.Blocks) != 0 || n.DeletedBy != "a" {
		t.Fatalf("after the last holder's delete: deleted %v by %q, blocks %v", n.Deleted, n.DeletedBy, n.Blocks)
	}

	// An endorsed delete removes the network, but every other host keeps
	// its blocks until it gives them back itself: gossip, which the
	// leader checked, may not show a container started a moment ago.
	ap.ok(t, a.ensure(t, subnet), plain)
	ba = ap.ok(t, a.claim(t, subnet), plain).Block
	ap.ok(t, b.claim(t, subnet), plain)
	ap.ok(t, b.deleteNetwork(t, subnet), checked)
	if n := ap.f.State().Networks[p]; !n.Deleted || len(n.Blocks) != 1 || n.Blocks[ba] != "a" {
		t.Fatalf("after an endorsed delete: deleted %v, blocks %v (a had %s)", n.Deleted, n.Blocks, ba)
	}
	// Nobody gets a block of it, nor of a network made again over it,
	// while a holds one.
	ap.refused(t, b.claim(t, subnet), plain, ErrNoNetwork)
	ap.refused(t, b.ensure(t, subnet), plain, ErrNetworkConflict, "a")
	ap.refused(t, b.ensure(t, "10.60.0.0/17"), plain, ErrNetworkConflict)
	// Once a gave it back, the network can be made again.
	ap.ok(t, a.sign(t, &Command{Op: OpRelease, Release: &Release{Subnet: p, Blocks: []netip.Prefix{ba}}}), plain)
	ap.ok(t, b.ensure(t, subnet), plain)
}

// TestLegacyEntriesKeepLegacyRules: entries without endorsement, as a
// leader of wgmesh before protocol 2 appends them, apply as they always
// did, on every replica alike.
func TestLegacyEntriesKeepLegacyRules(t *testing.T) {
	a, b, c := newNode(t, "a"), newNode(t, "b"), newNode(t, "c")
	ap := newApplier()
	ap.ok(t, a.init(t, "c1"))
	ap.ok(t, b.register(t))
	ap.ok(t, c.register(t))
	ap.ok(t, a.ensure(t, "10.60.0.0/16"))
	ap.ok(t, a.claim(t, "10.60.0.0/16"))
	ap.ok(t, c.deleteNetwork(t, "10.60.0.0/16"))
	if n := ap.s.Networks[netip.MustParsePrefix("10.60.0.0/16")]; !n.Deleted || len(n.Blocks) != 0 {
		t.Fatalf("legacy delete: deleted %v, blocks %v", n.Deleted, n.Blocks)
	}
	ap.ok(t, c.forget(t, "b"))
	if _, ok := ap.s.Nodes["b"]; ok || ap.s.Protocol != 0 {
		t.Fatalf("legacy forget not applied (protocol %d)", ap.s.Protocol)
	}
}

// TestProtocolSticks: once an endorsed entry is applied, the state says
// so, and registering as an old node is refused.
func TestProtocolSticks(t *testing.T) {
	a, b := newNode(t, "a"), newNode(t, "b")
	ap := newV2()
	ap.ok(t, a.init(t, "c1"), nil)
	if p := ap.f.State().Protocol; p != 0 {
		t.Fatalf("protocol after a legacy entry: %d", p)
	}
	ap.ok(t, b.register(t), plain)
	st := ap.f.State()
	if st.Protocol != ProtocolEndorsed || st.Nodes["b"].Protocol != ProtocolEndorsed {
		t.Fatalf("protocol %d, b advertises %d", st.Protocol, st.Nodes["b"].Protocol)
	}
	// b is downgraded to a wgmesh that advertises nothing.
	b.restart()
	b.protocol = 0
	ap.refused(t, b.register(t), plain, ErrOutdated, "upgrade")
	if st := ap.f.State(); st.Nodes["b"].BootID == b.boot {
		t.Fatal("outdated registration applied")
	}
}

// TestLimits: every table a member can grow is bounded, with a clear
// refusal.
func TestLimits(t *testing.T) {
	a, b := newNode(t, "a"), newNode(t, "b")
	ap := newV2()
	ap.ok(t, a.init(t, "c1"), plain)
	ap.ok(t, b.register(t), plain)

	t.Run("networks per node", func(t *testing.T) {
		for i := range MaxNetworksPerNode {
			ap.ok(t, a.ensure(t, fmt.Sprintf("10.%d.0.0/16", i)), plain)
		}
		ap.refused(t, a.ensure(t, "10.200.0.0/16"), plain, ErrLimit, fmt.Sprint(MaxNetworksPerNode))
		// Another member is not held by a's networks.
		ap.ok(t, b.ensure(t, "10.201.0.0/16"), plain)
		// Deleting one makes room.
		ap.ok(t, a.deleteNetwork(t, "10.0.0.0/16"), checked)
		ap.ok(t, a.ensure(t, "10.200.0.0/16"), plain)
	})
	t.Run("blocks per node", func(t *testing.T) {
		// /24 blocks of a /8: far more than the bound.
		e := b.sign(t, &Command{Op: OpEnsureNetwork, Network: &EnsureNetwork{Subnet: netip.MustParsePrefix("11.0.0.0/8"), BlockBits: 24}})
		ap.ok(t, e, plain)
		for range MaxBlocksPerNode {
			ap.ok(t, a.claim(t, "11.0.0.0/8"), plain)
		}
		ap.refused(t, a.claim(t, "11.0.0.0/8"), plain, ErrLimit, fmt.Sprint(MaxBlocksPerNode))
		ap.refused(t, a.claimAddr(t, "11.0.0.0/8", "11.255.255.1"), plain, ErrLimit)
		ap.ok(t, b.claim(t, "11.0.0.0/8"), plain)
	})
	t.Run("aux addresses", func(t *testing.T) {
		ap.ok(t, b.ensure(t, "12.0.0.0/16"), plain)
		for i := range MaxAux {
			addr := netip.AddrFrom4([4]byte{12, 0, byte(1 + i/200), byte(1 + i%200)})
			ap.ok(t, a.sign(t, &Command{Op: OpReserve, Reserve: &Reserve{Subnet: netip.MustParsePrefix("12.0.0.0/16"), Addr: addr}}), plain)
		}
		ap.refused(t, a.sign(t, &Command{Op: OpReserve, Reserve: &Reserve{Subnet: netip.MustParsePrefix("12.0.0.0/16"),
			Addr: netip.MustParseAddr("12.0.250.1")}}), plain, ErrLimit, fmt.Sprint(MaxAux))
	})
}

// TestNodeLimit: registering identities without end is refused once the
// cluster holds MaxNodes; forgetting one makes room.
func TestNodeLimit(t *testing.T) {
	if testing.Short() {
		t.Skip("registers thousands of identities")
	}
	a := newNode(t, "a")
	ap := newV2()
	ap.ok(t, a.init(t, "c1"), plain)
	for i := 1; i < MaxNodes; i++ {
		ap.ok(t, newNode(t, fmt.Sprintf("n%d", i)).register(t), plain)
	}
	extra := newNode(t, "extra")
	ap.refused(t, extra.register(t), plain, ErrLimit, fmt.Sprint(MaxNodes), "forget")
	// A registered node restarting is not a new record.
	n1 := newNode(t, "n1")
	n1.restart()
	ap.ok(t, n1.register(t), plain)
	ap.ok(t, a.forget(t, "n2"), checked)
	ap.ok(t, extra.register(t), plain)
}

// TestTombstonesPruned: forgotten identities and deleted networks leave
// tombstones, and the oldest go first when their tables are full.
func TestTombstonesPruned(t *testing.T) {
	a := newNode(t, "a")
	ap := newV2()
	ap.ok(t, a.init(t, "c1"), plain)
	var first *node
	for i := range MaxForgotten + 2 {
		n := newNode(t, fmt.Sprintf("gone%d", i))
		if i == 0 {
			first = n
		}
		ap.ok(t, n.register(t), plain)
		ap.ok(t, a.forget(t, n.name), checked)
	}
	st := ap.f.State()
	if len(st.Forgotten) != MaxForgotten {
		t.Fatalf("%d tombstones of forgotten nodes, want %d", len(st.Forgotten), MaxForgotten)
	}
	if _, ok := st.Forgotten[first.id.ID()]; ok {
		t.Fatal("the oldest tombstone was kept")
	}

	// Deleted networks: the table holds live networks and tombstones;
	// creating one when it is full drops the oldest tombstone.
	members := 0
	var own *node
	for i := 0; len(ap.f.State().Networks) < MaxNetworks; i++ {
		if i%MaxNetworksPerNode == 0 {
			members++
			own = newNode(t, fmt.Sprintf("m%d", members))
			ap.ok(t, own.register(t), plain)
		}
		subnet := fmt.Sprintf("%d.%d.0.0/16", 20+i/256, i%256)
		ap.ok(t, own.ensure(t, subnet), plain)
		if i < 3 {
			ap.ok(t, own.deleteNetwork(t, subnet), checked)
		}
	}
	ap.ok(t, own.deleteNetwork(t, fmt.Sprintf("%d.%d.0.0/16", 20+(MaxNetworks-1)/256, (MaxNetworks-1)%256)), checked)
	extra := newNode(t, "extra")
	ap.ok(t, extra.register(t), plain)
	ap.ok(t, extra.ensure(t, "100.64.0.0/16"), plain)
	st = ap.f.State()
	if len(st.Networks) != MaxNetworks {
		t.Fatalf("%d network records, want %d", len(st.Networks), MaxNetworks)
	}
	if _, ok := st.Networks[netip.MustParsePrefix("20.0.0.0/16")]; ok {
		t.Fatal("the oldest deleted network was kept")
	}
	if _, ok := st.Networks[netip.MustParsePrefix("20.1.0.0/16")]; !ok {
		t.Fatal("a newer deleted network was dropped first")
	}
}
