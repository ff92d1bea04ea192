// Package consensus runs the catalog (package catalog) under Raft, with
// hashicorp/raft: every node of a wgmesh cluster is a Raft server, a few
// of them (3 or 5, chosen automatically) voters and the rest non-voters
// that receive the log, so that every host holds the committed catalog
// locally and can check against it what its peers say.
//
// Nobody designates servers. A node with no Raft state joins the cluster
// that gossip shows it, or, when gossip shows none, the lowest-named node
// of a stable view bootstraps one (see join.go). The leader keeps the
// voter set healthy (autopilot.go), as Consul's autopilot does. Claims
// and other commands go to the leader over the consensus port, signed by
// the asking node.
//
// All consensus traffic, Raft's and ours, runs over one TCP port under
// mutual TLS derived from the cluster key (crypto.ClusterTLS), and Raft
// traffic is accepted only from the current voters.
package consensus

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	wal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
	"github.com/hashicorp/raft-wal/segment"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/internal/logbridge"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// Member is a node as gossip sees it.
type Member struct {
	Name string
	ID   crypto.NodeID
	// RaftAddr is where it serves consensus (host:port).
	RaftAddr string
	// ClusterID is the cluster it belongs to; empty until it has joined
	// or bootstrapped one.
	ClusterID string
	Alive     bool
	Self      bool
	// BehindNAT: members cannot dial it (it parks connections with
	// them, reverse.go), so it is never made a voter.
	BehindNAT bool
	// Server is the member's --server setting, and ClaimsServerKey
	// whether it says it holds the server key (servers.go), as it
	// publishes them; the proof of the key goes over TLS.
	Server          ServerMode
	ClaimsServerKey bool
}

// Membership is what consensus needs of gossip. Implementations must not
// call into the Node while holding locks the Node may wait for.
type Membership interface {
	// Members lists the members gossip knows, this node included.
	Members() []Member
	// Joined reports whether this node has met its cluster: it was given
	// no seeds, or it has reached one, or another member reached it.
	Joined() bool
	// MissingSeeds lists the seeds (--join) that are not alive members
	// of this node's gossip view.
	MissingSeeds() []string
}

// Config configures a Node.
type Config struct {
	Name     string
	Identity crypto.Identity
	TLS      *crypto.ClusterTLS
	// Addr is the address this node advertises (for registration).
	Addr netip.Addr
	// Dir holds Raft's log, stable store and snapshots, and this node's
	// generation counter. Empty keeps everything in memory (tests).
	Dir string
	// Listener accepts consensus connections; Advertise is where other
	// nodes reach it (host:port).
	Listener  net.Listener
	Advertise string
	// Dial opens connections; nil dials TCP.
	Dial       DialFunc
	Membership Membership
	Logger     *slog.Logger

	// Timing: Raft's base config (nil: production defaults), how long a
	// gossip view must stay the same before this node may bootstrap a
	// cluster, and how long the autopilot waits before replacing a dead
	// voter and dropping a dead non-voter.
	Raft                *raft.Config
	StableWait          time.Duration
	DeadVoterTimeout    time.Duration
	DeadNonvoterTimeout time.Duration
	// MaxVoters caps the voter set (3 or 5; default 5).
	MaxVoters int
	// Tick is how often the join and autopilot loop runs.
	Tick time.Duration
	// Server says whether this node may vote (servers.go); ServerKey,
	// when set, is the key that names the hosts that may.
	Server    ServerMode
	ServerKey []byte
}

// DefaultRaftConfig is Raft's timing for hosts across clouds: the library
// defaults are tuned for one LAN; these tolerate round trips of a few
// hundred milliseconds while still electing a new leader in seconds.
func DefaultRaftConfig() *raft.Config {
	c := raft.DefaultConfig()
	// Raft heartbeats every follower at a tenth of HeartbeatTimeout: at
	// 3 s, idle hosts exchange a few small messages a second, and a
	// failed leader is replaced within seconds (claims wait that long).
	c.HeartbeatTimeout = 3 * time.Second
	c.ElectionTimeout = 3 * time.Second
	c.LeaderLeaseTimeout = 1500 * time.Millisecond
	// An idle leader sends every follower an empty append every
	// CommitTimeout to tell it of commits; applyLocal tells them at once
	// with a barrier instead, so this only bounds a rare miss.
	c.CommitTimeout = time.Second
	c.SnapshotThreshold = 1024
	c.TrailingLogs = 1024
	c.SnapshotInterval = 60 * time.Second
	return c
}

