package driver

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
)

// TestStaticAddress: `docker run --ip` sends the address with the MAC.
func TestStaticAddress(t *testing.T) {
	h := newHarness(t)
	n := h.createNetwork("net static", "10.60.0.0/16", nil)
	if own := h.mesh.View().OwnBlocks(n.subnet); len(own) != 0 {
		t.Fatalf("creating a network claimed blocks %v", own)
	}
	h.requestAddress(containerReq(n.poolID, "", "02:42:0a:3c:00:09"))
	own := h.mesh.View().OwnBlocks(n.subnet)
	if len(own) != 1 {
		t.Fatalf("own blocks %v, want one", own)
	}
	// An address of our block that dynamic allocation has not reached.
	want := own[0].Addr().Next().Next().Next().Next().Next().Next().Next().Next().Next().Next()
	mac := "02:42:0a:3c:00:0a"

	got := h.requestAddress(containerReq(n.poolID, want.String(), mac))
	if got != netip.PrefixFrom(want, 16) {
		t.Fatalf("--ip %s answered %s", want, got)
	}
	if kind := h.state().Pools[n.poolID].Allocated[want]; kind != AllocEndpoint {
		t.Errorf("state has %s as %q", want, kind)
	}

	status, msg := h.fail(pathRequestAddress, containerReq(n.poolID, want.String(), "02:42:0a:3c:00:0b"))
	if status != http.StatusInternalServerError || !strings.Contains(msg, "already in use") {
		t.Errorf("same --ip twice: %d %q", status, msg)
	}

	for _, tc := range []struct{ name, addr, want string }{
		{"outside subnet", "10.61.0.5", "not in subnet"},
		{"network address", "10.60.0.0", "network or broadcast"},
		{"broadcast address", "10.60.255.255", "network or broadcast"},
		{"malformed", "10.60.1", "address"},
		{"IPv6", "fd00::5", "not in subnet"},
		{"IPv4-mapped IPv6", "::ffff:10.60.1.5", "not in subnet"},
		{"with zone", "10.60.1.5%eth0", "address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, msg := h.fail(pathRequestAddress, containerReq(n.poolID, tc.addr, mac))
			if status != http.StatusBadRequest || !strings.Contains(msg, tc.want) {
				t.Errorf("got %d %q, want 400 containing %q", status, msg, tc.want)
			}
		})
	}

	// An --ip outside our blocks makes this host claim the block that
	// holds it, as no other node owns it.
	far := netip.MustParseAddr("10.60.250.9")
	if own[0].Contains(far) {
		far = netip.MustParseAddr("10.60.7.9")
	}
	if got := h.requestAddress(containerReq(n.poolID, far.String(), mac)); got.Addr() != far {
		t.Fatalf("--ip %s answered %s", far, got)
	}
	if own := h.mesh.View().OwnBlocks(n.subnet); len(own) != 2 || !inAny(own, far) {
		t.Errorf("own blocks %v, want a second one holding %s", own, far)
	}

	// Released, the address can be requested again.
	h.empty(pathReleaseAddress, releaseReq(n.poolID, want))
	h.requestAddress(containerReq(n.poolID, want.String(), mac))
	// Docker sometimes releases with the mask it was given.
	h.empty(pathReleaseAddress, map[string]any{"PoolID": n.poolID, "Address": netip.PrefixFrom(want, 16).String()})
	if _, ok := h.state().Pools[n.poolID].Allocated[want]; ok {
		t.Error("release with a mask did not release")
	}
	if _, msg := h.fail(pathReleaseAddress, map[string]any{"PoolID": n.poolID, "Address": "nonsense"}); !strings.Contains(msg, "nonsense") {
		t.Errorf("bad release: %q", msg)
	}
}

