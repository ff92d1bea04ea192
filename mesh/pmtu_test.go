package mesh

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"golang.org/x/sys/unix"
)

// forwardTransport hands what its owner sends to another transport's
// input, as if from the owner's address.
type forwardTransport struct {
	*pipeTransport
	to   chan *memberlist.Packet
	from *net.UDPAddr
}

func (f *forwardTransport) WriteTo(b []byte, _ string) (time.Time, error) {
	f.to <- &memberlist.Packet{Buf: append([]byte(nil), b...), From: f.from, Timestamp: time.Now()}
	return time.Now(), nil
}

// fakePath is the path between a prober and its peer: probes with DF up
// to mtu bytes reach the peer (its own packet handling answers them),
// larger ones are dropped without a word; the interface takes iface.
type fakePath struct {
	mu     sync.Mutex
	mtu    int
	iface  int
	probes int
	peer   chan *memberlist.Packet
	from   *net.UDPAddr
}

func (f *fakePath) setMTU(mtu int) {
	f.mu.Lock()
	f.mtu = mtu
	f.mu.Unlock()
}

func (f *fakePath) WriteDF(b []byte, to netip.AddrPort) error {
	size := len(b) + ipOverhead(to.Addr())
	f.mu.Lock()
	defer f.mu.Unlock()
	if size > f.iface {
		return unix.EMSGSIZE
	}
	f.probes++
	if size <= f.mtu {
		f.peer <- &memberlist.Packet{Buf: append([]byte(nil), b...), From: f.from, Timestamp: time.Now()}
	}
	return nil
}

// probePair is a prober "a" and its peer "b" on a fake path.
type probePair struct {
	a, b   *gossipTransport
	path   *fakePath
	bAddr  netip.AddrPort
	aPipe  *pipeTransport
	prober *pmtuProber
}

func newProbePair(t *testing.T, mtu int, interval time.Duration) *probePair {
	t.Helper()
	aAddr := &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 7946}
	bAddr := &net.UDPAddr{IP: net.IPv4(198, 51, 100, 2), Port: 7946}
	aPipe, bPipe := newPipe(), newPipe()
	a := newGossipTransport(aPipe, "a")
	b := newGossipTransport(&forwardTransport{pipeTransport: bPipe, to: aPipe.in, from: bAddr}, "b")
	path := &fakePath{mtu: mtu, iface: 1500, peer: bPipe.in, from: aAddr}
	a.df = path
	for _, g := range []*gossipTransport{a, b} {
		g.setKeyring(keys("k"))
		g.start()
		go func(g *gossipTransport) {
			for {
				select {
				case <-g.PacketCh():
				case <-g.done:
					return
				}
			}
		}(g)
	}
	t.Cleanup(func() {
		_ = a.Shutdown()
		_ = b.Shutdown()
	})
	pp := &probePair{a: a, b: b, path: path, bAddr: netip.MustParseAddrPort(bAddr.String()), aPipe: aPipe}
	pp.prober = newPMTUProber(a, interval, func(string) time.Duration { return 0 }, nil)
	return pp
}

// heard makes a hear b's gossip, at.
func (pp *probePair) heard(t *testing.T, at time.Time) {
	t.Helper()
	pp.aPipe.in <- &memberlist.Packet{Buf: pp.b.seal(kindGossip, []byte("g")), From: net.UDPAddrFromAddrPort(pp.bAddr), Timestamp: at}
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if s, ok := pp.a.sightingsCopy()["b"]; ok && s.At.Equal(at) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("a did not hear b")
		}
	}
}

func waitMTU(p *pmtuProber, name string, want int, limit time.Duration) (time.Duration, bool) {
	start := time.Now()
	for time.Since(start) < limit {
		if p.results()[name].MTU == want {
			return time.Since(start), true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start), false
}

// TestAllProbesLostKeepsMTU: a search in which every probe is lost says
// nothing about the path's size (the path is down, or dropping
// everything for a moment); it used to return 0 and remove the route MTU,
// so that large packets were lost until the next interval.
func TestAllProbesLostKeepsMTU(t *testing.T) {
	pp := newProbePair(t, 0, 30*time.Second)
	st := &pathState{PathMTU: PathMTU{MTU: 1400, At: time.Now()}, local: 1500, to: pp.bAddr}
	pp.prober.paths["b"] = st
	if err := pp.prober.check(context.Background(), "b", pp.bAddr, st); err != nil {
		t.Fatal(err)
	}
	if got := pp.prober.results()["b"].MTU; got != 1400 {
		t.Fatalf("after a search with every probe lost the path MTU is %d, want the last good 1400", got)
	}
}

// TestPathMTUOutlivesDirectGossip: a member whose gossip has not come
// directly for a while (its WireGuard path may work all the same) keeps
// its last path MTU; it used to be dropped after 2 minutes.
func TestPathMTUOutlivesDirectGossip(t *testing.T) {
	pp := newProbePair(t, 1400, 30*time.Second)
	pp.heard(t, time.Now().Add(-3*time.Minute))
	pp.prober.paths["b"] = &pathState{PathMTU: PathMTU{MTU: 1400, At: time.Now()}, local: 1500, to: pp.bAddr}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		pp.prober.loop(ctx)
		close(done)
	}()
	time.Sleep(1500 * time.Millisecond)
	cancel()
	<-done
	if got := pp.prober.results()["b"].MTU; got != 1400 {
		t.Fatalf("path MTU %d after 3 minutes without direct gossip, want the last 1400", got)
	}
}

