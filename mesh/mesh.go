// Package mesh is everything cluster-wide: membership and failure
// detection through memberlist gossip, the catalog the cluster agrees on
// through Raft (package consensus), and the records each node publishes
// about itself by gossip.
//
// Two kinds of state, two mechanisms:
//
//   - What must never be held twice, and who is who — which identity a
//     node name belongs to, which networks exist, which node owns which
//     address block — is decided by committed Raft entries (package
//     catalog). Every node holds a replica of the committed catalog.
//   - What may differ between nodes for a while — a node's WireGuard key
//     and endpoint, its WireGuard port per network, how many containers
//     it runs — travels by gossip, in records signed by the node they
//     describe (package records). A receiver uses a record only if the catalog
//     binds the record's node name to the identity that signed it, and
//     installs as a peer's allowed IPs the blocks the catalog says that
//     peer owns, never what the peer says of itself.
//
// mesh has no OS imports: no netlink, no WireGuard, no Docker.
package mesh

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-sockaddr"
	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/internal/logbridge"
	"github.com/wgmesh/wgmesh/mesh/catalog"
	"github.com/wgmesh/wgmesh/mesh/consensus"
	"github.com/wgmesh/wgmesh/mesh/gossipnet"
	"github.com/wgmesh/wgmesh/mesh/reachability"
	"github.com/wgmesh/wgmesh/mesh/records"
)

// Config configures a Mesh.
type Config struct {
	// Name is this node's name in the cluster; the cluster binds it to
	// Identity on first join.
	Name string
	// Identity is this node's identity key: it signs what the node
	// publishes and authenticates it to the cluster.
	Identity crypto.Identity
	// BindAddr and BindPort are where gossip listens (TCP and UDP).
	BindAddr string
	BindPort int
	// RaftPort is where consensus listens (TCP, mutual TLS); 0 means
	// BindPort+1.
	RaftPort int
	// AdvertiseAddr is the address peers use for gossip, consensus and
	// WireGuard; hosts behind NAT must set it. Empty: the bind address,
	// or else the first private address of this host.
	AdvertiseAddr string
	// Join lists seed addresses (host or host:port).
	Join []string
	// Keyring encrypts gossip and keys consensus TLS. Nil means no
	// encryption key, which the caller must have chosen explicitly.
	Keyring crypto.Keyring
	// PublicKey is this node's WireGuard public key.
	PublicKey crypto.PublicKey
	// WGMode is reported to peers ("kernel" or "userspace").
	WGMode string
	// StateDir holds the consensus log and this node's saved gossip.
	// Empty keeps everything in memory (tests).
	StateDir string
	Logger   *slog.Logger
	// Memberlist is the base memberlist configuration; nil means
	// memberlist.DefaultLANConfig. Name, addresses, delegates and
	// keyring are always set by Mesh.
	Memberlist *memberlist.Config
	// Transport overrides memberlist's network transport (tests).
	Transport memberlist.Transport
	// RaftListener and RaftDial override consensus networking (tests).
	RaftListener net.Listener
	RaftDial     consensus.DialFunc
	// Consensus tunes Raft and the autopilot; zero values take defaults.
	Consensus ConsensusTiming
	// ReconnectInterval is how often a node retries its seeds while alone
	// and tries to reach members it believes dead, which is how a
	// partition heals after memberlist has given up on the other side.
	ReconnectInterval time.Duration
	// DirectFanout: in clusters up to this size a node sends its own
	// changes straight to every member as well as gossiping them.
	DirectFanout int
	// LeaveOnShutdown makes Run leave the cluster when it stops, so that
	// peers drop this node at once. Off, peers keep their WireGuard
	// configuration through an agent restart.
	LeaveOnShutdown bool
	// LeaveTimeout bounds the graceful leave on shutdown.
	LeaveTimeout time.Duration
	// RelayPort and RelayPorts are the UDP ports this node relays on
	// for members that cannot reach each other, RelayPort to
	// RelayPort+RelayPorts-1; 0 relays nothing. The first answers
	// members asking how their gossip port is seen (package
	// reachability); the others carry the relay sessions, which the
	// driver serves. The node offers them only while members see it at
	// the address it advertises.
	RelayPort, RelayPorts uint16
	// Server and ServerKey say whether this node may vote in consensus
	// (consensus/servers.go): --server and --server-key-file.
	Server    consensus.ServerMode
	ServerKey []byte
	// PMTUInterval times path MTU probes to each member reached
	// directly (package reachability): a sixth of it between
	// confirmations, ten of it between searches for a larger value; 0
	// means 30 s, negative turns probing off.
	PMTUInterval time.Duration
	// NameTombstoneTTL is how long removed container names are
	// remembered (names.go); 0 means 5 minutes.
	NameTombstoneTTL time.Duration
}

