// Package relay forwards WireGuard traffic between two hosts that cannot
// reach each other, on a host both can reach.
//
// The relay forwards the two hosts' WireGuard datagrams as they are:
// already encrypted, end to end, with keys the relay never has. Each
// relayed pair (on one network) gets a UDP port of its own, so the relay
// needs no header to tell sessions apart, and both ends configure the
// relay's address and that port as the other's WireGuard endpoint.
//
// A session knows the WireGuard public keys of its two ends: WireGuard's
// handshake messages carry a MAC keyed with the receiver's public key
// (mac1), which the relay checks to learn which end sent a handshake, and
// so where each end's packets come from (its NAT mapping toward this
// port). Packets are forwarded only between the two addresses so
// learned; anything else is dropped. A handshake is learned from once (a
// replayed one moves nobody), and the relay sends only to an address that
// sent it a handshake for that session.
//
// mac1 proves only knowledge of a public key, which every member and
// every former member has. So each end also has a bind key with the relay
// (BindKey), from the X25519 of the end's and the relay's WireGuard keys:
// only the two know it, and it never travels. The end sends the session
// port a small bind (AppendBind: a timestamp and a MAC with that key) at
// least every BindEvery, from its host; the relay takes an end's
// handshakes only from the IP address of its latest valid bind. A bind
// cannot come from WireGuard's own socket (the kernel's WireGuard owns it),
// so it pins the end's address, not its port, which the handshake still
// gives: behind a NAT that maps each destination to a port of its own,
// the bind's port and WireGuard's differ, but the address is the NAT's.
// A forged handshake from anywhere else moves nobody, and so no traffic
// can be turned at a third party; one whose source forges the end's own
// address can still move the end to another port of that address.
//
// An end without a bind key (an agent that predates binds, which sends
// none) is learned from its handshakes alone, as before.
package relay

import (
	"crypto/hmac"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/crypto/blake2s"
	"golang.org/x/crypto/curve25519"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"

	"github.com/wgmesh/wgmesh/crypto"
)

// Session is one relayed pair.
type Session struct {
	Port uint16
	// A and B are the WireGuard public keys of the two ends.
	A, B crypto.PublicKey
	// KeyA and KeyB are the ends' bind keys (BindKey); zero for an end
	// that sends no binds.
	KeyA, KeyB [32]byte
}

// Config configures a Server.
type Config struct {
	// BindAddr is the address the session ports are bound on.
	BindAddr netip.Addr
	// MaxRate bounds the bytes per second each session forwards, both
	// directions together; 0 does not.
	MaxRate int64
	Logger  *slog.Logger
}

// Stats are a session's counters.
type Stats struct {
	Port uint16
	A, B crypto.PublicKey
	// AddrA and AddrB are where the ends' packets come from.
	AddrA, AddrB netip.AddrPort
	// Packets and Bytes forwarded, A to B and B to A.
	PacketsAB, PacketsBA, BytesAB, BytesBA uint64
	// Dropped counts packets not forwarded: from elsewhere, too large,
	// over the rate.
	Dropped uint64
}

// Server forwards sessions. It is safe for concurrent use.
type Server struct {
	cfg Config
	log *slog.Logger

	mu       sync.Mutex
	sessions map[uint16]*session
	closed   bool
}

// New returns a server forwarding nothing yet. It starts nothing; Set
// does.
func New(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{cfg: cfg, log: cfg.Logger.With("component", "relay"), sessions: map[uint16]*session{}}
}

// Set makes the server forward exactly sessions: it opens the ports of
// new ones and closes those no longer listed. A session whose ends
// changed starts over. Idempotent; a port that cannot be bound is an
// error, the others are still set.
func (s *Server) Set(sessions []Session) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("relay is closed")
	}
	want := map[uint16]Session{}
	for _, ss := range sessions {
		want[ss.Port] = ss
	}
	for port, cur := range s.sessions {
		if w, ok := want[port]; !ok || w != cur.Session {
			cur.close()
			delete(s.sessions, port)
		}
	}
	var errs []error
	for _, port := range slices.Sorted(maps.Keys(want)) {
		if _, ok := s.sessions[port]; ok {
			continue
		}
		ss, err := s.open(want[port])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		s.sessions[port] = ss
	}
	return errors.Join(errs...)
}

// Stats returns each session's counters.
func (s *Server) Stats() []Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Stats, 0, len(s.sessions))
	for _, port := range slices.Sorted(maps.Keys(s.sessions)) {
		out = append(out, s.sessions[port].stats())
	}
	return out
}

