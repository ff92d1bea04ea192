package dns

import (
	"net/netip"
	"sync"
	"time"
)

// Bounds on what queries may take of the agent, which also runs gossip
// and Raft. Past them the server answers SERVFAIL (Docker's resolver
// then tries its next server) or, for a source over its rate, drops
// the query: an answer would go to an address that may be forged.
const (
	// maxInFlight bounds the queries waiting for upstreams (a goroutine
	// each; the watcher bounds those waiting for Docker, and the others
	// take microseconds).
	maxInFlight = 128
	// sourceRate and sourceBurst are what one source address may ask,
	// per second and at once; maxSources bounds the addresses tracked.
	// Docker's resolver asks from each container's own address, so one
	// container's flood does not starve the others. The bounds leave room
	// for a busy container: a lookup is often two or three queries (A,
	// AAAA, search domains), and the bench's names part, 900 lookups in
	// about a second from one container, timed out at 200/s and 400.
	sourceRate  = 2000.0
	sourceBurst = 4000
	maxSources  = 4096
	// maxTCPConns bounds the open TCP connections (a goroutine each).
	maxTCPConns = 64
)

// sourceLimiter is a token bucket per source address.
//
// golang.org/x/time/rate would do one bucket, but the map of them and its
// bound are the point here, and the module is not otherwise a
// dependency.
type sourceLimiter struct {
	rate, burst float64
	max         int

	mu      sync.Mutex
	buckets map[netip.Addr]*bucket
	// overflow is shared by the sources that find the map full.
	overflow  bucket
	lastPrune time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newSourceLimiter(rate float64, burst, max int) *sourceLimiter {
	return &sourceLimiter{rate: rate, burst: float64(burst), max: max, buckets: map[netip.Addr]*bucket{}, overflow: bucket{tokens: float64(burst)}}
}

// take reports whether b has a token at now, and takes it.
func (l *sourceLimiter) take(b *bucket, now time.Time) bool {
	if !b.last.IsZero() {
		b.tokens = min(l.burst, b.tokens+l.rate*now.Sub(b.last).Seconds())
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// allow reports whether a query from a may be answered now.
func (l *sourceLimiter) allow(a netip.Addr, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.buckets[a]
	if !ok {
		if len(l.buckets) >= l.max && now.Sub(l.lastPrune) > time.Second {
			// A bucket that has filled up again is as good as none.
			l.lastPrune = now
			for k, b := range l.buckets {
				if b.tokens+l.rate*now.Sub(b.last).Seconds() >= l.burst {
					delete(l.buckets, k)
				}
			}
		}
		if len(l.buckets) >= l.max {
			// Many sources at once (forged, most likely): the new ones
			// share one bucket, and the map does not grow.
			return l.take(&l.overflow, now)
		}
		b = &bucket{tokens: l.burst}
		l.buckets[a] = b
	}
	return l.take(b, now)
}
