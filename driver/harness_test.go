package driver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
	"go.uber.org/goleak"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/dataplane"
	"github.com/wgmesh/wgmesh/driver/dataplane/dataplanetest"
	"github.com/wgmesh/wgmesh/mesh"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// raft's NetworkTransport leaves goroutines reading pooled
		// connections until their peers close them.
		goleak.IgnoreTopFunction("github.com/hashicorp/raft.(*NetworkTransport).listen"),
		goleak.IgnoreAnyFunction("github.com/hashicorp/raft.(*NetworkTransport).handleConn"),
		// memberlist's Shutdown does not wait for a probe under way,
		// which ends by itself at its timeout.
		goleak.IgnoreAnyFunction("github.com/hashicorp/memberlist.(*Memberlist).probeNode"),
	)
}

// testNode is the mesh name of the harness's node. A fixed name makes the
// first block the node claims (chosen from a hash of the name) the same in
// every run, which keeps failures reproducible.
const testNode = "node-a"

// startMesh runs a real single-node mesh on loopback until the test ends.
// With no seeds the node is its own quorum, so block claims commit after
// one step of its loop, without waiting for anything.
func startMesh(tb testing.TB, pub crypto.PublicKey) *mesh.Mesh {
	tb.Helper()
	// Port 0 lets the kernel pick a free port; memberlist's transport
	// binds TCP and UDP to the same one, which a port picked by probing
	// could not guarantee.
	tr, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
		BindAddrs: []string{"127.0.0.1"},
		Logger:    log.New(io.Discard, "", 0),
	})
	if err != nil {
		tb.Fatalf("gossip transport: %v", err)
	}
	raftL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		_ = tr.Shutdown()
		tb.Fatalf("consensus listener: %v", err)
	}
	id, err := crypto.GenerateIdentity()
	if err != nil {
		tb.Fatal(err)
	}
	cfg := mesh.DefaultConfig()
	cfg.Name = testNode
	cfg.Identity = id
	cfg.BindAddr = "127.0.0.1"
	cfg.BindPort = tr.GetAutoBindPort()
	cfg.AdvertiseAddr = "127.0.0.1"
	cfg.PublicKey = pub
	cfg.WGMode = dataplane.ModeUserspace
	cfg.Memberlist = memberlist.DefaultLocalConfig()
	cfg.Transport = tr
	cfg.RaftListener = raftL
	cfg.StateDir = tb.TempDir()
	cfg.Consensus = mesh.ConsensusTiming{Raft: fastRaft(), StableWait: time.Millisecond, Tick: 20 * time.Millisecond}
	m, err := mesh.New(cfg)
	if err != nil {
		_ = tr.Shutdown()
		raftL.Close()
		tb.Fatalf("mesh: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("mesh stopped with %v", err)
		}
	})
	return m
}

// fastRaft elects a single node at once.
func fastRaft() *raft.Config {
	c := raft.DefaultConfig()
	c.HeartbeatTimeout = 50 * time.Millisecond
	c.ElectionTimeout = 50 * time.Millisecond
	c.LeaderLeaseTimeout = 50 * time.Millisecond
	c.CommitTimeout = 5 * time.Millisecond
	return c
}

// newTestDriver builds a driver over m and dp that keeps its state in dir.
func newTestDriver(tb testing.TB, m *mesh.Mesh, dp dataplane.DataPlane, key crypto.PrivateKey, dir string, logger *slog.Logger) *Driver {
	tb.Helper()
	cfg := DefaultConfig()
	cfg.Mesh = m
	cfg.DataPlane = dp
	cfg.StateDir = dir
	cfg.PrivateKey = key
	cfg.Logger = logger
	// Short enough that a hang fails the test instead of the test binary.
	cfg.RequestTimeout = 10 * time.Second
	cfg.ClaimTimeout = 5 * time.Second
	d, err := New(cfg)
	if err != nil {
		tb.Fatalf("driver: %v", err)
	}
	return d
}

// testLogger sends the driver's logs to t.Log, so they show only when a
// test fails.
func testLogger(tb testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{tb}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ tb testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.tb.Helper()
	w.tb.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// harness is one host: a real mesh, a fake data plane, and the driver
// served on a unix socket that the test talks to like Docker does.
type harness struct {
	t    *testing.T
	key  crypto.PrivateKey
	mesh *mesh.Mesh
	dir  string // state directory

	fake   *dataplanetest.Fake
	d      *Driver
	client *http.Client
	stop   func()
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	key, err := crypto.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, key: key, dir: t.TempDir()}
	h.mesh = startMesh(t, key.Public())
	h.start()
	return h
}

