package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"
	"github.com/vishvananda/netns"
)

// DNSAddr is where the hosts' dockerd send the names they do not know
// (--dns), and where wgmesh's agents answer them: the agents' default.
const DNSAddr = "169.254.53.53"

// InNetNS runs fn on a thread in the network namespace at path, then
// returns the thread to where it was. Sockets fn opens stay in that
// namespace: a test can listen or query from inside a container or the
// lab's outside world without a program there.
func InNetNS(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread dies with the goroutine if it cannot be put back.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := netns.GetFromPath(path)
		if err != nil {
			errc <- err
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			errc <- err
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// OutsideDNS is a DNS server of the lab's outside world, on WANServer:53:
// the upstream the agents forward names outside the mesh to. It never
// asks anyone else.
type OutsideDNS struct {
	udp, tcp *dns.Server
	wg       sync.WaitGroup
	queries  atomic.Int64

	mu      sync.Mutex
	records map[string]netip.Addr
}

// StartOutsideDNS starts the outside world's DNS server with records
// (names without the final dot; "*.example" stands for every name under
// example). Any other name does not exist.
func (l *Lab) StartOutsideDNS(records map[string]netip.Addr) (*OutsideDNS, error) {
	o := &OutsideDNS{records: map[string]netip.Addr{}}
	for n, a := range records {
		o.records[strings.ToLower(dns.Fqdn(n))] = a
	}
	var pc net.PacketConn
	var ln net.Listener
	addr := net.JoinHostPort(WANServer, "53")
	err := InNetNS("/run/netns/"+l.WAN, func() error {
		var err error
		if pc, err = net.ListenPacket("udp", addr); err != nil {
			return err
		}
		if ln, err = net.Listen("tcp", addr); err != nil {
			pc.Close()
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("outside DNS server: %w", err)
	}
	o.udp = &dns.Server{PacketConn: pc, Handler: o}
	o.tcp = &dns.Server{Listener: ln, Handler: o}
	for _, s := range []*dns.Server{o.udp, o.tcp} {
		o.wg.Add(1)
		go func() { defer o.wg.Done(); _ = s.ActivateAndServe() }()
	}
	return o, nil
}

// ServeDNS implements dns.Handler.
func (o *OutsideDNS) ServeDNS(w dns.ResponseWriter, q *dns.Msg) {
	o.queries.Add(1)
	m := new(dns.Msg).SetReply(q)
	if len(q.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		_ = w.WriteMsg(m)
		return
	}
	name := strings.ToLower(q.Question[0].Name)
	o.mu.Lock()
	a, ok := o.records[name]
	if _, parent, found := strings.Cut(name, "."); !ok && found {
		a, ok = o.records["*."+parent]
	}
	o.mu.Unlock()
	switch {
	case !ok:
		m.Rcode = dns.RcodeNameError
	case q.Question[0].Qtype == dns.TypeA:
		m.Answer = append(m.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: a.AsSlice()})
	}
	_ = w.WriteMsg(m)
}

// Queries counts the queries the server got.
func (o *OutsideDNS) Queries() int64 { return o.queries.Load() }

// Close stops the server.
func (o *OutsideDNS) Close() {
	_ = o.udp.Shutdown()
	_ = o.tcp.Shutdown()
	o.wg.Wait()
}

// DNSClient queries DNS servers from inside a network namespace (a
// container's): its socket is made there, so queries leave from the
// container, as its own resolver's would.
type DNSClient struct {
	conn *dns.Conn
}

// NewDNSClient opens a UDP socket in the namespace at nsPath towards
// server ("127.0.0.11:53" is the container's Docker resolver).
func NewDNSClient(nsPath, server string) (*DNSClient, error) {
	var c net.Conn
	err := InNetNS(nsPath, func() error {
		var err error
		c, err = net.Dial("udp", server)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &DNSClient{conn: &dns.Conn{Conn: c}}, nil
}

// Close closes the socket.
func (c *DNSClient) Close() error { return c.conn.Close() }

// Query asks for name's A records and returns the addresses, the answer
// and how long it took. A name that does not exist is no error.
func (c *DNSClient) Query(ctx context.Context, name string) ([]string, *dns.Msg, time.Duration, error) {
	q := new(dns.Msg).SetQuestion(dns.Fqdn(name), dns.TypeA)
	deadline, ok := ctx.Deadline()
	if !ok || time.Until(deadline) > 5*time.Second {
		deadline = time.Now().Add(5 * time.Second)
	}
	_ = c.conn.SetDeadline(deadline)
	start := time.Now()
	if err := c.conn.WriteMsg(q); err != nil {
		return nil, nil, 0, err
	}
	for {
		m, err := c.conn.ReadMsg()
		took := time.Since(start)
		if err != nil {
			return nil, nil, took, err
		}
		if m.Id != q.Id {
			continue // a late answer to an earlier query
		}
		var addrs []string
		for _, rr := range m.Answer {
			if a, ok := rr.(*dns.A); ok {
				addrs = append(addrs, a.A.String())
			}
		}
		return addrs, m, took, nil
	}
}

// ContainerNetNS is the network namespace of a running container.
func (h *Host) ContainerNetNS(ctx context.Context, container string) (string, error) {
	pid, err := h.ContainerPID(ctx, container)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("/proc/%d/ns/net", pid), nil
}
