// Package sim simulates the wgmesh control plane of hundreds of hosts in
// one process, for cluster sizes the lab's namespaces cannot reach. make
// bench projects its numbers in the report.
//
// Every simulated host is a real mesh.Mesh with its own memberlist,
// speaking memberlist's UDP and TCP protocol on its own port of
// 127.0.0.1, with gossip encrypted as in production, and its own Raft
// server of the cluster's catalog on another port, over TLS (up to five
// voters, the rest non-voters). Only the data plane is missing: nobody
// applies the WireGuard peers a node computes. A run goes through these
// phases, each timed by polling every node's View:
//
//	start all nodes ─▶ every node sees N members alive        MembershipConverged
//	                ─▶ every node registered in the catalog    Registered
//	attach + claim  ─▶ every node has N-1 peers, one block     PeersConverged, Claim*
//	settle, then an idle window                                BytesPerNodePerSecond, ...
//	one more node joins, attaches, claims ─▶ everyone has it   JoinReachable
//	stop every node
//
// Reading the numbers: loopback has no latency and no loss, so gossip
// rounds cost only CPU time. But every node shares this machine's CPUs
// and this process's file descriptors: at hundreds of nodes the
// simulation is CPU-bound, and times measured here are what that CPU
// allows, an upper bound for hosts that each have their own CPU. Open TCP
// connections are capped below the descriptor limit (dials wait for a
// slot rather than fail), which slows bursts of connections that real
// hosts would open in parallel. Bytes and messages depend on neither and
// project directly, per node, to real hosts.
package sim

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// Config configures a simulation.
type Config struct {
	// Nodes is the cluster size, not counting the node that joins last.
	Nodes int
	// Networks is how many wgmesh networks every node attaches; 0 means 1.
	// Network k has subnet 10.64.0.0/10, 10.128.0.0/10, 10.192.0.0/10 or
	// 10.0.0.0/10, and every node claims a /24 of each.
	Networks int
	// ConcurrentClaims makes every node claim its blocks at the same
	// moment, which is what a network created on every host at once does.
	// Otherwise nodes claim one after another, each waiting for its claims
	// to commit before the next node starts.
	ConcurrentClaims bool
	// Timeout bounds the whole run; 0 means 5 minutes.
	Timeout time.Duration
	// Memberlist returns a node's base memberlist configuration (mesh sets
	// names, addresses, delegates and the keyring on it); nil means
	// DefaultMemberlist.
	Memberlist func() *memberlist.Config
	// Settle is how long the cluster is left alone after its peers
	// converged, for claim gossip to drain before the idle window; 0
	// means 5 seconds.
	//
	// The idle window also waits until one push/pull interval has passed
	// since the nodes started: memberlist's first push/pull comes one
	// interval after a random delay of up to one interval, and from then
	// on every window of one interval holds exactly one push/pull per
	// node. The interval is memberlist's PushPullInterval, scaled up past
	// 32 nodes like memberlist does (30 s, 90 s at 100 nodes, 150 s at
	// 500 with the LAN defaults).
	Settle time.Duration
	// IdleWindow is how long idle traffic is measured; 0 means 30
	// seconds, one push/pull interval of up to 32 nodes. A shorter window
	// than the scaled interval holds a random sample of the push/pulls.
	IdleWindow time.Duration
	// Logger receives the simulation's progress at Info, and every node's
	// own records at Warn and above, with a "node" attribute (at Info, N
	// nodes log N² lines just to say who joined). Nil discards both.
	Logger *slog.Logger
}

// Defaults of Config.
const (
	DefaultTimeout    = 5 * time.Minute
	DefaultSettle     = 5 * time.Second
	DefaultIdleWindow = 30 * time.Second
)

// DefaultConfig returns a 100-node run with concurrent claims.
func DefaultConfig() Config {
	return Config{
		Nodes:            100,
		Networks:         1,
		ConcurrentClaims: true,
		Timeout:          DefaultTimeout,
		Memberlist:       DefaultMemberlist,
		Settle:           DefaultSettle,
		IdleWindow:       DefaultIdleWindow,
	}
}

