package reachability

import (
	"net/netip"
	"testing"

	"github.com/wgmesh/wgmesh/mesh/records"
)

func TestAssessNAT(t *testing.T) {
	ap := netip.MustParseAddrPort
	local := ap("10.0.0.5:7946")
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	wgLocal := map[netip.Prefix]netip.AddrPort{subnet: ap("10.0.0.5:51820")}
	for _, c := range []struct {
		name   string
		gossip []netip.AddrPort
		wg     []netip.AddrPort
		want   NAT
	}{
		{"no observer", nil, nil, NAT{}},
		{"reachable", []netip.AddrPort{local, local}, []netip.AddrPort{ap("10.0.0.5:51820")}, NAT{Kind: records.NATNone}},
		{"port preserved", []netip.AddrPort{ap("203.0.113.7:7946"), ap("203.0.113.7:7946")}, []netip.AddrPort{ap("203.0.113.7:51820")},
			NAT{Kind: records.NATConsistent, Seen: ap("203.0.113.7:7946"), WG: map[netip.Prefix]netip.AddrPort{subnet: ap("203.0.113.7:51820")}}},
		{"consistent mapping to another port", []netip.AddrPort{ap("203.0.113.7:1044"), ap("203.0.113.7:1044")}, nil,
			NAT{Kind: records.NATConsistent, Seen: ap("203.0.113.7:1044")}},
		{"a port per destination", []netip.AddrPort{ap("203.0.113.7:31000"), ap("203.0.113.7:14121"), ap("203.0.113.7:31000")}, []netip.AddrPort{ap("203.0.113.7:5555")},
			NAT{Kind: records.NATSymmetric, Seen: ap("203.0.113.7:31000"), WG: map[netip.Prefix]netip.AddrPort{subnet: ap("203.0.113.7:5555")}}},
		{"seen directly inside, mapped outside", []netip.AddrPort{local, ap("203.0.113.7:7946")}, []netip.AddrPort{ap("10.0.0.5:51820"), ap("203.0.113.7:51820")},
			NAT{Kind: records.NATConsistent, Seen: ap("203.0.113.7:7946"), WG: map[netip.Prefix]netip.AddrPort{subnet: ap("203.0.113.7:51820")}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			wg := map[netip.Prefix][]netip.AddrPort{}
			if c.wg != nil {
				wg[subnet] = c.wg
			}
			if got := assess(local, c.gossip, wgLocal, wg); !got.Equal(c.want) {
				t.Fatalf("got %+v, want %+v", got, c.want)
			}
		})
	}
}
