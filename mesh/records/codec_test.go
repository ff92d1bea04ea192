package records

import (
	"bytes"
	"encoding/json"
	"errors"
	"maps"
	"net/netip"
	"strings"
	"testing"

	"github.com/wgmesh/wgmesh/crypto"
)

func testIdentity(t testing.TB, name string) crypto.Identity {
	t.Helper()
	seed := make([]byte, 32)
	copy(seed, name)
	id, err := crypto.IdentityFromSeed(seed)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func sampleInfo(t testing.TB) (NodeInfo, crypto.Identity) {
	id := testIdentity(t, "host-1")
	wg, _ := crypto.GeneratePrivateKey()
	return NodeInfo{Name: "host-1", ID: id.ID(), Version: 3<<32 | 1, PublicKey: wg.Public(), Addr: netip.MustParseAddr("192.0.2.10"),
		GossipPort: 7946, RaftPort: 7947, WGMode: "userspace", ClusterID: "0123456789abcdef"}, id
}

func TestMetaFitsMemberlistLimit(t *testing.T) {
	n, id := sampleInfo(t)
	n.Name = strings.Repeat("x", 64)
	n.Addr = netip.MustParseAddr("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")
	n.Version = 1<<62 - 1
	n.WGMode = strings.Repeat("m", maxModeLen)
	// Everything this node may publish at its largest (a cluster ID is
	// 16 hex digits).
	n.Features, n.NAT = FeatureHeader, NATConsistent
	n.Seen = netip.MustParseAddrPort("[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535")
	n.RelayPort, n.RelayPorts = 65000, 536
	if err := n.validate(); err != nil {
		t.Fatal(err)
	}
	if b := EncodeMeta(Sign(id, PurposeInfo, n)); len(b) > 512 {
		t.Fatalf("largest metadata is %d bytes, memberlist allows 512", len(b))
	}
}

func TestMetaSignature(t *testing.T) {
	n, id := sampleInfo(t)
	good := EncodeMeta(Sign(id, PurposeInfo, n))
	if got, _, err := DecodeMeta(good); err != nil || got != n {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	other := testIdentity(t, "host-2")
	if _, _, err := DecodeMeta(EncodeMeta(Sign(other, PurposeInfo, n))); !errors.Is(err, ErrInvalid) {
		t.Errorf("info signed by another identity: %v", err)
	}
	if _, _, err := DecodeMeta(EncodeMeta(Sign(id, PurposeEntry, n))); !errors.Is(err, ErrInvalid) {
		t.Errorf("info signed for another purpose: %v", err)
	}
	tampered := bytes.Replace(good, []byte("userspace"), []byte("kernel\\u0000\\u0000\\u0000"), 1)
	if _, _, err := DecodeMeta(tampered); err == nil {
		t.Error("tampered info accepted")
	}
	if _, _, err := DecodeMeta([]byte(`{"p":1,"d":{},"s":""}`)); err == nil || !strings.Contains(err.Error(), "protocol") {
		t.Errorf("old protocol: %v", err)
	}
}

func TestDecodeRejects(t *testing.T) {
	_, id := sampleInfo(t)
	entry := func(e NetworkEntry) []byte { return EncodeEntryMsg(Sign(id, PurposeEntry, e)) }
	good := NetworkEntry{Node: "host-1", Subnet: netip.MustParsePrefix("10.60.0.0/16"), Version: 1, Port: 51820}
	if _, err := DecodeMessage(entry(good)); err != nil {
		t.Fatalf("good entry: %v", err)
	}
	cases := map[string][]byte{
		"empty":         nil,
		"unknown kind":  []byte("Z{}"),
		"not json":      []byte("E{"),
		"no name":       entry(NetworkEntry{Subnet: good.Subnet, Version: 1}),
		"space in name": entry(NetworkEntry{Node: "a b", Subnet: good.Subnet, Version: 1}),
		"zero version":  entry(NetworkEntry{Node: "a", Subnet: good.Subnet}),
		"huge version":  entry(NetworkEntry{Node: "a", Subnet: good.Subnet, Version: 1<<62 + 1}),
		"host bits":     entry(NetworkEntry{Node: "a", Subnet: netip.MustParsePrefix("10.60.0.1/16"), Version: 1}),
		"endpoints":     entry(NetworkEntry{Node: "a", Subnet: good.Subnet, Version: 1, Endpoints: -1}),
		"too long":      append([]byte("E"), bytes.Repeat([]byte(" "), maxRecordBytes)...),
	}
	for name, b := range cases {
		if _, err := DecodeMessage(b); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: err = %v, want ErrInvalid", name, err)
		}
	}
}

// The fuzzers below check the decoders of everything peers send: no input
// may panic them, and whatever they accept must survive a round trip.

func FuzzDecodeMessage(f *testing.F) {
	_, id := sampleInfo(f)
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	f.Add(EncodeEntryMsg(Sign(id, PurposeEntry, NetworkEntry{Node: "host-1", Subnet: subnet, Version: 9, Port: 51821, Endpoints: 3,
		Seen: netip.MustParseAddrPort("198.51.100.7:40000"), Relay: map[string]RelayWant{"host-2": {Via: "host-3", Tries: 2}, "host-4": {Tries: 1}}})))
	f.Add([]byte(`E{"d":{"n":"a","s":"::/0","v":1},"s":""}`))
	f.Add(EncodeMsg(KindSession, Sign(id, PurposeSession, RelaySession{Relay: "host-1", Subnet: subnet, A: "a", B: "b", Version: 3, Port: 51901, MTU: 1400})))
	f.Add(EncodeMsg(KindObservation, Sign(id, PurposeObservation, Observation{Observer: "host-1", Subject: "host-2", Version: 4,
		Gossip: netip.MustParseAddrPort("203.0.113.5:7946"), WG: map[netip.Prefix]netip.AddrPort{subnet: netip.MustParseAddrPort("203.0.113.5:51820")}})))
	f.Add([]byte(`O{"d":{"o":"a","n":"b","v":1,"w":{"10.0.0.0/8":"1.2.3.4:0"}},"s":""}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		msg, err := DecodeMessage(b)
		if err != nil {
			return
		}
		again, err := DecodeMessage(EncodeMsg(msg.Kind, msg.Signed))
		if err != nil {
			t.Fatalf("round trip: %v", err)
		}
		switch msg.Kind {
		case KindEntry:
			e, err := DecodeEntry(msg.Signed)
			e2, _ := DecodeEntry(again.Signed)
			if err != nil || !e.Equal(e2) {
				t.Fatalf("entry round trip: %+v %v, then %+v", e, err, e2)
			}
		case KindSession:
			r, err := DecodeSession(msg.Signed)
			r2, _ := DecodeSession(again.Signed)
			if err != nil || r != r2 {
				t.Fatalf("session round trip: %+v %v, then %+v", r, err, r2)
			}
		case KindObservation:
			o, err := DecodeObservation(msg.Signed)
			o2, _ := DecodeObservation(again.Signed)
			if err != nil || o.Gossip != o2.Gossip || !maps.Equal(o.WG, o2.WG) || o.Observer != o2.Observer || o.Subject != o2.Subject {
				t.Fatalf("observation round trip: %+v %v, then %+v", o, err, o2)
			}
		default:
			t.Fatalf("accepted a message of kind %q", msg.Kind)
		}
	})
}

func FuzzDecodeMeta(f *testing.F) {
	n, id := sampleInfo(f)
	f.Add(EncodeMeta(Sign(id, PurposeInfo, n)))
	f.Add([]byte(`{"p":2,"d":{"n":"a"},"s":"AAAA"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		info, s, err := DecodeMeta(b)
		if err != nil {
			return
		}
		if !info.ID.Verify(PurposeInfo, s.Data, s.Sig) {
			t.Fatal("accepted info whose signature does not verify")
		}
		again, _, err := DecodeMeta(EncodeMeta(s))
		if err != nil || again != info {
			t.Fatalf("round trip: %+v %v", again, err)
		}
	})
}

func FuzzDecodeState(f *testing.F) {
	n, id := sampleInfo(f)
	st := StateMsg{V: protocol, Infos: []Signed{Sign(id, PurposeInfo, n)},
		Entries: []Signed{Sign(id, PurposeEntry, NetworkEntry{Node: "host-1", Subnet: netip.MustParsePrefix("10.60.0.0/16"), Version: 4})}}
	b, _ := json.Marshal(st)
	f.Add(b)
	f.Add([]byte(`{"v":2,"entries":[{"d":null,"s":null}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := DecodeStateMsg(b)
		if err != nil {
			return
		}
		// Merging whatever it holds must not panic, and must keep only
		// entries signed by their node.
		r := NewReplica("self")
		for _, si := range s.Infos {
			if info, err := DecodeInfo(si); err == nil {
				r.MergeInfo(info, si, func(string) (crypto.NodeID, bool) { return crypto.NodeID{}, false })
			}
		}
		for _, e := range s.Entries {
			r.MergeEntry(e, func(string) (crypto.NodeID, bool) { return crypto.NodeID{}, false })
		}
		for k, e := range r.entries {
			id, ok := r.IdentityOf(k.node, func(string) (crypto.NodeID, bool) { return crypto.NodeID{}, false })
			if !ok || !id.Verify(PurposeEntry, e.s.Data, e.s.Sig) {
				t.Fatalf("kept an entry of %s not signed by its identity", k.node)
			}
		}
	})
}
