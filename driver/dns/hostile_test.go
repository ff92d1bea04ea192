package dns

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/wgmesh/wgmesh/test/poll"
)

// TestHostile throws at a running server what a container on the host
// can send: random and malformed packets, a flood of queries from many
// source addresses, and forged upstream replies sprayed at the
// forwarder's whole port range, with the ID the attacker gave its own
// query, while the real upstream answers late. Nothing is poisoned,
// honest queries keep being answered, and goroutines and memory come
// back to where they were. Bounded in count and time; set
// WGMESH_DNS_HOSTILE=heavy for the long version, whose figures go in the
// log (go test -v -run TestHostile).
func TestHostile(t *testing.T) {
	heavy := os.Getenv("WGMESH_DNS_HOSTILE") == "heavy"
	junk, floodN, floodSrc, victims, duration := 2000, 6000, 250, 2, 3*time.Second
	if heavy {
		junk, floodN, floodSrc, victims, duration = 20000, 100000, 1000, 10, 30*time.Second
	}
	if testing.Short() {
		junk, floodN, victims, duration = 500, 1500, 1, 1500*time.Millisecond
	}
	const good, evil = "198.51.100.1", "203.0.113.66"
	up := startRawUpstream(t, func(pc net.PacketConn, from net.Addr, q *dns.Msg) {
		// Late, so that forgeries have their window.
		delay := time.Millisecond
		if strings.HasSuffix(q.Question[0].Name, ".race.example.") {
			delay = 400 * time.Millisecond
		}
		goodAnswer(delay)(pc, from, q)
	})
	honest := netip.MustParseAddr("127.0.0.2")
	s := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}, Clients: fakeClients{honest: {red}},
		Names: newFakeNames(rec("h1", "aaaaaaaaaaa1", red, "10.60.1.2", "web")), UpstreamTimeout: time.Second, ClientTimeout: time.Second, CacheSize: 4096})
	askRaw(t, s.cfg.Listen, "127.0.0.2", new(dns.Msg).SetQuestion("cached.example.", dns.TypeA))

	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	baseG := runtime.NumGoroutine()
	deadline := time.Now().Add(duration)

	// Honest queries all along: a mesh name and a cached outside name,
	// from a container, every 5 ms.
	var lat []time.Duration
	var honestFail atomic.Int64
	stopHonest := make(chan struct{})
	var hwg sync.WaitGroup
	hwg.Add(1)
	go func() {
		defer hwg.Done()
		for i := 0; ; i++ {
			select {
			case <-stopHonest:
				return
			case <-time.After(5 * time.Millisecond):
			}
			name, want := "web.", "10.60.1.2"
			if i%2 == 1 {
				name, want = "cached.example.", good
			}
			start := time.Now()
			m, _, err := tryAsk(s.cfg.Listen, "127.0.0.2", new(dns.Msg).SetQuestion(name, dns.TypeA))
			if err != nil || !slices.Equal(addrsOf(m), []string{want}) {
				honestFail.Add(1)
				continue
			}
			lat = append(lat, time.Since(start))
		}
	}()

	// 1. Junk from many sources.
	rng := rand.New(rand.NewPCG(1, 2))
	junkConns := dialSources(t, s.cfg.Listen, 64, 20)
	for i := range junk {
		if time.Now().After(deadline) {
			break
		}
		_, _ = junkConns[i%len(junkConns)].Write(junkPacket(rng, i))
		if i%100 == 99 {
			time.Sleep(2 * time.Millisecond)
		}
	}

	// 2 and 3 at once: the flood, and forged replies racing the upstream.
	var fwg sync.WaitGroup
	var floodSent, floodAnswered atomic.Int64
	floodStart := time.Now()
	fwg.Add(1)
	go func() {
		defer fwg.Done()
		conns := dialSources(t, s.cfg.Listen, floodSrc, 30)
		var rwg sync.WaitGroup
		for _, c := range conns {
			rwg.Add(1)
			go func() {
				defer rwg.Done()
				buf := make([]byte, 65536)
				for {
					_ = c.SetReadDeadline(time.Now().Add(1500 * time.Millisecond))
					if _, err := c.Read(buf); err != nil {
						return
					}
					floodAnswered.Add(1)
				}
			}()
		}
		for i := range floodN {
			if time.Now().After(deadline) {
				break
			}
			var q *dns.Msg
			switch i % 3 {
			case 0:
				q = new(dns.Msg).SetQuestion(fmt.Sprintf("f%d.flood.example.", i), dns.TypeA)
			case 1:
				q = new(dns.Msg).SetQuestion("cached.example.", dns.TypeA)
			default:
				q = new(dns.Msg).SetQuestion("web.", dns.TypeA)
			}
			b, _ := q.Pack()
			_, _ = conns[i%len(conns)].Write(b)
			floodSent.Add(1)
			if i%50 == 49 {
				time.Sleep(2 * time.Millisecond)
			}
		}
		rwg.Wait()
		for _, c := range conns {
			c.Close()
		}
	}()
	lo, hi := portRange(t)
	forged := 0
	for v := range victims {
		if time.Now().After(deadline) {
			break
		}
		name := fmt.Sprintf("v%d.race.example.", v)
		q := new(dns.Msg).SetQuestion(name, dns.TypeA)
		q.Id = uint16(0x4000 + v)
		attacker, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 9, 1)}, net.UDPAddrFromAddrPort(s.cfg.Listen))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := q.Pack()
		_, _ = attacker.Write(b)
		// From the upstream's own address and port, as a forger with
		// NET_RAW would send them: the attacker's ID and a random one, to
		// every port the forwarder's socket may have.
		lie := new(dns.Msg).SetReply(q)
		lie.Answer = append(lie.Answer, aRecord(name, evil))
		for port := lo; port <= hi; port++ {
			to := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}
			for _, id := range []uint16{q.Id, uint16(rng.Uint32())} {
				lie.Id = id
				writeTo(up.pc, to, lie)
				forged++
			}
		}
		_ = attacker.SetReadDeadline(time.Now().Add(3 * time.Second))
		buf := make([]byte, 65536)
		if n, err := attacker.Read(buf); err == nil {
			m := new(dns.Msg)
			if m.Unpack(buf[:n]) == nil && slices.Contains(addrsOf(m), evil) {
				t.Errorf("%s: the attacker's own query got the forged answer", name)
			}
		}
		attacker.Close()
	}
	fwg.Wait()
	floodTime := time.Since(floodStart)
	close(stopHonest)
	hwg.Wait()

	// Nothing poisoned: every victim name, asked again from a container,
	// is the upstream's answer.
	for v := range victims {
		name := fmt.Sprintf("v%d.race.example.", v)
		m, _ := askRaw(t, s.cfg.Listen, "127.0.0.2", new(dns.Msg).SetQuestion(name, dns.TypeA))
		if got := addrsOf(m); slices.Contains(got, evil) {
			t.Errorf("%s is poisoned: %v", name, got)
		}
	}

	// Flat: in-flight work drains within the upstream timeout.
	var g int
	if err := poll.Until(context.Background(), 5*time.Second, "in-flight work drained", func() error {
		if g = runtime.NumGoroutine(); g > baseG+5 {
			return fmt.Errorf("%d goroutines, %d before", g, baseG)
		}
		return nil
	}); err != nil {
		var sb strings.Builder
		_ = pprof.Lookup("goroutine").WriteTo(&sb, 1)
		t.Fatalf("%v:\n%s", err, sb.String())
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	growth := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	slices.Sort(lat)
	p := func(q float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(q*float64(len(lat))))]
	}
	st := s.Stats()
	t.Logf("junk %d packets; flood %d queries from %d sources in %v: %.0f/s sent, %.0f/s answered; forged replies %d",
		junk, floodSent.Load(), floodSrc, floodTime.Round(time.Millisecond), float64(floodSent.Load())/floodTime.Seconds(),
		float64(floodAnswered.Load())/floodTime.Seconds(), forged)
	t.Logf("honest queries: %d answered, %d failed; latency p50 %v p99 %v max %v", len(lat), honestFail.Load(), p(0.5), p(0.99), p(1))
	t.Logf("goroutines %d before, %d after; heap %d KiB before, %d KiB after; stats %+v", baseG, g, before.HeapAlloc>>10, after.HeapAlloc>>10, st)
	if growth > 32<<20 {
		t.Errorf("heap grew by %d MiB", growth>>20)
	}
	// A loaded machine runs few honest queries in the short default run:
	// two failures are slack for its scheduling, not for the server.
	if len(lat) == 0 || honestFail.Load() > int64(len(lat))/10+2 {
		t.Errorf("honest queries: %d answered, %d failed", len(lat), honestFail.Load())
	}
}

