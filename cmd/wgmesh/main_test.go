package main

import (
	"bytes"
	"context"
	"flag"
	"io"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/driver/dns"
	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/mesh/consensus"
)

func parse(t *testing.T, args []string, env map[string]string) (*agentFlags, error) {
	t.Helper()
	for k, v := range env {
		t.Setenv(k, v)
	}
	var f agentFlags
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	f.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return nil, err
	}
	return &f, f.validate()
}

func TestFlagsFromEnvironment(t *testing.T) {
	f, err := parse(t, []string{"--node-name", "from-flag", "--join", "a,b", "--join", "c"}, map[string]string{
		"WGMESH_NODE_NAME":        "from-env",
		"WGMESH_CLUSTER_KEY_FILE": "/etc/wgmesh/cluster.key",
		"WGMESH_WG_PORT":          "52000",
		"WGMESH_SYNC_NETWORKS":    "false",
		// A managed plugin lists every variable; empty ones mean default.
		"WGMESH_GOSSIP_PORT": "",
	})
	if err != nil {
		t.Fatal(err)
	}
	if f.nodeName != "from-flag" {
		t.Errorf("node name %q: the command line must win over the environment", f.nodeName)
	}
	if f.clusterKeyFile != "/etc/wgmesh/cluster.key" || f.wgPort != 52000 || f.syncNetworks || f.gossipPort != 7946 {
		t.Errorf("from the environment: %+v", f)
	}
	if strings.Join(f.join, " ") != "a b c" {
		t.Errorf("join %v", f.join)
	}
	if f.controlSocket != filepath.Join(f.runDir, "control.sock") {
		t.Errorf("control socket %q", f.controlSocket)
	}
}

func TestFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{nil, nil, "gossip must be encrypted"},
		{[]string{"--insecure", "--cluster-key-file", "/k"}, nil, "contradict"},
		{[]string{"--insecure", "--state-dir", "relative"}, nil, "absolute path"},
		{[]string{"--insecure", "--wg-port", "70000"}, nil, "out of range"},
		{[]string{"--insecure", "--mtu", "100"}, nil, "--mtu 100"},
		{[]string{"--insecure", "--wg-key-rotation", "5s"}, nil, "at least 1m"},
		{[]string{"--insecure", "--dns-addr", "127.0.0.53"}, nil, "not loopback"},
		{[]string{"--insecure", "--dns-addr", "fd00::53"}, nil, "IPv4"},
		{[]string{"--insecure", "--dns-upstream", "169.254.53.53"}, nil, "the DNS server itself"},
		{[]string{"--insecure", "--dns-upstream", "resolver.example"}, nil, "not an address"},
		{[]string{"--insecure", "--dns-addr", "off", "--dns-upstream", "192.0.2.1"}, nil, "needs the DNS server"},
		{[]string{"--insecure", "--relay-ports", "51900"}, nil, "FIRST-LAST"},
		{[]string{"--insecure", "--relay-ports", "51999-51900"}, nil, "FIRST-LAST"},
		{[]string{"--insecure", "--punch-timeout", "10ms"}, nil, "at least 1s"},
		// The environment stays set for the cases after: last.
		{[]string{"--insecure"}, map[string]string{"WGMESH_RELAY_PORTS": "0-10"}, "FIRST-LAST"},
		{[]string{"--insecure"}, map[string]string{"WGMESH_WG_PORT": "many"}, "WGMESH_WG_PORT"},
	} {
		_, err := parse(t, tc.args, tc.env)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v %v: err %v, want %q", tc.args, tc.env, err, tc.want)
		}
	}
}

func TestRunExitCodes(t *testing.T) {
	var out, errb bytes.Buffer
	ctx := context.Background()
	if code := run(ctx, []string{"version"}, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "wgmesh ") {
		t.Errorf("version: %d %q", code, out.String())
	}
	if code := run(ctx, []string{"frobnicate"}, &out, &errb); code != 2 {
		t.Errorf("unknown command: exit %d", code)
	}
	if code := run(ctx, nil, &out, &errb); code != 2 {
		t.Errorf("no command: exit %d", code)
	}
	errb.Reset()
	sock := filepath.Join(t.TempDir(), "none.sock")
	if code := run(ctx, []string{"status", "--control-socket", sock}, &out, &errb); code != 1 || !strings.Contains(errb.String(), "is it running?") {
		t.Errorf("status without an agent: exit %d, %q", code, errb.String())
	}
	if code := run(ctx, []string{"forget"}, &out, &errb); code != 2 {
		t.Errorf("forget without a node: exit %d", code)
	}
	out.Reset()
	if code := run(ctx, []string{"keygen"}, &out, &errb); code != 0 {
		t.Fatalf("keygen: exit %d", code)
	}
	if _, err := crypto.ParseClusterKey(out.String()); err != nil {
		t.Errorf("keygen printed no usable key: %v", err)
	}
}