// DefaultMemberlist is memberlist.DefaultLANConfig, unchanged: probes every
// second with a 500 ms timeout, gossip to 3 nodes every 200 ms, push/pull
// every 30 s, compression on. It is what wgmesh runs with and the
// realistic baseline. Nothing in it has to change to put hundreds of
// nodes on one machine: each node binds its own port, and memberlist's
// 2 MiB UDP receive buffer fits under this machine's net.core.rmem_max
// (memberlist halves it until the kernel accepts, so a lower limit only
// makes drops under load more likely). What does not scale on one
// machine is CPU: see the package documentation.
func DefaultMemberlist() *memberlist.Config {
	return memberlist.DefaultLANConfig()
}

// subnets of the simulated networks, and the block size every node claims.
var subnets = []netip.Prefix{
	netip.MustParsePrefix("10.64.0.0/10"),
	netip.MustParsePrefix("10.128.0.0/10"),
	netip.MustParsePrefix("10.192.0.0/10"),
	netip.MustParsePrefix("10.0.0.0/10"),
}

const blockBits = 24

// maxNodes keeps every node, the joiner included, a /24 of a /10.
const maxNodes = 1<<(blockBits-10) - 1

func (c Config) withDefaults() Config {
	if c.Networks == 0 {
		c.Networks = 1
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.Memberlist == nil {
		c.Memberlist = DefaultMemberlist
	}
	if c.Settle == 0 {
		c.Settle = DefaultSettle
	}
	if c.IdleWindow == 0 {
		c.IdleWindow = DefaultIdleWindow
	}
	return c
}

// Validate checks the configuration; zero values that have defaults are
// accepted.
func (c *Config) Validate() error {
	if c.Nodes < 2 || c.Nodes > maxNodes {
		return fmt.Errorf("cluster size %d out of range 2..%d", c.Nodes, maxNodes)
	}
	if c.Networks < 0 || c.Networks > len(subnets) {
		return fmt.Errorf("%d networks out of range 1..%d", c.Networks, len(subnets))
	}
	if c.Timeout < 0 || c.Settle < 0 || c.IdleWindow < 0 {
		return errors.New("timeout, settle time and idle window must not be negative")
	}
	return nil
}

// Result is what a run measured. After an error, the fields of the
// phases that completed are set, and so are the Claim* counters and
// MaxEntryBytes up to the moment the run gave up.
type Result struct {
	Nodes int
	// MembershipConverged runs from starting the last node (all nodes
	// start at once, joining the first three) until every node's View
	// lists all N members alive.
	MembershipConverged time.Duration
	// Registered runs from the same start until every node is a
	// registered member of the cluster's consensus and sees all others
	// registered.
	Registered time.Duration
	// PeersConverged runs from the start of the block claims until every
	// node's View().Peers has, in every network, N-1 peers with exactly
	// one AllowedIPs block each: the full WireGuard peer set.
	PeersConverged time.Duration
	// JoinReachable runs from starting one more node, which then attaches
	// and claims, until every other node lists it as a peer with its
	// blocks.
	JoinReachable time.Duration

	// BytesPerNodePerSecond and MessagesPerNodePerSecond are what a node
	// sends in the idle window: UDP datagrams and bytes written on TCP
	// connections, as they leave memberlist (compressed and encrypted,
	// without IP/UDP/TCP headers). A message is a datagram or a TCP
	// connection opened.
	// IdleStreamBytesPerNodePerSecond is the TCP part of the bytes:
	// push/pull anti-entropy, which sends the whole state.
	BytesPerNodePerSecond           float64
	MessagesPerNodePerSecond        float64
	IdleStreamBytesPerNodePerSecond float64
	// PushPullBytes is the TCP bytes per connection in the idle window,
	// both directions: one push/pull exchange of full states. A node
	// starts one per scaled push/pull interval and answers one, so push/pull
	// costs a node PushPullBytes per interval, whatever the window
	// happened to catch.
	PushPullBytes float64
	// IdleCPUCores is the CPU time the whole process used per second of
	// the idle window: 1.0 is one core busy. Divide by Nodes for a node.
	IdleCPUCores float64
	// IdleRaftBytesPerNodePerSecond is what a node wrote on its
	// consensus connections in the idle window (TLS records, without
	// TCP/IP headers), averaged over the nodes, and
	// IdleRaftMaxBytesPerSecond what the busiest one, IdleRaftMaxNode,
	// wrote: the leader, which replicates to every other node. Leader is
	// the leader as the first node saw it at the end of the window.
	IdleRaftBytesPerNodePerSecond float64
	IdleRaftMaxBytesPerSecond     float64
	IdleRaftMaxNode               string
	Leader                        string

	// ClaimBytesPerNode is what a node sent from the start of the claims
	// until the peers converged, idle traffic included; of it,
	// ClaimStreamBytesPerNode went over TCP. ClaimMessagesPerNode and
	// ClaimStreamsPerNode count messages and TCP connections opened.
	ClaimBytesPerNode       float64
	ClaimStreamBytesPerNode float64
	ClaimMessagesPerNode    float64
	ClaimStreamsPerNode     float64
	// ClaimGossipBytesPerNode is wgmesh's own payload in that time
	// (mesh.Stats: entries sent, before memberlist compresses and
	// encrypts them), push/pull state excluded.
	ClaimGossipBytesPerNode float64
	// ClaimCPU is the process's CPU time over the same span.
	ClaimCPU time.Duration
	// ClaimRaftBytesPerNode is what a node wrote on its consensus
	// connections in that time, averaged over the nodes, and
	// ClaimRaftMaxBytes what the busiest node wrote.
	ClaimRaftBytesPerNode float64
	ClaimRaftMaxBytes     float64
	// MaxEntryBytes is the largest NetworkEntry, encoded as mesh sends it
	// (a kind byte and JSON), that the first node held during the claims
	// and the join, sampled every 100 ms (or as often as polling allows),
	// so a peak shorter than that can be missed. Entries above 1100 bytes do not
	// fit a gossip packet: mesh sends them to every member over TCP.
	MaxEntryBytes int
	// Goroutines is runtime.NumGoroutine when the peers converged.
	Goroutines int

	// ClaimsLost counts claims that lost to a rival and were retried on
	// another block, over the whole run.
	ClaimsLost int
	// MemberDeaths counts the times a node declared another one dead.
	// Every node stays up, so each is a false failure detection: probes
	// that starved for CPU or a dropped datagram.
	MemberDeaths int
	// DialErrors counts TCP connections that could not be opened.
	DialErrors int
	// MaxOpenStreams is the most TCP connections the nodes had open at
	// once, over the whole run. All nodes share one process and so one
	// file-descriptor limit, which a real host would not share: the
	// simulation caps open connections below it, and DialWaits counts
	// the connections that waited for a free slot (see streamLimit).
	MaxOpenStreams int
	DialWaits      int
	// ClaimsCommitted counts the block claims of the cluster's nodes that
	// had committed when the peers converged or the run gave up.
	ClaimsCommitted int
}

// ErrTimeout is wrapped by the error of a run that exceeded its Timeout.
var ErrTimeout = errors.New("simulation timed out")

// Run runs one simulation and stops every node before it returns, also
// on error or when ctx is done.
func Run(ctx context.Context, cfg Config) (Result, error) {
	cfg = cfg.withDefaults()
	res := Result{Nodes: cfg.Nodes}
	if err := cfg.Validate(); err != nil {
		return res, err
	}
	ctx, cancel := context.WithTimeoutCause(ctx, cfg.Timeout, fmt.Errorf("%w after %v", ErrTimeout, cfg.Timeout))
	defer cancel()
	s, err := newSim(cfg)
	if err != nil {
		return res, err
	}
	defer s.close()
	err = s.run(ctx, &res)
	res.MaxEntryBytes = s.maxEntry
	res.ClaimsLost = int(s.ev.claimsLost.Load())
	res.MemberDeaths = int(s.ev.memberDeaths.Load())
	res.DialErrors = int(s.traffic(s.nodes).DialErrors)
	res.MaxOpenStreams = int(s.limit.peak.Load())
	res.DialWaits = int(s.limit.waits.Load())
	return res, err
}

// Polling: every node's View is read at most this often, and a pass
// waits at least as long as it took, so that polling never takes more
// than half a core from the nodes.
const (
	pollInterval   = 10 * time.Millisecond
	sampleInterval = 100 * time.Millisecond
	// numSeeds: every node joins the first few nodes, not everyone.
	numSeeds = 3
)

type sim struct {
	cfg     Config
	log     *slog.Logger
	nodeLog slog.Handler
	ev      *events
	limit   *streamLimit
	keyring crypto.Keyring
	subnets []netip.Prefix
	seeds   []string
	// nodes are the cluster, then the joiner once it exists.
	nodes []*node
	// started is when the last node of the cluster started.
	started time.Time

	// committed counts the claims that committed.
	committed atomic.Int64

	// Entry size sampling, by the polling goroutine only.
	sampled  time.Time
	seen     map[entryID]uint64 // version last measured
	maxEntry int
}

type entryID struct {
	node   string
	subnet netip.Prefix
}

// node is one simulated host.
type node struct {
	name string
	m    *mesh.Mesh
	tr   *countingTransport
	raft raftCounter
	// cancel stops Run; nil until started. done is closed when Run has
	// returned, with its error in err.
	cancel context.CancelFunc
	done   chan struct{}
	err    error
	// blocks are the blocks its claims won, by network; written by the
	// claiming goroutine, read once it is done.
	blocks []netip.Prefix
}

func newSim(cfg Config) (*sim, error) {
	key, err := crypto.GenerateClusterKey()
	if err != nil {
		return nil, err
	}
	k, err := crypto.ParseClusterKey(key)
	if err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	ev := &events{}
	return &sim{
		cfg:     cfg,
		log:     logger.With("component", "sim"),
		nodeLog: &countingHandler{next: logger.Handler(), min: slog.LevelWarn, ev: ev},
		ev:      ev,
		limit:   newStreamLimit(cfg.Nodes + 1),
		keyring: crypto.Keyring{k},
		subnets: subnets[:cfg.Networks],
		seen:    map[entryID]uint64{},
	}, nil
}

// fakeKey returns node i's WireGuard public key: distinct and non-zero.
func fakeKey(i int) crypto.PublicKey {
	var k crypto.PublicKey
	k[0], k[1], k[2] = byte(i), byte(i>>8), byte(i>>16)
	k[31] = 0x42
	return k
}

// addNodes creates count more nodes without starting them. The first
// nodes ever added are the seeds of all.
func (s *sim) addNodes(count int) ([]*node, error) {
	first := len(s.nodes)
	for i := first; i < first+count; i++ {
		name := fmt.Sprintf("node-%04d", i)
		h := s.nodeLog.WithAttrs([]slog.Attr{slog.String("node", name)})
		tr, err := newCountingTransport(slog.NewLogLogger(h, slog.LevelWarn), s.limit)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		s.nodes = append(s.nodes, &node{name: name, tr: tr, done: make(chan struct{})})
		if len(s.seeds) < numSeeds {
			s.seeds = append(s.seeds, tr.Addr())
		}
	}
	added := s.nodes[first:]
	for i, n := range added {
		seed := sha256.Sum256([]byte(n.name))
		id, err := crypto.IdentityFromSeed(seed[:])
		if err != nil {
			return nil, err
		}
		raftL, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("%s: consensus port: %w", n.name, err)
		}
		c := mesh.DefaultConfig()
		c.Name = n.name
		c.Identity = id
		c.RaftListener = n.raft.listener(raftL)
		c.RaftDial = n.raft.dial
		c.BindAddr, c.AdvertiseAddr, c.BindPort = "127.0.0.1", "127.0.0.1", n.tr.port
		c.Join = slices.DeleteFunc(slices.Clone(s.seeds), func(a string) bool { return a == n.tr.Addr() })
		c.Keyring = s.keyring
		c.PublicKey = fakeKey(first + i)
		c.WGMode = "userspace"
		c.Memberlist = s.cfg.Memberlist()
		c.Transport = n.tr
		c.Logger = slog.New(s.nodeLog).With("node", n.name)
		m, err := mesh.New(c)
		if err != nil {
			raftL.Close()
			return nil, fmt.Errorf("creating %s: %w", n.name, err)
		}
		n.m = m
	}
	return added, nil
}

