package dns

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/wgmesh/wgmesh/test/poll"
)

// rawUpstream is an upstream on loopback whose answers the test writes:
// handle gets every query with the socket it came on, so that it can
// answer late, twice, or not at all.
type rawUpstream struct {
	addr netip.AddrPort
	pc   net.PacketConn
	ids  chan uint16
	n    atomic.Int64
}

func startRawUpstream(t *testing.T, handle func(pc net.PacketConn, from net.Addr, q *dns.Msg)) *rawUpstream {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &rawUpstream{addr: netip.MustParseAddrPort(pc.LocalAddr().String()), pc: pc, ids: make(chan uint16, 1024)}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			q := new(dns.Msg)
			if q.Unpack(buf[:n]) != nil || len(q.Question) != 1 || q.Response {
				continue
			}
			if q.Question[0].Name == "probe." {
				// startServer's: the server is up.
				writeTo(pc, from, new(dns.Msg).SetRcode(q, dns.RcodeNameError))
				continue
			}
			u.n.Add(1)
			select {
			case u.ids <- q.Id:
			default:
			}
			wg.Add(1)
			go func() { defer wg.Done(); handle(pc, from, q) }()
		}
	}()
	t.Cleanup(func() { pc.Close(); wg.Wait() })
	return u
}

func writeTo(pc net.PacketConn, to net.Addr, m *dns.Msg) {
	b, err := m.Pack()
	if err == nil {
		_, _ = pc.WriteTo(b, to)
	}
}

func aRecord(name, addr string) dns.RR {
	rr, _ := dns.NewRR(fmt.Sprintf("%s 30 IN A %s", name, addr))
	return rr
}

// goodAnswer answers q with 198.51.100.1, after delay.
func goodAnswer(delay time.Duration) func(pc net.PacketConn, from net.Addr, q *dns.Msg) {
	return func(pc net.PacketConn, from net.Addr, q *dns.Msg) {
		time.Sleep(delay)
		m := new(dns.Msg).SetReply(q)
		m.Answer = append(m.Answer, aRecord(q.Question[0].Name, "198.51.100.1"))
		writeTo(pc, from, m)
	}
}

// askRaw sends q from a loopback source and
// returns the answer, read whole whatever its size.
func askRaw(t *testing.T, server netip.AddrPort, from string, q *dns.Msg) (*dns.Msg, int) {
	t.Helper()
	m, n, err := tryAsk(server, from, q)
	if err != nil {
		t.Fatal(err)
	}
	return m, n
}

// tryAsk is askRaw for other goroutines than the test's.
func tryAsk(server netip.AddrPort, from string, q *dns.Msg) (*dns.Msg, int, error) {
	c, err := net.DialUDP("udp", &net.UDPAddr{IP: net.ParseIP(from)}, net.UDPAddrFromAddrPort(server))
	if err != nil {
		return nil, 0, err
	}
	defer c.Close()
	b, _ := q.Pack()
	if _, err := c.Write(b); err != nil {
		return nil, 0, err
	}
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 65536)
	n, err := c.Read(buf)
	if err != nil {
		return nil, 0, fmt.Errorf("asking for %s from %s: %w", q.Question[0].Name, from, err)
	}
	m := new(dns.Msg)
	if err := m.Unpack(buf[:n]); err != nil {
		return nil, 0, fmt.Errorf("answer does not unpack: %w", err)
	}
	return m, n, nil
}

// TestForwardFreshID: the query upstream carries an ID of the server's
// choosing, not the client's, and the client gets its own back.
func TestForwardFreshID(t *testing.T) {
	up := startRawUpstream(t, goodAnswer(0))
	s := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}, Clients: fakeClients{}, Names: newFakeNames()})
	var seen []uint16
	for i := range 5 {
		q := new(dns.Msg).SetQuestion(fmt.Sprintf("n%d.example.", i), dns.TypeA)
		q.Id = 4242
		m, _ := askRaw(t, s.cfg.Listen, "127.0.0.2", q)
		if m.Id != 4242 || len(m.Answer) != 1 {
			t.Fatalf("answer %s", m)
		}
		seen = append(seen, <-up.ids)
	}
	if !slices.ContainsFunc(seen, func(id uint16) bool { return id != 4242 }) {
		t.Errorf("the upstream saw the client's ID every time: %v", seen)
	}
}

