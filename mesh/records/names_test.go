package records

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
)

func sampleName() NameRecord {
	return NameRecord{Node: "host-1", Subnet: netip.MustParsePrefix("10.60.0.0/16"), Endpoint: "0123456789ab", Version: 3<<32 | 7,
		Name: "web", Aliases: []string{"www", "proj-web-1"}, Addr: netip.MustParseAddr("10.60.1.2")}
}

func TestNameRecordRejects(t *testing.T) {
	_, id := sampleInfo(t)
	msg := func(n NameRecord) []byte { return EncodeNameMsg(Sign(id, PurposeName, n)) }
	good := sampleName()
	if _, got, err := DecodeNameMsg(msg(good)); err != nil || !got.Equal(&good) || got.Version != good.Version {
		t.Fatalf("good record: %+v %v", got, err)
	}
	tomb := NameRecord{Node: "host-1", Subnet: good.Subnet, Endpoint: good.Endpoint, Version: 9, Deleted: true}
	if _, _, err := DecodeNameMsg(msg(tomb)); err != nil {
		t.Fatalf("tombstone: %v", err)
	}
	with := func(f func(*NameRecord)) []byte {
		n := sampleName()
		f(&n)
		return msg(n)
	}
	cases := map[string][]byte{
		"empty":           nil,
		"entry kind":      append([]byte{KindEntry}, msg(good)[1:]...),
		"not json":        []byte("N{"),
		"no node":         with(func(n *NameRecord) { n.Node = "" }),
		"short endpoint":  with(func(n *NameRecord) { n.Endpoint = "0123" }),
		"upper endpoint":  with(func(n *NameRecord) { n.Endpoint = "0123456789AB" }),
		"zero version":    with(func(n *NameRecord) { n.Version = 0 }),
		"huge version":    with(func(n *NameRecord) { n.Version = 1<<62 + 1 }),
		"no name":         with(func(n *NameRecord) { n.Name = "" }),
		"space in name":   with(func(n *NameRecord) { n.Name = "a b" }),
		"dot only":        with(func(n *NameRecord) { n.Aliases = []string{"."} }),
		"long label":      with(func(n *NameRecord) { n.Name = strings.Repeat("x", 64) }),
		"too many names":  with(func(n *NameRecord) { n.Aliases = slices.Repeat([]string{"a"}, MaxNames) }),
		"address outside": with(func(n *NameRecord) { n.Addr = netip.MustParseAddr("10.61.0.2") }),
		"no address":      with(func(n *NameRecord) { n.Addr = netip.Addr{} }),
		"IPv6 address": with(func(n *NameRecord) {
			n.Subnet, n.Addr = netip.MustParsePrefix("fd00::/64"), netip.MustParseAddr("fd00::2")
		}),
		"tombstone w/name": with(func(n *NameRecord) { n.Deleted = true }),
		"too long":         append([]byte{KindName}, []byte(strings.Repeat(" ", maxRecordBytes))...),
	}
	for name, b := range cases {
		if _, _, err := DecodeNameMsg(b); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: err = %v, want ErrInvalid", name, err)
		}
	}
}

// TestLargestNameRecordFits: a record with the most and longest names
// SetNames accepts is cut to fit one gossip message, never dropped.
func TestLargestNameRecordFits(t *testing.T) {
	n := sampleName()
	n.Node = strings.Repeat("n", 64)
	n.Endpoint = strings.Repeat("f", maxEndpointLen)
	n.Version = 1<<62 - 1
	n.Name = strings.Repeat("x", 63) + "." + strings.Repeat("y", 63)
	n.Aliases = nil
	for i := range MaxNames - 1 {
		n.Aliases = append(n.Aliases, fmt.Sprintf("%s.%02d", strings.Repeat("a", 60), i))
	}
	_, id := sampleInfo(t)
	if b := EncodeNameMsg(Sign(id, PurposeName, n)); len(b) > maxRecordBytes {
		t.Fatalf("largest valid record is %d bytes, decoders accept %d", len(b), maxRecordBytes)
	}
}

func FuzzDecodeNameMsg(f *testing.F) {
	_, id := sampleInfo(f)
	f.Add(EncodeNameMsg(Sign(id, PurposeName, sampleName())))
	f.Add(EncodeNameMsg(Sign(id, PurposeName, NameRecord{Node: "a", Subnet: netip.MustParsePrefix("10.0.0.0/8"), Endpoint: "aaaaaaaaaaaa", Version: 1, Deleted: true})))
	f.Add([]byte(`N{"d":{"n":"a","s":"10.0.0.0/8","e":"aaaaaaaaaaaa","v":1,"m":"x","a":"10.0.0.1"},"s":""}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, n, err := DecodeNameMsg(b)
		if err != nil {
			return
		}
		if err := n.Validate(); err != nil {
			t.Fatalf("accepted an invalid record: %v", err)
		}
		_, again, err := DecodeNameMsg(EncodeNameMsg(s))
		if err != nil || !again.Equal(&n) || again.Version != n.Version {
			t.Fatalf("round trip changed %+v to %+v (%v)", n, again, err)
		}
	})
}

// FuzzMergeNames: whatever a push/pull state holds, merging its names
// keeps only records signed by their node, within the limits.
func FuzzMergeNames(f *testing.F) {
	n, id := sampleInfo(f)
	st := StateMsg{V: protocol, Infos: []Signed{Sign(id, PurposeInfo, n)}, Names: []Signed{Sign(id, PurposeName, sampleName())}}
	b, _ := json.Marshal(st)
	f.Add(b)
	f.Add([]byte(`{"v":2,"names":[{"d":null,"s":null}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := DecodeStateMsg(b)
		if err != nil {
			return
		}
		none := func(string) (crypto.NodeID, bool) { return crypto.NodeID{}, false }
		r := NewReplica("self")
		for _, si := range s.Infos {
			if info, err := DecodeInfo(si); err == nil {
				r.MergeInfo(info, si, none)
			}
		}
		now := time.Now()
		for _, ns := range s.Names {
			r.MergeName(ns, none, now)
		}
		r.PruneNames(now, time.Minute)
		counts := map[string]int{}
		for k, rec := range r.names {
			counts[k.node]++
			id, ok := r.IdentityOf(k.node, none)
			if !ok || !id.Verify(PurposeName, rec.s.Data, rec.s.Sig) || rec.n.Validate() != nil {
				t.Fatalf("kept a name record of %s not signed by it, or invalid", k.node)
			}
		}
		for node, c := range counts {
			if r.nameCount[node] != c {
				t.Fatalf("count of %s: %d, holds %d", node, r.nameCount[node], c)
			}
		}
	})
}
