package linux

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/wgmesh/wgmesh/driver/dataplane"
)

// TCP MSS clamping in a network's namespace, as overlay networks do.
//
// A peer across a smaller path gets routes of a smaller MTU (syncRoutes),
// and the namespace answers a container's larger packets with ICMP
// "fragmentation needed". A container whose firewall drops that ICMP
// never learns, and its TCP stalls at the first full-size segment. So
// the namespace rewrites the MSS option of TCP handshakes it forwards,
// never upwards (the kernel only lowers it), so that no segment exceeds
// the path from the start:
//
//   - going out into WireGuard, to the MSS of the route's MTU (nft's
//     "rt mtu"), which covers what the other end may send here;
//   - coming in from a peer across a smaller path, to that path's MSS,
//     which covers what the local container may send back, even when the
//     peer runs an agent without clamping.
//
// The rules live in a table of their own in the network's namespace,
// where neither Docker's iptables (20.10) nor its nftables rules (29)
// reach. They are written through netlink (no iptables or nft binary:
// the managed plugin's image has none), and only when they change.

// mssTable is the nftables table of the clamp in a network's namespace.
const mssTable = "wgmesh"

// mssRules is the desired clamp: the WireGuard link's name and the MSS of
// each block behind a smaller path.
type mssRules struct {
	wg     string
	blocks []blockMSS
}

type blockMSS struct {
	block netip.Prefix
	mss   int
}

// key identifies the rules, to skip rewriting unchanged ones.
func (r mssRules) key() string {
	var b strings.Builder
	b.WriteString(r.wg)
	for _, x := range r.blocks {
		fmt.Fprintf(&b, " %s=%d", x.block, x.mss)
	}
	return b.String()
}

// wantMSS computes the clamp of a network from its peers' route MTUs.
func wantMSS(wg string, n *dataplane.Network) mssRules {
	r := mssRules{wg: wg}
	for _, p := range n.Peers {
		if p.MTU == 0 {
			continue
		}
		for _, a := range p.AllowedIPs {
			r.blocks = append(r.blocks, blockMSS{a.Masked(), mssOf(p.MTU, a.Addr())})
		}
	}
	slices.SortFunc(r.blocks, func(a, b blockMSS) int { return a.block.Addr().Compare(b.block.Addr()) })
	return r
}

// mssOf is the MSS of packets of mtu bytes of a's family, without TCP
// options (the sender takes those off itself).
func mssOf(mtu int, a netip.Addr) int {
	if a.Is4() {
		return mtu - 40
	}
	return mtu - 60
}

// syncMSS writes the clamp into the network's namespace if it changed.
func (d *DataPlane) syncMSS(st *network, r mssRules) error {
	key := r.key()
	if st.mss == key {
		return nil
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(st.ns)))
	if err != nil {
		return fmt.Errorf("opening nftables: %w", err)
	}
	// One batch, applied at once: the table, emptied, then the rules.
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: mssTable})
	c.FlushTable(t)
	policy := nftables.ChainPolicyAccept
	ch := c.AddChain(&nftables.Chain{Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityMangle, Policy: &policy})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: clampOut(r.wg)})
	for _, b := range r.blocks {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: clampIn(r.wg, b)})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("writing the TCP MSS clamp: %w", err)
	}
	st.mss = key
	return nil
}

// synOf matches TCP handshakes (SYN set, RST not) on an interface: iif
// for packets coming in on it, else going out.
func synOf(wg string, in bool) []expr.Any {
	key := expr.MetaKeyOIFNAME
	if in {
		key = expr.MetaKeyIIFNAME
	}
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(wg)},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0x02 | 0x04}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0x02}},
	}
}

// writeMSS sets the MSS option from register 1 (the kernel only lowers it).
var writeMSS = &expr.Exthdr{Op: expr.ExthdrOpTcpopt, Type: 2, Offset: 2, Len: 2, SourceRegister: 1}

// clampOut: tcp flags & (syn|rst) == syn oifname WG: maxseg set rt mtu.
func clampOut(wg string) []expr.Any {
	return append(synOf(wg, false),
		&expr.Rt{Register: 1, Key: expr.RtTCPMSS},
		// rt gives the MSS in host order; the option holds it in
		// network order.
		&expr.Byteorder{SourceRegister: 1, DestRegister: 1, Op: expr.ByteorderHton, Len: 2, Size: 2},
		writeMSS)
}

// clampIn: the same, coming in from the block b: maxseg set b's MSS.
func clampIn(wg string, b blockMSS) []expr.Any {
	a := b.block.Addr()
	proto, off := byte(unix.NFPROTO_IPV4), uint32(12)
	if !a.Is4() {
		proto, off = unix.NFPROTO_IPV6, 8
	}
	raw := a.AsSlice()
	mask := make([]byte, len(raw))
	for i := range b.block.Bits() {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	e := append(synOf(wg, true),
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: uint32(len(raw))},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: uint32(len(raw)), Mask: mask, Xor: make([]byte, len(raw))},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: raw},
	)
	mss := make([]byte, 2)
	binary.BigEndian.PutUint16(mss, uint16(b.mss))
	return append(e, &expr.Immediate{Register: 1, Data: mss}, writeMSS)
}

// ifname is an interface name as nftables compares it: NUL-padded to
// IFNAMSIZ.
func ifname(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}
