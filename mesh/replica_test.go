package mesh

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"net/netip"
	"testing"
)

// randomUpdates produces a history of entries as several writers would
// publish them, with a forget of one node in the middle.
func randomUpdates(rng *rand.Rand) (nodes []NodeInfo, nets []NetworkEntry, forgets []Forget) {
	writers := []string{"a", "b", "c", "d"}
	subnets := []netip.Prefix{pfx("10.60.0.0/16"), pfx("10.61.0.0/24")}
	clock := uint64(0)
	for i, w := range writers {
		clock++
		nodes = append(nodes, NodeInfo{Name: w, Version: clock, PublicKey: testKey(i), Addr: netip.MustParseAddr("192.0.2.7")})
	}
	for range 30 {
		clock++
		w := writers[rng.IntN(len(writers))]
		s := subnets[rng.IntN(len(subnets))]
		b, _ := nthBlock(s, 28, rng.IntN(8))
		e := NetworkEntry{Node: w, Subnet: s, Version: clock, Port: uint16(51820 + rng.IntN(3))}
		switch rng.IntN(3) {
		case 0:
			e.Blocks = []netip.Prefix{b}
		case 1:
			e.Claims = []Claim{{b, clock}}
		case 2:
			e.Reserved = []netip.Addr{b.Addr().Next()}
		}
		nets = append(nets, e)
		if clock == 20 {
			forgets = append(forgets, Forget{Node: "d", Version: 15})
		}
	}
	return nodes, nets, forgets
}

// TestMergeOrderIndependent: replicas that receive the same entries in
// any order end in the same state.
func TestMergeOrderIndependent(t *testing.T) {
	for seed := range uint64(50) {
		rng := rand.New(rand.NewPCG(seed, 1))
		nodes, nets, forgets := randomUpdates(rng)
		var want []byte
		for trial := range 5 {
			r := newReplica("observer")
			type op func()
			var ops []op
			for _, n := range nodes {
				ops = append(ops, func() { r.mergeNode(n) })
			}
			for _, e := range nets {
				ops = append(ops, func() { r.mergeNet(e) })
			}
			for _, f := range forgets {
				ops = append(ops, func() { r.mergeForget(f) })
			}
			rng.Shuffle(len(ops), func(i, j int) { ops[i], ops[j] = ops[j], ops[i] })
			for _, o := range ops {
				o()
			}
			got, _ := json.Marshal(r.snapshot())
			if trial == 0 {
				want = got
			} else if !bytes.Equal(got, want) {
				t.Fatalf("seed %d: order changed the result:\n%s\n%s", seed, want, got)
			}
		}
	}
}

func TestForgetVoidsOlderEntries(t *testing.T) {
	r := newReplica("a")
	r.mergeNode(NodeInfo{Name: "d", Version: 3, PublicKey: testKey(1), Addr: netip.MustParseAddr("192.0.2.9")})
	r.mergeNet(NetworkEntry{Node: "d", Subnet: subnet, Version: 5, Blocks: []netip.Prefix{pfx("10.60.9.0/24")}})
	if !r.mergeForget(Forget{Node: "d", Version: 5}) {
		t.Fatal("forget did not change the state")
	}
	if _, ok := r.nodes["d"]; ok {
		t.Fatal("forgotten node still known")
	}
	if len(r.nets) != 0 {
		t.Fatal("forgotten node's entry survived")
	}
	// A late copy of the old entry stays void, a newer one is accepted.
	if r.mergeNet(NetworkEntry{Node: "d", Subnet: subnet, Version: 4}) {
		t.Fatal("old entry resurrected")
	}
	if !r.mergeNet(NetworkEntry{Node: "d", Subnet: subnet, Version: 6}) {
		t.Fatal("newer entry refused")
	}
	if r.mergeForget(Forget{Node: "d", Version: 2}) {
		t.Fatal("an older forget changed the state")
	}
}

