package driver

import (
	"github.com/wgmesh/wgmesh/mesh/catalog"
	"net/http"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestCreateNetworkRefusals: a CreateNetwork Docker must not get is
// refused with a message naming what to change, and leaves nothing half
// created, so that the user can fix the command and run it again.
func TestCreateNetworkRefusals(t *testing.T) {
	h := newHarness(t)
	const subnetStr = "10.60.0.0/16"
	subnet := netip.MustParsePrefix(subnetStr)
	netID := dockerID("net refused")
	poolID := h.requestPool(poolReq(subnetStr, "", nil))
	gw := h.requestAddress(gatewayReq(poolID, ""))

	withOptions := func(opts map[string]any) map[string]any {
		req := createNetworkReq(netID, subnetStr, gw, nil)
		for k, v := range opts {
			req["Options"].(map[string]any)[k] = v
		}
		return req
	}
	withGeneric := func(generic map[string]any) map[string]any {
		return createNetworkReq(netID, subnetStr, gw, generic)
	}
	withData := func(f func(data map[string]any)) map[string]any {
		req := createNetworkReq(netID, subnetStr, gw, nil)
		f(req["IPv4Data"].([]any)[0].(map[string]any))
		return req
	}
	with := func(k string, v any) map[string]any {
		req := createNetworkReq(netID, subnetStr, gw, nil)
		req[k] = v
		return req
	}

	for _, tc := range []struct {
		name   string
		req    map[string]any
		status int
		want   []string
	}{
		{"mtu not a number", withGeneric(map[string]any{optMTU: "abc"}), 400, []string{optMTU, "not a number"}},
		{"mtu too small", withGeneric(map[string]any{optMTU: "100"}), 400, []string{optMTU, "between 576 and 9000"}},
		{"mtu too large", withGeneric(map[string]any{optMTU: "99999"}), 400, []string{optMTU, "between 576 and 9000"}},
		{"mtu negative", withGeneric(map[string]any{optMTU: "-1420"}), 400, []string{optMTU}},
		{"mtu not a string", withGeneric(map[string]any{optMTU: 1400}), 400, []string{optMTU, "string"}},
		{"generic not an object", withOptions(map[string]any{dockerGeneric: "mtu=1400"}), 400, []string{dockerGeneric, "object"}},
		{"generic a list", withOptions(map[string]any{dockerGeneric: []any{optMTU}}), 400, []string{dockerGeneric, "object"}},
		{"ipv6", withOptions(map[string]any{dockerIPv6: true}), 400, []string{"IPv4 only", "--ipv6"}},
		{"ipv6 not a boolean", withOptions(map[string]any{dockerIPv6: "false"}), 400, []string{dockerIPv6, "boolean"}},
		// -o com.docker.network.enable_ipv6=true: 20.10 passes it on as
		// a driver option and enables no IPv6 itself.
		{"ipv6 driver option", withGeneric(map[string]any{dockerIPv6: "true"}), 400, []string{dockerIPv6 + "=true", "IPv4 only"}},
		{"ipv6 driver option not a boolean", withGeneric(map[string]any{dockerIPv6: "maybe"}), 400, []string{dockerIPv6, "not a boolean"}},
		{"ipv4 driver option", withGeneric(map[string]any{dockerIPv4: "false"}), 400, []string{dockerIPv4 + "=false", "IPv4 networks"}},
		{"internal not a boolean", withOptions(map[string]any{dockerInternal: "yes"}), 400, []string{dockerInternal, "boolean"}},
		{"unknown wgmesh option", withGeneric(map[string]any{"wgmesh.mtu": "1400"}), 400, []string{"unknown option wgmesh.mtu", optMTU}},
		{"unknown driver option", withGeneric(map[string]any{"com.docker.network.driver.overlay.vxlanid_list": "4097"}), 400, []string{"com.docker.network.driver.overlay.vxlanid_list"}},
		{"other IPAM driver", withData(func(d map[string]any) { d["AddressSpace"] = "LocalDefault" }), 400, []string{"--ipam-driver wgmesh", "LocalDefault"}},
		{"no IPv4 data", with("IPv4Data", []any{}), 400, []string{"IPv4 networks", "--ipv4=false"}},
		{"IPv4 disabled", withOptions(map[string]any{dockerIPv4: false}), 400, []string{dockerIPv4, "--ipv4=false"}},
		{"ipv4 not a boolean", withOptions(map[string]any{dockerIPv4: "no"}), 400, []string{dockerIPv4, "boolean"}},
		{"null IPv4 data", with("IPv4Data", []any{nil}), 400, []string{"exactly one IPv4 subnet"}},
		{"two IPv4 subnets", with("IPv4Data", []any{
			map[string]any{"AddressSpace": AddressSpace, "Pool": subnetStr},
			map[string]any{"AddressSpace": AddressSpace, "Pool": "10.61.0.0/16"},
		}), 400, []string{"exactly one IPv4 subnet"}},
		{"IPv6 data", with("IPv6Data", []any{map[string]any{"AddressSpace": AddressSpace, "Pool": "fd00::/64"}}), 400, []string{"IPv4 only"}},
		{"pool not from wgmesh", withData(func(d map[string]any) { d["Pool"] = "10.99.0.0/16" }), 400, []string{"10.99.0.0/16", "--ipam-driver wgmesh"}},
		{"bad pool", withData(func(d map[string]any) { d["Pool"] = "10.60.0.0" }), 400, []string{"pool"}},
		{"bad gateway", withData(func(d map[string]any) { d["Gateway"] = "gw" }), 400, []string{"gateway"}},
		{"bad network ID", with("NetworkID", "../../../etc"), 400, []string{"network ID"}},
		{"short network ID", with("NetworkID", "abc"), 400, []string{"network ID"}},
		// Passes parsing; the data plane refuses it, and it is rolled back.
		{"gateway outside subnet", withData(func(d map[string]any) { d["Gateway"] = "10.61.0.1/16" }), 400, []string{"gateway 10.61.0.1 is not inside 10.60.0.0/16"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, msg := h.fail(pathCreateNetwork, tc.req)
			if status != tc.status {
				t.Errorf("status %d, want %d (%q)", status, tc.status, msg)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q does not mention %q", msg, w)
				}
			}
			checkNoNetwork(t, h, subnet)
			// Nor does the cluster keep the network, which would fix
			// its gateway and block size for the next creation.
			if n := h.mesh.View().Network(subnet); n != nil {
				t.Errorf("the cluster has the refused network: %+v", n)
			}
		})
	}

	// Nothing in the way of the corrected command.
	h.empty(pathCreateNetwork, createNetworkReq(netID, subnetStr, gw, map[string]any{optMTU: "1400"}))
	if n := h.state().Networks[netID]; n == nil || n.MTU != 1400 || n.Port != 51820 {
		t.Errorf("network after the refusals = %+v", n)
	}
}