// ConsensusTiming tunes consensus (see consensus.Config).
type ConsensusTiming struct {
	Raft                *raft.Config
	StableWait          time.Duration
	DeadVoterTimeout    time.Duration
	DeadNonvoterTimeout time.Duration
	Tick                time.Duration
	MaxVoters           int
}

func (c *Config) serverFeatures() uint32 {
	var f uint32
	switch c.Server {
	case consensus.ServerAlways:
		f |= records.FeatureServerAlways
	case consensus.ServerNever:
		f |= records.FeatureServerNever
	}
	if len(c.ServerKey) > 0 {
		f |= records.FeatureServerKey
	}
	return f
}

// DefaultConfig returns defaults for a LAN or a set of cloud hosts.
func DefaultConfig() Config {
	host, _ := os.Hostname()
	return Config{
		Name:              host,
		BindAddr:          "0.0.0.0",
		BindPort:          7946,
		ReconnectInterval: 5 * time.Second,
		DirectFanout:      32,
		LeaveTimeout:      2 * time.Second,
	}
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if err := catalog.ValidName(c.Name); err != nil {
		return fmt.Errorf("node name: %w", err)
	}
	if c.Identity.IsZero() {
		return errors.New("no identity key")
	}
	if c.BindPort < 0 || c.BindPort > 65535 {
		return fmt.Errorf("gossip port %d out of range", c.BindPort)
	}
	if c.RaftPort < 0 || c.RaftPort > 65535 || c.RaftPort == 0 && c.BindPort == 65535 {
		return fmt.Errorf("consensus port %d out of range", c.RaftPort)
	}
	if net.ParseIP(c.BindAddr) == nil {
		return fmt.Errorf("bind address %q is not an IP address", c.BindAddr)
	}
	if c.AdvertiseAddr != "" {
		a, err := netip.ParseAddr(c.AdvertiseAddr)
		if err != nil || a.IsUnspecified() {
			return fmt.Errorf("advertise address %q is not a usable IP address", c.AdvertiseAddr)
		}
	}
	if c.PublicKey.IsZero() {
		return errors.New("no WireGuard public key")
	}
	if c.ReconnectInterval <= 0 {
		return errors.New("reconnect interval must be positive")
	}
	if c.RelayPort == 0 && c.RelayPorts != 0 || c.RelayPort != 0 && (c.RelayPorts < 2 || int(c.RelayPort)+int(c.RelayPorts) > 65536) {
		return fmt.Errorf("relay ports %d to %d: want at least two, within 1 to 65535", c.RelayPort, int(c.RelayPort)+int(c.RelayPorts)-1)
	}
	return nil
}

func (c *Config) raftPort() int {
	if c.RaftPort != 0 {
		return c.RaftPort
	}
	return c.BindPort + 1
}

