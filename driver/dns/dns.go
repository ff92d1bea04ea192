// Package dns lets containers find each other by name across hosts: it
// learns the names of the containers on this host's wgmesh networks from
// the local Docker engine and publishes them through the mesh (Watcher),
// and answers DNS queries with the names the mesh knows (Server).
//
// How queries reach it. Docker's embedded resolver (127.0.0.11 in every
// container on a user-defined network) answers the names of containers
// on its own host and forwards every other name to the container's
// external DNS servers. Servers given to the daemon with --dns (or
// "dns" in daemon.json) are dialled from the container's network
// namespace, on Docker 20.10 and 29 alike; so with one per-host setting,
// "dns": ["169.254.53.53"], the engine forwards what it does not know to
// this server, and each query comes from the asking container's own
// address. The server finds the container by that address (Clients),
// answers the names of the wgmesh networks that container is on, and
// forwards everything else to the host's own resolvers. It answers no
// one but this host and its containers (local.go): a neighbour on the
// LAN that routes the address to the host gets nothing.
//
//	container ──▶ 127.0.0.11 (Docker) ──▶ 169.254.53.53 (this server) ──▶ upstream resolvers
//	              local names              names of the container's         outside names
//	                                       wgmesh networks, every host
package dns

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/net/netutil"

	"github.com/wgmesh/wgmesh/mesh"
)

// Clients tells which wgmesh networks the container behind a source
// address is on.
type Clients interface {
	// Networks returns the subnets of the wgmesh networks of the
	// container on this host that has addr on any of its networks, or
	// nil for an address that is no such container's. For an address it
	// has not seen it may look at Docker again, within ctx. Safe for
	// concurrent use.
	Networks(ctx context.Context, addr netip.Addr) []netip.Prefix
}

// NameSource is the mesh's names (mesh.Mesh).
type NameSource interface {
	LiveNames() []mesh.NameRecord
	NameChanges() <-chan struct{}
}

var _ NameSource = (*mesh.Mesh)(nil)

// Config configures a Server.
type Config struct {
	// Listen is where the server answers, over UDP and TCP.
	Listen netip.AddrPort
	// Upstreams answer what the mesh does not know, in order.
	Upstreams []netip.AddrPort
	Clients   Clients
	Names     NameSource
	// TTL of the answers from the mesh. 0 (the default, as Consul's)
	// keeps clients from caching names that may go within seconds.
	TTL uint32
	// UpstreamTimeout bounds one upstream's answer; ClientTimeout how
	// long a query may wait for Clients to look at Docker.
	UpstreamTimeout time.Duration
	ClientTimeout   time.Duration
	// CacheSize bounds the cache of upstream answers.
	CacheSize int
	// Sources tells the queries of this host from others'; nil takes
	// only what arrives on loopback (see local.go).
	Sources *Sources
	// SourceRate and SourceBurst bound what one source address may ask,
	// per second and at once (0: sourceRate and sourceBurst).
	SourceRate  float64
	SourceBurst int
	Logger      *slog.Logger
}

// DefaultConfig returns the defaults; Listen, Clients and Names must be
// set.
func DefaultConfig() Config {
	return Config{UpstreamTimeout: 2 * time.Second, ClientTimeout: time.Second, CacheSize: 4096}
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	switch {
	case !c.Listen.IsValid():
		return errors.New("dns: no listen address")
	case c.Clients == nil || c.Names == nil:
		return errors.New("dns: no clients or names")
	case c.UpstreamTimeout <= 0 || c.ClientTimeout <= 0 || c.CacheSize <= 0:
		return errors.New("dns: timeouts and cache size must be positive")
	}
	for _, u := range c.Upstreams {
		if u == c.Listen {
			return fmt.Errorf("dns: upstream %s is this server", u)
		}
	}
	return nil
}

// Server answers DNS queries from containers.
type Server struct {
	cfg   Config
	log   *slog.Logger
	fwd   *forwarder
	table atomic.Pointer[Table]
	stats counters
	// inFlight bounds the queries waiting for upstreams (maxInFlight);
	// limit what each source may ask.
	inFlight chan struct{}
	limit    *sourceLimiter

	mu        sync.Mutex
	listenErr error
}