func (c *Config) setDefaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Raft == nil {
		c.Raft = DefaultRaftConfig()
	}
	if c.StableWait == 0 {
		c.StableWait = 2 * time.Second
	}
	if c.DeadVoterTimeout == 0 {
		c.DeadVoterTimeout = 30 * time.Second
	}
	if c.DeadNonvoterTimeout == 0 {
		c.DeadNonvoterTimeout = 2 * time.Minute
	}
	if c.MaxVoters == 0 {
		c.MaxVoters = 5
	}
	if c.Tick == 0 {
		c.Tick = 250 * time.Millisecond
	}
}

func (c *Config) validate() error {
	switch {
	case c.Name == "":
		return errors.New("consensus: no node name")
	case c.Identity.IsZero():
		return errors.New("consensus: no identity")
	case c.TLS == nil:
		return errors.New("consensus: no TLS")
	case c.Listener == nil || c.Advertise == "":
		return errors.New("consensus: no listener or advertised address")
	case c.Membership == nil:
		return errors.New("consensus: no membership")
	case !c.Addr.IsValid():
		return errors.New("consensus: no address")
	case c.MaxVoters != 1 && c.MaxVoters != 3 && c.MaxVoters != 5:
		return fmt.Errorf("consensus: max voters %d is not 1, 3 or 5", c.MaxVoters)
	}
	if err := c.Server.validate(); err != nil {
		return err
	}
	return nil
}

// Node is this host's Raft server and its client of the cluster's leader.
type Node struct {
	cfg     Config
	log     *slog.Logger
	id      crypto.NodeID
	fsm     *catalog.FSM
	mux     *mux
	metrics *metrics
	bootID  string
	gen     uint64
	changes chan struct{}

	// savedIndex is the index of the saved copy of the catalog; saveMu
	// serialises writing it.
	savedIndex atomic.Uint64
	saveMu     sync.Mutex

	// seqMu serialises this node's commands, so that their sequence
	// numbers reach the leader in order.
	seqMu sync.Mutex
	seq   uint64

	mu     sync.Mutex
	raft   *raft.Raft
	trans  *raft.NetworkTransport
	closer func() error // the log store
	// raftDone is closed when Raft is shut down.
	raftDone chan struct{}
	// admittedBy is the leader that admitted this node; its Raft traffic
	// is accepted while this node has no configuration of its own yet.
	admittedBy crypto.NodeID
	voters     map[crypto.NodeID]bool
	votersAt   time.Time
	// A node that fell behind a configuration change does not know the
	// current leader as a voter and refuses its Raft traffic: it would
	// never catch up. refusedRaft is the last node so refused; the Run
	// loop asks the members who leads, and confirmedLeader is the node
	// they confirmed, whose traffic is then taken (leaderConfirm).
	refusedRaft    crypto.NodeID
	refusedAt      time.Time
	confirmTried   time.Time
	confirmedLdr   crypto.NodeID
	confirmedLdrAt time.Time
	registered     bool
	// fatal is a refusal that stops this node from taking part: a taken
	// name, a forgotten identity, a rolled-back state directory.
	fatal error
	// stable tracks the gossip view for the bootstrap decision.
	view      string
	viewSince time.Time
	// dead and aliveSince track servers for the autopilot.
	dead       map[crypto.NodeID]time.Time
	aliveSince map[crypto.NodeID]time.Time
	// proofs caches which servers proved they hold the server key.
	proofs   map[crypto.NodeID]bool
	joinErr  error
	shutdown bool
	// admitted is set once this node found itself in its configuration.
	admitted bool
	// diskErr is the last failure to write the state directory: a node
	// that cannot keep what it was told claims nothing rather than guess.
	diskErr error
}

