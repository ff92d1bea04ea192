package catalog

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
)

// node is a test node that signs its commands.
type node struct {
	name string
	id   crypto.Identity
	boot string
	gen  uint64
	seq  uint64
	// protocol is what it advertises when it registers.
	protocol int
}

func newNode(t testing.TB, name string) *node {
	t.Helper()
	seed := make([]byte, 32)
	copy(seed, name)
	id, err := crypto.IdentityFromSeed(seed)
	if err != nil {
		t.Fatal(err)
	}
	return &node{name: name, id: id, boot: name + "-boot1", gen: 1, protocol: Protocol}
}

func (n *node) sign(t testing.TB, c *Command) []byte {
	t.Helper()
	c.Node, c.BootID = n.name, n.boot
	if c.Op != OpInit && c.Op != OpRegister && c.Seq == 0 {
		n.seq++
		c.Seq = n.seq
	}
	s, err := Sign(c, n.id)
	if err != nil {
		t.Fatalf("signing %s: %v", c.Op, err)
	}
	return s.Encode()
}

func (n *node) reg() Register {
	return Register{ID: n.id.ID(), Addr: netip.MustParseAddr("192.0.2.1"), Generation: n.gen, Protocol: n.protocol}
}

func (n *node) init(t testing.TB, clusterID string) []byte {
	return n.sign(t, &Command{Op: OpInit, Init: &Init{ClusterID: clusterID, Register: n.reg()}})
}

func (n *node) register(t testing.TB) []byte {
	r := n.reg()
	return n.sign(t, &Command{Op: OpRegister, Register: &r})
}

// restart is a new run of the node: new boot, next generation.
func (n *node) restart() {
	n.gen++
	n.boot = fmt.Sprintf("%s-boot%d", n.name, n.gen)
	n.seq = 0
}

func (n *node) ensure(t testing.TB, subnet string) []byte {
	return n.sign(t, &Command{Op: OpEnsureNetwork, Network: &EnsureNetwork{Subnet: netip.MustParsePrefix(subnet)}})
}

func (n *node) claim(t testing.TB, subnet string) []byte {
	return n.sign(t, &Command{Op: OpClaim, Claim: &Claim{Subnet: netip.MustParsePrefix(subnet)}})
}

func (n *node) claimAddr(t testing.TB, subnet, addr string) []byte {
	return n.sign(t, &Command{Op: OpClaim, Claim: &Claim{Subnet: netip.MustParsePrefix(subnet), Containing: netip.MustParseAddr(addr)}})
}

// applier applies entries in order to a state, as the FSM would.
type applier struct {
	s     *State
	index uint64
}

func newApplier() *applier { return &applier{s: NewState()} }

func (a *applier) apply(entry []byte) Result {
	a.index++
	return a.s.Apply(a.index, time.Unix(1700000000+int64(a.index), 0), entry)
}

func (a *applier) ok(t testing.TB, entry []byte) Result {
	t.Helper()
	r := a.apply(entry)
	if err := r.Err(); err != nil {
		t.Fatalf("entry %d refused: %v", a.index, err)
	}
	return r
}

func (a *applier) refused(t testing.TB, entry []byte, want *Error, mention ...string) Result {
	t.Helper()
	r := a.apply(entry)
	err := r.Err()
	if !errors.Is(err, want) {
		t.Fatalf("entry %d: got %v, want code %s", a.index, err, want.Code)
	}
	for _, m := range mention {
		if !strings.Contains(err.Error(), m) {
			t.Errorf("error %q does not mention %q", err, m)
		}
	}
	return r
}

func TestRegistration(t *testing.T) {
	a, b := newNode(t, "a"), newNode(t, "b")
	ap := newApplier()
	ap.refused(t, a.register(t), ErrNotInitialised)
	ap.ok(t, a.init(t, "cluster-1"))
	ap.refused(t, a.init(t, "cluster-2"), ErrInvalid, "already initialised")
	ap.ok(t, b.register(t))
	ap.ok(t, b.register(t)) // a retry of the same run

	// A second host with a taken name and another identity (a clone with
	// the same hostname and a fresh state directory).
	clone := newNode(t, "b-clone")
	clone.name = "b"
	r := clone.reg()
	r.Addr = netip.MustParseAddr("192.0.2.99")
	ap.refused(t, clone.sign(t, &Command{Op: OpRegister, Register: &r}), ErrNameTaken, "192.0.2.1", "192.0.2.99", "--node-name")

	// b restarts normally: next generation.
	b.restart()
	ap.ok(t, b.register(t))
	// b's state directory rolls back to an older copy.
	old := *b
	old.gen--
	old.boot = "b-from-backup"
	ap.refused(t, old.register(t), ErrRolledBack, "generation")

	// One identity, one name.
	renamed := *b
	renamed.name = "b2"
	renamed.restart()
	ap.refused(t, renamed.register(t), ErrIdentityInUse, "--node-name b")

	// Forgotten identities never come back.
	ap.ok(t, a.ensure(t, "10.60.0.0/16"))
	ap.ok(t, b.claim(t, "10.60.0.0/16"))
	ap.ok(t, a.sign(t, &Command{Op: OpForget, Forget: &Forget{Name: "b"}}))
	if len(ap.s.Networks[netip.MustParsePrefix("10.60.0.0/16")].Blocks) != 0 {
		t.Error("forget left b's blocks")
	}
	b.restart()
	ap.refused(t, b.register(t), ErrForgotten, "forgotten by a")
	// The name itself is free again for a new identity.
	ap.ok(t, clone.sign(t, &Command{Op: OpRegister, Register: &r}))
	ap.refused(t, a.sign(t, &Command{Op: OpForget, Forget: &Forget{Name: "a"}}), ErrInvalid, "itself")
}

