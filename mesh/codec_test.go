package mesh

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/netip"
	"testing"
)

func sampleEntry() NetworkEntry {
	return NetworkEntry{
		Node: "host-1", Subnet: pfx("10.60.0.0/16"), Version: 9, Port: 51821,
		Blocks:   []netip.Prefix{pfx("10.60.1.0/24")},
		Claims:   []Claim{{pfx("10.60.2.0/24"), 8}},
		Reserved: []netip.Addr{netip.MustParseAddr("10.60.0.2")},
	}
}

func sampleInfo() NodeInfo {
	return NodeInfo{Name: "host-1", Version: 3, PublicKey: testKey(1), Addr: netip.MustParseAddr("192.0.2.10"), GossipPort: 7946, WGMode: "userspace"}
}

func TestMetaFitsMemberlistLimit(t *testing.T) {
	n := sampleInfo()
	n.Name = string(bytes.Repeat([]byte("x"), maxNameLen))
	n.Addr = netip.MustParseAddr("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")
	if b := encodeMeta(n); len(b) > 512 {
		t.Fatalf("largest metadata is %d bytes, memberlist allows 512", len(b))
	}
}

func TestDecodeRejects(t *testing.T) {
	good := sampleEntry()
	mut := func(f func(e *NetworkEntry)) []byte {
		e := good.Clone()
		f(&e)
		return encodeNet(e)
	}
	cases := map[string][]byte{
		"empty":          nil,
		"unknown kind":   []byte("Z{}"),
		"not json":       []byte("N{"),
		"wrong type":     []byte(`N{"n":5}`),
		"no name":        mut(func(e *NetworkEntry) { e.Node = "" }),
		"space in name":  mut(func(e *NetworkEntry) { e.Node = "a b" }),
		"zero version":   mut(func(e *NetworkEntry) { e.Version = 0 }),
		"host bits":      []byte(`N{"n":"a","s":"10.60.0.1/16","v":1}`),
		"block outside":  mut(func(e *NetworkEntry) { e.Blocks = []netip.Prefix{pfx("10.61.0.0/24")} }),
		"block too big":  mut(func(e *NetworkEntry) { e.Blocks = []netip.Prefix{pfx("10.0.0.0/8")} }),
		"zero attempt":   mut(func(e *NetworkEntry) { e.Claims = []Claim{{pfx("10.60.2.0/24"), 0}} }),
		"reserved out":   mut(func(e *NetworkEntry) { e.Reserved = []netip.Addr{netip.MustParseAddr("10.99.0.1")} }),
		"vote noname":    encodeVote(vote{From: "a", Subnet: subnet, Promise: Promise{pfx("10.60.3.0/24"), "", 1}}),
		"vote nofrom":    encodeVote(vote{Subnet: subnet, Promise: Promise{pfx("10.60.3.0/24"), "b", 1}}),
		"vote outside":   encodeVote(vote{From: "a", Subnet: subnet, Promise: Promise{pfx("10.61.3.0/24"), "b", 1}}),
		"vote attempt":   encodeVote(vote{From: "a", Subnet: subnet, Promise: Promise{pfx("10.60.3.0/24"), "b", 0}}),
		"vote host bits": []byte(`V{"f":"a","s":"10.60.0.1/16","b":"10.60.3.0/24","t":"b","a":1}`),
		"forget noname":  []byte(`F{"n":"","v":1}`),
	}
	for name, b := range cases {
		if _, err := decodeMessage(b); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: err = %v, want ErrInvalid", name, err)
		}
	}
	if _, err := decodeMeta([]byte(`{"proto":2,"n":"a","v":1}`)); err == nil {
		t.Error("metadata of another protocol version accepted")
	}
	if _, err := decodeState([]byte(`{"v":1,"nodes":[{"n":"a","v":1}]}`)); err == nil {
		t.Error("state with a node without key accepted")
	}
}

// The fuzzers below check the decoders of everything peers send: no input
// may panic them, and whatever they accept must survive a round trip.

func FuzzDecodeMessage(f *testing.F) {
	f.Add(encodeNet(sampleEntry()))
	f.Add(encodeForget(Forget{Node: "host-2", Version: 7}))
	f.Add([]byte(`N{"n":"a","s":"::/0","v":1,"b":["::/0"]}`))
	f.Add(encodeVote(vote{From: "host-2", Subnet: subnet, Promise: Promise{pfx("10.60.3.0/24"), "host-1", 4}}))
	f.Add([]byte("F"))
	withSpec := sampleEntry()
	withSpec.Endpoints = 3
	withSpec.Spec = &NetworkSpec{Version: 4, Name: "app", IPRange: pfx("10.60.128.0/17"),
		Aux: map[string]netip.Addr{"r": netip.MustParseAddr("10.60.0.2")}, Options: map[string]string{"k": "v"}, Internal: true}
	f.Add(encodeNet(withSpec))
	f.Fuzz(func(t *testing.T, b []byte) {
		msg, err := decodeMessage(b)
		if err != nil {
			return
		}
		var again []byte
		switch {
		case msg.Net != nil:
			again = encodeNet(*msg.Net)
		case msg.Forget != nil:
			again = encodeForget(*msg.Forget)
		case msg.Vote != nil:
			again = encodeVote(*msg.Vote)
		default:
			t.Fatal("decoded message is empty")
		}
		msg2, err := decodeMessage(again)
		if err != nil {
			t.Fatalf("re-decoding %q: %v", again, err)
		}
		if a, b := mustJSON(msg), mustJSON(msg2); !bytes.Equal(a, b) {
			t.Fatalf("round trip changed the message:\n%s\n%s", a, b)
		}
		// Whatever decodes must merge without trouble.
		r := newReplica("observer")
		if msg.Net != nil {
			r.mergeNet(*msg.Net)
			_ = buildView(r, nil).Conflicts()
		}
	})
}

func FuzzDecodeMeta(f *testing.F) {
	f.Add(encodeMeta(sampleInfo()))
	f.Add([]byte(`{"proto":1,"n":"x","v":1,"k":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","a":"::1"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := decodeMeta(b)
		if err != nil {
			return
		}
		n2, err := decodeMeta(encodeMeta(n))
		if err != nil || n2 != n {
			t.Fatalf("round trip: %+v -> %+v, %v", n, n2, err)
		}
	})
}

func FuzzDecodeState(f *testing.F) {
	r := newReplica("a")
	r.mergeNode(sampleInfo())
	r.mergeNet(sampleEntry())
	r.mergeForget(Forget{Node: "gone", Version: 2})
	f.Add(encodeState(r.snapshot()))
	f.Add([]byte(`{"v":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := decodeState(b)
		if err != nil {
			return
		}
		s2, err := decodeState(encodeState(s))
		if err != nil {
			t.Fatalf("re-decoding: %v", err)
		}
		a, _ := json.Marshal(s)
		c, _ := json.Marshal(s2)
		if !bytes.Equal(a, c) {
			t.Fatalf("round trip changed the state")
		}
		rep := newReplica("observer")
		rep.mergeSnapshot(s)
		_ = buildView(rep, nil).Conflicts()
	})
}
