package mesh

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/consensus"
	"github.com/wgmesh/wgmesh/mesh/records"
)

// membership is what consensus sees of gossip: the members with their
// self-signed infos. Consensus makes its own trust decisions (the catalog,
// TLS identities), so unregistered members are listed too: a joining node
// finds the cluster through them.
type membership struct{ m *Mesh }

var _ consensus.Membership = membership{}

func (ms membership) Members() []consensus.Member {
	m := ms.m
	m.mu.Lock()
	defer m.mu.Unlock()
	out := []consensus.Member{m.consensusMember(m.state.own.info, true, true)}
	for name, info := range m.state.rep.Infos() {
		l := m.state.live[name]
		out = append(out, m.consensusMember(info, l.state.Reachable(), false))
	}
	return out
}

func (m *Mesh) consensusMember(n NodeInfo, alive, self bool) consensus.Member {
	mem := consensus.Member{Name: n.Name, ID: n.ID, ClusterID: n.ClusterID, Alive: alive, Self: self, BehindNAT: n.NAT.Behind(),
		Server: consensus.ServerAuto, ClaimsServerKey: n.Features&records.FeatureServerKey != 0}
	switch {
	case n.Features&records.FeatureServerNever != 0:
		mem.Server = consensus.ServerNever
	case n.Features&records.FeatureServerAlways != 0:
		mem.Server = consensus.ServerAlways
	}
	if n.RaftPort != 0 {
		mem.RaftAddr = net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.RaftPort)))
	}
	return mem
}

func (ms membership) Joined() bool {
	m := ms.m
	if len(m.cfg.Join) == 0 {
		return true
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state.joined
}

func (ms membership) MissingSeeds() []string {
	m := ms.m
	m.mu.Lock()
	self := m.state.own.info
	present := map[string]bool{net.JoinHostPort(self.Addr.String(), strconv.Itoa(int(self.GossipPort))): true}
	for name, info := range m.state.rep.Infos() {
		if m.state.live[name].state.Reachable() {
			present[net.JoinHostPort(info.Addr.String(), strconv.Itoa(int(info.GossipPort)))] = true
		}
	}
	m.mu.Unlock()
	var missing []string
	for _, seed := range m.cfg.Join {
		if !seedPresent(seed, m.cfg.BindPort, present) {
			missing = append(missing, seed)
		}
	}
	return missing
}

// seedPresent reports whether a seed (host or host:port) is one of the
// addresses in present, resolving host names.
func seedPresent(seed string, defaultPort int, present map[string]bool) bool {
	host, port, err := net.SplitHostPort(seed)
	if err != nil {
		host, port = seed, strconv.Itoa(defaultPort)
	}
	addrs := []string{host}
	if _, err := netip.ParseAddr(host); err != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if resolved, err := net.DefaultResolver.LookupHost(ctx, host); err == nil {
			addrs = resolved
		}
	}
	for _, a := range addrs {
		if present[net.JoinHostPort(a, port)] {
			return true
		}
	}
	return false
}

// problems remembers what hosts should show in status for a while: name
// conflicts seen by gossip.
type problems struct {
	mu    sync.Mutex
	items map[string]problem
}

type problem struct {
	text string
	at   time.Time
}

// problemTTL is how long a problem stays in status after it was last seen.
const problemTTL = 10 * time.Minute

func (p *problems) add(key, text string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.items == nil {
		p.items = map[string]problem{}
	}
	p.items[key] = problem{text, time.Now()}
}

func (p *problems) nameTaken(name, addr string, bound, other crypto.NodeID) {
	p.add("taken/"+name+"/"+addr, fmt.Sprintf("a host at %s tried to join as node %s, a name the cluster binds to another identity (%s, not %s); "+
		"it was refused: give that host another --node-name", addr, name, bound.Short(), other.Short()))
}

func (p *problems) conflict(name, addr, other string) {
	a, b := min(addr, other), max(addr, other)
	p.add("conflict/"+name+"/"+a+"/"+b, fmt.Sprintf("two hosts use node name %s: %s and %s; give each host a unique --node-name "+
		"and a state directory of its own (a cloned VM keeps both)", name, a, b))
}

func (p *problems) list() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for k, pr := range p.items {
		if time.Since(pr.at) > problemTTL {
			delete(p.items, k)
			continue
		}
		out = append(out, pr.text)
	}
	slices.Sort(out)
	return out
}

