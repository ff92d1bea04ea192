package driver

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"
	"github.com/docker/go-plugins-helpers/network"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/dataplane/dataplanetest"
	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// fuzzHost is a host with a network, a joined endpoint and a pool, saved
// as a state file, so that fuzzed requests reach the code past the
// lookups. Each iteration starts a driver from that file, so iterations
// do not depend on each other.
type fuzzHost struct {
	mesh  *mesh.Mesh
	key   crypto.PrivateKey
	dir   string
	base  []byte // the state file
	netID string
	epID  string
	pool  string
	addr  netip.Prefix
}

func newFuzzHost(f *testing.F) *fuzzHost {
	key, err := crypto.GeneratePrivateKey()
	if err != nil {
		f.Fatal(err)
	}
	fh := &fuzzHost{key: key, dir: fuzzStateDir(f), netID: dockerID("net fuzz"), epID: dockerID("ep fuzz")}
	fh.mesh = startMesh(f, key.Public())
	d := newTestDriver(f, fh.mesh, dataplanetest.New(), key, fh.dir, slog.New(slog.DiscardHandler))
	ctx := context.Background()
	pool, err := d.RequestPool(ctx, &ipam.RequestPoolRequest{AddressSpace: AddressSpace, Pool: "10.60.0.0/16"})
	if err != nil {
		f.Fatal(err)
	}
	fh.pool = pool.PoolID
	gw, err := d.RequestAddress(ctx, &ipam.RequestAddressRequest{PoolID: fh.pool, Options: map[string]string{optRequestAddressType: addressTypeGateway}})
	if err != nil {
		f.Fatal(err)
	}
	err = d.CreateNetwork(ctx, &network.CreateNetworkRequest{NetworkID: fh.netID, IPv4Data: []*network.IPAMData{{AddressSpace: AddressSpace, Pool: "10.60.0.0/16", Gateway: gw.Address}}})
	if err != nil {
		f.Fatal(err)
	}
	a, err := d.RequestAddress(ctx, &ipam.RequestAddressRequest{PoolID: fh.pool, Options: map[string]string{optMACAddress: "02:42:0a:3c:00:02"}})
	if err != nil {
		f.Fatal(err)
	}
	fh.addr = netip.MustParsePrefix(a.Address)
	if _, err := d.CreateEndpoint(ctx, &network.CreateEndpointRequest{NetworkID: fh.netID, EndpointID: fh.epID, Interface: &network.EndpointInterface{Address: a.Address, MacAddress: "02:42:0a:3c:00:02"}}); err != nil {
		f.Fatal(err)
	}
	if _, err := d.Join(ctx, &network.JoinRequest{NetworkID: fh.netID, EndpointID: fh.epID}); err != nil {
		f.Fatal(err)
	}
	if fh.base, err = os.ReadFile(filepath.Join(fh.dir, "driver.json")); err != nil {
		f.Fatal(err)
	}
	return fh
}

