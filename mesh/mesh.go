package mesh

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/renameio/v2"
	"github.com/hashicorp/go-sockaddr"
	"github.com/hashicorp/memberlist"

	"github.com/wgmesh/wgmesh/crypto"
)

// Config configures a Mesh.
type Config struct {
	// Name is this node's unique name in the cluster.
	Name string
	// BindAddr and BindPort are where gossip listens (TCP and UDP).
	BindAddr string
	BindPort int
	// AdvertiseAddr is the address peers use for gossip and WireGuard;
	// hosts behind NAT must set it. Empty: the bind address, or else the
	// first private address of this host.
	AdvertiseAddr string
	// Join lists seed addresses (host or host:port).
	Join []string
	// Keyring encrypts gossip. Nil means gossip in clear, which the
	// caller must have chosen explicitly.
	Keyring crypto.Keyring
	// PublicKey is this node's WireGuard public key.
	PublicKey crypto.PublicKey
	// WGMode is reported to peers ("kernel" or "userspace").
	WGMode string
	// StatePath persists the replicated state; empty keeps it in memory.
	StatePath string
	Logger    *slog.Logger
	// Memberlist is the base memberlist configuration; nil means
	// memberlist.DefaultLANConfig. Name, addresses, delegates and
	// keyring are always set by Mesh.
	Memberlist *memberlist.Config
	// Transport overrides memberlist's network transport (tests).
	Transport memberlist.Transport
	// ReconnectInterval is how often a node retries its seeds while alone
	// and tries to reach members it believes dead, which is how a
	// partition heals after memberlist has given up on the other side.
	ReconnectInterval time.Duration
	// DirectFanout: in clusters up to this size a node sends its own
	// changes straight to every member as well as gossiping them, which
	// makes claims take one round trip instead of several gossip rounds.
	DirectFanout int
	// LeaveOnShutdown makes Run leave the cluster when it stops, so that
	// peers drop this node at once. Off, peers keep their WireGuard
	// configuration through an agent restart and mark the node failed
	// only if it stays away past the failure timeouts.
	LeaveOnShutdown bool
	// LeaveTimeout bounds the graceful leave on shutdown.
	LeaveTimeout time.Duration
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
	if err := validName(c.Name); err != nil {
		return fmt.Errorf("node name: %w", err)
	}
	if c.BindPort < 0 || c.BindPort > 65535 {
		return fmt.Errorf("gossip port %d out of range", c.BindPort)
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
	return nil
}

// Mesh is this node's membership in the cluster and its replica of the
// cluster's state.
//
// Locking: mu guards the replica and everything next to it. memberlist
// calls the delegates with its own locks held, so code holding mu must
// never call into memberlist (or its broadcast queue): changes are put in
// an outbox under mu and sent after it is released.
type Mesh struct {
	cfg Config
	log *slog.Logger

	ml      atomic.Pointer[memberlist.Memberlist]
	keyring atomic.Pointer[memberlist.Keyring]
	queue   *memberlist.TransmitLimitedQueue
	kick    chan struct{}
	// changes is signalled (never blocking) whenever the View may differ.
	changes chan struct{}
	stats   gossipStats
	wg      sync.WaitGroup

	mu      sync.Mutex
	rep     *replica
	live    map[string]liveRecord
	joined  bool
	dirty   bool
	outbox  []outMsg
	waiters map[claimKey]chan Outcome
	// promises are this node's votes, by subnet; they are persisted
	// before they are sent. promiseSent is when each was last sent.
	promises    map[netip.Prefix][]Promise
	promiseSent map[promiseKey]time.Time
	// votes are the voters each of this node's pending claims heard from.
	votes map[claimKey]map[string]bool
	// greet lists members that became alive since the last step: they
	// are sent this node's pending claims, which they may have missed.
	greet []string
	// abstainUntil: after losing its state file this node makes no new
	// promises until then.
	abstainUntil time.Time
	meta         []byte
	addr         netip.Addr
	leaving      bool
	// probeInterval is memberlist's, for the suspect heuristic.
	probeInterval time.Duration
	// started is when Run started gossip.
	started time.Time
}

// unknownGrace is how long a member known only from saved state may stay
// unconfirmed before it counts as failed: long enough for the seeds to be
// joined and a reconnect round to reach it.
func (m *Mesh) unknownGrace() time.Duration {
	return 3*m.cfg.ReconnectInterval + 10*m.probeInterval
}

type outMsg struct {
	name string // invalidates older queued broadcasts with the same name
	b    []byte
	// to, when set, sends the message to that member only, not gossiped.
	to string
}

type claimKey struct {
	subnet netip.Prefix
	claim  Claim
}

type promiseKey struct {
	subnet  netip.Prefix
	promise Promise
}

// seedRetryMin and seedRetryMax bound the backoff of a node that could
// not reach any seed.
const (
	seedRetryMin = 100 * time.Millisecond
	seedRetryMax = time.Second
)

// Vote timing. A vote travels in one UDP packet and may be lost, so a
// voter repeats it while the claim is pending. After losing its state a
// node abstains for longer than any claimant waits for votes (the driver
// gives up on a claim after 20 seconds).
const (
	voteResend       = 2 * time.Second
	lostStateAbstain = time.Minute
)

// New creates a Mesh from cfg and the state file, if any. It starts
// nothing; Run does.
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
	m := &Mesh{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "mesh"),
		kick:    make(chan struct{}, 1),
		changes: make(chan struct{}, 1),
		rep:     newReplica(cfg.Name),
		live:    map[string]liveRecord{},
		waiters: map[claimKey]chan Outcome{},
		addr:    addr,

		promises:    map[netip.Prefix][]Promise{},
		promiseSent: map[promiseKey]time.Time{},
		votes:       map[claimKey]map[string]bool{},
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
	if err := m.load(); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.setSelfInfoLocked()
	// Claims from before a restart have no one waiting for them.
	for k, e := range m.rep.nets {
		if k.node == cfg.Name && len(e.Claims) > 0 {
			e.Claims = nil
			m.publishLocked(m.rep.putOwn(e))
		}
	}
	return m, nil
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

func (m *Mesh) setSelfInfoLocked() {
	n := m.rep.setSelf(NodeInfo{
		PublicKey:  m.cfg.PublicKey,
		Addr:       m.addr,
		GossipPort: uint16(m.cfg.BindPort),
		WGMode:     m.cfg.WGMode,
		Leaving:    m.leaving,
	})
	m.meta = encodeMeta(n)
	m.dirty = true
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
}

// Run starts gossip, joins the seeds and runs the mesh until ctx is done,
// then leaves the cluster gracefully. It returns an error only if gossip
// could not start.
func (m *Mesh) Run(ctx context.Context) error {
	conf := m.memberlistConfig()
	ml, err := memberlist.Create(conf)
	if err != nil {
		return fmt.Errorf("starting gossip on %s:%d: %w", conf.BindAddr, conf.BindPort, err)
	}
	m.ml.Store(ml)
	m.mu.Lock()
	m.started = time.Now()
	m.mu.Unlock()
	m.log.Info("gossip started", "addr", m.addr, "port", conf.BindPort, "encrypted", conf.Keyring != nil)

	m.wg.Add(1)
	go m.loopReconnect(ctx)

	ticker := time.NewTicker(time.Second)
	defer ticker.Stop()
	m.step()
	for {
		select {
		case <-ctx.Done():
			m.shutdown(ml)
			return nil
		case <-m.kick:
			m.step()
		case <-ticker.C:
			m.step()
		}
	}
}

func (m *Mesh) shutdown(ml *memberlist.Memberlist) {
	if m.cfg.LeaveOnShutdown {
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
	if err := ml.Shutdown(); err != nil {
		m.log.Warn("stopping gossip", "err", err)
	}
	m.wg.Wait()
	m.mu.Lock()
	for k, ch := range m.waiters {
		close(ch)
		delete(m.waiters, k)
	}
	m.mu.Unlock()
	m.persist()
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
	conf.Logger = newStdLogger(m.cfg.Logger)
	conf.LogOutput = nil
	if m.cfg.Transport != nil {
		conf.Transport = m.cfg.Transport
	}
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
				m.dirty = true
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
	for name, n := range m.rep.nodes {
		if name == m.cfg.Name || alive[name] || n.Leaving || n.GossipPort == 0 {
			continue
		}
		out = append(out, net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.GossipPort))))
	}
	return out
}