// Mesh is this node's membership in the cluster, its replica of the
// catalog and of the gossip records.
//
// Locking: mu guards the replica and everything next to it. memberlist
// calls the delegates with its own locks held, so code holding mu must
// never call into memberlist (or its broadcast queue), nor into the
// consensus node: changes are put in an outbox under mu and sent after it
// is released. mu may be held while reading the catalog (FSM.Read).
type Mesh struct {
	cfg  Config
	log  *slog.Logger
	tls  *crypto.ClusterTLS
	node *consensus.Node
	gen  uint64

	ml      atomic.Pointer[memberlist.Memberlist]
	keyring atomic.Pointer[memberlist.Keyring]
	// gossipNet is memberlist's transport (package gossipnet), over
	// sockets of its own (gossipnet.NetTransport) unless Config.Transport
	// is given.
	gossipNet *gossipnet.Transport
	sockets   *gossipnet.NetTransport
	pmtu      *reachability.Prober
	// raftListener is the consensus port's listener.
	raftListener net.Listener
	queue        *memberlist.TransmitLimitedQueue
	kick         chan struct{}
	// changes is signalled (never blocking) whenever the View may differ.
	changes chan struct{}
	stats   gossipStats
	wg      sync.WaitGroup

	// nameChanges is signalled (never blocking) whenever LiveNames may
	// differ.
	nameChanges chan struct{}

	mu      sync.Mutex
	rep     *records.Replica
	live    map[string]liveRecord
	joined  bool
	counter uint64
	self    NodeInfo
	meta    []byte
	// metaStale is set when this node's info must be published again.
	metaStale bool
	outbox    []outMsg
	addr      netip.Addr
	leaving   bool
	// gossipDirty marks the saved gossip as behind; lastSave is when it
	// was last written.
	gossipDirty bool
	lastSave    time.Time
	// mutations counts changes of the replica, liveness and this node's
	// info; lastSig is what the driver was last told about.
	mutations uint64
	lastSig   viewSig
	problems  problems
	legacy    *legacyState
	// probeInterval is memberlist's, for the suspect heuristic.
	probeInterval time.Duration
	started       time.Time
	// reach judges how members reach this node (reach.go).
	reach *reachability.Tracker
}

type outMsg struct {
	name string // invalidates older queued broadcasts with the same name
	b    []byte
}

// seedRetryMin and seedRetryMax bound the backoff of a node that could
// not reach any seed.
const (
	seedRetryMin = 100 * time.Millisecond
	seedRetryMax = time.Second
)

// New creates a Mesh. It binds the consensus port (so that a port in use
// fails at start) but starts nothing; Run does.
func New(cfg Config) (*Mesh, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.DirectFanout < 0 {
		cfg.DirectFanout = 0
	}
	addr, err := advertiseAddr(cfg)
	if err != nil {
		return nil, err
	}
	tlsc, err := crypto.NewClusterTLS(cfg.Identity, cfg.Keyring)
	if err != nil {
		return nil, err
	}
	m := &Mesh{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "mesh"),
		tls:     tlsc,
		kick:    make(chan struct{}, 1),
		changes: make(chan struct{}, 1),
		rep:     records.NewReplica(cfg.Name),
		live:    map[string]liveRecord{},
		addr:    addr,

		nameChanges: make(chan struct{}, 1),
	}
	m.probeInterval = m.baseMemberlist().ProbeInterval
	m.queue = &memberlist.TransmitLimitedQueue{
		NumNodes: func() int {
			if ml := m.ml.Load(); ml != nil {
				return ml.NumMembers()
			}
			return 1
		},
		RetransmitMult: 4,
	}
	if cfg.StateDir != "" {
		if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
			return nil, fmt.Errorf("creating state directory: %w", err)
		}
		if m.legacy, err = loadLegacy(filepath.Join(cfg.StateDir, legacyFile), cfg.Name); err != nil {
			return nil, err
		}
	}
	l := cfg.RaftListener
	if l == nil {
		hostPort := net.JoinHostPort(cfg.BindAddr, strconv.Itoa(cfg.raftPort()))
		lc := net.ListenConfig{Control: mssControl(func(netip.Addr) int { return controlMTU })}
		if l, err = lc.Listen(context.Background(), "tcp", hostPort); err != nil {
			return nil, fmt.Errorf("consensus port: %w", err)
		}
	}
	m.raftListener = l
	dial := cfg.RaftDial
	if dial == nil {
		// The agent's own TCP keeps its packets within the path (tcpmss.go).
		dial = func(ctx context.Context, addr string) (net.Conn, error) {
			d := net.Dialer{Control: mssControl(m.controlMTUTo)}
			return d.DialContext(ctx, "tcp", addr)
		}
	}
	if cfg.RaftListener != nil {
		m.cfg.RaftPort = l.Addr().(*net.TCPAddr).Port
	}
	// Gossip is bound first: while this node asks its seeds how they see
	// it (dialback.go), it answers the same question for nodes starting
	// beside it.
	if err := m.bindGossip(); err != nil {
		l.Close()
		return nil, err
	}
	m.reach = reachability.NewTracker(reachability.Config{Name: cfg.Name, Identity: cfg.Identity,
		Transport: m.gossipNet, Cluster: reachCluster{m}, Logger: m.log})
	if tl, ok := l.(*net.TCPListener); ok && cfg.AdvertiseAddr == "" && len(cfg.Join) > 0 {
		if m.sockets != nil {
			m.sockets.Start()
		}
		m.gossipNet.StartStreams()
		ctx, cancel := context.WithTimeout(context.Background(), dialbackPatience+3*gossipnet.DialbackWait)
		addr = discoverAddr(ctx, m.cfg, m.gossipNet, tl, addr, m.log)
		cancel()
		m.addr = addr
	}
	advertise := net.JoinHostPort(addr.String(), strconv.Itoa(m.cfg.raftPort()))
	ccfg := consensus.Config{
		Name: cfg.Name, Identity: cfg.Identity, TLS: tlsc, Addr: addr, Dir: cfg.StateDir,
		Listener: l, Advertise: advertise, Dial: dial, Membership: membership{m}, Logger: cfg.Logger,
		Raft: cfg.Consensus.Raft, StableWait: cfg.Consensus.StableWait, DeadVoterTimeout: cfg.Consensus.DeadVoterTimeout,
		DeadNonvoterTimeout: cfg.Consensus.DeadNonvoterTimeout, Tick: cfg.Consensus.Tick, MaxVoters: cfg.Consensus.MaxVoters,
		Server: cfg.Server, ServerKey: cfg.ServerKey,
	}
	if m.node, err = consensus.New(ccfg); err != nil {
		l.Close()
		_ = m.gossipNet.Shutdown()
		return nil, err
	}
	_, m.gen = m.node.Identity()
	m.gossipNet.SetGeneration(m.gen)
	if err := m.loadGossip(); err != nil {
		m.log.Warn("ignoring saved gossip", "err", err)
	}
	m.mu.Lock()
	m.setSelfInfoLocked()
	m.mu.Unlock()
	return m, nil
}