// New prepares a node: it reads and advances its generation counter, so
// that a node restarted from an older copy of its state is recognised.
// It starts nothing; Run does.
func New(cfg Config) (*Node, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	n := &Node{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "consensus"),
		id:      cfg.Identity.ID(),
		fsm:     catalog.NewFSM(),
		metrics: newMetrics(),
		changes: make(chan struct{}, 1),
		dead:    map[crypto.NodeID]time.Time{},

		aliveSince: map[crypto.NodeID]time.Time{},
		proofs:     map[crypto.NodeID]bool{},
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	n.bootID = hex.EncodeToString(b)
	f, err := nextGeneration(cfg.Dir)
	if err != nil {
		return nil, err
	}
	n.gen, n.fatal = f.Generation, f.refusal()
	if err := n.readCatalog(); err != nil {
		return nil, err
	}
	if err := n.loadSnapshotBeforeStart(); err != nil {
		return nil, err
	}
	n.fsm.OnApply(n.onApply)
	n.mux = newMux(cfg.Listener, cfg.TLS, cfg.Dial, n.log)
	n.mux.allowRaft = n.allowRaft
	n.mux.rpc = n.serveRPC
	n.mux.refused = n.metrics.refused
	n.mux.lookup = n.lookupAddr
	n.mux.raftPeer = n.configServerAt
	return n, nil
}

// FSM is the local replica of the catalog.
func (n *Node) FSM() *catalog.FSM { return n.fsm }

// Changes is signalled (never blocking) whenever the catalog, the
// cluster ID, the registration or the leader may have changed.
func (n *Node) Changes() <-chan struct{} { return n.changes }

func (n *Node) notify() {
	select {
	case n.changes <- struct{}{}:
	default:
	}
}

func (n *Node) onApply(c *catalog.Command, r catalog.Result) {
	n.metrics.applied(c.Op, r.Code)
	n.notify()
}

// ClusterID is the cluster this node belongs to, as its catalog says. A
// node restarted with its state knows it at once, before it registers
// this run: it must advertise it then too, or a fresh node that sees only
// restarting nodes would think no cluster exists and start another.
func (n *Node) ClusterID() string {
	var id string
	n.fsm.Read(func(s *catalog.State) { id = s.ClusterID })
	return id
}

// Run serves consensus until ctx is done.
func (n *Node) Run(ctx context.Context) error {
	n.mux.wg.Add(1)
	go n.mux.serve()
	defer n.stop()
	parkCtx, stopParking := context.WithCancel(ctx)
	defer stopParking()
	n.mux.wg.Add(1)
	go n.loopPark(parkCtx)

	has, err := n.hasState()
	if err != nil {
		return err
	}
	if has && n.Refusal() == nil {
		// A node with Raft state has voted and acknowledged entries
		// before: it must not vote with an older copy of them.
		if err := n.checkRollback(ctx); err != nil {
			n.refused(err)
		} else if err := n.startRaft(nil); err != nil {
			return err
		}
	}
	// A node that is a settled member has little to do: it wakes every
	// few ticks (the leader's autopilot runs once a second), and at once
	// when the catalog changes, to save its copy.
	timer := time.NewTimer(0)
	defer timer.Stop()
	lastPilot, lastSave := time.Time{}, time.Time{}
	defer n.saveCatalog()
	for {
		changed := n.fsm.Changed()
		n.step(ctx)
		n.confirmRefusedLeader(ctx)
		if time.Since(lastSave) >= saveCatalogEvery {
			lastSave = time.Now()
			n.saveCatalog()
		}
		if n.isLeader() && time.Since(lastPilot) >= time.Second {
			lastPilot = time.Now()
			n.autopilot(ctx)
		}
		next := n.cfg.Tick
		if n.settled() {
			next = 4 * n.cfg.Tick
		}
		timer.Reset(next)
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		case <-changed:
			// Let a burst of entries pass before saving.
			select {
			case <-ctx.Done():
				return nil
			case <-timer.C:
			case <-time.After(saveCatalogEvery):
				timer.Stop()
			}
		}
	}
}

// settled reports whether this node is a registered member in its own
// copy of the configuration.
func (n *Node) settled() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.registered && n.raft != nil && n.admitted && n.fatal == nil
}