type counters struct {
	answered, forwarded, cached, failed, unknown, limited, overloaded, foreign atomic.Uint64
}

// New creates a server with the names the mesh has now. It starts
// nothing; Run does.
func New(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("component", "dns"), fwd: newForwarder(cfg.Upstreams, cfg.UpstreamTimeout, cfg.CacheSize),
		inFlight: make(chan struct{}, maxInFlight), limit: newSourceLimiter(cmp.Or(cfg.SourceRate, sourceRate), cmp.Or(cfg.SourceBurst, sourceBurst), maxSources)}
	s.refresh()
	return s, nil
}

// Run serves until ctx is done. It keeps trying to listen while the
// address is not there yet (the agent adds it, but may not own it), and
// rebuilds its table whenever the mesh's names change.
func (s *Server) Run(ctx context.Context) error {
	s.refresh()
	var udp, tcp *dns.Server
	retry := time.NewTimer(0)
	defer retry.Stop()
	for udp == nil {
		select {
		case <-ctx.Done():
			return nil
		case <-retry.C:
		}
		var err error
		if udp, tcp, err = s.listen(ctx); err != nil {
			s.setListenErr(err)
			s.log.Warn("DNS server cannot listen yet; retrying", "addr", s.cfg.Listen, "err", err)
			retry.Reset(5 * time.Second)
		}
	}
	s.setListenErr(nil)
	s.log.Info("DNS server listening", "addr", s.cfg.Listen, "upstreams", s.cfg.Upstreams)
	var wg sync.WaitGroup
	for _, srv := range []*dns.Server{udp, tcp} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.ActivateAndServe(); err != nil {
				s.log.Warn("DNS server stopped", "err", err)
			}
		}()
	}
	last := time.Now()
	for {
		select {
		case <-ctx.Done():
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_ = udp.ShutdownContext(sctx)
			_ = tcp.ShutdownContext(sctx)
			cancel()
			wg.Wait()
			return nil
		case <-s.cfg.Names.NameChanges():
			// A burst of changes (a compose project starting somewhere)
			// makes one new table, and in a large cluster whose names
			// change all the time, a table costs at most a tenth of a
			// core (10,000 containers' names take 10 ms).
			wait := max(refreshDelay, time.Until(last.Add(minRefreshInterval)))
			select {
			case <-ctx.Done():
			case <-time.After(wait):
			}
			s.refresh()
			last = time.Now()
		}
	}
}

// refreshDelay gathers the mesh's name changes into one new table;
// minRefreshInterval spaces the tables.
const (
	refreshDelay       = 20 * time.Millisecond
	minRefreshInterval = 100 * time.Millisecond
)

func (s *Server) listen(ctx context.Context) (*dns.Server, *dns.Server, error) {
	var lc net.ListenConfig
	addr := s.cfg.Listen.String()
	// The link of each datagram from the first one on: what the kernel
	// queues before the option is set comes without it.
	ulc := net.ListenConfig{Control: recvLink(s.cfg.Listen.Addr().Is4())}
	pc, err := ulc.ListenPacket(ctx, "udp", addr)
	if err != nil {
		return nil, nil, err
	}
	gc, err := newGatedConn(pc.(*net.UDPConn), s.cfg.Sources, &s.stats.foreign)
	if err != nil {
		pc.Close()
		return nil, nil, fmt.Errorf("asking for the link of each query: %w", err)
	}
	l, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		pc.Close()
		return nil, nil, err
	}
	// Only queries from this host get past gc and the listener (see
	// local.go).
	udp := &dns.Server{PacketConn: gc, Handler: s, ReadTimeout: 2 * time.Second}
	// Each TCP connection holds a goroutine: a bounded number are
	// accepted, the others wait in the kernel's backlog.
	gl := &gatedListener{Listener: l, sources: s.cfg.Sources, dropped: &s.stats.foreign}
	tcp := &dns.Server{Listener: netutil.LimitListener(gl, maxTCPConns), Handler: s, ReadTimeout: 2 * time.Second, WriteTimeout: 2 * time.Second,
		MaxTCPQueries: 128}
	return udp, tcp, nil
}

func (s *Server) setListenErr(err error) {
	s.mu.Lock()
	s.listenErr = err
	s.mu.Unlock()
}

