package mesh

// The randomized safety test: the real mesh code — memberlist gossip and
// Raft consensus over loopback, TLS and all — under random joins, leaves,
// crashes with and without the loss of a node's state directory,
// partitions and heals, a second host with a taken name, and a hostile
// member forging records, claims and versions. After every step a checker
// asserts the two promises the README makes: no two nodes hold
// overlapping blocks, and no address is handed out twice. The addresses
// are handed out the way the driver does: a node takes the next free
// address of a block it owns, as its own view of the catalog says, and
// claims a block when it has none free.
//
// `make test` runs a few fixed seeds briefly; `make soak` runs thousands
// of steps (WGMESH_SOAK_STEPS, WGMESH_SOAK_SEED).

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

var safetySubnets = []netip.Prefix{netip.MustParsePrefix("10.60.0.0/22"), netip.MustParsePrefix("10.61.0.0/24")}

// simNode is a node of the safety test: a test node and the addresses
// it handed out, which survive a crash but not the loss of its disk.
type simNode struct {
	*testNode
	allocs map[netip.Prefix]map[netip.Addr]bool
	// gone: crashed, left or refused; not running.
	gone bool
	// forgotten: the cluster forgot it; it may never come back.
	forgotten bool
}

type safety struct {
	t     testing.TB
	rng   *rand.Rand
	c     *cluster
	nodes []*simNode
	next  int
	// counts of steps and faults, by kind.
	counts map[string]int
	evil   *simNode
}

func newSafety(t testing.TB, seed uint64) *safety {
	s := &safety{t: t, rng: rand.New(rand.NewPCG(seed, seed^0x5eed)), c: newCluster(t), counts: map[string]int{}}
	return s
}

func (s *safety) running() []*simNode {
	var out []*simNode
	for _, n := range s.nodes {
		if !n.gone && n != s.evil {
			out = append(out, n)
		}
	}
	return out
}

// down lists the nodes that crashed or left and may come back.
func (s *safety) down() []*simNode {
	var out []*simNode
	for _, n := range s.nodes {
		if n.gone && !n.forgotten && n != s.evil {
			out = append(out, n)
		}
	}
	return out
}

func (s *safety) pick(ns []*simNode) *simNode {
	if len(ns) == 0 {
		return nil
	}
	return ns[s.rng.IntN(len(ns))]
}

// add starts a new node whose seeds are up to three running nodes.
func (s *safety) add() *simNode {
	name := "n" + strconv.Itoa(s.next)
	s.next++
	tn := s.c.add(name)
	tn.seeds = nil
	for _, o := range s.running() {
		if len(tn.seeds) < 3 {
			tn.seeds = append(tn.seeds, o.gossipAddr())
		}
	}
	n := &simNode{testNode: tn, allocs: map[netip.Prefix]map[netip.Addr]bool{}}
	s.nodes = append(s.nodes, n)
	tn.start()
	return n
}

const safetyTimeout = 2 * time.Second

// allocate hands out the next free address of one of n's own blocks,
// claiming a block when none has room. A refusal or a timeout (in a
// partition) is fine; a wrong answer is not.
func (s *safety) allocate(n *simNode, subnet netip.Prefix, want netip.Addr) error {
	ctx, cancel := context.WithTimeout(context.Background(), safetyTimeout)
	defer cancel()
	if n.allocs[subnet] == nil {
		n.allocs[subnet] = map[netip.Addr]bool{}
	}
	for range 3 {
		v := n.m.View()
		reserved := v.Reserved(subnet)
		for _, b := range v.OwnBlocks(subnet) {
			for a := b.Addr(); b.Contains(a); a = a.Next() {
				if want.IsValid() && a != want {
					continue
				}
				if !n.allocs[subnet][a] && !slices.Contains(reserved, a) {
					n.allocs[subnet][a] = true
					return nil
				}
			}
		}
		if _, err := n.m.ClaimBlock(ctx, BlockRequest{Subnet: subnet, Containing: want}); err != nil {
			return err
		}
	}
	return errors.New("no free address after claiming")
}