// TestForwardChecksQuestion: an upstream reply for another question (here
// one that would put 203.0.113.66 under the asked name) is not taken, nor
// cached; the real answer that follows is.
func TestForwardChecksQuestion(t *testing.T) {
	up := startRawUpstream(t, func(pc net.PacketConn, from net.Addr, q *dns.Msg) {
		forged := new(dns.Msg).SetReply(q)
		forged.Question[0].Name = "evil.example."
		forged.Answer = append(forged.Answer, aRecord(q.Question[0].Name, "203.0.113.66"))
		writeTo(pc, from, forged)
		notReply := new(dns.Msg).SetReply(q)
		notReply.Response = false
		notReply.Answer = append(notReply.Answer, aRecord(q.Question[0].Name, "203.0.113.67"))
		writeTo(pc, from, notReply)
		goodAnswer(50*time.Millisecond)(pc, from, q)
	})
	s := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}, Clients: fakeClients{}, Names: newFakeNames()})
	for _, from := range []string{"127.0.0.2", "127.0.0.3"} {
		m, _ := askRaw(t, s.cfg.Listen, from, new(dns.Msg).SetQuestion("victim.example.", dns.TypeA))
		if got := addrsOf(m); !slices.Equal(got, []string{"198.51.100.1"}) {
			t.Fatalf("%s got %v", from, got)
		}
	}
}

// TestForwardCoalesces: the same question asked by many containers at
// once goes upstream once.
func TestForwardCoalesces(t *testing.T) {
	up := startRawUpstream(t, goodAnswer(200*time.Millisecond))
	s := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}, Clients: fakeClients{}, Names: newFakeNames()})
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m, _, err := tryAsk(s.cfg.Listen, fmt.Sprintf("127.0.1.%d", i+1), new(dns.Msg).SetQuestion("Same.Example.", dns.TypeA))
			if err != nil {
				t.Error(err)
			} else if got := addrsOf(m); !slices.Equal(got, []string{"198.51.100.1"}) {
				t.Errorf("got %v", got)
			}
		}()
	}
	wg.Wait()
	if n := up.n.Load(); n != 1 {
		t.Errorf("the upstream was asked %d times", n)
	}
}

// TestForwardTruncates: an upstream answer too big for a client without
// EDNS goes out truncated, with TC set, fresh or from the cache.
func TestForwardTruncates(t *testing.T) {
	up := startRawUpstream(t, func(pc net.PacketConn, from net.Addr, q *dns.Msg) {
		m := new(dns.Msg).SetReply(q)
		for i := range 100 {
			m.Answer = append(m.Answer, aRecord(q.Question[0].Name, fmt.Sprintf("198.51.100.%d", i+1)))
		}
		m.Compress = true
		writeTo(pc, from, m)
	})
	s := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}, Clients: fakeClients{}, Names: newFakeNames()})
	for i, size := range []uint16{0, 0, 1232} {
		q := new(dns.Msg).SetQuestion("big.example.", dns.TypeA)
		want := dns.MinMsgSize
		if size > 0 {
			q.SetEdns0(size, false)
			want = int(size)
		}
		m, n := askRaw(t, s.cfg.Listen, "127.0.0.2", q)
		if n > want || !m.Truncated {
			t.Errorf("query %d (EDNS size %d): %d bytes, truncated %v", i, size, n, m.Truncated)
		}
		if (m.IsEdns0() != nil) != (size > 0) {
			t.Errorf("query %d (EDNS size %d): answer's OPT %v", i, size, m.IsEdns0())
		}
	}
}

// TestServerBoundsGoroutines: queries against an upstream that never
// answers do not pile up goroutines; the excess gets SERVFAIL.
func TestServerBoundsGoroutines(t *testing.T) {
	up := startRawUpstream(t, func(net.PacketConn, net.Addr, *dns.Msg) {})
	s := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}, Clients: fakeClients{}, Names: newFakeNames(), UpstreamTimeout: time.Second,
		ClientTimeout: time.Second, CacheSize: 4096})
	base := runtime.NumGoroutine()
	var peak atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			peak.Store(max(peak.Load(), int64(runtime.NumGoroutine()-base)))
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	// Held: counted 100 ms after the last query is sent, while the
	// upstream still keeps the first ones waiting (1 s). The peak also
	// counts the server's goroutine per packet, which lives for
	// microseconds when the server is full, and so depends on the
	// machine's load rather than on the number of queries.
	var held int
	servfail := flood(t, s.cfg.Listen, 3000, 30, func(i int) *dns.Msg {
		return new(dns.Msg).SetQuestion(fmt.Sprintf("q%d.silent.example.", i), dns.TypeA)
	}, func() { time.Sleep(100 * time.Millisecond); held = runtime.NumGoroutine() - base })
	close(stop)
	wg.Wait()
	t.Logf("goroutines above base: %d held, %d at the peak; SERVFAIL answers: %d", held, peak.Load(), servfail)
	// The flood's 30 readers besides the server's.
	if held > maxInFlight+60 {
		t.Errorf("3000 queries to a silent upstream held %d goroutines", held)
	}
}

