package reachability

import (
	"context"
	"errors"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/wgmesh/wgmesh/mesh/gossipnet"
)

// Path MTU discovery between hosts. WireGuard's packets cross the
// network between two hosts like any other datagram, and the path may
// take smaller packets than either host's interface (a tunnel, a cloud
// interconnect, a DSL line); whether an oversized packet is then
// fragmented, answered with ICMP "fragmentation needed" or silently
// dropped depends on the path, and the last is common enough. So every
// node measures, for every member it reaches directly, the largest IP
// packet that crosses: probes of a chosen size, sent from the gossip
// port with DF set, which the member acknowledges (package gossipnet).
// A lost probe counts like a refused one: nothing relies on ICMP
// arriving.
//
// A search halves the range between the largest size acknowledged and
// the smallest lost or refused one, down to the byte, from the last known
// value first. A known value is confirmed often and cheaply: one probe of
// its size every interval/6 (5 s by default). A lost confirmation is
// repeated at once with two copies (one lost datagram is no shrink), and
// if that is lost too, a search below the known value finds the new
// size: a path that shrinks is noticed within about 6 s. Every growEvery
// intervals a search from the known value up looks for a path that grew
// (or a value that came out low, from a search while packets were lost).
//
// Nothing but an acknowledged probe lowers or raises a known value: a
// search in which every probe is lost says the path is down, not small,
// and keeps it (with no value yet, the protocol's minimum, 576 bytes for
// IPv4 and 1280 for IPv6, which every path must take); a member whose
// gossip stops coming directly keeps its last value too, as its
// WireGuard path may well work.

// PathMTU is the path MTU to a member: the largest IP packet that
// crosses, 0 if unknown; At is when a probe last confirmed it.
type PathMTU struct {
	MTU int       `json:"mtu"`
	At  time.Time `json:"at"`
}

const (
	pmtuGranularity = 1
	pmtuMaxSize     = 9000
	growEvery       = 10
	// DirectFor is how recently a member's packets must have arrived
	// directly for it to count as reached directly: probed, and
	// observed.
	DirectFor = 30 * time.Second
)

func minProbe(a netip.Addr) int {
	if a.Is4() || a.Is4In6() {
		return 576
	}
	return 1280
}

// probeFunc sends a probe of size bytes and reports whether it was
// acknowledged; gossipnet.ErrTooBig says the local interface cannot
// send it.
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
	try := func(size int) error { return tryProbe(ctx, probe, size, &good, &bad) }
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
	if good, err = bisect(ctx, probe, lo, good, bad); err != nil {
		return 0, local, err
	}
	return good, local, nil
}

// bisect finds the largest size in [lo, bad) that passes, halving the
// range between good (passed; 0 for none yet) and bad (lost or
// refused). It returns 0 if even lo does not pass.
func bisect(ctx context.Context, probe probeFunc, lo, good, bad int) (int, error) {
	for {
		base := max(good, lo-1)
		if bad-base <= pmtuGranularity {
			return good, nil
		}
		if err := tryProbe(ctx, probe, max(base+(bad-base)/2, lo), &good, &bad); err != nil {
			return 0, err
		}
	}
}

// tryProbe probes size and narrows good and bad by the answer.
func tryProbe(ctx context.Context, probe probeFunc, size int, good, bad *int) error {
	ok, err := probe(ctx, size)
	switch {
	case errors.Is(err, gossipnet.ErrTooBig):
		*bad = min(*bad, size)
	case err != nil:
		return err
	case ok:
		*good = max(*good, size)
	default:
		*bad = min(*bad, size)
	}
	return nil
}

// Prober measures the path MTU to every member reached directly. It
// calls rtt and changed without holding its lock, and Results may be
// called with any lock held.
type Prober struct {
	interval time.Duration
	// confirmEvery: how often a known value is confirmed.
	confirmEvery time.Duration
	// rtt returns the gossip round trip to a member, 0 if unknown.
	rtt func(name string) time.Duration
	// changed is called when a member's path MTU changes.
	changed func()
	t       Transport
	now     func() time.Time

	mu    sync.Mutex
	paths map[string]*pathState
}

type pathState struct {
	PathMTU
	local   int // the interface's limit toward the member
	checked time.Time
	// grown: when a search last looked for a larger value.
	grown time.Time
	// next: when the path is due again.
	next time.Time
	to   netip.AddrPort
}

// NewProber returns a prober over t that searches every interval (see
// above); rtt gives the gossip round trip to a member (0: unknown), and
// changed, if not nil, is called when a member's path MTU changes.
func NewProber(t Transport, interval time.Duration, rtt func(name string) time.Duration, changed func()) *Prober {
	return &Prober{interval: interval, confirmEvery: confirmEvery(interval), rtt: rtt, changed: changed,
		t: t, now: time.Now, paths: map[string]*pathState{}}
}