// step moves this node towards being a registered member of a cluster.
func (n *Node) step(ctx context.Context) {
	n.mu.Lock()
	r, registered, fatal := n.raft, n.registered, n.fatal
	n.mu.Unlock()
	if fatal != nil {
		return
	}
	switch {
	case r == nil:
		n.joinOrBootstrap(ctx)
	case !registered:
		n.register(ctx)
	default:
		n.ensureAdmitted(ctx)
	}
}

func (n *Node) hasState() (bool, error) {
	if n.cfg.Dir == "" {
		return false, nil
	}
	_, err := os.Stat(filepath.Join(n.raftDir(), "wal"))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return err == nil, err
}

func (n *Node) raftDir() string { return filepath.Join(n.cfg.Dir, "raft") }

// raftConfig is the Raft configuration of this node.
func (n *Node) raftConfig() *raft.Config {
	c := *n.cfg.Raft
	c.LocalID = raft.ServerID(n.id.String())
	c.Logger = logbridge.Hclog(n.log, "raft", hclog.Info)
	// A node removed from the configuration keeps running as a
	// non-voter candidate for re-admission rather than shutting down.
	c.ShutdownOnRemove = false
	// The catalog is loaded from this node's own copy or, when that is
	// older, from Raft's newest snapshot (catalog.go), before Raft starts:
	// Raft then replays only what came after, and the catalog is there
	// from the first moment.
	c.NoSnapshotRestoreOnStart = true
	return &c
}

// stores opens Raft's log, stable and snapshot stores.
func (n *Node) stores() (raft.LogStore, raft.StableStore, raft.SnapshotStore, func() error, error) {
	if n.cfg.Dir == "" {
		s := raft.NewInmemStore()
		return s, s, raft.NewInmemSnapshotStore(), func() error { return nil }, nil
	}
	if err := os.MkdirAll(filepath.Join(n.raftDir(), "wal"), 0o700); err != nil {
		return nil, nil, nil, nil, fmt.Errorf("creating Raft directory: %w", err)
	}
	w, closeAll, err := openWAL(filepath.Join(n.raftDir(), "wal"), n.log)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	snaps, err := n.snapshotStore()
	if err != nil {
		_ = closeAll()
		return nil, nil, nil, nil, err
	}
	logs, wrapped, err := keepAfterSnapshot(w, snaps)
	if err != nil {
		_ = closeAll()
		return nil, nil, nil, nil, err
	}
	return logs, w, wrapped, closeAll, nil
}

func (n *Node) snapshotStore() (*raft.FileSnapshotStore, error) {
	snaps, err := raft.NewFileSnapshotStoreWithLogger(n.raftDir(), 2, logbridge.Hclog(n.log, "raft-snapshot", hclog.Warn))
	if err != nil {
		return nil, fmt.Errorf("opening Raft snapshots: %w", err)
	}
	return snaps, nil
}

// openWAL opens Raft's log and stable store in dir and checks that the
// log can be read at both ends, as Raft does when it starts (and panics
// when it cannot).
func openWAL(dir string, log *slog.Logger) (*wal.WAL, func() error, error) {
	// The WAL does not close a meta store it opened itself, which would
	// keep its lock past Close: give it one we close.
	meta := &metadb.BoltMetaDB{}
	files, size := func(*wal.WAL) {}, 4<<20 // the real file system
	if WALForTest != nil {
		vfs, testSize := WALForTest(dir)
		files = wal.WithSegmentFiler(segment.NewFiler(dir, vfs))
		size = cmp.Or(testSize, size)
	}
	w, err := wal.Open(dir, wal.WithSegmentSize(size), wal.WithMetaStore(meta),
		wal.WithLogger(logbridge.Hclog(log, "raft-wal", hclog.Warn)), files)
	if err != nil {
		meta.Close()
		return nil, nil, fmt.Errorf("opening Raft log %s: %w", dir, err)
	}
	closeAll := func() error { return errors.Join(w.Close(), meta.Close()) }
	if err := checkLog(w); err != nil {
		_ = closeAll()
		return nil, nil, fmt.Errorf("the Raft log %s is damaged, so this node cannot take part in consensus: %w", dir, err)
	}
	return w, closeAll, nil
}