// bindGossip opens the gossip port (unless the configuration brings a
// transport) and the reflection port, so that a port in use fails at
// start.
func (m *Mesh) bindGossip() error {
	inner := m.cfg.Transport
	if inner == nil {
		// The agent's own TCP keeps its packets within the path
		// (tcpmss.go); until path MTUs are known, what the listener
		// accepts keeps to controlMTU.
		t, err := gossipnet.NewNetTransport(m.cfg.BindAddr, m.cfg.BindPort,
			mssControl(func(netip.Addr) int { return controlMTU }), mssControl(m.controlMTUTo), m.log)
		if err != nil {
			return err
		}
		m.sockets, inner = t, t
		m.cfg.BindPort = t.Port()
	}
	nat, ok := inner.(memberlist.NodeAwareTransport)
	if !ok {
		return errors.New("the gossip transport must be node-aware")
	}
	m.gossipNet = gossipnet.New(nat, m.cfg.Name)
	m.gossipNet.SetKeyring(m.cfg.Keyring)
	if m.cfg.RelayPort != 0 {
		hostPort := net.JoinHostPort(m.cfg.BindAddr, strconv.Itoa(int(m.cfg.RelayPort)))
		ua, err := net.ResolveUDPAddr("udp", hostPort)
		var c *net.UDPConn
		if err == nil {
			c, err = net.ListenUDP("udp", ua)
		}
		if err != nil {
			if m.sockets != nil {
				_ = m.sockets.Shutdown()
			}
			return fmt.Errorf("relay port %d: %w", m.cfg.RelayPort, err)
		}
		m.gossipNet.SetReflector(c)
	}
	interval := m.cfg.PMTUInterval
	if interval == 0 {
		interval = 30 * time.Second
	}
	if interval > 0 && m.gossipNet.CanProbe() {
		m.pmtu = reachability.NewProber(m.gossipNet, interval, m.rttOf, func() {
			m.setListenersMSS()
			m.touch()
		})
	}
	return nil
}

// setListenersMSS sets the MSS of the TCP listeners for the path MTUs
// now known (tcpmss.go).
func (m *Mesh) setListenersMSS() {
	mtu := m.listenMTU()
	for _, l := range []net.Listener{m.raftListener, m.sockets.Listener()} {
		if l == nil {
			continue
		}
		if err := setListenerMSS(l, mtu); err != nil {
			m.log.Debug("setting the MSS of a listener", "addr", l.Addr().String(), "err", err)
		}
	}
}

