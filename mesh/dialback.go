package mesh

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/wgmesh/wgmesh/internal/durable"
)

// Dialback: before it joins, a node that was not told the address to
// advertise finds out whether it is reachable at the address its seeds
// see it come from. A cloud VM whose public address is mapped 1:1 onto
// its private one (the ordinary case on the large clouds) does not see
// that address on any interface; advertising the private one, it would
// count as behind NAT, never vote and never relay, and a cluster of
// such VMs alone would have no reachable host.
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
// A seed is a member, and members are not trusted (docs/threat-model):
// one seed could name an address that is not this node's and dial back
// itself. So the node adopts an address only if every seed that
// answered names the same one and at least two of them reached it there
// (one, where only one answered, or where the address is the one
// confirmed on an earlier start). Nothing else rests on it: the NAT
// assessment after joining (nat.go) still checks that every observer
// sees the node at the address it advertises, and calls it behind NAT
// if not, as it would have without dialback.
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

const (
	// dialbackWait bounds each step: connecting to a seed and its
	// answer, the seed's connection back, and the wait for connections
	// back after the last answer. A start that asks seeds waits at most
	// twice this.
	dialbackWait = 2 * time.Second
	// dialbackWaitMin is the least wait for connections back after the
	// answers (more where the seeds are far: three times the slowest ask).
	dialbackWaitMin = 500 * time.Millisecond
	// maxDialbackFrame bounds a frame read from a stream.
	maxDialbackFrame = 1024
	// dialbackPatience: a node none of whose seeds answer, and that has
	// no address confirmed before, asks again for this long: when a
	// whole cluster starts at once, its seeds come up within moments.
	dialbackPatience = 6 * time.Second
	// dialbacksAtOnce bounds the connections back a seed makes at once.
	dialbacksAtOnce = 8
	// publicAddrFile keeps the address confirmed by dialback.
	publicAddrFile = "public-addr.json"
)

// dialbackAnswer is what one seed said.
type dialbackAnswer struct {
	// Seen is the address the seed saw the request come from; invalid
	// if the seed did not answer.
	Seen netip.Addr
	// Reached: the seed's connection back to Seen arrived.
	Reached bool
}

// judgeDialbacks decides from the seeds' answers whether the node is
// reachable at an address other than local, the one it would advertise;
// saved is the address confirmed on an earlier start (invalid if none). It returns the address to advertise
// instead of local (invalid: keep local), and why, for the log.
func judgeDialbacks(local netip.Addr, all []dialbackAnswer, saved netip.Addr) (netip.Addr, string) {
	var seen netip.Addr
	reached, answers := 0, 0
	for _, a := range all {
		if !a.Seen.IsValid() {
			continue
		}
		answers++
		if seen.IsValid() && a.Seen != seen {
			return netip.Addr{}, fmt.Sprintf("seeds disagree on this host's address (%s, %s)", seen, a.Seen)
		}
		seen = a.Seen
		if a.Reached {
			reached++
		}
	}
	switch {
	case !seen.IsValid():
		if saved.IsValid() && saved != local {
			return saved, "no seed answered; the address confirmed on an earlier start"
		}
		return netip.Addr{}, "no seed answered"
	case seen == local:
		return netip.Addr{}, "seeds see this host at the address it has"
	}
	// Where only one seed answers (the others not up yet), its word
	// is taken: a hostile seed gains nothing by it that a hostile seed
	// naming no address does not, as the NAT assessment after joining
	// calls a node behind NAT whom observers see elsewhere.
	need := min(2, answers)
	switch {
	case reached >= need:
		return seen, fmt.Sprintf("%d seeds reached this host there unsolicited", reached)
	case reached >= 1 && seen == saved:
		return seen, "a seed reached this host there unsolicited, as on an earlier start"
	case reached == 0:
		return netip.Addr{}, fmt.Sprintf("seeds see this host at %s but cannot reach it there (behind NAT)", seen)
	}
	return netip.Addr{}, fmt.Sprintf("only %d of %d seeds reached this host at %s", reached, need, seen)
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
func (t *gossipTransport) serveDialback(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(dialbackWait))
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
	case t.dialbacks <- struct{}{}:
		defer func() { <-t.dialbacks }()
	default:
		return
	}
	d := net.Dialer{Timeout: dialbackWait}
	back, err := d.Dial("tcp", netip.AddrPortFrom(seen, port).String())
	if err != nil {
		return
	}
	defer back.Close()
	_ = back.SetDeadline(time.Now().Add(dialbackWait))
	_ = writeFrame(back, t.seal(kindDialedBack, nonce))
}

// dialbackSeed is a seed to ask, resolved.
type dialbackSeed struct {
	name string
	addr netip.AddrPort
}

// resolveSeeds resolves the seeds (host or host:port, port defaulting to
// port) and leaves out this host's own addresses at port (a seed list
// shared by every host names the host itself too).
func resolveSeeds(ctx context.Context, seeds []string, port int, own func(netip.Addr) bool) []dialbackSeed {
	var out []dialbackSeed
	seen := map[netip.AddrPort]bool{}
	for _, s := range seeds {
		host, p := s, port
		if h, ps, err := net.SplitHostPort(s); err == nil {
			n, err := strconv.Atoi(ps)
			if err != nil {
				continue
			}
			host, p = h, n
		}
		if p <= 0 || p > 65535 {
			continue
		}
		ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		if err != nil || len(ips) == 0 {
			continue
		}
		a := netip.AddrPortFrom(ips[0].Unmap(), uint16(p))
		if seen[a] || p == port && own(a.Addr()) {
			continue
		}
		seen[a] = true
		out = append(out, dialbackSeed{s, a})
	}
	return out
}

