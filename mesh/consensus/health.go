package consensus

import (
	"errors"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
)

// Consensus connections that time out. A member that gossip shows alive
// but whose consensus connections time out is not down: something on the
// way loses packets, a firewall that drops TCP to the consensus port, or
// a path smaller than the hosts' interfaces that drops larger packets
// without the ICMP that would tell TCP so (a black hole: the handshake's
// small packets pass, its certificate flight does not). Status lists such
// members so that `wgmesh status` names the trouble, and a request that
// fails on it says so rather than blaming the voters.

// Unreachable is a member whose consensus connections time out.
type Unreachable struct {
	Name string `json:"name,omitempty"`
	Addr string `json:"addr"`
	// Err is the last failure; Since when they began, Last the latest.
	Err   string    `json:"err"`
	Since time.Time `json:"since"`
	Last  time.Time `json:"last"`
	Count int       `json:"count"`
}

// unreachableFor is how long a failure is reported after the last one.
const unreachableFor = 2 * time.Minute

// connHealth tracks consensus connections that time out, by address.
type connHealth struct {
	mu    sync.Mutex
	fails map[string]*Unreachable
	now   func() time.Time
}

func newConnHealth() *connHealth {
	return &connHealth{fails: map[string]*Unreachable{}, now: time.Now}
}

// record notes the outcome of a connection to addr: a success clears it,
// a timeout counts, other errors (refused: nobody listens) say nothing
// about the path.
func (h *connHealth) record(addr string, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err == nil {
		delete(h.fails, addr)
		return
	}
	if !isTimeout(err) {
		return
	}
	now := h.now()
	f, ok := h.fails[addr]
	if !ok || now.Sub(f.Last) > unreachableFor {
		f = &Unreachable{Addr: addr, Since: now}
		h.fails[addr] = f
	}
	f.Err, f.Last = err.Error(), now
	f.Count++
}

// list returns the recent failures, by address.
func (h *connHealth) list() []Unreachable {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := h.now()
	var out []Unreachable
	for addr, f := range h.fails {
		if now.Sub(f.Last) > unreachableFor {
			delete(h.fails, addr)
			continue
		}
		out = append(out, *f)
	}
	slices.SortFunc(out, func(a, b Unreachable) int { return strings.Compare(a.Addr, b.Addr) })
	return out
}

// isTimeout reports a connection that stalled: a deadline passed, or the
// other end gave up first (it closes when its own deadline passes).
func isTimeout(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}