// Close closes every session. Idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for port, ss := range s.sessions {
		ss.close()
		delete(s.sessions, port)
	}
	return nil
}

// bound is what an end's binds told: the address they came from, and the
// latest timestamp (each bind must be newer: a replayed one is dropped).
type bound struct {
	addr netip.Addr
	at   int64
}

// maxPacket is the largest datagram forwarded: WireGuard's data message
// for a 9000-byte MTU, with room.
const maxPacket = 9216

type session struct {
	Session
	conn  *net.UDPConn
	batch batchConn
	// gso: the kernel coalesces datagrams of one flow on reading (UDP
	// GRO) and splits them again on sending (UDP GSO), so that a burst
	// of WireGuard packets crosses the relay as one.
	gso bool
	log *slog.Logger
	// keyA is the mac1 key of messages to A (derived from A's public
	// key), keyB of messages to B.
	keyA, keyB [blake2s.Size]byte
	limit      *bucket
	done       chan struct{}

	mu           sync.Mutex
	addrA, addrB netip.AddrPort
	// udpA and udpB are the same, made once for sending.
	udpA, udpB *net.UDPAddr
	seen       [64][16]byte // mac1 of recent handshakes
	next       int
	// bindA and bindB: the ends' latest valid binds (with a bind key).
	bindA, bindB bound

	pAB, pBA, bAB, bBA, dropped atomic.Uint64
}

func (s *Server) open(ss Session) (*session, error) {
	ua := net.UDPAddrFromAddrPort(netip.AddrPortFrom(s.cfg.BindAddr, ss.Port))
	network := "udp4"
	if s.cfg.BindAddr.Is6() && !s.cfg.BindAddr.Is4In6() {
		network = "udp6"
	}
	conn, err := net.ListenUDP(network, ua)
	if err != nil {
		return nil, fmt.Errorf("relay port %s: %w", strconv.Itoa(int(ss.Port)), err)
	}
	_ = conn.SetReadBuffer(4 << 20)
	_ = conn.SetWriteBuffer(4 << 20)
	r := &session{Session: ss, conn: conn, log: s.log.With("port", ss.Port), keyA: mac1Key(ss.A), keyB: mac1Key(ss.B),
		limit: newBucket(s.cfg.MaxRate), done: make(chan struct{})}
	if network == "udp4" {
		r.batch = ipv4.NewPacketConn(conn)
	} else {
		r.batch = ipv6.NewPacketConn(conn)
	}
	r.gso = enableGRO(conn)
	go r.loop()
	return r, nil
}

// enableGRO turns UDP GRO on, where the kernel has it and says so
// (reading it back needs Linux 5.12; older ones are left alone).
func enableGRO(c *net.UDPConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	on := false
	_ = rc.Control(func(fd uintptr) {
		if unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 1) != nil {
			return
		}
		v, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO)
		on = err == nil && v == 1
	})
	return on
}

// groSize is the segment size of a coalesced read, from its control
// message; 0 for a single datagram.
func groSize(oob []byte) int {
	for len(oob) > unix.SizeofCmsghdr {
		hdr, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return 0
		}
		if hdr.Level == unix.SOL_UDP && hdr.Type == unix.UDP_GRO {
			switch {
			case len(data) >= 4:
				return int(binary.NativeEndian.Uint32(data))
			case len(data) >= 2:
				return int(binary.NativeEndian.Uint16(data))
			}
		}
		oob = rest
	}
	return 0
}

// gsoControl writes into buf a control message that has the kernel
// split a send into segments of size bytes, and returns it.
func gsoControl(buf []byte, size int) []byte {
	buf = buf[:unix.CmsgSpace(2)]
	clear(buf)
	hdr := (*unix.Cmsghdr)(unsafe.Pointer(&buf[0]))
	hdr.Level, hdr.Type = unix.SOL_UDP, unix.UDP_SEGMENT
	hdr.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(buf[unix.CmsgLen(0):], uint16(size))
	return buf
}

// batchConn reads and writes several datagrams per system call
// (recvmmsg, sendmmsg).
type batchConn interface {
	ReadBatch(ms []ipv4.Message, flags int) (int, error)
	WriteBatch(ms []ipv4.Message, flags int) (int, error)
}

// batchSize is how many datagrams one system call moves at most.
const batchSize = 64

func (r *session) close() {
	r.conn.Close()
	<-r.done
}

