package consensus

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"go.uber.org/goleak"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
	"github.com/wgmesh/wgmesh/test/poll"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// raft's NetworkTransport leaves a goroutine blocked in a pooled
		// connection's read until the connection closes, after Close.
		goleak.IgnoreTopFunction("github.com/hashicorp/raft.(*NetworkTransport).listen"),
		goleak.IgnoreAnyFunction("github.com/hashicorp/raft.(*NetworkTransport).handleConn"),
	)
}

// cluster is a set of test nodes on loopback with a membership the test
// controls: which nodes are up, and which can reach which.
type cluster struct {
	t   *testing.T
	key crypto.Keyring

	mu    sync.Mutex
	nodes map[string]*tnode
	// side puts nodes into partitions; nodes on different sides neither
	// see nor reach each other.
	side map[string]int
	// conns are the open connections, by the nodes at their two ends, so
	// that a partition breaks them as a real one would.
	conns []tconn
	// natted nodes are behind NAT: nobody can dial them.
	natted map[string]bool
	// raft, when set, replaces testRaft for nodes started afterwards.
	raft func() *raft.Config
	// cut[from][to] refuses consensus dials from one node to another
	// while gossip still shows both alive (a firewalled port).
	cut map[string]map[string]bool
	// redirect[from][addr] sends a node's dials of addr to another
	// address: someone else answers there.
	redirect map[string]map[string]string
	// hole[a][b]: on connections between a and b, whichever dialled,
	// the dialler's writes larger than this many bytes vanish, as
	// packets do in a path MTU black hole.
	hole map[string]map[string]int
}

type tconn struct {
	from, to string
	c        net.Conn
}

// partition moves node to a side and breaks the connections that now
// cross sides.
func (c *cluster) partition(node string, side int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.side[node] = side
	keep := c.conns[:0]
	for _, tc := range c.conns {
		if c.side[tc.from] != c.side[tc.to] {
			tc.c.Close()
			continue
		}
		keep = append(keep, tc)
	}
	c.conns = keep
}

type tnode struct {
	c     *cluster
	name  string
	id    crypto.Identity
	dir   string
	addr  string
	node  *Node
	stop  context.CancelFunc
	done  chan error
	seeds bool
	// server, serverKey: its --server and server key; claimsKey: it
	// says it holds a server key (true for every node given one).
	server    ServerMode
	serverKey []byte
	claimsKey bool
	// fakeCluster makes a node without a Node (a test's hostile server)
	// look alive in gossip, a member of this cluster.
	fakeCluster string
}

func newCluster(t *testing.T) *cluster {
	k, _ := crypto.GenerateClusterKey()
	kb, _ := crypto.ParseClusterKey(k)
	return &cluster{t: t, key: crypto.Keyring{kb}, nodes: map[string]*tnode{}, side: map[string]int{}, natted: map[string]bool{}}
}

func testRaft() *raft.Config {
	c := DefaultRaftConfig()
	c.HeartbeatTimeout = 300 * time.Millisecond
	c.ElectionTimeout = 300 * time.Millisecond
	c.LeaderLeaseTimeout = 150 * time.Millisecond
	return c
}

// membership is one node's gossip view in the test.
type membership struct {
	c    *cluster
	self string
}

func (m membership) Members() []Member {
	m.c.mu.Lock()
	defer m.c.mu.Unlock()
	var out []Member
	for name, n := range m.c.nodes {
		alive := (n.node != nil || n.fakeCluster != "") && m.c.side[name] == m.c.side[m.self]
		mem := Member{Name: name, ID: n.id.ID(), RaftAddr: n.addr, Alive: alive, Self: name == m.self, BehindNAT: m.c.natted[name],
			Server: cmp.Or(n.server, ServerAuto), ClaimsServerKey: n.claimsKey || len(n.serverKey) > 0}
		if n.node != nil {
			mem.ClusterID = n.node.ClusterID()
		} else {
			mem.ClusterID = n.fakeCluster
		}
		out = append(out, mem)
	}
	return out
}

func (m membership) MissingSeeds() []string {
	m.c.mu.Lock()
	defer m.c.mu.Unlock()
	if !m.c.nodes[m.self].seeds {
		return nil
	}
	// Every other node is a seed of every node with seeds.
	var missing []string
	for name, n := range m.c.nodes {
		if name != m.self && (n.node == nil || m.c.side[name] != m.c.side[m.self]) {
			missing = append(missing, name)
		}
	}
	return missing
}

