package driver

import (
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestHandshake checks the calls Docker makes when it activates the
// plugin: if any answer is off, Docker registers neither driver and only
// logs why.
func TestHandshake(t *testing.T) {
	h := newHarness(t)
	tests := []struct {
		path string
		want string
	}{
		// One plugin, both drivers: users write -d wgmesh --ipam-driver wgmesh.
		{pathActivate, `{"Implements":["NetworkDriver","IpamDriver"]}`},
		// Local data scope: no Swarm or cluster store; global connectivity:
		// containers on every host reach each other.
		// GwAllocChecker: newer engines ask whether to allocate a gateway.
		{pathNetCaps, `{"Scope":"local","ConnectivityScope":"global","GwAllocChecker":true}`},
		{pathGwAllocCheck, `{"SkipIPv4":false,"SkipIPv6":true}`},
		// The MAC tells --ip (comes with it) from --aux-address (no options).
		{pathIpamCaps, `{"RequiresMACAddress":true}`},
		{pathAddressSpaces, `{"LocalDefaultAddressSpace":"wgmesh","GlobalDefaultAddressSpace":"wgmesh-global"}`},
	}
	for _, tc := range tests {
		t.Run(tc.path, func(t *testing.T) {
			// Docker sends these calls with an empty body.
			status, body := h.post(tc.path, nil)
			if status != http.StatusOK {
				t.Fatalf("status %d, answer %s", status, body)
			}
			var got, want any
			if err := json.Unmarshal(body, &got); err != nil {
				t.Fatalf("answer %q: %v", body, err)
			}
			if err := json.Unmarshal([]byte(tc.want), &want); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("answer (-want +got):\n%s", diff)
			}
		})
	}
}

func TestUnknownPathAndMethod(t *testing.T) {
	h := newHarness(t)

	status, _ := h.post("/NetworkDriver.NoSuchCall", "{}")
	if status != http.StatusNotFound {
		t.Errorf("unknown call: status %d, want 404 (Docker's sign for an unimplemented call)", status)
	}

	for _, path := range []string{pathCreateNetwork, pathRequestPool} {
		resp, err := h.client.Get("http://plugin" + path)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("GET %s: status %d, want 405", path, resp.StatusCode)
			continue
		}
		if msg := errorMessage(t, path, b); !strings.Contains(msg, "POST") {
			t.Errorf("GET %s: error %q does not say to use POST", path, msg)
		}
	}
}

// TestCallsAreComplete pins the set of calls: a call missing here would
// answer 404, which Docker takes as success for some calls.
func TestCallsAreComplete(t *testing.T) {
	t.Parallel()
	var d Driver
	var got []string
	for _, c := range d.calls() {
		got = append(got, c.path)
		wantProto := protoNetwork
		if strings.HasPrefix(c.path, "/IpamDriver.") {
			wantProto = protoIPAM
		}
		if c.proto != wantProto {
			t.Errorf("%s encodes errors for the wrong protocol", c.path)
		}
	}
	want := []string{
		"/IpamDriver.GetCapabilities", "/IpamDriver.GetDefaultAddressSpaces", "/IpamDriver.ReleaseAddress",
		"/IpamDriver.ReleasePool", "/IpamDriver.RequestAddress", "/IpamDriver.RequestPool",
		"/NetworkDriver.AllocateNetwork", "/NetworkDriver.CreateEndpoint", "/NetworkDriver.CreateNetwork",
		"/NetworkDriver.DeleteEndpoint", "/NetworkDriver.DeleteNetwork", "/NetworkDriver.DiscoverDelete",
		"/NetworkDriver.DiscoverNew", "/NetworkDriver.EndpointOperInfo", "/NetworkDriver.FreeNetwork",
		"/NetworkDriver.GetCapabilities", "/NetworkDriver.GwAllocCheck", "/NetworkDriver.Join", "/NetworkDriver.Leave",
		"/NetworkDriver.ProgramExternalConnectivity", "/NetworkDriver.RevokeExternalConnectivity",
	}
	slices.Sort(got)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("calls (-want +got):\n%s", diff)
	}
}

// noArgCalls are sent by Docker without a body; they ignore it.
var noArgCalls = map[string]bool{
	pathNetCaps: true, pathIpamCaps: true, pathAddressSpaces: true, pathGwAllocCheck: true,
}