// step is one pass of the mesh loop: vote, settle own claims, persist,
// send what changed, and tell the driver.
func (m *Mesh) step() {
	m.mu.Lock()
	now := time.Now()
	if m.rep.lostState {
		m.rep.lostState = false
		m.abstainUntil = now.Add(lostStateAbstain)
		m.log.Warn("the cluster knows a newer state of this node than its state file: not voting on address block claims for a while",
			"for", lostStateAbstain)
	}
	v := buildView(m.rep, m.live)
	votes := m.voteLocked(v, now)
	for _, subnet := range m.subnetsLocked() {
		own := m.rep.own(subnet)
		changed := false
		var keep []Claim
		for _, c := range own.Claims {
			key := claimKey{subnet, c}
			o, rival, n := claimOutcome(v, subnet, c, m.votes[key])
			switch o {
			case Committed:
				own.Blocks = append(own.Blocks, c.Block)
				changed = true
				m.log.Info("address block claimed", "network", subnet, "block", c.Block, "votes", n, "quorum", v.Quorum())
			case Lost:
				changed = true
				m.log.Debug("address block claim lost", "network", subnet, "block", c.Block, "to", rival)
			default:
				keep = append(keep, c)
			}
			if o != Pending {
				delete(m.votes, key)
				if ch, ok := m.waiters[key]; ok {
					ch <- o
					delete(m.waiters, key)
				}
			}
		}
		if changed {
			own.Claims = keep
			m.publishLocked(m.rep.putOwn(own))
		}
	}
	for k := range m.votes {
		if !slices.Contains(m.rep.own(k.subnet).Claims, k.claim) {
			delete(m.votes, k)
		}
	}
	for k := range m.rep.republish {
		if e, ok := m.rep.nets[k]; ok {
			m.publishLocked(e)
		}
		delete(m.rep.republish, k)
	}
	m.greetLocked()
	updateMeta := m.rep.selfInfoStale
	if updateMeta {
		m.setSelfInfoLocked()
	}
	out := m.outbox
	m.outbox = nil
	m.mu.Unlock()

	// Promises reach the disk before anyone hears of them.
	m.persist()
	m.send(out)
	m.sendVotes(votes)
	if updateMeta {
		if ml := m.memberlist(); ml != nil {
			if err := ml.UpdateNode(m.cfg.LeaveTimeout); err != nil {
				m.log.Warn("publishing node metadata", "err", err)
			}
		}
	}
	m.notifyChanged()
}