func (m membership) Joined() bool {
	m.c.mu.Lock()
	defer m.c.mu.Unlock()
	n := m.c.nodes[m.self]
	if !n.seeds {
		return true
	}
	for name, o := range m.c.nodes {
		if name != m.self && o.node != nil && m.c.side[name] == m.c.side[m.self] {
			return true
		}
	}
	return false
}

// set runs f with the cluster locked: every node's membership reads the
// test nodes' fields.
func (c *cluster) set(f func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	f()
}

// add creates a node (not started).
func (c *cluster) add(name string, seeds bool) *tnode {
	c.t.Helper()
	id, err := crypto.GenerateIdentity()
	if err != nil {
		c.t.Fatal(err)
	}
	n := &tnode{c: c, name: name, id: id, dir: c.t.TempDir(), seeds: seeds}
	c.mu.Lock()
	c.nodes[name] = n
	c.mu.Unlock()
	return n
}

func (c *cluster) raftConfig() *raft.Config {
	if c.raft != nil {
		return c.raft()
	}
	return testRaft()
}

// dial cuts links between partition sides.
func (c *cluster) dial(from string) DialFunc {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		c.mu.Lock()
		to := ""
		for name, n := range c.nodes {
			if n.addr == addr {
				to = name
			}
		}
		blocked := to != "" && (c.side[to] != c.side[from] || c.cut[from][to])
		natted := c.natted[to]
		hole := max(c.hole[from][to], c.hole[to][from])
		if r, ok := c.redirect[from][addr]; ok {
			addr = r
		}
		c.mu.Unlock()
		if blocked {
			return nil, errors.New("partitioned")
		}
		if natted {
			return nil, errors.New("behind NAT")
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err == nil && hole > 0 {
			conn = holeConn{conn, hole}
		}
		if err == nil && to != "" {
			c.mu.Lock()
			c.conns = append(c.conns, tconn{from, to, conn})
			c.mu.Unlock()
		}
		return conn, err
	}
}

func (n *tnode) start() {
	c := n.c
	c.t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		c.t.Fatal(err)
	}
	if n.addr != "" {
		// Restarts keep their address, which the configuration holds.
		l.Close()
		if l, err = net.Listen("tcp", n.addr); err != nil {
			c.t.Fatal(err)
		}
	}
	tlsc, err := crypto.NewClusterTLS(n.id, c.key)
	if err != nil {
		c.t.Fatal(err)
	}
	node, err := New(Config{
		Name: n.name, Identity: n.id, TLS: tlsc, Addr: netip.MustParseAddr("127.0.0.1"), Dir: n.dir,
		Listener: l, Advertise: l.Addr().String(), Dial: c.dial(n.name), Membership: membership{c, n.name},
		Logger: testLogger(c.t, n.name), Raft: c.raftConfig(), StableWait: 300 * time.Millisecond,
		DeadVoterTimeout: 2 * time.Second, DeadNonvoterTimeout: 4 * time.Second, Tick: 50 * time.Millisecond,
		Server: n.server, ServerKey: n.serverKey,
	})
	if err != nil {
		l.Close()
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c.mu.Lock()
	n.addr, n.node, n.stop, n.done = l.Addr().String(), node, cancel, make(chan error, 1)
	c.mu.Unlock()
	go func() { n.done <- node.Run(ctx) }()
	c.t.Cleanup(n.kill)
}

// kill stops the node (its state stays on disk).
func (n *tnode) kill() {
	n.c.mu.Lock()
	node, stop, done := n.node, n.stop, n.done
	n.node = nil
	n.c.mu.Unlock()
	if node == nil {
		return
	}
	stop()
	if err := <-done; err != nil {
		n.c.t.Errorf("%s stopped with %v", n.name, err)
	}
}

