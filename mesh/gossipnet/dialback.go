package gossipnet

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Dialback, the protocol: a node not told the address to advertise asks
// its seeds, before it joins, where they see it (mesh decides what to
// make of the answers, mesh/dialback.go).
//
// The node asks each seed, over a TCP connection to the seed's gossip
// port, to say where the connection comes from and then to dial that
// address, unsolicited, at the node's consensus port, from a new port
// of its own. A NAT that only lets in what its host began drops that
// connection; a 1:1 NAT (or forwarded ports) lets it through, and the
// node receives the nonce of its request there. Every frame is sealed
// with the cluster key (seal.go), so only members ask and answer, and
// each seed gets a nonce of its own, so no seed can answer for another.
//
// Wire format on a stream: hdrMagic | length (2) | sealed frame, where
// the frame's kind is kindDialback (nonce, consensus port) from the
// node, kindDialbackd (nonce, the address seen) back on the same
// connection, and kindDialedBack (nonce) on the seed's new connection.
// memberlist's own streams never start with hdrMagic; a seed of an
// earlier version hands the stream to memberlist, which closes it, and
// the node counts that seed as not answering.

const (
	kindDialback   byte = 5
	kindDialbackd  byte = 6
	kindDialedBack byte = 7
)

// DialbackWait bounds each step of a dialback: connecting to a seed and
// its answer, the seed's connection back, and the wait for connections
// back after the last answer. A start that asks seeds waits at most
// twice this.
const DialbackWait = 2 * time.Second

const (
	// dialbackWaitMin is the least wait for connections back after the
	// answers (more where the seeds are far: three times the slowest ask).
	dialbackWaitMin = 500 * time.Millisecond
	// maxDialbackFrame bounds a frame read from a stream.
	maxDialbackFrame = 1024
	// dialbacksAtOnce bounds the connections back a seed makes at once.
	dialbacksAtOnce = 8
)

// DialbackAnswer is what one seed said.
type DialbackAnswer struct {
	// Seen is the address the seed saw the request come from; invalid
	// if the seed did not answer.
	Seen netip.Addr
	// Reached: the seed's connection back to Seen arrived.
	Reached bool
}

// Seed is a seed to ask, resolved.
type Seed struct {
	// Name is the seed as configured, for the log.
	Name string
	Addr netip.AddrPort
}

// writeFrame sends one sealed frame on a stream.
func writeFrame(w io.Writer, sealed []byte) error {
	if len(sealed) > maxDialbackFrame {
		return errors.New("dialback frame too large")
	}
	b := make([]byte, 0, 3+len(sealed))
	b = append(b, hdrMagic)
	b = binary.BigEndian.AppendUint16(b, uint16(len(sealed)))
	_, err := w.Write(append(b, sealed...))
	return err
}

// readFrame reads one sealed frame of kind from a stream, its magic
// already read, and checks its tag.
func readFrame(r io.Reader, s *sealer, kind byte) (header, []byte, error) {
	var n [2]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return header{}, nil, err
	}
	size := int(binary.BigEndian.Uint16(n[:]))
	if size > maxDialbackFrame {
		return header{}, nil, errors.New("dialback frame too large")
	}
	b := make([]byte, size)
	if _, err := io.ReadFull(r, b); err != nil {
		return header{}, nil, err
	}
	h, body, sealed, err := s.open(b)
	if err != nil {
		return header{}, nil, err
	}
	if !sealed || h.ver < hdrV2 || h.kind != kind {
		return header{}, nil, fmt.Errorf("%w: not a dialback frame of kind %d", errBadHeader, kind)
	}
	return h, body, nil
}

// readMagic reads a stream's first byte and checks it is hdrMagic.
func readMagic(r io.Reader) error {
	var b [1]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return err
	}
	if b[0] != hdrMagic {
		return errBadHeader
	}
	return nil
}

// serveDialback answers a dialback request on c (a stream to the gossip
// port whose first byte, hdrMagic, was read): it says where c comes
// from, and dials that address at the port asked.
func (t *Transport) serveDialback(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(DialbackWait))
	_, body, err := readFrame(c, t.sealer, kindDialback)
	if err != nil || len(body) != nonceLen+2 {
		return
	}
	seen := addrPortOf(c.RemoteAddr()).Addr()
	if !seen.IsValid() {
		return
	}
	nonce := body[:nonceLen]
	port := binary.BigEndian.Uint16(body[nonceLen:])
	a, _ := seen.MarshalBinary()
	if err := writeFrame(c, t.seal(kindDialbackd, append(append([]byte(nil), nonce...), a...))); err != nil || port == 0 {
		return
	}
	select {
	case t.streams.dialbacks <- struct{}{}:
		defer func() { <-t.streams.dialbacks }()
	default:
		return
	}
	d := net.Dialer{Timeout: DialbackWait}
	back, err := d.Dial("tcp", netip.AddrPortFrom(seen, port).String())
	if err != nil {
		return
	}
	defer back.Close()
	_ = back.SetDeadline(time.Now().Add(DialbackWait))
	_ = writeFrame(back, t.seal(kindDialedBack, nonce))
}

