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
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/consensus"
	"github.com/wgmesh/wgmesh/mesh/gossipnet"
	"github.com/wgmesh/wgmesh/mesh/reachability"
	"github.com/wgmesh/wgmesh/mesh/records"
)

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

// touch records a change from outside the replica (a path MTU) and wakes
// the loop.
func (m *Mesh) touch() {
	m.mu.Lock()
	m.mutations++
	m.mu.Unlock()
	m.kickLoop()
}

// touchLocked records that the replica or liveness changed: the saved
// gossip is behind, and the driver must look again.
func (m *Mesh) touchLocked() {
	m.gossipDirty = true
	m.mutations++
}

// rttOf is the last gossip round trip to a member.
func (m *Mesh) rttOf(name string) time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.live[name].rtt
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