// TestBadBodies sends malformed requests to every call: each must answer
// an error in its protocol's field, never panic or succeed by accident.
func TestBadBodies(t *testing.T) {
	h := newHarness(t)
	calls := h.d.calls()
	if len(calls) != 21 {
		t.Fatalf("%d calls, want 21", len(calls))
	}
	malformed := []struct{ name, body string }{
		{"truncated", "{"},
		{"array", "[]"},
		{"string", `"CreateNetwork"`},
		{"number", "5"},
		{"trailing garbage", "{} {}"},
		{"not JSON", "NetworkID=abc"},
		// Every request type has at least one of these fields, with
		// another type.
		{"wrong types", `{"NetworkID":5,"EndpointID":[],"PoolID":5,"Pool":5,"DiscoveryType":"x"}`},
		{"wrong nested types", `{"NetworkID":{"x":1},"EndpointID":{},"PoolID":[1],"Pool":{},"DiscoveryType":[],"Options":"x","Interface":5,"IPv4Data":{}}`},
	}
	for _, c := range calls {
		for _, tc := range malformed {
			t.Run(c.path+"/"+tc.name, func(t *testing.T) {
				status, body := h.post(c.path, tc.body)
				if noArgCalls[c.path] {
					if status != http.StatusOK {
						t.Errorf("status %d (%s); a call without arguments must ignore the body", status, body)
					}
					return
				}
				if status != http.StatusBadRequest {
					t.Errorf("status %d, want 400; answer %s", status, body)
				}
				if msg := checkErrorAnswer(t, c.path, status, body); !strings.Contains(msg, "malformed") {
					t.Errorf("error %q does not say the request is malformed", msg)
				}
			})
		}
	}
}

// TestNullBodies sends JSON null, which decodes to a zero request: calls
// that need an ID refuse it, cleanups of nothing succeed.
func TestNullBodies(t *testing.T) {
	h := newHarness(t)
	want := map[string]int{
		"/NetworkDriver.GetCapabilities":             200,
		"/NetworkDriver.GwAllocCheck":                200,
		"/NetworkDriver.CreateNetwork":               400, // no network ID
		"/NetworkDriver.DeleteNetwork":               200, // nothing to delete
		"/NetworkDriver.AllocateNetwork":             200,
		"/NetworkDriver.FreeNetwork":                 200,
		"/NetworkDriver.CreateEndpoint":              400, // no endpoint ID
		"/NetworkDriver.DeleteEndpoint":              200,
		"/NetworkDriver.EndpointOperInfo":            200,
		"/NetworkDriver.Join":                        500, // no such endpoint
		"/NetworkDriver.Leave":                       200,
		"/NetworkDriver.DiscoverNew":                 200,
		"/NetworkDriver.DiscoverDelete":              200,
		"/NetworkDriver.ProgramExternalConnectivity": 200,
		"/NetworkDriver.RevokeExternalConnectivity":  200,
		"/IpamDriver.GetCapabilities":                200,
		"/IpamDriver.GetDefaultAddressSpaces":        200,
		"/IpamDriver.RequestPool":                    400, // no --subnet
		"/IpamDriver.ReleasePool":                    200,
		"/IpamDriver.RequestAddress":                 500, // no such pool
		"/IpamDriver.ReleaseAddress":                 400, // no address
	}
	for _, c := range h.d.calls() {
		t.Run(c.path, func(t *testing.T) {
			w, ok := want[c.path]
			if !ok {
				t.Fatalf("no expectation for %s", c.path)
			}
			status, body := h.post(c.path, "null")
			if status != w {
				t.Fatalf("status %d, want %d; answer %s", status, w, body)
			}
			if status != http.StatusOK {
				checkErrorAnswer(t, c.path, status, body)
				return
			}
			if !json.Valid(body) {
				t.Errorf("answer %q is not JSON", body)
			}
		})
	}
	if s := h.state(); len(s.Pools)+len(s.Networks)+len(s.Endpoints) != 0 {
		t.Errorf("null requests changed the state: %+v", s)
	}
}

// TestHugeBody: a body over the limit is refused on every call, even the
// ones that ignore their body, before any of it is parsed.
func TestHugeBody(t *testing.T) {
	h := newHarness(t)
	huge := `{"NetworkID":"` + strings.Repeat("a", maxRequestBytes) + `"}`
	for _, c := range h.d.calls() {
		t.Run(c.path, func(t *testing.T) {
			status, body := h.post(c.path, huge)
			if status != http.StatusBadRequest {
				t.Fatalf("status %d, want 400; answer %.200s", status, body)
			}
			checkErrorAnswer(t, c.path, status, body)
		})
	}
}

