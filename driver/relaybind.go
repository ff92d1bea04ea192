package driver

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/relay"
	"github.com/wgmesh/wgmesh/mesh"
)

// relayBinder sends this host's binds to the relays of its relayed peers
// (package relay): a relay takes an end's WireGuard handshakes only from
// the address its binds come from. They go from a socket of the agent's
// own, since WireGuard's belongs to the kernel or to wireguard-go; the
// address is the same (the host's, or its NAT's toward the relay), the
// port need not be. A bind goes out as soon as a peer is pointed at a
// session, before WireGuard's first handshake (the driver sends binds
// before it applies the data plane), and every relay.BindEvery after, so
// that a relay that restarted or an end whose NAT moved is bound again.
// A relay whose node does not advertise binds (an agent that predates
// them) gets none: it would only drop them.
//
// Not safe for concurrent use: the driver calls it with its mutex held.
type relayBinder struct {
	log *slog.Logger
	// conn4 and conn6 are opened when first needed.
	conn4, conn6 *net.UDPConn
	// sent is when each session endpoint was last sent a bind.
	sent map[netip.AddrPort]time.Time
}

func newRelayBinder(log *slog.Logger) *relayBinder {
	return &relayBinder{log: log, sent: map[netip.AddrPort]time.Time{}}
}

// sendLocked sends a bind to each relay session a peer is pointed at that
// has not had one for relay.BindEvery, and returns how many it sent.
func (b *relayBinder) sendLocked(now time.Time, v *mesh.View, key crypto.PrivateKey, ps *paths) int {
	due := map[netip.AddrPort]crypto.PublicKey{}
	for _, p := range ps.m {
		if !p.relayed || !p.relayEP.IsValid() {
			continue
		}
		m, ok := v.Members[p.via]
		if !ok || !m.RelayBinds() || m.PublicKey.IsZero() {
			continue
		}
		if at, ok := b.sent[p.relayEP]; ok && now.Sub(at) < relay.BindEvery && now.Sub(at) >= 0 {
			continue
		}
		due[p.relayEP] = m.PublicKey
	}
	for ep, at := range b.sent {
		if now.Sub(at) > 2*relay.BindEvery {
			delete(b.sent, ep)
		}
	}
	n := 0
	for ep, relayKey := range due {
		bk, err := relay.BindKey(key, relayKey)
		if err == nil {
			err = b.send(ep, relay.AppendBind(nil, bk, ep.Port(), now))
		}
		if err != nil {
			b.log.Debug("sending a relay bind", "relay", ep, "err", err)
			continue
		}
		b.sent[ep] = now
		n++
	}
	return n
}

func (b *relayBinder) send(to netip.AddrPort, msg []byte) error {
	network, conn := "udp4", &b.conn4
	if a := to.Addr(); a.Is6() && !a.Is4In6() {
		network, conn = "udp6", &b.conn6
	}
	if *conn == nil {
		c, err := net.ListenUDP(network, nil)
		if err != nil {
			return err
		}
		*conn = c
	}
	_, err := (*conn).WriteToUDPAddrPort(msg, netip.AddrPortFrom(to.Addr().Unmap(), to.Port()))
	return err
}

// close closes the binder's sockets.
func (b *relayBinder) close() error {
	var errs []error
	for _, c := range []**net.UDPConn{&b.conn4, &b.conn6} {
		if *c != nil {
			errs = append(errs, (*c).Close())
			*c = nil
		}
	}
	return errors.Join(errs...)
}