func (s *sim) start(ctx context.Context, n *node) {
	ctx, n.cancel = context.WithCancel(ctx)
	go func() {
		defer close(n.done)
		n.err = n.m.Run(ctx)
	}()
}

// close stops every node, all at once, and waits for them.
func (s *sim) close() {
	for _, n := range s.nodes {
		if n.cancel != nil {
			n.cancel()
		}
	}
	for _, n := range s.nodes {
		if n.cancel != nil {
			<-n.done
		}
		// memberlist shut it down if it ever started.
		_ = n.tr.Shutdown()
	}
}

// failed returns the error of a node whose Run returned.
func (s *sim) failed() error {
	for _, n := range s.nodes {
		select {
		case <-n.done:
			if n.err != nil {
				return fmt.Errorf("%s stopped: %w", n.name, n.err)
			}
			return fmt.Errorf("%s stopped", n.name)
		default:
		}
	}
	return nil
}

// traffic sums what nodes sent so far.
func (s *sim) traffic(nodes []*node) traffic {
	var t traffic
	for _, n := range nodes {
		t = t.add(n.tr.c.snapshot())
	}
	return t
}

// raftBytes is what each node wrote on its consensus connections so far.
func raftBytes(nodes []*node) []uint64 {
	out := make([]uint64, len(nodes))
	for i, n := range nodes {
		out[i] = n.raft.bytes.Load()
	}
	return out
}

