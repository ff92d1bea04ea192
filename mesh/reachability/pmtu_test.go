package reachability

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"golang.org/x/sys/unix"

	"github.com/wgmesh/wgmesh/mesh/gossipnet"
)

// pipeTransport is a NodeAwareTransport that keeps the last packet
// written and lets the test feed packets in (a smaller copy of
// gossipnet's).
type pipeTransport struct {
	memberlist.NodeAwareTransport
	in   chan *memberlist.Packet
	last []byte
}

func newPipe() *pipeTransport { return &pipeTransport{in: make(chan *memberlist.Packet, 16)} }

func (p *pipeTransport) PacketCh() <-chan *memberlist.Packet { return p.in }
func (p *pipeTransport) WriteToAddress(b []byte, _ memberlist.Address) (time.Time, error) {
	p.last = b
	return time.Now(), nil
}
func (p *pipeTransport) WriteTo(b []byte, _ string) (time.Time, error) {
	p.last = b
	return time.Now(), nil
}
func (p *pipeTransport) Shutdown() error { return nil }

// StreamCh: no streams.
func (p *pipeTransport) StreamCh() <-chan net.Conn { return nil }

func keys(names ...string) [][]byte {
	var out [][]byte
	for _, n := range names {
		k := make([]byte, 32)
		copy(k, n)
		out = append(out, k)
	}
	return out
}

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

// WriteDF makes the prober's transport a gossipnet.DFWriter.
func (f *fakePath) WriteDF(b []byte, to netip.AddrPort) error {
	// The probe is a whole IP packet: the datagram, a UDP header and an
	// IPv4 or IPv6 header.
	size := len(b) + 8 + 40
	if a := to.Addr(); a.Is4() || a.Is4In6() {
		size = len(b) + 8 + 20
	}
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
	a, b   *gossipnet.Transport
	path   *fakePath
	bAddr  netip.AddrPort
	aPipe  *pipeTransport
	bPipe  *pipeTransport
	prober *Prober
}

func newProbePair(t *testing.T, mtu int, interval time.Duration) *probePair {
	t.Helper()
	aAddr := &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 7946}
	bAddr := &net.UDPAddr{IP: net.IPv4(198, 51, 100, 2), Port: 7946}
	aPipe, bPipe := newPipe(), newPipe()
	path := &fakePath{mtu: mtu, iface: 1500, peer: bPipe.in, from: aAddr}
	a := gossipnet.New(struct {
		*pipeTransport
		*fakePath
	}{aPipe, path}, "a")
	b := gossipnet.New(&forwardTransport{pipeTransport: bPipe, to: aPipe.in, from: bAddr}, "b")
	// b seals its gossip for a (heard).
	b.SetHints(map[string]gossipnet.RouteHint{"a": {Header: true, ReplayProof: true}})
	stop := make(chan struct{})
	for _, g := range []*gossipnet.Transport{a, b} {
		g.SetKeyring(keys("k"))
		g.Start()
		go func(g *gossipnet.Transport) {
			for {
				select {
				case <-g.PacketCh():
				case <-stop:
					return
				}
			}
		}(g)
	}
	t.Cleanup(func() {
		close(stop)
		_ = a.Shutdown()
		_ = b.Shutdown()
	})
	pp := &probePair{a: a, b: b, path: path, bAddr: netip.MustParseAddrPort(bAddr.String()), aPipe: aPipe, bPipe: bPipe}
	pp.prober = NewProber(a, interval, func(string) time.Duration { return 0 }, nil)
	return pp
}

// heard makes a hear b's gossip, at.
func (pp *probePair) heard(t *testing.T, at time.Time) {
	t.Helper()
	if _, err := pp.b.WriteToAddress([]byte("g"), memberlist.Address{Addr: "192.0.2.1:7946", Name: "a"}); err != nil {
		t.Fatal(err)
	}
	pp.aPipe.in <- &memberlist.Packet{Buf: pp.bPipe.last, From: net.UDPAddrFromAddrPort(pp.bAddr), Timestamp: at}
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if s, ok := pp.a.Sightings()["b"]; ok && s.At.Equal(at) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("a did not hear b")
		}
	}
}

