package consensus

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
)

// One TCP port carries both Raft and wgmesh's own requests to the leader,
// each connection under mutual TLS (crypto.ClusterTLS). After the
// handshake the dialler writes one byte saying which it is, as Consul
// multiplexes its server port.
const (
	streamRaft byte = 'R'
	streamRPC  byte = 'C'
)

// handshakeTimeout bounds the TLS handshake and the stream byte.
const handshakeTimeout = 10 * time.Second

// DialFunc opens a TCP connection; tests replace it to cut links.
type DialFunc func(ctx context.Context, addr string) (net.Conn, error)

// mux accepts connections on the consensus port, authenticates them and
// hands each to Raft or to the RPC server.
type mux struct {
	l    net.Listener
	tls  *crypto.ClusterTLS
	dial DialFunc
	log  *slog.Logger
	// allowRaft says whether a node may send this node Raft requests:
	// only voters (a leader or a candidate) ever do.
	allowRaft func(crypto.NodeID) bool
	rpc       func(conn net.Conn, peer crypto.NodeID)
	refused   func(reason string)
	// lookup finds the node at a consensus address, and whether it is
	// behind NAT (reverse.go); park holds connections nodes behind NAT
	// parked here.
	lookup func(addr string) (id crypto.NodeID, behindNAT, ok bool)
	park   *parkLot
	// raftPeer finds the server the Raft configuration has at an
	// address: Raft dials addresses, and only that server may answer.
	raftPeer func(addr string) (crypto.NodeID, bool)

	// health tracks dialled connections that time out (health.go).
	health *connHealth

	raftConns chan net.Conn
	closed    chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
}

func newMux(l net.Listener, tls *crypto.ClusterTLS, dial DialFunc, log *slog.Logger) *mux {
	if dial == nil {
		dial = func(ctx context.Context, addr string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		}
	}
	return &mux{l: l, tls: tls, dial: dial, log: log, health: newConnHealth(), raftConns: make(chan net.Conn), closed: make(chan struct{}), park: newParkLot()}
}

// serve accepts connections until the mux is closed.
func (m *mux) serve() {
	defer m.wg.Done()
	for {
		c, err := m.l.Accept()
		if err != nil {
			select {
			case <-m.closed:
				return
			default:
			}
			m.log.Warn("accepting a consensus connection", "err", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.handle(c)
		}()
	}
}

func (m *mux) handle(c net.Conn) {
	tc := tls.Server(c, m.tls.ServerConfig())
	peer, err := crypto.Handshake(tc, handshakeTimeout)
	if err != nil {
		m.log.Debug("consensus connection refused", "remote", c.RemoteAddr().String(), "err", err)
		m.refuse("tls")
		c.Close()
		return
	}
	// Guarded: a keyring change that drops the peer's key cuts it.
	gc := m.tls.Guard(tc)
	var kind [1]byte
	_ = gc.SetReadDeadline(time.Now().Add(handshakeTimeout))
	if _, err := io.ReadFull(gc, kind[:]); err != nil {
		gc.Close()
		return
	}
	_ = gc.SetReadDeadline(time.Time{})
	m.dispatch(gc, peer, kind[0])
}

// dispatch hands an authenticated stream of the given kind to its server.
func (m *mux) dispatch(tc net.Conn, peer crypto.NodeID, kind byte) {
	switch kind {
	case streamRaft:
		if m.allowRaft == nil || !m.allowRaft(peer) {
			m.log.Warn("refusing Raft traffic from a node that is not a voter", "peer_id", peer.Short(), "remote", tc.RemoteAddr().String())
			m.refuse("raft-not-voter")
			tc.Close()
			return
		}
		select {
		case m.raftConns <- tc:
		case <-m.closed:
			tc.Close()
		}
	case streamRPC:
		m.rpc(tc, peer)
	case streamPark:
		if !m.park.put(peer, tc) {
			tc.Close()
		}
	default:
		m.refuse("stream-kind")
		tc.Close()
	}
}

func (m *mux) refuse(reason string) {
	if m.refused != nil {
		m.refused(reason)
	}
}

// dialStream opens an authenticated stream of the given kind to addr and
// returns it with the identity that answered: over a connection the node
// at addr parked here (reverse.go), else dialled.
func (m *mux) dialStream(ctx context.Context, addr string, kind byte) (net.Conn, crypto.NodeID, error) {
	if c, id, ok := m.takeParked(ctx, addr, kind); ok {
		return c, id, nil
	}
	return m.dialDirect(ctx, addr, kind)
}

// dialDirect dials addr for a stream of the given kind.
func (m *mux) dialDirect(ctx context.Context, addr string, kind byte) (net.Conn, crypto.NodeID, error) {
	c, err := m.dial(ctx, addr)
	if err != nil {
		m.health.record(addr, err)
		return nil, crypto.NodeID{}, err
	}
	tc := tls.Client(c, m.tls.ClientConfig())
	timeout := handshakeTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(d))
	}
	peer, err := crypto.Handshake(tc, timeout)
	if err != nil {
		c.Close()
		if timeout >= time.Second {
			// A handshake takes a few round trips; one cut short
			// by the caller's tight deadline says little.
			m.health.record(addr, err)
		}
		return nil, crypto.NodeID{}, err
	}
	m.health.record(addr, nil)
	gc := m.tls.Guard(tc)
	if _, err := gc.Write([]byte{kind}); err != nil {
		gc.Close()
		return nil, crypto.NodeID{}, fmt.Errorf("writing to %s: %w", addr, err)
	}
	return gc, peer, nil
}