// TestAdoptOwnEntry: a node that lost its state file takes back what the
// cluster remembers of it, and outvotes the old copy.
func TestAdoptOwnEntry(t *testing.T) {
	r := newReplica("a")
	old := NetworkEntry{Node: "a", Subnet: subnet, Version: 40, Port: 51820,
		Blocks: []netip.Prefix{pfx("10.60.3.0/24")},
		Claims: []Claim{{pfx("10.60.4.0/24"), 39}}}
	if !r.mergeNet(old) {
		t.Fatal("own entry not adopted")
	}
	got := r.own(subnet)
	if got.Version <= 40 || len(got.Blocks) != 1 || len(got.Claims) != 0 {
		t.Fatalf("adopted %+v", got)
	}
	if !r.republish[got.key()] {
		t.Fatal("adopted entry not marked for republishing")
	}
	if r.clock < got.Version {
		t.Fatal("clock behind own entry")
	}
	if !r.lostState {
		t.Fatal("adopting an own entry did not flag lost state")
	}
}

func TestNodeInfoSelfIsNeverOverwritten(t *testing.T) {
	r := newReplica("a")
	mine := r.setSelf(NodeInfo{PublicKey: testKey(1), Addr: netip.MustParseAddr("192.0.2.1")})
	r.mergeNode(NodeInfo{Name: "a", Version: mine.Version + 10, PublicKey: testKey(9), Addr: netip.MustParseAddr("192.0.2.2")})
	if r.nodes["a"].PublicKey != testKey(1) {
		t.Fatal("own key replaced by a peer's copy")
	}
	if !r.selfInfoStale {
		t.Fatal("newer copy of own info did not mark it for republishing")
	}
	if again := r.setSelf(NodeInfo{PublicKey: testKey(1), Addr: netip.MustParseAddr("192.0.2.1")}); again.Version <= mine.Version+10 {
		t.Fatalf("republished version %d does not beat the peer's copy %d", again.Version, mine.Version+10)
	}
}

func TestViewSpec(t *testing.T) {
	created := &NetworkSpec{Version: 5, Name: "app", Options: map[string]string{"com.docker.network.driver.mtu": "1300"}}
	recreated := &NetworkSpec{Version: 9, Name: "app2"}
	removed := &NetworkSpec{Version: 7, Name: "app", Deleted: true}
	v := viewOf("a", []string{"a", "b", "c"},
		NetworkEntry{Node: "a", Subnet: subnet, Spec: created, Endpoints: 2},
		NetworkEntry{Node: "b", Subnet: subnet, Spec: removed},
		NetworkEntry{Node: "mallory", Subnet: subnet, Spec: &NetworkSpec{Version: 99, Name: "evil"}},
	)
	if s, node := v.Spec(subnet); s == nil || !s.Deleted || node != "b" {
		t.Fatalf("newest spec: %+v from %s, want b's removal (mallory is no member)", s, node)
	}
	if u := v.Users(subnet); len(u) != 1 || u["a"] != 2 {
		t.Fatalf("users: %v", u)
	}
	v = viewOf("a", []string{"a", "b", "c"},
		NetworkEntry{Node: "a", Subnet: subnet, Spec: created},
		NetworkEntry{Node: "b", Subnet: subnet, Spec: removed},
		NetworkEntry{Node: "c", Subnet: subnet, Spec: recreated},
	)
	if s, node := v.Spec(subnet); s == nil || s.Name != "app2" || node != "c" {
		t.Fatalf("newest spec: %+v from %s, want c's re-creation", s, node)
	}
}

func TestSpecValidation(t *testing.T) {
	for name, s := range map[string]NetworkSpec{
		"no version":      {Name: "x"},
		"bad name":        {Version: 1, Name: "-x"},
		"space in name":   {Version: 1, Name: "a b"},
		"range outside":   {Version: 1, Name: "x", IPRange: pfx("10.61.0.0/24")},
		"gateway outside": {Version: 1, Name: "x", Gateway: netip.MustParseAddr("10.61.0.1")},
		"aux outside":     {Version: 1, Name: "x", Aux: map[string]netip.Addr{"r": netip.MustParseAddr("10.61.0.1")}},
		"empty option":    {Version: 1, Name: "x", Options: map[string]string{"": "v"}},
	} {
		e := NetworkEntry{Node: "a", Subnet: subnet, Version: 1, Spec: &s}
		if err := e.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	ok := NetworkEntry{Node: "a", Subnet: subnet, Version: 1, Spec: &NetworkSpec{Version: 3, Name: "my_net.1-a",
		IPRange: pfx("10.60.128.0/17"), Aux: map[string]netip.Addr{"router": netip.MustParseAddr("10.60.0.2")}}}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
}