// confirmEvery is how often a known path MTU is confirmed, for a given
// --pmtu-interval: often enough to notice a shrink within seconds, and
// cheap (one datagram to each member reached directly, and its small
// acknowledgement).
func confirmEvery(interval time.Duration) time.Duration {
	return max(interval/6, time.Second)
}

// Results returns the path MTU of each member measured.
func (p *Prober) Results() map[string]PathMTU {
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

// Run probes until ctx is done.
func (p *Prober) Run(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if p.round(ctx) != nil && ctx.Err() != nil {
			return
		}
	}
}

// round works through the members due, one at a time, so that it never
// sends more than a few probes at once.
func (p *Prober) round(ctx context.Context) error {
	now := p.now()
	sightings := p.t.Sightings()
	p.mu.Lock()
	for name := range p.paths {
		// Only a member forgotten loses its value (see above).
		if _, ok := sightings[name]; !ok {
			delete(p.paths, name)
		}
	}
	p.mu.Unlock()
	for _, name := range slices.Sorted(maps.Keys(sightings)) {
		s := sightings[name]
		if now.Sub(s.At) > DirectFor {
			continue
		}
		p.mu.Lock()
		st, ok := p.paths[name]
		if !ok {
			st = &pathState{local: pmtuMaxSize}
			p.paths[name] = st
		}
		due := !now.Before(st.next) || st.to != s.Addr
		p.mu.Unlock()
		if !due {
			continue
		}
		if err := p.check(ctx, name, s.Addr, st); err != nil {
			return err
		}
	}
	return nil
}

// check confirms or searches the path MTU to one member.
func (p *Prober) check(ctx context.Context, name string, to netip.AddrPort, st *pathState) error {
	timeout := 4 * p.rtt(name)
	timeout = min(max(timeout, 150*time.Millisecond), time.Second)
	probe := func(ctx context.Context, size int) (bool, error) { return p.t.Probe(ctx, name, to, size, 2, timeout) }
	fits := func(size int) bool { return p.t.Fits(name, to, size) }
	p.mu.Lock()
	prev, local, grown := st.MTU, st.local, st.grown
	moved := st.to != to
	if moved {
		// Another address: the last value is the first guess, and the
		// interface's limit is found again.
		local = pmtuMaxSize
	}
	p.mu.Unlock()
	lo := minProbe(to.Addr())
	start := p.now()
	mtu, next := prev, start.Add(p.confirmEvery)
	// confirmed: a probe was acknowledged.
	confirmed := false
	var err error
	switch {
	case prev == 0 || moved:
		var found int
		found, local, err = searchPMTU(ctx, probe, fits, lo, pmtuMaxSize, prev)
		grown = start
		mtu, confirmed = p.keep(found, prev, lo), found > 0
		if found == 0 {
			next = start.Add(p.interval)
		}
	default:
		var ok bool
		ok, err = p.t.Probe(ctx, name, to, prev, 1, timeout)
		if err == nil && !ok {
			// One datagram lost is no shrink: again, twice.
			ok, err = probe(ctx, prev)
		}
		confirmed = ok
		switch {
		case errors.Is(err, gossipnet.ErrTooBig):
			// The interface shrank: start over.
			var found int
			found, local, err = searchPMTU(ctx, probe, fits, lo, pmtuMaxSize, 0)
			mtu, confirmed = p.keep(found, prev, lo), found > 0
		case err != nil:
		case !ok:
			// The path shrank, or is down: look below.
			var found int
			found, err = bisect(ctx, probe, lo, 0, prev)
			mtu, confirmed = p.keep(found, prev, lo), found > 0
			if found == 0 {
				next = start.Add(p.interval)
			}
		case p.now().Sub(grown) >= growEvery*p.interval && prev < local:
			// Now and then search again, from this value up: the path
			// may have grown, or a search under loss came out low.
			var found int
			found, local, err = searchPMTU(ctx, probe, fits, lo, pmtuMaxSize, prev)
			grown = start
			mtu = p.keep(found, prev, lo)
		}
	}
	if err != nil {
		return err
	}
	now := p.now()
	p.mu.Lock()
	if cur, ok := p.paths[name]; !ok || cur != st {
		p.mu.Unlock()
		return nil
	}
	changed := st.MTU != mtu
	st.MTU, st.local, st.checked, st.grown, st.next, st.to = mtu, local, now, grown, next, to
	if confirmed || st.At.IsZero() {
		st.At = now
	}
	p.mu.Unlock()
	if changed && p.changed != nil {
		p.changed()
	}
	return nil
}

// keep is the path MTU after a search that found found: that, else
// (nothing acknowledged: the path is down, not small) the last value,
// else the protocol's minimum.
func (p *Prober) keep(found, prev, lo int) int {
	switch {
	case found > 0:
		return found
	case prev > 0:
		return prev
	}
	return lo
}