// dialSources opens n UDP sockets to server from as many loopback
// addresses 127.0.sub.1, 127.0.sub.2, …
func dialSources(t *testing.T, server netip.AddrPort, n int, sub byte) []*net.UDPConn {
	t.Helper()
	var out []*net.UDPConn
	for i := range n {
		c, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(127, sub+byte(i/250), 0, 1+byte(i%250))}, net.UDPAddrFromAddrPort(server))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		out = append(out, c)
	}
	return out
}

// junkPacket is the i-th of a mix of malformed and odd queries.
func junkPacket(rng *rand.Rand, i int) []byte {
	q := new(dns.Msg).SetQuestion(fmt.Sprintf("J%d.Junk.Example.", i), dns.TypeA)
	switch i % 8 {
	case 0: // random bytes
		b := make([]byte, rng.IntN(600))
		for k := range b {
			b[k] = byte(rng.Uint32())
		}
		return b
	case 1: // a header and random bytes
		b, _ := q.Pack()
		for k := 12; k < len(b); k++ {
			b[k] = byte(rng.Uint32())
		}
		return b
	case 2: // cut short
		b, _ := q.Pack()
		return b[:rng.IntN(len(b))]
	case 3: // a response
		q.Response = true
	case 4: // an update
		q.Opcode = dns.OpcodeUpdate
	case 5: // two questions
		b, _ := q.Pack()
		binary.BigEndian.PutUint16(b[4:], 2)
		return append(b, b[12:]...)
	case 6: // EDNS asking for 65535 bytes, ANY, class CHAOS
		q.Question[0].Qtype, q.Question[0].Qclass = dns.TypeANY, dns.ClassCHAOS
		q.SetEdns0(65535, true)
	case 7: // a PTR name that is almost an address
		q.SetQuestion("1.2.3."+strconv.Itoa(rng.IntN(1000))+".in-addr.arpa.", dns.TypePTR)
	}
	b, _ := q.Pack()
	return b
}

// portRange is the kernel's range of ephemeral ports, where the
// forwarder's sockets are.
func portRange(t *testing.T) (int, int) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		t.Skip("no ephemeral port range:", err)
	}
	f := strings.Fields(string(b))
	if len(f) == 2 {
		lo, err1 := strconv.Atoi(f[0])
		hi, err2 := strconv.Atoi(f[1])
		if err1 == nil && err2 == nil {
			return lo, hi
		}
	}
	t.Skip("ephemeral port range:", string(b))
	return 0, 0
}
