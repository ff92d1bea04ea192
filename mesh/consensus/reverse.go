package consensus

// Reverse connections for nodes behind NAT. Nobody can dial a host behind
// NAT, yet the leader must send it the log, and others ask it questions
// (the autopilot how far it got, a bootstrapping node whether it knows a
// cluster). So such a node dials out first: it parks an authenticated
// connection at each member that may need to reach it, the voters and
// the members others can dial (where a leader may come from), and such a
// member uses a parked connection as if it had dialled it:
//
//	parked node                         member
//	  TLS dial, 'P' ───────────────────▶ parks it under the node's identity
//	  waits for one byte                  ... wants a stream to the node:
//	  ◀─────────────────────────────────  writes the stream kind ('R', 'C')
//	  serves the stream as if accepted;   uses the connection as dialled
//	  parks a new connection at once
//
// A member finds the parked connection of the node whose consensus
// address it was asked to dial: by the Raft configuration, else by the
// addresses members advertise, and only if exactly one node has that
// address. TCP keepalives (Go's default, 15 s) keep idle parked
// connections and their NAT mappings alive.

import (
	"context"
	"errors"
	"io"
	"maps"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
)

const streamPark byte = 'P'

// Bounds on parked connections.
const (
	parkedPerNode = 2
	parkedTotal   = 4096
	// parkTargets caps how many members a node parks at.
	parkTargets = 8
	// parkWait is how long a dial waits for a parked connection of a
	// node behind NAT (it parks a new one right after each use).
	parkWait = 3 * time.Second
)

// parkLot holds connections parked here, by the identity that parked
// them.
type parkLot struct {
	mu      sync.Mutex
	conns   map[crypto.NodeID][]net.Conn
	total   int
	arrived chan struct{}
	closed  bool
}

func newParkLot() *parkLot {
	return &parkLot{conns: map[crypto.NodeID][]net.Conn{}, arrived: make(chan struct{})}
}

// put parks c; the oldest of a node's connections beyond its share go.
func (p *parkLot) put(id crypto.NodeID, c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.total >= parkedTotal && len(p.conns[id]) == 0 {
		return false
	}
	cs := append(p.conns[id], c)
	p.total++
	for len(cs) > parkedPerNode {
		cs[0].Close()
		cs = cs[1:]
		p.total--
	}
	p.conns[id] = cs
	close(p.arrived)
	p.arrived = make(chan struct{})
	return true
}

// take returns a connection parked by id, waiting up to wait for one.
func (p *parkLot) take(ctx context.Context, id crypto.NodeID, wait time.Duration) (net.Conn, bool) {
	var deadline <-chan time.Time
	if wait > 0 {
		t := time.NewTimer(wait)
		defer t.Stop()
		deadline = t.C
	}
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, false
		}
		if cs := p.conns[id]; len(cs) > 0 {
			c := cs[len(cs)-1]
			if len(cs) == 1 {
				delete(p.conns, id)
			} else {
				p.conns[id] = cs[:len(cs)-1]
			}
			p.total--
			p.mu.Unlock()
			return c, true
		}
		arrived := p.arrived
		p.mu.Unlock()
		if deadline == nil {
			return nil, false
		}
		select {
		case <-arrived:
		case <-deadline:
			return nil, false
		case <-ctx.Done():
			return nil, false
		}
	}
}

func (p *parkLot) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for _, cs := range p.conns {
		for _, c := range cs {
			c.Close()
		}
	}
	clear(p.conns)
	p.total = 0
}

// takeParked returns a stream of kind to the node at addr over a
// connection it parked here, if it has one. A node behind NAT is waited
// for briefly: it parks a new connection right after each use.
func (m *mux) takeParked(ctx context.Context, addr string, kind byte) (net.Conn, crypto.NodeID, bool) {
	if m.lookup == nil {
		return nil, crypto.NodeID{}, false
	}
	id, behindNAT, ok := m.lookup(addr)
	if !ok {
		return nil, crypto.NodeID{}, false
	}
	wait := time.Duration(0)
	if behindNAT {
		wait = parkWait
		if d, ok := ctx.Deadline(); ok {
			wait = min(wait, time.Until(d))
		}
	}
	for {
		c, ok := m.park.take(ctx, id, wait)
		if !ok {
			return nil, crypto.NodeID{}, false
		}
		_ = c.SetWriteDeadline(time.Now().Add(handshakeTimeout))
		if _, err := c.Write([]byte{kind}); err != nil {
			c.Close()
			continue // it died while parked; another may be there
		}
		_ = c.SetWriteDeadline(time.Time{})
		return c, id, true
	}
}

