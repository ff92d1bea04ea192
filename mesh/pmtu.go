package mesh

import (
	"context"
	"errors"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// Path MTU discovery between hosts. WireGuard's packets cross the
// network between two hosts like any other datagram, and the path may
// take smaller packets than either host's interface (a tunnel, a cloud
// interconnect, a DSL line); whether an oversized packet is then
// fragmented, answered with ICMP "fragmentation needed" or silently
// dropped depends on the path, and the last is common enough. So every
// node measures, for every member it reaches directly, the largest IP
// packet that crosses: probes of a chosen size, sent from the gossip
// port with DF set, which the member acknowledges (gossipnet.go). A lost
// probe counts like a refused one: nothing relies on ICMP arriving.
//
// A search halves the range between the largest size acknowledged and
// the smallest lost or refused one, down to the byte, from the last known
// value first. A known value is confirmed every interval with one probe
// of its size; two confirmations lost in a row start a new search (the
// path shrank), and every growEvery intervals a search from the known
// value up looks for a path that grew (or a value that came out low,
// from a search while packets were lost).

// PathMTU is the path MTU to a member: the largest IP packet that
// crosses, 0 if unknown.
type PathMTU struct {
	MTU int       `json:"mtu"`
	At  time.Time `json:"at"`
}

const (
	pmtuGranularity = 1
	pmtuMaxSize     = 9000
	growEvery       = 10
	// directFor is how recently a member's packets must have arrived
	// directly for it to be probed.
	directFor = 30 * time.Second
)

func minProbe(a netip.Addr) int {
	if a.Is4() || a.Is4In6() {
		return 576
	}
	return 1280
}

// probeFunc sends a probe of size bytes and reports whether it was
// acknowledged; errTooBig says the local interface cannot send it.
type probeFunc func(ctx context.Context, size int) (bool, error)

// fitsFunc reports whether the local interface sends a packet of size
// bytes with DF set, without waiting for anything.
type fitsFunc func(size int) bool

// searchPMTU finds the largest size in [lo, hi] that passes: first the
// interface's limit (local), which costs no waiting, then the path's,
// trying first (the last known value) and the limit before halving. It
// returns 0 if even lo does not pass.
func searchPMTU(ctx context.Context, probe probeFunc, fits fitsFunc, lo, hi, first int) (mtu, local int, err error) {
	local = hi
	if !fits(hi) {
		l, h := lo-1, hi // l fits (or is below the range), h does not
		for h-l > 1 {
			mid := l + (h-l)/2
			if fits(mid) {
				l = mid
			} else {
				h = mid
			}
		}
		local = l
	}
	if local < lo {
		return 0, local, nil
	}
	good, bad := 0, local+1
	try := func(size int) error {
		ok, err := probe(ctx, size)
		switch {
		case errors.Is(err, errTooBig):
			bad = min(bad, size)
		case err != nil:
			return err
		case ok:
			good = max(good, size)
		default:
			bad = min(bad, size)
		}
		return nil
	}
	if first >= lo && first < local {
		if err := try(first); err != nil {
			return 0, local, err
		}
	}
	if good == first || first < lo || first >= local {
		// The common case: the path takes what the interface does.
		if err := try(local); err != nil {
			return 0, local, err
		}
	}
	for {
		base := max(good, lo-1)
		if bad-base <= pmtuGranularity {
			break
		}
		if err := try(max(base+(bad-base)/2, lo)); err != nil {
			return 0, local, err
		}
	}
	return good, local, nil
}

// pmtuProber measures the path MTU to every member reached directly.
type pmtuProber struct {
	t        *gossipTransport
	interval time.Duration
	// rtt returns the gossip round trip to a member, 0 if unknown.
	rtt func(name string) time.Duration
	// changed is called when a member's path MTU changes.
	changed func()

	mu    sync.Mutex
	paths map[string]*pathState
}

type pathState struct {
	PathMTU
	local   int // the interface's limit toward the member
	checked time.Time
	fails   int
	rounds  int
	to      netip.AddrPort
}

func newPMTUProber(t *gossipTransport, interval time.Duration, rtt func(string) time.Duration, changed func()) *pmtuProber {
	return &pmtuProber{t: t, interval: interval, rtt: rtt, changed: changed, paths: map[string]*pathState{}}
}

// results returns the path MTU of each member measured.
func (p *pmtuProber) results() map[string]PathMTU {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]PathMTU, len(p.paths))
	for name, s := range p.paths {
		if s.MTU > 0 {
			out[name] = s.PathMTU
		}
	}
	return out
}

// loop probes until ctx is done. It works through the members due, one
// at a time, so that it never sends more than a few probes at once.
func (p *pmtuProber) loop(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		now := time.Now()
		sightings := p.t.sightingsCopy()
		p.mu.Lock()
		for name := range p.paths {
			if s, ok := sightings[name]; !ok || now.Sub(s.At) > sightingTTL {
				delete(p.paths, name)
			}
		}
		p.mu.Unlock()
		for _, name := range slices.Sorted(maps.Keys(sightings)) {
			s := sightings[name]
			if now.Sub(s.At) > directFor {
				continue
			}
			p.mu.Lock()
			st, ok := p.paths[name]
			if !ok {
				st = &pathState{local: pmtuMaxSize}
				p.paths[name] = st
			}
			due := now.Sub(st.checked) >= p.interval || st.to != s.Addr
			p.mu.Unlock()
			if !due {
				continue
			}
			if err := p.check(ctx, name, s.Addr, st); err != nil {
				if ctx.Err() != nil {
					return
				}
			}
		}
	}
}

// check confirms or searches the path MTU to one member.
func (p *pmtuProber) check(ctx context.Context, name string, to netip.AddrPort, st *pathState) error {
	timeout := 4 * p.rtt(name)
	timeout = min(max(timeout, 150*time.Millisecond), time.Second)
	probe := func(ctx context.Context, size int) (bool, error) { return p.t.probe(ctx, name, to, size, 2, timeout) }
	fits := func(size int) bool { return p.t.fits(name, to, size) }
	p.mu.Lock()
	prev, local, fails, rounds := st.MTU, st.local, st.fails, st.rounds
	if st.to != to {
		prev, local, fails = 0, pmtuMaxSize, 0
	}
	p.mu.Unlock()
	search := prev == 0
	if !search {
		ok, err := probe(ctx, prev)
		switch {
		case errors.Is(err, errTooBig):
			search = true // the interface shrank
		case err != nil:
			return err
		case !ok:
			fails++
			search = fails >= 2
		default:
			fails = 0
			// Now and then search again, from this value up: the path
			// may have grown, or a search under loss came out low.
			search = rounds%growEvery == growEvery-1 && prev < local
		}
	}
	mtu := prev
	if search {
		var err error
		if mtu, local, err = searchPMTU(ctx, probe, fits, minProbe(to.Addr()), pmtuMaxSize, prev); err != nil {
			return err
		}
		fails = 0
	}
	now := time.Now()
	p.mu.Lock()
	if cur, ok := p.paths[name]; !ok || cur != st {
		p.mu.Unlock()
		return nil
	}
	changed := st.MTU != mtu
	st.MTU, st.local, st.fails, st.rounds, st.checked, st.to = mtu, local, fails, rounds+1, now, to
	if fails == 0 {
		st.At = now
	}
	p.mu.Unlock()
	if changed && p.changed != nil {
		p.changed()
	}
	return nil
}