// refresh rebuilds the table from the mesh's live names.
func (s *Server) refresh() { s.table.Store(NewTable(s.cfg.Names.LiveNames())) }

// ServeDNS implements dns.Handler.
func (s *Server) ServeDNS(w dns.ResponseWriter, q *dns.Msg) {
	if len(q.Question) != 1 || q.Opcode != dns.OpcodeQuery || q.Response {
		_ = w.WriteMsg(new(dns.Msg).SetRcode(q, dns.RcodeNotImplemented))
		return
	}
	proto := w.LocalAddr().Network()
	if p, ok := w.RemoteAddr().(*pendingAddr); ok && !s.admitPending(p) {
		s.stats.foreign.Add(1)
		return
	}
	if src, ok := addrOf(w.RemoteAddr()); ok && !s.limit.allow(src, time.Now()) {
		s.stats.limited.Add(1)
		if proto == "tcp" {
			// Not forged: a TCP peer completed a handshake.
			_ = w.WriteMsg(new(dns.Msg).SetRcode(q, dns.RcodeServerFailure))
		}
		return
	}
	// Answers from the mesh and the cache take microseconds (a source
	// the watcher does not know may wait for Docker, but the watcher
	// bounds those waits); only queries that go upstream need a place.
	if resp := s.answer(w.RemoteAddr(), q); resp != nil {
		s.stats.answered.Add(1)
		s.reply(w, proto, q, resp)
		return
	}
	if m, ok := s.fwd.cached(q); ok {
		s.stats.cached.Add(1)
		s.reply(w, proto, q, m)
		return
	}
	select {
	case s.inFlight <- struct{}{}:
		defer func() { <-s.inFlight }()
	default:
		s.stats.overloaded.Add(1)
		_ = w.WriteMsg(new(dns.Msg).SetRcode(q, dns.RcodeServerFailure))
		return
	}
	m, err := s.fwd.forward(proto, q)
	if err != nil {
		s.stats.failed.Add(1)
		s.log.Debug("forwarding a query failed", "name", q.Question[0].Name, "err", err)
		// Docker's resolver then tries its next server, if it has one.
		_ = w.WriteMsg(new(dns.Msg).SetRcode(q, dns.RcodeServerFailure))
		return
	}
	s.stats.forwarded.Add(1)
	s.reply(w, proto, q, m)
}

// admitPending decides on a datagram that came in on a link the server's
// Sources did not know, after a fresh look at the host's links.
func (s *Server) admitPending(p *pendingAddr) bool {
	src, ok := addrOf(p.UDPAddr)
	if !ok {
		return false
	}
	if s.cfg.Sources.udp(p.ifindex, src) == unknownLink {
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ClientTimeout)
		s.cfg.Sources.await(ctx)
		cancel()
	}
	return s.cfg.Sources.udp(p.ifindex, src) == local
}

// reply sends resp, an answer to q from the mesh, the cache or an
// upstream, as the answer to q: q's ID and question, an OPT record only
// if q had one, and no bigger than q's transport and EDNS size allow
// (truncated, with TC set, else), so that a small query never gets a
// big answer over UDP.
func (s *Server) reply(w dns.ResponseWriter, proto string, q, resp *dns.Msg) {
	resp.Id = q.Id
	resp.Question = []dns.Question{q.Question[0]}
	resp.RecursionDesired, resp.CheckingDisabled = q.RecursionDesired, q.CheckingDisabled
	resp.Extra = slices.DeleteFunc(resp.Extra, func(rr dns.RR) bool { return rr.Header().Rrtype == dns.TypeOPT })
	size := dns.MinMsgSize
	if opt := q.IsEdns0(); opt != nil {
		resp.SetEdns0(upstreamUDPSize, opt.Do())
		size = max(size, int(opt.UDPSize()))
	}
	if proto == "tcp" {
		size = dns.MaxMsgSize
	}
	resp.Truncate(size)
	_ = w.WriteMsg(resp)
}

