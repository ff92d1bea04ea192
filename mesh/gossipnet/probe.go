package gossipnet

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"
)

// Path MTU probes: sealed packets of a chosen size sent from the gossip
// port with DF set (NetTransport's second socket), which the member
// acknowledges from its gossip socket. mesh/reachability decides what
// to probe and when.

// CanProbe reports whether the transport can send path MTU probes: its
// inner transport is a DFWriter.
func (t *Transport) CanProbe() bool { return t.df != nil }

// ipOverhead is the IP and UDP header size in front of a datagram.
func ipOverhead(a netip.Addr) int {
	if a.Is4() || a.Is4In6() {
		return 20 + 8
	}
	return 40 + 8
}

// ErrTooBig: the local interface's MTU is below the probe.
var ErrTooBig = errors.New("larger than the outgoing interface's MTU")

// Probe sends copies path MTU probes of size bytes (whole IP packets)
// with DF set to the member name at to, and reports whether any was
// acknowledged within timeout; ErrTooBig if the local interface cannot
// send it.
func (t *Transport) Probe(ctx context.Context, name string, to netip.AddrPort, size, copies int, timeout time.Duration) (bool, error) {
	if t.df == nil {
		return false, errors.New("the gossip transport cannot send path MTU probes")
	}
	ver := t.versionFor(name)
	pad := size - ipOverhead(to.Addr()) - t.headLen(ver)
	if pad < 2 {
		return false, fmt.Errorf("probe of %d bytes is too small", size)
	}
	body := make([]byte, pad)
	binary.BigEndian.PutUint16(body, uint16(size))
	acked := make(chan struct{}, 1)
	var seqs []uint64
	defer func() {
		t.mu.Lock()
		for _, s := range seqs {
			delete(t.probes.waiting, s)
		}
		t.mu.Unlock()
	}()
	for range max(copies, 1) {
		pkt, seq := t.sealV(ver, kindProbe, body)
		t.mu.Lock()
		t.probes.waiting[seq] = acked
		t.mu.Unlock()
		seqs = append(seqs, seq)
		if err := t.df.WriteDF(pkt, to); err != nil {
			if isMsgSize(err) {
				return false, ErrTooBig
			}
			return false, err
		}
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-acked:
		return true, nil
	case <-timer.C:
		return false, nil
	case <-ctx.Done():
		return false, ctx.Err()
	case <-t.done:
		return false, net.ErrClosed
	}
}

// Fits reports whether a probe of size bytes leaves the local interface
// (it is sent, once; an answer is not waited for).
func (t *Transport) Fits(name string, to netip.AddrPort, size int) bool {
	if t.df == nil {
		return false
	}
	ver := t.versionFor(name)
	pad := size - ipOverhead(to.Addr()) - t.headLen(ver)
	if pad < 2 {
		return true
	}
	body := make([]byte, pad)
	binary.BigEndian.PutUint16(body, uint16(size))
	pkt, _ := t.sealV(ver, kindProbe, body)
	return !isMsgSize(t.df.WriteDF(pkt, to))
}

// ackProbe answers a probe with a small packet from the gossip socket,
// which never sets DF: the answer must not depend on the path back.
func (t *Transport) ackProbe(h header, body []byte, from netip.AddrPort) {
	if len(body) < 2 || !from.IsValid() {
		return
	}
	ack := make([]byte, 10)
	binary.BigEndian.PutUint64(ack, h.seq)
	copy(ack[8:], body[:2])
	// In the probe's header version: the prober reads it.
	pkt, _ := t.sealV(h.ver, kindProbeAck, ack)
	_, _ = t.inner.WriteTo(pkt, from.String())
}

func (t *Transport) probeAcked(_ header, body []byte) {
	if len(body) < 10 {
		return
	}
	seq := binary.BigEndian.Uint64(body)
	t.mu.Lock()
	ch, ok := t.probes.waiting[seq]
	t.mu.Unlock()
	if ok {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}
