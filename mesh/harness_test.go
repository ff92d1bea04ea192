package mesh

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
	"go.uber.org/goleak"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/internal/logbridge"
	"github.com/wgmesh/wgmesh/test/poll"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// raft's NetworkTransport leaves goroutines reading pooled
		// connections until their peers close them.
		goleak.IgnoreTopFunction("github.com/hashicorp/raft.(*NetworkTransport).listen"),
		goleak.IgnoreAnyFunction("github.com/hashicorp/raft.(*NetworkTransport).handleConn"),
		// memberlist's Shutdown does not wait for a probe under way,
		// which ends by itself at its timeout.
		goleak.IgnoreAnyFunction("github.com/hashicorp/memberlist.(*Memberlist).probeNode"),
	)
}

// network is the test's network: which node names can reach which. Nodes
// on different sides of a partition neither gossip nor talk consensus;
// a crashed node is unreachable from everywhere.
type network struct {
	mu    sync.Mutex
	side  map[string]int    // node name -> side; absent means 0
	owner map[string]string // "host:port" -> node name
	down  map[string]bool
	// conns are open consensus connections, which a partition or a
	// crash breaks as a real one would.
	conns []netConn
	// redirect sends every dial of an address to another one instead,
	// as if the node there had taken the first's address.
	redirect map[string]string
}

type netConn struct {
	from, to string
	c        net.Conn
	// redirected: dialed while a redirect applied.
	redirected bool
}

// breakLocked closes the connections that may no longer exist.
func (n *network) breakLocked() {
	keep := n.conns[:0]
	for _, nc := range n.conns {
		if n.down[nc.from] || n.down[nc.to] || n.side[nc.from] != n.side[nc.to] {
			nc.c.Close()
			continue
		}
		keep = append(keep, nc)
	}
	n.conns = keep
}

// dial opens a consensus connection from node from, unless it is cut.
func (n *network) dial(ctx context.Context, from, addr string) (net.Conn, error) {
	n.mu.Lock()
	to, redirected := n.redirect[addr]
	n.mu.Unlock()
	if redirected {
		addr = to
	}
	if n.cut(from, addr) {
		return nil, errCut
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	n.conns = append(n.conns, netConn{from, n.owner[addr], c, redirected})
	n.mu.Unlock()
	return c, nil
}

// setRedirect replaces the redirects (nil: none), closing the
// connections the old ones made.
func (n *network) setRedirect(r map[string]string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.redirect = r
	keep := n.conns[:0]
	for _, nc := range n.conns {
		if nc.redirected {
			nc.c.Close()
			continue
		}
		keep = append(keep, nc)
	}
	n.conns = keep
}

func newNetwork() *network {
	return &network{side: map[string]int{}, owner: map[string]string{}, down: map[string]bool{}}
}

func (n *network) cut(from, addr string) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	to, ok := n.owner[addr]
	return !ok || n.down[to] || n.down[from] || n.side[from] != n.side[to]
}

func (n *network) setSide(name string, side int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.side[name] = side
	n.breakLocked()
}

func (n *network) heal() {
	n.mu.Lock()
	defer n.mu.Unlock()
	clear(n.side)
}

var errCut = errors.New("network partitioned")

// cutTransport drops gossip across the partition, like a failed link. It
// wraps memberlist's real UDP/TCP transport on loopback rather than
// MockNetwork: the mock delivers over unbuffered channels, and two nodes
// answering each other's probes at the same moment block forever, which
// real datagrams never do.
type cutTransport struct {
	memberlist.NodeAwareTransport
	self string
	net  *network
}

func (t *cutTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	if t.net.cut(t.self, addr) {
		return time.Now(), nil
	}
	return t.NodeAwareTransport.WriteTo(b, addr)
}

func (t *cutTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	if t.net.cut(t.self, a.Addr) {
		return time.Now(), nil
	}
	return t.NodeAwareTransport.WriteToAddress(b, a)
}

func (t *cutTransport) DialTimeout(addr string, d time.Duration) (net.Conn, error) {
	if t.net.cut(t.self, addr) {
		return nil, errCut
	}
	return t.NodeAwareTransport.DialTimeout(addr, d)
}

