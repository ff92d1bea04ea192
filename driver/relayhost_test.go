package driver

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/relay"
	"github.com/wgmesh/wgmesh/mesh"
)

func relayView(wishes map[string]map[string]mesh.RelayWant, attached ...string) *mesh.View {
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	v := &mesh.View{Self: "r", Members: map[string]mesh.Member{}, Entries: map[netip.Prefix][]mesh.NetworkEntry{}}
	for i, name := range []string{"r", "a", "b", "c", "d"} {
		v.Members[name] = mesh.Member{NodeInfo: mesh.NodeInfo{Name: name, PublicKey: crypto.PublicKey{byte(i + 1)}},
			State: mesh.Alive, Registered: true, PathMTU: 1400 - 10*i}
	}
	for _, name := range attached {
		v.Entries[subnet] = append(v.Entries[subnet], mesh.NetworkEntry{Node: name, Subnet: subnet, Port: 51820, Relay: wishes[name]})
	}
	return v
}

func TestRelayHostSessions(t *testing.T) {
	rh := newRelayHost()
	now := time.Unix(1000, 0)
	via := func(r string) mesh.RelayWant { return mesh.RelayWant{Via: r} }
	// a asks for b (one side of a pair suffices), c for a; c asks another
	// relay for d; b asks for d, which has not attached the network.
	v := relayView(map[string]map[string]mesh.RelayWant{
		"a": {"b": via("r")},
		"c": {"d": via("elsewhere"), "a": via("r")},
		"b": {"d": via("r")},
	}, "a", "b", "c")
	sessions, records := rh.update(v, now, 51900, 4, 64)
	if len(sessions) != 2 || len(records) != 2 {
		t.Fatalf("sessions %+v records %+v", sessions, records)
	}
	ports := map[string]uint16{}
	for _, r := range records {
		ports[r.A+"-"+r.B] = r.Port
		if r.Port < 51901 || r.Port > 51903 {
			t.Fatalf("port %d outside the session ports", r.Port)
		}
	}
	if ports["a-b"] == 0 || ports["a-c"] == 0 || ports["a-b"] == ports["a-c"] {
		t.Fatalf("ports %v", ports)
	}
	if r := records[0]; r.MTU != 1380 {
		t.Fatalf("session MTU %d, want the smaller of a's and b's", r.MTU)
	}
	if why := rh.refused[newRelayPair(netip.MustParsePrefix("10.60.0.0/16"), "b", "d")]; !strings.Contains(why, "does not have network") {
		t.Fatalf("b-d refused for %q", why)
	}
	// A pair keeps its port; a pair that stops asking keeps it for the
	// grace period, then loses it.
	v = relayView(map[string]map[string]mesh.RelayWant{"c": {"a": via("r")}}, "a", "b", "c")
	_, records = rh.update(v, now.Add(time.Minute), 51900, 4, 64)
	if len(records) != 2 {
		t.Fatalf("within the grace period: %+v", records)
	}
	_, records = rh.update(v, now.Add(relayGrace+2*time.Minute), 51900, 4, 64)
	if len(records) != 1 || records[0].A != "a" || records[0].B != "c" || records[0].Port != ports["a-c"] {
		t.Fatalf("after the grace period: %+v", records)
	}
	// A host that is gone is not relayed for.
	dead := relayView(map[string]map[string]mesh.RelayWant{"c": {"a": via("r")}}, "a", "b", "c")
	m := dead.Members["a"]
	m.State = mesh.Dead
	dead.Members["a"] = m
	if _, records = rh.update(dead, now.Add(relayGrace+3*time.Minute), 51900, 4, 64); len(records) != 0 {
		t.Fatalf("relaying for a dead host: %+v", records)
	}
}

func TestRelayHostLimits(t *testing.T) {
	rh := newRelayHost()
	via := mesh.RelayWant{Via: "r"}
	v := relayView(map[string]map[string]mesh.RelayWant{"a": {"b": via, "c": via, "d": via}}, "a", "b", "c", "d")
	// Two pairs of one host at most.
	if _, records := rh.update(v, time.Unix(1000, 0), 51900, 10, 2); len(records) != 2 {
		t.Fatalf("per-node limit: %+v", records)
	}
	// One port for sessions.
	rh = newRelayHost()
	if _, records := rh.update(v, time.Unix(1000, 0), 51900, 2, 64); len(records) != 1 {
		t.Fatalf("port limit: %+v", records)
	}
}

// TestRelayHostBindKeys: an end that sends binds (its node advertises it)
// gets its bind key in the session, derived from this host's WireGuard key
// and the end's; an old agent's end gets none, and is learned from its
// handshakes as before.
func TestRelayHostBindKeys(t *testing.T) {
	self, err := crypto.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	endKey, err := crypto.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	v := relayView(map[string]map[string]mesh.RelayWant{"a": {"b": {Via: "r"}}}, "a", "b")
	a := v.Members["a"]
	a.PublicKey, a.Features = endKey.Public(), mesh.FeatureRelayBind
	v.Members["a"] = a
	rh := newRelayHost()
	rh.key = self
	sessions, _ := rh.update(v, time.Unix(1000, 0), 51900, 4, 64)
	if len(sessions) != 1 {
		t.Fatalf("sessions %+v", sessions)
	}
	want, err := relay.BindKey(endKey, self.Public())
	if err != nil {
		t.Fatal(err)
	}
	if s := sessions[0]; s.KeyA != want || s.KeyB != ([32]byte{}) {
		t.Fatalf("bind keys: A %x (want the end's), B %x (want none: b sends no binds)", s.KeyA[:4], s.KeyB[:4])
	}
}