func testLogger(t *testing.T, name string) *slog.Logger {
	if os.Getenv("WGMESH_TEST_LOG") == "" {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", name)
}

// status is the Status of n's consensus node.
func (n *tnode) status() Status { return n.node.Status() }

func (c *cluster) waitVoters(want int, names ...string) {
	c.t.Helper()
	poll.Eventually(c.t, 30*time.Second, fmt.Sprintf("%d voters", want), func() error {
		for _, name := range names {
			st := c.nodes[name].status()
			v := 0
			for _, s := range st.Servers {
				if s.Voter {
					v++
				}
			}
			if v != want || st.Leader == "" || !st.Registered {
				return fmt.Errorf("%s: %d voters, leader %q, registered %v, state %s, problem %q", name, v, st.Leader, st.Registered, st.State, st.Problem)
			}
		}
		return nil
	})
}

func claim(ctx context.Context, n *tnode, subnet string) (netip.Prefix, error) {
	r, err := n.node.Propose(ctx, &catalog.Command{Op: catalog.OpClaim, Claim: &catalog.Claim{Subnet: netip.MustParsePrefix(subnet)}})
	if err != nil {
		return netip.Prefix{}, err
	}
	return r.Block, r.Err()
}

func ensure(ctx context.Context, n *tnode, subnet string) error {
	r, err := n.node.Propose(ctx, &catalog.Command{Op: catalog.OpEnsureNetwork, Network: &catalog.EnsureNetwork{Subnet: netip.MustParsePrefix(subnet)}})
	if err != nil {
		return err
	}
	return r.Err()
}

func TestSingleNode(t *testing.T) {
	c := newCluster(t)
	a := c.add("a", false)
	a.start()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := ensure(ctx, a, "10.60.0.0/16"); err != nil {
		t.Fatal(err)
	}
	b1, err := claim(ctx, a, "10.60.0.0/16")
	if err != nil {
		t.Fatal(err)
	}
	// Restart: the state survives, and the node registers a new run.
	a.kill()
	a.start()
	b2, err := claim(ctx, a, "10.60.0.0/16")
	if err != nil {
		t.Fatal(err)
	}
	st := a.node.FSM().State()
	if blocks := st.Networks[netip.MustParsePrefix("10.60.0.0/16")].BlocksOf("a"); len(blocks) != 2 || b1 == b2 {
		t.Fatalf("after restart: blocks %v (claimed %s then %s)", blocks, b1, b2)
	}
	if gen := st.Nodes["a"].Generation; gen != 2 {
		t.Errorf("generation after one restart: %d", gen)
	}
}

// TestFollowerLearnsCommitAtOnce: a command proposed on a follower
// returns once the follower has applied it, and the leader tells the
// follower of the commit at once, not at its next idle append (every
// CommitTimeout, here far longer than the test).
func TestFollowerLearnsCommitAtOnce(t *testing.T) {
	c := newCluster(t)
	c.raft = func() *raft.Config {
		r := testRaft()
		r.CommitTimeout = time.Hour
		return r
	}
	names := []string{"a", "b", "c"}
	for _, name := range names {
		c.add(name, name != "a").start()
	}
	c.waitVoters(3, names...)
	leader := c.nodes["a"].status().Leader
	var follower *tnode
	for _, name := range names {
		if name != leader {
			follower = c.nodes[name]
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := ensure(ctx, follower, "10.60.0.0/16"); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		block, err := claim(ctx, follower, "10.60.0.0/16")
		if err != nil {
			t.Fatalf("claim on follower %s: %v", follower.name, err)
		}
		if blocks := follower.node.FSM().State().Networks[netip.MustParsePrefix("10.60.0.0/16")].BlocksOf(follower.name); !slices.Contains(blocks, block) {
			t.Fatalf("claim of %s returned before %s applied it: it has %v", block, follower.name, blocks)
		}
	}
}

// TestSimultaneousStart: five nodes that start at once form one cluster,
// with three... then five voters, and claims from all never overlap.
func TestSimultaneousStart(t *testing.T) {
	c := newCluster(t)
	names := []string{"n1", "n2", "n3", "n4", "n5"}
	for _, name := range names {
		c.add(name, true)
	}
	for _, name := range names {
		c.nodes[name].start()
	}
	c.waitVoters(5, names...)
	ids := map[string]bool{}
	for _, name := range names {
		ids[c.nodes[name].node.ClusterID()] = true
	}
	if len(ids) != 1 {
		t.Fatalf("cluster IDs: %v", ids)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ensure(ctx, c.nodes["n3"], "10.60.0.0/16"); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	blocks := make([][]netip.Prefix, len(names))
	errs := make([]error, len(names))
	for i, name := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 4 {
				b, err := claim(ctx, c.nodes[name], "10.60.0.0/16")
				if err != nil {
					errs[i] = err
					return
				}
				blocks[i] = append(blocks[i], b)
			}
		}()
	}
	wg.Wait()
	seen := map[netip.Prefix]string{}
	for i, name := range names {
		if errs[i] != nil {
			t.Fatalf("%s: %v", name, errs[i])
		}
		for _, b := range blocks[i] {
			if other, ok := seen[b]; ok {
				t.Fatalf("block %s given to %s and %s", b, other, name)
			}
			seen[b] = name
		}
	}
	// Every node's replica shows the same owners.
	for _, name := range names {
		n := c.nodes[name]
		poll.Eventually(t, 5*time.Second, name+" replica", func() error {
			nw := n.node.FSM().State().Networks[netip.MustParsePrefix("10.60.0.0/16")]
			if nw == nil || len(nw.Blocks) != len(seen) {
				return fmt.Errorf("has %v", nw)
			}
			for b, owner := range seen {
				if nw.Blocks[b] != owner {
					return fmt.Errorf("block %s: %s, want %s", b, nw.Blocks[b], owner)
				}
			}
			return nil
		})
	}
}

// TestVoterReplaced: a voter that stays dead is replaced by a live node,
// and claims keep working throughout.
func TestVoterReplaced(t *testing.T) {
	c := newCluster(t)
	names := []string{"a", "b", "c", "d"}
	for _, name := range names {
		c.add(name, name != "a").start()
	}
	c.waitVoters(3, names...)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := ensure(ctx, c.nodes["a"], "10.60.0.0/16"); err != nil {
		t.Fatal(err)
	}
	// Kill a voter that is not the leader.
	var victim string
	for _, s := range c.nodes["a"].status().Servers {
		if s.Voter && s.Name != c.nodes["a"].status().Leader {
			victim = s.Name
			break
		}
	}
	c.nodes[victim].kill()
	var alive []string
	for _, name := range names {
		if name != victim {
			alive = append(alive, name)
		}
	}
	if _, err := claim(ctx, c.nodes[alive[0]], "10.60.0.0/16"); err != nil {
		t.Fatalf("claim with a voter down: %v", err)
	}
	c.waitVoters(3, alive...)
	poll.Eventually(t, 20*time.Second, "dead voter removed", func() error {
		for _, s := range c.nodes[alive[0]].status().Servers {
			if s.Name == victim && s.Voter {
				return fmt.Errorf("%s is still a voter", victim)
			}
		}
		return nil
	})
	// It comes back as a non-voter and catches up.
	c.nodes[victim].start()
	poll.Eventually(t, 20*time.Second, "returning node registered", func() error {
		if st := c.nodes[victim].status(); !st.Registered || st.Problem != "" {
			return fmt.Errorf("%+v", st)
		}
		return nil
	})
	if _, err := claim(ctx, c.nodes[victim], "10.60.0.0/16"); err != nil {
		t.Fatal(err)
	}
}

// TestNameTakenAndRolledBack: a second node with a taken name is refused
// with both addresses; a node started from an older copy of its state
// directory is refused and stops voting.
func TestNameTakenAndRolledBack(t *testing.T) {
	c := newCluster(t)
	a, b := c.add("a", false), c.add("b", true)
	a.start()
	b.start()
	c.waitVoters(1, "a", "b")

	impostor := c.add("b-twin", true)
	c.mu.Lock()
	delete(c.nodes, "b-twin")
	impostor.name = "b"
	c.nodes["b-twin-host"] = impostor
	c.mu.Unlock()
	impostor.start()
	poll.Eventually(t, 10*time.Second, "impostor refused", func() error {
		st := impostor.status()
		if st.State != "refused" || !strings.Contains(st.Problem, "taken") {
			return fmt.Errorf("%+v", st)
		}
		return nil
	})
	impostor.kill()

	// b's state directory is rolled back to a copy taken now.
	b.kill()
	backup := t.TempDir()
	if err := os.CopyFS(backup, os.DirFS(b.dir)); err != nil {
		t.Fatal(err)
	}
	b.start()
	poll.Eventually(t, 10*time.Second, "b registered again", func() error {
		if !b.status().Registered {
			return errors.New("not yet")
		}
		return nil
	})
	b.kill()
	if err := os.RemoveAll(b.dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(backup, b.dir); err != nil {
		t.Fatal(err)
	}
	b.start()
	poll.Eventually(t, 10*time.Second, "rolled-back b refused", func() error {
		st := b.status()
		if st.State != "refused" || !strings.Contains(st.Problem, "older copy") {
			return fmt.Errorf("%+v", st)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if _, err := claim(ctx, b, "10.60.0.0/16"); !errors.Is(err, catalog.ErrRolledBack) {
		t.Errorf("claim of a rolled-back node: %v", err)
	}
}

// TestRaftOnlyFromVoters: a member with the cluster's credentials that is
// not a voter cannot send Raft requests to anyone.
func TestRaftOnlyFromVoters(t *testing.T) {
	c := newCluster(t)
	a, b, m := c.add("a", false), c.add("b", true), c.add("mallory", true)
	a.start()
	b.start()
	m.start()
	c.waitVoters(1, "a", "b", "mallory")
	for _, target := range []*tnode{a, b} {
		before := target.status().Stats.Refused["raft-not-voter"]
		conn, _, err := m.node.mux.dialStream(context.Background(), target.addr, streamRaft)
		if err == nil {
			// The server closes a refused stream; a read sees that.
			_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = conn.Read(make([]byte, 1))
			conn.Close()
		}
		if err == nil {
			t.Errorf("%s kept a Raft stream from a non-voter open", target.name)
		}
		poll.Eventually(t, 5*time.Second, "refusal counted", func() error {
			if target.status().Stats.Refused["raft-not-voter"] <= before {
				return errors.New("not counted")
			}
			return nil
		})
	}
}

// TestRecover: a cluster that lost two of its three voters for good gets
// going again with `wgmesh recover` on the survivor.
func TestRecover(t *testing.T) {
	c := newCluster(t)
	names := []string{"a", "b", "c"}
	for _, name := range names {
		c.add(name, name != "a").start()
	}
	c.waitVoters(3, names...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ensure(ctx, c.nodes["a"], "10.60.0.0/16"); err != nil {
		t.Fatal(err)
	}
	before, err := claim(ctx, c.nodes["c"], "10.60.0.0/16")
	if err != nil {
		t.Fatal(err)
	}
	c.nodes["a"].kill()
	c.nodes["b"].kill()
	c.mu.Lock()
	delete(c.nodes, "a")
	delete(c.nodes, "b")
	c.mu.Unlock()
	short, cancelShort := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancelShort()
	if _, err := claim(short, c.nodes["c"], "10.60.0.0/16"); err == nil {
		t.Fatal("a claim succeeded without a quorum")
	}
	c.nodes["c"].kill()
	if _, err := Recover(c.nodes["c"].dir, c.nodes["c"].id, nil); err != nil {
		t.Fatal(err)
	}
	c.nodes["c"].start()
	c.waitVoters(1, "c")
	after, err := claim(ctx, c.nodes["c"], "10.60.0.0/16")
	if err != nil {
		t.Fatal(err)
	}
	st := c.nodes["c"].node.FSM().State()
	if owner := st.Networks[netip.MustParsePrefix("10.60.0.0/16")].Blocks[before]; owner != "c" || after == before {
		t.Fatalf("after recovery: %s belongs to %q; new block %s", before, owner, after)
	}
	// New nodes join the recovered cluster.
	d := c.add("d", true)
	d.start()
	c.waitVoters(1, "c", "d")
	if _, err := claim(ctx, d, "10.60.0.0/16"); err != nil {
		t.Fatal(err)
	}
}

// TestPartitionKeepsVoters: a voter cut off (the leader among them) does
// not shrink the voter set while it may come back, and the side with a
// majority of voters keeps claiming.
func TestPartitionKeepsVoters(t *testing.T) {
	c := newCluster(t)
	names := []string{"a", "b", "c"}
	for _, name := range names {
		c.add(name, name != "a").start()
	}
	c.waitVoters(3, names...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ensure(ctx, c.nodes["a"], "10.60.0.0/16"); err != nil {
		t.Fatal(err)
	}
	leader := c.nodes["a"].status().Leader
	var others []string
	for _, name := range names {
		if name != leader {
			others = append(others, name)
		}
	}
	c.partition(leader, 1)
	// Within the dead-voter timeout, the majority elects a leader and
	// claims, and nobody demotes a voter.
	if _, err := claim(ctx, c.nodes[others[0]], "10.60.0.0/16"); err != nil {
		t.Fatalf("majority claim with the old leader cut off: %v", err)
	}
	for _, s := range c.nodes[others[0]].status().Servers {
		if !s.Voter {
			t.Fatalf("voter %s demoted during a partition", s.Name)
		}
	}
	c.partition(leader, 0)
	c.waitVoters(3, names...)
	if _, err := claim(ctx, c.nodes[leader], "10.60.0.0/16"); err != nil {
		t.Fatalf("claim of the old leader after the heal: %v", err)
	}
}

// TestFailingDisk: a node that cannot write its state directory stops
// claiming and says why, and claims again once the disk works.
func TestFailingDisk(t *testing.T) {
	c := newCluster(t)
	a := c.add("a", false)
	a.start()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := ensure(ctx, a, "10.60.0.0/16"); err != nil {
		t.Fatal(err)
	}
	// The copy of the catalog cannot be replaced: its path becomes a
	// non-empty directory (root writes through file permissions).
	path := a.node.catalogPath()
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	if err := os.MkdirAll(path+"/blocked", 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := claim(ctx, a, "10.60.0.0/16"); err != nil {
		t.Fatal(err) // this one commits; then saving the copy fails
	}
	poll.Eventually(t, 10*time.Second, "disk failure noticed", func() error {
		if st := a.status(); !strings.Contains(st.Problem, "cannot be written") {
			return fmt.Errorf("%+v", st)
		}
		return nil
	})
	short, cancelShort := context.WithTimeout(context.Background(), time.Second)
	defer cancelShort()
	if _, err := claim(short, a, "10.60.0.0/16"); !errors.Is(err, ErrDisk) {
		t.Fatalf("claim with a failing disk: %v", err)
	}
	if err := os.RemoveAll(path); err != nil {
		t.Fatal(err)
	}
	poll.Eventually(t, 10*time.Second, "disk works again", func() error {
		_, err := claim(ctx, a, "10.60.0.0/16")
		return err
	})
}

// TestBehindNAT: nodes nobody can dial get the log over connections they
// park at the others, answer the autopilot, claim blocks, and never
// become voters; when the leader dies they follow the new one.
func TestBehindNAT(t *testing.T) {
	c := newCluster(t)
	public := []string{"p1", "p2", "p3"}
	natted := []string{"c1", "c2"}
	for _, name := range public {
		c.add(name, true)
	}
	for _, name := range natted {
		c.add(name, false)
		c.natted[name] = true
	}
	for _, name := range append(slices.Clone(public), natted...) {
		c.nodes[name].start()
	}
	all := append(slices.Clone(public), natted...)
	c.waitVoters(3, all...)
	for _, name := range all {
		for _, s := range c.nodes[name].status().Servers {
			if s.Voter && c.natted[s.Name] {
				t.Fatalf("%s sees %s behind NAT as a voter", name, s.Name)
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := ensure(ctx, c.nodes["c1"], "10.70.0.0/16"); err != nil {
		t.Fatal(err)
	}
	b, err := claim(ctx, c.nodes["c1"], "10.70.0.0/16")
	if err != nil {
		t.Fatal(err)
	}
	hasBlock := func(names ...string) {
		t.Helper()
		for _, name := range names {
			poll.Eventually(t, 10*time.Second, name+" sees c1's block", func() error {
				nw := c.nodes[name].node.FSM().State().Networks[netip.MustParsePrefix("10.70.0.0/16")]
				if nw == nil || nw.Blocks[b] != "c1" {
					return fmt.Errorf("network %+v", nw)
				}
				return nil
			})
		}
	}
	hasBlock("c2", "p2")

	// The leader dies: the others elect another, and the nodes behind NAT
	// follow it (their Raft traffic now comes over connections parked at
	// the new leader).
	leader := c.nodes["p1"].status().Leader
	c.nodes[leader].kill()
	var rest []string
	for _, name := range all {
		if name != leader {
			rest = append(rest, name)
		}
	}
	poll.Eventually(t, 30*time.Second, "a new leader", func() error {
		for _, name := range rest {
			if st := c.nodes[name].status(); st.Leader == "" || st.Leader == leader {
				return fmt.Errorf("%s: leader %q", name, st.Leader)
			}
		}
		return nil
	})
	b, err = claim(ctx, c.nodes["c2"], "10.70.0.0/16")
	if err != nil {
		t.Fatal(err)
	}
	poll.Eventually(t, 10*time.Second, "c1 sees c2's block", func() error {
		nw := c.nodes["c1"].node.FSM().State().Networks[netip.MustParsePrefix("10.70.0.0/16")]
		if nw == nil || nw.Blocks[b] != "c2" {
			return fmt.Errorf("network %+v", nw)
		}
		return nil
	})
}
