package mesh

// The randomized safety test: the real mesh code — memberlist gossip and
// Raft consensus over loopback, TLS and all — under random joins, leaves,
// power cuts (crashes that lose every write not yet synced, crashfs_test.go)
// with and without the loss of a node's state directory, a power cut of
// most voters at once, a crash right after a snapshot install, a voter
// restored from an old copy of its state directory (a VM snapshot),
// partitions and heals, a second host with a taken name, and a hostile
// member: it forges records, claims and versions in others' names, and,
// with the capabilities any member has, sends forwarded consensus requests
// for a voter, forgets live nodes and deletes networks in its own name.
//
// After every step a checker asserts the promises the docs make: no
// two nodes hold overlapping blocks, no address is handed out twice, no
// committed claim is lost (a block that held an address handed out is
// still its node's in every replica that applied the claim), replicas at
// the same index hold the same catalog, no node stops by itself, and the
// voters' addresses are their own. The addresses are handed out the way
// the driver does: a node takes the next free address of a block it owns,
// as its own view of the catalog says, and claims a block when it has none
// free.
//
// `make test` runs a few fixed seeds briefly; `make soak` runs thousands
// of steps (WGMESH_SOAK_STEPS, WGMESH_SOAK_SEED). The fault kinds that
// find holes not fixed yet run only with WGMESH_SAFETY_STRICT=1 (see
// strictKinds). A failing run prints its seed, its steps and the command
// that runs it again. `make mutate` checks that this test catches a list
// of deliberate bugs (test/mutate).

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
	"github.com/wgmesh/wgmesh/mesh/consensus"
	"github.com/wgmesh/wgmesh/mesh/records"
	"github.com/wgmesh/wgmesh/test/poll"
)

var safetySubnets = []netip.Prefix{netip.MustParsePrefix("10.60.0.0/22"), netip.MustParsePrefix("10.61.0.0/24")}

// simNode is a node of the safety test: a test node and the addresses
// it handed out, which survive a crash but not the loss of its disk.
type simNode struct {
	*testNode
	allocs map[netip.Prefix]map[netip.Addr]bool
	// acked is, for every address handed out, an index of the catalog
	// by which the claim of its block was applied on this node: every
	// replica that applied that far must show the block as this node's.
	acked map[netip.Addr]uint64
	// gone: crashed, left or refused; not running.
	gone bool
	// forgotten: the cluster forgot it; it may never come back.
	forgotten bool
	// rolledBack: it runs from an old copy of its state directory, so
	// its own view may lag until the cluster refuses it.
	rolledBack bool
}

func newSimNode(tn *testNode) *simNode {
	return &simNode{testNode: tn, allocs: map[netip.Prefix]map[netip.Addr]bool{}, acked: map[netip.Addr]uint64{}}
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
	cfs    *crashFS
	// strict lists the fault kinds of strictKinds that run ("all": every one).
	strict map[string]bool
	// saved holds crash images of state directories taken earlier (VM
	// snapshots), by node name.
	saved map[string]string
	// history is the steps so far, for a failing run's report.
	history []string
}

// strictKinds are the fault kinds that found holes in the code of
// 559f90d. Those in onByDefault run always (the holes are fixed);
// WGMESH_SAFETY_STRICT=1 runs every one, WGMESH_SAFETY_STRICT=kind,kind
// those named besides, and WGMESH_SAFETY_STRICT=0 none. Their random
// draws happen either way, so a seed runs the same other steps.
//
// rollback stays off by default: with every fix in, seed 2 still finds a
// voter restored from an old copy that is not refused in time while the
// leader lost power and the third voter is cut off (see the closing
// notes); it is a known hole, not a flaky test.
var onByDefault = []string{"hostile-forward", "hostile-forget", "hostile-delete", "snapshot-crash", "impostor"}

var strictKinds = map[string]string{
	"hostile-forward": "forwarded consensus requests act for For on trust (consensus/rpc.go)",
	"hostile-forget":  "the catalog applies a member's forget of a live node (catalog/apply.go)",
	"hostile-delete":  "the catalog applies a member's delete of a network others hold blocks in (catalog/networks.go)",
	"rollback":        "a voter restored from an old copy votes with its stale log",
	"snapshot-crash":  "a crash after a snapshot install loses the entries between the catalog copy and the snapshot",
	"impostor":        "Raft's dial takes whichever node answers at a voter's address (consensus/transport.go)",
}

// churnSubnet is a network only the snapshot-crash step claims blocks
// in, to grow the log past a snapshot.
var churnSubnet = netip.MustParsePrefix("10.62.0.0/16")

func newSafety(t testing.TB, seed uint64) *safety {
	s := &safety{t: t, rng: rand.New(rand.NewPCG(seed, seed^0x5eed)), c: newCluster(t), counts: map[string]int{},
		cfs: newCrashFS(), strict: strictFromEnv(t), saved: map[string]string{}}
	s.c.slow = safetySlow
	consensus.WALForTest = s.cfs.open
	t.Cleanup(func() { consensus.WALForTest = nil })
	return s
}