// rttOf is the last gossip round trip to a member.
func (m *Mesh) rttOf(name string) time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.live[name].rtt
}

// touch records a change from outside the replica (a path MTU) and wakes
// the loop.
func (m *Mesh) touch() {
	m.mu.Lock()
	m.mutations++
	m.mu.Unlock()
	m.kickLoop()
}

// advertiseAddr picks the address peers reach this node at, the way
// memberlist would, but before memberlist starts: the address goes into
// this node's metadata.
func advertiseAddr(cfg Config) (netip.Addr, error) {
	if cfg.AdvertiseAddr != "" {
		return netip.ParseAddr(cfg.AdvertiseAddr)
	}
	if a, err := netip.ParseAddr(cfg.BindAddr); err == nil && !a.IsUnspecified() {
		return a, nil
	}
	ip, err := sockaddr.GetPrivateIP()
	if err != nil {
		return netip.Addr{}, fmt.Errorf("finding an address to advertise: %w", err)
	}
	if ip == "" {
		return netip.Addr{}, errors.New("no private address to advertise; set --advertise-addr")
	}
	return netip.ParseAddr(ip)
}

// version returns a new version for one of this node's records.
func (m *Mesh) versionLocked() uint64 {
	m.counter++
	return m.gen<<32 | m.counter&0xffffffff
}

func (m *Mesh) setSelfInfoLocked() {
	nat := m.reach.NAT()
	m.self = NodeInfo{
		Name:       m.cfg.Name,
		ID:         m.cfg.Identity.ID(),
		Version:    m.versionLocked(),
		PublicKey:  m.cfg.PublicKey,
		Addr:       m.addr,
		GossipPort: uint16(m.cfg.BindPort),
		RaftPort:   uint16(m.cfg.raftPort()),
		WGMode:     m.cfg.WGMode,
		Leaving:    m.leaving,
		ClusterID:  m.node.ClusterID(),
		Features:   records.FeatureHeader | records.FeatureRelayBind | records.FeatureReplayProof | m.cfg.serverFeatures(),
		NAT:        nat.Kind,
	}
	if nat.Kind.Behind() {
		m.self.Seen = nat.Seen
	}
	if m.cfg.RelayPort != 0 && nat.Kind == NATNone {
		m.self.RelayPort, m.self.RelayPorts = m.cfg.RelayPort, m.cfg.RelayPorts
	}
	m.meta = records.EncodeMeta(records.Sign(m.cfg.Identity, records.PurposeInfo, m.self))
	m.metaStale = true
	m.mutations++
}

// touchLocked records that the replica or liveness changed: the saved
// gossip is behind, and the driver must look again.
func (m *Mesh) touchLocked() {
	m.gossipDirty = true
	m.mutations++
}

// Name returns this node's name.
func (m *Mesh) Name() string { return m.cfg.Name }

// Addr returns the address this node advertises.
func (m *Mesh) Addr() netip.Addr { return m.addr }

// Changes is signalled whenever the View may have changed. It has a
// buffer of one and is never blocked on: a receiver must re-read the
// whole View rather than count signals.
func (m *Mesh) Changes() <-chan struct{} { return m.changes }

func (m *Mesh) kickLoop() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

func (m *Mesh) notifyChanged() {
	select {
	case m.changes <- struct{}{}:
	default:
	}
	// Liveness decides which names are used.
	m.notifyNames()
}

// ErrRefused wraps the cluster's refusal of this node: a taken name, an
// identity used under another name, a forgotten identity. The agent
// cannot work until an operator acts, so Run returns it.
var ErrRefused = errors.New("the cluster refuses this node")

