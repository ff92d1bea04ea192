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
// Locking: mu guards state, the replica and everything next to it.
// memberlist calls the delegates with its own locks held, so code holding
// mu must never call into memberlist (or its broadcast queue), nor into
// the consensus node: changes are put in an outbox under mu and sent
// after it is released. mu may be held while reading the catalog
// (FSM.Read).
type Mesh struct {
	cfg Config
	log *slog.Logger
	// addr is the address this node advertises, settled in New.
	addr netip.Addr

	node *consensus.Node
	// tls is what consensus connections authenticate with; SetKeyring
	// rekeys it.
	tls *crypto.ClusterTLS
	// raftListener is the consensus port's listener.
	raftListener net.Listener

	gossip gossip
	// pmtu is nil when probing is off or the transport cannot probe.
	pmtu    *reachability.Prober
	signals signals
	wg      sync.WaitGroup
	// lastSig is what the driver was last told about; only the run loop
	// touches it.
	lastSig  viewSig
	problems problems

	mu    sync.Mutex
	state state
}

// signals are channels of capacity one, sent to without blocking: a
// receiver re-reads what may have changed rather than count signals.
type signals struct {
	// kick wakes the run loop.
	kick chan struct{}
	// changes: the View may differ; names: LiveNames may differ.
	changes, names chan struct{}
}

// state is what Mesh.mu guards.
type state struct {
	rep  *records.Replica
	live map[string]liveRecord
	// reach judges how members reach this node (reach.go); it has no
	// lock of its own.
	reach *reachability.Tracker
	own   own
	// outbox holds what to send once mu is released.
	outbox []outMsg
	// joined: this node has seen its cluster. started: when Run started
	// gossip, from which a member never confirmed counts as failed.
	joined  bool
	started time.Time
	// mutations counts changes of the replica, liveness and this node's
	// info.
	mutations uint64
	// gossipDirty marks the saved gossip as behind; lastSave is when it
	// was last written.
	gossipDirty bool
	lastSave    time.Time
	legacy      *legacyState
}

// own is this node's info as it publishes it.
type own struct {
	// The versions of this node's records count up from gen<<32, gen
	// being its generation (consensus keeps it durably), so that a
	// restarted node's records are newer than its last run's.
	gen, counter uint64
	info         NodeInfo
	// meta is info, signed and encoded for memberlist's node metadata;
	// metaStale is set when it must be published again.
	meta      []byte
	metaStale bool
	leaving   bool
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
		addr:    addr,
		signals: signals{kick: make(chan struct{}, 1), changes: make(chan struct{}, 1), names: make(chan struct{}, 1)},
		state:   state{rep: records.NewReplica(cfg.Name), live: map[string]liveRecord{}},
	}
	m.gossip.probeInterval = m.baseMemberlist().ProbeInterval
	m.gossip.queue = &memberlist.TransmitLimitedQueue{
		NumNodes: func() int {
			if ml := m.gossip.ml.Load(); ml != nil {
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
		if m.state.legacy, err = loadLegacy(filepath.Join(cfg.StateDir, legacyFile), cfg.Name); err != nil {
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
	m.state.reach = reachability.NewTracker(reachability.Config{Name: cfg.Name, Identity: cfg.Identity,
		Transport: m.gossip.net, Cluster: reachCluster{m}, Logger: m.log})
	if tl, ok := l.(*net.TCPListener); ok && cfg.AdvertiseAddr == "" && len(cfg.Join) > 0 {
		if m.gossip.sockets != nil {
			m.gossip.sockets.Start()
		}
		m.gossip.net.StartStreams()
		ctx, cancel := context.WithTimeout(context.Background(), dialbackPatience+3*gossipnet.DialbackWait)
		addr = discoverAddr(ctx, m.cfg, m.gossip.net, tl, addr, m.log)
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
		_ = m.gossip.net.Shutdown()
		return nil, err
	}
	_, m.state.own.gen = m.node.Identity()
	m.gossip.net.SetGeneration(m.state.own.gen)
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
func (m *Mesh) Changes() <-chan struct{} { return m.signals.changes }

func (m *Mesh) kickLoop() {
	select {
	case m.signals.kick <- struct{}{}:
	default:
	}
}

func (m *Mesh) notifyChanged() {
	select {
	case m.signals.changes <- struct{}{}:
	default:
	}
	// Liveness decides which names are used.
	m.notifyNames()
}

// touch records a change from outside the replica (a path MTU) and wakes
// the loop.
func (m *Mesh) touch() {
	m.mu.Lock()
	m.state.mutations++
	m.mu.Unlock()
	m.kickLoop()
}

// touchLocked records that the replica or liveness changed: the saved
// gossip is behind, and the driver must look again.
func (m *Mesh) touchLocked() {
	m.state.gossipDirty = true
	m.state.mutations++
}

// rttOf is the last gossip round trip to a member.
func (m *Mesh) rttOf(name string) time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state.live[name].rtt
}

// versionLocked returns a new version for one of this node's records.
func (m *Mesh) versionLocked() uint64 {
	own := &m.state.own
	own.counter++
	return own.gen<<32 | own.counter&0xffffffff
}

func (m *Mesh) setSelfInfoLocked() {
	nat, own := m.state.reach.NAT(), &m.state.own
	own.info = NodeInfo{
		Name:       m.cfg.Name,
		ID:         m.cfg.Identity.ID(),
		Version:    m.versionLocked(),
		PublicKey:  m.cfg.PublicKey,
		Addr:       m.addr,
		GossipPort: uint16(m.cfg.BindPort),
		RaftPort:   uint16(m.cfg.raftPort()),
		WGMode:     m.cfg.WGMode,
		Leaving:    own.leaving,
		ClusterID:  m.node.ClusterID(),
		Features:   records.FeatureHeader | records.FeatureRelayBind | records.FeatureReplayProof | m.cfg.serverFeatures(),
		NAT:        nat.Kind,
	}
	if nat.Kind.Behind() {
		own.info.Seen = nat.Seen
	}
	if m.cfg.RelayPort != 0 && nat.Kind == NATNone {
		own.info.RelayPort, own.info.RelayPorts = m.cfg.RelayPort, m.cfg.RelayPorts
	}
	own.meta = records.EncodeMeta(records.Sign(m.cfg.Identity, records.PurposeInfo, own.info))
	own.metaStale = true
	m.state.mutations++
}