func strictFromEnv(t testing.TB) map[string]bool {
	v := os.Getenv("WGMESH_SAFETY_STRICT")
	out := map[string]bool{}
	switch v {
	case "0":
	case "":
		for _, k := range onByDefault {
			out[k] = true
		}
	case "1", "all":
		for k := range strictKinds {
			out[k] = true
		}
	default:
		for _, k := range strings.Split(v, ",") {
			if _, ok := strictKinds[k]; !ok {
				t.Fatalf("WGMESH_SAFETY_STRICT: no fault kind %q (have %v)", k, slices.Sorted(maps.Keys(strictKinds)))
			}
			out[k] = true
		}
		for _, k := range onByDefault {
			out[k] = true
		}
	}
	return out
}

// enabled reports whether a fault kind runs, and counts it if so.
func (s *safety) enabled(kind string) bool {
	if _, gated := strictKinds[kind]; gated && !s.strict[kind] {
		s.counts[kind+" (off)"]++
		return false
	}
	s.counts[kind]++
	return true
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
	n := newSimNode(tn)
	s.nodes = append(s.nodes, n)
	tn.start()
	return n
}

const safetyTimeout = 2 * time.Second

// safetySlow stretches the nodes' failure detection and elections (see
// cluster.slow): under make test's load, at the tests' tightest timings,
// false suspicions and elections left seeds 1 and 3 without a settled
// cluster 30 s after the final heal.
const safetySlow = 3

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
					// Read after the view: the view's catalog is at
					// most this far.
					n.acked[a] = n.m.node.FSM().Index()
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
		// A node that lost power comes back with the catalog copy it
		// last saved, and catches up once Raft tells it what committed:
		// its view is held to the claims it has applied.
		applied := n.m.node.FSM().Index()
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
				if !n.rolledBack && n.acked[a] <= applied && !slices.ContainsFunc(own, func(b netip.Prefix) bool { return b.Contains(a) }) {
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
	s.checkExits(step)
	s.checkReplicas(step)
	s.checkVoters(step)
}

// checkExits asserts that no node stopped by itself: a crash, a restart
// or a hostile member must never leave a node that cannot run.
func (s *safety) checkExits(step string) {
	s.t.Helper()
	for _, n := range s.nodes {
		if n.gone || n == s.evil {
			continue
		}
		select {
		case err := <-n.done:
			n.done <- err
			if n.rolledBack && errors.Is(err, ErrRefused) {
				// The cluster refused the old copy, as it should.
				n.stop()
				n.gone, n.forgotten = true, true
				continue
			}
			s.t.Fatalf("after %s: %s stopped by itself: %v", step, n.name, err)
		default:
		}
	}
}

type replicaView struct {
	node   string
	index  uint64
	state  *catalog.State
	digest []string
}

// digest lists what two replicas at the same index must agree on.
func digest(st *catalog.State) []string {
	var out []string
	for _, subnet := range st.Subnets() {
		nw := st.Networks[subnet]
		out = append(out, fmt.Sprintf("network %s deleted=%v", subnet, nw.Deleted))
		for _, b := range slices.SortedFunc(maps.Keys(nw.Blocks), catalog.ComparePrefix) {
			out = append(out, fmt.Sprintf("block %s of %s", b, nw.Blocks[b]))
		}
	}
	for _, name := range slices.Sorted(maps.Keys(st.Nodes)) {
		n := st.Nodes[name]
		out = append(out, fmt.Sprintf("node %s id %s generation %d", name, n.ID.Short(), n.Generation))
	}
	for id, f := range st.Forgotten {
		out = append(out, fmt.Sprintf("forgotten %s (%s)", f.Name, id.Short()))
	}
	slices.Sort(out)
	return out
}