// start builds a driver from the state directory with a fresh fake data
// plane and serves it, as the agent does when it starts.
func (h *harness) start() {
	h.t.Helper()
	h.fake = dataplanetest.New()
	h.d = newTestDriver(h.t, h.mesh, h.fake, h.key, h.dir, testLogger(h.t))
	h.client, h.stop = serve(h.t, h.d)
}

// restart stops serving and starts a new driver on the same state
// directory and mesh: an agent restart. The caller decides whether to
// call Restore, as the agent does before it serves.
func (h *harness) restart() {
	h.t.Helper()
	h.stop()
	h.start()
}

// serve serves d's plugin handler on a unix socket, the way the agent
// does, and returns a client that dials it.
func serve(t *testing.T, d *Driver) (*http.Client, func()) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "p.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Handler().Serve(l) }()
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var dialer net.Dialer
		return dialer.DialContext(ctx, "unix", sock)
	}}
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	stop := sync.OnceFunc(func() {
		// Closing our idle connections ends the server's connection
		// goroutines; closing the listener ends Serve.
		tr.CloseIdleConnections()
		l.Close()
		<-done
	})
	t.Cleanup(stop)
	return client, stop
}

// post sends body to path like Docker's plugin client: POST, its Accept
// header, and JSON. A string or []byte body is sent as is, nil as an empty
// body (Docker's calls without arguments).
func (h *harness) post(path string, body any) (int, []byte) {
	h.t.Helper()
	status, b, err := h.do(path, body)
	if err != nil {
		h.t.Fatal(err)
	}
	return status, b
}

// do is post for goroutines other than the test's, which must not call
// t.Fatal.
func (h *harness) do(path string, body any) (int, []byte, error) {
	var r io.Reader
	switch b := body.(type) {
	case nil:
		r = http.NoBody
	case string:
		r = strings.NewReader(b)
	case []byte:
		r = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			return 0, nil, err
		}
		r = bytes.NewReader(j)
	}
	req, err := http.NewRequest(http.MethodPost, "http://plugin"+path, r)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Accept", "application/vnd.docker.plugins.v1.2+json")
	resp, err := h.client.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("POST %s: %w", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, fmt.Errorf("POST %s: reading answer: %w", path, err)
	}
	return resp.StatusCode, b, nil
}

// ok posts req and requires success: status 200 and no error field, which
// Docker would read as a failure even with 200. It decodes the answer
// into out, if not nil.
func (h *harness) ok(path string, req, out any) {
	h.t.Helper()
	status, body := h.post(path, req)
	if status != http.StatusOK {
		h.t.Fatalf("POST %s: status %d, want 200; answer %s", path, status, body)
	}
	var e map[string]any
	if err := json.Unmarshal(body, &e); err != nil {
		h.t.Fatalf("POST %s: answer %q is not a JSON object: %v", path, body, err)
	}
	for _, f := range []string{"Err", "Error"} {
		if s, _ := e[f].(string); s != "" {
			h.t.Fatalf("POST %s: status 200 with %s %q", path, f, s)
		}
	}
	if out != nil {
		if err := json.Unmarshal(body, out); err != nil {
			h.t.Fatalf("POST %s: decoding answer %s: %v", path, body, err)
		}
	}
}

// empty posts req to a call whose success answer has no payload: Docker
// expects exactly {} with status 200.
func (h *harness) empty(path string, req any) {
	h.t.Helper()
	status, body := h.post(path, req)
	if status != http.StatusOK || strings.TrimSpace(string(body)) != "{}" {
		h.t.Fatalf("POST %s: got %d %s, want 200 {}", path, status, bytes.TrimSpace(body))
	}
}

// fail posts req, requires a failure, and returns the error message.
func (h *harness) fail(path string, req any) (status int, msg string) {
	h.t.Helper()
	status, body := h.post(path, req)
	return status, checkErrorAnswer(h.t, path, status, body)
}

// checkErrorAnswer checks a failure answer: status 400 or 500 (never 404,
// which some callers take for "not implemented", hence success), and the
// message in the field the protocol reads. Docker's plugin client reads
// "Err" on every non-200 answer; IPAM's own field is "Error".
func checkErrorAnswer(tb testing.TB, path string, status int, body []byte) string {
	tb.Helper()
	if status != http.StatusBadRequest && status != http.StatusInternalServerError {
		tb.Fatalf("POST %s: status %d, want 400 or 500; answer %s", path, status, body)
	}
	return errorMessage(tb, path, body)
}

