package dns

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/miekg/dns"

	"github.com/wgmesh/wgmesh/mesh"
)

// recorder is a dns.ResponseWriter that keeps what is written.
type recorder struct {
	remote net.Addr
	msg    *dns.Msg
}

func (r *recorder) LocalAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(169, 254, 53, 53), Port: 53}
}
func (r *recorder) RemoteAddr() net.Addr        { return r.remote }
func (r *recorder) WriteMsg(m *dns.Msg) error   { r.msg = m; return nil }
func (r *recorder) Write(b []byte) (int, error) { return len(b), nil }
func (r *recorder) Close() error                { return nil }
func (r *recorder) TsigStatus() error           { return nil }
func (r *recorder) TsigTimersOnly(bool)         {}
func (r *recorder) Hijack()                     {}

func newTestServer(tb testing.TB, records []mesh.NameRecord) *Server {
	cfg := DefaultConfig()
	cfg.Listen = netip.MustParseAddrPort("169.254.53.53:53")
	cfg.Clients = fakeClients{netip.MustParseAddr("172.18.0.2"): {red}}
	cfg.Names = newFakeNames(records...)
	s, err := New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	s.refresh()
	return s
}

// FuzzServeDNS: no query, however malformed, panics the server or goes
// unanswered.
func FuzzServeDNS(f *testing.F) {
	for _, q := range []*dns.Msg{
		new(dns.Msg).SetQuestion("web.", dns.TypeA),
		new(dns.Msg).SetQuestion("2.1.60.10.in-addr.arpa.", dns.TypePTR),
		new(dns.Msg).SetQuestion("outside.example.", dns.TypeAAAA).SetEdns0(4096, true),
	} {
		b, _ := q.Pack()
		f.Add(b)
	}
	s := newTestServer(f, []mesh.NameRecord{rec("h1", "aaaaaaaaaaa1", red, "10.60.1.2", "web", "www")})
	f.Fuzz(func(t *testing.T, b []byte) {
		q := new(dns.Msg)
		if err := q.Unpack(b); err != nil {
			return
		}
		w := &recorder{remote: &net.UDPAddr{IP: net.IPv4(172, 18, 0, 2), Port: 4000}}
		// The fuzzer asks thousands of times a second from one address:
		// the per-source limit would drop those queries, by design
		// (TestServerRateLimitsSource). Each input gets a fresh one.
		s.limit = newSourceLimiter(sourceRate, sourceBurst, maxSources)
		s.ServeDNS(w, q)
		if w.msg == nil {
			t.Fatal("no answer")
		}
		if _, err := w.msg.Pack(); err != nil {
			t.Fatalf("answer does not pack: %v", err)
		}
	})
}

// BenchmarkAnswerMeshName is the server's own time for a name of the
// mesh, among 1000 containers' names: what a container pays on top of
// Docker's resolver and the two hops to the server and back.
func BenchmarkAnswerMeshName(b *testing.B) {
	var records []mesh.NameRecord
	for i := range 1000 {
		records = append(records, rec("h1", fmt.Sprintf("aaaaaaa%05d", i), red, fmt.Sprintf("10.60.%d.%d", i/250, i%250+2), fmt.Sprintf("c%d", i), "svc"))
	}
	s := newTestServer(b, records[:999])
	q := new(dns.Msg).SetQuestion("c500.", dns.TypeA)
	w := &recorder{remote: &net.UDPAddr{IP: net.IPv4(172, 18, 0, 2), Port: 4000}}
	b.ReportAllocs()
	for b.Loop() {
		s.ServeDNS(w, q)
	}
	if len(w.msg.Answer) != 1 {
		b.Fatalf("answer %s", w.msg)
	}
}

// BenchmarkNewTable is what a change of the mesh's names costs the
// server: a table of 10,000 containers' names (1,000 hosts of 10).
func BenchmarkNewTable(b *testing.B) {
	var records []mesh.NameRecord
	for i := range 10000 {
		records = append(records, rec(fmt.Sprintf("h%d", i/10), fmt.Sprintf("aaaaaaa%05d", i), red, fmt.Sprintf("10.60.%d.%d", i/250, i%250+2),
			fmt.Sprintf("c%d", i), "svc", fmt.Sprintf("id%d", i)))
	}
	b.ReportAllocs()
	for b.Loop() {
		NewTable(records)
	}
}