// TestAuxAddress: --aux-address comes with no options at all. It is
// accepted anywhere in the subnet, needs no block, and is reserved in the
// whole cluster for as long as the network exists there.
func TestAuxAddress(t *testing.T) {
	h := newHarness(t)
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	netID := dockerID("net aux")
	poolID := h.requestPool(poolReq(subnet.String(), "", nil))
	gw := h.requestAddress(gatewayReq(poolID, ""))
	if gw.Addr() != netip.MustParseAddr("10.60.0.1") {
		t.Fatalf("gateway %s, want the subnet's first address", gw)
	}
	aux := gw.Addr().Next()
	if got := h.requestAddress(auxReq(poolID, aux.String())); got != netip.PrefixFrom(aux, 16) {
		t.Fatalf("aux %s answered %s", aux, got)
	}
	far := netip.MustParseAddr("10.60.250.250")
	h.requestAddress(auxReq(poolID, far.String()))
	if own := h.mesh.View().OwnBlocks(subnet); len(own) != 0 {
		t.Errorf("the gateway and aux addresses claimed blocks %v", own)
	}
	allocated := h.state().Pools[poolID].Allocated
	if allocated[aux] != AllocAux || allocated[far] != AllocAux || allocated[gw.Addr()] != AllocSharedGateway {
		t.Errorf("state allocations %v", allocated)
	}

	req := createNetworkReq(netID, subnet.String(), gw, nil)
	req["IPv4Data"].([]any)[0].(map[string]any)["AuxAddresses"] = map[string]any{
		"db": netip.PrefixFrom(aux, 16).String(), "far": netip.PrefixFrom(far, 16).String(),
	}
	h.empty(pathCreateNetwork, req)
	// Reserved for the whole cluster, so no host hands them out.
	if got := h.mesh.View().Reserved(subnet); !slices.Equal(got, sortedAddrs(gw.Addr(), aux, far)) {
		t.Errorf("cluster reserves %v, want %s, %s and %s", got, gw.Addr(), aux, far)
	}
	for range 3 {
		ctr := h.requestAddress(containerReq(poolID, "", "02:42:0a:3c:00:02"))
		if a := ctr.Addr(); a == aux || a == far || a == gw.Addr() {
			t.Errorf("dynamic address %s is reserved", ctr)
		}
	}
	if _, msg := h.fail(pathRequestAddress, containerReq(poolID, aux.String(), "02:42:0a:3c:00:03")); !strings.Contains(msg, "in use") {
		t.Errorf("--ip of an aux address: %q", msg)
	}

	// docker network rm releases this host's copy of the aux address;
	// the network still has it elsewhere, so it stays reserved.
	h.empty(pathReleaseAddress, releaseReq(poolID, aux))
	if _, ok := h.state().Pools[poolID].Allocated[aux]; ok {
		t.Error("aux address still allocated after release")
	}
	if got := h.mesh.View().Reserved(subnet); !slices.Contains(got, aux) {
		t.Errorf("cluster reserves %v after one host released %s", got, aux)
	}
	if _, msg := h.fail(pathRequestAddress, containerReq(poolID, aux.String(), "02:42:0a:3c:00:04")); !strings.Contains(msg, "reserved") {
		t.Errorf("--ip of a released aux address: %q", msg)
	}
}

func sortedAddrs(as ...netip.Addr) []netip.Addr {
	slices.SortFunc(as, netip.Addr.Compare)
	return as
}

// TestExplicitGateway: --gateway is the same address on every host,
// reserved mesh-wide rather than taken from a block. The subnet is a /28,
// a single block, so that every dynamic address is checked against it and
// the network fills up.
func TestExplicitGateway(t *testing.T) {
	h := newHarness(t)
	subnet := netip.MustParsePrefix("10.70.0.0/28")
	gwAddr := netip.MustParseAddr("10.70.0.1")
	netID := dockerID("net gateway")
	poolID := h.requestPool(poolReq(subnet.String(), "", nil))

	gw := h.requestAddress(gatewayReq(poolID, gwAddr.String()))
	if gw != netip.PrefixFrom(gwAddr, 28) {
		t.Fatalf("--gateway %s answered %s", gwAddr, gw)
	}
	if kind := h.state().Pools[poolID].Allocated[gwAddr]; kind != AllocSharedGateway {
		t.Errorf("state has the gateway as %q, want %q", kind, AllocSharedGateway)
	}
	if own := h.mesh.View().OwnBlocks(subnet); len(own) != 0 {
		t.Errorf("--gateway claimed blocks %v", own)
	}
	h.empty(pathCreateNetwork, createNetworkReq(netID, subnet.String(), gw, nil))
	if got := h.mesh.View().Reserved(subnet); !slices.Equal(got, []netip.Addr{gwAddr}) {
		t.Errorf("mesh reserves %v, want the gateway", got)
	}
	if n := h.state().Networks[netID]; n == nil || n.Gateway != gwAddr {
		t.Errorf("state network = %+v", n)
	}
	if _, msg := h.fail(pathRequestAddress, containerReq(poolID, gwAddr.String(), "02:42:0a:46:00:01")); !strings.Contains(msg, "in use") {
		t.Errorf("--ip of the gateway: %q", msg)
	}

	// .0 is the network, .15 the broadcast, .1 the gateway: 13 left.
	seen := map[netip.Addr]bool{}
	for i := range 13 {
		a := h.requestAddress(containerReq(poolID, "", "02:42:0a:46:00:02"))
		if a.Addr() == gwAddr || seen[a.Addr()] || !poolUsable(h.d, poolID, a.Addr()) {
			t.Fatalf("allocation %d: %s (gateway %s, taken %v)", i, a, gwAddr, seen)
		}
		seen[a.Addr()] = true
	}
	status, msg := h.fail(pathRequestAddress, containerReq(poolID, "", "02:42:0a:46:00:02"))
	if status != http.StatusInternalServerError || !strings.Contains(msg, "full") {
		t.Errorf("full network: %d %q", status, msg)
	}
}