// errorMessage returns the message of an error answer, requiring it in
// the fields Docker reads.
func errorMessage(tb testing.TB, path string, body []byte) string {
	tb.Helper()
	var e struct {
		Err   string
		Error string
	}
	if err := json.Unmarshal(body, &e); err != nil {
		tb.Fatalf("POST %s: error answer %q is not JSON: %v", path, body, err)
	}
	if e.Err == "" {
		tb.Fatalf("POST %s: error answer %s has no Err", path, body)
	}
	if strings.HasPrefix(path, "/IpamDriver.") && e.Error != e.Err {
		tb.Fatalf("POST %s: IPAM error answer %s must carry the message in Error too", path, body)
	}
	return e.Err
}

// Paths of the calls, as Docker sends them.
const (
	pathActivate       = "/Plugin.Activate"
	pathNetCaps        = "/NetworkDriver.GetCapabilities"
	pathGwAllocCheck   = "/NetworkDriver.GwAllocCheck"
	pathCreateNetwork  = "/NetworkDriver.CreateNetwork"
	pathDeleteNetwork  = "/NetworkDriver.DeleteNetwork"
	pathCreateEndpoint = "/NetworkDriver.CreateEndpoint"
	pathDeleteEndpoint = "/NetworkDriver.DeleteEndpoint"
	pathOperInfo       = "/NetworkDriver.EndpointOperInfo"
	pathJoin           = "/NetworkDriver.Join"
	pathLeave          = "/NetworkDriver.Leave"
	pathIpamCaps       = "/IpamDriver.GetCapabilities"
	pathAddressSpaces  = "/IpamDriver.GetDefaultAddressSpaces"
	pathRequestPool    = "/IpamDriver.RequestPool"
	pathReleasePool    = "/IpamDriver.ReleasePool"
	pathRequestAddress = "/IpamDriver.RequestAddress"
	pathReleaseAddress = "/IpamDriver.ReleaseAddress"
)

// dockerID derives a Docker-style ID (64 hex digits) from a name, so that
// tests read as names and IDs stay stable across runs.
func dockerID(name string) string {
	s := sha256.Sum256([]byte(name))
	return hex.EncodeToString(s[:])
}

// poolReq is RequestPool as `docker network create --subnet subnet
// --ip-range subPool --ipam-opt ...` sends it.
func poolReq(subnet, subPool string, opts map[string]string) map[string]any {
	return map[string]any{"AddressSpace": AddressSpace, "Pool": subnet, "SubPool": subPool, "Options": opts, "V6": false}
}

// gatewayReq asks for the network's gateway; addr is --gateway or "".
func gatewayReq(poolID, addr string) map[string]any {
	return map[string]any{"PoolID": poolID, "Address": addr, "Options": map[string]string{optRequestAddressType: addressTypeGateway}}
}

// containerReq asks for a container's address: addr is --ip or "". Docker
// adds the MAC because wgmesh's IPAM declares RequiresMACAddress.
func containerReq(poolID, addr, mac string) map[string]any {
	return map[string]any{"PoolID": poolID, "Address": addr, "Options": map[string]string{optMACAddress: mac}}
}

// auxReq asks for an --aux-address: Docker sends no options at all.
func auxReq(poolID, addr string) map[string]any {
	return map[string]any{"PoolID": poolID, "Address": addr, "Options": nil}
}

func releaseReq(poolID string, addr netip.Addr) map[string]any {
	return map[string]any{"PoolID": poolID, "Address": addr.String()}
}

// createNetworkReq is CreateNetwork as Docker sends it for a network
// whose addresses came from wgmesh's IPAM.
func createNetworkReq(netID, subnet string, gw netip.Prefix, generic map[string]any) map[string]any {
	if generic == nil {
		generic = map[string]any{}
	}
	data := map[string]any{"AddressSpace": AddressSpace, "Pool": subnet}
	if gw.IsValid() {
		data["Gateway"] = gw.String()
	}
	return map[string]any{
		"NetworkID": netID,
		"Options":   map[string]any{dockerIPv6: false, dockerGeneric: generic},
		"IPv4Data":  []any{data},
		"IPv6Data":  []any{},
	}
}

