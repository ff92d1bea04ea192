package driver

import (
	"cmp"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/relay"
	"github.com/wgmesh/wgmesh/mesh"
)

// Relaying for others. A host that offers relay ports, and that members
// see at the address it advertises, relays the pairs that ask it to: a
// pair asks by naming it in a network entry (paths.go), each host of the
// pair signing its own. The relay checks that both hosts are registered,
// alive, and have the network; gives the pair a port of its range, the
// same for as long as it relays it; publishes the session (signed, with
// its path MTU to the two, the smaller of which bounds the relayed path);
// and forwards it (package relay). A session stays open for relayGrace
// after the last wish, so that a pair trying a direct path again finds
// it still there if that fails.

// RelayServer forwards the sessions this host relays (package relay).
type RelayServer interface {
	// Set makes the server forward exactly these sessions. Idempotent.
	Set(sessions []relay.Session) error
	// Stats returns each session's counters.
	Stats() []relay.Stats
}

var _ RelayServer = (*relay.Server)(nil)

// relayGrace keeps a session open after its pair stopped asking.
const relayGrace = 2 * time.Minute

// relayPair is a relayed pair on a network, a < b.
type relayPair struct {
	subnet netip.Prefix
	a, b   string
}

func newRelayPair(subnet netip.Prefix, x, y string) relayPair {
	if x > y {
		x, y = y, x
	}
	return relayPair{subnet, x, y}
}

// relayHost is what this host relays.
type relayHost struct {
	ports   map[relayPair]uint16
	wanted  map[relayPair]time.Time
	refused map[relayPair]string
	serving bool
	setErr  error
	// key is this host's WireGuard key, which the ends' bind keys
	// derive from.
	key crypto.PrivateKey
}

func newRelayHost() *relayHost {
	return &relayHost{ports: map[relayPair]uint16{}, wanted: map[relayPair]time.Time{}, refused: map[relayPair]string{}}
}

// serveRelayLocked works out the sessions this host relays and applies
// them to the relay server and the mesh.
func (d *Driver) serveRelayLocked(v *mesh.View, now time.Time) {
	rh := d.relayHost
	if d.cfg.Relay == nil || d.cfg.RelayPorts < 2 {
		return
	}
	self := v.Members[v.Self]
	if !self.Relay() {
		if rh.serving {
			rh.serving = false
			clear(rh.ports)
			clear(rh.wanted)
			if err := d.cfg.Relay.Set(nil); err != nil {
				d.log.Warn("closing relay sessions", "err", err)
			}
			d.cfg.Mesh.SetRelaySessions(nil)
			d.log.Info("not relaying: members do not see this host at the address it advertises")
		}
		return
	}
	rh.serving = true
	rh.key = d.key
	sessions, records := rh.update(v, now, d.cfg.RelayPort, d.cfg.RelayPorts, d.cfg.RelayPerNode)
	rh.setErr = d.cfg.Relay.Set(sessions)
	if rh.setErr != nil {
		d.log.Error("opening relay ports", "err", rh.setErr)
	}
	d.cfg.Mesh.SetRelaySessions(records)
	for pair, why := range rh.refused {
		d.log.Debug("not relaying a pair", "network", pair.subnet, "a", pair.a, "b", pair.b, "why", why)
	}
}

// update works out the sessions to relay from the wishes in v: ports in
// first+1 .. first+count-1, at most perNode pairs of one host.
func (rh *relayHost) update(v *mesh.View, now time.Time, first, count uint16, perNodeMax int) ([]relay.Session, []mesh.RelaySession) {
	clear(rh.refused)
	for _, subnet := range slices.SortedFunc(maps.Keys(v.Entries), func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) }) {
		for _, e := range v.Entries[subnet] {
			for _, peer := range slices.Sorted(maps.Keys(e.Relay)) {
				if e.Relay[peer].Via != v.Self {
					continue
				}
				pair := newRelayPair(subnet, e.Node, peer)
				if why := relayable(v, pair); why != "" {
					rh.refused[pair] = why
					continue
				}
				rh.wanted[pair] = now
			}
		}
	}
	for pair, at := range rh.wanted {
		if now.Sub(at) > relayGrace || relayable(v, pair) != "" {
			delete(rh.wanted, pair)
			delete(rh.ports, pair)
		}
	}
	// Ports: a pair keeps its port; a new one starts looking at a place
	// its hash picks, so that an agent restart mostly gives the same.
	first, n := first+1, int(count)-1
	used := map[uint16]bool{}
	perNode := map[string]int{}
	for pair, port := range rh.ports {
		used[port] = true
		perNode[pair.a]++
		perNode[pair.b]++
	}
	pairs := slices.SortedFunc(maps.Keys(rh.wanted), comparePairs)
	for _, pair := range pairs {
		if _, ok := rh.ports[pair]; ok {
			continue
		}
		if perNode[pair.a] >= perNodeMax || perNode[pair.b] >= perNodeMax {
			rh.refused[pair] = fmt.Sprintf("more than %d relayed pairs of one host", perNodeMax)
			continue
		}
		h := fnv.New32a()
		h.Write([]byte(pair.subnet.String() + "|" + pair.a + "|" + pair.b))
		start := int(h.Sum32() % uint32(n))
		for i := range n {
			port := first + uint16((start+i)%n)
			if !used[port] {
				rh.ports[pair], used[port] = port, true
				perNode[pair.a]++
				perNode[pair.b]++
				break
			}
		}
		if _, ok := rh.ports[pair]; !ok {
			rh.refused[pair] = fmt.Sprintf("all %d relay ports in use", n)
		}
	}
	var sessions []relay.Session
	var records []mesh.RelaySession
	for _, pair := range slices.SortedFunc(maps.Keys(rh.ports), comparePairs) {
		port := rh.ports[pair]
		a, b := v.Members[pair.a], v.Members[pair.b]
		ss := relay.Session{Port: port, A: a.PublicKey, B: b.PublicKey}
		// An end that sends binds must bind; an old agent's end, which
		// sends none, is learned from its handshakes (package relay).
		var errA, errB error
		if a.RelayBinds() {
			ss.KeyA, errA = relay.BindKey(rh.key, a.PublicKey)
		}
		if b.RelayBinds() {
			ss.KeyB, errB = relay.BindKey(rh.key, b.PublicKey)
		}
		if err := errors.Join(errA, errB); err != nil {
			rh.refused[pair] = err.Error()
			continue
		}
		sessions = append(sessions, ss)
		records = append(records, mesh.RelaySession{Subnet: pair.subnet, A: pair.a, B: pair.b, Port: port,
			MTU: minPositive(a.PathMTU, b.PathMTU)})
	}
	return sessions, records
}

func comparePairs(x, y relayPair) int {
	return cmp.Or(x.subnet.Addr().Compare(y.subnet.Addr()), cmp.Compare(x.a, y.a), cmp.Compare(x.b, y.b))
}

// relayable says why a pair may not be relayed, or "".
func relayable(v *mesh.View, pair relayPair) string {
	for _, name := range []string{pair.a, pair.b} {
		if name == v.Self {
			return "this host is one of the pair"
		}
		m, ok := v.Members[name]
		switch {
		case !ok || !m.Registered:
			return name + " is not a registered member"
		case !m.State.Reachable():
			return name + " is " + m.State.String()
		case m.PublicKey.IsZero():
			return name + " has no WireGuard key"
		}
		if e, ok := v.Entry(pair.subnet, name); !ok || e.Port == 0 {
			return name + " does not have network " + pair.subnet.String()
		}
	}
	return ""
}