// raftSent is what nodes wrote on consensus connections between two
// raftBytes: in all, and by the busiest node, which it names.
func raftSent(before, after []uint64, nodes []*node) (total, busiest float64, who string) {
	for i := range after {
		d := float64(after[i] - before[i])
		total += d
		if d > busiest {
			busiest, who = d, nodes[i].name
		}
	}
	return total, busiest, who
}

// gossipBytes sums wgmesh's own payload that nodes sent so far.
func gossipBytes(nodes []*node) uint64 {
	var b uint64
	for _, n := range nodes {
		b += n.m.Stats().SentBytes
	}
	return b
}

func (s *sim) run(ctx context.Context, res *Result) error {
	n := s.cfg.Nodes
	s.log.Info("starting", "nodes", n, "networks", len(s.subnets), "concurrent_claims", s.cfg.ConcurrentClaims,
		"stream_slots", cap(s.limit.slots))
	cluster, err := s.addNodes(n)
	if err != nil {
		return err
	}
	for _, nd := range cluster {
		s.started = time.Now()
		s.start(ctx, nd)
	}
	at, err := s.waitAll(ctx, "membership", cluster, membersAlive(n))
	if err != nil {
		return err
	}
	res.MembershipConverged = at.Sub(s.started)
	s.log.Info("membership converged", "nodes", n, "took", res.MembershipConverged)
	at, err = s.waitAll(ctx, "registration", cluster, registered)
	if err != nil {
		return err
	}
	res.Registered = at.Sub(s.started)
	s.log.Info("every node registered in the cluster", "nodes", n, "took", res.Registered)
	for _, subnet := range s.subnets {
		if _, err := cluster[0].m.EnsureNetwork(ctx, catalog.EnsureNetwork{Subnet: subnet, BlockBits: blockBits}); err != nil {
			return fmt.Errorf("creating network %s: %w", subnet, err)
		}
	}

	if err := s.claims(ctx, cluster, res); err != nil {
		return err
	}
	s.log.Info("peers converged", "nodes", n, "concurrent", s.cfg.ConcurrentClaims, "took", res.PeersConverged,
		"bytes_per_node", int(res.ClaimBytesPerNode), "max_entry_bytes", s.maxEntry)

	if err := s.idle(ctx, cluster, res); err != nil {
		return err
	}
	s.log.Info("idle traffic measured", "nodes", n, "bytes_per_node_per_second", int(res.BytesPerNodePerSecond),
		"messages_per_node_per_second", res.MessagesPerNodePerSecond)

	if err := s.join(ctx, cluster, res); err != nil {
		return err
	}
	s.log.Info("joining node reachable", "nodes", n, "took", res.JoinReachable)
	return nil
}