// checkReplicas asserts that replicas at the same index agree, and that
// every address handed out is still in a block of its node in every
// replica that applied the block's claim: a committed entry is never
// lost. Blocks are released only when empty and forgotten only after a
// disk loss, whose addresses go with it, so nothing else takes them.
func (s *safety) checkReplicas(step string) {
	s.t.Helper()
	var reps []replicaView
	for _, n := range s.nodes {
		if n.gone {
			continue
		}
		st := n.m.node.FSM().State()
		reps = append(reps, replicaView{node: n.name, index: st.Index, state: st, digest: digest(st)})
	}
	for i, a := range reps {
		for _, b := range reps[i+1:] {
			if a.index != b.index || a.index == 0 || slices.Equal(a.digest, b.digest) {
				continue
			}
			var onlyA, onlyB []string
			for _, l := range a.digest {
				if !slices.Contains(b.digest, l) {
					onlyA = append(onlyA, l)
				}
			}
			for _, l := range b.digest {
				if !slices.Contains(a.digest, l) {
					onlyB = append(onlyB, l)
				}
			}
			s.t.Fatalf("after %s: the replicas of %s and %s differ at index %d: only %s has %v; only %s has %v",
				step, a.node, b.node, a.index, a.node, onlyA, b.node, onlyB)
		}
	}
	for _, n := range s.nodes {
		if n == s.evil {
			continue
		}
		for subnet, as := range n.allocs {
			for a := range as {
				at := n.acked[a]
				for _, r := range reps {
					if r.index < at {
						continue
					}
					owner := "nobody"
					// A deleted network's blocks stay with their hosts
					// until each gives them back (catalog deleteNetwork).
					if nw, ok := r.state.Networks[subnet]; ok {
						if o, _, ok := nw.Owner(a); ok {
							owner = o
						}
					} else {
						owner = "nobody: the network is gone"
					}
					if owner != n.name {
						s.t.Fatalf("after %s: %s handed out %s (its block's claim applied by index %d), but the catalog of %s at index %d gives it to %s: a committed claim was lost",
							step, n.name, a, at, r.node, r.index, owner)
					}
				}
			}
		}
	}
}

// leader is the running honest node that leads, with its status.
func (s *safety) leader() (*simNode, consensus.Status, bool) {
	for _, n := range s.running() {
		if st := n.m.node.Status(); st.State == "leader" {
			return n, st, true
		}
	}
	return nil, consensus.Status{}, false
}