// check asserts the invariants over every running node.
func (s *safety) check(step string) {
	s.t.Helper()
	type owned struct {
		node  string
		block netip.Prefix
	}
	bySubnet := map[netip.Prefix][]owned{}
	addrs := map[netip.Prefix]map[netip.Addr]string{}
	clusters := map[string]string{}
	for _, n := range s.nodes {
		if n.gone {
			continue
		}
		v := n.m.View()
		if v.ClusterID != "" {
			clusters[v.ClusterID] = n.name
			if len(clusters) > 1 {
				s.t.Fatalf("after %s: two clusters: %v", step, clusters)
			}
		}
		for _, subnet := range safetySubnets {
			own := v.OwnBlocks(subnet)
			for _, b := range own {
				bySubnet[subnet] = append(bySubnet[subnet], owned{n.name, b})
			}
			if addrs[subnet] == nil {
				addrs[subnet] = map[netip.Addr]string{}
			}
			for a := range n.allocs[subnet] {
				if other, dup := addrs[subnet][a]; dup {
					s.t.Fatalf("after %s: address %s handed out by %s and %s", step, a, other, n.name)
				}
				addrs[subnet][a] = n.name
				if !slices.ContainsFunc(own, func(b netip.Prefix) bool { return b.Contains(a) }) {
					s.t.Fatalf("after %s: %s holds %s outside its blocks %v", step, n.name, a, own)
				}
			}
		}
	}
	for subnet, list := range bySubnet {
		for i, a := range list {
			for _, b := range list[i+1:] {
				if a.node != b.node && a.block.Overlaps(b.block) {
					s.t.Fatalf("after %s: %s holds %s and %s holds %s in %s", step, a.node, a.block, b.node, b.block, subnet)
				}
			}
		}
	}
}

// step runs one random action and returns what it did.
func (s *safety) step() string {
	run := s.running()
	r := s.rng.IntN(100)
	switch {
	case len(run) < 3 || r < 8 && len(s.nodes) < 9:
		n := s.add()
		s.counts["join"]++
		return "join " + n.name
	case r < 14:
		// A join while two nodes contest one address.
		a, b := s.pick(run), s.pick(run)
		subnet := safetySubnets[s.rng.IntN(len(safetySubnets))]
		want := randomAddr(s.rng, subnet)
		var wg sync.WaitGroup
		wg.Go(func() { _ = s.allocate(a, subnet, want) })
		if b != a {
			bAllocs := b
			wg.Go(func() { _ = s.allocate(bAllocs, subnet, want) })
		}
		var joined *simNode
		if len(s.nodes) < 9 {
			joined = s.add()
		}
		wg.Wait()
		s.counts["contested"]++
		if joined != nil {
			s.counts["join"]++
			return fmt.Sprintf("%s and %s contest %s while %s joins", a.name, b.name, want, joined.name)
		}
		return fmt.Sprintf("%s and %s contest %s", a.name, b.name, want)
	case r < 50:
		n := s.pick(run)
		subnet := safetySubnets[s.rng.IntN(len(safetySubnets))]
		err := s.allocate(n, subnet, netip.Addr{})
		s.counts["allocate"]++
		return fmt.Sprintf("%s allocates in %s (%v)", n.name, subnet, err)
	case r < 56:
		// Give an empty block back.
		n := s.pick(run)
		subnet := safetySubnets[s.rng.IntN(len(safetySubnets))]
		for _, b := range n.m.View().OwnBlocks(subnet) {
			if !slices.ContainsFunc(slices.Collect(maps.Keys(n.allocs[subnet])), b.Contains) {
				ctx, cancel := context.WithTimeout(context.Background(), safetyTimeout)
				err := n.m.ReleaseBlocks(ctx, subnet, b)
				cancel()
				s.counts["release"]++
				return fmt.Sprintf("%s releases %s (%v)", n.name, b, err)
			}
		}
		return n.name + " has no empty block"
	case r < 63 && len(run) > 3:
		n := s.pick(run)
		n.crash()
		n.gone = true
		s.counts["crash"]++
		return "crash " + n.name
	case r < 67 && len(run) > 3:
		n := s.pick(run)
		n.mutate = append(n.mutate, func(c *Config) { c.LeaveOnShutdown = true })
		n.stop()
		n.mutate = n.mutate[:len(n.mutate)-1]
		n.gone = true
		s.counts["leave"]++
		return "leave " + n.name
	case r < 75:
		// A node that crashed or left comes back with its state.
		n := s.pick(s.down())
		if n == nil {
			return "nothing to restart"
		}
		s.reseed(n)
		n.start()
		n.gone = false
		s.counts["restart"]++
		return "restart " + n.name
	case r < 79:
		// A crashed node lost its disk: it comes back as a new identity
		// under the same name. The cluster refuses it until an operator
		// forgets the old one, after which it joins afresh.
		n := s.pick(s.down())
		if n == nil {
			return "nothing lost its disk"
		}
		return s.diskLoss(n)
	case r < 85:
		// A partition: a random minority on the other side.
		if len(run) < 3 {
			return "too few nodes to partition"
		}
		cut := 1 + s.rng.IntN((len(run)-1)/2)
		perm := s.rng.Perm(len(run))
		var names []string
		for _, i := range perm[:cut] {
			s.c.net.setSide(run[i].name, 1)
			names = append(names, run[i].name)
		}
		s.counts["partition"]++
		return fmt.Sprintf("partition %v away", names)
	case r < 92:
		s.c.net.heal()
		s.counts["heal"]++
		return "heal"
	case r < 95:
		return s.duplicateName(run)
	default:
		return s.hostile(run)
	}
}