// claims attaches every network on every node and claims a block in
// each, then waits for the full peer set everywhere.
func (s *sim) claims(ctx context.Context, cluster []*node, res *Result) error {
	ctx, cancel := context.WithCancelCause(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel(nil)
		wg.Wait()
	}()
	start := make(chan struct{})
	if s.cfg.ConcurrentClaims {
		for _, n := range cluster {
			wg.Go(func() {
				<-start
				if err := s.claimAll(ctx, n); err != nil {
					cancel(err)
				}
			})
		}
	} else {
		wg.Go(func() {
			<-start
			for _, n := range cluster {
				if err := s.claimAll(ctx, n); err != nil {
					cancel(err)
					return
				}
			}
		})
	}

	before, cpu, gossip, raftBefore := s.traffic(cluster), cpuTime(), gossipBytes(cluster), raftBytes(cluster)
	began := time.Now()
	close(start)
	at, err := s.waitAll(ctx, "peers", cluster, s.fullPeers(len(cluster)-1))
	if err == nil {
		res.PeersConverged = at.Sub(began)
		res.Goroutines = runtime.NumGoroutine()
	}
	nodes := float64(len(cluster))
	used := s.traffic(cluster).sub(before)
	res.ClaimBytesPerNode = float64(used.Bytes()) / nodes
	res.ClaimStreamBytesPerNode = float64(used.StreamBytes) / nodes
	res.ClaimMessagesPerNode = float64(used.Messages()) / nodes
	res.ClaimStreamsPerNode = float64(used.Streams) / nodes
	res.ClaimGossipBytesPerNode = float64(gossipBytes(cluster)-gossip) / nodes
	res.ClaimCPU = cpuTime() - cpu
	total, busiest, _ := raftSent(raftBefore, raftBytes(cluster), cluster)
	res.ClaimRaftBytesPerNode, res.ClaimRaftMaxBytes = total/nodes, busiest
	res.ClaimsCommitted = int(s.committed.Load())
	s.sampleEntries(true)
	if err != nil {
		return err
	}
	wg.Wait() // every claim has committed: its block is in every view
	if err := context.Cause(ctx); err != nil {
		return err
	}
	return s.checkBlocks(cluster)
}

