package gossipnet

import (
	"crypto/rand"
	"maps"
	"net"
	"net/netip"
	"time"
)

// Reflection: a node asks a relay, at a port of the relay's other than
// its gossip port, where the node's gossip port's packets come from.
// What that destination sees against what the gossip port's peers see
// tells the NAT assessment (mesh/reachability) a NAT that maps each
// destination to a port of its own from one that keeps one mapping.
// Requests and answers are sealed; an answer is believed only as the
// answer to a request this node made.

// reflectAsk is a reflection request awaiting its answer.
type reflectAsk struct {
	relay string
	at    time.Time
	// minSeq: an older relay's answer must be sealed after the request,
	// so after every packet of it seen before.
	minSeq uint64
}

// reflectWait is how long a reflection request waits for its answer.
const reflectWait = 10 * time.Second

// SetReflector makes the transport answer members' reflection requests
// (AskReflection) on c, a UDP socket of its own: before Start. Shutdown
// closes it.
func (t *Transport) SetReflector(c *net.UDPConn) { t.reflector = c }

// AskReflection asks the relay (a member, at to) to say where this
// node's gossip port's packets come from; the answer arrives as a sealed
// packet (Reflections), and is believed only as the answer to this
// request: a relay of this version echoes the request's random nonce; an
// older one (header version 1) must answer with a packet it sealed after
// the request.
func (t *Transport) AskReflection(relay string, to netip.AddrPort) {
	var nonce [nonceLen]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return
	}
	ver := t.versionFor(relay)
	now := time.Now()
	t.mu.Lock()
	for n, a := range t.probes.asked {
		if now.Sub(a.at) > reflectWait {
			delete(t.probes.asked, n)
		}
	}
	for n, a := range t.probes.askedOld {
		if now.Sub(a.at) > reflectWait {
			delete(t.probes.askedOld, n)
		}
	}
	if ver >= hdrV2 {
		t.probes.asked[nonce] = reflectAsk{relay: relay, at: now}
	} else {
		t.probes.askedOld[relay] = reflectAsk{relay: relay, at: now, minSeq: t.sightings[relay].seq}
	}
	t.mu.Unlock()
	// An older relay reads no body; the nonce does no harm there.
	b, _ := t.sealV(ver, kindReflect, nonce[:])
	_, _ = t.inner.WriteTo(b, to.String())
}

// loopReflect answers members' reflection requests with the source of
// their request: a sealed reply, so only members ask and only members
// believe the answer; to a request of header version 2, with its nonce.
func (t *Transport) loopReflect() {
	defer t.wg.Done()
	buf := make([]byte, 2048)
	for {
		n, from, err := t.reflector.ReadFromUDPAddrPort(buf)
		if err != nil {
			select {
			case <-t.done:
				return
			default:
				continue
			}
		}
		h, body, sealed, err := t.open(buf[:n])
		if err != nil || !sealed || h.kind != kindReflect {
			continue
		}
		from = unmapPort(from)
		b, _ := from.MarshalBinary()
		if h.ver >= hdrV2 {
			if len(body) < nonceLen {
				continue
			}
			b = append(append([]byte(nil), body[:nonceLen]...), b...)
		}
		pkt, _ := t.sealV(h.ver, kindReflectd, b)
		_, _ = t.reflector.WriteToUDPAddrPort(pkt, from)
	}
}

// reflected takes a relay's answer to a reflection request, if it answers
// a request this node made and has not had answered yet.
func (t *Transport) reflected(h header, body []byte, at time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	if h.ver >= hdrV2 {
		if len(body) < nonceLen {
			return
		}
		nonce := [nonceLen]byte(body[:nonceLen])
		ask, ok := t.probes.asked[nonce]
		if !ok || ask.relay != h.name || now.Sub(ask.at) > reflectWait {
			return
		}
		delete(t.probes.asked, nonce)
		body = body[nonceLen:]
	} else {
		ask, ok := t.probes.askedOld[h.name]
		if !ok || t.hints[h.name].ReplayProof || h.seq <= ask.minSeq || now.Sub(ask.at) > reflectWait {
			return
		}
		delete(t.probes.askedOld, h.name)
	}
	var a netip.AddrPort
	if err := a.UnmarshalBinary(body); err != nil || !a.IsValid() {
		return
	}
	if at.IsZero() {
		at = now
	}
	t.probes.reflections[h.name] = Sighting{Addr: a, At: at}
}

// Reflections returns the latest reflection from each relay: where it
// saw this node's gossip port's packets come from.
func (t *Transport) Reflections() map[string]Sighting {
	t.mu.Lock()
	defer t.mu.Unlock()
	return maps.Clone(t.probes.reflections)
}