func TestParseNetworkOptions(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		opts    map[string]any
		want    NetworkOptions
		wantErr string
	}{
		{"none", nil, NetworkOptions{}, ""},
		{"docker defaults", map[string]any{dockerIPv6: false, dockerGeneric: map[string]any{}}, NetworkOptions{}, ""},
		{"null generic", map[string]any{dockerGeneric: nil}, NetworkOptions{}, ""},
		{"mtu", map[string]any{dockerGeneric: map[string]any{optMTU: "1400"}}, NetworkOptions{MTU: 1400}, ""},
		{"mtu bounds", map[string]any{dockerGeneric: map[string]any{optMTU: "576"}}, NetworkOptions{MTU: 576}, ""},
		{"mtu upper bound", map[string]any{dockerGeneric: map[string]any{optMTU: "9000"}}, NetworkOptions{MTU: 9000}, ""},
		{"internal", map[string]any{dockerInternal: true}, NetworkOptions{Internal: true}, ""},
		{"ip versions as driver options", map[string]any{dockerGeneric: map[string]any{dockerIPv6: "false", dockerIPv4: "true"}}, NetworkOptions{}, ""},
		{"foreign options", map[string]any{"com.example": 5, dockerGeneric: map[string]any{"com.example.x": "y"}}, NetworkOptions{}, ""},
		{"mtu below", map[string]any{dockerGeneric: map[string]any{optMTU: "575"}}, NetworkOptions{}, "575"},
		{"mtu above", map[string]any{dockerGeneric: map[string]any{optMTU: "9001"}}, NetworkOptions{}, "9001"},
		{"mtu float", map[string]any{dockerGeneric: map[string]any{optMTU: "1400.5"}}, NetworkOptions{}, "not a number"},
		{"mtu huge", map[string]any{dockerGeneric: map[string]any{optMTU: "99999999999999999999999"}}, NetworkOptions{}, "not a number"},
		{"generic value not a string", map[string]any{dockerGeneric: map[string]any{"com.example.x": true}}, NetworkOptions{}, "com.example.x"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseNetworkOptions(tc.opts)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one mentioning %q", err, tc.wantErr)
				}
				if KindOf(err) != KindInvalidParameter {
					t.Errorf("error kind %v, want invalid parameter", KindOf(err))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseSubnet(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in      string
		wantErr string
	}{
		{"10.60.0.0/16", ""},
		{"10.0.0.0/8", ""},
		{"192.168.7.16/28", ""},
		{"", "--subnet"},
		{"10.60.0.0", "subnet"},
		{"10.60.0.1/16", "did you mean 10.60.0.0/16"},
		{"10.60.0.0/29", "too small"},
		{"10.0.0.0/7", "too large"},
		{"fd00::/64", "IPv4 only"},
		{"::ffff:10.60.0.0/112", "IPv4 only"},
		{" 10.60.0.0/16", "subnet"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			p, err := parseSubnet(tc.in)
			if tc.wantErr == "" {
				if err != nil || p.String() != tc.in {
					t.Errorf("got %v, %v", p, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %v, want one mentioning %q", err, tc.wantErr)
			}
		})
	}
}

func TestDefaultBlockBits(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		subnet string
		want   int
	}{
		{"10.0.0.0/8", 24},
		{"10.60.0.0/16", 24},
		{"10.60.0.0/20", 24},
		{"10.60.0.0/22", 26},
		{"10.60.0.0/24", 28},
		{"10.60.0.0/28", 28},
	} {
		if got := catalog.DefaultBlockBits(netip.MustParsePrefix(tc.subnet)); got != tc.want {
			t.Errorf("DefaultBlockBits(%s) = %d, want %d", tc.subnet, got, tc.want)
		}
	}
}

// TestErrorKinds: the kind decides the status Docker sees (400 for
// invalid parameters, else 500); wrapping must keep it.
func TestErrorKinds(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		err  error
		kind Kind
	}{
		{invalidParam("x"), KindInvalidParameter},
		{notFound("x"), KindNotFound},
		{forbidden("x"), KindForbidden},
		{&Error{KindSystem, http.ErrHandlerTimeout}, KindSystem},
	} {
		if got := KindOf(tc.err); got != tc.kind {
			t.Errorf("KindOf(%v) = %v, want %v", tc.err, got, tc.kind)
		}
		if got := KindOf(wrap(tc.err)); got != tc.kind {
			t.Errorf("KindOf(wrapped %v) = %v, want %v", tc.err, got, tc.kind)
		}
	}
	if KindOf(http.ErrHandlerTimeout) != KindSystem {
		t.Error("plain errors must be system errors")
	}
}

type wrapped struct{ err error }

func (w wrapped) Error() string { return "wrapped: " + w.err.Error() }
func (w wrapped) Unwrap() error { return w.err }

func wrap(err error) error { return wrapped{err} }