// checkLog reads a log's first and last entries.
func checkLog(logs raft.LogStore) error {
	first, err := logs.FirstIndex()
	if err != nil {
		return fmt.Errorf("reading its first index: %w", err)
	}
	last, err := logs.LastIndex()
	if err != nil {
		return fmt.Errorf("reading its last index: %w", err)
	}
	for _, i := range []uint64{first, last} {
		if i == 0 {
			continue
		}
		var l raft.Log
		if err := logs.GetLog(i, &l); err != nil {
			return fmt.Errorf("reading entry %d: %w", i, err)
		}
	}
	return nil
}

// newRaft is raft.NewRaft with its panics (a store it cannot read)
// turned into errors that say what failed, for the agent to report.
func newRaft(conf *raft.Config, fsm raft.FSM, logs raft.LogStore, stable raft.StableStore, snaps raft.SnapshotStore, trans raft.Transport) (r *raft.Raft, err error) {
	defer func() {
		if p := recover(); p != nil {
			r, err = nil, fmt.Errorf("raft: %v", p)
		}
	}()
	return raft.NewRaft(conf, fsm, logs, stable, snaps, trans)
}

// startRaft starts this node's Raft server; with boot set it bootstraps a
// new cluster of which it is the only voter.
func (n *Node) startRaft(boot *raft.Configuration) error {
	logs, stable, snaps, closeLogs, err := n.stores()
	if err != nil {
		return err
	}
	trans := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  &streamLayer{m: n.mux, addr: tcpAddr(n.cfg.Advertise)},
		MaxPool: 3,
		Timeout: 10 * time.Second,
		Logger:  logbridge.Hclog(n.log, "raft-net", hclog.Warn),
	})
	if err := n.loadCatalog(snaps); err != nil {
		trans.Close()
		_ = closeLogs()
		return err
	}
	if n.cfg.Dir != "" {
		// Set before Raft runs the FSM.
		n.fsm.SetGapCheck(logGapCheck(logs))
	}
	conf := n.raftConfig()
	if boot != nil {
		if err := raft.BootstrapCluster(conf, logs, stable, snaps, trans, *boot); err != nil {
			trans.Close()
			_ = closeLogs()
			return fmt.Errorf("bootstrapping the cluster: %w", err)
		}
	}
	r, err := newRaft(conf, n.fsm, logs, stable, snaps, trans)
	if err != nil {
		trans.Close()
		_ = closeLogs()
		return fmt.Errorf("starting Raft: %w", err)
	}
	n.mu.Lock()
	n.raft, n.trans, n.closer = r, trans, closeLogs
	n.mu.Unlock()
	done := make(chan struct{})
	n.mu.Lock()
	n.raftDone = done
	n.mu.Unlock()
	go n.watchLeader(r, done)
	n.log.Info("consensus started", "raft_addr", n.cfg.Advertise, "bootstrap", boot != nil)
	n.notify()
	return nil
}

// watchLeader reports leadership changes until Raft shuts down.
func (n *Node) watchLeader(r *raft.Raft, done <-chan struct{}) {
	ch := make(chan raft.Observation, 16)
	obs := raft.NewObserver(ch, false, func(o *raft.Observation) bool {
		_, ok := o.Data.(raft.LeaderObservation)
		return ok
	})
	r.RegisterObserver(obs)
	defer r.DeregisterObserver(obs)
	for {
		select {
		case o := <-ch:
			lo := o.Data.(raft.LeaderObservation)
			n.log.Info("consensus leader", "leader_id", shortID(string(lo.LeaderID)), "leader_addr", string(lo.LeaderAddr))
			n.metrics.leaderChanges.Add(1)
			n.notify()
		case <-done:
			return
		}
	}
}

func shortID(s string) string {
	if len(s) > 10 {
		return s[:10]
	}
	return s
}