func randomAddr(rng *rand.Rand, subnet netip.Prefix) netip.Addr {
	a := subnet.Addr().As4()
	size := 1 << (32 - subnet.Bits())
	off := 2 + rng.IntN(size-4)
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v += uint32(off)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// reseed points n's seeds at running nodes.
func (s *safety) reseed(n *simNode) {
	n.seeds = nil
	for _, o := range s.running() {
		if o != n && len(n.seeds) < 3 {
			n.seeds = append(n.seeds, o.gossipAddr())
		}
	}
}

// diskLoss brings n back with an empty state directory.
func (s *safety) diskLoss(n *simNode) string {
	for _, e := range mustReadDir(s.t, n.dir) {
		if err := os.RemoveAll(n.dir + "/" + e); err != nil {
			s.t.Fatal(err)
		}
	}
	id, err := crypto.GenerateIdentity()
	if err != nil {
		s.t.Fatal(err)
	}
	n.id = id
	n.allocs = map[netip.Prefix]map[netip.Addr]bool{}
	s.reseed(n)
	n.start()
	s.counts["disk-loss"]++
	select {
	case err := <-n.done:
		n.done <- err
		if !errors.Is(err, ErrRefused) {
			s.t.Fatalf("%s came back without its disk and stopped with %v, want a refusal", n.name, err)
		}
	case <-time.After(15 * time.Second):
		// No leader could tell it (a partition): it waits, unregistered.
		n.stop()
		n.gone = true
		return n.name + " lost its disk; no leader to refuse it yet"
	}
	n.stop()
	// An operator forgets the old node from a healthy host, once gossip
	// there sees it failed; the name is then free for the new identity.
	for _, h := range s.running() {
		ctx, cancel := context.WithTimeout(context.Background(), 4*safetyTimeout)
		err := h.m.Forget(ctx, n.name)
		cancel()
		if err == nil {
			s.counts["forget"]++
			n.forgotten = false
			n.start()
			n.gone = false
			return n.name + " lost its disk, was refused, forgotten and joined afresh"
		}
	}
	n.gone = true
	return n.name + " lost its disk and was refused; not forgotten yet"
}

// duplicateName starts a second host with a live node's name and an
// identity of its own: it must be refused and change nothing.
func (s *safety) duplicateName(run []*simNode) string {
	victim := s.pick(run)
	tn := s.c.add("dup-" + strconv.Itoa(s.next))
	s.next++
	tn.name = victim.name
	for _, o := range run {
		if len(tn.seeds) < 2 {
			tn.seeds = append(tn.seeds, o.gossipAddr())
		}
	}
	tn.start()
	s.counts["duplicate-name"]++
	select {
	case err := <-tn.done:
		tn.done <- err
		if !errors.Is(err, ErrRefused) {
			s.t.Fatalf("a second host named %s stopped with %v, want a refusal", victim.name, err)
		}
		return "a second host named " + victim.name + " was refused"
	case <-time.After(10 * time.Second):
		tn.stop()
		if errors.Is(tn.exitErr, ErrRefused) {
			return "a second host named " + victim.name + " was refused"
		}
		// Cut off from any leader, it could not even register.
		if st := tn.m.Consensus(); st.Registered {
			s.t.Fatalf("a second host named %s registered: %+v", victim.name, st)
		}
		if id := tn.m.Consensus().ClusterID; id != "" && id != s.nodes[0].m.Consensus().ClusterID {
			s.t.Fatalf("a second host named %s started a cluster of its own", victim.name)
		}
		return "a second host named " + victim.name + " never registered"
	}
}

// hostile makes a member forge records, claims and versions.
func (s *safety) hostile(run []*simNode) string {
	victim := s.pick(run)
	subnet := safetySubnets[s.rng.IntN(len(safetySubnets))]
	s.counts["hostile"]++
	// A record in the victim's name, signed by evil.
	forged := NetworkEntry{Node: victim.name, Subnet: subnet, Version: 1<<62 - 1, Port: 4444}
	s.evil.sendToAll(encodeEntryMsg(sign(s.evil.id, purposeEntry, forged)))
	// A version near 2^62 of its own record.
	s.evil.sendToAll(encodeEntryMsg(sign(s.evil.id, purposeEntry, NetworkEntry{Node: "evil", Subnet: subnet, Version: 1<<62 - 1, Port: 5555})))
	// A claim of the address the victim holds, in the victim's name.
	var target netip.Addr
	for a := range victim.allocs[subnet] {
		target = a
		break
	}
	if !target.IsValid() {
		target = randomAddr(s.rng, subnet)
	}
	cmd := &catalog.Command{Op: catalog.OpClaim, Node: victim.name, BootID: "forged", Seq: 1 << 40,
		Claim: &catalog.Claim{Subnet: subnet, Containing: target}}
	signed, _ := catalog.Sign(cmd, s.evil.id)
	ctx, cancel := context.WithTimeout(context.Background(), safetyTimeout)
	r, err := s.evil.m.node.SubmitSigned(ctx, signed.Encode())
	cancel()
	if err == nil && r.Code == catalog.CodeOK {
		s.t.Fatalf("a claim forged in %s's name was accepted", victim.name)
	}
	// And a forget of the victim, who is alive.
	ctx, cancel = context.WithTimeout(context.Background(), safetyTimeout)
	forget := &catalog.Command{Op: catalog.OpForget, Node: victim.name, BootID: "forged", Seq: 1 << 40, Forget: &catalog.Forget{Name: run[0].name}}
	signed, _ = catalog.Sign(forget, s.evil.id)
	r, err = s.evil.m.node.SubmitSigned(ctx, signed.Encode())
	cancel()
	if err == nil && r.Code == catalog.CodeOK {
		s.t.Fatalf("a forget forged in %s's name was accepted", victim.name)
	}
	// Nobody uses the forged record.
	for _, n := range run {
		if e, ok := n.m.View().Entry(subnet, victim.name); ok && e.Port == 4444 {
			s.t.Fatalf("%s took the forged record of %s", n.name, victim.name)
		}
	}
	return "evil forges a record, a version, a claim and a forget in " + victim.name + "'s name"
}

func mustReadDir(t testing.TB, dir string) []string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// runSafety runs steps random steps from seed.
func runSafety(t *testing.T, seed uint64, steps int) {
	s := newSafety(t, seed)
	for range 3 {
		s.add()
	}
	// The hostile member is a registered member like any other.
	s.evil = &simNode{testNode: s.c.add("evil"), allocs: map[netip.Prefix]map[netip.Addr]bool{}}
	s.evil.seeds = []string{s.nodes[0].gossipAddr()}
	s.nodes = append(s.nodes, s.evil)
	s.evil.start()
	eventually(t, 30*time.Second, func() error {
		for _, n := range s.nodes {
			if !n.m.Consensus().Registered {
				return fmt.Errorf("%s not registered", n.name)
			}
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	for _, subnet := range safetySubnets {
		if _, err := s.nodes[0].m.EnsureNetwork(ctx, catalog.EnsureNetwork{Subnet: subnet, BlockBits: 28}); err != nil {
			t.Fatal(err)
		}
	}
	cancel()
	start := time.Now()
	for i := range steps {
		what := s.step()
		if testing.Verbose() {
			t.Logf("step %d: %s", i, what)
		}
		s.check(fmt.Sprintf("step %d (%s)", i, what))
	}
	// Heal, bring everyone back, and check once the dust settled.
	s.c.net.heal()
	for _, n := range s.nodes {
		if n.gone && !n.forgotten && n != s.evil && !errors.Is(n.exitErr, ErrRefused) {
			n.start()
			n.gone = false
		}
	}
	time.Sleep(3 * time.Second)
	s.check("the final heal")
	var kinds []string
	faults := 0
	for _, k := range slices.Sorted(maps.Keys(s.counts)) {
		kinds = append(kinds, fmt.Sprintf("%s %d", k, s.counts[k]))
		switch k {
		case "crash", "disk-loss", "leave", "partition", "duplicate-name", "hostile", "contested":
			faults += s.counts[k]
		}
	}
	addrs := 0
	for _, n := range s.nodes {
		for _, a := range n.allocs {
			addrs += len(a)
		}
	}
	t.Logf("seed %d: %d steps, %d faults in %s: %s; %d addresses held at the end, none twice",
		seed, steps, faults, time.Since(start).Round(time.Second), strings.Join(kinds, ", "), addrs)
}

// TestSafetyRandomized runs the randomized safety test on fixed seeds.
func TestSafetyRandomized(t *testing.T) {
	if testing.Short() {
		t.Skip("slow")
	}
	steps, seeds := 40, []uint64{1, 2, 3}
	if v := os.Getenv("WGMESH_SOAK_STEPS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			t.Fatal(err)
		}
		steps = n
		seeds = []uint64{uint64(time.Now().UnixNano())}
		if v := os.Getenv("WGMESH_SOAK_SEED"); v != "" {
			seed, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			seeds = []uint64{seed}
		}
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { runSafety(t, seed, steps) })
	}
}