// Run starts gossip and consensus, joins the seeds and runs the mesh until
// ctx is done, then leaves the cluster if configured to. It returns an
// error if gossip could not start or the cluster refuses this node.
func (m *Mesh) Run(ctx context.Context) error {
	conf := m.memberlistConfig()
	if m.sockets != nil {
		m.sockets.Start()
	}
	m.gossipNet.Start()
	ml, err := memberlist.Create(conf)
	if err != nil {
		m.node.Close()
		_ = m.gossipNet.Shutdown()
		return fmt.Errorf("starting gossip on %s:%d: %w", conf.BindAddr, conf.BindPort, err)
	}
	m.ml.Store(ml)
	m.mu.Lock()
	m.started = time.Now()
	m.mu.Unlock()
	m.log.Info("gossip started", "addr", m.addr, "port", conf.BindPort, "raft_port", m.cfg.raftPort(), "encrypted", conf.Keyring != nil)

	nodeCtx, stopNode := context.WithCancel(context.Background())
	nodeDone := make(chan error, 1)
	go func() { nodeDone <- m.node.Run(nodeCtx) }()
	// The mesh's own goroutines stop with Run, also when it returns on
	// an error rather than because ctx is done.
	ctx, stopLoops := context.WithCancel(ctx)
	defer stopLoops()
	m.wg.Add(1)
	go m.loopReconnect(ctx)
	if m.pmtu != nil {
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.pmtu.Run(ctx)
		}()
	}

	ticker := time.NewTicker(time.Second)
	defer ticker.Stop()
	var runErr error
	m.step(ctx)
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case err := <-nodeDone:
			nodeDone <- err
			runErr = fmt.Errorf("consensus stopped: %w", err)
			break loop
		case <-m.kick:
		case <-ticker.C:
		case <-m.node.Changes():
		}
		if err := m.step(ctx); err != nil {
			runErr = err
			break loop
		}
	}
	stopLoops()
	m.shutdown(ml, stopNode, nodeDone)
	return runErr
}

func (m *Mesh) shutdown(ml *memberlist.Memberlist, stopNode context.CancelFunc, nodeDone chan error) {
	if m.cfg.LeaveOnShutdown {
		lctx, cancel := context.WithTimeout(context.Background(), m.cfg.LeaveTimeout)
		if err := m.node.Leave(lctx); err != nil {
			m.log.Warn("leaving consensus", "err", err)
		}
		cancel()
		// Say we are leaving on purpose, then leave, so that peers show
		// this node as left rather than failed.
		m.mu.Lock()
		m.leaving = true
		m.setSelfInfoLocked()
		m.mu.Unlock()
		if err := ml.UpdateNode(m.cfg.LeaveTimeout); err != nil {
			m.log.Warn("announcing leave", "err", err)
		}
		if err := ml.Leave(m.cfg.LeaveTimeout); err != nil {
			m.log.Warn("leaving the cluster", "err", err)
		}
	}
	stopNode()
	if err := <-nodeDone; err != nil {
		m.log.Warn("consensus stopped", "err", err)
	}
	if err := ml.Shutdown(); err != nil {
		m.log.Warn("stopping gossip", "err", err)
	}
	m.wg.Wait()
	m.saveGossip()
	m.log.Info("gossip stopped")
}

// baseMemberlist returns a copy of the memberlist tuning to start from.
func (m *Mesh) baseMemberlist() *memberlist.Config {
	if m.cfg.Memberlist != nil {
		c := *m.cfg.Memberlist
		return &c
	}
	return memberlist.DefaultLANConfig()
}

func (m *Mesh) memberlistConfig() *memberlist.Config {
	conf := m.baseMemberlist()
	conf.Name = m.cfg.Name
	conf.BindAddr = m.cfg.BindAddr
	conf.BindPort = m.cfg.BindPort
	conf.AdvertiseAddr = m.addr.String()
	conf.AdvertisePort = m.cfg.BindPort
	d := &delegate{m}
	conf.Delegate = d
	conf.Events = d
	conf.Alive = d
	conf.Conflict = d
	conf.Ping = d
	// Push/pull with a member behind NAT fails by design: it happens
	// when that member dials out.
	conf.Logger = logbridge.StdLogger(m.cfg.Logger.With("component", "memberlist"), gossipnet.ErrBehindNAT.Error())
	conf.LogOutput = nil
	conf.Transport = m.gossipNet
	// TCP fallback probes cannot reach a member behind NAT either.
	conf.DisableTcpPingsForNode = func(name string) bool { return !m.gossipNet.Dialable(name) }
	if len(m.cfg.Keyring) > 0 {
		// Errors are impossible: crypto validated the key lengths.
		ring, _ := memberlist.NewKeyring(m.cfg.Keyring, m.cfg.Keyring.Primary())
		conf.Keyring = ring
		m.keyring.Store(ring)
		conf.GossipVerifyIncoming = true
		conf.GossipVerifyOutgoing = true
	}
	return conf
}