// claimAll attaches every network on n and claims a block of each.
func (s *sim) claimAll(ctx context.Context, n *node) error {
	n.blocks = make([]netip.Prefix, len(s.subnets))
	for k, subnet := range s.subnets {
		if err := n.m.Attach(subnet, uint16(51820+k)); err != nil {
			return fmt.Errorf("%s attaching %s: %w", n.name, subnet, err)
		}
		b, err := n.m.ClaimBlock(ctx, mesh.BlockRequest{Subnet: subnet})
		if err != nil {
			return fmt.Errorf("%s claiming a block of %s: %w", n.name, subnet, err)
		}
		n.blocks[k] = b
		s.committed.Add(1)
	}
	return nil
}

// checkBlocks verifies that the claimed blocks are distinct and that
// every node sees each peer with the block that peer won.
func (s *sim) checkBlocks(cluster []*node) error {
	owner := map[netip.Prefix]string{}
	byName := map[string]*node{}
	for _, n := range cluster {
		byName[n.name] = n
		for _, b := range n.blocks {
			if o, dup := owner[b]; dup {
				return fmt.Errorf("block %s went to both %s and %s", b, o, n.name)
			}
			owner[b] = n.name
		}
	}
	for _, n := range cluster {
		v := n.m.View()
		for k, subnet := range s.subnets {
			for _, p := range v.Peers(subnet) {
				want := byName[p.Node].blocks[k]
				if len(p.AllowedIPs) != 1 || p.AllowedIPs[0] != want {
					return fmt.Errorf("%s sees %s with blocks %v in %s, it won %s", n.name, p.Node, p.AllowedIPs, subnet, want)
				}
			}
		}
		for _, subnet := range s.subnets {
			for b, o := range v.Network(subnet).Blocks {
				if owner[b] != o {
					return fmt.Errorf("%s's catalog gives %s to %s, which claimed %s", n.name, b, o, owner[b])
				}
			}
		}
	}
	return nil
}

