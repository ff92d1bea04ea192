package mesh

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"go.uber.org/goleak"

	"github.com/wgmesh/wgmesh/crypto"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// partition decides which addresses can reach each other.
type partition struct {
	mu    sync.Mutex
	group map[string]int // address -> side; absent means side 0
}

func (p *partition) cut(a, b string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.group[a] != p.group[b]
}

func (p *partition) set(addr string, side int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.group[addr] = side
}

func (p *partition) heal() {
	p.mu.Lock()
	defer p.mu.Unlock()
	clear(p.group)
}

// cutTransport drops traffic across the partition, like a failed link.
// It wraps memberlist's real UDP/TCP transport on loopback rather than
// MockNetwork: the mock delivers over unbuffered channels, and two nodes
// answering each other's probes at the same moment block forever, which
// real datagrams never do.
type cutTransport struct {
	memberlist.NodeAwareTransport
	self string
	p    *partition
}

var errCut = errors.New("network partitioned")

func (t *cutTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	if t.p.cut(t.self, addr) {
		return time.Now(), nil
	}
	return t.NodeAwareTransport.WriteTo(b, addr)
}

func (t *cutTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	if t.p.cut(t.self, a.Addr) {
		return time.Now(), nil
	}
	return t.NodeAwareTransport.WriteToAddress(b, a)
}

func (t *cutTransport) DialTimeout(addr string, d time.Duration) (net.Conn, error) {
	if t.p.cut(t.self, addr) {
		return nil, errCut
	}
	return t.NodeAwareTransport.DialTimeout(addr, d)
}

func (t *cutTransport) DialAddressTimeout(a memberlist.Address, d time.Duration) (net.Conn, error) {
	if t.p.cut(t.self, a.Addr) {
		return nil, errCut
	}
	return t.NodeAwareTransport.DialAddressTimeout(a, d)
}

// cluster is a set of meshes over one mock network.
type cluster struct {
	t       *testing.T
	part    *partition
	nodes   []*testNode
	keyring crypto.Keyring
	dir     string
}

type testNode struct {
	m      *Mesh
	addr   string
	cancel context.CancelFunc
	done   chan error
}

func newCluster(t *testing.T) *cluster {
	key, _ := crypto.GenerateClusterKey()
	k, _ := crypto.ParseClusterKey(key)
	return &cluster{t: t, part: &partition{group: map[string]int{}}, keyring: crypto.Keyring{k}, dir: t.TempDir()}
}

func fastMemberlist() *memberlist.Config {
	c := memberlist.DefaultLocalConfig()
	c.ProbeInterval = 100 * time.Millisecond
	c.ProbeTimeout = 50 * time.Millisecond
	c.SuspicionMult = 2
	c.GossipInterval = 20 * time.Millisecond
	c.PushPullInterval = time.Second
	c.GossipToTheDeadTime = time.Second
	c.TCPTimeout = 500 * time.Millisecond
	return c
}

