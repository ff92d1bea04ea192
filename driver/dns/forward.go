package dns

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// forwarder sends the queries the mesh cannot answer to the host's
// upstream resolvers, in order, and caches their answers for as long as
// their TTLs say, within maxCacheTTL.
type forwarder struct {
	upstreams []netip.AddrPort
	timeout   time.Duration
	sem       chan struct{}

	mu      sync.Mutex
	entries map[cacheKey]cacheEntry
	max     int
	now     func() time.Time
}

type cacheKey struct {
	name         string
	qtype, class uint16
	do           bool
}

type cacheEntry struct {
	msg     *dns.Msg
	stored  time.Time
	expires time.Time
}

// Cache bounds.
const (
	maxCacheTTL = 60 * time.Second
	// negativeTTL bounds how long "no such name" is cached, whatever the
	// upstream's SOA says.
	negativeTTL = 10 * time.Second
	// maxForwards bounds the queries in flight to upstreams.
	maxForwards = 256
)

func newForwarder(upstreams []netip.AddrPort, timeout time.Duration, size int) *forwarder {
	return &forwarder{upstreams: upstreams, timeout: timeout, sem: make(chan struct{}, maxForwards),
		entries: map[cacheKey]cacheEntry{}, max: size, now: time.Now}
}

func keyOf(q *dns.Msg) cacheKey {
	k := cacheKey{name: strings.ToLower(q.Question[0].Name), qtype: q.Question[0].Qtype, class: q.Question[0].Qclass}
	if opt := q.IsEdns0(); opt != nil {
		k.do = opt.Do()
	}
	return k
}

// cached returns a copy of a cached answer to q, with q's ID and the TTLs
// counted down.
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
	m.Id = q.Id
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
// returns the first answer that is not a failure.
func (f *forwarder) forward(ctx context.Context, proto string, q *dns.Msg) (*dns.Msg, error) {
	if len(f.upstreams) == 0 {
		return nil, fmt.Errorf("%w: none configured", errNoUpstream)
	}
	select {
	case f.sem <- struct{}{}:
		defer func() { <-f.sem }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	c := &dns.Client{Net: proto, Timeout: f.timeout, UDPSize: dns.MaxMsgSize}
	var errs []error
	for _, u := range f.upstreams {
		m, _, err := c.ExchangeContext(ctx, q, u.String())
		if err != nil {
			errs = append(errs, err)
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