// fuzzStateDir is where fuzzed drivers keep their state: in memory where
// the system has a tmpfs, since every change of state is an fsync'ed
// write, which on a disk makes iterations several times slower.
func fuzzStateDir(f *testing.F) string {
	dir, err := os.MkdirTemp("/dev/shm", "wgmesh-fuzz-")
	if err != nil {
		return f.TempDir()
	}
	f.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// driver starts a driver from the base state, as an agent restart would.
func (fh *fuzzHost) driver(t *testing.T) *Driver {
	if err := os.WriteFile(filepath.Join(fh.dir, "driver.json"), fh.base, 0o600); err != nil {
		t.Fatal(err)
	}
	d := newTestDriver(t, fh.mesh, dataplanetest.New(), fh.key, fh.dir, slog.New(slog.DiscardHandler))
	// A lone node is its own quorum: nothing waits long, and a claim
	// that times out is a finding, not a slow input.
	d.cfg.RequestTimeout, d.cfg.ClaimTimeout = 5*time.Second, fuzzClaimTimeout
	if err := d.Restore(context.Background()); err != nil {
		t.Fatal(err)
	}
	return d
}

// seedBodies are valid Docker requests about the fuzz host's objects and
// a few malformed ones, for every call.
func (fh *fuzzHost) seedBodies() [][]byte {
	gw := netip.MustParsePrefix("10.60.0.1/16")
	reqs := []any{
		poolReq("10.61.0.0/16", "10.61.8.0/24", map[string]string{optBlockSize: "26"}),
		poolReq("10.60.0.0/16", "", nil),
		map[string]any{"PoolID": fh.pool},
		gatewayReq(fh.pool, ""),
		gatewayReq(fh.pool, "10.60.0.1"),
		containerReq(fh.pool, "", "02:42:0a:3c:00:09"),
		containerReq(fh.pool, "10.60.9.9", "02:42:0a:3c:00:09"),
		auxReq(fh.pool, "10.60.3.3"),
		releaseReq(fh.pool, fh.addr.Addr()),
		createNetworkReq(fh.netID, "10.60.0.0/16", gw, map[string]any{optMTU: "1400"}),
		createNetworkReq(dockerID("net other"), "10.60.0.0/16", gw, nil),
		netReq(fh.netID),
		endpointReq(fh.netID, dockerID("ep other"), netip.MustParsePrefix("10.60.9.9/16"), ""),
		endpointReq(fh.netID, fh.epID, fh.addr, "02:42:0a:3c:00:02"),
		joinReq(fh.netID, fh.epID),
		epReq(fh.netID, fh.epID),
		map[string]any{"DiscoveryType": 1, "DiscoveryData": map[string]any{"Address": "10.0.0.1", "Self": true}},
	}
	var out [][]byte
	for _, r := range reqs {
		b, _ := json.Marshal(r)
		out = append(out, b)
	}
	for _, s := range []string{"", "{}", "null", "{", "[]", `{"NetworkID":5}`, `{"PoolID":"` + fh.pool + `","Address":"10.60.0.0"}`} {
		out = append(out, []byte(s))
	}
	return out
}

const fuzzClaimTimeout = 3 * time.Second

// FuzzPluginRequest sends arbitrary bodies to every call of the real
// handler: it must never panic, and must always answer JSON that Docker
// reads correctly: an error in the protocol's field, or a success
// without one.
func FuzzPluginRequest(f *testing.F) {
	fh := newFuzzHost(f)
	var d0 Driver
	n := len(d0.calls())
	for i := range n {
		for _, b := range fh.seedBodies() {
			f.Add(uint8(i), b)
		}
	}
	f.Fuzz(func(t *testing.T, idx uint8, body []byte) {
		d := fh.driver(t)
		c := d.calls()[int(idx)%n]
		rec := httptest.NewRecorder()
		start := time.Now()
		d.serve(c)(rec, httptest.NewRequest(http.MethodPost, c.path, bytes.NewReader(body)))
		if took := time.Since(start); took >= fuzzClaimTimeout {
			t.Errorf("%s took %v on a lone node", c.path, took)
		}

		res := rec.Result()
		b, _ := io.ReadAll(res.Body)
		if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/vnd.docker.plugins.") {
			t.Errorf("%s: content type %q", c.path, ct)
		}
		if !json.Valid(b) {
			t.Fatalf("%s: answer %q is not JSON", c.path, b)
		}
		if res.StatusCode != http.StatusOK {
			checkErrorAnswer(t, c.path, res.StatusCode, b)
			return
		}
		var e struct{ Err, Error string }
		if json.Unmarshal(b, &e) == nil && (e.Err != "" || e.Error != "") {
			t.Fatalf("%s: status 200 with an error %s", c.path, b)
		}
		// Docker needs a CIDR back, in the pool's subnet.
		if c.path == pathRequestAddress {
			var a ipam.RequestAddressResponse
			_ = json.Unmarshal(b, &a)
			p, err := netip.ParsePrefix(a.Address)
			if err != nil || !netip.MustParsePrefix("10.60.0.0/16").Contains(p.Addr()) || p.Bits() != 16 {
				t.Fatalf("RequestAddress %s answered %q", body, a.Address)
			}
		}
	})
}