// greetLocked sends members that just became alive this node's entries
// with pending claims. A claim needs the votes of a majority of the nodes
// known when it is counted, and a node that joined after the claim went
// out would otherwise hear of it only at the next push/pull.
func (m *Mesh) greetLocked() {
	if len(m.greet) == 0 {
		return
	}
	for _, subnet := range m.subnetsLocked() {
		own := m.rep.own(subnet)
		if len(own.Claims) == 0 {
			continue
		}
		b := encodeNet(own)
		for _, to := range m.greet {
			m.outbox = append(m.outbox, outMsg{b: b, to: to})
		}
	}
	m.greet = nil
}

// outVote is a vote on its way to a claimant.
type outVote struct {
	to string
	b  []byte
}

// voteLocked brings this node's promises up to date with the view and
// returns the votes due to be sent. Votes for its own claims are counted
// at once.
func (m *Mesh) voteLocked(v *View, now time.Time) []outVote {
	grant := !now.Before(m.abstainUntil)
	subnets := m.subnetsLocked()
	for s := range m.promises {
		if !slices.Contains(subnets, s) {
			subnets = append(subnets, s)
		}
	}
	var out []outVote
	held := map[promiseKey]bool{}
	for _, subnet := range subnets {
		want := desiredPromises(v, subnet, m.promises[subnet], grant)
		if !slices.Equal(m.promises[subnet], want) {
			if len(want) == 0 {
				delete(m.promises, subnet)
			} else {
				m.promises[subnet] = want
			}
			m.dirty = true
		}
		for _, p := range want {
			k := promiseKey{subnet, p}
			held[k] = true
			if p.To == m.cfg.Name {
				m.recordVoteLocked(claimKey{subnet, Claim{p.Block, p.Attempt}}, m.cfg.Name)
				continue
			}
			if now.Sub(m.promiseSent[k]) < voteResend || m.live[p.To].state != Alive {
				// Sent lately, or no way to reach the claimant yet: its
				// joining kicks another step.
				continue
			}
			m.promiseSent[k] = now
			out = append(out, outVote{to: p.To, b: encodeVote(vote{From: m.cfg.Name, Subnet: subnet, Promise: p})})
		}
	}
	for k := range m.promiseSent {
		if !held[k] {
			delete(m.promiseSent, k)
		}
	}
	return out
}