func (n *Node) stop() {
	n.mu.Lock()
	r, trans, closer, done := n.raft, n.trans, n.closer, n.raftDone
	n.raft, n.raftDone, n.shutdown = nil, nil, true
	n.mu.Unlock()
	if done != nil {
		close(done)
	}
	if r != nil {
		if err := r.Shutdown().Error(); err != nil {
			n.log.Warn("stopping Raft", "err", err)
		}
	}
	if trans != nil {
		trans.Close()
	}
	n.mux.close()
	if closer != nil {
		if err := closer(); err != nil {
			n.log.Warn("closing the Raft log", "err", err)
		}
	}
}

// raftLocked returns the running Raft server, or nil.
func (n *Node) raftServer() *raft.Raft {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.raft
}

func (n *Node) isLeader() bool {
	r := n.raftServer()
	return r != nil && r.State() == raft.Leader
}

// leader returns the leader's consensus address and ID, as this node's
// Raft knows them.
func (n *Node) leader() (string, crypto.NodeID) {
	r := n.raftServer()
	if r == nil {
		return "", crypto.NodeID{}
	}
	addr, id := r.LeaderWithID()
	nid, _ := crypto.ParseNodeID(string(id))
	return string(addr), nid
}

// registeredID reports whether id is a registered member of the cluster,
// and under which name.
func (n *Node) registeredID(id crypto.NodeID) (string, bool) {
	var name string
	var ok bool
	n.fsm.Read(func(s *catalog.State) {
		var node *catalog.Node
		if node, ok = s.NodeByID(id); ok {
			name = node.Name
		}
	})
	return name, ok
}

// allowRaft decides whether id may send this node Raft traffic: the
// voters of its latest configuration, or, before it has one, the leader
// that admitted it. Non-voters never send Raft requests, so a member
// that is not a voter cannot pose as a leader or a candidate.
func (n *Node) allowRaft(id crypto.NodeID) bool {
	r := n.raftServer()
	if r == nil {
		return false
	}
	n.mu.Lock()
	fresh := time.Since(n.votersAt) < time.Second
	voters, admitted := n.voters, n.admittedBy
	n.mu.Unlock()
	if !fresh || !voters[id] {
		voters = n.refreshVoters(r)
	}
	if voters[id] || len(voters) == 0 && id == admitted {
		return true
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if id == n.confirmedLdr && time.Since(n.confirmedLdrAt) < leaderConfirmValid {
		return true
	}
	n.refusedRaft, n.refusedAt = id, time.Now()
	return false
}

// leaderConfirmValid is how long members' confirmation that a node leads
// lets it send Raft traffic to a node whose configuration does not list
// it; leaderConfirmEvery paces the asking.
const (
	leaderConfirmValid = 30 * time.Second
	leaderConfirmEvery = time.Second
)

// confirmRefusedLeader asks the members who leads when this node lately
// refused Raft traffic from a node its configuration does not list as a
// voter. A node that was down or cut off while the voters changed knows
// only the old ones; the new leader's traffic is what would bring it the
// new configuration. It takes that traffic only from the leader most
// members it asks name, as a joining node does (confirmedLeader): one
// hostile member cannot pose as its leader.
func (n *Node) confirmRefusedLeader(ctx context.Context) {
	n.mu.Lock()
	id, at := n.refusedRaft, n.refusedAt
	if id.IsZero() || time.Since(at) > 5*time.Second || time.Since(n.confirmTried) < leaderConfirmEvery {
		n.mu.Unlock()
		return
	}
	n.refusedRaft = crypto.NodeID{}
	n.confirmTried = time.Now()
	n.mu.Unlock()
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	lid, _, err := n.confirmedLeader(cctx, n.clusterMembers())
	if err != nil || lid != id {
		n.log.Debug("refused Raft traffic from a node that is not a voter here; the members do not confirm it leads",
			"peer_id", id.Short(), "confirmed_leader", lid.Short(), "err", err)
		return
	}
	n.mu.Lock()
	n.confirmedLdr, n.confirmedLdrAt = id, time.Now()
	n.mu.Unlock()
	n.log.Info("taking Raft traffic from the leader the members confirm, which this node's configuration does not list as a voter yet (it fell behind)",
		"leader_id", id.Short())
}

func (n *Node) refreshVoters(r *raft.Raft) map[crypto.NodeID]bool {
	f := r.GetConfiguration()
	voters := map[crypto.NodeID]bool{}
	if f.Error() == nil {
		for _, s := range f.Configuration().Servers {
			if s.Suffrage != raft.Voter {
				continue
			}
			if id, err := crypto.ParseNodeID(string(s.ID)); err == nil {
				voters[id] = true
			}
		}
	}
	n.mu.Lock()
	n.voters, n.votersAt = voters, time.Now()
	n.mu.Unlock()
	return voters
}

// applyTimeout bounds one Raft apply on the leader.
const applyTimeout = 10 * time.Second

// applyLocal appends a signed command to the log, as leader, and returns
// its result once committed and applied here.
func (n *Node) applyLocal(ctx context.Context, entry []byte) (catalog.Result, uint64, error) {
	r := n.raftServer()
	if r == nil || r.State() != raft.Leader {
		return catalog.Result{}, 0, errNotLeader
	}
	refusal, ext, ok := n.precheck(entry)
	if !ok {
		return refusal, 0, nil
	}
	timeout := applyTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(d))
	}
	// The member's signed command goes into the log as it came; the
	// leader's endorsement, if any, goes into the entry's Extensions
	// (endorse.go), which no member can set.
	f := r.ApplyLog(raft.Log{Data: entry, Extensions: ext}, timeout)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) || errors.Is(err, raft.ErrLeadershipTransferInProgress) {
			return catalog.Result{}, 0, errNotLeader
		}
		return catalog.Result{}, 0, fmt.Errorf("committing: %w", err)
	}
	// Followers learn that an entry committed from the next append the
	// leader sends them, which an idle leader sends only every
	// CommitTimeout; the node that asked waits to apply the entry
	// itself. A barrier is such an append, sent at once. Nothing waits
	// for it to commit.
	r.Barrier(timeout)
	res, _ := f.Response().(catalog.Result)
	return res, f.Index(), nil
}