// TestImpersonation: a registered member signs commands in another
// node's name, and replays commands that node signed itself.
func TestImpersonation(t *testing.T) {
	a, b, evil := newNode(t, "a"), newNode(t, "b"), newNode(t, "evil")
	ap := newApplier()
	ap.ok(t, a.init(t, "c"))
	ap.ok(t, b.register(t))
	ap.ok(t, evil.register(t))
	ap.ok(t, a.ensure(t, "10.60.0.0/16"))
	claimB := b.claimAddr(t, "10.60.0.0/16", "10.60.7.7")
	ap.ok(t, claimB)

	// evil claims in a's name, signing with its own key.
	forged := evil.claimAddr(t, "10.60.0.0/16", "10.60.9.9")
	var s Signed
	if err := json.Unmarshal(forged, &s); err != nil {
		t.Fatal(err)
	}
	var c Command
	_ = json.Unmarshal(s.Cmd, &c)
	c.Node, c.BootID = "a", a.boot
	s2, _ := Sign(&c, evil.id)
	ap.refused(t, s2.Encode(), ErrBadSignature, "not signed by its identity")
	// ... forges a's registration to a new address.
	r := a.reg()
	r.ID = evil.id.ID()
	forgedReg, _ := Sign(&Command{Op: OpRegister, Node: "a", BootID: "evil", Register: &r}, evil.id)
	ap.refused(t, forgedReg.Encode(), ErrIdentityInUse)
	// ... tampers with b's signed claim.
	if err := json.Unmarshal(claimB, &s); err != nil {
		t.Fatal(err)
	}
	s.Cmd = bytes.Replace(s.Cmd, []byte("10.60.7.7"), []byte("10.60.8.8"), 1)
	ap.refused(t, s.Encode(), ErrBadSignature)

	// Replays: b's release of its block, replayed after b claimed again.
	rel := b.sign(t, &Command{Op: OpRelease, Release: &Release{Subnet: netip.MustParsePrefix("10.60.0.0/16"),
		Blocks: []netip.Prefix{netip.MustParsePrefix("10.60.7.0/24")}}})
	ap.ok(t, rel)
	got := ap.ok(t, b.claimAddr(t, "10.60.0.0/16", "10.60.7.7"))
	ap.refused(t, rel, ErrStale)
	if owner, _, _ := ap.s.Networks[netip.MustParsePrefix("10.60.0.0/16")].Owner(netip.MustParseAddr("10.60.7.7")); owner != "b" {
		t.Errorf("after a replayed release, 10.60.7.7 belongs to %q, want b (block %s)", owner, got.Block)
	}
	// After b restarts, its old commands are from another run.
	b.restart()
	ap.ok(t, b.register(t))
	ap.refused(t, claimB, ErrStale, "earlier run")
}