func (r *session) stats() Stats {
	r.mu.Lock()
	a, b := r.addrA, r.addrB
	r.mu.Unlock()
	return Stats{Port: r.Port, A: r.A, B: r.B, AddrA: a, AddrB: b, PacketsAB: r.pAB.Load(), PacketsBA: r.pBA.Load(),
		BytesAB: r.bAB.Load(), BytesBA: r.bBA.Load(), Dropped: r.dropped.Load()}
}

// loop forwards until the socket is closed, a batch of datagrams at a
// time each way, and with GRO many datagrams of one flow per buffer.
func (r *session) loop() {
	defer close(r.done)
	// A coalesced read takes up to 64 KiB; fewer of them at a time keep a
	// session's buffers at 512 KiB.
	bufSize, batch := maxPacket+1, batchSize
	if r.gso {
		bufSize, batch = 1<<16, 8
	}
	in := make([]ipv4.Message, batch)
	for i := range in {
		in[i].Buffers = [][]byte{make([]byte, bufSize)}
		in[i].OOB = make([]byte, 64)
	}
	ctl := make([][]byte, batch)
	for i := range ctl {
		ctl[i] = make([]byte, unix.CmsgSpace(2))
	}
	out := make([]ipv4.Message, 0, batchSize*2)
	for {
		n, err := r.batch.ReadBatch(in, 0)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		now := time.Now()
		out = out[:0]
		for i := range in[:n] {
			m := &in[i]
			ua, ok := m.Addr.(*net.UDPAddr)
			if !ok {
				r.dropped.Add(1)
				continue
			}
			src := ua.AddrPort()
			src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
			buf := m.Buffers[0][:m.N]
			seg := groSize(m.OOB[:m.NN])
			if seg <= 0 || seg >= len(buf) {
				seg = len(buf)
			}
			if seg > maxPacket {
				r.dropped.Add(1)
				continue
			}
			segs := (len(buf) + seg - 1) / seg
			if segs > 1 && r.gso && macOffset(buf[:seg]) < 0 {
				// A run of data packets of one end: forwarded whole, the
				// kernel splits it again.
				dst, toB, ok := r.route(buf[:seg], src)
				if !ok || !r.limit.take(len(buf), now) {
					r.dropped.Add(uint64(segs))
					continue
				}
				out = append(out, ipv4.Message{Buffers: [][]byte{buf}, Addr: dst, OOB: gsoControl(ctl[i], seg)})
				r.count(toB, segs, len(buf))
				continue
			}
			for off := 0; off < len(buf); off += seg {
				pkt := buf[off:min(off+seg, len(buf))]
				if isBind(pkt) {
					r.bind(pkt, src, now)
					continue
				}
				dst, toB, ok := r.route(pkt, src)
				if !ok || !r.limit.take(len(pkt), now) {
					r.dropped.Add(1)
					continue
				}
				out = append(out, ipv4.Message{Buffers: [][]byte{pkt}, Addr: dst})
				r.count(toB, 1, len(pkt))
			}
		}
		r.send(out)
	}
}

func (r *session) count(toB bool, packets, bytes int) {
	if toB {
		r.pAB.Add(uint64(packets))
		r.bAB.Add(uint64(bytes))
	} else {
		r.pBA.Add(uint64(packets))
		r.bBA.Add(uint64(bytes))
	}
}

// send writes out, skipping a datagram the kernel refuses. A segmented
// send refused with EIO (a device without checksum offload, which GSO
// needs) turns GSO off for the session and goes out a segment at a time.
func (r *session) send(out []ipv4.Message) {
	for len(out) > 0 {
		sent, err := r.batch.WriteBatch(out, 0)
		if err == nil {
			out = out[min(sent, len(out)):]
			continue
		}
		if errors.Is(err, net.ErrClosed) {
			return
		}
		failed := out[min(sent, len(out)-1)]
		if len(failed.OOB) > 0 && errors.Is(err, unix.EIO) {
			r.log.Warn("the kernel cannot segment relayed datagrams here; sending them one by one", "err", err)
			r.gso = false
			seg := int(binary.NativeEndian.Uint16(failed.OOB[unix.CmsgLen(0):]))
			buf := failed.Buffers[0]
			for off := 0; off < len(buf); off += seg {
				one := []ipv4.Message{{Buffers: [][]byte{buf[off:min(off+seg, len(buf))]}, Addr: failed.Addr}}
				if _, err := r.batch.WriteBatch(one, 0); err != nil {
					r.dropped.Add(1)
				}
			}
		} else {
			r.dropped.Add(1)
		}
		out = out[min(sent+1, len(out)):]
	}
}