// memberlist returns the running memberlist, or nil before Run.
func (m *Mesh) memberlist() *memberlist.Memberlist { return m.ml.Load() }

// loopReconnect retries the seeds while this node is alone and tries to
// reach members it believes failed. memberlist stops talking to dead
// nodes after GossipToTheDeadTime; without this, two halves of a
// partition that lasted longer would never find each other again.
func (m *Mesh) loopReconnect(ctx context.Context) {
	defer m.wg.Done()
	interval := m.cfg.ReconnectInterval
	wait := time.Duration(0)
	// While alone, seeds are retried quickly at first: when a whole
	// cluster starts at once, most seeds come up within moments.
	backoff := seedRetryMin
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = interval
		ml := m.memberlist()
		if ml.NumMembers() < 2 && len(m.cfg.Join) > 0 {
			n, err := ml.Join(m.cfg.Join)
			if err != nil && n == 0 {
				m.log.Warn("joining seeds", "seeds", m.cfg.Join, "err", err, "retry_in", min(backoff, interval))
				wait = min(backoff, interval)
				backoff = min(2*backoff, seedRetryMax)
			}
		}
		if addrs := m.failedAddrs(ml); len(addrs) > 0 {
			if n, _ := ml.Join(addrs); n > 0 {
				m.log.Info("reconnected to members believed failed", "contacted", n)
			}
		}
		// Never call memberlist under m.mu: memberlist calls the delegate,
		// which takes m.mu, while it holds its own lock.
		if members := ml.NumMembers(); members >= 2 {
			m.mu.Lock()
			if !m.joined {
				m.joined = true
				m.log.Info("joined the cluster", "members", members)
			}
			m.mu.Unlock()
			m.kickLoop()
		}
	}
}

// failedAddrs lists gossip addresses of known members that memberlist
// does not count as alive, skipping ones that left on purpose.
func (m *Mesh) failedAddrs(ml *memberlist.Memberlist) []string {
	alive := map[string]bool{}
	for _, n := range ml.Members() {
		alive[n.Name] = true
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for name, n := range m.rep.Infos() {
		if alive[name] || n.Leaving || n.GossipPort == 0 || n.NAT.Behind() {
			// A member behind NAT cannot be dialled; it comes back by
			// itself.
			continue
		}
		out = append(out, net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.GossipPort))))
	}
	return out
}

// step is one pass of the mesh loop: publish this node's info when it
// changed, upgrade legacy state, save gossip, send what changed, and tell
// the driver.
func (m *Mesh) step(ctx context.Context) error {
	if err := m.node.Refusal(); err != nil && !errors.Is(err, catalog.ErrRolledBack) {
		return fmt.Errorf("%w: %w", ErrRefused, err)
	}
	now := time.Now()
	m.mu.Lock()
	if m.self.ClusterID != m.node.ClusterID() {
		m.setSelfInfoLocked()
	}
	m.reassessNATLocked(now)
	hints := m.reach.RouteHints()
	observations := m.reach.Observations(now)
	reflect := m.reach.ReflectTargets(now)
	updateMeta := m.metaStale
	m.metaStale = false
	m.pruneNamesLocked(time.Now())
	out := m.outbox
	m.outbox = nil
	m.mu.Unlock()

	m.gossipNet.SetHints(hints)
	for _, r := range reflect {
		m.gossipNet.AskReflection(r.Name, r.To)
	}

	if updateMeta {
		if ml := m.memberlist(); ml != nil {
			if err := ml.UpdateNode(m.cfg.LeaveTimeout); err != nil {
				m.log.Warn("publishing node metadata", "err", err)
			}
		}
	}
	m.send(out)
	m.sendDirect(m.memberlist(), observations)
	if err := m.checkForgotten(); err != nil {
		return err
	}
	m.migrateLegacy(ctx)
	m.saveGossipThrottled()
	if sig := m.signature(); sig != m.lastSig {
		// Only a change wakes the driver: an idle cluster costs an
		// idle host nothing.
		m.lastSig = sig
		m.notifyChanged()
	}
	return nil
}