// add creates and starts a node; seeds are the first node unless it is
// the first.
func (c *cluster) add(name string, mutate ...func(*Config)) *testNode {
	c.t.Helper()
	logger := slog.New(slog.NewTextHandler(testWriter{c.t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	tr, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
		BindAddrs: []string{"127.0.0.1"},
		Logger:    newStdLogger(logger),
	})
	if err != nil {
		c.t.Fatal(err)
	}
	p := tr.GetAutoBindPort()
	host, port := "127.0.0.1", strconv.Itoa(p)
	cfg := DefaultConfig()
	cfg.Name = name
	cfg.BindAddr = host
	cfg.BindPort = p
	cfg.AdvertiseAddr = host
	cfg.PublicKey = testKey(len(c.nodes))
	cfg.WGMode = "userspace"
	cfg.Keyring = c.keyring
	cfg.Memberlist = fastMemberlist()
	cfg.Transport = &cutTransport{NodeAwareTransport: tr, self: net.JoinHostPort(host, port), p: c.part}
	cfg.ReconnectInterval = 200 * time.Millisecond
	cfg.StatePath = filepath.Join(c.dir, name+".json")
	cfg.Logger = logger
	if len(c.nodes) > 0 {
		cfg.Join = []string{c.nodes[0].addr}
	}
	for _, f := range mutate {
		f(&cfg)
	}
	m, err := New(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	n := &testNode{m: m, addr: net.JoinHostPort(host, port), done: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	go func() { n.done <- m.Run(ctx) }()
	c.nodes = append(c.nodes, n)
	c.t.Cleanup(n.stop)
	return n
}

func (n *testNode) stop() {
	if n.cancel == nil {
		return
	}
	n.cancel()
	<-n.done
	n.cancel = nil
}

// testWriter sends logs to t.Log, so they show only for failing tests.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p[:len(p)-1]))
	return len(p), nil
}

// eventually retries cond until it returns nil or the deadline passes.
func eventually(t *testing.T, d time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met after %v: %v", d, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func claim(ctx context.Context, n *testNode) (netip.Prefix, error) {
	return n.m.ClaimBlock(ctx, BlockRequest{Subnet: subnet, Bits: 24})
}

func TestClusterClaimsAndPeers(t *testing.T) {
	c := newCluster(t)
	a, b, d := c.add("a"), c.add("b"), c.add("c")
	eventually(t, 5*time.Second, func() error {
		for _, n := range c.nodes {
			if got := len(n.m.View().Members); got != 3 {
				return fmt.Errorf("%s knows %d members", n.m.Name(), got)
			}
		}
		return nil
	})

	// All three create the network at once and claim concurrently.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	blocks := make([]netip.Prefix, 3)
	var wg sync.WaitGroup
	for i, n := range []*testNode{a, b, d} {
		if err := n.m.Attach(subnet, uint16(51820+i), nil); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if blocks[i], err = claim(ctx, n); err != nil {
				t.Errorf("%s: %v", n.m.Name(), err)
			}
		}()
	}
	wg.Wait()
	if distinct := slices.Compact(slices.SortedFunc(slices.Values(blocks), comparePrefix)); len(distinct) != 3 {
		t.Fatalf("blocks not distinct: %v", blocks)
	}

	// Every node sees the other two as WireGuard peers with their blocks.
	eventually(t, 5*time.Second, func() error {
		for i, n := range c.nodes {
			peers := n.m.View().Peers(subnet)
			if len(peers) != 2 {
				return fmt.Errorf("%s has %d peers", n.m.Name(), len(peers))
			}
			for _, p := range peers {
				j := slices.IndexFunc(c.nodes, func(o *testNode) bool { return o.m.Name() == p.Node })
				if j == i || len(p.AllowedIPs) != 1 || p.AllowedIPs[0] != blocks[j] || p.Endpoint.Port() != uint16(51820+j) || p.PublicKey != testKey(j) {
					return fmt.Errorf("%s sees peer %+v, want block %s", n.m.Name(), p, blocks[j])
				}
			}
		}
		return nil
	})

	// Detaching drops the node from others' peer lists but keeps its blocks.
	if err := d.m.Attach(subnet, 0, nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, func() error {
		if n := len(a.m.View().Peers(subnet)); n != 1 {
			return fmt.Errorf("a has %d peers after c detached", n)
		}
		return nil
	})
	if owner, _, _ := a.m.View().Owner(subnet, blocks[2].Addr()); owner != "c" {
		t.Fatalf("owner of c's block is %q", owner)
	}
}

func TestPartitionMinorityCannotClaim(t *testing.T) {
	c := newCluster(t)
	for _, name := range []string{"a", "b", "c", "d", "e"} {
		c.add(name)
	}
	eventually(t, 5*time.Second, func() error {
		for _, n := range c.nodes {
			if got := len(n.m.View().Members); got != 5 {
				return fmt.Errorf("%s knows %d members", n.m.Name(), got)
			}
		}
		return nil
	})
	for _, n := range c.nodes[3:] {
		c.part.set(n.addr, 1)
	}
	// Wait until each side sees the other as failed.
	eventually(t, 10*time.Second, func() error {
		v := c.nodes[0].m.View()
		if s := v.Members["e"].State; s.Reachable() {
			return fmt.Errorf("a still sees e as %s", s)
		}
		return nil
	})

	// The majority side claims; the minority side cannot.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := claim(ctx, c.nodes[0])
	if err != nil {
		t.Fatalf("majority claim: %v", err)
	}
	short, cancel2 := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel2()
	_, err = c.nodes[4].m.ClaimBlock(short, BlockRequest{Subnet: subnet, Bits: 24, Containing: got.Addr()})
	if !errors.Is(err, ErrNoQuorum) && !errors.Is(err, ErrBlockTaken) {
		t.Fatalf("minority claim of the same block: err = %v, want no quorum", err)
	}
	_, err = c.nodes[4].m.ClaimBlock(short, BlockRequest{Subnet: subnet, Bits: 24})
	if !errors.Is(err, ErrNoQuorum) && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("minority claim: err = %v, want no quorum", err)
	}

	// Heal: both sides reconverge, with no conflicts and the block where it was.
	c.part.heal()
	eventually(t, 15*time.Second, func() error {
		for _, n := range c.nodes {
			v := n.m.View()
			for name, m := range v.Members {
				if !m.State.Reachable() {
					return fmt.Errorf("%s sees %s as %s", n.m.Name(), name, m.State)
				}
			}
			if owner, _, _ := v.Owner(subnet, got.Addr()); owner != "a" {
				return fmt.Errorf("%s sees owner %q for %s", n.m.Name(), owner, got)
			}
			if cs := v.Conflicts(); len(cs) > 0 {
				return fmt.Errorf("conflicts: %+v", cs)
			}
		}
		return nil
	})
	// After the heal the former minority can claim again.
	if _, err := claim(ctx, c.nodes[4]); err != nil {
		t.Fatalf("claim after heal: %v", err)
	}
}