// poolUsable reports whether a is a usable address of the pool.
func poolUsable(d *Driver, poolID string, a netip.Addr) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := d.state.Pools[poolID]
	return p != nil && p.usable(a)
}

// TestIPRange: dynamic addresses come from --ip-range only.
func TestIPRange(t *testing.T) {
	h := newHarness(t)
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	rng := netip.MustParsePrefix("10.60.128.0/20")
	poolID := h.requestPool(poolReq(subnet.String(), rng.String(), nil))
	if !strings.Contains(poolID, rng.String()) {
		t.Errorf("pool ID %q does not name the range", poolID)
	}
	gw := h.requestAddress(gatewayReq(poolID, ""))
	h.empty(pathCreateNetwork, createNetworkReq(dockerID("net range"), subnet.String(), gw, nil))
	var addrs []netip.Addr
	for range 20 {
		addrs = append(addrs, h.requestAddress(containerReq(poolID, "", "02:42:0a:3c:80:02")).Addr())
	}
	for _, a := range addrs {
		if !rng.Contains(a) {
			t.Errorf("address %s is outside --ip-range %s", a, rng)
		}
	}
	for _, b := range h.mesh.View().OwnBlocks(subnet) {
		if !rng.Contains(b.Addr()) || b.Bits() < rng.Bits() {
			t.Errorf("block %s is outside --ip-range %s", b, rng)
		}
	}
	// --ip may still pick any address of the subnet, as with Docker's IPAM.
	if got := h.requestAddress(containerReq(poolID, "10.60.3.3", "02:42:0a:3c:03:03")); got.Addr() != netip.MustParseAddr("10.60.3.3") {
		t.Errorf("--ip outside the range answered %s", got)
	}
}

// TestIPRangeSmallerThanBlock: a range smaller than a block becomes the
// block, so that no address outside it is handed out.
func TestIPRangeSmallerThanBlock(t *testing.T) {
	h := newHarness(t)
	rng := netip.MustParsePrefix("10.60.1.64/27")
	poolID := h.requestPool(poolReq("10.60.0.0/16", rng.String(), nil))
	for range 10 {
		if a := h.requestAddress(containerReq(poolID, "", "02:42:0a:3c:01:02")); !rng.Contains(a.Addr()) {
			t.Errorf("address %s is outside --ip-range %s", a, rng)
		}
	}
	if own := h.mesh.View().OwnBlocks(netip.MustParsePrefix("10.60.0.0/16")); !slices.Equal(own, []netip.Prefix{rng}) {
		t.Errorf("own blocks %v, want the range %s", own, rng)
	}
}

// TestStaticAddressNextToRange: an --ip outside a small --ip-range, but
// in the /24 that holds it, must work: no other node holds anything.
func TestStaticAddressNextToRange(t *testing.T) {
	h := newHarness(t)
	rng := netip.MustParsePrefix("10.60.1.64/27")
	poolID := h.requestPool(poolReq("10.60.0.0/16", rng.String(), nil))
	h.requestAddress(gatewayReq(poolID, ""))
	if got := h.requestAddress(containerReq(poolID, "10.60.1.200", "02:42:0a:3c:01:c8")); got.Addr() != netip.MustParseAddr("10.60.1.200") {
		t.Errorf("--ip answered %s", got)
	}
}