// viewSig summarises what the View depends on: mutations, the catalog's
// index, and the liveness the View derives from time (suspect, failed).
type viewSig struct {
	mutations, index uint64
	states           uint64
}

func (m *Mesh) signature() viewSig {
	v := m.View()
	h := fnv.New64a()
	for _, name := range slices.Sorted(maps.Keys(v.Members)) {
		fmt.Fprintf(h, "%s=%d;", name, v.Members[name].State)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return viewSig{mutations: m.mutations, index: v.Catalog.Index, states: h.Sum64()}
}

// maxBroadcast keeps a gossip message inside one UDP packet with room for
// memberlist's framing and encryption.
const maxBroadcast = 1100

// send gossips messages and, in small clusters, sends them directly.
//
// Direct sends go by address, from the copies nodeEvent keeps, not to the
// *memberlist.Node that Members returns: memberlist updates those nodes in
// place under its lock (a member's protocol versions on every alive
// message), and SendBestEffort reads them without it, a data race inside
// memberlist v0.7.
func (m *Mesh) send(msgs []outMsg) {
	ml := m.memberlist()
	if ml == nil || len(msgs) == 0 {
		return
	}
	var peers []memberlist.Address
	direct := ml.NumMembers() <= m.cfg.DirectFanout
	if direct {
		m.mu.Lock()
		for name, rec := range m.live {
			if rec.state == Alive && rec.addr != "" && name != m.cfg.Name {
				peers = append(peers, memberlist.Address{Addr: rec.addr, Name: name})
			}
		}
		m.mu.Unlock()
	}
	for _, msg := range msgs {
		m.queue.QueueBroadcast(&broadcast{name: msg.name, msg: msg.b})
		for _, to := range peers {
			if err := ml.SendToAddress(to, msg.b); err != nil {
				m.log.Debug("sending to member", "peer", to.Name, "err", err)
			}
			m.stats.sent(len(msg.b))
			if msg.b[0] == records.KindName {
				m.stats.nameSent(len(msg.b))
			}
		}
	}
}

// View returns a snapshot of the mesh as this node sees it.
func (m *Mesh) View() *View {
	cat := m.node.FSM().State()
	m.mu.Lock()
	defer m.mu.Unlock()
	v := buildView(m.cfg.Name, cat, m.rep, m.self, m.live)
	var sightings map[string]gossipnet.Sighting
	var pmtus map[string]PathMTU
	if m.gossipNet != nil {
		sightings = m.gossipNet.Sightings()
	}
	if m.pmtu != nil {
		pmtus = m.pmtu.Results()
	}
	for name, mem := range v.Members {
		s, seen := sightings[name]
		p, measured := pmtus[name]
		if !seen && !measured {
			continue
		}
		mem.Sighted, mem.SightedAt, mem.PathMTU = s.Addr, s.At, p.MTU
		v.Members[name] = mem
	}
	// memberlist probes one member per interval, so a member normally
	// answers once every len(members) intervals; three missed rounds make
	// it suspect.
	suspectAfter := 3 * time.Duration(max(len(v.Members), 2)) * m.probeInterval
	now := time.Now()
	selfNAT := v.Members[v.Self].NAT
	for name, mem := range v.Members {
		// Two hosts behind NAT may have no direct path at all; memberlist
		// then probes one through others, which answers no direct probe.
		natted := selfNAT.Behind() && mem.NAT.Behind() && !mem.Direct(now)
		switch {
		case mem.State == Alive && !mem.Self && !natted && now.Sub(mem.LastAck) > suspectAfter:
			mem.State = Suspect
		case mem.State == Unknown && !m.started.IsZero() && now.Sub(m.started) > m.unknownGrace():
			// Gossip has had time to find it and has not: treat it as
			// failed, like memberlist would have.
			mem.State, mem.Since = Dead, m.started
		default:
			continue
		}
		v.Members[name] = mem
	}
	return v
}

// unknownGrace is how long a member known only from the catalog or saved
// gossip may stay unconfirmed before it counts as failed: long enough for
// the seeds to be joined and a reconnect round to reach it.
func (m *Mesh) unknownGrace() time.Duration {
	return 3*m.cfg.ReconnectInterval + 10*m.probeInterval
}