func (t *cutTransport) DialAddressTimeout(a memberlist.Address, d time.Duration) (net.Conn, error) {
	if t.net.cut(t.self, a.Addr) {
		return nil, errCut
	}
	return t.NodeAwareTransport.DialAddressTimeout(a, d)
}

// cluster is a set of meshes on loopback.
type cluster struct {
	t       testing.TB
	net     *network
	keyring crypto.Keyring
	nodes   map[string]*testNode
	order   []string
	// logLevel for the nodes' logs, which go to t.Log.
	logLevel slog.Level
	// slow multiplies the nodes' failure-detection and election timeouts
	// (1 if zero). The tests' timeouts are tight for speed; a test that
	// runs many nodes through many faults under the race detector, beside
	// other packages on two cores, needs room, or false suspicions and
	// elections keep it from ever settling.
	slow time.Duration
}

type testNode struct {
	c        *cluster
	name     string
	id       crypto.Identity
	wgKey    crypto.PublicKey
	dir      string
	gossip   int // port
	raft     int // port
	seeds    []string
	m        *Mesh
	cancel   context.CancelFunc
	done     chan error
	mutate   []func(*Config)
	exitErr  error
	stopOnce sync.Once
}

func newCluster(t testing.TB) *cluster {
	key, _ := crypto.GenerateClusterKey()
	k, _ := crypto.ParseClusterKey(key)
	return &cluster{t: t, net: newNetwork(), keyring: crypto.Keyring{k}, nodes: map[string]*testNode{}, logLevel: slog.LevelInfo}
}

func fastMemberlist(slow time.Duration) *memberlist.Config {
	c := memberlist.DefaultLocalConfig()
	c.ProbeInterval = slow * 100 * time.Millisecond
	c.ProbeTimeout = slow * 50 * time.Millisecond
	c.SuspicionMult = 2
	c.GossipInterval = 20 * time.Millisecond
	c.PushPullInterval = time.Second
	c.GossipToTheDeadTime = slow * time.Second
	c.TCPTimeout = slow * 500 * time.Millisecond
	return c
}

func fastRaft(slow time.Duration) *raft.Config {
	c := raft.DefaultConfig()
	c.HeartbeatTimeout = slow * 300 * time.Millisecond
	c.ElectionTimeout = slow * 300 * time.Millisecond
	c.LeaderLeaseTimeout = slow * 150 * time.Millisecond
	c.CommitTimeout = 10 * time.Millisecond
	c.SnapshotThreshold = 64
	c.TrailingLogs = 32
	c.SnapshotInterval = time.Second
	return c
}

// freePort finds a port free for both TCP and UDP on loopback.
func freePort(t testing.TB) int {
	t.Helper()
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		l.Close()
		if err == nil {
			u.Close()
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}

// add creates a node; seeds are the nodes named (by default the first).
func (c *cluster) add(name string, mutate ...func(*Config)) *testNode {
	c.t.Helper()
	id, err := crypto.GenerateIdentity()
	if err != nil {
		c.t.Fatal(err)
	}
	wg, _ := crypto.GeneratePrivateKey()
	n := &testNode{c: c, name: name, id: id, wgKey: wg.Public(), dir: c.t.TempDir(), mutate: mutate}
	n.gossip, n.raft = freePort(c.t), freePort(c.t)
	if len(c.order) > 0 {
		n.seeds = []string{c.nodes[c.order[0]].gossipAddr()}
	}
	c.net.mu.Lock()
	c.net.owner[n.gossipAddr()] = name
	c.net.owner[n.raftAddr()] = name
	c.net.mu.Unlock()
	c.nodes[name] = n
	c.order = append(c.order, name)
	return n
}

func (n *testNode) gossipAddr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(n.gossip)) }
func (n *testNode) raftAddr() string   { return net.JoinHostPort("127.0.0.1", strconv.Itoa(n.raft)) }