// recordVoteLocked counts a vote for one of this node's pending claims and
// reports whether it is new. Votes for anything else are stale.
func (m *Mesh) recordVoteLocked(key claimKey, voter string) bool {
	if !slices.Contains(m.rep.own(key.subnet).Claims, key.claim) {
		return false
	}
	set := m.votes[key]
	if set[voter] {
		return false
	}
	if set == nil {
		set = map[string]bool{}
		m.votes[key] = set
	}
	set[voter] = true
	return true
}

// sendVotes sends votes to their claimants over UDP; a lost one is sent
// again in a later step.
func (m *Mesh) sendVotes(votes []outVote) {
	ml := m.memberlist()
	if ml == nil || len(votes) == 0 {
		return
	}
	nodes := map[string]*memberlist.Node{}
	for _, n := range ml.Members() {
		nodes[n.Name] = n
	}
	for _, v := range votes {
		n, ok := nodes[v.to]
		if !ok {
			continue
		}
		if err := ml.SendBestEffort(n, v.b); err != nil {
			m.log.Debug("sending vote", "peer", v.to, "err", err)
		}
		m.stats.sent(len(v.b))
	}
}

// subnetsLocked lists every subnet that has entries.
func (m *Mesh) subnetsLocked() []netip.Prefix {
	set := map[netip.Prefix]bool{}
	for k := range m.rep.nets {
		set[k.subnet] = true
	}
	return slices.SortedFunc(maps.Keys(set), comparePrefix)
}

// publishLocked queues an own entry for sending.
func (m *Mesh) publishLocked(e NetworkEntry) {
	m.outbox = append(m.outbox, outMsg{name: "net/" + e.Node + "/" + e.Subnet.String(), b: encodeNet(e)})
	m.dirty = true
}

// maxBroadcast keeps a gossip message inside one UDP packet with room for
// memberlist's framing and encryption.
const maxBroadcast = 1100

// send gossips messages and, in small clusters, sends them directly.
// Messages too big for a packet go to every member over TCP.
func (m *Mesh) send(msgs []outMsg) {
	ml := m.memberlist()
	if ml == nil || len(msgs) == 0 {
		return
	}
	members := ml.Members()
	direct := len(members) <= m.cfg.DirectFanout
	for _, msg := range msgs {
		if msg.to != "" {
			if i := slices.IndexFunc(members, func(n *memberlist.Node) bool { return n.Name == msg.to }); i >= 0 {
				m.sendTo(ml, members[i], msg.b)
			}
			continue
		}
		if len(msg.b) <= maxBroadcast {
			m.queue.QueueBroadcast(&broadcast{name: msg.name, msg: msg.b})
			if !direct {
				continue
			}
		}
		for _, n := range members {
			if n.Name != m.cfg.Name {
				m.sendTo(ml, n, msg.b)
			}
		}
	}
}

// sendTo sends b to one member: in a UDP packet if it fits, else over TCP
// in the background.
func (m *Mesh) sendTo(ml *memberlist.Memberlist, n *memberlist.Node, b []byte) {
	if len(b) <= maxBroadcast {
		if err := ml.SendBestEffort(n, b); err != nil {
			m.log.Debug("sending to member", "peer", n.Name, "err", err)
		}
		m.stats.sent(len(b))
		return
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		if err := ml.SendReliable(n, b); err != nil {
			m.log.Debug("sending to member over TCP", "peer", n.Name, "err", err)
		}
		m.stats.sent(len(b))
	}()
}