// precheck refuses, before it reaches the log, a command that the state
// machine would refuse for its signature, a registration of a node
// whose registered run is still alive (a cloned host with a copy of the
// node's identity, clone.go), and what the leader's own checks refuse
// (endorse.go); it returns the Extensions of the command's log entry.
func (n *Node) precheck(entry []byte) (catalog.Result, []byte, bool) {
	sig, c, err := catalog.DecodeSigned(entry)
	if err != nil {
		n.metrics.refused("command-invalid")
		return catalog.Result{Code: catalog.CodeInvalid, Message: err.Error()}, nil, false
	}
	var refusal *catalog.Result
	var registered catalog.Node
	n.fsm.Read(func(s *catalog.State) {
		id, registering := c.SignerID()
		node, known := s.Nodes[c.Node]
		if !registering {
			if !known {
				refusal = &catalog.Result{Code: catalog.CodeNotRegistered, Message: fmt.Sprintf("node %s is not registered in the cluster", c.Node)}
				return
			}
			id = node.ID
		}
		if !sig.VerifiedBy(id) {
			refusal = &catalog.Result{Code: catalog.CodeBadSignature, Message: fmt.Sprintf("command in the name of node %s is not signed by its identity", c.Node)}
			return
		}
		if known {
			registered = *node
		}
	})
	if refusal == nil && registered.Name != "" {
		// Outside the read: it asks members (clone.go).
		refusal = n.cloneRefusal(context.Background(), c, registered)
	}
	if refusal != nil {
		n.metrics.refused(string(refusal.Code))
		return *refusal, nil, false
	}
	ext, refusal := n.endorse(c)
	if refusal != nil {
		n.metrics.refused(string(refusal.Code))
		return *refusal, nil, false
	}
	return catalog.Result{}, ext, true
}

// Refusal is the cluster's refusal of this node, if any: a taken name,
// an identity registered under another name, a forgotten identity, or a
// state directory older than what the cluster saw.
func (n *Node) Refusal() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.fatal
}

// Close releases what New took, for a node whose Run never started.
func (n *Node) Close() { n.mux.close() }

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only our own plain types are marshalled
	}
	return b
}