// TestUnknownIDs: calls about things this host does not have. Creating in
// them fails; cleaning them up succeeds, since Docker retries cleanups and
// replays them after crashes.
func TestUnknownIDs(t *testing.T) {
	h := newHarness(t)
	n := h.createNetwork("net known", "10.60.0.0/16", nil)
	epID := dockerID("ep known")
	h.run(n, epID, "02:42:0a:3c:00:02")

	unknownNet, unknownEP := dockerID("net unknown"), dockerID("ep unknown")
	addr := netip.MustParsePrefix("10.60.1.2/16")

	t.Run("refused", func(t *testing.T) {
		for _, tc := range []struct {
			name, path string
			req        any
			want       string
		}{
			{"endpoint in unknown network", pathCreateEndpoint, endpointReq(unknownNet, unknownEP, addr, "02:42:0a:3c:01:02"), "not a wgmesh network"},
			{"join unknown endpoint", pathJoin, joinReq(n.id, unknownEP), "does not exist"},
			{"join in unknown network", pathJoin, joinReq(unknownNet, unknownEP), "does not exist"},
			// The endpoint exists, but in another network than Docker says.
			{"join in wrong network", pathJoin, joinReq(unknownNet, epID), "does not exist"},
			{"address from unknown pool", pathRequestAddress, containerReq("wgmesh:10.99.0.0/16", "", "02:42:0a:3c:01:02"), "no wgmesh address pool"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				_, msg := h.fail(tc.path, tc.req)
				if !strings.Contains(msg, tc.want) {
					t.Errorf("error %q does not contain %q", msg, tc.want)
				}
			})
		}
	})

	t.Run("idempotent", func(t *testing.T) {
		for _, tc := range []struct {
			name, path string
			req        any
		}{
			{"delete unknown network", pathDeleteNetwork, netReq(unknownNet)},
			{"delete unknown endpoint", pathDeleteEndpoint, epReq(n.id, unknownEP)},
			{"leave unknown endpoint", pathLeave, epReq(unknownNet, unknownEP)},
			{"release unknown pool", pathReleasePool, map[string]any{"PoolID": "wgmesh:10.99.0.0/16"}},
			{"release address of unknown pool", pathReleaseAddress, releaseReq("wgmesh:10.99.0.0/16", netip.MustParseAddr("10.99.0.5"))},
			{"release unallocated address", pathReleaseAddress, releaseReq(n.poolID, netip.MustParseAddr("10.60.77.7"))},
		} {
			t.Run(tc.name, func(t *testing.T) { h.empty(tc.path, tc.req) })
		}
		// Docker requires EndpointOperInfo to succeed for any endpoint.
		var info struct{ Value map[string]any }
		h.ok(pathOperInfo, epReq(unknownNet, unknownEP), &info)
		if info.Value == nil || len(info.Value) != 0 {
			t.Errorf("info of unknown endpoint: %v, want an empty object", info.Value)
		}
	})

	// The known network and endpoint are untouched.
	s := h.state()
	if s.Networks[n.id] == nil || s.Endpoints[epID] == nil || !s.Endpoints[epID].Joined {
		t.Errorf("state lost the known network or endpoint: %+v", s)
	}
	if got := len(h.fake.Config().Networks); got != 1 {
		t.Errorf("data plane has %d networks, want 1", got)
	}
}

// TestListenReplacesStaleSocket: a socket left by a crashed agent is
// replaced; a live one is not taken over.
func TestListenReplacesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	stale, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	stale.(*net.UnixListener).SetUnlinkOnClose(false)
	stale.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("stale socket not left behind: %v", err)
	}

	l, err := Listen(path)
	if err != nil {
		t.Fatalf("listening over a stale socket: %v", err)
	}
	defer l.Close()
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v (%v), want 0660", fi.Mode().Perm(), err)
	}

	if l2, err := Listen(path); err == nil {
		l2.Close()
		t.Fatal("took over a socket another agent serves")
	} else if !strings.Contains(err.Error(), "in use") {
		t.Errorf("error %q does not say the socket is in use", err)
	}
}