// FuzzNetworkOptions: CreateNetwork's options come from users' -o flags.
// Parsing never panics, errors are the user's, and what parses survives
// the round trips it makes: through the state file, and back into the
// options Docker would send for it.
func FuzzNetworkOptions(f *testing.F) {
	for _, s := range []string{
		`{}`,
		`null`,
		`{"com.docker.network.enable_ipv6":false,"com.docker.network.generic":{}}`,
		`{"com.docker.network.enable_ipv6":true}`,
		`{"com.docker.network.internal":true,"com.docker.network.generic":{"com.docker.network.driver.mtu":"1400"}}`,
		`{"com.docker.network.generic":{"com.docker.network.driver.mtu":" 9000 "}}`,
		`{"com.docker.network.generic":{"com.docker.network.driver.mtu":"abc"}}`,
		`{"com.docker.network.generic":{"com.docker.network.driver.mtu":1400}}`,
		`{"com.docker.network.generic":{"wgmesh.x":"1"}}`,
		`{"com.docker.network.generic":"x"}`,
		`{"com.docker.network.generic":null}`,
		`{"com.docker.network.internal":"yes"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var opts map[string]any
		if json.Unmarshal(b, &opts) != nil {
			return
		}
		o, err := parseNetworkOptions(opts)
		if err != nil {
			if KindOf(err) != KindInvalidParameter || err.Error() == "" {
				t.Fatalf("error %v of kind %v, want an invalid-parameter error", err, KindOf(err))
			}
			return
		}
		if o.MTU != 0 && (o.MTU < 576 || o.MTU > 9000) {
			t.Fatalf("MTU %d accepted", o.MTU)
		}
		j, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		var back NetworkOptions
		if err := json.Unmarshal(j, &back); err != nil || back != o {
			t.Fatalf("state round trip: %+v -> %s -> %+v (%v)", o, j, back, err)
		}
		generic := map[string]any{}
		if o.MTU != 0 {
			generic[optMTU] = strconv.Itoa(o.MTU)
		}
		again, err := parseNetworkOptions(map[string]any{dockerInternal: o.Internal, dockerGeneric: generic})
		if err != nil || again != o {
			t.Fatalf("reparsing %+v gave %+v, %v", o, again, err)
		}
	})
}

// FuzzPoolOptions: --ipam-opt values never panic the parser, and an
// accepted block size is one the mesh can claim.
func FuzzPoolOptions(f *testing.F) {
	for _, s := range []struct{ subnet, opts string }{
		{"10.60.0.0/16", `{}`},
		{"10.60.0.0/16", `null`},
		{"10.60.0.0/16", `{"wgmesh.block-size":"26"}`},
		{"10.60.0.0/16", `{"wgmesh.block-size":"/24"}`},
		{"10.60.0.0/16", `{"wgmesh.block-size":" 30 "}`},
		{"10.0.0.0/8", `{"wgmesh.block-size":"28"}`},
		{"10.60.0.0/28", `{"wgmesh.block-size":"28"}`},
		{"10.60.0.0/16", `{"wgmesh.block-size":"-1"}`},
		{"10.60.0.0/16", `{"wgmesh.block-size":"x"}`},
		{"10.60.0.0/16", `{"wgmesh.other":"1","com.example":"2"}`},
	} {
		f.Add(s.subnet, []byte(s.opts))
	}
	f.Fuzz(func(t *testing.T, s string, b []byte) {
		subnet, err := parseSubnet(s)
		if err != nil {
			return
		}
		var opts map[string]string
		if json.Unmarshal(b, &opts) != nil {
			return
		}
		o, err := parsePoolOptions(opts, subnet)
		if err != nil {
			if KindOf(err) != KindInvalidParameter {
				t.Fatalf("error %v of kind %v", err, KindOf(err))
			}
			return
		}
		c := &catalog.Command{Op: catalog.OpEnsureNetwork, Node: "n", BootID: "b", Seq: 1,
			Network: &catalog.EnsureNetwork{Subnet: subnet, BlockBits: o.BlockBits}}
		if err := c.Validate(); err != nil {
			t.Fatalf("options %v on %s give blocks the cluster refuses: %v", opts, subnet, err)
		}
		j, _ := json.Marshal(o)
		var back PoolOptions
		if err := json.Unmarshal(j, &back); err != nil || back != o {
			t.Fatalf("state round trip: %+v -> %s -> %+v", o, j, back)
		}
		if o.BlockBits != 0 {
			again, err := parsePoolOptions(map[string]string{optBlockSize: strconv.Itoa(o.BlockBits)}, subnet)
			if err != nil || again != o {
				t.Fatalf("reparsing %+v gave %+v, %v", o, again, err)
			}
		}
	})
}

// FuzzParseSubnet: --subnet never panics the parser, and an accepted
// subnet is one the mesh and the pool arithmetic handle.
func FuzzParseSubnet(f *testing.F) {
	for _, s := range []string{
		"10.60.0.0/16", "10.0.0.0/8", "192.168.1.0/28", "", "10.60.0.1/16", "10.60.0.0/29", "10.0.0.0/7",
		"fd00::/64", "::ffff:10.0.0.0/104", "10.60.0.0", "10.60.0.0/16 ", "0.0.0.0/8", "255.255.255.240/28",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := parseSubnet(s)
		if err != nil {
			if KindOf(err) != KindInvalidParameter || err.Error() == "" {
				t.Fatalf("error %v of kind %v", err, KindOf(err))
			}
			return
		}
		if !p.Addr().Is4() || p.Masked() != p || p.Bits() < 8 || p.Bits() > 28 {
			t.Fatalf("%q accepted as %s", s, p)
		}
		if again, err := parseSubnet(p.String()); err != nil || again != p {
			t.Fatalf("%s does not round-trip: %v, %v", p, again, err)
		}
		if err := mesh.ValidSubnet(p); err != nil {
			t.Fatalf("the mesh refuses %s: %v", p, err)
		}
		c := &catalog.Command{Op: catalog.OpEnsureNetwork, Node: "n", BootID: "b", Seq: 1,
			Network: &catalog.EnsureNetwork{Subnet: p, BlockBits: catalog.DefaultBlockBits(p)}}
		if err := c.Validate(); err != nil {
			t.Fatalf("default blocks of %s: %v", p, err)
		}
		pool := &Pool{Subnet: p}
		last := lastAddr(p)
		if !p.Contains(last) || last.Next().IsValid() && p.Contains(last.Next()) || pool.usable(last) || pool.usable(p.Addr()) {
			t.Fatalf("%s: broadcast %s", p, last)
		}
		if !pool.usable(p.Addr().Next()) {
			t.Fatalf("%s: first host address unusable", p)
		}
	})
}
