package dns

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sync/singleflight"
)

// forwarder sends the queries the mesh cannot answer to the host's
// upstream resolvers, in order, and caches their answers for as long as
// their TTLs say, within maxCacheTTL.
//
// Its cache is shared by every container on the host, so what goes into
// it must be what the upstream said: each query upstream has an ID of
// its own from a secure random source and a new socket (a port the
// kernel picks at random), and only a reply from the upstream's address
// with that ID, the QR bit and the query's question is taken; any other
// packet on the socket is skipped, not taken for a failure, so that
// forged packets cannot keep the real answer out either. A forger who
// cannot see the query must guess the ID and the port at once
// (2^16 × the ephemeral range), within the upstream's round trip.
type forwarder struct {
	upstreams []netip.AddrPort
	timeout   time.Duration
	// sem bounds the exchanges with upstreams in flight; one more is
	// refused at once, not queued.
	sem chan struct{}
	// flight makes one exchange of the queries for one question that
	// arrive while it is under way.
	flight singleflight.Group

	mu      sync.Mutex
	entries map[cacheKey]cacheEntry
	max     int
	now     func() time.Time
}

type cacheKey struct {
	name         string
	qtype, class uint16
	do, cd       bool
}

type cacheEntry struct {
	msg     *dns.Msg
	stored  time.Time
	expires time.Time
}

// Cache and flight bounds.
const (
	maxCacheTTL = 60 * time.Second
	// negativeTTL bounds how long "no such name" is cached, whatever the
	// upstream's SOA says.
	negativeTTL = 10 * time.Second
	// maxForwards bounds the exchanges in flight to upstreams.
	maxForwards = 64
	// upstreamUDPSize is the EDNS size the server offers upstreams and
	// clients: the DNS flag day's 1232, which needs no IP fragments.
	upstreamUDPSize = 1232
)

// errOverloaded: too many exchanges with upstreams are in flight.
var errOverloaded = errors.New("too many queries in flight to upstream DNS servers")

func newForwarder(upstreams []netip.AddrPort, timeout time.Duration, size int) *forwarder {
	return &forwarder{upstreams: upstreams, timeout: timeout, sem: make(chan struct{}, maxForwards),
		entries: map[cacheKey]cacheEntry{}, max: size, now: time.Now}
}

func keyOf(q *dns.Msg) cacheKey {
	k := cacheKey{name: strings.ToLower(q.Question[0].Name), qtype: q.Question[0].Qtype, class: q.Question[0].Qclass, cd: q.CheckingDisabled}
	if opt := q.IsEdns0(); opt != nil {
		k.do = opt.Do()
	}
	return k
}

// cached returns a copy of a cached answer to q, with the TTLs counted
// down.
func (f *forwarder) cached(q *dns.Msg) (*dns.Msg, bool) {
	k := keyOf(q)
	now := f.now()
	f.mu.Lock()
	e, ok := f.entries[k]
	if ok && !now.Before(e.expires) {
		delete(f.entries, k)
		ok = false
	}
	f.mu.Unlock()
	if !ok {
		return nil, false
	}
	m := e.msg.Copy()
	age := uint32(now.Sub(e.stored) / time.Second)
	for _, sec := range [][]dns.RR{m.Answer, m.Ns, m.Extra} {
		for _, rr := range sec {
			if h := rr.Header(); h.Rrtype != dns.TypeOPT {
				h.Ttl = max(h.Ttl, age) - age
			}
		}
	}
	return m, true
}

// store caches an upstream's answer for the shortest TTL in it.
func (f *forwarder) store(q, m *dns.Msg) {
	if m.Truncated || m.Rcode != dns.RcodeSuccess && m.Rcode != dns.RcodeNameError {
		return
	}
	ttl := maxCacheTTL
	negative := m.Rcode == dns.RcodeNameError || len(m.Answer) == 0
	if negative {
		ttl = negativeTTL
	}
	for _, sec := range [][]dns.RR{m.Answer, m.Ns} {
		for _, rr := range sec {
			if d := time.Duration(rr.Header().Ttl) * time.Second; d < ttl {
				ttl = d
			}
		}
	}
	if ttl <= 0 {
		return
	}
	now := f.now()
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.entries) >= f.max {
		// Drop what expired; if nothing did, any one entry.
		for k, e := range f.entries {
			if !now.Before(e.expires) {
				delete(f.entries, k)
			}
		}
		for k := range f.entries {
			if len(f.entries) < f.max {
				break
			}
			delete(f.entries, k)
		}
	}
	f.entries[keyOf(q)] = cacheEntry{msg: m.Copy(), stored: now, expires: now.Add(ttl)}
}

