package sim

import (
	"context"
	"fmt"
	"log"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// traffic is what one node sent, as seen at its transport: the bytes
// memberlist hands the kernel, after compression and encryption.
type traffic struct {
	Packets     uint64 // UDP datagrams
	PacketBytes uint64
	Streams     uint64 // TCP connections this node opened
	StreamBytes uint64 // written on every TCP connection, opened or accepted
	DialErrors  uint64 // TCP connections that could not be opened
}

// Bytes is everything sent, UDP and TCP.
func (t traffic) Bytes() uint64 { return t.PacketBytes + t.StreamBytes }

// Messages counts a UDP datagram or a TCP connection as one message each.
func (t traffic) Messages() uint64 { return t.Packets + t.Streams }

func (t traffic) add(o traffic) traffic {
	return traffic{t.Packets + o.Packets, t.PacketBytes + o.PacketBytes, t.Streams + o.Streams,
		t.StreamBytes + o.StreamBytes, t.DialErrors + o.DialErrors}
}

func (t traffic) sub(o traffic) traffic {
	return traffic{t.Packets - o.Packets, t.PacketBytes - o.PacketBytes, t.Streams - o.Streams,
		t.StreamBytes - o.StreamBytes, t.DialErrors - o.DialErrors}
}

// counters accumulate a node's traffic; safe for concurrent use.
type counters struct {
	packets, packetBytes, streams, streamBytes, dialErrors atomic.Uint64
}

func (c *counters) snapshot() traffic {
	return traffic{c.packets.Load(), c.packetBytes.Load(), c.streams.Load(), c.streamBytes.Load(), c.dialErrors.Load()}
}

// streamLimit caps the TCP connections that all nodes have open at once.
//
// Every simulated node shares this process's file descriptors, while a
// real host has its own. Without a cap, a burst of connections from
// hundreds of nodes exhausts them, and then accept fails too: memberlist
// backs off accepting for up to a second, probes over TCP time out, and
// healthy nodes are declared dead, which real hosts would not see. With
// the cap, a dial waits for a free slot, within its own timeout.
type streamLimit struct {
	slots      chan struct{}
	open, peak atomic.Int64
	waits      atomic.Int64
}

// minStreamSlots keeps a usable cap when the descriptor limit is unknown
// or tiny.
const minStreamSlots = 256

// newStreamLimit sizes the cap for nodes from the process's descriptor
// limit: each node holds a TCP listener and a UDP socket, and each
// connection costs two descriptors in-process, one per end.
func newStreamLimit(nodes int) *streamLimit {
	slots := minStreamSlots
	if limit := fdLimit(); limit > 0 {
		slots = max(slots, (limit-2*nodes-1024)/2*3/4)
	}
	return &streamLimit{slots: make(chan struct{}, slots)}
}

func (l *streamLimit) acquire(timeout time.Duration) error {
	select {
	case l.slots <- struct{}{}:
	default:
		l.waits.Add(1)
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case l.slots <- struct{}{}:
		case <-t.C:
			return fmt.Errorf("no free connection slot of %d in %v", cap(l.slots), timeout)
		}
	}
	n := l.open.Add(1)
	for {
		p := l.peak.Load()
		if n <= p || l.peak.CompareAndSwap(p, n) {
			return nil
		}
	}
}

func (l *streamLimit) release() {
	l.open.Add(-1)
	<-l.slots
}

// countingTransport is memberlist's UDP/TCP transport on 127.0.0.1 with
// every byte sent counted and outgoing connections capped by limit. Incoming connections pass through loopStreams,
// which wraps them so that replies (push/pull answers) count too.
type countingTransport struct {
	memberlist.NodeAwareTransport
	port  int
	c     counters
	limit *streamLimit

	streams chan net.Conn
	// closing: Shutdown started; connections memberlist no longer takes
	// are closed. stopped: the inner transport is down; loopStreams ends.
	closing, stopped chan struct{}
	wg               sync.WaitGroup
	once             sync.Once
}

var _ memberlist.NodeAwareTransport = (*countingTransport)(nil)

// maxBindAttempts bounds the retries when the kernel's free TCP port is
// taken for UDP.
const maxBindAttempts = 10