func TestClaims(t *testing.T) {
	a, b := newNode(t, "a"), newNode(t, "b")
	ap := newApplier()
	ap.ok(t, a.init(t, "c"))
	ap.ok(t, b.register(t))
	ap.refused(t, a.claim(t, "10.60.0.0/16"), ErrNoNetwork)
	r := ap.ok(t, a.ensure(t, "10.60.0.0/16"))
	if r.Network.BlockBits != 24 || r.Network.Gateway != netip.MustParseAddr("10.60.0.1") {
		t.Errorf("new network %+v: want /24 blocks and gateway 10.60.0.1", r.Network)
	}
	ap.refused(t, b.sign(t, &Command{Op: OpEnsureNetwork, Network: &EnsureNetwork{Subnet: netip.MustParsePrefix("10.60.0.0/16"), BlockBits: 26}}),
		ErrNetworkConflict, "/24", "block-size")
	ap.refused(t, b.ensure(t, "10.60.128.0/17"), ErrNetworkConflict, "overlaps")
	ap.ok(t, b.ensure(t, "10.60.0.0/16")) // the same network: fine

	ra := ap.ok(t, a.claim(t, "10.60.0.0/16"))
	rb := ap.ok(t, b.claim(t, "10.60.0.0/16"))
	if ra.Block == rb.Block || ra.Block.Bits() != 24 {
		t.Fatalf("claims: a %s, b %s", ra.Block, rb.Block)
	}
	// A static address in b's block.
	ap.refused(t, a.claimAddr(t, "10.60.0.0/16", rb.Block.Addr().Next().String()), ErrBlockTaken, "node b")
	// A static address next to a smaller foreign block gets a smaller block.
	ap.ok(t, b.sign(t, &Command{Op: OpAdopt, Adopt: &Adopt{Subnet: netip.MustParsePrefix("10.60.0.0/16"),
		Blocks: []netip.Prefix{netip.MustParsePrefix("10.60.200.0/28")}}}))
	rs := ap.ok(t, a.claimAddr(t, "10.60.0.0/16", "10.60.200.200"))
	if rs.Block != netip.MustParsePrefix("10.60.200.128/25") {
		t.Errorf("static address beside a /28: got %s, want 10.60.200.128/25", rs.Block)
	}
	// Asking again for an address in one's own block returns that block.
	if again := ap.ok(t, a.claimAddr(t, "10.60.0.0/16", "10.60.200.129")); again.Block != rs.Block {
		t.Errorf("own block again: %s", again.Block)
	}
	ap.refused(t, a.sign(t, &Command{Op: OpAdopt, Adopt: &Adopt{Subnet: netip.MustParsePrefix("10.60.0.0/16"),
		Blocks: []netip.Prefix{netip.MustParsePrefix("10.60.200.0/24")}}}), ErrBlockTaken, "10.60.200.0/28 of b")

	// A small subnet fills up.
	ap.ok(t, a.ensure(t, "10.70.0.0/24"))
	for i := range 16 {
		n := a
		if i%2 == 1 {
			n = b
		}
		ap.ok(t, n.claim(t, "10.70.0.0/24"))
	}
	ap.refused(t, a.claim(t, "10.70.0.0/24"), ErrNoFreeBlock)
}

// TestRetryGetsTheSameAnswer: a claim whose answer was lost is sent again
// with the same sequence number and gets the block it got the first time,
// rather than a second one.
func TestRetryGetsTheSameAnswer(t *testing.T) {
	a := newNode(t, "a")
	ap := newApplier()
	ap.ok(t, a.init(t, "c"))
	ap.ok(t, a.ensure(t, "10.60.0.0/16"))
	entry := a.claim(t, "10.60.0.0/16")
	first := ap.ok(t, entry)
	again := ap.ok(t, entry)
	if first.Block != again.Block {
		t.Fatalf("retry got %s, first %s", again.Block, first.Block)
	}
	if n := len(ap.s.Networks[netip.MustParsePrefix("10.60.0.0/16")].Blocks); n != 1 {
		t.Fatalf("a retry took %d blocks", n)
	}
}

// TestDeterministic: two replicas applying the same random history reach
// byte-identical states, and no block is ever owned twice.
func TestDeterministic(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	nodes := []*node{newNode(t, "a"), newNode(t, "b"), newNode(t, "c"), newNode(t, "d")}
	var entries [][]byte
	entries = append(entries, nodes[0].init(t, "c"))
	for _, n := range nodes[1:] {
		entries = append(entries, n.register(t))
	}
	subnets := []string{"10.60.0.0/16", "10.61.0.0/24", "10.62.0.0/20"}
	for range 400 {
		n := nodes[rng.IntN(len(nodes))]
		s := subnets[rng.IntN(len(subnets))]
		switch rng.IntN(6) {
		case 0:
			entries = append(entries, n.ensure(t, s))
		case 1, 2:
			entries = append(entries, n.claim(t, s))
		case 3:
			p := netip.MustParsePrefix(s)
			a := p.Addr()
			for range rng.IntN(300) {
				a = a.Next()
			}
			if p.Contains(a) {
				entries = append(entries, n.claimAddr(t, s, a.String()))
			}
		case 4:
			p := netip.MustParsePrefix(s)
			b, _ := nthBlock(p, DefaultBlockBits(p), rng.IntN(8))
			entries = append(entries, n.sign(t, &Command{Op: OpRelease, Release: &Release{Subnet: p, Blocks: []netip.Prefix{b}}}))
		case 5:
			n.restart()
			entries = append(entries, n.register(t))
		}
	}
	one, two := newApplier(), newApplier()
	for _, e := range entries {
		r1, r2 := one.apply(e), two.apply(e)
		if r1.Code != r2.Code || r1.Block != r2.Block || r1.Message != r2.Message {
			t.Fatalf("entry %d: results differ: %+v / %+v", one.index, r1, r2)
		}
		checkNoOverlap(t, one.s)
	}
	b1, _ := json.Marshal(one.s)
	b2, _ := json.Marshal(two.s)
	if !bytes.Equal(b1, b2) {
		t.Fatal("replicas differ")
	}
	restored, err := DecodeState(bytes.NewReader(b1))
	if err != nil {
		t.Fatal(err)
	}
	b3, _ := json.Marshal(restored)
	if !bytes.Equal(b1, b3) {
		t.Fatal("snapshot round trip changed the state")
	}
}