// honestLeader is leader, after asking the hostile member to hand over
// leadership should it lead: the hostile member runs honest consensus
// code, and the faults that need an honest leader to fool must not be
// skipped whenever it happens to win an election.
func (s *safety) honestLeader() (*simNode, consensus.Status, bool) {
	if s.evil.m.node.Status().State == "leader" {
		ctx, cancel := context.WithTimeout(context.Background(), 2*safetyTimeout)
		_ = s.evil.m.node.Leave(ctx)
		cancel()
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		n, st, ok := s.leader()
		if ok || time.Now().After(deadline) {
			return n, st, ok
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkVoters asserts that every server of the leader's configuration
// is at its own node's address: nobody moved a voter elsewhere.
func (s *safety) checkVoters(step string) {
	s.t.Helper()
	_, st, ok := s.leader()
	if !ok {
		return
	}
	for _, srv := range st.Servers {
		if tn, ok := s.c.nodes[srv.Name]; ok && tn.name == srv.Name && srv.Address != tn.raftAddr() {
			s.t.Fatalf("after %s: the configuration has server %s (voter %v) at %s, but it serves consensus at %s",
				step, srv.Name, srv.Voter, srv.Address, tn.raftAddr())
		}
	}
}

// step runs one random action and returns what it did.
func (s *safety) step() string {
	run := s.running()
	r := s.rng.IntN(136)
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
		s.counts["allocate"]++
		if s.rng.IntN(4) == 0 {
			// A static address (docker run --ip), maybe in another
			// node's block: refused then.
			want := randomAddr(s.rng, subnet)
			err := s.allocate(n, subnet, want)
			return fmt.Sprintf("%s allocates %s (%v)", n.name, want, err)
		}
		err := s.allocate(n, subnet, netip.Addr{})
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
		n.powerCut(s.cfs)
		n.gone = true
		s.counts["crash"]++
		return "power cut " + n.name
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
	case r < 100:
		return s.hostile(run)
	case r < 105:
		return s.hostileForward(run)
	case r < 108:
		return s.impostor()
	case r < 116:
		return s.hostileCatalog(run)
	case r < 122:
		return s.rollback(run)
	case r < 126:
		return s.snapshotCrash(run)
	default:
		return s.majorityPowerCut(run)
	}
}

func randomAddr(rng *rand.Rand, subnet netip.Prefix) netip.Addr {
	size := 1 << (32 - subnet.Bits())
	return addrAt(subnet, uint32(2+rng.IntN(size-4)))
}

// addrAt is the address off past the start of an IPv4 subnet.
func addrAt(subnet netip.Prefix, off uint32) netip.Addr {
	a := subnet.Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v += off
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
	n.acked = map[netip.Addr]uint64{}
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
	s.evil.sendToAll(records.EncodeEntryMsg(records.Sign(s.evil.id, records.PurposeEntry, forged)))
	// A version near 2^62 of its own record.
	s.evil.sendToAll(records.EncodeEntryMsg(records.Sign(s.evil.id, records.PurposeEntry, NetworkEntry{Node: s.evil.name, Subnet: subnet, Version: 1<<62 - 1, Port: 5555})))
	// A claim of the address the victim holds, in the victim's name.
	var target netip.Addr
	for a := range victim.allocs[subnet] {
		target = a
		break
	}
	if !target.IsValid() {
		target = randomAddr(s.rng, subnet)
	}
	// With the victim's current boot ID and next sequence number, which
	// every member's catalog shows: only the signature is wrong.
	boot, seq := "forged", uint64(1<<40)
	s.evil.m.node.FSM().Read(func(st *catalog.State) {
		if n, ok := st.Nodes[victim.name]; ok {
			boot, seq = n.BootID, n.LastSeq+1
		}
	})
	cmd := &catalog.Command{Op: catalog.OpClaim, Node: victim.name, BootID: boot, Seq: seq,
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
	forget := &catalog.Command{Op: catalog.OpForget, Node: victim.name, BootID: boot, Seq: seq + 1, Forget: &catalog.Forget{Name: run[0].name}}
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
	// And an operator's mistake: `wgmesh forget` of a node gossip shows
	// alive is refused.
	what := "evil forges a record, a version, a claim and a forget in " + victim.name + "'s name"
	op := s.pick(s.reachable())
	if op == nil || op == victim {
		return what
	}
	if mem, ok := op.m.View().Members[victim.name]; !ok || mem.State != Alive {
		return what
	}
	ctx, cancel = context.WithTimeout(context.Background(), safetyTimeout)
	err = op.m.Forget(ctx, victim.name)
	cancel()
	if err == nil {
		s.t.Fatalf("an operator on %s forgot %s, which gossip shows alive", op.name, victim.name)
	}
	return what + "; an operator on " + op.name + " may not forget it"
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
	// Named last, so that it does not start the cluster and lead it: the
	// forwarded requests it forges need an honest leader to fool.
	s.evil = newSimNode(s.c.add("zz-evil"))
	s.evil.seeds = []string{s.nodes[0].gossipAddr()}
	s.nodes = append(s.nodes, s.evil)
	s.evil.start()
	poll.Eventually(t, 30*time.Second, "every node registered, the hostile one too", func() error {
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
	// A failing run says how to run it again. The seed fixes the steps
	// drawn; timing may still make a rerun differ in its details.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		strict := ""
		if len(s.strict) > 0 {
			strict = "WGMESH_SAFETY_STRICT=" + strings.Join(slices.Sorted(maps.Keys(s.strict)), ",") + " "
		}
		t.Logf("seed %d failed after %d steps:\n  %s", seed, len(s.history), strings.Join(s.history, "\n  "))
		t.Logf("to run it again: %sWGMESH_SOAK_SEED=%d WGMESH_SOAK_STEPS=%d go test -count=1 -run 'TestSafetyRandomized' -v ./mesh/",
			strict, seed, len(s.history))
	})
	start := time.Now()
	for i := range steps {
		s.history = append(s.history, fmt.Sprintf("step %d: (running)", i))
		what := s.step()
		s.history[i] = fmt.Sprintf("step %d: %s", i, what)
		if testing.Verbose() {
			t.Logf("step %d: %s", i, what)
		}
		s.check(fmt.Sprintf("step %d (%s)", i, what))
	}
	// Heal, bring everyone back, and check once the dust settled.
	s.c.net.heal()
	for _, n := range s.nodes {
		if n.gone && !n.forgotten && n != s.evil && !errors.Is(n.exitErr, ErrRefused) {
			s.reseed(n)
			n.start()
			n.gone = false
		}
	}
	time.Sleep(3 * time.Second)
	s.check("the final heal")
	s.recover("the final heal")
	// The impostor step once more, on the recovered cluster: at random
	// it is rare, and what it guards (Raft's dial checking identities)
	// must be tried on every seed. After the random steps, so that it
	// changes none of them.
	what := s.impostor()
	s.history = append(s.history, "after the recovery: "+what)
	if testing.Verbose() {
		t.Log("after the recovery: " + what)
	}
	s.check("the impostor step after the recovery (" + what + ")")
	s.recover("the impostor step")
	var kinds []string
	faults := 0
	for _, k := range slices.Sorted(maps.Keys(s.counts)) {
		kinds = append(kinds, fmt.Sprintf("%s %d", k, s.counts[k]))
		switch k {
		case "crash", "disk-loss", "leave", "partition", "duplicate-name", "hostile", "contested",
			"hostile-forward", "hostile-forget", "hostile-delete", "rollback", "snapshot-crash", "majority-power-cut", "impostor":
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
// recover waits until the cluster works again after what happened: a
// leader, and every replica at its index. A crash that lost what a node
// had acknowledged (an unsynced log) can leave it with neither.
func (s *safety) recover(after string) {
	s.t.Helper()
	const recoverWithin = 60 * time.Second
	t := s.t
	// Healed and all back, the cluster must work again: a leader, and
	// every replica at its index. A crash that lost what a node had
	// acknowledged (an unsynced log) can leave it with neither.
	deadline := time.Now().Add(recoverWithin)
	for {
		// The catalog's index counts commands only, not Raft's
		// configuration entries: compare it with the leader's.
		leader, _, ok := s.honestLeader()
		err := fmt.Errorf("no leader")
		if ok {
			err = nil
			want := leader.m.node.FSM().Index()
			for _, n := range s.running() {
				if i := n.m.node.FSM().Index(); !n.rolledBack && i < want {
					st := n.m.node.Status()
					err = fmt.Errorf("%s applied %d of the leader's %d (%s, leader %q, registered %v, commit %d, problem %q)",
						n.name, i, want, st.State, st.Leader, st.Registered, st.CommitIndex, st.Problem)
				}
			}
		}
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s after %s, the cluster has not recovered: %v", recoverWithin, after, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	s.check("the recovery after " + after)
}

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

func (s *safety) byName(name string) *simNode {
	for _, n := range s.nodes {
		if n.name == name {
			return n
		}
	}
	return nil
}

// reachable lists the running honest nodes on the main side of a
// partition.
func (s *safety) reachable() []*simNode {
	s.c.net.mu.Lock()
	defer s.c.net.mu.Unlock()
	var out []*simNode
	for _, n := range s.running() {
		if s.c.net.side[n.name] == 0 && !n.rolledBack {
			out = append(out, n)
		}
	}
	return out
}

// voters lists the running honest voters of the leader's configuration,
// and how many voters it has in all.
func (s *safety) voters(st consensus.Status) ([]*simNode, int) {
	var out []*simNode
	all := 0
	for _, srv := range st.Servers {
		if !srv.Voter {
			continue
		}
		all++
		if n := s.byName(srv.Name); n != nil && !n.gone && n != s.evil && !n.rolledBack {
			out = append(out, n)
		}
	}
	return out, all
}

// hostileForward: the hostile member sends the leader, over its own TLS
// identity, a request marked as forwarded for a voter: a leave, which
// would take the voter out of the configuration, or a join at the hostile
// member's address, which would move the voter there.
func (s *safety) hostileForward(run []*simNode) string {
	join := s.rng.IntN(2) == 1
	pick := s.rng.IntN(1 << 20)
	if !s.enabled("hostile-forward") {
		return "evil forwards a request for a voter (off: needs WGMESH_SAFETY_STRICT=1)"
	}
	leader, st, ok := s.honestLeader()
	if !ok {
		return "evil finds no honest leader to send a forwarded request to"
	}
	voters, _ := s.voters(st)
	voters = slices.DeleteFunc(voters, func(n *simNode) bool { return n == leader })
	if len(voters) == 0 {
		return "evil finds no voter but the leader"
	}
	victim := voters[pick%len(voters)]
	req := consensus.RawRequestForTest{Method: "leave", Forwarded: true, For: victim.id.ID()}
	what := "leave"
	if join {
		req = consensus.RawRequestForTest{Method: "join", RaftAddr: s.evil.raftAddr(), Forwarded: true, For: victim.id.ID()}
		what = "join at evil's address"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*safetyTimeout)
	answer, _, err := s.evil.m.node.SendRawForTest(ctx, leader.raftAddr(), req)
	cancel()
	after := leader.m.node.Status()
	found := false
	for _, srv := range after.Servers {
		if srv.Name != victim.name {
			continue
		}
		found = true
		if srv.Address != victim.raftAddr() {
			s.t.Fatalf("evil's forwarded join for voter %s moved it to %s (the leader answered %q, %v)", victim.name, srv.Address, answer, err)
		}
	}
	if !found && after.State == "leader" {
		s.t.Fatalf("evil's forwarded leave for voter %s took it out of the configuration (the leader answered %q, %v)", victim.name, answer, err)
	}
	return fmt.Sprintf("evil forwards a %s for voter %s to leader %s (%q, %v)", what, victim.name, leader.name, answer, err)
}

// impostor: the hostile member answers at the voters' Raft addresses.
// Every voter but the leader is cut off, and every dial of their Raft
// addresses reaches the hostile member's listener instead, as if it had
// taken their addresses (a reused or spoofed IP). Raft's dial must check
// that whoever answers is the server the configuration has there: if it
// does not, the hostile member's Raft acknowledges the leader's appends
// in their name and a claim commits on the leader alone. The leader then
// loses power, and the voters come back, elect one of their own, which
// never saw the claim, and write past its index: "a committed claim was
// lost" in every replica after it.
func (s *safety) impostor() string {
	subnet := safetySubnets[s.rng.IntN(len(safetySubnets))]
	want := randomAddr(s.rng, subnet)
	if !s.enabled("impostor") {
		return "evil answers at the voters' addresses (off: needs WGMESH_SAFETY_STRICT=1)"
	}
	leader, st, ok := s.honestLeader()
	if !ok {
		return "no leader for evil to stand in for its voters"
	}
	redirect := map[string]string{}
	var cut []string
	for _, srv := range st.Servers {
		if tn, ok := s.c.nodes[srv.Name]; ok && srv.Voter && srv.Name != leader.name && srv.Name != s.evil.name {
			s.c.net.setSide(srv.Name, 1)
			redirect[tn.raftAddr()] = s.evil.raftAddr()
			cut = append(cut, srv.Name)
		}
	}
	if len(cut) == 0 {
		return leader.name + " is the only voter: nobody for evil to stand in for"
	}
	s.c.net.setRedirect(redirect)
	// A claim of a block nobody holds, in a network that exists (the
	// hostile member may have deleted one): only a commit gives it.
	subnet, want = unheld(leader.m.View(), subnet, want)
	err := s.allocate(leader, subnet, want)
	claimed := fmt.Sprintf("%s claims %s (%v)", leader.name, want, err)
	powerCut(s.cfs, leader.testNode)
	leader.gone = true
	s.c.net.setRedirect(nil)
	s.c.net.heal()
	// The voters that were cut off elect a leader and write, so that
	// their log passes the claim's index before the old leader is back.
	wrote := "no new leader within 30s"
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		n, _, ok := s.leader()
		if !ok {
			continue
		}
		// A block of its own, outside every block: a write whatever
		// happened to the networks before.
		sn, a := unheld(n.m.View(), subnet, want)
		ctx, cancel := context.WithTimeout(context.Background(), safetyTimeout)
		_, err := n.m.ClaimBlock(ctx, BlockRequest{Subnet: sn, Containing: a})
		cancel()
		if err == nil {
			wrote = n.name + " leads and claimed a block containing " + a.String()
			break
		}
		wrote = fmt.Sprintf("%s leads; its claim: %v", n.name, err)
	}
	s.reseed(leader)
	leader.start()
	leader.gone = false
	return fmt.Sprintf("cut off voters %v, their Raft addresses answered by evil; %s; power cut %s; heal; %s; %s back",
		cut, claimed, leader.name, wrote, leader.name)
}

// unheld is want, or the first address after it, 16 at a time through
// its subnet and then the others, that lies in a network of v and in no
// block of it; want itself if there is none. No random draws: the steps
// after it stay those of the seed.
func unheld(v *View, subnet netip.Prefix, want netip.Addr) (netip.Prefix, netip.Addr) {
	first := slices.Index(safetySubnets, subnet)
	for i := range safetySubnets {
		sn := safetySubnets[(first+i)%len(safetySubnets)]
		if v.Network(sn) == nil || v.Deleted(sn) {
			continue
		}
		size := uint32(1) << (32 - sn.Bits())
		w := want.As4()
		off := (uint32(w[3]) | uint32(w[2])<<8) % size
		for step := uint32(0); step < size; step += 16 {
			a := addrAt(sn, (off+step)%size)
			if last := a.As4()[3]; last == 0 || last == 255 {
				continue
			}
			if _, _, held := v.Owner(sn, a); !held {
				return sn, a
			}
		}
	}
	return subnet, want
}

// hostileCatalog: the hostile member, in its own name and with its own
// boot ID and sequence numbers, forgets a live node or deletes a network
// other nodes hold blocks in.
func (s *safety) hostileCatalog(run []*simNode) string {
	del := s.rng.IntN(2) == 1
	pick := s.rng.IntN(1 << 20)
	subnet := safetySubnets[s.rng.IntN(len(safetySubnets))]
	kind := "hostile-forget"
	if del {
		kind = "hostile-delete"
	}
	if !s.enabled(kind) {
		return kind + " (off: needs WGMESH_SAFETY_STRICT=1)"
	}
	live := s.reachable()
	if len(live) == 0 {
		return "evil finds nobody to forget"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*safetyTimeout)
	defer cancel()
	if !del {
		victim := live[pick%len(live)]
		r, err := s.evil.m.node.Propose(ctx, &catalog.Command{Op: catalog.OpForget, Forget: &catalog.Forget{Name: victim.name}})
		if err == nil && r.Code == catalog.CodeOK {
			s.t.Fatalf("evil, a member, forgot live node %s in its own name, and the catalog applied it", victim.name)
		}
		return fmt.Sprintf("evil forgets live node %s in its own name (%v %v)", victim.name, r.Code, err)
	}
	before := map[netip.Prefix]string{}
	s.evil.m.node.FSM().Read(func(st *catalog.State) {
		if nw, ok := st.Live(subnet); ok {
			maps.Copy(before, nw.Blocks)
		}
	})
	r, err := s.evil.m.node.Propose(ctx, &catalog.Command{Op: catalog.OpDeleteNetwork, Delete: &catalog.DeleteNetwork{Subnet: subnet}})
	if err == nil && r.Code == catalog.CodeOK {
		var lost []string
		s.evil.m.node.FSM().Read(func(st *catalog.State) {
			nw, ok := st.Networks[subnet]
			for b, owner := range before {
				if owner != s.evil.name && (!ok || nw.Blocks[b] != owner) {
					lost = append(lost, fmt.Sprintf("%s of %s", b, owner))
				}
			}
		})
		if len(lost) > 0 {
			slices.Sort(lost)
			s.t.Fatalf("evil, a member, deleted network %s in its own name, and the catalog took other nodes' blocks with it: %v", subnet, lost)
		}
		// Nobody else held a block: a legitimate delete. Bring the network
		// back for the steps to come.
		if _, err := live[0].m.EnsureNetwork(ctx, catalog.EnsureNetwork{Subnet: subnet, BlockBits: 28}); err != nil {
			return fmt.Sprintf("evil deletes %s, which only it used; recreating it: %v", subnet, err)
		}
	}
	return fmt.Sprintf("evil deletes network %s in its own name (%v %v)", subnet, r.Code, err)
}

// rollback restores a voter from a copy of its state directory taken at
// an earlier step, as a VM snapshot would, at the worst moment: the
// entries committed since were committed by it and the leader only (the
// other voters were cut off), and the leader loses power at the same time.
// The first time (per voter) it takes the copy.
func (s *safety) rollback(run []*simNode) string {
	pick := s.rng.IntN(1 << 20)
	subnet := safetySubnets[s.rng.IntN(len(safetySubnets))]
	if !s.enabled("rollback") {
		return "rollback (off: needs WGMESH_SAFETY_STRICT=1)"
	}
	s.c.net.heal()
	leader, st, ok := s.honestLeader()
	if !ok {
		return "heal; no leader, no VM snapshot"
	}
	voters, all := s.voters(st)
	var v *simNode
	for _, n := range voters {
		if s.saved[n.name] != "" && n != leader {
			v = n
		}
	}
	if v == nil {
		if len(voters) == 0 {
			return "heal; no running voter to take a VM snapshot of"
		}
		v = voters[pick%len(voters)]
		img := s.t.TempDir()
		s.cfs.crashImage(s.t, v.dir, img)
		s.saved[v.name] = img
		return "heal; a VM snapshot of voter " + v.name + " is taken"
	}
	// Cut off as many other voters (the hostile member's too) as leave
	// exactly a majority with the leader and v: they alone hold what
	// commits now.
	behind := all - (all/2 + 1)
	var cut []string
	for _, srv := range st.Servers {
		if srv.Voter && srv.Name != leader.name && srv.Name != v.name && len(cut) < behind {
			s.c.net.setSide(srv.Name, 1)
			cut = append(cut, srv.Name)
		}
	}
	// A claim that commits on the leader and v.
	var claimed string
	for _, n := range s.reachable() {
		if n == v {
			continue
		}
		want := randomAddr(s.rng, subnet)
		if err := s.allocate(n, subnet, want); err == nil && n.allocs[subnet][want] {
			claimed = fmt.Sprintf("%s claims %s", n.name, want)
			break
		}
	}
	powerCut(s.cfs, leader.testNode, v.testNode)
	leader.gone = true
	replaceDir(s.t, v.dir, s.saved[v.name])
	delete(s.saved, v.name)
	s.c.net.heal()
	s.reseed(v)
	v.start()
	v.rolledBack = true
	s.counts["crash"]++
	what := fmt.Sprintf("cut off %v; %s; power cut leader %s and voter %s; %s restored from its VM snapshot and restarted",
		cut, claimed, leader.name, v.name, v.name)
	select {
	case err := <-v.done:
		v.done <- err
		v.stop()
		v.gone, v.forgotten = true, true
		what += fmt.Sprintf("; it stopped: %v", err)
	case <-time.After(5 * time.Second):
		what += "; not refused after 5s"
	}
	s.reseed(leader)
	leader.start()
	leader.gone = false
	return what
}

// snapshotCrash: a node that was down while the log moved past a
// snapshot comes back, installs the snapshot, and loses power at once.
func (s *safety) snapshotCrash(run []*simNode) string {
	pick := s.rng.IntN(1 << 20)
	if !s.enabled("snapshot-crash") {
		return "snapshot-crash (off: needs WGMESH_SAFETY_STRICT=1)"
	}
	s.c.net.heal()
	leader, _, ok := s.honestLeader()
	if !ok {
		return "heal; no leader to grow the log"
	}
	others := slices.DeleteFunc(slices.Clone(run), func(n *simNode) bool { return n == leader || n.rolledBack })
	if len(others) == 0 {
		return "heal; nobody but the leader"
	}
	d := others[pick%len(others)]
	before := d.m.node.FSM().Index()
	d.powerCut(s.cfs)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := leader.m.EnsureNetwork(ctx, catalog.EnsureNetwork{Subnet: churnSubnet, BlockBits: 28}); err != nil {
		d.gone = true
		return fmt.Sprintf("heal; power cut %s; the churn network: %v", d.name, err)
	}
	// Past a snapshot (every 64 entries), its trailing 32, and a
	// segment of the log (crashSegmentSize).
	for i := range 150 {
		if _, err := leader.m.ClaimBlock(ctx, BlockRequest{Subnet: churnSubnet}); err != nil {
			d.gone = true
			return fmt.Sprintf("heal; power cut %s; churn claim %d: %v", d.name, i, err)
		}
	}
	// Wait for the leader's snapshot past what d has. Raft tries every
	// second or two, and cannot while the last entry is a configuration
	// change not yet applied: a claim now and then gets it past one.
	snapped := false
	for i := 0; i < 20 && !snapped; i++ {
		time.Sleep(250 * time.Millisecond)
		snapped = snapshotIndex(leader.dir) > before+40
		if !snapped && i%2 == 1 {
			_, _ = leader.m.ClaimBlock(ctx, BlockRequest{Subnet: churnSubnet})
		}
	}
	if !snapped {
		d.gone = true
		return fmt.Sprintf("heal; power cut %s; 150 claims; the leader took no snapshot", d.name)
	}
	// Polled closely: the node saves its catalog copy a moment after a
	// change, and the power must go before it does.
	caughtUp := func(what string) error {
		want := leader.m.node.FSM().Index()
		deadline := time.Now().Add(10 * time.Second)
		for d.m.node.FSM().Index()+5 < want {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: at %d of %d after 10s", what, d.m.node.FSM().Index(), want)
			}
			time.Sleep(time.Millisecond)
		}
		return nil
	}
	s.reseed(d)
	d.start()
	if err := caughtUp("catching up"); err != nil {
		d.stop()
		d.gone = true
		return fmt.Sprintf("heal; power cut %s; 150 claims; it came back: %v", d.name, err)
	}
	// One more entry, so that the leader knows the install succeeded
	// and goes on from after the snapshot; then the power goes, before
	// the node saves its catalog copy.
	_, _ = leader.m.ClaimBlock(ctx, BlockRequest{Subnet: churnSubnet})
	_ = caughtUp("one more entry")
	installed := d.m.node.FSM().Index()
	d.powerCut(s.cfs)
	d.start()
	restarted := d.m.node.FSM().Index()
	err := caughtUp("catching up again")
	// Let it reach the leader's index, where the checker compares them.
	deadline := time.Now().Add(5 * time.Second)
	for err == nil && d.m.node.FSM().Index() != leader.m.node.FSM().Index() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Sprintf("heal; power cut %s at index %d; 150 claims; it came back, caught up to %d (a snapshot install), lost power and came back at %d (%v)",
		d.name, before, installed, restarted, err)
}

// snapshotIndex is the index of the newest Raft snapshot in a node's
// state directory (raft.FileSnapshotStore names them term-index-time).
func snapshotIndex(dir string) uint64 {
	entries, _ := os.ReadDir(dir + "/raft/snapshots")
	var newest uint64
	for _, e := range entries {
		parts := strings.Split(e.Name(), "-")
		if len(parts) != 3 || strings.HasSuffix(e.Name(), ".tmp") {
			continue
		}
		if i, err := strconv.ParseUint(parts[1], 10, 64); err == nil {
			newest = max(newest, i)
		}
	}
	return newest
}

// majorityPowerCut cuts the power of most voters at once, leader
// included, right after a claim, and brings them back: what they
// acknowledged they must still have.
func (s *safety) majorityPowerCut(run []*simNode) string {
	subnet := safetySubnets[s.rng.IntN(len(safetySubnets))]
	pick := s.rng.IntN(1 << 20)
	s.counts["majority-power-cut"]++
	leader, st, ok := s.honestLeader()
	if !ok {
		return "no leader: no power cut of most voters"
	}
	voters, all := s.voters(st)
	need := all/2 + 1
	if len(voters) < need {
		return "too few running voters for a power cut of most"
	}
	victims := []*testNode{leader.testNode}
	names := []string{leader.name}
	for i := range voters {
		n := voters[(pick+i)%len(voters)]
		if n != leader && len(victims) < need {
			victims = append(victims, n.testNode)
			names = append(names, n.name)
		}
	}
	claimer := s.pick(s.reachable())
	want := randomAddr(s.rng, subnet)
	err := errors.New("nobody to allocate")
	name := "nobody"
	if claimer != nil {
		err, name = s.allocate(claimer, subnet, want), claimer.name
	}
	powerCut(s.cfs, victims...)
	for _, tn := range victims {
		n := s.byName(tn.name)
		s.reseed(n)
		n.start()
	}
	return fmt.Sprintf("%s allocates %s (%v); power cut of voters %v at once, all back", name, want, err, names)
}