// answer answers q from the mesh's names of the asking container's
// networks, or returns nil when they do not have the name.
func (s *Server) answer(remote net.Addr, q *dns.Msg) *dns.Msg {
	qq := q.Question[0]
	if qq.Qclass != dns.ClassINET {
		return nil
	}
	src, ok := addrOf(remote)
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ClientTimeout)
	subnets := s.cfg.Clients.Networks(ctx, src)
	cancel()
	if len(subnets) == 0 {
		s.stats.unknown.Add(1)
		return nil
	}
	t := s.table.Load()
	name := strings.ToLower(strings.TrimSuffix(qq.Name, "."))
	resp := new(dns.Msg).SetReply(q)
	resp.Authoritative, resp.RecursionAvailable = true, true
	if qq.Qtype == dns.TypePTR {
		addr, ok := parsePTR(name)
		if !ok {
			return nil
		}
		host, ok := t.Reverse(subnets, addr)
		if !ok {
			return nil
		}
		resp.Answer = append(resp.Answer, &dns.PTR{Hdr: s.header(qq.Name, dns.TypePTR), Ptr: dns.Fqdn(host)})
		return resp
	}
	addrs := t.Lookup(subnets, name)
	if len(addrs) == 0 {
		return nil
	}
	if qq.Qtype == dns.TypeA || qq.Qtype == dns.TypeANY {
		// Round robin, as Docker's resolver does: a random order.
		for _, i := range rand.Perm(len(addrs)) {
			resp.Answer = append(resp.Answer, &dns.A{Hdr: s.header(qq.Name, dns.TypeA), A: addrs[i].AsSlice()})
		}
	}
	// Any other type of a name the mesh has: no data, so that the client
	// does not take the name for unknown (containers have no IPv6 here).
	return resp
}

func (s *Server) header(name string, t uint16) dns.RR_Header {
	return dns.RR_Header{Name: name, Rrtype: t, Class: dns.ClassINET, Ttl: s.cfg.TTL}
}

func addrOf(a net.Addr) (netip.Addr, bool) {
	switch a := a.(type) {
	case *pendingAddr:
		return addrOf(a.UDPAddr)
	case *net.UDPAddr:
		ip, ok := netip.AddrFromSlice(a.IP)
		return ip.Unmap(), ok
	case *net.TCPAddr:
		ip, ok := netip.AddrFromSlice(a.IP)
		return ip.Unmap(), ok
	}
	return netip.Addr{}, false
}

// parsePTR reads an IPv4 address from its in-addr.arpa name.
func parsePTR(name string) (netip.Addr, bool) {
	rest, ok := strings.CutSuffix(name, ".in-addr.arpa")
	if !ok {
		return netip.Addr{}, false
	}
	parts := strings.Split(rest, ".")
	if len(parts) != 4 {
		return netip.Addr{}, false
	}
	var b [4]byte
	for i, p := range parts {
		v, err := strconv.ParseUint(p, 10, 8)
		if err != nil || len(p) > 1 && p[0] == '0' {
			return netip.Addr{}, false
		}
		b[3-i] = byte(v)
	}
	return netip.AddrFrom4(b), true
}

// ServerStats counts what the server did with the queries it got.
type ServerStats struct {
	// Answered from the mesh's names; Forwarded to an upstream; Cached:
	// answered from the cache of upstream answers; Failed: no upstream
	// answered; Unknown: from an address that is no wgmesh container's
	// (forwarded or cached as well).
	Answered, Forwarded, Cached, Failed, Unknown uint64
	// Limited: dropped, its source over its rate; Overloaded: answered
	// SERVFAIL, too many queries in flight; Foreign: dropped, not from
	// this host. (Optional fields: an older CLI ignores them.)
	Limited, Overloaded, Foreign uint64 `json:",omitempty"`
	// Names is how many (name, address) pairs the server knows.
	Names int
	// ListenError is why the server is not listening, if it is not.
	ListenError string `json:",omitempty"`
}

// Stats reports the server's counters.
func (s *Server) Stats() ServerStats {
	st := ServerStats{Answered: s.stats.answered.Load(), Forwarded: s.stats.forwarded.Load(), Cached: s.stats.cached.Load(),
		Failed: s.stats.failed.Load(), Unknown: s.stats.unknown.Load(), Limited: s.stats.limited.Load(), Overloaded: s.stats.overloaded.Load(),
		Foreign: s.stats.foreign.Load(),
		Names:   s.table.Load().Len()}
	s.mu.Lock()
	if s.listenErr != nil {
		st.ListenError = s.listenErr.Error()
	}
	s.mu.Unlock()
	return st
}
