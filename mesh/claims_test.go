package mesh

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

var subnet = netip.MustParsePrefix("10.60.0.0/16")

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// viewOf builds a View of known members with the given entries.
func viewOf(self string, members []string, entries ...NetworkEntry) *View {
	r := newReplica(self)
	live := map[string]liveRecord{}
	for i, m := range members {
		r.nodes[m] = NodeInfo{Name: m, Version: 1, PublicKey: testKey(i), Addr: netip.MustParseAddr("192.0.2.1")}
		live[m] = liveRecord{state: Alive}
	}
	for _, e := range entries {
		if e.Version == 0 {
			e.Version = 1
		}
		e.normalize()
		r.nets[e.key()] = e
	}
	return buildView(r, live)
}

func TestDesiredPromises(t *testing.T) {
	abc := []string{"a", "b", "c"}
	tests := []struct {
		name    string
		held    []Promise
		abstain bool
		entries []NetworkEntry
		want    []Promise
	}{
		{
			name: "grant a lone claim",
			entries: []NetworkEntry{
				{Node: "b", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/24"), 5}}},
			},
			want: []Promise{{pfx("10.60.1.0/24"), "b", 5}},
		},
		{
			name: "the lower attempt wins a contested block",
			entries: []NetworkEntry{
				{Node: "b", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/24"), 7}}},
				{Node: "c", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/24"), 6}}},
			},
			want: []Promise{{pfx("10.60.1.0/24"), "c", 6}},
		},
		{
			name: "equal attempts: the lower name wins",
			entries: []NetworkEntry{
				{Node: "c", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/24"), 6}}},
				{Node: "b", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/24"), 6}}},
			},
			want: []Promise{{pfx("10.60.1.0/24"), "b", 6}},
		},
		{
			name: "a promise is kept even when a better claim shows up",
			held: []Promise{{pfx("10.60.1.0/24"), "b", 7}},
			entries: []NetworkEntry{
				{Node: "b", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/24"), 7}}},
				{Node: "c", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/25"), 2}}},
			},
			want: []Promise{{pfx("10.60.1.0/24"), "b", 7}},
		},
		{
			name: "a promise to a withdrawn claim is dropped and the next one granted",
			held: []Promise{{pfx("10.60.1.0/24"), "b", 7}},
			entries: []NetworkEntry{
				{Node: "b", Subnet: subnet},
				{Node: "c", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/24"), 9}}},
			},
			want: []Promise{{pfx("10.60.1.0/24"), "c", 9}},
		},
		{
			name: "a promise to an old attempt does not carry over to a new one",
			held: []Promise{{pfx("10.60.1.0/24"), "b", 7}},
			entries: []NetworkEntry{
				{Node: "b", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/24"), 11}}},
			},
			want: []Promise{{pfx("10.60.1.0/24"), "b", 11}},
		},
		{
			name: "a promise to a committed claim is dropped",
			held: []Promise{{pfx("10.60.1.0/24"), "b", 7}},
			entries: []NetworkEntry{
				{Node: "b", Subnet: subnet, Blocks: []netip.Prefix{pfx("10.60.1.0/24")}},
			},
			want: nil,
		},
		{
			name:    "an abstaining node keeps its promises and makes no new ones",
			held:    []Promise{{pfx("10.60.1.0/24"), "b", 7}},
			abstain: true,
			entries: []NetworkEntry{
				{Node: "b", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/24"), 7}}},
				{Node: "c", Subnet: subnet, Claims: []Claim{{pfx("10.60.2.0/24"), 8}}},
			},
			want: []Promise{{pfx("10.60.1.0/24"), "b", 7}},
		},
		{
			name: "no promise for an owned block",
			entries: []NetworkEntry{
				{Node: "b", Subnet: subnet, Blocks: []netip.Prefix{pfx("10.60.0.0/23")}},
				{Node: "c", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/24"), 3}}},
			},
			want: nil,
		},
		{
			name: "disjoint claims are all granted",
			entries: []NetworkEntry{
				{Node: "b", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/24"), 3}}},
				{Node: "c", Subnet: subnet, Claims: []Claim{{pfx("10.60.2.0/24"), 4}}},
			},
			want: []Promise{{pfx("10.60.1.0/24"), "b", 3}, {pfx("10.60.2.0/24"), "c", 4}},
		},
		{
			name: "claims of unknown nodes are ignored",
			entries: []NetworkEntry{
				{Node: "mallory", Subnet: subnet, Claims: []Claim{{pfx("10.60.1.0/24"), 1}}},
			},
			want: nil,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := viewOf("a", abc, tt.entries...)
			got := desiredPromises(v, subnet, tt.held, !tt.abstain)
			want := slices.SortedFunc(slices.Values(tt.want), comparePromise)
			if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
				t.Errorf("promises (-want +got):\n%s", diff)
			}
		})
	}
}

func TestClaimOutcome(t *testing.T) {
	claim := Claim{pfx("10.60.1.0/24"), 5}
	mine := NetworkEntry{Node: "a", Subnet: subnet, Claims: []Claim{claim}}
	tests := []struct {
		name    string
		members []string
		voters  []string
		entries []NetworkEntry
		want    Outcome
		rival   string
	}{
		{
			name:    "a single node is its own quorum",
			members: []string{"a"},
			voters:  []string{"a"},
			entries: []NetworkEntry{mine},
			want:    Committed,
		},
		{
			name:    "one vote of three is not enough",
			members: []string{"a", "b", "c"},
			voters:  []string{"a"},
			entries: []NetworkEntry{mine},
			want:    Pending,
		},
		{
			name:    "two votes of three commit",
			members: []string{"a", "b", "c"},
			voters:  []string{"a", "c"},
			entries: []NetworkEntry{mine},
			want:    Committed,
		},
		{
			name:    "two votes of four are not a majority",
			members: []string{"a", "b", "c", "d"},
			voters:  []string{"a", "c"},
			entries: []NetworkEntry{mine},
			want:    Pending,
		},
		{
			name:    "votes of non-members do not count",
			members: []string{"a", "b", "c"},
			voters:  []string{"a", "mallory", "eve"},
			entries: []NetworkEntry{mine},
			want:    Pending,
		},
		{
			name:    "lost to an owner",
			members: []string{"a", "b", "c"},
			voters:  []string{"a", "c"},
			entries: []NetworkEntry{mine, {Node: "b", Subnet: subnet, Blocks: []netip.Prefix{pfx("10.60.1.128/25")}}},
			want:    Lost,
			rival:   "b",
		},
		{
			name:    "lost to a claim that ranks first",
			members: []string{"a", "b", "c"},
			entries: []NetworkEntry{mine, {Node: "b", Subnet: subnet, Claims: []Claim{{pfx("10.60.0.0/23"), 4}}}},
			want:    Lost,
			rival:   "b",
		},
		{
			name:    "a quorum wins even against a claim that ranks first",
			members: []string{"a", "b", "c"},
			voters:  []string{"a", "b"},
			entries: []NetworkEntry{mine, {Node: "b", Subnet: subnet, Claims: []Claim{{claim.Block, 4}}}},
			want:    Committed,
		},
		{
			name:    "a rival claim that ranks later does not make it lose",
			members: []string{"a", "b", "c"},
			entries: []NetworkEntry{mine, {Node: "b", Subnet: subnet, Claims: []Claim{{claim.Block, 6}}}},
			want:    Pending,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := viewOf("a", tt.members, tt.entries...)
			voters := map[string]bool{}
			for _, n := range tt.voters {
				voters[n] = true
			}
			got, rival, _ := claimOutcome(v, subnet, claim, voters)
			if got != tt.want || rival != tt.rival {
				t.Fatalf("outcome = %v (rival %q), want %v (rival %q)", got, rival, tt.want, tt.rival)
			}
		})
	}
}

func TestPickBlock(t *testing.T) {
	v := viewOf("a", []string{"a", "b", "c"},
		NetworkEntry{Node: "b", Subnet: subnet, Blocks: []netip.Prefix{pfx("10.60.0.0/17")}, Claims: []Claim{{pfx("10.60.128.0/18"), 1}}},
	)
	promised := []Promise{{pfx("10.60.192.0/19"), "c", 1}}
	pickBlock := func(v *View, req BlockRequest) (netip.Prefix, error) { return pickBlock(v, req, promised) }
	free := map[netip.Prefix]bool{}
	for i := range 32 {
		b, _ := nthBlock(pfx("10.60.224.0/19"), 24, i)
		free[b] = true
	}
	for range 5 {
		b, err := pickBlock(v, BlockRequest{Subnet: subnet, Bits: 24})
		if err != nil {
			t.Fatal(err)
		}
		if !free[b] {
			t.Fatalf("picked %s, which is busy", b)
		}
	}

	// A range narrower than a block becomes the block.
	b, err := pickBlock(v, BlockRequest{Subnet: subnet, Bits: 24, Within: pfx("10.60.250.16/28")})
	if err != nil || b != pfx("10.60.250.16/28") {
		t.Fatalf("within /28: %s, %v", b, err)
	}
	// The block holding a wanted address.
	b, err = pickBlock(v, BlockRequest{Subnet: subnet, Bits: 24, Containing: netip.MustParseAddr("10.60.240.9")})
	if err != nil || b != pfx("10.60.240.0/24") {
		t.Fatalf("containing: %s, %v", b, err)
	}
	_, err = pickBlock(v, BlockRequest{Subnet: subnet, Bits: 24, Containing: netip.MustParseAddr("10.60.3.9")})
	if !errors.Is(err, ErrBlockTaken) || !strings.Contains(err.Error(), "node b") {
		t.Fatalf("taken block: err = %v", err)
	}
	_, err = pickBlock(v, BlockRequest{Subnet: subnet, Bits: 24, Within: pfx("10.60.0.0/17")})
	if !errors.Is(err, ErrNoFreeBlock) {
		t.Fatalf("full range: err = %v", err)
	}
	for _, bad := range []BlockRequest{
		{Subnet: subnet, Bits: 15},
		{Subnet: subnet, Bits: 33},
		{Subnet: pfx("10.0.0.0/8"), Bits: 30},
		{Subnet: subnet, Bits: 24, Within: pfx("10.61.0.0/24")},
		{Subnet: subnet, Bits: 24, Containing: netip.MustParseAddr("10.61.0.1")},
		{Subnet: netip.MustParsePrefix("10.60.0.1/16"), Bits: 24},
	} {
		if _, err := pickBlock(v, bad); err == nil {
			t.Errorf("pickBlock(%+v) succeeded", bad)
		}
	}
}

func TestNthBlock(t *testing.T) {
	tests := []struct {
		p    string
		bits int
		i    int
		want string
	}{
		{"10.60.0.0/16", 24, 0, "10.60.0.0/24"},
		{"10.60.0.0/16", 24, 255, "10.60.255.0/24"},
		{"10.60.0.0/16", 28, 17, "10.60.1.16/28"},
		{"10.255.255.0/24", 26, 3, "10.255.255.192/26"},
		{"fd00::/48", 64, 258, "fd00:0:0:102::/64"},
	}
	for _, tt := range tests {
		got, ok := nthBlock(pfx(tt.p), tt.bits, tt.i)
		if !ok || got.String() != tt.want {
			t.Errorf("nthBlock(%s, /%d, %d) = %s, %v; want %s", tt.p, tt.bits, tt.i, got, ok, tt.want)
		}
	}
	if _, ok := nthBlock(pfx("10.60.0.0/16"), 24, 256); ok {
		t.Error("block 256 of a /16 exists")
	}
}

// TestClaimProtocolSafety runs the claim protocol among simulated nodes
// that see each other's entries and votes in random order, with random
// delays, lost votes and repeated votes, and checks that no block is ever
// owned twice.
func TestClaimProtocolSafety(t *testing.T) {
	for seed := range uint64(40) {
		rng := rand.New(rand.NewPCG(seed, seed))
		names := []string{"a", "b", "c", "d", "e"}
		sim := newClaimSim(names, rng)
		small := pfx("10.60.0.0/22") // four /24 blocks for five nodes
		for step := 0; step < 6000 && !sim.done(); step++ {
			sim.step(small)
			if c := sim.conflicts(small); c != "" {
				t.Fatalf("seed %d step %d: %s", seed, step, c)
			}
		}
		if owned := sim.owned(small); owned != 4 {
			t.Errorf("seed %d: %d of 4 blocks owned at the end", seed, owned)
		}
	}
}

// claimSim is a tiny model of the mesh: each node has a replica, its
// promises and the votes it received; a step lets a node act (vote,
// settle claims, start a claim), delivers one of its entries to one other
// node, or delivers, drops or repeats a vote in flight.
type claimSim struct {
	rng      *rand.Rand
	names    []string
	reps     map[string]*replica
	live     map[string]liveRecord
	promises map[string][]Promise
	votes    map[string]map[Claim]map[string]bool
	inFlight []vote
	want     map[string]bool // still wants a block
}

func newClaimSim(names []string, rng *rand.Rand) *claimSim {
	s := &claimSim{rng: rng, names: names, reps: map[string]*replica{}, live: map[string]liveRecord{},
		promises: map[string][]Promise{}, votes: map[string]map[Claim]map[string]bool{}, want: map[string]bool{}}
	for _, n := range names {
		s.live[n] = liveRecord{state: Alive}
		s.want[n] = true
		s.reps[n] = newReplica(n)
		s.votes[n] = map[Claim]map[string]bool{}
		for j, m := range names {
			s.reps[n].nodes[m] = NodeInfo{Name: m, Version: 1, PublicKey: testKey(j), Addr: netip.MustParseAddr("192.0.2.1")}
		}
	}
	return s
}

func (s *claimSim) done() bool {
	for _, w := range s.want {
		if w {
			return false
		}
	}
	return true
}

// receive is a claimant counting a vote, as Mesh.recordVoteLocked does.
func (s *claimSim) receive(v vote) {
	c := Claim{v.Block, v.Attempt}
	if !slices.Contains(s.reps[v.To].own(v.Subnet).Claims, c) {
		return
	}
	if s.votes[v.To][c] == nil {
		s.votes[v.To][c] = map[string]bool{}
	}
	s.votes[v.To][c][v.From] = true
}

func (s *claimSim) step(sub netip.Prefix) {
	n := s.names[s.rng.IntN(len(s.names))]
	r := s.reps[n]
	switch s.rng.IntN(4) {
	case 0:
		// Deliver n's own entry to a random peer.
		peer := s.names[s.rng.IntN(len(s.names))]
		if e, ok := r.nets[entryKey{n, sub}]; ok && peer != n {
			s.reps[peer].mergeNet(e)
		}
		return
	case 1:
		// Deliver, lose or repeat a vote in flight.
		if len(s.inFlight) == 0 {
			return
		}
		i := s.rng.IntN(len(s.inFlight))
		v := s.inFlight[i]
		if s.rng.IntN(4) != 0 {
			s.inFlight = slices.Delete(s.inFlight, i, i+1)
		}
		if s.rng.IntN(5) != 0 {
			s.receive(v)
		}
		return
	}
	v := buildView(r, s.live)
	s.promises[n] = desiredPromises(v, sub, s.promises[n], true)
	for _, p := range s.promises[n] {
		vt := vote{From: n, Subnet: sub, Promise: p}
		if p.To == n {
			s.receive(vt)
		} else {
			s.inFlight = append(s.inFlight, vt)
		}
	}
	own := r.own(sub)
	var keep []Claim
	for _, c := range own.Claims {
		switch o, _, _ := claimOutcome(v, sub, c, s.votes[n][c]); o {
		case Committed:
			own.Blocks = append(own.Blocks, c.Block)
			s.want[n] = false
		case Pending:
			keep = append(keep, c)
		}
		if !slices.Contains(keep, c) {
			delete(s.votes[n], c)
		}
	}
	own.Claims = keep
	if s.want[n] && len(own.Claims) == 0 {
		if b, err := pickBlock(v, BlockRequest{Subnet: sub, Bits: 24}, s.promises[n]); err == nil {
			own.Claims = append(own.Claims, Claim{b, r.tick()})
		} else {
			s.want[n] = false // the subnet is full
		}
	}
	r.putOwn(own)
}

// conflicts checks ground truth: each node's own entry is what it owns.
func (s *claimSim) conflicts(sub netip.Prefix) string {
	owner := map[netip.Prefix]string{}
	for _, n := range s.names {
		for _, b := range s.reps[n].own(sub).Blocks {
			if o, ok := owner[b]; ok {
				return b.String() + " owned by " + o + " and " + n
			}
			owner[b] = n
		}
	}
	return ""
}

func (s *claimSim) owned(sub netip.Prefix) int {
	n := 0
	for _, name := range s.names {
		n += len(s.reps[name].own(sub).Blocks)
	}
	return n
}