// idle lets the cluster settle and push/pull reach its steady rate, then
// measures its traffic.
func (s *sim) idle(ctx context.Context, cluster []*node, res *Result) error {
	warm := s.started.Add(pushPullScale(s.cfg.Memberlist().PushPullInterval, len(cluster)))
	if err := sleep(ctx, max(s.cfg.Settle, time.Until(warm))); err != nil {
		return err
	}
	before, cpu, began, raftBefore := s.traffic(cluster), cpuTime(), time.Now(), raftBytes(cluster)
	if err := sleep(ctx, s.cfg.IdleWindow); err != nil {
		return err
	}
	secs := time.Since(began).Seconds()
	used := s.traffic(cluster).sub(before)
	nodes := float64(len(cluster))
	total, busiest, who := raftSent(raftBefore, raftBytes(cluster), cluster)
	res.IdleRaftBytesPerNodePerSecond, res.IdleRaftMaxBytesPerSecond, res.IdleRaftMaxNode = total/nodes/secs, busiest/secs, who
	res.Leader = cluster[0].m.Consensus().Leader
	res.BytesPerNodePerSecond = float64(used.Bytes()) / nodes / secs
	res.MessagesPerNodePerSecond = float64(used.Messages()) / nodes / secs
	res.IdleStreamBytesPerNodePerSecond = float64(used.StreamBytes) / nodes / secs
	if used.Streams > 0 {
		res.PushPullBytes = float64(used.StreamBytes) / float64(used.Streams)
	}
	res.IdleCPUCores = (cpuTime() - cpu).Seconds() / secs
	return s.failed()
}

// join starts one more node, has it attach and claim, and waits until
// every other node has it as a peer.
func (s *sim) join(ctx context.Context, cluster []*node, res *Result) error {
	added, err := s.addNodes(1)
	if err != nil {
		return err
	}
	j := added[0]
	began := time.Now()
	s.start(ctx, j)
	if err := s.claimAll(ctx, j); err != nil {
		return err
	}
	at, err := s.waitAll(ctx, "join", cluster, func(n *node) error {
		v := n.m.View()
		for k, subnet := range s.subnets {
			i := slices.IndexFunc(v.Peers(subnet), func(p mesh.Peer) bool {
				return p.Node == j.name && slices.Equal(p.AllowedIPs, j.blocks[k:k+1])
			})
			if i < 0 {
				return fmt.Errorf("%s does not have %s as a peer with %s", n.name, j.name, j.blocks[k])
			}
		}
		return nil
	})
	s.sampleEntries(true)
	if err != nil {
		return err
	}
	res.JoinReachable = at.Sub(began)
	return nil
}

