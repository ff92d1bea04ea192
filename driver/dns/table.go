package dns

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/wgmesh/wgmesh/mesh"
)

// Table is the names the server answers with: per network (subnet),
// each DNS name's addresses and each address's name. It is immutable;
// the server swaps in a new one when the mesh's names change.
type Table struct {
	byName map[netip.Prefix]map[string][]netip.Addr
	byAddr map[netip.Prefix]map[netip.Addr]string
	names  int
}

// NewTable builds a table from the mesh's live names. Names are kept in
// lower case: DNS compares them without regard to case.
func NewTable(records []mesh.NameRecord) *Table {
	t := &Table{byName: map[netip.Prefix]map[string][]netip.Addr{}, byAddr: map[netip.Prefix]map[netip.Addr]string{}}
	for _, r := range records {
		if r.Deleted || !r.Addr.IsValid() {
			continue
		}
		names := t.byName[r.Subnet]
		if names == nil {
			names = map[string][]netip.Addr{}
			t.byName[r.Subnet] = names
			t.byAddr[r.Subnet] = map[netip.Addr]string{}
		}
		names[strings.ToLower(r.Name)] = append(names[strings.ToLower(r.Name)], r.Addr)
		for _, a := range r.Aliases {
			a = strings.ToLower(a)
			names[a] = append(names[a], r.Addr)
		}
		if _, ok := t.byAddr[r.Subnet][r.Addr]; !ok {
			t.byAddr[r.Subnet][r.Addr] = strings.ToLower(r.Name)
		}
	}
	for _, names := range t.byName {
		for n, addrs := range names {
			slices.SortFunc(addrs, netip.Addr.Compare)
			addrs = slices.Compact(addrs)
			names[n] = addrs
			t.names += len(addrs)
		}
	}
	return t
}

// Lookup returns the addresses of name (lower case, without the final
// dot) on the given networks, and whether the name exists on any of them.
func (t *Table) Lookup(subnets []netip.Prefix, name string) []netip.Addr {
	var out []netip.Addr
	for _, s := range subnets {
		for _, a := range t.byName[s][name] {
			if !slices.Contains(out, a) {
				out = append(out, a)
			}
		}
	}
	return out
}

// Reverse returns the name of addr on the given networks.
func (t *Table) Reverse(subnets []netip.Prefix, addr netip.Addr) (string, bool) {
	for _, s := range subnets {
		if n, ok := t.byAddr[s][addr]; ok {
			return n, true
		}
	}
	return "", false
}

// Len is how many (name, address) pairs the table holds.
func (t *Table) Len() int { return t.names }