// askDialbacks asks each seed where it sees this node and to dial it back
// at l's port, and collects the answers. l must not be serving yet: it
// accepts here until the answers are in, then is left as it was.
func askDialbacks(ctx context.Context, s *sealer, seeds []dialbackSeed, l *net.TCPListener, local netip.Addr, log *slog.Logger) []dialbackAnswer {
	answers := make([]dialbackAnswer, len(seeds))
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
	_ = l.SetDeadline(time.Now().Add(2 * dialbackWait))
	go func() {
		defer close(accepted)
		for {
			c, err := l.AcceptTCP()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(dialbackWait))
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
			seen, err := askSeed(ctx, s, seeds[i].addr, n, port)
			if err != nil {
				log.Debug("asking a seed how it sees this host", "seed", seeds[i].name, "err", err)
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
	// see this node elsewhere. A seed connects back as soon as it has
	// answered, so one arrives about a round trip after the answer; the
	// ask took two (connect, then request and answer). A host behind a
	// NAT that drops them waits this long for nothing at every start.
	mu.Lock()
	wait := min(max(3*slowest, dialbackWaitMin), dialbackWait)
	mu.Unlock()
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		mu.Lock()
		waiting := false
		for _, a := range answers {
			waiting = waiting || a.Seen.IsValid() && a.Seen != local && !a.Reached
		}
		mu.Unlock()
		if !waiting {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = l.SetDeadline(time.Now())
	<-accepted
	_ = l.SetDeadline(time.Time{})
	mu.Lock()
	defer mu.Unlock()
	return append([]dialbackAnswer(nil), answers...)
}

// askSeed asks one seed where it sees this node, and to dial it back at
// port; it returns the address the seed saw.
func askSeed(ctx context.Context, s *sealer, seed netip.AddrPort, nonce [nonceLen]byte, port uint16) (netip.Addr, error) {
	d := net.Dialer{Timeout: dialbackWait}
	c, err := d.DialContext(ctx, "tcp", seed.String())
	if err != nil {
		return netip.Addr{}, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(dialbackWait))
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

// savedPublic is the address dialback confirmed, kept in the state
// directory for the next start.
type savedPublic struct {
	Addr netip.Addr `json:"addr"`
	At   time.Time  `json:"at"`
}

func loadPublicAddr(dir string) netip.Addr {
	if dir == "" {
		return netip.Addr{}
	}
	b, err := os.ReadFile(filepath.Join(dir, publicAddrFile))
	if err != nil {
		return netip.Addr{}
	}
	var s savedPublic
	if json.Unmarshal(b, &s) != nil {
		return netip.Addr{}
	}
	return s.Addr
}

func savePublicAddr(dir string, a netip.Addr) error {
	if dir == "" {
		return nil
	}
	p := filepath.Join(dir, publicAddrFile)
	if !a.IsValid() {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	return durable.WriteFile(p, mustJSON(savedPublic{a, time.Now().UTC()}), 0o600)
}

// discoverAddr is advertiseAddr's last step for a node told no address:
// it asks the seeds (dialback) and returns the address to advertise,
// local or the one seeds reach this node at.
func discoverAddr(ctx context.Context, cfg Config, s *sealer, l *net.TCPListener, local netip.Addr, log *slog.Logger) netip.Addr {
	seeds := resolveSeeds(ctx, cfg.Join, cfg.BindPort, isOwnAddr)
	saved := loadPublicAddr(cfg.StateDir)
	if len(seeds) == 0 {
		return local
	}
	var answers []dialbackAnswer
	for wait := 250 * time.Millisecond; ; wait *= 2 {
		answers = askDialbacks(ctx, s, seeds, l, local, log)
		if answered(answers) || saved.IsValid() || ctx.Err() != nil {
			break
		}
		log.Debug("no seed answered how it sees this host; asking again", "in", wait)
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	addr, why := judgeDialbacks(local, answers, saved)
	if !addr.IsValid() {
		log.Info("advertising this host's own address", "addr", local, "why", why)
		var seen netip.Addr
		for _, a := range answers {
			seen = cmp.Or(seen, a.Seen)
		}
		if seen == local && saved.IsValid() {
			// Reachable at its own address now: the saved one is stale.
			if err := savePublicAddr(cfg.StateDir, netip.Addr{}); err != nil {
				log.Warn("removing the saved public address", "err", err)
			}
		}
		return local
	}
	log.Info("advertising the address seeds reach this host at", "addr", addr, "local", local, "why", why)
	if addr != saved {
		if err := savePublicAddr(cfg.StateDir, addr); err != nil {
			log.Warn("saving the public address", "err", err)
		}
	}
	return addr
}

func answered(as []dialbackAnswer) bool {
	for _, a := range as {
		if a.Seen.IsValid() {
			return true
		}
	}
	return false
}

// isOwnAddr reports whether a is an address of this host.
func isOwnAddr(a netip.Addr) bool {
	if a.IsLoopback() {
		return true
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, x := range addrs {
		if p, err := netip.ParsePrefix(x.String()); err == nil && p.Addr().Unmap() == a {
			return true
		}
	}
	return false
}
