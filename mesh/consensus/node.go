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
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
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

// Node is this host's Raft server and its client of the cluster's leader.
type Node struct {
	cfg     Config
	log     *slog.Logger
	id      crypto.NodeID
	fsm     *catalog.FSM
	mux     *mux
	metrics *metrics
	changes chan struct{}
	run     runState

	// savedIndex is the index of the saved copy of the catalog; saveMu
	// serialises writing it.
	savedIndex atomic.Uint64
	saveMu     sync.Mutex

	// mu guards the fields after it.
	mu sync.Mutex
	// diskErr is the last failure to write the state directory: a node
	// that cannot keep what it was told claims nothing rather than guess.
	diskErr error
	raft    raftState
	member  memberState
	servers serverState
}

// runState tells this start of the node from its others.
type runState struct {
	bootID string
	gen    uint64
	// seqMu serialises this node's commands, so that their sequence
	// numbers reach the leader in order.
	seqMu sync.Mutex
	seq   uint64
}

// raftState is this node's Raft server and whose Raft traffic it takes
// (allow.go). Node.mu guards it.
type raftState struct {
	r      *raft.Raft
	trans  *raft.NetworkTransport
	closer func() error // the log store
	// done is closed when Raft is shut down.
	done chan struct{}

	// admittedBy is the leader that admitted this node; its Raft traffic
	// is accepted while this node has no configuration of its own yet.
	admittedBy crypto.NodeID
	voters     map[crypto.NodeID]bool
	votersAt   time.Time
	// A node that fell behind a configuration change does not know the
	// current leader as a voter and refuses its Raft traffic: it would
	// never catch up. refused is the last node so refused; the Run
	// loop asks the members who leads, and confirmed is the node
	// they confirmed, whose traffic is then taken (leaderConfirm).
	refused      crypto.NodeID
	refusedAt    time.Time
	confirmTried time.Time
	confirmed    crypto.NodeID
	confirmedAt  time.Time
}

// memberState is how far this node is on its way into its cluster.
// Node.mu guards it.
type memberState struct {
	registered bool
	// admitted is set once this node found itself in its configuration.
	admitted bool
	// fatal is a refusal that stops this node from taking part: a taken
	// name, a forgotten identity, a rolled-back state directory.
	fatal    error
	joinErr  error
	shutdown bool
	// stable tracks the gossip view for the bootstrap decision.
	view      string
	viewSince time.Time
}

// serverState is what the autopilot knows of the servers. Node.mu
// guards it.
type serverState struct {
	// dead and aliveSince track servers for the autopilot.
	dead       map[crypto.NodeID]time.Time
	aliveSince map[crypto.NodeID]time.Time
	// proofs caches which servers proved they hold the server key.
	proofs map[crypto.NodeID]bool
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
		servers: serverState{
			dead:       map[crypto.NodeID]time.Time{},
			aliveSince: map[crypto.NodeID]time.Time{},
			proofs:     map[crypto.NodeID]bool{},
		},
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	n.run.bootID = hex.EncodeToString(b)
	f, err := nextGeneration(cfg.Dir)
	if err != nil {
		return nil, err
	}
	n.run.gen, n.member.fatal = f.Generation, f.refusal()
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

// Refusal is the cluster's refusal of this node, if any: a taken name,
// an identity registered under another name, a forgotten identity, or a
// state directory older than what the cluster saw.
func (n *Node) Refusal() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.member.fatal
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