// lookupAddr finds the node whose consensus address is addr: by the Raft
// configuration, else by what members advertise. Only a single match
// counts: two nodes behind different NATs may advertise the same private
// address.
func (n *Node) lookupAddr(addr string) (crypto.NodeID, bool, bool) {
	members := n.cfg.Membership.Members()
	natted := map[crypto.NodeID]bool{}
	var byMembers []crypto.NodeID
	for _, m := range members {
		natted[m.ID] = m.BehindNAT
		if m.RaftAddr == addr && !m.Self {
			byMembers = append(byMembers, m.ID)
		}
	}
	if r := n.raftServer(); r != nil {
		if f := r.GetConfiguration(); f.Error() == nil {
			var ids []crypto.NodeID
			for _, s := range f.Configuration().Servers {
				if string(s.Address) == addr {
					if id, err := crypto.ParseNodeID(string(s.ID)); err == nil {
						ids = append(ids, id)
					}
				}
			}
			if len(ids) == 1 {
				return ids[0], natted[ids[0]], true
			}
			if len(ids) > 1 {
				return crypto.NodeID{}, false, false
			}
		}
	}
	if len(byMembers) == 1 {
		return byMembers[0], natted[byMembers[0]], true
	}
	return crypto.NodeID{}, false, false
}

// parkTarget is a member this node parks connections at.
type parkTarget struct {
	id   crypto.NodeID
	addr string
}

// parkTargetsNow lists where this node should park connections: nowhere
// unless it is behind NAT; else at the voters and at members that are
// not, alive, voters first, at most parkTargets.
func (n *Node) parkTargetsNow() []parkTarget {
	members := n.cfg.Membership.Members()
	behind := false
	byID := map[crypto.NodeID]Member{}
	for _, m := range members {
		if m.Self {
			behind = m.BehindNAT
			continue
		}
		byID[m.ID] = m
	}
	if !behind {
		return nil
	}
	var out []parkTarget
	seen := map[crypto.NodeID]bool{}
	add := func(id crypto.NodeID, addr string) {
		if len(out) < parkTargets && !seen[id] && id != n.id && addr != "" {
			seen[id] = true
			out = append(out, parkTarget{id, addr})
		}
	}
	if r := n.raftServer(); r != nil {
		if f := r.GetConfiguration(); f.Error() == nil {
			for _, s := range f.Configuration().Servers {
				if s.Suffrage != raft.Voter {
					continue
				}
				if id, err := crypto.ParseNodeID(string(s.ID)); err == nil {
					if m, ok := byID[id]; !ok || m.Alive {
						add(id, string(s.Address))
					}
				}
			}
		}
	}
	for _, id := range slices.SortedFunc(maps.Keys(byID), func(a, b crypto.NodeID) int { return slices.Compare(a[:], b[:]) }) {
		if m := byID[id]; m.Alive && !m.BehindNAT {
			add(id, m.RaftAddr)
		}
	}
	return out
}

// loopPark keeps a connection parked at every target until ctx is done.
func (n *Node) loopPark(ctx context.Context) {
	defer n.mux.wg.Done()
	running := map[parkTarget]context.CancelFunc{}
	var wg sync.WaitGroup
	defer func() {
		for _, cancel := range running {
			cancel()
		}
		wg.Wait()
	}()
	tick := time.NewTicker(n.cfg.Tick * 4)
	defer tick.Stop()
	for {
		want := map[parkTarget]bool{}
		for _, t := range n.parkTargetsNow() {
			want[t] = true
		}
		for t, cancel := range running {
			if !want[t] {
				cancel()
				delete(running, t)
			}
		}
		for t := range want {
			if _, ok := running[t]; ok {
				continue
			}
			tctx, cancel := context.WithCancel(ctx)
			running[t] = cancel
			wg.Add(1)
			go func() {
				defer wg.Done()
				n.parkAt(tctx, t)
			}()
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// parkAt keeps one connection parked at t, serving each use of it, until
// ctx is done.
func (n *Node) parkAt(ctx context.Context, t parkTarget) {
	backoff := time.Second
	for ctx.Err() == nil {
		err := n.parkOnce(ctx, t)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			backoff = time.Second
			continue
		}
		n.log.Debug("parking a connection", "at", t.addr, "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// parkOnce parks one connection at t and, once t uses it, serves the
// stream; it returns when the stream started (nil) or the connection
// failed.
func (n *Node) parkOnce(ctx context.Context, t parkTarget) error {
	dctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	c, peer, err := n.mux.dialDirect(dctx, t.addr, streamPark)
	cancel()
	if err != nil {
		return err
	}
	if peer != t.id {
		c.Close()
		return errors.New("another node answered at " + t.addr)
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	var kind [1]byte
	_, err = io.ReadFull(c, kind[:])
	if !stop() || err != nil {
		c.Close()
		if err == nil {
			err = ctx.Err()
		}
		return err
	}
	n.mux.wg.Add(1)
	go func() {
		defer n.mux.wg.Done()
		n.mux.dispatch(c, peer, kind[0])
	}()
	return nil
}
