package linux

import (
	"fmt"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Per-interface IPv4 settings (enum ipv4_devconf in linux/ip.h).
const (
	devconfForwarding = 1
	devconfProxyARP   = 3
)

// Attributes of a neighbour table's parameters (linux/neighbour.h).
const (
	ndtaName        = 1
	ndtaParms       = 6
	ndtpaIfindex    = 1
	ndtpaProxyDelay = 13
)

// setRoutingConf makes an interface of a network's namespace route and
// answer ARP for what it routes: forwarding and proxy ARP on, and proxy
// replies sent at once rather than after the default random delay of up
// to 0.8 s.
//
// It goes through netlink rather than /proc/sys: a managed Docker plugin
// sees /proc/sys read-only, and netlink needs no thread switched into the
// namespace for each file.
func setRoutingConf(ns netns.NsHandle, index int, proxyARP bool) error {
	conf := map[int]uint32{devconfForwarding: 1}
	if proxyARP {
		conf[devconfProxyARP] = 1
	}
	return inNS(ns, func() error {
		if err := setInetConf(index, conf); err != nil {
			return err
		}
		if proxyARP {
			return setProxyDelay(index, 0)
		}
		return nil
	})
}

// setInetConf sends RTM_SETLINK with IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF,
// in the calling thread's network namespace.
func setInetConf(index int, conf map[int]uint32) error {
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
	msg.Index = int32(index)
	req.AddData(msg)
	spec := nl.NewRtAttr(unix.IFLA_AF_SPEC, nil)
	inet := spec.AddRtAttr(unix.AF_INET, nil)
	inetConf := inet.AddRtAttr(unix.IFLA_INET_CONF, nil)
	for k, v := range conf {
		inetConf.AddRtAttr(k, nl.Uint32Attr(v))
	}
	req.AddData(spec)
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return fmt.Errorf("setting IPv4 options of interface %d: %w", index, err)
	}
	return nil
}

// setProxyDelay sends RTM_SETNEIGHTBL for the ARP table's proxy_delay of
// one interface, in milliseconds.
func setProxyDelay(index int, ms uint64) error {
	req := nl.NewNetlinkRequest(unix.RTM_SETNEIGHTBL, unix.NLM_F_ACK)
	req.AddData(ndtmsg{family: unix.AF_INET})
	req.AddData(nl.NewRtAttr(ndtaName, nl.ZeroTerminated("arp_cache")))
	parms := nl.NewRtAttr(ndtaParms, nil)
	parms.AddRtAttr(ndtpaIfindex, nl.Uint32Attr(uint32(index)))
	parms.AddRtAttr(ndtpaProxyDelay, nl.Uint64Attr(ms))
	req.AddData(parms)
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
		return fmt.Errorf("setting proxy ARP delay of interface %d: %w", index, err)
	}
	return nil
}

// ndtmsg is struct ndtmsg: a family and three bytes of padding. (The nl
// package's raw data would go after the attributes, not before.)
type ndtmsg struct{ family uint8 }

func (m ndtmsg) Len() int          { return 4 }
func (m ndtmsg) Serialize() []byte { return []byte{m.family, 0, 0, 0} }
