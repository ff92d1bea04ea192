// Package hostaddr gives the host the address wgmesh's DNS server listens
// on: a /32 on the loopback link, labelled as wgmesh's, as load balancers
// hold their virtual addresses. A packet that arrives on any link for an
// address of the host is the host's, so containers reach the server
// through their default route; and the loopback link exists on every
// kernel, where a dummy link needs a module some kernels lack.
//
// The address stays when the agent stops: a query to an address that is
// there but served by nobody is refused at once, and Docker's resolver
// moves on to its next server, where a missing address would make it
// wait for a timeout.
package hostaddr

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	// LinkName is the link that holds the address.
	LinkName = "lo"
	// Label marks wgmesh's address among the link's.
	Label = "lo:wgmeshdns"
)

// Ensure makes addr (a /32) the one address with wgmesh's label on the
// loopback link. It is idempotent.
func Ensure(addr netip.Addr) error {
	if !addr.Is4() || addr.IsLoopback() || addr.IsUnspecified() {
		return fmt.Errorf("DNS address %s is not a usable IPv4 address (not loopback)", addr)
	}
	h, link, err := open()
	if err != nil {
		return err
	}
	defer h.Close()
	want := &netlink.Addr{IPNet: &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(32, 32)}, Label: Label}
	if err := removeOurs(h, link, want.IP); err != nil {
		return err
	}
	if err := h.AddrReplace(link, want); err != nil {
		return fmt.Errorf("adding %s to %s: %w", addr, LinkName, err)
	}
	return nil
}

// Remove deletes wgmesh's address, if there is one: the DNS server is off.
func Remove() error {
	h, link, err := open()
	if err != nil {
		return err
	}
	defer h.Close()
	return removeOurs(h, link, nil)
}

func open() (*netlink.Handle, netlink.Link, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, nil, err
	}
	link, err := h.LinkByName(LinkName)
	if err != nil {
		h.Close()
		return nil, nil, fmt.Errorf("finding link %s: %w", LinkName, err)
	}
	return h, link, nil
}

// removeOurs deletes the addresses with wgmesh's label but keep.
func removeOurs(h *netlink.Handle, link netlink.Link, keep net.IP) error {
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return h.AddrList(link, unix.AF_INET) })
	if err != nil {
		return fmt.Errorf("listing addresses of %s: %w", LinkName, err)
	}
	for _, a := range addrs {
		if a.Label != Label || keep != nil && a.IPNet.IP.Equal(keep) {
			continue
		}
		if err := h.AddrDel(link, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("removing %s from %s: %w", a.IPNet, LinkName, err)
		}
	}
	return nil
}

// retryDump repeats a dump the kernel interrupted because the table
// changed under it (moby's nlwrap).
func retryDump[T any](f func() (T, error)) (T, error) {
	var v T
	var err error
	for range 5 {
		v, err = f()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
	}
	return v, err
}

// LinkAddrs are the IPv4 addresses of one link of the host, with their
// prefix lengths (172.18.0.1/16).
type LinkAddrs struct {
	Index int
	Addrs []netip.Prefix
}

// List returns the host's links that have IPv4 addresses, with their
// addresses, in one dump of the kernel's table.
func List() ([]LinkAddrs, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	addrs, err := retryDump(func() ([]netlink.Addr, error) { return h.AddrList(nil, unix.AF_INET) })
	if err != nil {
		return nil, fmt.Errorf("listing the host's addresses: %w", err)
	}
	byLink := map[int]*LinkAddrs{}
	var out []*LinkAddrs
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IPNet.IP)
		if !ok {
			continue
		}
		ones, _ := a.IPNet.Mask.Size()
		l := byLink[a.LinkIndex]
		if l == nil {
			l = &LinkAddrs{Index: a.LinkIndex}
			byLink[a.LinkIndex] = l
			out = append(out, l)
		}
		l.Addrs = append(l.Addrs, netip.PrefixFrom(ip.Unmap(), ones))
	}
	res := make([]LinkAddrs, len(out))
	for i, l := range out {
		res[i] = *l
	}
	return res, nil
}
