package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"

	"github.com/wgmesh/wgmesh/driver/dns"
	"github.com/wgmesh/wgmesh/driver/dns/hostaddr"
	"github.com/wgmesh/wgmesh/driver/dockerapi"
	"github.com/wgmesh/wgmesh/mesh"
)

// defaultDNSAddr is where containers' DNS queries for names Docker does
// not know reach the agent: a link-local address, which no network
// routes, on the host's loopback link.
const defaultDNSAddr = "169.254.53.53"

// resolvConf is where the host's resolvers are read when --dns-upstream
// is not given.
const resolvConf = "/etc/resolv.conf"

func (f *agentFlags) validateDNS() error {
	if f.dnsAddr == "off" {
		// An empty variable means "unset", so WGMESH_DNS_ADDR says off.
		f.dnsAddr = ""
	}
	if f.dnsAddr == "" {
		if len(f.dnsUpstream) > 0 {
			return errors.New("--dns-upstream needs the DNS server (--dns-addr)")
		}
		return nil
	}
	a, err := netip.ParseAddr(f.dnsAddr)
	if err != nil || !a.Is4() || a.IsLoopback() || a.IsUnspecified() || a.IsMulticast() {
		return fmt.Errorf("--dns-addr %q must be an IPv4 address that is not loopback (containers reach it through their default route)", f.dnsAddr)
	}
	for _, u := range f.dnsUpstream {
		up, err := dns.ParseUpstream(u)
		if err != nil {
			return fmt.Errorf("--dns-upstream: %w", err)
		}
		if up.Addr() == a {
			return fmt.Errorf("--dns-upstream %s is the DNS server itself", u)
		}
	}
	return nil
}

// newDNS sets up the DNS service, or, with --dns-addr empty, removes the
// address an earlier run left. It returns nil when the service is off.
func newDNS(f *agentFlags, m *mesh.Mesh, docker *dockerapi.Client, log *slog.Logger) (*dns.Service, error) {
	if f.dnsAddr == "" {
		if err := hostaddr.Remove(); err != nil {
			log.Warn("removing the DNS server's address", "err", err)
		}
		return nil, nil
	}
	addr := netip.MustParseAddr(f.dnsAddr) // validated
	var upstreams []netip.AddrPort
	for _, u := range f.dnsUpstream {
		up, _ := dns.ParseUpstream(u) // validated
		upstreams = append(upstreams, up)
	}
	if len(f.dnsUpstream) == 0 {
		var err error
		if upstreams, err = dns.HostUpstreams(resolvConf, addr); err != nil {
			log.Warn("reading the host's DNS servers; set --dns-upstream", "path", resolvConf, "err", err)
		}
	}
	if err := hostaddr.Ensure(addr); err != nil {
		// The server keeps trying to listen, and status says why not.
		log.Error("giving the host the DNS server's address", "addr", addr, "err", err)
	}
	var sock string
	if p, ok := strings.CutPrefix(f.dockerHost, "unix://"); ok {
		sock = p
	}
	return dns.NewService(dns.ServiceConfig{
		Listen: netip.AddrPortFrom(addr, 53), Upstreams: upstreams, Mesh: m, Docker: docker,
		DriverName: f.driverName, DockerSocket: sock, Logger: log,
		Links: func() ([]dns.LinkAddrs, error) {
			ls, err := hostaddr.List()
			out := make([]dns.LinkAddrs, 0, len(ls))
			for _, l := range ls {
				out = append(out, dns.LinkAddrs{Index: l.Index, Addrs: l.Addrs})
			}
			return out, err
		},
	})
}
