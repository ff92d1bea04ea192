package lab

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"time"
)

// Transfer is one TCP transfer between two stand-in containers.
type Transfer struct {
	Bytes    int64
	Took     time.Duration
	Mbps     float64
	Sent     [32]byte // SHA-256 of what was sent
	Received [32]byte // ... and of what arrived
}

// OK reports whether every byte arrived as sent.
func (t Transfer) OK() bool { return t.Sent == t.Received }

// TCPTransfer sends n pseudo-random bytes over TCP from container from to
// container to (listening on port), and hashes both ends: the stream
// crossed the mesh intact if the hashes match. It gives up after limit.
func TCPTransfer(ctx context.Context, from, to *Container, port int, n int64, limit time.Duration) (Transfer, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	var l net.Listener
	addr := net.JoinHostPort(to.IP, fmt.Sprint(port))
	if err := InNetNS(to.Path, func() (err error) {
		var lc net.ListenConfig
		l, err = lc.Listen(ctx, "tcp4", addr)
		return err
	}); err != nil {
		return Transfer{}, fmt.Errorf("listening in %s: %w", to.Name, err)
	}
	defer l.Close()
	type result struct {
		sum [32]byte
		n   int64
		err error
	}
	got := make(chan result, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- result{err: err}
			return
		}
		defer c.Close()
		stop := context.AfterFunc(ctx, func() { c.Close() })
		defer stop()
		h := sha256.New()
		m, err := io.Copy(h, c)
		var sum [32]byte
		copy(sum[:], h.Sum(nil))
		got <- result{sum, m, err}
	}()
	var c net.Conn
	if err := InNetNS(from.Path, func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp4", addr)
		return err
	}); err != nil {
		return Transfer{}, fmt.Errorf("connecting from %s to %s: %w", from.Name, addr, err)
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	start := time.Now()
	h := sha256.New()
	src := io.TeeReader(io.LimitReader(randomReader{rand.NewPCG(uint64(n), uint64(port))}, n), h)
	if _, err := io.Copy(c, src); err != nil {
		c.Close()
		return Transfer{}, fmt.Errorf("sending: %w", err)
	}
	c.(*net.TCPConn).CloseWrite()
	r := <-got
	c.Close()
	took := time.Since(start)
	if r.err != nil {
		return Transfer{}, fmt.Errorf("receiving: %w", r.err)
	}
	t := Transfer{Bytes: r.n, Took: took, Mbps: float64(r.n) * 8 / took.Seconds() / 1e6, Received: r.sum}
	copy(t.Sent[:], h.Sum(nil))
	if r.n != n {
		return t, fmt.Errorf("received %d of %d bytes", r.n, n)
	}
	return t, nil
}

// randomReader reads a pseudo-random stream.
type randomReader struct{ src *rand.PCG }

func (r randomReader) Read(p []byte) (int, error) {
	for i := 0; i < len(p); i += 8 {
		v := r.src.Uint64()
		for j := 0; j < 8 && i+j < len(p); j++ {
			p[i+j] = byte(v >> (8 * j))
		}
	}
	return len(p), nil
}
