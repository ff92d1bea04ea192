package dns

import (
	"context"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/goleak"

	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/test/netnstest"
	"github.com/wgmesh/wgmesh/test/poll"
)

// TestMain runs the tests as root in a network namespace of their own
// (where netnstest.Main checks for leaked goroutines), else as they are.
func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		os.Exit(netnstest.Main(m))
	}
	goleak.VerifyTestMain(m)
}

var (
	red  = netip.MustParsePrefix("10.60.0.0/16")
	blue = netip.MustParsePrefix("10.61.0.0/16")
)

// fakeNames is a NameSource.
type fakeNames struct {
	mu      sync.Mutex
	records []mesh.NameRecord
	changes chan struct{}
}

func newFakeNames(records ...mesh.NameRecord) *fakeNames {
	return &fakeNames{records: records, changes: make(chan struct{}, 1)}
}

func (f *fakeNames) LiveNames() []mesh.NameRecord {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.records)
}

func (f *fakeNames) NameChanges() <-chan struct{} { return f.changes }

func (f *fakeNames) set(records ...mesh.NameRecord) {
	f.mu.Lock()
	f.records = records
	f.mu.Unlock()
	select {
	case f.changes <- struct{}{}:
	default:
	}
}

// fakeClients maps source addresses to networks.
type fakeClients map[netip.Addr][]netip.Prefix

func (f fakeClients) Networks(_ context.Context, a netip.Addr) []netip.Prefix { return f[a] }

func rec(node, ep string, subnet netip.Prefix, addr, name string, aliases ...string) mesh.NameRecord {
	return mesh.NameRecord{Node: node, Subnet: subnet, Endpoint: ep, Version: 1, Name: name, Aliases: aliases, Addr: netip.MustParseAddr(addr)}
}

// upstream is a DNS server on loopback standing in for the host's
// resolvers: it knows outside.example, fails on fail.example, and counts
// what it is asked.
type upstream struct {
	addr    netip.AddrPort
	queries atomic.Int64
	stop    func()
}

func startUpstream(t *testing.T) *upstream {
	t.Helper()
	u := &upstream{}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		u.queries.Add(1)
		m := new(dns.Msg).SetReply(q)
		switch strings.ToLower(q.Question[0].Name) {
		case "outside.example.":
			if q.Question[0].Qtype == dns.TypeA {
				rr, _ := dns.NewRR("outside.example. 30 IN A 198.51.100.7")
				m.Answer = append(m.Answer, rr)
			}
		case "fail.example.":
			m.Rcode = dns.RcodeServerFailure
		default:
			m.Rcode = dns.RcodeNameError
			soa, _ := dns.NewRR("example. 300 IN SOA ns.example. admin.example. 1 60 60 60 60")
			m.Ns = append(m.Ns, soa)
		}
		_ = w.WriteMsg(m)
	})
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	u.addr = netip.MustParseAddrPort(pc.LocalAddr().String())
	udp, tcp := &dns.Server{PacketConn: pc, Handler: h}, &dns.Server{Listener: l, Handler: h}
	var wg sync.WaitGroup
	for _, s := range []*dns.Server{udp, tcp} {
		wg.Add(1)
		go func() { defer wg.Done(); _ = s.ActivateAndServe() }()
	}
	u.stop = func() { _ = udp.Shutdown(); _ = tcp.Shutdown(); wg.Wait() }
	t.Cleanup(u.stop)
	return u
}

// freeAddr finds a loopback port free for UDP and TCP.
func freeAddr(t *testing.T) netip.AddrPort {
	t.Helper()
	for range 50 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		a := pc.LocalAddr().String()
		l, err := net.Listen("tcp", a)
		pc.Close()
		if err == nil {
			l.Close()
			return netip.MustParseAddrPort(a)
		}
	}
	t.Fatal("no free port")
	return netip.AddrPort{}
}

// startServer runs a server on loopback until the test ends.
func startServer(t *testing.T, cfg Config) *Server {
	t.Helper()
	if cfg.UpstreamTimeout == 0 {
		d := DefaultConfig()
		cfg.UpstreamTimeout, cfg.ClientTimeout, cfg.CacheSize = 500*time.Millisecond, d.ClientTimeout, d.CacheSize
	}
	cfg.Listen = freeAddr(t)
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	// Up once it answers.
	poll.Eventually(t, 5*time.Second, "the server answering", func() error {
		c := &dns.Client{Timeout: 100 * time.Millisecond}
		_, _, err := c.Exchange(new(dns.Msg).SetQuestion("probe.", dns.TypeA), cfg.Listen.String())
		return err
	})
	return s
}