// persistedState is the state file: the replica plus what only this node
// needs to remember.
type persistedState struct {
	snapshotState
	Joined   bool                       `json:"joined,omitempty"`
	Promises map[netip.Prefix][]Promise `json:"promises,omitempty"`
}

func (m *Mesh) load() error {
	if m.cfg.StatePath == "" {
		return nil
	}
	b, err := os.ReadFile(m.cfg.StatePath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading mesh state: %w", err)
	}
	var p persistedState
	if err := json.Unmarshal(b, &p); err != nil {
		return fmt.Errorf("reading mesh state %s: %w", m.cfg.StatePath, err)
	}
	s, err := decodeState(mustJSON(p.snapshotState))
	if err != nil {
		return fmt.Errorf("reading mesh state %s: %w", m.cfg.StatePath, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.rep.clock = s.Clock
	for _, f := range s.Forgotten {
		m.rep.forgotten[f.Node] = f.Version
	}
	for _, n := range s.Nodes {
		m.rep.nodes[n.Name] = n
	}
	for _, e := range s.Networks {
		e.normalize()
		m.rep.nets[e.key()] = e
		m.rep.observe(e.Version)
	}
	for _, n := range s.Nodes {
		m.rep.observe(n.Version)
	}
	m.joined = p.Joined
	for subnet, ps := range p.Promises {
		if err := ValidSubnet(subnet); err != nil {
			return fmt.Errorf("reading mesh state %s: %w", m.cfg.StatePath, err)
		}
		for _, pr := range ps {
			if err := pr.validate(subnet); err != nil {
				return fmt.Errorf("reading mesh state %s: %w", m.cfg.StatePath, err)
			}
		}
		ps = slices.Clone(ps)
		slices.SortFunc(ps, comparePromise)
		m.promises[subnet] = slices.Compact(ps)
	}
	return nil
}

// persist writes the state file if anything changed since the last write.
func (m *Mesh) persist() {
	m.mu.Lock()
	if !m.dirty || m.cfg.StatePath == "" {
		m.mu.Unlock()
		return
	}
	s := m.rep.snapshot()
	s.Clock = m.rep.clock
	p := persistedState{snapshotState: s, Joined: m.joined, Promises: maps.Clone(m.promises)}
	m.dirty = false
	m.mu.Unlock()
	if err := renameio.WriteFile(m.cfg.StatePath, mustJSON(p), 0o600); err != nil {
		m.log.Error("writing mesh state", "path", m.cfg.StatePath, "err", err)
		m.mu.Lock()
		m.dirty = true
		m.mu.Unlock()
	}
}

// View returns a snapshot of the mesh as this node sees it.
func (m *Mesh) View() *View {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := buildView(m.rep, m.live)
	// memberlist probes one member per interval, so a member normally
	// answers once every len(members) intervals; three missed rounds make
	// it suspect.
	suspectAfter := 3 * time.Duration(max(len(v.Members), 2)) * m.probeInterval
	now := time.Now()
	for name, mem := range v.Members {
		switch {
		case mem.State == Alive && !mem.Self && now.Sub(mem.LastAck) > suspectAfter:
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

// Attach publishes that this node has subnet attached with its WireGuard
// listening on port, reserving the given addresses. Port 0 detaches.
func (m *Mesh) Attach(subnet netip.Prefix, port uint16, reserved []netip.Addr) error {
	if err := ValidSubnet(subnet); err != nil {
		return err
	}
	for _, a := range reserved {
		if !subnet.Contains(a) {
			return fmt.Errorf("reserved address %s is not inside %s", a, subnet)
		}
	}
	m.mu.Lock()
	own := m.rep.own(subnet)
	before := own.Clone()
	own.Port = port
	own.Reserved = slices.Clone(reserved)
	own.normalize()
	if own.Version == 0 || !entriesEqual(own, before) {
		m.publishLocked(m.rep.putOwn(own))
	}
	m.mu.Unlock()
	m.kickLoop()
	return nil
}

// Tick returns a fresh Lamport stamp: later than every version this node
// has seen, so a spec stamped with it wins over them.
func (m *Mesh) Tick() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.dirty = true
	return m.rep.tick()
}

// PublishSpec publishes this node's definition of subnet's network, or a
// removal (spec.Deleted). A spec without a version gets a fresh one.
func (m *Mesh) PublishSpec(subnet netip.Prefix, spec NetworkSpec) error {
	if err := ValidSubnet(subnet); err != nil {
		return err
	}
	m.mu.Lock()
	if spec.Version == 0 {
		spec.Version = m.rep.tick()
	}
	m.rep.observe(spec.Version)
	if err := spec.validate(subnet); err != nil {
		m.mu.Unlock()
		return err
	}
	own := m.rep.own(subnet)
	own.Spec = spec.Clone()
	m.publishLocked(m.rep.putOwn(own))
	m.mu.Unlock()
	m.kickLoop()
	return nil
}

// SetEndpoints publishes how many containers this node has on subnet.
func (m *Mesh) SetEndpoints(subnet netip.Prefix, n int) {
	m.mu.Lock()
	own := m.rep.own(subnet)
	if own.Endpoints != n && (own.Version != 0 || n != 0) {
		own.Endpoints = n
		m.publishLocked(m.rep.putOwn(own))
	}
	m.mu.Unlock()
	m.kickLoop()
}

// Errors of ClaimBlock.
var (
	ErrNotJoined = errors.New("this node has not joined the cluster yet")
	ErrNoQuorum  = errors.New("no quorum")
)

// ClaimBlock claims a block of req.Subnet for this node and waits until a
// quorum has promised it, the claim lost, or ctx is done. A block this node
// already owns that satisfies req.Containing is returned at once.
func (m *Mesh) ClaimBlock(ctx context.Context, req BlockRequest) (netip.Prefix, error) {
	if err := req.Validate(); err != nil {
		return netip.Prefix{}, err
	}
	if err := m.waitJoined(ctx); err != nil {
		return netip.Prefix{}, fmt.Errorf("claiming a block of %s: %w", req.Subnet, err)
	}
	for {
		m.mu.Lock()
		v := buildView(m.rep, m.live)
		if req.Containing.IsValid() {
			for _, b := range v.OwnBlocks(req.Subnet) {
				if b.Contains(req.Containing) {
					m.mu.Unlock()
					return b, nil
				}
			}
		}
		b, err := pickBlock(v, req, m.promises[req.Subnet])
		if err != nil {
			m.mu.Unlock()
			return netip.Prefix{}, err
		}
		c := Claim{Block: b, Attempt: m.rep.tick()}
		own := m.rep.own(req.Subnet)
		own.Claims = append(own.Claims, c)
		m.publishLocked(m.rep.putOwn(own))
		ch := make(chan Outcome, 1)
		key := claimKey{req.Subnet, c}
		m.waiters[key] = ch
		m.mu.Unlock()
		m.kickLoop()

		select {
		case o, ok := <-ch:
			if !ok {
				return netip.Prefix{}, errors.New("mesh is shutting down")
			}
			if o == Committed {
				return b, nil
			}
			if req.Containing.IsValid() {
				return netip.Prefix{}, fmt.Errorf("block %s holding %s went to another node: %w", b, req.Containing, ErrBlockTaken)
			}
			// Lost to a rival: pick another block.
		case <-ctx.Done():
			return netip.Prefix{}, m.abandonClaim(key, ctx.Err())
		}
	}
}

// waitJoined waits until this node has seen the cluster, if it was given
// seeds: a node that never reached its cluster would otherwise claim
// blocks alone and collide with it later.
func (m *Mesh) waitJoined(ctx context.Context) error {
	if len(m.cfg.Join) == 0 {
		return nil
	}
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		m.mu.Lock()
		joined := m.joined
		m.mu.Unlock()
		if joined {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (seeds %v unreachable); a node claims address space only once it has seen the cluster: %w",
				ErrNotJoined, m.cfg.Join, ctx.Err())
		case <-t.C:
		}
	}
}

// abandonClaim withdraws a claim whose caller gave up, unless it was
// committed meanwhile, and explains the lack of quorum.
func (m *Mesh) abandonClaim(key claimKey, cause error) error {
	m.mu.Lock()
	delete(m.waiters, key)
	own := m.rep.own(key.subnet)
	if slices.Contains(own.Blocks, key.claim.Block) {
		m.mu.Unlock()
		// Committed just now; keep it rather than leak it.
		return nil
	}
	v := buildView(m.rep, m.live)
	_, _, votes := claimOutcome(v, key.subnet, key.claim, m.votes[key])
	delete(m.votes, key)
	own.Claims = slices.DeleteFunc(own.Claims, func(c Claim) bool { return c == key.claim })
	m.publishLocked(m.rep.putOwn(own))
	var unreachable []string
	for name, mem := range v.Members {
		if !mem.State.Reachable() {
			unreachable = append(unreachable, name)
		}
	}
	slices.Sort(unreachable)
	m.mu.Unlock()
	m.kickLoop()
	return fmt.Errorf("claiming block %s: %w: %d of %d nodes promised it, %d needed (unreachable: %v): %w",
		key.claim.Block, ErrNoQuorum, votes, len(v.Members), v.Quorum(), unreachable, cause)
}

// ReleaseBlocks gives up blocks this node owns in subnet.
func (m *Mesh) ReleaseBlocks(subnet netip.Prefix, blocks ...netip.Prefix) {
	m.mu.Lock()
	own := m.rep.own(subnet)
	n := len(own.Blocks)
	own.Blocks = slices.DeleteFunc(own.Blocks, func(b netip.Prefix) bool { return slices.Contains(blocks, b) })
	if len(own.Blocks) != n {
		m.publishLocked(m.rep.putOwn(own))
		m.log.Info("address blocks released", "network", subnet, "blocks", blocks)
	}
	m.mu.Unlock()
	m.kickLoop()
}

// ErrAlive is returned when forgetting a node that gossip says is alive.
var ErrAlive = errors.New("node is alive")

// Forget declares node gone for good: its entries are dropped cluster-wide
// and its address blocks become free. It is refused while gossip sees the
// node alive or suspect, since its containers may still use the blocks.
func (m *Mesh) Forget(node string) error {
	if node == m.cfg.Name {
		return errors.New("a node cannot forget itself")
	}
	if mem, ok := m.View().Members[node]; ok && mem.State.Routable() {
		return fmt.Errorf("forgetting %s: %w (gossip says %s); stop its agent first, or wait until gossip reports it failed", node, ErrAlive, mem.State)
	}
	m.mu.Lock()
	if _, ok := m.rep.nodes[node]; !ok {
		m.mu.Unlock()
		return fmt.Errorf("forgetting %s: no such node", node)
	}
	f := Forget{Node: node, Version: m.rep.maxVersion(node)}
	m.rep.mergeForget(f)
	delete(m.live, node)
	m.outbox = append(m.outbox, outMsg{name: "forget/" + node, b: encodeForget(f)})
	m.dirty = true
	m.mu.Unlock()
	m.log.Info("node forgotten", "peer", node)
	m.kickLoop()
	return nil
}

// SetPublicKey publishes a new WireGuard public key for this node.
func (m *Mesh) SetPublicKey(pub crypto.PublicKey) {
	m.mu.Lock()
	m.cfg.PublicKey = pub
	m.rep.selfInfoStale = true
	m.mu.Unlock()
	m.kickLoop()
}

// SetKeyring replaces the gossip keyring, for key rotation: install the
// new key everywhere, make it primary everywhere, then remove the old.
func (m *Mesh) SetKeyring(ring crypto.Keyring) error {
	kr := m.keyring.Load()
	if kr == nil {
		return errors.New("gossip runs without encryption (--insecure); restart with a cluster key to enable it")
	}
	for _, k := range ring {
		if err := kr.AddKey(k); err != nil {
			return fmt.Errorf("installing cluster key: %w", err)
		}
	}
	if err := kr.UseKey(ring.Primary()); err != nil {
		return fmt.Errorf("switching primary cluster key: %w", err)
	}
	for _, k := range kr.GetKeys() {
		if !slices.ContainsFunc(ring, func(r []byte) bool { return string(r) == string(k) }) {
			if err := kr.RemoveKey(k); err != nil {
				return fmt.Errorf("removing cluster key: %w", err)
			}
		}
	}
	m.mu.Lock()
	m.cfg.Keyring = ring
	m.mu.Unlock()
	m.log.Info("cluster keyring updated", "keys", len(ring))
	return nil
}