// route decides where a packet from src goes: a handshake message tells
// its sender by its mac1 (and teaches the relay the sender's address);
// anything else goes from one learned address to the other.
func (r *session) route(msg []byte, src netip.AddrPort) (dst *net.UDPAddr, toB, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if mac, ok := handshakeMAC1(msg); ok {
		var fromA bool
		switch {
		case checkMAC1(msg, r.keyB):
			fromA = true
		case checkMAC1(msg, r.keyA):
			fromA = false
		default:
			return nil, false, false
		}
		bnd, key := r.bindA, r.KeyA
		if !fromA {
			bnd, key = r.bindB, r.KeyB
		}
		if key != ([32]byte{}) && bnd.addr != src.Addr() {
			// Not from where the end's binds come from: a forgery, or
			// an end that has not bound yet.
			return nil, false, false
		}
		if !r.replayedLocked(mac) {
			if fromA && r.addrA != src {
				r.log.Debug("relayed end A is at a new address", "addr", src)
				r.addrA, r.udpA = src, net.UDPAddrFromAddrPort(src)
			} else if !fromA && r.addrB != src {
				r.log.Debug("relayed end B is at a new address", "addr", src)
				r.addrB, r.udpB = src, net.UDPAddrFromAddrPort(src)
			}
		}
		if fromA {
			return r.udpB, true, r.addrB.IsValid() && src == r.addrA
		}
		return r.udpA, false, r.addrA.IsValid() && src == r.addrB
	}
	switch {
	case src == r.addrA && r.addrA.IsValid():
		return r.udpB, true, r.addrB.IsValid()
	case src == r.addrB && r.addrB.IsValid():
		return r.udpA, false, r.addrA.IsValid()
	}
	return nil, false, false
}

// bind takes an end's bind: valid for one of the ends' keys, for this
// port, newer than that end's last and not too far from this host's
// clock. It pins the end to the bind's address; an end pinned elsewhere
// than its learned address is sent nothing until its next handshake.
func (r *session) bind(msg []byte, src netip.AddrPort, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, end := range []struct {
		key   [32]byte
		bnd   *bound
		addr  *netip.AddrPort
		udp   **net.UDPAddr
		label string
	}{{r.KeyA, &r.bindA, &r.addrA, &r.udpA, "A"}, {r.KeyB, &r.bindB, &r.addrB, &r.udpB, "B"}} {
		at, ok := checkBind(msg, end.key, r.Port)
		if !ok {
			continue
		}
		if at <= end.bnd.at || now.Sub(time.Unix(0, at)).Abs() > BindSkew {
			r.dropped.Add(1)
			return
		}
		end.bnd.at = at
		if end.bnd.addr != src.Addr() {
			r.log.Debug("relayed end "+end.label+" bound at a new address", "addr", src.Addr())
			end.bnd.addr = src.Addr()
		}
		if end.addr.IsValid() && end.addr.Addr() != src.Addr() {
			*end.addr, *end.udp = netip.AddrPort{}, nil
		}
		return
	}
	r.dropped.Add(1)
}

// replayedLocked reports whether a handshake was seen before, and
// remembers it.
func (r *session) replayedLocked(mac [16]byte) bool {
	for _, m := range r.seen {
		if m == mac {
			return true
		}
	}
	r.seen[r.next] = mac
	r.next = (r.next + 1) % len(r.seen)
	return false
}

// WireGuard's handshake messages: type, three reserved zero bytes, and
// mac1 over everything before it, then mac2.
const (
	msgInitiation     = 1
	msgResponse       = 2
	sizeInitiation    = 148
	sizeResponse      = 92
	macSize           = 16
	labelMAC1         = "mac1----"
	macOffsetInitiate = sizeInitiation - 2*macSize
	macOffsetResponse = sizeResponse - 2*macSize
)

// mac1Key is the key of mac1 for messages to the holder of pub:
// BLAKE2s-256(label || pub).
func mac1Key(pub crypto.PublicKey) [blake2s.Size]byte {
	h, _ := blake2s.New256(nil)
	h.Write([]byte(labelMAC1))
	h.Write(pub[:])
	var k [blake2s.Size]byte
	copy(k[:], h.Sum(nil))
	return k
}

// handshakeMAC1 returns the mac1 of a handshake message.
func handshakeMAC1(msg []byte) ([16]byte, bool) {
	var mac [16]byte
	off := macOffset(msg)
	if off < 0 {
		return mac, false
	}
	copy(mac[:], msg[off:off+macSize])
	return mac, true
}