// AskDialbacks asks each seed where it sees this node and to dial it
// back at l's port (the consensus port), and collects the answers, one
// per seed in order; local is the address the node would advertise, at
// which no connection back is waited for. l must not be serving yet: it
// accepts here until the answers are in, then is left as it was. The
// requests carry t's name and keys: call it after SetKeyring.
func (t *Transport) AskDialbacks(ctx context.Context, seeds []Seed, l *net.TCPListener, local netip.Addr, log *slog.Logger) []DialbackAnswer {
	return askDialbacks(ctx, t.sealer, seeds, l, local, log)
}

// askDialbacks is AskDialbacks with any sealer (tests ask without a
// transport).
func askDialbacks(ctx context.Context, s *sealer, seeds []Seed, l *net.TCPListener, local netip.Addr, log *slog.Logger) []DialbackAnswer {
	answers := make([]DialbackAnswer, len(seeds))
	nonces := map[[nonceLen]byte]int{}
	for i := range seeds {
		var n [nonceLen]byte
		if _, err := rand.Read(n[:]); err != nil {
			return nil
		}
		nonces[n] = i
	}
	port := uint16(l.Addr().(*net.TCPAddr).Port)

	var mu sync.Mutex
	accepted := make(chan struct{})
	_ = l.SetDeadline(time.Now().Add(2 * DialbackWait))
	go func() {
		defer close(accepted)
		for {
			c, err := l.AcceptTCP()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(DialbackWait))
				if readMagic(c) != nil {
					return
				}
				_, body, err := readFrame(c, s, kindDialedBack)
				if err != nil || len(body) != nonceLen {
					return
				}
				if i, ok := nonces[[nonceLen]byte(body)]; ok {
					mu.Lock()
					answers[i].Reached = true
					mu.Unlock()
				}
			}()
		}
	}()

	var wg sync.WaitGroup
	var slowest time.Duration
	for n, i := range nonces {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			seen, err := askSeed(ctx, s, seeds[i].Addr, n, port)
			if err != nil {
				log.Debug("asking a seed how it sees this host", "seed", seeds[i].Name, "err", err)
				return
			}
			mu.Lock()
			answers[i].Seen = seen
			slowest = max(slowest, time.Since(start))
			mu.Unlock()
		}()
	}
	wg.Wait()

	// The answers are in; wait for the connections back from seeds that
	// see this node elsewhere.
	mu.Lock()
	ask := slowest
	mu.Unlock()
	answered := time.Now()
	for ctx.Err() == nil {
		mu.Lock()
		waiting, reached := false, false
		for _, a := range answers {
			waiting = waiting || a.Seen.IsValid() && a.Seen != local && !a.Reached
			reached = reached || a.Reached
		}
		mu.Unlock()
		if !waiting || !time.Now().Before(answered.Add(dialbackWaitFor(ask, reached))) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = l.SetDeadline(time.Now())
	<-accepted
	_ = l.SetDeadline(time.Time{})
	mu.Lock()
	defer mu.Unlock()
	return append([]DialbackAnswer(nil), answers...)
}

// askSeed asks one seed where it sees this node, and to dial it back at
// port; it returns the address the seed saw.
func askSeed(ctx context.Context, s *sealer, seed netip.AddrPort, nonce [nonceLen]byte, port uint16) (netip.Addr, error) {
	d := net.Dialer{Timeout: DialbackWait}
	c, err := d.DialContext(ctx, "tcp", seed.String())
	if err != nil {
		return netip.Addr{}, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(DialbackWait))
	if err := writeFrame(c, s.seal(kindDialback, binary.BigEndian.AppendUint16(nonce[:], port))); err != nil {
		return netip.Addr{}, err
	}
	if err := readMagic(c); err != nil {
		return netip.Addr{}, err
	}
	h, body, err := readFrame(c, s, kindDialbackd)
	if err != nil {
		return netip.Addr{}, err
	}
	if len(body) < nonceLen || [nonceLen]byte(body[:nonceLen]) != nonce {
		return netip.Addr{}, fmt.Errorf("answer from %s does not answer this request", h.name)
	}
	var a netip.Addr
	if err := a.UnmarshalBinary(body[nonceLen:]); err != nil || !a.IsValid() {
		return netip.Addr{}, fmt.Errorf("answer from %s: bad address", h.name)
	}
	return a.Unmap(), nil
}

// dialbackWaitFor is how long to wait for connections back after the
// answers, given the slowest ask. A seed connects back as soon as it has
// answered, so one arrives about a round trip after the answer; the ask
// took two (connect, then request and answer): three times the ask, at
// least dialbackWaitMin. A host behind a NAT that drops them waits this
// long for nothing at every start, so the wait is short. Once a seed's
// connection back has come, the host is most likely reachable and a slow
// seed's is worth the full DialbackWait: with two seeds answering, both
// must reach it for the address to be taken.
func dialbackWaitFor(slowest time.Duration, reached bool) time.Duration {
	if reached {
		return DialbackWait
	}
	return min(max(3*slowest, dialbackWaitMin), DialbackWait)
}
