package mesh

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/mesh/records"
	"github.com/wgmesh/wgmesh/test/poll"
)

func liveNames(n *testNode) map[string]string {
	out := map[string]string{}
	for _, r := range n.m.LiveNames() {
		out[r.Node+"/"+r.Name] = r.Addr.String()
	}
	return out
}

func waitNames(t *testing.T, d time.Duration, n *testNode, want map[string]string) {
	t.Helper()
	poll.Eventually(t, d, n.name+"'s names", func() error {
		if got := liveNames(n); !mapsEqual(got, want) {
			return fmt.Errorf("%s has names %v, want %v", n.name, got, want)
		}
		return nil
	})
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// TestNamesSpread: names published on one node reach the others, a
// removal takes them away everywhere, an unchanged set sends nothing,
// and a crashed node's names are withdrawn once gossip declares it
// failed, and come back with it.
func TestNamesSpread(t *testing.T) {
	c := newCluster(t)
	names := []string{"a", "b", "c"}
	for _, name := range names {
		c.add(name).start()
	}
	c.waitMembers(20*time.Second, names...)
	a, b, cc := c.nodes["a"], c.nodes["b"], c.nodes["c"]
	web := Name{Subnet: subnet, Endpoint: "aaaaaaaaaaa1", Name: "web", Aliases: []string{"www", "web"}, Addr: netip.MustParseAddr("10.60.0.2")}
	db := Name{Subnet: subnet, Endpoint: "aaaaaaaaaaa2", Name: "db", Addr: netip.MustParseAddr("10.60.0.3")}
	if err := a.m.SetNames([]Name{web, db}); err != nil {
		t.Fatal(err)
	}
	if err := cc.m.SetNames([]Name{{Subnet: subnet, Endpoint: "ccccccccccc1", Name: "cache", Addr: netip.MustParseAddr("10.60.1.2")}}); err != nil {
		t.Fatal(err)
	}
	all := map[string]string{"a/web": "10.60.0.2", "a/db": "10.60.0.3", "c/cache": "10.60.1.2"}
	for _, n := range []*testNode{a, b, cc} {
		waitNames(t, 10*time.Second, n, all)
	}
	if rs := b.m.LiveNames(); !slices.ContainsFunc(rs, func(r NameRecord) bool { return slices.Equal(r.Aliases, []string{"www"}) }) {
		t.Errorf("aliases: %+v", rs)
	}

	versions := func() []uint64 {
		var out []uint64
		for _, r := range a.m.LiveNames() {
			out = append(out, r.Version)
		}
		return out
	}
	before := versions()
	if err := a.m.SetNames([]Name{web, db}); err != nil {
		t.Fatal(err)
	}
	if after := versions(); !slices.Equal(before, after) {
		t.Errorf("publishing the same names again made new versions: %v, then %v", before, after)
	}

	// db goes: a tombstone removes it everywhere.
	if err := a.m.SetNames([]Name{web}); err != nil {
		t.Fatal(err)
	}
	delete(all, "a/db")
	for _, n := range []*testNode{a, b, cc} {
		waitNames(t, 10*time.Second, n, all)
	}
	if st := b.m.NameStats(); st.Tombstones != 1 || st.Known != 2 {
		t.Errorf("b's name stats: %+v", st)
	}

	// c crashes: its names go once it is declared failed.
	cc.crash()
	delete(all, "c/cache")
	for _, n := range []*testNode{a, b} {
		waitNames(t, 20*time.Second, n, all)
	}
	// It restarts with its names, and they come back with it.
	cc.start()
	all["c/cache"] = "10.60.1.2"
	for _, n := range []*testNode{a, b} {
		waitNames(t, 20*time.Second, n, all)
	}
}

// TestNamesAcrossRestartAndRefutation: an agent restart keeps a node's
// names, with no gap, and the node still knows them: what changed while
// it was down is taken back. A stale copy of a removed name that comes
// back through gossip after its tombstone expired is refuted with a new
// tombstone. Tombstones expire.
func TestNamesAcrossRestartAndRefutation(t *testing.T) {
	c := newCluster(t)
	ttl := func(cfg *Config) { cfg.NameTombstoneTTL = time.Second }
	a, b := c.add("a", ttl).start(), c.add("b", ttl).start()
	c.waitMembers(20*time.Second, "a", "b")
	old := Name{Subnet: subnet, Endpoint: "bbbbbbbbbbb1", Name: "old", Addr: netip.MustParseAddr("10.60.2.2")}
	if err := b.m.SetNames([]Name{old}); err != nil {
		t.Fatal(err)
	}
	waitNames(t, 10*time.Second, a, map[string]string{"b/old": "10.60.2.2"})
	b.m.mu.Lock()
	_, stale, _ := b.m.state.rep.Name("b", old.Endpoint)
	b.m.mu.Unlock()

	b.stop()
	b.start()
	if got := liveNames(b); !mapsEqual(got, map[string]string{"b/old": "10.60.2.2"}) {
		t.Fatalf("b's own names after a restart: %v", got)
	}
	c.waitMembers(20*time.Second, "a", "b")
	if got := liveNames(a); !mapsEqual(got, map[string]string{"b/old": "10.60.2.2"}) {
		t.Fatalf("a lost b's names over b's restart: %v", got)
	}
	// The container went while b was down: b's first look says so.
	if err := b.m.SetNames(nil); err != nil {
		t.Fatal(err)
	}
	waitNames(t, 10*time.Second, a, map[string]string{})

	// Once the tombstone expired on b, a stale copy of the record
	// reaches b (as from a member that was away): b refutes it, and a
	// ends up with a tombstone, not the name.
	poll.Eventually(t, 10*time.Second, "b's tombstone expired", func() error {
		if st := b.m.NameStats(); st.Tombstones != 0 {
			return fmt.Errorf("b: %+v", st)
		}
		return nil
	})
	b.m.mu.Lock()
	b.m.mergeNameLocked(stale, time.Now())
	b.m.mu.Unlock()
	// The new tombstone lives a second (ttl): look often enough to see it.
	if err := poll.Every(context.Background(), 20*time.Millisecond, 10*time.Second, "b's new tombstone on a", func() error {
		a.m.mu.Lock()
		defer a.m.mu.Unlock()
		if rec, _, ok := a.m.state.rep.Name("b", old.Endpoint); !ok || !rec.Deleted || rec.Version <= 1<<32 {
			return fmt.Errorf("a holds %+v", rec)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	waitNames(t, time.Second, a, map[string]string{})
	// The tombstone expires everywhere.
	poll.Eventually(t, 10*time.Second, "the tombstones expired", func() error {
		if st := a.m.NameStats(); st.Tombstones != 0 {
			return fmt.Errorf("a: %+v", st)
		}
		if st := b.m.NameStats(); st.Tombstones != 0 {
			return fmt.Errorf("b: %+v", st)
		}
		return nil
	})
}

func sampleName() NameRecord {
	return NameRecord{Node: "host-1", Subnet: netip.MustParsePrefix("10.60.0.0/16"), Endpoint: "0123456789ab", Version: 3<<32 | 7,
		Name: "web", Aliases: []string{"www", "proj-web-1"}, Addr: netip.MustParseAddr("10.60.1.2")}
}

// TestForgedNames: a member cannot publish names in another's name.
func TestForgedNames(t *testing.T) {
	c := newCluster(t)
	for _, name := range []string{"a", "b", "evil"} {
		c.add(name).start()
	}
	c.waitMembers(20*time.Second, "a", "b", "evil")
	evil := c.nodes["evil"]
	forged := sampleName()
	forged.Node = "a"
	forged.Subnet, forged.Addr = subnet, netip.MustParseAddr("10.60.9.9")
	// As it arrives from evil (straight into the delegate: the harness's
	// sendToAll races memberlist's own updates of its nodes).
	msg := records.EncodeNameMsg(records.Sign(evil.id, records.PurposeName, forged))
	for _, name := range []string{"a", "b"} {
		(&delegate{c.nodes[name].m}).NotifyMsg(msg)
	}
	poll.Eventually(t, 10*time.Second, "b refusing the forged name", func() error {
		if st := c.nodes["b"].m.Stats(); st.Refused["name-forged"] == 0 {
			return fmt.Errorf("b refused %v", st.Refused)
		}
		return nil
	})
	if got := liveNames(c.nodes["b"]); len(got) != 0 {
		t.Fatalf("b took forged names: %v", got)
	}
}

// TestSetNamesLimits: invalid names are left out and reported; a record
// too large for one message loses aliases, not the container.
func TestSetNamesLimits(t *testing.T) {
	c := newCluster(t)
	a := c.add("a").start()
	c.waitRegistered(10*time.Second, "a")
	var long []string
	for i := range MaxNames + 4 {
		long = append(long, fmt.Sprintf("%s-%d", strings.Repeat("a", 60), i))
	}
	err := a.m.SetNames([]Name{
		{Subnet: subnet, Endpoint: "aaaaaaaaaaa1", Name: "big", Aliases: long, Addr: netip.MustParseAddr("10.60.0.2")},
		{Subnet: subnet, Endpoint: "aaaaaaaaaaa2", Name: "bad name", Addr: netip.MustParseAddr("10.60.0.3")},
		{Subnet: subnet, Endpoint: "aaaaaaaaaaa3", Name: "ok", Aliases: []string{"bad alias", "fine"}, Addr: netip.MustParseAddr("10.60.0.4")},
	})
	if err == nil || !strings.Contains(err.Error(), "bad name") || !strings.Contains(err.Error(), "container ok: 1 of its names") {
		t.Errorf("error: %v", err)
	}
	got := a.m.LiveNames()
	if len(got) != 2 || got[0].Name != "big" || got[1].Name != "ok" || !slices.Equal(got[1].Aliases, []string{"fine"}) {
		t.Fatalf("names: %+v", got)
	}
	a.m.mu.Lock()
	_, s, _ := a.m.state.rep.Name("a", "aaaaaaaaaaa1")
	a.m.mu.Unlock()
	if n := len(records.EncodeNameMsg(s)); n > maxBroadcast || len(got[0].Aliases) == 0 {
		t.Fatalf("big record: %d bytes, %d aliases", n, len(got[0].Aliases))
	}
}