func macOffset(msg []byte) int {
	if len(msg) < 4 || msg[1] != 0 || msg[2] != 0 || msg[3] != 0 {
		return -1
	}
	switch {
	case msg[0] == msgInitiation && len(msg) == sizeInitiation:
		return macOffsetInitiate
	case msg[0] == msgResponse && len(msg) == sizeResponse:
		return macOffsetResponse
	}
	return -1
}

// checkMAC1 checks a handshake message's mac1 against key: keyed
// BLAKE2s-128 of the message up to the mac.
func checkMAC1(msg []byte, key [blake2s.Size]byte) bool {
	off := macOffset(msg)
	if off < 0 {
		return false
	}
	h, _ := blake2s.New128(key[:])
	h.Write(msg[:off])
	var sum [macSize]byte
	copy(sum[:], h.Sum(nil))
	var got [macSize]byte
	copy(got[:], msg[off:off+macSize])
	return sum == got
}

// Binds: "wgmb", the session port, the sender's clock in nanoseconds,
// and a keyed BLAKE2s-128 of those (a MAC with the end's bind key). The
// first byte is no WireGuard message type.
const (
	bindMagic   = "wgmb"
	sizeBind    = len(bindMagic) + 2 + 8 + macSize
	labelBind   = "wgmesh relay bind v1"
	bindMACFrom = sizeBind - macSize
)

// BindEvery is how often an end sends its relay a bind; BindSkew how far
// a bind's timestamp may be from the relay's clock.
const (
	BindEvery = 10 * time.Second
	BindSkew  = 5 * time.Minute
)

// BindKey is the bind key of an end and a relay, from one's WireGuard
// private key and the other's public key: X25519, hashed with a label of
// its own (the raw X25519 result is also what WireGuard's handshake
// between the two mixes in, and must not serve twice).
func BindKey(priv crypto.PrivateKey, pub crypto.PublicKey) ([32]byte, error) {
	var key [32]byte
	k := priv.Bytes()
	defer clear(k[:])
	ss, err := curve25519.X25519(k[:], pub[:])
	if err != nil {
		return key, fmt.Errorf("deriving a relay bind key: %w", err)
	}
	defer clear(ss)
	h, _ := blake2s.New256(ss)
	h.Write([]byte(labelBind))
	copy(key[:], h.Sum(nil))
	return key, nil
}

// AppendBind appends to dst an end's bind for the session on port, made
// at at.
func AppendBind(dst []byte, key [32]byte, port uint16, at time.Time) []byte {
	start := len(dst)
	dst = append(dst, bindMagic...)
	dst = binary.BigEndian.AppendUint16(dst, port)
	dst = binary.BigEndian.AppendUint64(dst, uint64(at.UnixNano()))
	return append(dst, bindMAC(dst[start:], key)...)
}

func isBind(msg []byte) bool {
	return len(msg) == sizeBind && string(msg[:len(bindMagic)]) == bindMagic
}

func bindMAC(body []byte, key [32]byte) []byte {
	h, _ := blake2s.New128(key[:])
	h.Write(body)
	return h.Sum(nil)
}

// checkBind checks a bind against an end's key (a zero key checks
// nothing) and the session's port, and returns its timestamp.
func checkBind(msg []byte, key [32]byte, port uint16) (int64, bool) {
	if key == ([32]byte{}) || !isBind(msg) || binary.BigEndian.Uint16(msg[len(bindMagic):]) != port ||
		!hmac.Equal(bindMAC(msg[:bindMACFrom], key), msg[bindMACFrom:]) {
		return 0, false
	}
	return int64(binary.BigEndian.Uint64(msg[len(bindMagic)+2:])), true
}

// bucket is a token bucket of bytes; nil never limits.
type bucket struct {
	rate   float64
	tokens float64
	at     time.Time
}

func newBucket(rate int64) *bucket {
	if rate <= 0 {
		return nil
	}
	return &bucket{rate: float64(rate), tokens: float64(rate)}
}

// take spends n bytes, and reports whether there were enough. Only the
// session's loop calls it.
func (b *bucket) take(n int, now time.Time) bool {
	if b == nil {
		return true
	}
	if !b.at.IsZero() {
		b.tokens = min(b.rate, b.tokens+now.Sub(b.at).Seconds()*b.rate)
	}
	b.at = now
	if b.tokens < float64(n) {
		return false
	}
	b.tokens -= float64(n)
	return true
}