// errNoUpstream: no upstream answered.
var errNoUpstream = errors.New("no upstream DNS server answered")

// forward asks the upstreams in order, over proto ("udp" or "tcp"), and
// returns the first answer that is not a failure: a copy of its own,
// which the caller may change. Queries for one question that arrive
// while it is asked wait for that answer. The exchange does not end with
// the ctx of the query that began it, which others may be waiting for,
// but it is bounded as that is: by the upstreams' timeouts.
func (f *forwarder) forward(proto string, q *dns.Msg) (*dns.Msg, error) {
	if len(f.upstreams) == 0 {
		return nil, fmt.Errorf("%w: none configured", errNoUpstream)
	}
	k := keyOf(q)
	v, err, _ := f.flight.Do(fmt.Sprintf("%s|%d|%d|%t|%t|%s", proto, k.qtype, k.class, k.do, k.cd, k.name), func() (any, error) {
		select {
		case f.sem <- struct{}{}:
			defer func() { <-f.sem }()
		default:
			return nil, errOverloaded
		}
		ctx, cancel := context.WithTimeout(context.Background(), f.timeout*time.Duration(len(f.upstreams)))
		defer cancel()
		return f.exchangeAll(ctx, proto, q)
	})
	if err != nil {
		return nil, err
	}
	return v.(*dns.Msg).Copy(), nil
}

func (f *forwarder) exchangeAll(ctx context.Context, proto string, q *dns.Msg) (*dns.Msg, error) {
	var errs []error
	for _, u := range f.upstreams {
		m, err := f.exchange(ctx, proto, u, q)
		if err != nil {
			errs = append(errs, fmt.Errorf("asking %s: %w", u, err))
			continue
		}
		if m.Rcode == dns.RcodeServerFailure || m.Rcode == dns.RcodeRefused {
			errs = append(errs, fmt.Errorf("%s answered %s", u, dns.RcodeToString[m.Rcode]))
			continue
		}
		f.store(q, m)
		return m, nil
	}
	return nil, fmt.Errorf("%w: %w", errNoUpstream, errors.Join(errs...))
}

// upstreamQuery is the query the server sends upstream for q: q's
// question and nothing else of the client's but its DNSSEC bits, under a
// fresh ID.
func upstreamQuery(q *dns.Msg) *dns.Msg {
	m := new(dns.Msg)
	m.Id = dns.Id()
	m.RecursionDesired = true
	m.CheckingDisabled = q.CheckingDisabled
	m.Question = []dns.Question{q.Question[0]}
	if opt := q.IsEdns0(); opt != nil {
		m.SetEdns0(upstreamUDPSize, opt.Do())
	}
	return m
}

// exchange asks one upstream, over a socket of its own, and waits for
// the reply to this query (see forwarder).
func (f *forwarder) exchange(ctx context.Context, proto string, u netip.AddrPort, q *dns.Msg) (*dns.Msg, error) {
	m := upstreamQuery(q)
	c := &dns.Client{Net: proto, Timeout: f.timeout}
	co, err := c.DialContext(ctx, u.String())
	if err != nil {
		return nil, err
	}
	defer co.Close()
	deadline := time.Now().Add(f.timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := co.SetDeadline(deadline); err != nil {
		return nil, err
	}
	// Read what the upstream sends whole, whatever size it is, so that
	// the client gets it truncated to its own size (or its retry over
	// TCP does).
	co.UDPSize = dns.MaxMsgSize
	if err := co.WriteMsg(m); err != nil {
		return nil, err
	}
	for {
		r, err := co.ReadMsg()
		var nerr net.Error
		switch {
		case errors.As(err, &nerr):
			return nil, err
		case err == nil && isReplyTo(r, m):
			return r, nil
		case proto != "udp":
			// Nobody forges into a TCP stream without seeing it.
			if err == nil {
				err = errors.New("the answer is not for the query")
			}
			return nil, err
		}
		// UDP: a packet that does not parse, a late reply to an
		// earlier query, or a forgery. Wait for the real one.
	}
}

// isReplyTo reports whether r answers m: its ID, a reply, and m's
// question (names compared without regard to case, RFC 4343).
func isReplyTo(r, m *dns.Msg) bool {
	if r.Id != m.Id || !r.Response || r.Opcode != dns.OpcodeQuery || len(r.Question) != 1 {
		return false
	}
	a, b := r.Question[0], m.Question[0]
	return a.Qtype == b.Qtype && a.Qclass == b.Qclass && strings.EqualFold(a.Name, b.Name)
}