func endpointReq(netID, epID string, addr netip.Prefix, mac string) map[string]any {
	return map[string]any{
		"NetworkID":  netID,
		"EndpointID": epID,
		"Interface":  map[string]any{"Address": addr.String(), "AddressIPv6": "", "MacAddress": mac},
		"Options": map[string]any{
			"com.docker.network.endpoint.exposedports": []any{},
			"com.docker.network.portmap":               []any{},
		},
	}
}

func joinReq(netID, epID string) map[string]any {
	return map[string]any{
		"NetworkID":  netID,
		"EndpointID": epID,
		"SandboxKey": "/var/run/docker/netns/" + epID[:12],
		"Options":    map[string]any{},
	}
}

func epReq(netID, epID string) map[string]any {
	return map[string]any{"NetworkID": netID, "EndpointID": epID}
}

func netReq(netID string) map[string]any { return map[string]any{"NetworkID": netID} }

func (h *harness) requestPool(req map[string]any) string {
	h.t.Helper()
	var resp ipam.RequestPoolResponse
	h.ok(pathRequestPool, req, &resp)
	if resp.PoolID == "" || resp.Pool != req["Pool"] {
		h.t.Fatalf("RequestPool %v answered %+v", req, resp)
	}
	return resp.PoolID
}

// requestAddress asks for an address and checks that the answer is a
// CIDR, as Docker requires.
func (h *harness) requestAddress(req map[string]any) netip.Prefix {
	h.t.Helper()
	var resp ipam.RequestAddressResponse
	h.ok(pathRequestAddress, req, &resp)
	p, err := netip.ParsePrefix(resp.Address)
	if err != nil {
		h.t.Fatalf("RequestAddress %v answered address %q, not a CIDR: %v", req, resp.Address, err)
	}
	return p
}

// testNet is a network created the way `docker network create` does it.
type testNet struct {
	id     string
	subnet netip.Prefix
	poolID string
	gw     netip.Prefix
}

// createNetwork runs `docker network create -d wgmesh --ipam-driver
// wgmesh --subnet subnet` with the given ipam options: RequestPool, the
// gateway, CreateNetwork.
func (h *harness) createNetwork(name, subnet string, ipamOpts map[string]string) testNet {
	h.t.Helper()
	n := testNet{id: dockerID(name), subnet: netip.MustParsePrefix(subnet)}
	n.poolID = h.requestPool(poolReq(subnet, "", ipamOpts))
	n.gw = h.requestAddress(gatewayReq(n.poolID, ""))
	h.empty(pathCreateNetwork, createNetworkReq(n.id, subnet, n.gw, nil))
	return n
}

// run runs a container on n: its address, endpoint and join. It returns
// the container's address.
func (h *harness) run(n testNet, epID, mac string) netip.Prefix {
	h.t.Helper()
	addr := h.requestAddress(containerReq(n.poolID, "", mac))
	h.ok(pathCreateEndpoint, endpointReq(n.id, epID, addr, mac), nil)
	h.ok(pathJoin, joinReq(n.id, epID), nil)
	return addr
}

// state reads the state file, as the next agent would.
func (h *harness) state() *State {
	h.t.Helper()
	s, err := loadState(filepath.Join(h.dir, "driver.json"))
	if err != nil {
		h.t.Fatal(err)
	}
	return s
}

// attachedPort is the WireGuard port this node announces for subnet; 0
// means the network is not attached here.
func attachedPort(m *mesh.Mesh, subnet netip.Prefix) uint16 {
	e, _ := m.View().Entry(subnet, m.Name())
	return e.Port
}

// setFailApply changes the fake's FailApply. The fake reads the map under
// its mutex; calling a locking method before and after the change orders
// it with every Apply in the race detector's eyes. (Requests travel over a
// socket, which the race detector does not count as synchronisation.)
// Only valid while nothing applies concurrently, i.e. without Run.
func (h *harness) setFailApply(netID string, err error) {
	h.fake.Config()
	if err == nil {
		delete(h.fake.FailApply, netID)
	} else {
		h.fake.FailApply[netID] = err
	}
	h.fake.Config()
}

// inAny reports whether some prefix of ps contains a.
func inAny(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// cmpNetip lets cmp compare the netip types, whose fields are unexported.
var cmpNetip = cmpopts.EquateComparable(netip.Addr{}, netip.Prefix{}, netip.AddrPort{})

func lastByte(a netip.Addr) byte { return a.As4()[3] }

func mustPrefix(t *testing.T, s string) netip.Prefix {
	t.Helper()
	p, err := netip.ParsePrefix(s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