// TestBlockSize: --ipam-opt wgmesh.block-size sets the size of the blocks
// this host claims.
func TestBlockSize(t *testing.T) {
	h := newHarness(t)
	for _, tc := range []struct {
		subnet, opt string
		bits        int
	}{
		{"10.60.0.0/16", "26", 26},
		{"10.61.0.0/16", "/27", 27},
		{"10.62.0.0/16", " 20 ", 20},
		// The subnet itself is one block.
		{"10.63.0.0/24", "24", 24},
	} {
		t.Run(tc.subnet+"="+tc.opt, func(t *testing.T) {
			subnet := netip.MustParsePrefix(tc.subnet)
			poolID := h.requestPool(poolReq(tc.subnet, "", map[string]string{optBlockSize: tc.opt}))
			a := h.requestAddress(containerReq(poolID, "", "02:42:0a:3c:00:05"))
			own := h.mesh.View().OwnBlocks(subnet)
			if len(own) != 1 || own[0].Bits() != tc.bits || !own[0].Contains(a.Addr()) {
				t.Errorf("own blocks %v, want one /%d holding %s", own, tc.bits, a)
			}
			if got := h.state().Pools[poolID].Options.BlockBits; got != tc.bits {
				t.Errorf("state has block bits %d", got)
			}
		})
	}
}

// TestFullBlockClaimsAnother: when this host's blocks are full, the next
// address makes it claim another block.
func TestFullBlockClaimsAnother(t *testing.T) {
	h := newHarness(t)
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	poolID := h.requestPool(poolReq(subnet.String(), "", map[string]string{optBlockSize: "28"}))
	seen := map[netip.Addr]bool{}
	// A /28 holds 16 addresses, fewer if one ends in .0 or .255: 40
	// addresses need at least three blocks.
	for i := range 40 {
		a := h.requestAddress(containerReq(poolID, "", "02:42:0a:3c:00:02")).Addr()
		if seen[a] {
			t.Fatalf("address %s handed out twice", a)
		}
		if b := lastByte(a); b == 0 || b == 255 {
			t.Errorf("allocation %d: %s ends in .%d", i, a, b)
		}
		seen[a] = true
	}
	own := h.mesh.View().OwnBlocks(subnet)
	if len(own) < 3 {
		t.Errorf("own blocks %v, want at least 3 for 40 addresses", own)
	}
	for _, b := range own {
		if b.Bits() != 28 {
			t.Errorf("block %s is not a /28", b)
		}
	}
	for a := range seen {
		if !inAny(own, a) {
			t.Errorf("address %s is in none of the blocks %v", a, own)
		}
	}
	if got := len(h.state().Pools[poolID].Allocated); got != 40 {
		t.Errorf("state has %d allocations, want 40", got)
	}
}

// TestRequestPoolRefusals: every refusal says what to change.
func TestRequestPoolRefusals(t *testing.T) {
	h := newHarness(t)
	existing := h.requestPool(poolReq("10.60.0.0/16", "", nil))

	for _, tc := range []struct {
		name   string
		req    map[string]any
		status int
		want   string
	}{
		{"no subnet", poolReq("", "", nil), 400, "--subnet"},
		{"IPv6", map[string]any{"AddressSpace": AddressSpace, "Pool": "fd00::/64", "V6": true}, 400, "IPv4 only"},
		{"IPv6 subnet in the IPv4 pool", poolReq("fd00::/64", "", nil), 400, "IPv4 only"},
		{"bad subnet", poolReq("10.60.0.0/33", "", nil), 400, "subnet"},
		{"host bits", poolReq("10.64.0.1/16", "", nil), 400, "did you mean 10.64.0.0/16"},
		{"too small", poolReq("10.64.0.0/29", "", nil), 400, "too small"},
		{"too large", poolReq("10.0.0.0/7", "", nil), 400, "too large"},
		{"same subnet, other options", poolReq("10.60.0.0/16", "", map[string]string{optBlockSize: "26"}), 500, "overlaps"},
		{"same subnet, a range", poolReq("10.60.0.0/16", "10.60.1.0/24", nil), 500, "overlaps"},
		{"inside another", poolReq("10.60.5.0/24", "", nil), 500, "overlaps"},
		{"around another", poolReq("10.0.0.0/8", "", nil), 500, "overlaps"},
		{"range outside subnet", poolReq("10.64.0.0/16", "10.65.0.0/24", nil), 400, "not inside subnet"},
		{"range larger than subnet", poolReq("10.64.0.0/16", "10.64.0.0/15", nil), 400, "not inside subnet"},
		{"bad range", poolReq("10.64.0.0/16", "10.64.0.0", nil), 400, "ip-range"},
		{"block size not a number", poolReq("10.64.0.0/16", "", map[string]string{optBlockSize: "big"}), 400, optBlockSize},
		{"block size larger than subnet", poolReq("10.64.0.0/16", "", map[string]string{optBlockSize: "8"}), 400, optBlockSize},
		{"block size too small", poolReq("10.64.0.0/16", "", map[string]string{optBlockSize: "31"}), 400, optBlockSize},
		{"too many blocks", poolReq("10.0.0.0/8", "", map[string]string{optBlockSize: "28"}), 400, "65536"},
		{"unknown option", poolReq("10.64.0.0/16", "", map[string]string{"wgmesh.blocksize": "24"}), 400, "wgmesh.blocksize"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, msg := h.fail(pathRequestPool, tc.req)
			if status != tc.status || !strings.Contains(msg, tc.want) {
				t.Errorf("got %d %q, want %d containing %q", status, msg, tc.status, tc.want)
			}
		})
	}
	if s := h.state(); len(s.Pools) != 1 || s.Pools[existing] == nil {
		t.Errorf("refusals changed the pools: %v", s.Pools)
	}

	// Options of other IPAM drivers are ignored; the pool ID is stable,
	// since Docker stores it and sends it back.
	h.empty(pathReleasePool, map[string]any{"PoolID": existing})
	again := h.requestPool(poolReq("10.60.0.0/16", "", map[string]string{"com.example.opt": "x"}))
	if again != existing {
		t.Errorf("pool ID changed from %q to %q", existing, again)
	}
}