// flood sends n queries from loopback addresses 127.0.2.1… (spread
// over nsrc of them), paced, calls afterSending, and counts the SERVFAIL
// answers that come back until none has for a second.
func flood(t *testing.T, server netip.AddrPort, n, nsrc int, query func(i int) *dns.Msg, afterSending func()) int {
	t.Helper()
	conns := make([]*net.UDPConn, nsrc)
	for i := range conns {
		c, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 2+byte(i/250), 1+byte(i%250))}, net.UDPAddrFromAddrPort(server))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
	}
	var servfail atomic.Int64
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 65536)
			for {
				_ = c.SetReadDeadline(time.Now().Add(time.Second))
				k, err := c.Read(buf)
				if err != nil {
					return
				}
				m := new(dns.Msg)
				if m.Unpack(buf[:k]) == nil && m.Rcode == dns.RcodeServerFailure {
					servfail.Add(1)
				}
			}
		}()
	}
	for i := range n {
		q := query(i)
		b, _ := q.Pack()
		_, _ = conns[i%nsrc].Write(b)
		if i%100 == 99 {
			// Paced, so that the server's socket buffer is not what
			// drops them.
			time.Sleep(5 * time.Millisecond)
		}
	}
	if afterSending != nil {
		afterSending()
	}
	wg.Wait()
	return int(servfail.Load())
}

// TestServerRateLimitsSource: one source cannot take more than its share;
// another is answered meanwhile.
func TestServerRateLimitsSource(t *testing.T) {
	// Bounds of a tenth of the defaults: a flood of the defaults' size
	// would be limited by the machine as much as by the server.
	const rate, burst = sourceRate / 10, sourceBurst / 10
	s := startServer(t, Config{Clients: fakeClients{netip.MustParseAddr("127.0.3.1"): {red}, netip.MustParseAddr("127.0.0.2"): {red}},
		Names: newFakeNames(rec("h1", "aaaaaaaaaaa1", red, "10.60.1.2", "web")), SourceRate: rate, SourceBurst: burst})
	c, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 3, 1)}, net.UDPAddrFromAddrPort(s.cfg.Listen))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b, _ := new(dns.Msg).SetQuestion("web.", dns.TypeA).Pack()
	start := time.Now()
	const n = 3000
	answered := make(chan int)
	go func() {
		buf := make([]byte, 4096)
		k := 0
		for {
			_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			if _, err := c.Read(buf); err != nil {
				answered <- k
				return
			}
			k++
		}
	}()
	// Another container asks meanwhile, and is answered at once.
	other := make(chan []string)
	go func() {
		time.Sleep(50 * time.Millisecond)
		m, _, err := tryAsk(s.cfg.Listen, "127.0.0.2", new(dns.Msg).SetQuestion("web.", dns.TypeA))
		if err != nil {
			other <- []string{err.Error()}
			return
		}
		other <- addrsOf(m)
	}()
	for i := range n {
		_, _ = c.Write(b)
		if i%100 == 99 {
			// Paced, so that the server's socket buffer is not what
			// drops them.
			time.Sleep(5 * time.Millisecond)
		}
	}
	sent := time.Since(start)
	if got := <-other; !slices.Equal(got, []string{"10.60.1.2"}) {
		t.Errorf("another source got %v during the flood", got)
	}
	k := <-answered
	limit := burst + int(rate*sent.Seconds()) + 50
	t.Logf("%d of %d queries sent in %v answered (limit %d)", k, n, sent, limit)
	if k > limit {
		t.Errorf("one source got %d answers in %v", k, sent)
	}
}

// TestWatcherNegativeBounded: queries from thousands of addresses that
// are no container's neither grow the negative cache without bound nor
// make a look at Docker each.
func TestWatcherNegativeBounded(t *testing.T) {
	d := newFakeDocker()
	p := &fakePublisher{}
	w := startWatcher(t, d, p, time.Hour)
	poll.Eventually(t, 5*time.Second, "the watcher's first look", func() error {
		if p.looks() == 0 {
			return fmt.Errorf("no first look")
		}
		return nil
	})
	looks := p.looks()
	start := time.Now()
	// As the server asks: a query each, at most maxInFlight at once.
	const n = 20000
	var next atomic.Int64
	var wg sync.WaitGroup
	for range maxInFlight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := next.Add(1); i <= n; i = next.Add(1) {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				w.Networks(ctx, netip.AddrFrom4([4]byte{10, 200, byte(i >> 8), byte(i)}))
				cancel()
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	w.mu.Lock()
	neg := len(w.negative)
	w.mu.Unlock()
	extra := p.looks() - looks
	t.Logf("%d addresses in %v: %d negative entries, %d looks at Docker", n, elapsed, neg, extra)
	if neg > maxNegative {
		t.Errorf("%d negative entries", neg)
	}
	if allowed := int(elapsed/unknownLookEvery) + 2; extra > allowed {
		t.Errorf("%d looks at Docker in %v (allowed %d)", extra, elapsed, allowed)
	}
}