// ask queries the server from a loopback source address.
func ask(t *testing.T, s *Server, from, proto, name string, qtype uint16) *dns.Msg {
	t.Helper()
	var local net.Addr = &net.UDPAddr{IP: net.ParseIP(from)}
	if proto == "tcp" {
		local = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c := &dns.Client{Net: proto, Timeout: 3 * time.Second, Dialer: &net.Dialer{LocalAddr: local, Timeout: time.Second}}
	m, _, err := c.Exchange(new(dns.Msg).SetQuestion(dns.Fqdn(name), qtype), s.cfg.Listen.String())
	if err != nil {
		t.Fatalf("asking %s for %s from %s: %v", proto, name, from, err)
	}
	return m
}

func addrsOf(m *dns.Msg) []string {
	var out []string
	for _, rr := range m.Answer {
		if a, ok := rr.(*dns.A); ok {
			out = append(out, a.A.String())
		}
	}
	slices.Sort(out)
	return out
}

// TestServer: containers get the names of their own networks from every
// host, round robin, and nothing of networks they are not on; everything
// else goes upstream, is cached, and fails over to SERVFAIL.
func TestServer(t *testing.T) {
	up := startUpstream(t)
	names := newFakeNames(
		rec("h1", "aaaaaaaaaaa1", red, "10.60.1.2", "web", "www"),
		rec("h2", "bbbbbbbbbbb1", red, "10.60.2.2", "web2", "www", "WWW"),
		rec("h2", "bbbbbbbbbbb2", blue, "10.61.2.2", "secret"),
	)
	clients := fakeClients{
		netip.MustParseAddr("127.0.0.2"): {red},
		netip.MustParseAddr("127.0.0.3"): {blue},
		netip.MustParseAddr("127.0.0.4"): {red, blue},
	}
	s := startServer(t, Config{Upstreams: []netip.AddrPort{up.addr}, Clients: clients, Names: names})

	for _, proto := range []string{"udp", "tcp"} {
		m := ask(t, s, "127.0.0.2", proto, "web", dns.TypeA)
		if got := addrsOf(m); !slices.Equal(got, []string{"10.60.1.2"}) || !m.Authoritative || m.Answer[0].Header().Ttl != 0 {
			t.Errorf("%s web: %v\n%s", proto, got, m)
		}
	}
	// One alias on two hosts: both, in either order.
	orders := map[string]bool{}
	for range 40 {
		m := ask(t, s, "127.0.0.2", "udp", "WwW.", dns.TypeA)
		if got := addrsOf(m); !slices.Equal(got, []string{"10.60.1.2", "10.60.2.2"}) {
			t.Fatalf("www: %v", got)
		}
		orders[m.Answer[0].(*dns.A).A.String()] = true
	}
	if len(orders) != 2 {
		t.Errorf("www was answered in one order only: %v", orders)
	}
	// A name the mesh has, another type: no data, not "no such name".
	if m := ask(t, s, "127.0.0.2", "udp", "web", dns.TypeAAAA); m.Rcode != dns.RcodeSuccess || len(m.Answer) != 0 {
		t.Errorf("AAAA web: %s", m)
	}
	if m := ask(t, s, "127.0.0.2", "udp", "2.1.60.10.in-addr.arpa", dns.TypePTR); len(m.Answer) != 1 || m.Answer[0].(*dns.PTR).Ptr != "web." {
		t.Errorf("PTR: %s", m)
	}
	// Isolation: blue's name is not red's, and red's not blue's; the
	// query goes upstream, which does not know it.
	before := up.queries.Load()
	if m := ask(t, s, "127.0.0.2", "udp", "secret", dns.TypeA); m.Rcode != dns.RcodeNameError {
		t.Errorf("red container got blue's name: %s", m)
	}
	if m := ask(t, s, "127.0.0.3", "udp", "web", dns.TypeA); m.Rcode != dns.RcodeNameError {
		t.Errorf("blue container got red's name: %s", m)
	}
	if up.queries.Load() != before+2 {
		t.Errorf("upstream got %d queries, want 2", up.queries.Load()-before)
	}
	if got := addrsOf(ask(t, s, "127.0.0.4", "udp", "secret", dns.TypeA)); !slices.Equal(got, []string{"10.61.2.2"}) {
		t.Errorf("a container on both networks: secret is %v", got)
	}
	// An address that is no container's gets forwarding only.
	if m := ask(t, s, "127.0.0.9", "udp", "web", dns.TypeA); m.Rcode != dns.RcodeNameError {
		t.Errorf("unknown client got a mesh name: %s", m)
	}

	// Outside names: forwarded once, then cached.
	before = up.queries.Load()
	for range 3 {
		if got := addrsOf(ask(t, s, "127.0.0.2", "udp", "outside.example", dns.TypeA)); !slices.Equal(got, []string{"198.51.100.7"}) {
			t.Fatalf("outside: %v", got)
		}
	}
	if got := up.queries.Load() - before; got != 1 {
		t.Errorf("upstream asked %d times for a cached name", got)
	}
	if m := ask(t, s, "127.0.0.2", "udp", "fail.example", dns.TypeA); m.Rcode != dns.RcodeServerFailure {
		t.Errorf("failing upstream: %s", m)
	}

	// Names follow the mesh.
	names.set(rec("h2", "bbbbbbbbbbb1", red, "10.60.2.2", "web2", "www"))
	poll.Eventually(t, 5*time.Second, "web no longer a name", func() error {
		if m := ask(t, s, "127.0.0.2", "udp", "web", dns.TypeA); m.Rcode != dns.RcodeNameError {
			return fmt.Errorf("web still answers %v", addrsOf(m))
		}
		return nil
	})
	st := s.Stats()
	if st.Answered == 0 || st.Forwarded == 0 || st.Cached < 2 || st.Failed != 1 || st.Unknown == 0 || st.Names != 2 {
		t.Errorf("stats: %+v", st)
	}
}

// TestServerTruncates: an answer too big for a plain UDP reply is
// truncated, and the client gets it whole over TCP.
func TestServerTruncates(t *testing.T) {
	var records []mesh.NameRecord
	for i := range 60 {
		records = append(records, rec("h1", fmt.Sprintf("aaaaaaaaa%03d", i), red, fmt.Sprintf("10.60.0.%d", i+2), fmt.Sprintf("c%d", i), "many"))
	}
	s := startServer(t, Config{Clients: fakeClients{netip.MustParseAddr("127.0.0.2"): {red}}, Names: newFakeNames(records...)})
	if m := ask(t, s, "127.0.0.2", "udp", "many", dns.TypeA); !m.Truncated || len(m.Answer) >= 60 {
		t.Errorf("UDP: truncated %v, %d answers", m.Truncated, len(m.Answer))
	}
	if m := ask(t, s, "127.0.0.2", "tcp", "many", dns.TypeA); m.Truncated || len(m.Answer) != 60 {
		t.Errorf("TCP: truncated %v, %d answers", m.Truncated, len(m.Answer))
	}
}

func TestServerNoUpstream(t *testing.T) {
	s := startServer(t, Config{Clients: fakeClients{}, Names: newFakeNames()})
	if m := ask(t, s, "127.0.0.2", "udp", "outside.example", dns.TypeA); m.Rcode != dns.RcodeServerFailure {
		t.Errorf("no upstream: %s", m)
	}
}

func TestConfigValidate(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Listen = netip.MustParseAddrPort("169.254.53.53:53")
	cfg.Clients, cfg.Names = fakeClients{}, newFakeNames()
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	cfg.Upstreams = []netip.AddrPort{netip.MustParseAddrPort("169.254.53.53:53")}
	if err := cfg.Validate(); err == nil {
		t.Error("the server as its own upstream was accepted")
	}
}

func TestParsePTR(t *testing.T) {
	for in, want := range map[string]string{
		"4.3.2.1.in-addr.arpa":     "1.2.3.4",
		"255.0.60.10.in-addr.arpa": "10.60.0.255",
		"4.3.2.in-addr.arpa":       "",
		"04.3.2.1.in-addr.arpa":    "",
		"256.3.2.1.in-addr.arpa":   "",
		"4.3.2.1.ip6.arpa":         "",
	} {
		a, ok := parsePTR(in)
		if ok != (want != "") || ok && a.String() != want {
			t.Errorf("%s: %v %v, want %q", in, a, ok, want)
		}
	}
}

func TestTable(t *testing.T) {
	tb := NewTable([]mesh.NameRecord{
		rec("h1", "aaaaaaaaaaa1", red, "10.60.1.2", "Web", "www", "web"),
		rec("h2", "bbbbbbbbbbb1", red, "10.60.2.2", "other", "www"),
		{Node: "h3", Subnet: red, Endpoint: "ccccccccccc1", Deleted: true, Version: 2},
	})
	if got := tb.Lookup([]netip.Prefix{red}, "www"); len(got) != 2 {
		t.Errorf("www: %v", got)
	}
	if got := tb.Lookup([]netip.Prefix{red}, "web"); len(got) != 1 {
		t.Errorf("web: %v", got)
	}
	if got := tb.Lookup([]netip.Prefix{blue}, "web"); len(got) != 0 {
		t.Errorf("web on blue: %v", got)
	}
	if n, ok := tb.Reverse([]netip.Prefix{red}, netip.MustParseAddr("10.60.1.2")); !ok || n != "web" {
		t.Errorf("reverse: %q %v", n, ok)
	}
	if tb.Len() != 4 {
		t.Errorf("len %d", tb.Len())
	}
}

func TestDaemonDNS(t *testing.T) {
	files := map[string]string{
		"/etc/docker/daemon.json": `{"dns": ["169.254.53.53", "192.0.2.1"], "log-level": "info"}`,
		"/srv/other.json":         `{"debug": true}`,
		"/srv/bad.json":           `{`,
	}
	read := func(p string) ([]byte, error) {
		if s, ok := files[p]; ok {
			return []byte(s), nil
		}
		return nil, fmt.Errorf("open %s: %w", p, fs.ErrNotExist)
	}
	for _, tc := range []struct {
		args    []string
		servers []string
		err     bool
	}{
		{[]string{"dockerd", "-H", "unix:///x", "--dns", "169.254.53.53", "--dns=192.0.2.9"}, []string{"169.254.53.53", "192.0.2.9"}, false},
		{[]string{"dockerd"}, []string{"169.254.53.53", "192.0.2.1"}, false},
		{[]string{"dockerd", "--config-file", "/srv/other.json"}, nil, false},
		{[]string{"dockerd", "--config-file=/srv/missing.json"}, nil, false},
		{[]string{"dockerd", "--config-file", "/srv/bad.json"}, nil, true},
		{[]string{"dockerd", "--dns"}, []string{"169.254.53.53", "192.0.2.1"}, false},
	} {
		d, err := daemonDNS(tc.args, read)
		if (err != nil) != tc.err || !slices.Equal(d.Servers, tc.servers) {
			t.Errorf("%v: %+v %v", tc.args, d, err)
		}
	}
	ours := netip.MustParseAddr("169.254.53.53")
	if p := daemonProblem(DaemonDNS{Servers: []string{"169.254.53.53"}}, ours); p != "" {
		t.Error(p)
	}
	for _, d := range []DaemonDNS{{Source: "x"}, {Servers: []string{"192.0.2.1", "169.254.53.53"}, Source: "x"}} {
		if p := daemonProblem(d, ours); !strings.Contains(p, `add "dns": ["169.254.53.53"] to /etc/docker/daemon.json`) {
			t.Errorf("%+v: %q", d, p)
		}
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestHostUpstreams(t *testing.T) {
	p := t.TempDir() + "/resolv.conf"
	writeFile(t, p, "# comment\nnameserver 127.0.0.53\nnameserver 169.254.53.53\nnameserver ::1\nnameserver bogus\nsearch example\nnameserver 127.0.0.53\n")
	got, err := HostUpstreams(p, netip.MustParseAddr("169.254.53.53"))
	want := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.53:53"), netip.MustParseAddrPort("[::1]:53")}
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("%v %v", got, err)
	}
	for in, want := range map[string]string{"192.0.2.1": "192.0.2.1:53", "192.0.2.1:5353": "192.0.2.1:5353", "[2001:db8::1]:54": "[2001:db8::1]:54", "2001:db8::1": "[2001:db8::1]:53"} {
		if got, err := ParseUpstream(in); err != nil || got.String() != want {
			t.Errorf("%s: %v %v", in, got, err)
		}
	}
	if _, err := ParseUpstream("resolver.example"); err == nil {
		t.Error("a host name was accepted as an upstream")
	}
}

// TestPeerPID: the process behind a unix socket is found from the
// socket's peer credentials (here, this test itself).
func TestPeerPID(t *testing.T) {
	sock := t.TempDir() + "/d.sock"
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		if c, err := l.Accept(); err == nil {
			c.Close()
		}
	}()
	if pid, err := peerPID(sock); err != nil || pid != os.Getpid() {
		t.Fatalf("pid %d, %v; want %d", pid, err, os.Getpid())
	}
	if _, err := ReadDaemonDNS(t.TempDir() + "/none.sock"); err == nil {
		t.Error("no socket, no error")
	}
}

// TestFallbackNote: with the agent as dockerd's only DNS server, status
// says how to keep outside names working while the agent is down; with
// a second server, or without the setting, it does not.
func TestFallbackNote(t *testing.T) {
	ours := netip.MustParseAddr("169.254.53.53")
	if n := fallbackNote(DaemonDNS{Servers: []string{"169.254.53.53"}}, ours); !strings.Contains(n, `"dns": ["169.254.53.53", "<resolver>"]`) {
		t.Errorf("only server: %q", n)
	}
	for _, d := range []DaemonDNS{{Servers: []string{"169.254.53.53", "192.0.2.53"}}, {}, {Servers: []string{"192.0.2.53"}}} {
		if n := fallbackNote(d, ours); n != "" {
			t.Errorf("%v: %q", d.Servers, n)
		}
	}
	st := &Status{Addr: netip.MustParseAddrPort("169.254.53.53:53"), Docker: &DaemonDNS{Servers: []string{"169.254.53.53"}}}
	st.Notes = append(st.Notes, fallbackNote(*st.Docker, ours))
	if s := st.Summary(); !strings.Contains(s, "\n  note: while the agent is down") {
		t.Errorf("summary: %q", s)
	}
}