func waitMTU(p *Prober, name string, want int, limit time.Duration) (time.Duration, bool) {
	start := time.Now()
	for time.Since(start) < limit {
		if p.Results()[name].MTU == want {
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
	if got := pp.prober.Results()["b"].MTU; got != 1400 {
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
		pp.prober.Run(ctx)
		close(done)
	}()
	time.Sleep(1500 * time.Millisecond)
	cancel()
	<-done
	if got := pp.prober.Results()["b"].MTU; got != 1400 {
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
		pp.prober.Run(ctx)
		close(done)
	}()
	defer func() {
		cancel()
		<-done
	}()
	if took, ok := waitMTU(pp.prober, "b", 1400, 5*time.Second); !ok {
		t.Fatalf("path MTU not found in %s: %+v", took, pp.prober.Results())
	}
	pp.path.setMTU(1300)
	took, ok := waitMTU(pp.prober, "b", 1300, 15*time.Second)
	if !ok || took > 10*time.Second {
		t.Fatalf("a shrink from 1400 to 1300 noticed: %v, after %s (want within 10 s); now %+v", ok, took.Round(time.Millisecond), pp.prober.Results())
	}
	t.Logf("a shrink from 1400 to 1300 noticed after %s", took.Round(time.Millisecond))
}

// simProber is a prober on a simulated clock and path: each probe takes
// the round trip when acknowledged, the whole timeout when lost. It is
// the prober's Transport.
type simProber struct {
	p       *Prober
	now     time.Time
	mtu     int
	lose    int // the next lose probes are lost whatever their size
	packets int // probe datagrams sent
	to      netip.AddrPort
	rtt     time.Duration
}

func newSimProber(to netip.AddrPort, mtu int, rtt time.Duration) *simProber {
	s := &simProber{now: time.Unix(1_000_000, 0), mtu: mtu, to: to, rtt: rtt}
	s.p = NewProber(s, 30*time.Second, func(string) time.Duration { return s.rtt }, nil)
	s.p.now = func() time.Time { return s.now }
	return s
}

func (s *simProber) Sightings() map[string]gossipnet.Sighting {
	return map[string]gossipnet.Sighting{"b": {Addr: s.to, At: s.now}}
}

func (s *simProber) Reflections() map[string]gossipnet.Sighting { return nil }

func (s *simProber) Probe(_ context.Context, _ string, _ netip.AddrPort, size, copies int, timeout time.Duration) (bool, error) {
	s.packets += copies
	if s.lose > 0 || size > s.mtu {
		s.lose = max(s.lose-1, 0)
		s.now = s.now.Add(timeout)
		return false, nil
	}
	s.now = s.now.Add(s.rtt)
	return true, nil
}

func (s *simProber) Fits(string, netip.AddrPort, int) bool { return true }

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
	mtu := func() int { return s.p.Results()["b"].MTU }
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
		if got := s.p.Results()["b"].MTU; got != c.want {
			t.Fatalf("%s, every probe lost: %d, want %d", c.to, got, c.want)
		}
	}
}

func TestSearchPMTU(t *testing.T) {
	path := func(mtu, iface int) probeFunc {
		return func(_ context.Context, size int) (bool, error) {
			if size > iface {
				return false, gossipnet.ErrTooBig
			}
			return size <= mtu, nil
		}
	}

	for _, c := range []struct {
		name                    string
		mtu, iface, first, want int
		wantLocal               int
	}{
		{"full path", 1400, 1400, 0, 1400, 1400},
		{"smaller path, black hole", 1280, 1400, 0, 1280, 1400},
		{"odd size", 1333, 1500, 0, 1333, 1500},
		{"from the last value, unchanged", 1280, 1400, 1280, 1280, 1400},
		{"from the last value, shrunk", 1200, 1400, 1280, 1200, 1400},
		{"from the last value, grown", 1400, 1400, 1280, 1400, 1400},
		{"nothing passes", 0, 1400, 0, 0, 1400},
		{"jumbo", 9000, 9000, 0, 9000, 9000},
	} {
		t.Run(c.name, func(t *testing.T) {
			probes := 0
			p := path(c.mtu, c.iface)
			counted := func(ctx context.Context, size int) (bool, error) {
				probes++
				return p(ctx, size)
			}
			fits := func(size int) bool { return size <= c.iface }
			got, local, err := searchPMTU(context.Background(), counted, fits, 576, pmtuMaxSize, c.first)
			if err != nil || got != c.want || local != c.wantLocal {
				t.Fatalf("got %d (local %d) %v, want %d (local %d)", got, local, err, c.want, c.wantLocal)
			}
			if probes > 12 {
				t.Errorf("%d probes", probes)
			}
			if c.mtu == c.iface && c.first == 0 && probes != 1 {
				t.Errorf("a full path took %d probes, want 1", probes)
			}
		})
	}
}