// start runs the node's mesh.
func (n *testNode) start() *testNode {
	c := n.c
	c.t.Helper()
	logger := slog.New(slog.NewTextHandler(testWriter{c.t, n.name}, &slog.HandlerOptions{Level: c.logLevel}))
	if os.Getenv("WGMESH_TEST_LOG") == "" {
		logger = slog.New(slog.DiscardHandler)
	}
	tr, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
		BindAddrs: []string{"127.0.0.1"}, BindPort: n.gossip, Logger: logbridge.StdLogger(logger),
	})
	if err != nil {
		c.t.Fatalf("%s: gossip transport: %v", n.name, err)
	}
	l, err := net.Listen("tcp", n.raftAddr())
	if err != nil {
		_ = tr.Shutdown()
		c.t.Fatalf("%s: consensus port: %v", n.name, err)
	}
	cfg := DefaultConfig()
	cfg.Name = n.name
	cfg.Identity = n.id
	cfg.BindAddr = "127.0.0.1"
	cfg.BindPort = n.gossip
	cfg.AdvertiseAddr = "127.0.0.1"
	cfg.PublicKey = n.wgKey
	cfg.WGMode = "userspace"
	cfg.Keyring = c.keyring
	slow := max(c.slow, 1)
	cfg.Memberlist = fastMemberlist(slow)
	cfg.Transport = &cutTransport{NodeAwareTransport: tr, self: n.name, net: c.net}
	cfg.RaftListener = l
	cfg.RaftDial = func(ctx context.Context, addr string) (net.Conn, error) { return c.net.dial(ctx, n.name, addr) }
	cfg.Consensus = ConsensusTiming{Raft: fastRaft(slow), StableWait: slow * 300 * time.Millisecond, DeadVoterTimeout: slow * 2 * time.Second,
		DeadNonvoterTimeout: slow * 5 * time.Second, Tick: 50 * time.Millisecond}
	cfg.ReconnectInterval = 200 * time.Millisecond
	cfg.StateDir = n.dir
	cfg.Logger = logger
	cfg.Join = n.seeds
	for _, f := range n.mutate {
		f(&cfg)
	}
	m, err := New(cfg)
	if err != nil {
		_ = tr.Shutdown()
		l.Close()
		c.t.Fatalf("%s: %v", n.name, err)
	}
	c.net.mu.Lock()
	delete(c.net.down, n.name)
	c.net.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	n.m, n.cancel, n.done, n.exitErr, n.stopOnce = m, cancel, make(chan error, 1), nil, sync.Once{}
	go func() { n.done <- m.Run(ctx) }()
	c.t.Cleanup(n.stop)
	return n
}

// stop stops the node's agent gracefully; its state stays.
func (n *testNode) stop() {
	n.stopOnce.Do(func() {
		if n.cancel == nil {
			return
		}
		n.cancel()
		n.exitErr = <-n.done
	})
}

// crash cuts the node off the network first, so that nobody hears a
// graceful goodbye, then stops it.
func (n *testNode) crash() {
	n.c.net.mu.Lock()
	n.c.net.down[n.name] = true
	n.c.net.breakLocked()
	n.c.net.mu.Unlock()
	n.stop()
}

// testWriter sends logs to t.Log, so they show only for failing tests.
type testWriter struct {
	t    testing.TB
	name string
}

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(w.name + ": " + string(p[:len(p)-1]))
	return len(p), nil
}

var _ io.Writer = testWriter{}

// waitRegistered waits until every named node is a registered member
// with a leader.
func (c *cluster) waitRegistered(d time.Duration, names ...string) {
	c.t.Helper()
	poll.Eventually(c.t, d, fmt.Sprintf("%v registered, with a leader", names), func() error {
		for _, name := range names {
			st := c.nodes[name].m.Consensus()
			if !st.Registered || st.Leader == "" {
				return fmt.Errorf("%s: %+v", name, st)
			}
		}
		return nil
	})
}

// waitMembers waits until each named node sees all of them registered
// and alive.
func (c *cluster) waitMembers(d time.Duration, names ...string) {
	c.t.Helper()
	poll.Eventually(c.t, d, fmt.Sprintf("%v seeing each other registered and alive", names), func() error {
		for _, name := range names {
			v := c.nodes[name].m.View()
			for _, other := range names {
				mem, ok := v.Members[other]
				if !ok || !mem.Registered || mem.State != Alive {
					return fmt.Errorf("%s sees %s as %+v", name, other, mem)
				}
			}
		}
		return nil
	})
}