func TestForget(t *testing.T) {
	c := newCluster(t)
	a, b := c.add("a"), c.add("b")
	eventually(t, 5*time.Second, func() error {
		if len(a.m.View().Members) != 2 {
			return errors.New("not joined")
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.m.Attach(subnet, 51820, nil); err != nil {
		t.Fatal(err)
	}
	held, err := claim(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.m.Forget("b"); !errors.Is(err, ErrAlive) {
		t.Fatalf("forgetting a live node: err = %v", err)
	}
	if err := a.m.Forget("nobody"); err == nil {
		t.Fatal("forgetting an unknown node succeeded")
	}

	b.stop()
	eventually(t, 5*time.Second, func() error {
		if s := a.m.View().Members["b"].State; s.Reachable() {
			return fmt.Errorf("b is %s", s)
		}
		return nil
	})
	// With b gone, a alone is not a majority of two.
	short, cancel2 := context.WithTimeout(context.Background(), time.Second)
	defer cancel2()
	if _, err := claim(short, a); !errors.Is(err, ErrNoQuorum) {
		t.Fatalf("claim with half the cluster down: err = %v", err)
	}
	if err := a.m.Forget("b"); err != nil {
		t.Fatal(err)
	}
	v := a.m.View()
	if _, ok := v.Members["b"]; ok {
		t.Fatal("b still a member after forget")
	}
	// The forgotten node's block is free again, and a is now its own quorum.
	got, err := a.m.ClaimBlock(ctx, BlockRequest{Subnet: subnet, Bits: 24, Containing: held.Addr()})
	if err != nil || got != held {
		t.Fatalf("reclaiming %s: %s, %v", held, got, err)
	}
}

func TestWrongKeyCannotJoinOrInject(t *testing.T) {
	c := newCluster(t)
	a := c.add("a")
	other, _ := crypto.GenerateClusterKey()
	wrong, _ := crypto.ParseClusterKey(other)
	mallory := c.add("mallory", func(cfg *Config) { cfg.Keyring = crypto.Keyring{wrong} })
	// Mallory tries to publish a claim on a block and an attachment.
	_ = mallory.m.Attach(subnet, 51820, nil)
	time.Sleep(1500 * time.Millisecond)
	v := a.m.View()
	if len(v.Members) != 1 {
		t.Fatalf("a knows %d members, want itself only", len(v.Members))
	}
	if len(v.Networks[subnet]) != 0 {
		t.Fatalf("a accepted state from a node without the key: %+v", v.Networks[subnet])
	}
	if got := len(a.m.memberlist().Members()); got != 1 {
		t.Fatalf("memberlist on a has %d members", got)
	}
	// A clear-text node cannot join an encrypted cluster either.
	c.add("plain", func(cfg *Config) { cfg.Keyring = nil })
	time.Sleep(time.Second)
	if got := len(a.m.memberlist().Members()); got != 1 {
		t.Fatalf("unencrypted node joined: %d members", got)
	}
}

func TestStateSurvivesRestart(t *testing.T) {
	c := newCluster(t)
	a := c.add("a")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.m.Attach(subnet, 51820, []netip.Addr{netip.MustParseAddr("10.60.0.2")}); err != nil {
		t.Fatal(err)
	}
	held, err := claim(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	a.stop()
	st, err := os.Stat(filepath.Join(c.dir, "a.json"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("state file: %v, mode %v", err, st.Mode())
	}

	again, err := New(a.m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	v := again.View()
	if got := v.OwnBlocks(subnet); len(got) != 1 || got[0] != held {
		t.Fatalf("blocks after restart: %v, want [%s]", got, held)
	}
	if r := v.Reserved(subnet); len(r) != 1 {
		t.Fatalf("reserved after restart: %v", r)
	}
}

// TestClusterKeyRotation: the three-step rotation keeps every node in the
// cluster, and afterwards the old key gets nobody in.
func TestClusterKeyRotation(t *testing.T) {
	c := newCluster(t)
	for _, name := range []string{"a", "b", "c"} {
		c.add(name)
	}
	allAlive := func() error {
		for _, n := range c.nodes {
			v := n.m.View()
			if len(v.Members) != len(c.nodes) {
				return fmt.Errorf("%s knows %d members", n.m.Name(), len(v.Members))
			}
			for name, m := range v.Members {
				if m.State != Alive {
					return fmt.Errorf("%s sees %s as %s", n.m.Name(), name, m.State)
				}
			}
		}
		return nil
	}
	eventually(t, 5*time.Second, allAlive)

	oldKey := c.keyring[0]
	s, _ := crypto.GenerateClusterKey()
	newKey, _ := crypto.ParseClusterKey(s)
	for _, step := range []crypto.Keyring{{oldKey, newKey}, {newKey, oldKey}, {newKey}} {
		for _, n := range c.nodes {
			if err := n.m.SetKeyring(step); err != nil {
				t.Fatal(err)
			}
		}
		// Gossip keeps flowing: members stay alive over a few probe rounds.
		time.Sleep(500 * time.Millisecond)
		eventually(t, 5*time.Second, allAlive)
	}
	// A claim needs the others' promises: gossip really works on the new key.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := claim(ctx, c.nodes[0]); err != nil {
		t.Fatalf("claim after rotation: %v", err)
	}
	c.add("stale", func(cfg *Config) { cfg.Keyring = crypto.Keyring{oldKey} })
	time.Sleep(1500 * time.Millisecond)
	if got := len(c.nodes[0].m.memberlist().Members()); got != 3 {
		t.Fatalf("a node with the retired key got in: %d members", got)
	}
}

// TestNonMemberStateIsIgnored: an entry about a node that is not a member
// (no node information, as gossip would have delivered for a member)
// yields no WireGuard peer, no block and no vote.
func TestNonMemberStateIsIgnored(t *testing.T) {
	c := newCluster(t)
	a := c.add("a")
	d := &delegate{a.m}
	d.NotifyMsg(encodeNet(NetworkEntry{Node: "mallory", Subnet: subnet, Version: 99, Port: 51820,
		Blocks: []netip.Prefix{pfx("10.60.0.0/17")}, Claims: []Claim{{pfx("10.60.128.0/24"), 1}}}))
	a.m.step()
	v := a.m.View()
	if len(v.Peers(subnet)) != 0 {
		t.Fatalf("a non-member became a WireGuard peer: %+v", v.Peers(subnet))
	}
	if owner, _, ok := v.Owner(subnet, netip.MustParseAddr("10.60.1.1")); ok {
		t.Fatalf("a non-member owns a block: %s", owner)
	}
	// Its claimed block is free for members, and its vote counts for nothing.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got, err := a.m.ClaimBlock(ctx, BlockRequest{Subnet: subnet, Bits: 24, Containing: netip.MustParseAddr("10.60.1.1")})
	if err != nil || got != pfx("10.60.1.0/24") {
		t.Fatalf("claiming the block a non-member claimed: %s %v", got, err)
	}
}

// newLoneMesh is a Mesh that is never started: state arrives through its
// memberlist delegate, and tests drive its loop with step.
func newLoneMesh(t *testing.T, name, statePath string) *Mesh {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Name, cfg.BindAddr, cfg.AdvertiseAddr = name, "127.0.0.1", "127.0.0.1"
	cfg.PublicKey = testKey(9)
	cfg.StatePath = statePath
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// peerState is what a peer would send in a push/pull to a node "a" it
// has not met before: the members b and c, and the given entries.
func peerState(entries ...NetworkEntry) []byte {
	r := newReplica("b")
	for i, n := range []string{"b", "c"} {
		r.nodes[n] = NodeInfo{Name: n, Version: 1, PublicKey: testKey(i), Addr: netip.MustParseAddr("192.0.2.1")}
	}
	for _, e := range entries {
		e.normalize()
		r.nets[e.key()] = e
	}
	return encodeState(r.snapshot())
}

// TestPromisesSurviveRestart: a voter writes its promise to disk and
// keeps it through a restart, even when a claim that ranks first shows up
// afterwards; otherwise the same block could gather two majorities.
func TestPromisesSurviveRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a.json")
	block := pfx("10.60.7.0/24")
	a := newLoneMesh(t, "a", path)
	(&delegate{a}).MergeRemoteState(peerState(NetworkEntry{Node: "b", Subnet: subnet, Version: 5, Claims: []Claim{{block, 5}}}), false)
	a.step()
	want := []Promise{{block, "b", 5}}
	if got := a.promises[subnet]; !slices.Equal(got, want) {
		t.Fatalf("promises = %v, want %v", got, want)
	}

	again := newLoneMesh(t, "a", path)
	if got := again.promises[subnet]; !slices.Equal(got, want) {
		t.Fatalf("promises after restart = %v, want %v", got, want)
	}
	(&delegate{again}).MergeRemoteState(peerState(
		NetworkEntry{Node: "b", Subnet: subnet, Version: 5, Claims: []Claim{{block, 5}}},
		NetworkEntry{Node: "c", Subnet: subnet, Version: 6, Claims: []Claim{{block, 2}}},
	), false)
	again.step()
	if got := again.promises[subnet]; !slices.Equal(got, want) {
		t.Fatalf("promises after a better claim = %v, want %v", got, want)
	}

	// Once b's claim is settled the promise goes, and c gets the vote.
	(&delegate{again}).MergeRemoteState(peerState(NetworkEntry{Node: "b", Subnet: subnet, Version: 8}), false)
	again.step()
	if got, want := again.promises[subnet], []Promise{{block, "c", 2}}; !slices.Equal(got, want) {
		t.Fatalf("promises after b withdrew = %v, want %v", got, want)
	}
}

// TestLostStateAbstains: a node that finds the cluster knows a newer
// version of it than it does has lost its promises, so it makes no new
// ones for a while.
func TestLostStateAbstains(t *testing.T) {
	a := newLoneMesh(t, "a", "")
	old := peerState(NetworkEntry{Node: "b", Subnet: subnet, Version: 50, Claims: []Claim{{pfx("10.60.7.0/24"), 50}}})
	s, _ := decodeState(old)
	// a published version 40 of itself before it lost its state.
	s.Nodes = append(s.Nodes, NodeInfo{Name: "a", Version: 40, PublicKey: testKey(9), Addr: netip.MustParseAddr("127.0.0.1")})
	(&delegate{a}).MergeRemoteState(encodeState(s), false)
	a.step()
	if got := a.promises[subnet]; len(got) != 0 {
		t.Fatalf("a node that lost its state promised %v", got)
	}
	if until := time.Until(a.abstainUntil); until < lostStateAbstain-time.Second {
		t.Fatalf("abstaining for %v, want %v", until, lostStateAbstain)
	}

	a.mu.Lock()
	a.abstainUntil = time.Now()
	a.mu.Unlock()
	a.step()
	if got := a.promises[subnet]; len(got) != 1 {
		t.Fatalf("promises after abstaining: %v", got)
	}
}

// TestVotesCountOnlyForPendingClaims: a vote arriving for a claim that is
// not pending (withdrawn, or never made) is ignored.
func TestVotesCountOnlyForPendingClaims(t *testing.T) {
	a := newLoneMesh(t, "a", "")
	(&delegate{a}).MergeRemoteState(peerState(), false)
	d := &delegate{a}
	stray := vote{From: "b", Subnet: subnet, Promise: Promise{pfx("10.60.9.0/24"), "a", 3}}
	d.NotifyMsg(encodeVote(stray))
	if len(a.votes) != 0 {
		t.Fatalf("a vote for no claim was recorded: %v", a.votes)
	}
}

// TestNewsIsRelayedOnce: beyond the direct fan-out, entries spread only
// because each node passes on what was news to it, once per version.
func TestNewsIsRelayedOnce(t *testing.T) {
	a := newLoneMesh(t, "a", "")
	d := &delegate{a}
	e := NetworkEntry{Node: "b", Subnet: subnet, Version: 3, Blocks: []netip.Prefix{pfx("10.60.1.0/24")}}
	d.NotifyMsg(encodeNet(e))
	if n := a.queue.NumQueued(); n != 1 {
		t.Fatalf("after news: %d messages queued for relay, want 1", n)
	}
	d.NotifyMsg(encodeNet(e))
	if n := a.queue.NumQueued(); n != 1 {
		t.Fatalf("after old news: %d messages queued, want still 1", n)
	}
	e.Version = 4
	newer := encodeNet(e)
	d.NotifyMsg(newer)
	got := a.queue.GetBroadcasts(0, 4096)
	if len(got) != 1 || !bytes.Equal(got[0], newer) {
		t.Fatalf("relayed %q, want only the newer version %q", got, newer)
	}
}