// newCountingTransport binds a free port on 127.0.0.1 and starts
// forwarding incoming connections; Shutdown stops it.
func newCountingTransport(logger *log.Logger, limit *streamLimit) (*countingTransport, error) {
	var nt *memberlist.NetTransport
	var err error
	for range maxBindAttempts {
		nt, err = memberlist.NewNetTransport(&memberlist.NetTransportConfig{
			BindAddrs: []string{"127.0.0.1"},
			Logger:    logger,
		})
		if err == nil {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("binding a gossip port on 127.0.0.1: %w", err)
	}
	t := &countingTransport{
		NodeAwareTransport: nt,
		port:               nt.GetAutoBindPort(),
		limit:              limit,
		streams:            make(chan net.Conn),
		closing:            make(chan struct{}),
		stopped:            make(chan struct{}),
	}
	// Started here, not on first StreamCh: NetTransport's listener
	// blocks on its channel until someone reads it, and Shutdown waits
	// for that listener.
	t.wg.Add(1)
	go t.loopStreams(nt.StreamCh())
	return t, nil
}

// Addr is the gossip address, host:port.
func (t *countingTransport) Addr() string {
	return net.JoinHostPort("127.0.0.1", fmt.Sprint(t.port))
}

func (t *countingTransport) loopStreams(in <-chan net.Conn) {
	defer t.wg.Done()
	for {
		select {
		case conn := <-in:
			select {
			case t.streams <- &countingConn{Conn: conn, c: &t.c}:
			case <-t.closing:
				_ = conn.Close()
			}
		case <-t.stopped:
			return
		}
	}
}

// StreamCh implements memberlist.Transport.
func (t *countingTransport) StreamCh() <-chan net.Conn { return t.streams }

// WriteTo implements memberlist.Transport.
func (t *countingTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	ts, err := t.NodeAwareTransport.WriteTo(b, addr)
	t.countPacket(len(b), err)
	return ts, err
}

// WriteToAddress implements memberlist.NodeAwareTransport.
func (t *countingTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	ts, err := t.NodeAwareTransport.WriteToAddress(b, a)
	t.countPacket(len(b), err)
	return ts, err
}

func (t *countingTransport) countPacket(n int, err error) {
	if err == nil {
		t.c.packets.Add(1)
		t.c.packetBytes.Add(uint64(n))
	}
}

// DialTimeout implements memberlist.Transport.
func (t *countingTransport) DialTimeout(addr string, d time.Duration) (net.Conn, error) {
	return t.dial(d, func(d time.Duration) (net.Conn, error) { return t.NodeAwareTransport.DialTimeout(addr, d) })
}

// DialAddressTimeout implements memberlist.NodeAwareTransport.
func (t *countingTransport) DialAddressTimeout(a memberlist.Address, d time.Duration) (net.Conn, error) {
	return t.dial(d, func(d time.Duration) (net.Conn, error) { return t.NodeAwareTransport.DialAddressTimeout(a, d) })
}

func (t *countingTransport) dial(timeout time.Duration, dial func(time.Duration) (net.Conn, error)) (net.Conn, error) {
	began := time.Now()
	if err := t.limit.acquire(timeout); err != nil {
		t.c.dialErrors.Add(1)
		return nil, err
	}
	conn, err := dial(timeout - time.Since(began))
	if err != nil {
		t.limit.release()
		t.c.dialErrors.Add(1)
		return nil, err
	}
	t.c.streams.Add(1)
	return &countingConn{Conn: conn, c: &t.c, release: t.limit.release}, nil
}

// Shutdown implements memberlist.Transport. It is idempotent: memberlist
// calls it, and the simulation calls it again for nodes whose memberlist
// never started.
func (t *countingTransport) Shutdown() error {
	var err error
	t.once.Do(func() {
		close(t.closing)
		err = t.NodeAwareTransport.Shutdown()
		close(t.stopped)
		t.wg.Wait()
	})
	return err
}

// countingConn counts the bytes written on a TCP connection and, for one
// this node opened, frees its slot when closed.
type countingConn struct {
	net.Conn
	c       *counters
	release func() // nil for accepted connections
	closed  atomic.Bool
}

func (c *countingConn) Close() error {
	if !c.closed.Swap(true) && c.release != nil {
		c.release()
	}
	return c.Conn.Close()
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.c.streamBytes.Add(uint64(n))
	return n, err
}

// raftCounter counts what a node writes on its consensus connections,
// dialled or accepted: Raft's replication and heartbeats, and the RPCs
// that register nodes and forward commands to the leader, as TLS
// records. These connections last; they take no slot of streamLimit.
type raftCounter struct {
	bytes atomic.Uint64
}

// listener wraps l so that accepted connections count.
func (c *raftCounter) listener(l net.Listener) net.Listener { return &raftListener{Listener: l, c: c} }

// dial opens a TCP connection that counts.
func (c *raftCounter) dial(ctx context.Context, addr string) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return &raftConn{Conn: conn, c: c}, nil
}

type raftListener struct {
	net.Listener
	c *raftCounter
}

func (l *raftListener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &raftConn{Conn: conn, c: l.c}, nil
}

type raftConn struct {
	net.Conn
	c *raftCounter
}

func (c *raftConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.c.bytes.Add(uint64(n))
	return n, err
}
