package mesh

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"net"
	"slices"
	"strconv"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// ErrRefused wraps the cluster's refusal of this node: a taken name, an
// identity used under another name, a forgotten identity. The agent
// cannot work until an operator acts, so Run returns it.
var ErrRefused = errors.New("the cluster refuses this node")

// Run starts gossip and consensus, joins the seeds and runs the mesh until
// ctx is done, then leaves the cluster if configured to. It returns an
// error if gossip could not start or the cluster refuses this node.
func (m *Mesh) Run(ctx context.Context) error {
	conf := m.memberlistConfig()
	if m.gossip.sockets != nil {
		m.gossip.sockets.Start()
	}
	m.gossip.net.Start()
	ml, err := memberlist.Create(conf)
	if err != nil {
		m.node.Close()
		_ = m.gossip.net.Shutdown()
		return fmt.Errorf("starting gossip on %s:%d: %w", conf.BindAddr, conf.BindPort, err)
	}
	m.gossip.ml.Store(ml)
	m.mu.Lock()
	m.state.started = time.Now()
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
		case <-m.signals.kick:
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
		m.state.own.leaving = true
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

// seedRetryMin and seedRetryMax bound the backoff of a node that could
// not reach any seed.
const (
	seedRetryMin = 100 * time.Millisecond
	seedRetryMax = time.Second
)

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
			if !m.state.joined {
				m.state.joined = true
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
	for name, n := range m.state.rep.Infos() {
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
	if m.state.own.info.ClusterID != m.node.ClusterID() {
		m.setSelfInfoLocked()
	}
	m.reassessNATLocked(now)
	hints := m.state.reach.RouteHints()
	observations := m.state.reach.Observations(now)
	reflect := m.state.reach.ReflectTargets(now)
	updateMeta := m.state.own.metaStale
	m.state.own.metaStale = false
	m.pruneNamesLocked(time.Now())
	out := m.state.outbox
	m.state.outbox = nil
	m.mu.Unlock()

	m.gossip.net.SetHints(hints)
	for _, r := range reflect {
		m.gossip.net.AskReflection(r.Name, r.To)
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
	return viewSig{mutations: m.state.mutations, index: v.Catalog.Index, states: h.Sum64()}
}