// Problems lists what is wrong with the cluster as this node sees it:
// consensus trouble, name conflicts, members the catalog does not vouch
// for, records refused as forged, another cluster met by gossip, and a
// legacy state that could not be upgraded.
func (m *Mesh) Problems() []string {
	out := m.problems.list()
	cs := m.node.Status()
	if cs.Problem != "" {
		out = append(out, "consensus: "+cs.Problem)
	} else if cs.Registered && cs.Leader == "" {
		out = append(out, "consensus: no leader (most voters are down or unreachable): no network can be created and no address block claimed; "+
			"if they are gone for good, see `wgmesh recover`")
	}
	v := m.View()
	out = append(out, unreachableProblems(cs.Unreachable, v, m.cfg.raftPort())...)
	for _, name := range slices.Sorted(maps.Keys(v.Members)) {
		mem := v.Members[name]
		if mem.Self || mem.Registered || !mem.State.Reachable() {
			continue
		}
		if mem.ClusterID != "" && v.ClusterID != "" && mem.ClusterID != v.ClusterID {
			out = append(out, fmt.Sprintf("node %s (%s) belongs to another wgmesh cluster (%s, this one is %s): two clusters met through gossip; "+
				"their seeds (--join) must not mix", name, mem.Addr, mem.ClusterID, v.ClusterID))
			continue
		}
		if time.Since(mem.Since) > 30*time.Second {
			out = append(out, fmt.Sprintf("node %s (%s) is not registered in the cluster; its records are not used", name, mem.Addr))
		}
	}
	m.mu.Lock()
	refused := m.state.rep.Refused()
	legacyErr := ""
	if m.state.legacy != nil && m.state.legacy.err != nil {
		legacyErr = m.state.legacy.err.Error()
	}
	m.mu.Unlock()
	for _, reason := range []string{"entry-forged", "info-wrong-identity"} {
		if n := refused[reason]; n > 0 {
			out = append(out, fmt.Sprintf("refused %d gossip records not signed by the identity of the node they name (%s): a member is forging records", n, reason))
		}
	}
	if legacyErr != "" {
		out = append(out, "upgrading this node's state from before consensus: "+legacyErr)
	}
	return out
}

// Stats are counters of the mesh since start.
type Stats struct {
	SentMessages, SentBytes, ReceivedMessages, ReceivedBytes uint64
	// Names counts the part of the above that is container names.
	Names NameTraffic `json:"names"`
	// Refused counts gossip records refused, by reason, and as
	// "packet-bad-header" the packets refused for a header that does not
	// verify under the cluster keys.
	Refused map[string]uint64
}

// Stats returns gossip counters.
func (m *Mesh) Stats() Stats {
	m.mu.Lock()
	refused := m.state.rep.Refused()
	m.mu.Unlock()
	if m.gossip.net != nil {
		// Packets whose header does not verify: from a host without a
		// key of this ring, an evicted one say. memberlist never sees them.
		if n := m.gossip.net.Refused(); n > 0 {
			if refused == nil {
				refused = map[string]uint64{}
			}
			refused["packet-bad-header"] = n
		}
	}
	s := &m.gossip.stats
	return Stats{
		SentMessages: s.sentMsgs.Load(), SentBytes: s.sentBytes.Load(),
		ReceivedMessages: s.recvMsgs.Load(), ReceivedBytes: s.recvBytes.Load(),
		Refused: refused,
		Names: NameTraffic{
			SentMessages: s.nameSentMsgs.Load(), SentBytes: s.nameSentBytes.Load(),
			ReceivedMessages: s.nameRecvMsgs.Load(), ReceivedBytes: s.nameRecvBytes.Load(),
			StateBytes: s.nameStateBytes.Load(),
		},
	}
}

// NameTraffic counts gossip of container names: messages sent (own,
// relayed, direct) and received, and the bytes of name records in the
// push/pull states this node sent.
type NameTraffic struct {
	SentMessages, SentBytes, ReceivedMessages, ReceivedBytes uint64
	StateBytes                                               uint64
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only our own plain types are marshalled
	}
	return b
}

// unreachableProblems describes the members gossip reaches whose
// consensus connections time out (consensus/health.go): packets are lost
// on the way, and which ones the path MTU may tell.
func unreachableProblems(us []consensus.Unreachable, v *View, raftPort int) []string {
	var out []string
	for _, u := range us {
		mem, ok := v.Members[u.Name]
		if !ok || !mem.State.Reachable() {
			// Down, or unknown: gossip says so already.
			continue
		}
		cause := fmt.Sprintf("a firewall on the way drops TCP to port %d, or the path loses larger packets "+
			"without ICMP \"fragmentation needed\" coming back (a path MTU black hole)", raftPort)
		if mem.PathMTU > 0 {
			cause += fmt.Sprintf("; the path MTU measured to %s is %d bytes", u.Name, mem.PathMTU)
		}
		out = append(out, fmt.Sprintf("consensus: gossip reaches node %s, but this node's consensus connections to it (%s) time out "+
			"(%d since %s; last: %s): %s; until they work, this node may claim no address block",
			u.Name, u.Addr, u.Count, u.Since.Format(time.TimeOnly), u.Err, cause))
	}
	return out
}
