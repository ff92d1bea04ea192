package mesh

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/wgmesh/wgmesh/internal/logbridge"
	"github.com/wgmesh/wgmesh/mesh/gossipnet"
	"github.com/wgmesh/wgmesh/mesh/reachability"
	"github.com/wgmesh/wgmesh/mesh/records"
)

// gossip is memberlist and what lies under it. Nothing here is guarded
// by Mesh.mu.
type gossip struct {
	// ml is nil before Run; keyring is nil without encryption.
	ml      atomic.Pointer[memberlist.Memberlist]
	keyring atomic.Pointer[memberlist.Keyring]
	// net is memberlist's transport (package gossipnet), over sockets of
	// its own unless Config.Transport is given (sockets nil).
	net     *gossipnet.Transport
	sockets *gossipnet.NetTransport
	queue   *memberlist.TransmitLimitedQueue
	stats   gossipStats
	// probeInterval is memberlist's, for the suspect heuristic.
	probeInterval time.Duration
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
		m.gossip.sockets, inner = t, t
		m.cfg.BindPort = t.Port()
	}
	nat, ok := inner.(memberlist.NodeAwareTransport)
	if !ok {
		return errors.New("the gossip transport must be node-aware")
	}
	m.gossip.net = gossipnet.New(nat, m.cfg.Name)
	m.gossip.net.SetKeyring(m.cfg.Keyring)
	if m.cfg.RelayPort != 0 {
		hostPort := net.JoinHostPort(m.cfg.BindAddr, strconv.Itoa(int(m.cfg.RelayPort)))
		ua, err := net.ResolveUDPAddr("udp", hostPort)
		var c *net.UDPConn
		if err == nil {
			c, err = net.ListenUDP("udp", ua)
		}
		if err != nil {
			if m.gossip.sockets != nil {
				_ = m.gossip.sockets.Shutdown()
			}
			return fmt.Errorf("relay port %d: %w", m.cfg.RelayPort, err)
		}
		m.gossip.net.SetReflector(c)
	}
	interval := m.cfg.PMTUInterval
	if interval == 0 {
		interval = 30 * time.Second
	}
	if interval > 0 && m.gossip.net.CanProbe() {
		m.pmtu = reachability.NewProber(m.gossip.net, interval, m.rttOf, func() {
			m.setListenersMSS()
			m.touch()
		})
	}
	return nil
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
	conf.Transport = m.gossip.net
	// TCP fallback probes cannot reach a member behind NAT either.
	conf.DisableTcpPingsForNode = func(name string) bool { return !m.gossip.net.Dialable(name) }
	if len(m.cfg.Keyring) > 0 {
		// Errors are impossible: crypto validated the key lengths.
		ring, _ := memberlist.NewKeyring(m.cfg.Keyring, m.cfg.Keyring.Primary())
		conf.Keyring = ring
		m.gossip.keyring.Store(ring)
		conf.GossipVerifyIncoming = true
		conf.GossipVerifyOutgoing = true
	}
	return conf
}

// memberlist returns the running memberlist, or nil before Run.
func (m *Mesh) memberlist() *memberlist.Memberlist { return m.gossip.ml.Load() }

type outMsg struct {
	name string // invalidates older queued broadcasts with the same name
	b    []byte
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
		for name, rec := range m.state.live {
			if rec.state == Alive && rec.addr != "" && name != m.cfg.Name {
				peers = append(peers, memberlist.Address{Addr: rec.addr, Name: name})
			}
		}
		m.mu.Unlock()
	}
	for _, msg := range msgs {
		m.gossip.queue.QueueBroadcast(&broadcast{name: msg.name, msg: msg.b})
		for _, to := range peers {
			if err := ml.SendToAddress(to, msg.b); err != nil {
				m.log.Debug("sending to member", "peer", to.Name, "err", err)
			}
			m.gossip.stats.sent(len(msg.b))
			if msg.b[0] == records.KindName {
				m.gossip.stats.nameSent(len(msg.b))
			}
		}
	}
}

// sendDirect sends messages to single members, best effort, by the
// address nodeEvent copied (see send: memberlist's live *Node is not
// safe to read).
func (m *Mesh) sendDirect(ml *memberlist.Memberlist, msgs []reachability.Message) {
	if ml == nil || len(msgs) == 0 {
		return
	}
	for _, msg := range msgs {
		m.mu.Lock()
		rec, ok := m.state.live[msg.To]
		m.mu.Unlock()
		if !ok || rec.addr == "" {
			continue
		}
		if err := ml.SendToAddress(memberlist.Address{Addr: rec.addr, Name: msg.To}, msg.Data); err != nil {
			m.log.Debug("sending an observation", "peer", msg.To, "err", err)
		}
		m.gossip.stats.sent(len(msg.Data))
	}
}

// broadcast is a gossip message; a newer one with the same name replaces
// an older one still in the queue.
type broadcast struct {
	name string
	msg  []byte
}

var _ memberlist.NamedBroadcast = (*broadcast)(nil)

func (b *broadcast) Invalidates(other memberlist.Broadcast) bool {
	o, ok := other.(*broadcast)
	return ok && o.name == b.name
}
func (b *broadcast) Name() string    { return b.name }
func (b *broadcast) Message() []byte { return b.msg }
func (b *broadcast) Finished()       {}

// gossipStats counts wgmesh's own gossip payload (not memberlist's probes).
// The name counters count the part of it that is name records: messages
// sent (broadcast, relayed or direct) and received, and the bytes of the
// records (data and signature) in the push/pull states sent.
type gossipStats struct {
	sentMsgs, sentBytes, recvMsgs, recvBytes atomic.Uint64

	nameSentMsgs, nameSentBytes, nameRecvMsgs, nameRecvBytes, nameStateBytes atomic.Uint64
}

func (s *gossipStats) nameSent(n int) {
	s.nameSentMsgs.Add(1)
	s.nameSentBytes.Add(uint64(n))
}

func (s *gossipStats) sent(n int) {
	s.sentMsgs.Add(1)
	s.sentBytes.Add(uint64(n))
}

func (s *gossipStats) received(n int) {
	s.recvMsgs.Add(1)
	s.recvBytes.Add(uint64(n))
}