func checkNoOverlap(t testing.TB, s *State) {
	t.Helper()
	for subnet, n := range s.Networks {
		var blocks []netip.Prefix
		for b := range n.Blocks {
			if !subnet.Contains(b.Addr()) || b.Bits() < subnet.Bits() {
				t.Fatalf("block %s outside %s", b, subnet)
			}
			for _, o := range blocks {
				if o.Overlaps(b) {
					t.Fatalf("blocks %s (%s) and %s (%s) overlap", o, n.Blocks[o], b, n.Blocks[b])
				}
			}
			blocks = append(blocks, b)
		}
	}
}

func TestOverlapsSorted(t *testing.T) {
	blocks := []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/24"), netip.MustParsePrefix("10.0.2.0/28"), netip.MustParsePrefix("10.0.4.0/22"),
	}
	for _, tc := range []struct {
		p    string
		want bool
	}{
		{"10.0.0.0/24", true}, {"10.0.0.128/25", true}, {"10.0.1.0/24", false}, {"10.0.2.0/24", true},
		{"10.0.2.16/28", false}, {"10.0.0.0/16", true}, {"10.0.5.0/24", true}, {"10.0.8.0/24", false},
		{"9.0.0.0/8", false}, {"10.0.3.0/24", false},
	} {
		if got := overlapsSorted(blocks, netip.MustParsePrefix(tc.p)); got != tc.want {
			t.Errorf("overlapsSorted(%s) = %v, want %v", tc.p, got, tc.want)
		}
	}
}

func FuzzApply(f *testing.F) {
	a := newNode(f, "a")
	f.Add(a.init(f, "c"))
	f.Add(a.ensure(f, "10.60.0.0/16"))
	f.Add(a.claimAddr(f, "10.60.0.0/16", "10.60.1.1"))
	f.Add([]byte(`{"cmd":"eyJvcCI6ImNsYWltIn0=","sig":""}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		ap := newApplier()
		ap.ok(t, newNode(t, "a").init(t, "c"))
		ap.ok(t, newNode(t, "a").sign(t, &Command{Op: OpEnsureNetwork, Seq: 1, Network: &EnsureNetwork{Subnet: netip.MustParsePrefix("10.60.0.0/16")}}))
		r := ap.apply(b)
		if r.Code == CodeOK {
			if _, c, err := DecodeSigned(b); err != nil || c == nil {
				t.Fatalf("accepted an entry that does not decode: %v", err)
			}
		}
		checkNoOverlap(t, ap.s)
		if _, err := json.Marshal(ap.s); err != nil {
			t.Fatal(err)
		}
	})
}

// FuzzDecodeState: a snapshot (from disk or from the leader) never
// panics the decoder, and an accepted one survives a round trip.
func FuzzDecodeState(f *testing.F) {
	ap := newApplier()
	a := newNode(f, "a")
	ap.ok(f, a.init(f, "c"))
	ap.ok(f, a.ensure(f, "10.60.0.0/16"))
	ap.ok(f, a.claim(f, "10.60.0.0/16"))
	b, _ := json.Marshal(ap.s)
	f.Add(b)
	f.Add([]byte(`{"networks":{"10.60.0.0/16":null}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := DecodeState(bytes.NewReader(b))
		if err != nil {
			return
		}
		enc, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		again, err := DecodeState(bytes.NewReader(enc))
		if err != nil {
			t.Fatalf("round trip: %v", err)
		}
		enc2, _ := json.Marshal(again)
		if !bytes.Equal(enc, enc2) {
			t.Fatal("round trip changed the state")
		}
		// A claim applied to it must not panic either.
		n := newNode(t, "a")
		s.Apply(s.Index+1, time.Unix(1, 0), n.claim(t, "10.60.0.0/16"))
	})
}
