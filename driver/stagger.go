package driver

import (
	"bytes"
	"net/netip"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
)

// initiateDelay is how long the second side of a new pair of WireGuard
// peers waits before it starts a handshake of its own.
//
// A persistent keepalive makes WireGuard start a handshake as soon as a
// peer is configured. When two hosts configure each other at the same
// moment, as they do when a network is created on both, or when a host
// joins and every other host adds it at once, both send an initiation,
// each answers the other's, and each answer is dropped because answering
// replaced the handshake it was meant to complete. Both then wait out
// WireGuard's five-second retry. So for a new peer the side with the lower
// public key turns its keepalive on at once, and the other side after this
// delay. If the first side's initiation arrived before the second side
// knew it, the second side's own initiation succeeds: the first side had
// to know the second to send anything.
const initiateDelay = 750 * time.Millisecond

// stagger remembers when each peer of each network was first seen, to
// decide when to let this node's keepalive start a handshake.
type stagger struct {
	first map[netip.Prefix]map[crypto.PublicKey]time.Time
}

func newStagger() *stagger {
	return &stagger{first: map[netip.Prefix]map[crypto.PublicKey]time.Time{}}
}

// keepalive returns the keepalive to configure for peer, and how long
// until it should be recomputed (0: never). With flip the side with the
// higher key goes first (paths.go alternates it between attempts to
// punch through NAT).
func (s *stagger) keepalive(subnet netip.Prefix, self, peer crypto.PublicKey, want time.Duration, now time.Time, flip bool) (time.Duration, time.Duration) {
	if want == 0 || (bytes.Compare(self[:], peer[:]) < 0) != flip {
		return want, 0
	}
	seen, ok := s.first[subnet][peer]
	if !ok {
		if s.first[subnet] == nil {
			s.first[subnet] = map[crypto.PublicKey]time.Time{}
		}
		s.first[subnet][peer] = now
		seen = now
	}
	if wait := initiateDelay - now.Sub(seen); wait > 0 {
		return 0, wait
	}
	return want, 0
}

// known marks peers as long known, so that they are not delayed: used for
// the peers a restarted agent finds, whose sessions may still be running.
func (s *stagger) known(subnet netip.Prefix, peer crypto.PublicKey) {
	if s.first[subnet] == nil {
		s.first[subnet] = map[crypto.PublicKey]time.Time{}
	}
	s.first[subnet][peer] = time.Time{}
}

// restart treats peer as new from now: it was started over (a new path).
func (s *stagger) restart(subnet netip.Prefix, peer crypto.PublicKey, now time.Time) {
	if s.first[subnet] == nil {
		s.first[subnet] = map[crypto.PublicKey]time.Time{}
	}
	s.first[subnet][peer] = now
}

// forget drops peers of subnet not in keep.
func (s *stagger) forget(subnet netip.Prefix, keep map[crypto.PublicKey]bool) {
	for k := range s.first[subnet] {
		if !keep[k] {
			delete(s.first[subnet], k)
		}
	}
}