// TestIdenticalRequestPool: identical requests get the same pool, as the
// IPAM protocol asks, and it goes with the last release.
func TestIdenticalRequestPool(t *testing.T) {
	h := newHarness(t)
	a := h.requestPool(poolReq("10.60.0.0/16", "", nil))
	b := h.requestPool(poolReq("10.60.0.0/16", "", nil))
	if a != b {
		t.Fatalf("identical requests got %q and %q", a, b)
	}
	h.empty(pathReleasePool, map[string]any{"PoolID": a})
	if h.state().Pools[a] == nil {
		t.Fatal("the first release took the pool of both requests")
	}
	h.empty(pathReleasePool, map[string]any{"PoolID": a})
	if h.state().Pools[a] != nil {
		t.Fatal("the pool outlived its last release")
	}
}

// TestReleasePoolWithEndpoints: a pool whose network still has endpoints
// is not released, since its addresses are in use.
func TestReleasePoolWithEndpoints(t *testing.T) {
	h := newHarness(t)
	n := h.createNetwork("net busy", "10.60.0.0/16", nil)
	h.run(n, dockerID("ep busy"), "02:42:0a:3c:00:02")
	if _, msg := h.fail(pathReleasePool, map[string]any{"PoolID": n.poolID}); !strings.Contains(msg, "still has endpoints") {
		t.Errorf("error %q", msg)
	}
	if h.state().Pools[n.poolID] == nil || len(h.mesh.View().OwnBlocks(n.subnet)) == 0 {
		t.Error("pool or blocks released")
	}
}

// TestConcurrentRequestAddress: containers started together (docker
// compose up) get distinct addresses, and requests waiting for a block
// share its claim. 40 requests fit in the three /28 blocks a request may
// wait for before it gives up.
func TestConcurrentRequestAddress(t *testing.T) {
	h := newHarness(t)
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	poolID := h.requestPool(poolReq(subnet.String(), "", map[string]string{optBlockSize: "28"}))
	const n = 40
	addrs := make([]netip.Addr, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			status, body, err := h.do(pathRequestAddress, containerReq(poolID, "", fmt.Sprintf("02:42:0a:3c:01:%02x", i)))
			if err != nil {
				errs[i] = err
				return
			}
			var resp struct{ Address, Err string }
			if err := json.Unmarshal(body, &resp); err != nil || status != http.StatusOK {
				errs[i] = fmt.Errorf("status %d, answer %s", status, body)
				return
			}
			p, err := netip.ParsePrefix(resp.Address)
			addrs[i], errs[i] = p.Addr(), err
		})
	}
	wg.Wait()
	seen := map[netip.Addr]int{}
	for i, a := range addrs {
		if errs[i] != nil {
			t.Errorf("request %d: %v", i, errs[i])
			continue
		}
		if j, dup := seen[a]; dup {
			t.Errorf("requests %d and %d both got %s", j, i, a)
		}
		seen[a] = i
	}
	own := h.mesh.View().OwnBlocks(subnet)
	for a := range seen {
		if !inAny(own, a) {
			t.Errorf("%s is in none of the blocks %v", a, own)
		}
	}
	if got := len(h.state().Pools[poolID].Allocated); got != n {
		t.Errorf("state has %d allocations, want %d", got, n)
	}
}