// membersAlive checks that a node sees want members, all alive.
// registered checks that a node is a registered member of the cluster
// and sees every other node registered too.
func registered(n *node) error {
	st := n.m.Consensus()
	if !st.Registered || st.Leader == "" {
		return fmt.Errorf("%s: consensus %s, problem %q", n.name, st.State, st.Problem)
	}
	for name, m := range n.m.View().Members {
		if !m.Registered {
			return fmt.Errorf("%s does not see %s registered yet", n.name, name)
		}
	}
	return nil
}

func membersAlive(want int) func(*node) error {
	return func(n *node) error {
		v := n.m.View()
		if len(v.Members) != want {
			return fmt.Errorf("%s knows %d of %d members", n.name, len(v.Members), want)
		}
		for name, m := range v.Members {
			if m.State != mesh.Alive {
				return fmt.Errorf("%s sees %s as %s", n.name, name, m.State)
			}
		}
		return nil
	}
}

// fullPeers checks that a node has want peers with one block each in
// every network.
func (s *sim) fullPeers(want int) func(*node) error {
	return func(n *node) error {
		v := n.m.View()
		for _, subnet := range s.subnets {
			peers := v.Peers(subnet)
			if len(peers) != want {
				return fmt.Errorf("%s has %d of %d peers in %s", n.name, len(peers), want, subnet)
			}
			for _, p := range peers {
				if len(p.AllowedIPs) != 1 {
					return fmt.Errorf("%s sees %s with %d blocks in %s", n.name, p.Node, len(p.AllowedIPs), subnet)
				}
			}
		}
		return nil
	}
}

// waitAll polls until check passes on every node and returns when it
// did. A pass stops at the first node that fails, which the next pass
// starts from, so that polling a cluster that is far from converged costs
// one View per pass; once every node has passed, one more pass over all
// of them confirms that none went back.
func (s *sim) waitAll(ctx context.Context, what string, nodes []*node, check func(*node) error) (time.Time, error) {
	pending := slices.Clone(nodes)
	var last error
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		began := time.Now()
		if err := s.failed(); err != nil {
			return time.Time{}, err
		}
		for len(pending) > 0 {
			if last = check(pending[0]); last != nil {
				break
			}
			pending = pending[1:]
		}
		if len(pending) == 0 {
			at := time.Now()
			for _, n := range nodes {
				if err := check(n); err != nil {
					pending, last = append(pending, n), err
				}
			}
			if len(pending) == 0 {
				return at, nil
			}
		}
		s.sampleEntries(false)
		timer.Reset(max(pollInterval, time.Since(began)))
		select {
		case <-ctx.Done():
			// Say how far it got: check everyone once more.
			waiting := 0
			for _, n := range nodes {
				if err := check(n); err != nil {
					waiting, last = waiting+1, err
				}
			}
			return time.Time{}, fmt.Errorf("%s not converged: %d of %d nodes still waiting, e.g. %w: %w",
				what, waiting, len(nodes), last, context.Cause(ctx))
		case <-timer.C:
		}
	}
}

// sampleEntries measures the entries the first node holds that changed
// since it last looked, at most every sampleInterval unless forced.
func (s *sim) sampleEntries(force bool) {
	if !force && time.Since(s.sampled) < sampleInterval {
		return
	}
	s.sampled = time.Now()
	for _, entries := range s.nodes[0].m.View().Entries {
		for _, e := range entries {
			id := entryID{e.Node, e.Subnet}
			if v, ok := s.seen[id]; ok && v == e.Version {
				continue
			}
			s.seen[id] = e.Version
			// mesh encodes an entry as a kind byte and its JSON.
			b, err := json.Marshal(e)
			if err == nil {
				s.maxEntry = max(s.maxEntry, 1+len(b))
			}
		}
	}
}

// pushPullScale is memberlist's (util.go): past 32 nodes, the push/pull
// interval grows with the logarithm of the cluster size.
func pushPullScale(interval time.Duration, n int) time.Duration {
	const threshold = 32
	if n <= threshold {
		return interval
	}
	return time.Duration(math.Ceil(math.Log2(float64(n))-math.Log2(threshold))+1) * interval
}

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-t.C:
		return nil
	}
}