// TestShrinkNoticedWithin10s: with the default interval, a path that
// shrinks is noticed, and its new MTU published, within 10 s.
func TestShrinkNoticedWithin10s(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the prober in real time")
	}
	pp := newProbePair(t, 1400, 30*time.Second)
	pp.heard(t, time.Now())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		pp.prober.loop(ctx)
		close(done)
	}()
	defer func() {
		cancel()
		<-done
	}()
	if took, ok := waitMTU(pp.prober, "b", 1400, 5*time.Second); !ok {
		t.Fatalf("path MTU not found in %s: %+v", took, pp.prober.results())
	}
	pp.path.setMTU(1300)
	took, ok := waitMTU(pp.prober, "b", 1300, 15*time.Second)
	if !ok || took > 10*time.Second {
		t.Fatalf("a shrink from 1400 to 1300 noticed: %v, after %s (want within 10 s); now %+v", ok, took.Round(time.Millisecond), pp.prober.results())
	}
	t.Logf("a shrink from 1400 to 1300 noticed after %s", took.Round(time.Millisecond))
}

// simProber is a prober on a simulated clock and path: each probe takes
// the round trip when acknowledged, the whole timeout when lost.
type simProber struct {
	p       *pmtuProber
	now     time.Time
	mtu     int
	lose    int // the next lose probes are lost whatever their size
	packets int // probe datagrams sent
	to      netip.AddrPort
	rtt     time.Duration
}

func newSimProber(to netip.AddrPort, mtu int, rtt time.Duration) *simProber {
	s := &simProber{now: time.Unix(1_000_000, 0), mtu: mtu, to: to, rtt: rtt}
	s.p = &pmtuProber{interval: 30 * time.Second, confirmEvery: confirmEvery(30 * time.Second),
		rtt:       func(string) time.Duration { return s.rtt },
		sightings: func() map[string]sighting { return map[string]sighting{"b": {Addr: s.to, At: s.now}} },
		probe: func(_ context.Context, _ string, _ netip.AddrPort, size, copies int, timeout time.Duration) (bool, error) {
			s.packets += copies
			if s.lose > 0 || size > s.mtu {
				s.lose = max(s.lose-1, 0)
				s.now = s.now.Add(timeout)
				return false, nil
			}
			s.now = s.now.Add(s.rtt)
			return true, nil
		},
		fits:  func(string, netip.AddrPort, int) bool { return true },
		now:   func() time.Time { return s.now },
		paths: map[string]*pathState{}}
	return s
}

// run advances the simulation by d, a round every second as loop does,
// and returns how long it took until cond held (d if never).
func (s *simProber) run(t *testing.T, d time.Duration, cond func() bool) time.Duration {
	t.Helper()
	start := s.now
	for s.now.Sub(start) < d {
		if err := s.p.round(context.Background()); err != nil {
			t.Fatal(err)
		}
		if cond != nil && cond() {
			return s.now.Sub(start)
		}
		s.now = s.now.Add(time.Second)
	}
	return d
}

func TestProberOnSimulatedClock(t *testing.T) {
	to := netip.MustParseAddrPort("198.51.100.2:7946")
	s := newSimProber(to, 1400, 20*time.Millisecond)
	mtu := func() int { return s.p.results()["b"].MTU }
	s.run(t, 3*time.Second, func() bool { return mtu() == 1400 })
	if mtu() != 1400 {
		t.Fatalf("found %d, want 1400", mtu())
	}

	// Idle cost: one datagram per confirmation, every 5 s.
	s.packets = 0
	s.run(t, time.Minute, nil)
	if s.packets > 14 {
		t.Errorf("%d probe datagrams a minute to an unchanged path", s.packets)
	}

	// One lost datagram is no shrink.
	s.lose = 1
	s.run(t, 10*time.Second, nil)
	if mtu() != 1400 {
		t.Fatalf("one lost confirmation made it %d", mtu())
	}

	// A shrink, at every phase of the confirmation cycle: noticed within
	// 10 s, on paths of up to 100 ms round trip (a lost probe waits 4
	// round trips, 150 ms to 1 s).
	for _, rtt := range []time.Duration{20 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond} {
		s.rtt = rtt
		worst := time.Duration(0)
		for phase := range 5 {
			s.mtu = 1400
			s.run(t, time.Minute, func() bool { return mtu() == 1400 })
			s.run(t, time.Duration(phase)*time.Second, nil)
			s.mtu = 1300
			took := s.run(t, 30*time.Second, func() bool { return mtu() == 1300 })
			if mtu() != 1300 {
				t.Fatalf("phase %d: a shrink to 1300 not noticed in 30 s: %d", phase, mtu())
			}
			worst = max(worst, took)
		}
		if rtt <= 100*time.Millisecond && worst > 10*time.Second {
			t.Fatalf("round trip %s: a shrink noticed after up to %s", rtt, worst)
		}
		t.Logf("round trip %s: a shrink from 1400 to 1300 noticed after %s at worst (simulated)", rtt, worst)
	}
	s.rtt = 20 * time.Millisecond

	// Everything lost: the last value stays, and a new search waits an
	// interval rather than repeating every confirmation.
	s.mtu = 0
	s.packets = 0
	s.run(t, time.Minute, nil)
	if mtu() != 1300 {
		t.Fatalf("a path losing everything has path MTU %d, want the last 1300", mtu())
	}
	if s.packets > 80 {
		t.Errorf("%d probe datagrams a minute to a path losing everything", s.packets)
	}

	// A member never measured whose probes are all lost gets the
	// protocol's minimum.
	for _, c := range []struct {
		to   string
		want int
	}{{"198.51.100.3:7946", 576}, {"[2001:db8::3]:7946", 1280}} {
		s := newSimProber(netip.MustParseAddrPort(c.to), 0, 20*time.Millisecond)
		s.run(t, 5*time.Second, nil)
		if got := s.p.results()["b"].MTU; got != c.want {
			t.Fatalf("%s, every probe lost: %d, want %d", c.to, got, c.want)
		}
	}
}