func (m *mux) close() {
	m.closeOnce.Do(func() {
		close(m.closed)
		m.l.Close()
		m.park.close()
	})
	m.wg.Wait()
}

// streamLayer is the mux as Raft's raft.StreamLayer.
type streamLayer struct {
	m    *mux
	addr net.Addr
}

var _ raft.StreamLayer = (*streamLayer)(nil)

func (s *streamLayer) Accept() (net.Conn, error) {
	select {
	case c := <-s.m.raftConns:
		return c, nil
	case <-s.m.closed:
		return nil, net.ErrClosed
	}
}

// Close does nothing: the mux owns the listener and closes it after Raft
// has shut down.
func (s *streamLayer) Close() error { return nil }

func (s *streamLayer) Addr() net.Addr { return s.addr }

// Dial opens a Raft stream to the server the latest configuration has at
// address, and refuses any other node that answers there: a member with
// the cluster key could otherwise take a voter's place (vote, acknowledge
// entries it never stored).
func (s *streamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	if s.m.raftPeer == nil {
		return nil, errors.New("no Raft configuration to check peers against")
	}
	want, ok := s.m.raftPeer(string(address))
	if !ok {
		s.m.refuse("raft-dial-unknown")
		return nil, fmt.Errorf("no single server at %s in the Raft configuration", address)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, peer, err := s.m.dialStream(ctx, string(address), streamRaft)
	if err != nil {
		return nil, err
	}
	if peer != want {
		c.Close()
		s.m.refuse("raft-dial-identity")
		s.m.log.Warn("refusing a Raft connection: another node answers at a server's address", "addr", string(address), "want_id", want.Short(), "peer_id", peer.Short())
		return nil, fmt.Errorf("node %s answered at %s in the place of server %s", peer.Short(), address, want.Short())
	}
	return c, nil
}

// configServerAt finds the one server that the latest Raft configuration
// has at addr.
func (n *Node) configServerAt(addr string) (crypto.NodeID, bool) {
	r := n.raftServer()
	if r == nil {
		return crypto.NodeID{}, false
	}
	f := r.GetConfiguration()
	if f.Error() != nil {
		return crypto.NodeID{}, false
	}
	var found crypto.NodeID
	count := 0
	for _, s := range f.Configuration().Servers {
		if string(s.Address) != addr {
			continue
		}
		id, err := crypto.ParseNodeID(string(s.ID))
		if err != nil {
			return crypto.NodeID{}, false
		}
		found = id
		count++
	}
	return found, count == 1
}

// tcpAddr is a net.Addr for the advertised address, which Raft puts into
// its requests as where to reach this node.
type tcpAddr string

func (a tcpAddr) Network() string { return "tcp" }
func (a tcpAddr) String() string  { return string(a) }

var errClosed = errors.New("consensus is shut down")