func TestPrintStatus(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	st := &driver.Status{
		Node: driver.NodeStatus{Name: "h1", Addr: netip.MustParseAddr("192.0.2.1"), WGMode: "userspace"},
		Consensus: consensus.Status{ClusterID: "c0ffee", State: "leader", Leader: "h1", AppliedIndex: 42,
			Servers: []consensus.ServerStatus{{Name: "h1", Voter: true}, {Name: "h2"}}},
		Members: []driver.MemberStatus{
			{Name: "h1", Addr: netip.MustParseAddr("192.0.2.1"), State: mesh.Alive, Self: true},
			{Name: "h2", Addr: netip.MustParseAddr("192.0.2.2"), State: mesh.Dead, Since: now.Add(-90 * time.Second)},
			{Name: "h3", Addr: netip.MustParseAddr("10.0.0.3"), State: mesh.Alive, NAT: mesh.NATConsistent,
				Public: netip.MustParseAddrPort("198.51.100.3:7946"), PathMTU: 1280},
			{Name: "h4", Addr: netip.MustParseAddr("192.0.2.4"), State: mesh.Alive, NAT: mesh.NATNone, PathMTU: 1400, Relay: true},
		},
		Networks: []driver.NetworkStatus{{
			Subnet: netip.MustParsePrefix("10.60.0.0/16"), Interface: "wgm0123", Port: 51820, MTU: 1340,
			Blocks: []netip.Prefix{netip.MustParsePrefix("10.60.1.0/24")},
			Peers: []driver.PeerStatus{{Node: "h3", State: mesh.Alive, Path: "direct", Endpoint: netip.MustParseAddrPort("198.51.100.3:51820"),
				PathMTU: 1280, RouteMTU: 1216, AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.60.2.0/24")}, LastHandshake: now.Add(-12 * time.Second),
				RxBytes: 2048, TxBytes: 3 << 20}, {Node: "h5", State: mesh.Alive, Path: "relayed", Via: "h4", Endpoint: netip.MustParseAddrPort("192.0.2.4:51907"),
				PathMTU: 1400, AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.60.5.0/24")}}},
		}},
		Relay: []driver.RelayStatus{{Network: netip.MustParsePrefix("10.60.0.0/16"), A: "h5", B: "h6", Port: 51903,
			AddrA: netip.MustParseAddrPort("198.51.100.5:1234"), BytesAB: 4096, BytesBA: 1024}},
		Problems: []string{"node h2 (192.0.2.2) failed"},
		DNS: &dns.Status{Addr: netip.MustParseAddrPort("169.254.53.53:53"), Docker: &dns.DaemonDNS{Servers: []string{"169.254.53.53"}},
			Notes: []string{"while the agent is down or restarting, containers here resolve no outside names"}},
	}
	var b bytes.Buffer
	printStatus(&b, st, now)
	for _, want := range []string{
		"node h1 at 192.0.2.1, userspace WireGuard",
		"cluster c0ffee: this node leader, leader h1, voters h1, 2 servers, applied index 42",
		"h2    192.0.2.2  dead   1m30s",
		"network 10.60.0.0/16  link wgm0123  port 51820  mtu 1340  gateway -  blocks 10.60.1.0/24",
		"h3    direct          198.51.100.3:51820  1280 (inner 1216)  10.60.2.0/24  alive  12s ago    2.0KiB  3.0MiB",
		"h5    relayed via h4  192.0.2.4:51907     1400               10.60.5.0/24  alive  never",
		"h3    10.0.0.3   alive  -      -    consistent 198.51.100.3:7946  1280",
		"h4    192.0.2.4  alive  -      -    none, relays",
		"10.60.0.0/16  h5 – h6  51903  198.51.100.5:1234, -  4.0KiB, 1.0KiB  0",
		"PROBLEMS:", "! node h2 (192.0.2.2) failed",
		"dns 169.254.53.53: 0 names here", "\n  note: while the agent is down or restarting, containers here resolve no outside names\n",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, b.String())
		}
	}
}
