// Package driver is everything host-local: the libnetwork NetworkDriver
// and IpamDriver that Docker calls (one socket, both protocols), the
// host's state, and the one reconcile loop that turns that state and the
// mesh's view into the data plane.
//
// Plugin handlers change state and apply the data plane for the network
// they touch before they answer, so Docker sees errors; gossip changes
// only kick the loop. Handlers never wait for the cluster, except to claim
// an address block or to create a network, which the cluster decides.
package driver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver/dataplane"
	"github.com/wgmesh/wgmesh/driver/dns"
	"github.com/wgmesh/wgmesh/mesh"
)

// Config configures a Driver.
type Config struct {
	Mesh      *mesh.Mesh
	DataPlane dataplane.DataPlane
	// StateDir holds the driver's state file.
	StateDir string
	// PrivateKey is this node's WireGuard key.
	PrivateKey crypto.PrivateKey
	// PortBase is the first WireGuard port; each network on this host
	// takes the next free one.
	PortBase uint16
	// DefaultMTU is used for networks without -o ...mtu; it is derived
	// from the underlay by the caller.
	DefaultMTU int
	// Keepalive is WireGuard's persistent keepalive, which keeps NAT
	// mappings open between hosts in different clouds.
	Keepalive time.Duration
	// RequestTimeout bounds one plugin call; ClaimTimeout bounds waiting
	// for a quorum to grant an address block.
	RequestTimeout time.Duration
	ClaimTimeout   time.Duration
	// ResyncInterval is how often the loop re-applies everything, which
	// repairs drift nobody told us about.
	ResyncInterval time.Duration
	// Docker is the local engine's API: network sync (RunSync) uses it
	// when SyncNetworks is set, and the loop asks it whether the
	// container of an endpoint that lost its veth pair still runs. nil
	// turns both off. DriverName is this plugin's name in that engine.
	Docker       DockerAPI
	SyncNetworks bool
	DriverName   string
	// PunchTimeout bounds a direct attempt to reach a peer (through NAT
	// or not): without a handshake by then, the pair is relayed
	// (paths.go). DirectRetry is the least time a relayed pair waits
	// before trying direct again; it doubles with each failure.
	PunchTimeout time.Duration
	DirectRetry  time.Duration
	// Relay forwards the sessions this host relays for others, on UDP
	// ports RelayPort+1 to RelayPort+RelayPorts-1 (relayhost.go); nil,
	// or RelayPorts 0, relays nothing. RelayPerNode caps the pairs one
	// host may have relayed here.
	Relay        RelayServer
	RelayPort    uint16
	RelayPorts   uint16
	RelayPerNode int
	Logger       *slog.Logger

	// DNS reports the DNS service for status; nil when it is off.
	DNS func() *dns.Status
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		PortBase:       51820,
		DefaultMTU:     1420,
		Keepalive:      25 * time.Second,
		RequestTimeout: 60 * time.Second,
		ClaimTimeout:   20 * time.Second,
		ResyncInterval: 30 * time.Second,
		SyncNetworks:   true,
		DriverName:     "wgmesh",
		PunchTimeout:   8 * time.Second,
		DirectRetry:    time.Minute,
		RelayPerNode:   64,
	}
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	switch {
	case c.Mesh == nil:
		return errors.New("driver: no mesh")
	case c.DataPlane == nil:
		return errors.New("driver: no data plane")
	case c.StateDir == "":
		return errors.New("driver: no state directory")
	case c.PrivateKey.IsZero():
		return errors.New("driver: no WireGuard private key")
	case c.PortBase == 0:
		return errors.New("driver: WireGuard port base must not be 0")
	case c.DefaultMTU < dataplane.MinMTU || c.DefaultMTU > dataplane.MaxMTU:
		return fmt.Errorf("driver: default MTU %d outside %d..%d", c.DefaultMTU, dataplane.MinMTU, dataplane.MaxMTU)
	case c.RequestTimeout <= 0 || c.ClaimTimeout <= 0 || c.ResyncInterval <= 0 || c.PunchTimeout <= 0 || c.DirectRetry <= 0:
		return errors.New("driver: timeouts must be positive")
	case c.RelayPorts != 0 && (c.RelayPort == 0 || c.RelayPorts < 2 || c.RelayPerNode < 1):
		return errors.New("driver: relay ports need a first port, at least two ports, and a positive limit per node")
	}
	return nil
}

// Driver serves Docker's network and IPAM calls for this host.
type Driver struct {
	cfg       Config
	log       *slog.Logger
	statePath string
	kick      chan struct{}
	claims    singleflight.Group

	// mu guards state and serialises every data-plane change.
	mu    sync.Mutex
	state *State
	key   crypto.PrivateKey
	// stagger decides when this node may start handshakes with new peers;
	// restored is set once the peers found at start are marked known.
	stagger  *stagger
	restored bool
	// paths are the paths to peers (paths.go); relayHost what this host
	// relays for others (relayhost.go).
	paths     *paths
	relayHost *relayHost
	binder    *relayBinder
	recheck   *time.Timer
	metrics   *metrics

	// broken are endpoints whose container lost its interface and that
	// the last check could not repair: the reason, by endpoint ID.
	broken map[string]string
	// checkKick asks the loop to check endpoints (checkEndpoints);
	// nameTries counts its attempts to learn each endpoint's interface
	// name, which it gives up after maxNameTries.
	checkKick chan struct{}
	nameTries map[string]int

	// Network sync (sync.go): copying names the networks the loop is
	// creating through Docker right now.
	syncKick     chan struct{}
	copying      map[netip.Prefix]string
	syncProblems []string
}

// New loads the driver's state. It starts nothing; Run does.
func New(cfg Config) (*Driver, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	d := &Driver{
		cfg:       cfg,
		log:       cfg.Logger.With("component", "driver"),
		statePath: filepath.Join(cfg.StateDir, "driver.json"),
		kick:      make(chan struct{}, 1),
		checkKick: make(chan struct{}, 1),
		nameTries: map[string]int{},
		key:       cfg.PrivateKey,
		stagger:   newStagger(),
		paths:     newPaths(cfg.Logger.With("component", "paths"), cfg.PunchTimeout, cfg.DirectRetry, cfg.Keepalive),
		relayHost: newRelayHost(),
		binder:    newRelayBinder(cfg.Logger.With("component", "paths")),
		metrics:   newMetrics(),

		syncKick: make(chan struct{}, 1),
		copying:  map[netip.Prefix]string{},
	}
	var err error
	if d.state, err = loadState(d.statePath); err != nil {
		return nil, err
	}
	return d, nil
}

// Restore publishes this host's networks to the mesh and applies the
// data plane from saved state, so that containers get their network back
// after an agent restart before Docker calls anything.
func (d *Driver) Restore(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for id, n := range d.state.Networks {
		if _, ok := d.state.Pools[n.PoolID]; !ok {
			// `docker network rm` releases the pool, then deletes the
			// network, and only logs a failed delete: this agent was down
			// in between, and the network is gone from Docker.
			d.log.Warn("dropping network whose address pool Docker released", "network", short(id), "subnet", n.Subnet)
			delete(d.state.Networks, id)
			for _, e := range d.state.endpointsOf(id) {
				delete(d.state.Endpoints, e.ID)
			}
			if err := d.saveLocked(); err != nil {
				return err
			}
			continue
		}
		if err := d.cfg.Mesh.Attach(n.Subnet, n.Port); err != nil {
			return fmt.Errorf("restoring network %s: %w", short(n.ID), err)
		}
		d.publishEndpointsLocked(n.ID)
	}
	if len(d.state.Networks) > 0 {
		d.log.Info("restoring networks", "networks", len(d.state.Networks), "endpoints", len(d.state.Endpoints))
	}
	return d.applyLocked(ctx)
}

// Run is the reconcile loop: it re-applies the data plane whenever the
// mesh changes, when kicked, and every ResyncInterval, until ctx is done.
// It checks endpoints (checkEndpoints) when it starts, every
// ResyncInterval, and after a join.
func (d *Driver) Run(ctx context.Context) error {
	defer func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		_ = d.binder.close()
	}()
	resync := time.NewTicker(d.cfg.ResyncInterval)
	defer resync.Stop()
	retry := time.NewTimer(0)
	<-retry.C
	pathsTimer := time.NewTimer(pathsBusy)
	defer pathsTimer.Stop()
	// An agent restart is when network namespaces may have been lost
	// (see linux.Config.HostMountNS): repair containers at once.
	d.checkEndpoints(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-d.cfg.Mesh.Changes():
			d.kickSync()
		case <-d.kick:
		case <-resync.C:
			d.checkEndpoints(ctx)
		case <-d.checkKick:
			d.checkEndpoints(ctx)
		case <-retry.C:
		case <-pathsTimer.C:
			if d.evaluatePaths(ctx) {
				pathsTimer.Reset(pathsBusy)
			} else {
				pathsTimer.Reset(pathsIdle)
			}
			continue
		}
		d.mu.Lock()
		err := d.applyLocked(ctx)
		busy := d.paths.busy()
		d.mu.Unlock()
		if err != nil {
			d.metrics.reconcileErrors.Inc()
			d.log.Error("applying data plane failed; retrying", "err", err)
			retry.Reset(2 * time.Second)
		}
		if busy {
			// A new peer, or a path changing: watch it closely.
			pathsTimer.Reset(pathsBusy)
		}
	}
}

// kickLoop asks Run for a pass without waiting for it.
func (d *Driver) kickLoop() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// applyLocked computes the desired data plane and applies it.
func (d *Driver) applyLocked(ctx context.Context) error {
	v := d.cfg.Mesh.View()
	cfg := d.desiredLocked(v)
	d.serveRelayLocked(v, time.Now())
	// Binds before WireGuard's first handshake through a new session:
	// the relay drops an end's handshakes until it has bound.
	d.binder.sendLocked(time.Now(), v, d.key, d.paths)
	return d.cfg.DataPlane.Apply(ctx, cfg)
}

// Paths are looked at every pathsBusy while one is changing (a direct
// attempt: the sooner a handshake is seen the better), else every
// pathsIdle.
const (
	pathsBusy = 250 * time.Millisecond
	pathsIdle = 5 * time.Second
)

// evaluatePaths looks at WireGuard's sessions with every peer, moves
// paths on (paths.go), publishes this host's wishes and sightings, and
// applies what changed. It reports whether a path is still changing.
func (d *Driver) evaluatePaths(ctx context.Context) bool {
	taken := time.Now()
	st, err := d.cfg.DataPlane.Status(ctx)
	if err != nil {
		d.log.Debug("reading WireGuard for paths", "err", err)
	}
	byID := map[string]dataplane.NetworkStatus{}
	for _, n := range st {
		byID[n.ID] = n
	}
	v := d.cfg.Mesh.View()
	now := time.Now()
	d.mu.Lock()
	defer d.mu.Unlock()
	changed := false
	subnets := map[netip.Prefix]bool{}
	for _, n := range d.state.Networks {
		subnets[n.Subnet] = true
		peers := map[crypto.PublicKey]dataplane.PeerStatus{}
		for _, p := range byID[n.ID].Peers {
			peers[p.PublicKey] = p
		}
		keep := map[string]bool{}
		for _, p := range v.Peers(n.Subnet) {
			keep[p.Node] = true
			k := pathKey{n.Subnet, p.Node}
			if ps, ok := peers[p.PublicKey]; ok {
				d.paths.observe(k, ps, taken, now)
			}
			if d.paths.step(now, v, n.Subnet, p) {
				changed = true
			}
		}
		d.paths.forget(n.Subnet, keep)
		d.cfg.Mesh.SetRelayWants(n.Subnet, d.paths.wishes(n.Subnet))
	}
	d.paths.forgetSubnetsExcept(subnets)
	d.cfg.Mesh.SetWGSightings(d.paths.sightings(now))
	if changed {
		if err := d.applyLocked(ctx); err != nil {
			d.log.Warn("applying a new path", "err", err)
			d.kickLoop()
		}
	} else {
		d.serveRelayLocked(v, now)
		d.binder.sendLocked(now, v, d.key, d.paths)
	}
	return d.paths.busy()
}

// desiredLocked computes the data plane from this host's state and the
// mesh: for each local network, its peers are the other nodes that have
// it attached, each allowed its own blocks.
func (d *Driver) desiredLocked(v *mesh.View) *dataplane.Config {
	cfg := &dataplane.Config{PrivateKey: d.key}
	now := time.Now()
	var recheck time.Duration
	ids := make([]string, 0, len(d.state.Networks))
	for id := range d.state.Networks {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		n := d.state.Networks[id]
		dn := dataplane.Network{
			ID:          n.ID,
			Subnet:      n.Subnet,
			Gateway:     n.Gateway,
			MTU:         n.MTU,
			ListenPort:  n.Port,
			LocalBlocks: v.OwnBlocks(n.Subnet),
		}
		peers := map[crypto.PublicKey]bool{}
		for _, p := range v.Peers(n.Subnet) {
			peers[p.PublicKey] = true
			if !d.restored {
				d.stagger.known(n.Subnet, p.PublicKey)
			}
			dec := d.paths.decide(now, v, n.Subnet, p)
			if dec.restarted {
				d.stagger.restart(n.Subnet, p.PublicKey, now)
			}
			ka, again := d.stagger.keepalive(n.Subnet, d.key.Public(), p.PublicKey, d.cfg.Keepalive, now, dec.flip)
			if again > 0 && (recheck == 0 || again < recheck) {
				recheck = again
			}
			dn.Peers = append(dn.Peers, dataplane.Peer{
				PublicKey: p.PublicKey, Endpoint: dec.endpoint, AllowedIPs: p.AllowedIPs, Keepalive: ka,
				MTU: routeMTU(dec.pathMTU, dec.endpoint, n.MTU), Generation: dec.gen,
			})
		}
		d.stagger.forget(n.Subnet, peers)
		for _, e := range d.state.endpointsOf(n.ID) {
			if !e.Joined {
				continue
			}
			dn.Endpoints = append(dn.Endpoints, dataplane.Endpoint{ID: e.ID, Addr: e.Addr, MAC: parseMAC(e.MAC)})
		}
		cfg.Networks = append(cfg.Networks, dn)
	}
	d.restored = true
	if recheck > 0 {
		if d.recheck == nil {
			d.recheck = time.AfterFunc(recheck, d.kickLoop)
		} else {
			d.recheck.Reset(recheck)
		}
	}
	return cfg
}

// saveLocked persists state; a handler that cannot save must fail, since
// an address handed out but not remembered could be handed out twice.
func (d *Driver) saveLocked() error {
	if err := d.state.save(d.statePath); err != nil {
		return &Error{KindSystem, err}
	}
	return nil
}

// checkEndpoints looks at every joined endpoint whose veth pair is gone.
// Its container died (or Docker restarted and will not tell us), and the
// endpoint is forgotten, so that it keeps no route; or its container runs
// on without its interface, because the network's namespace was
// destroyed under it, and the interface is recreated as Docker had made
// it. What can be neither is reported (Status, wgmesh_endpoints_broken)
// and tried again at the next check. Addresses are left to Docker, which
// releases them when it cleans up the endpoint.
//
// It also learns the name Docker gave the container end of each new
// endpoint, which a repair needs.
func (d *Driver) checkEndpoints(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, d.cfg.RequestTimeout)
	defer cancel()
	// Endpoints joined after the snapshot is taken are not in it.
	since := time.Now()
	st, err := d.cfg.DataPlane.Status(ctx)
	if err != nil {
		d.log.Warn("reading data plane status; endpoints not checked", "err", err)
		return
	}
	present := map[string]bool{}
	known := map[string]bool{}
	for _, n := range st {
		known[n.ID] = true
		for _, id := range n.Endpoints {
			present[id] = true
		}
	}
	var missing, unnamed []Endpoint
	d.mu.Lock()
	for _, e := range d.state.Endpoints {
		switch {
		case !e.Joined || !e.JoinedAt.Before(since) || !known[e.NetworkID]:
		case !present[e.ID]:
			missing = append(missing, *e)
		case e.containerIfName() == "" && d.nameTries[e.ID] < maxNameTries:
			d.nameTries[e.ID]++
			unnamed = append(unnamed, *e)
		}
	}
	for id := range d.nameTries {
		if d.state.Endpoints[id] == nil {
			delete(d.nameTries, id)
		}
	}
	d.mu.Unlock()

	broken := map[string]string{}
	docker := &dockerAsker{api: d.cfg.Docker}
	for _, e := range missing {
		sandbox, running, err := docker.sandboxOf(ctx, e)
		if err == nil {
			err = d.repair(ctx, e, sandbox)
		}
		switch {
		case err == nil:
		case errors.Is(err, dataplane.ErrNoSandbox) && running:
			// Docker says it runs, yet its /proc entry is not there:
			// it just ended, or this agent has a PID namespace of its
			// own (a managed plugin). Docker will say which.
			d.log.Warn("the container of an endpoint that lost its interface runs, but its network namespace is out of reach",
				"endpoint", short(e.ID), "network", short(e.NetworkID), "err", err)
			broken[e.ID] = fmt.Sprintf("%v (does the agent share the host's PID namespace?)", err)
		case errors.Is(err, ErrEndpointGone) || errors.Is(err, dataplane.ErrNoSandbox):
			d.forget(e)
		default:
			d.log.Error("a container lost its interface and it cannot be repaired; retrying", "endpoint", short(e.ID), "network", short(e.NetworkID), "err", err)
			broken[e.ID] = err.Error()
		}
	}
	for _, e := range unnamed {
		if sandbox, _, err := docker.sandboxOf(ctx, e); err == nil {
			d.learnIfName(ctx, e, sandbox)
		}
	}
	d.mu.Lock()
	d.broken = broken
	d.mu.Unlock()
}

// maxNameTries bounds the attempts to learn an endpoint's interface name
// in one agent's life: where it cannot be read (a container out of
// reach), asking Docker every resync would be all that is left of it. A
// repair without the name takes the first free eth<N>.
const maxNameTries = 3

// kickCheck asks Run to check endpoints without waiting for it.
func (d *Driver) kickCheck() {
	select {
	case d.checkKick <- struct{}{}:
	default:
	}
}

// dockerAsker asks Docker about endpoints for one check, and stops asking
// once Docker fails to answer: a hung engine must not hold up the loop
// for every endpoint.
type dockerAsker struct {
	api  DockerAPI
	down error
}

// dockerTimeout bounds one question to Docker.
const dockerTimeout = 5 * time.Second

// sandboxOf finds the network namespace of an endpoint's container: from
// Docker's API, /proc/PID/ns/net of the running container; without an
// answer from Docker, the sandbox key it gave at Join. It returns
// ErrEndpointGone if Docker says the container is not running; running
// says Docker said it is.
func (a *dockerAsker) sandboxOf(ctx context.Context, e Endpoint) (sandbox string, running bool, err error) {
	if a.api != nil && a.down == nil {
		ctx, cancel := context.WithTimeout(ctx, dockerTimeout)
		pid, err := a.api.EndpointPID(ctx, e.NetworkID, e.ID)
		cancel()
		if err == nil {
			return fmt.Sprintf("/proc/%d/ns/net", pid), true, nil
		}
		if errors.Is(err, ErrEndpointGone) {
			return "", false, err
		}
		a.down = fmt.Errorf("asking Docker for the container: %w", err)
	}
	dockerErr := a.down
	if e.SandboxKey != "" {
		return e.SandboxKey, false, nil
	}
	return "", false, errors.Join(errors.New("cannot find the endpoint's container"), dockerErr)
}

// repair recreates the interface of an endpoint's container in sandbox.
func (d *Driver) repair(ctx context.Context, e Endpoint, sandbox string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	cur, ok := d.state.Endpoints[e.ID]
	n := d.state.Networks[e.NetworkID]
	if !ok || n == nil || !cur.Joined || !cur.JoinedAt.Equal(e.JoinedAt) {
		return nil // left or joined again meanwhile
	}
	want := cur.containerIfName()
	name, err := d.cfg.DataPlane.RepairEndpoint(ctx, n.ID, dataplane.Endpoint{ID: cur.ID, Addr: cur.Addr, MAC: parseMAC(cur.MAC)}, n.MTU, sandbox, want)
	if err != nil {
		return fmt.Errorf("repairing the interface: %w", err)
	}
	d.metrics.repairs.Inc()
	d.log.Warn("a running container had lost its interface; repaired", "endpoint", short(e.ID), "network", short(e.NetworkID),
		"iface", name, "name_known", want != "", "addr", cur.Addr)
	if cur.CtrIfName != name {
		cur.CtrIfName = name
		if err := d.saveLocked(); err != nil {
			d.log.Error("saving state", "err", err)
		}
	}
	return nil
}

// forget drops an endpoint whose container is gone.
func (d *Driver) forget(e Endpoint) {
	d.mu.Lock()
	defer d.mu.Unlock()
	cur, ok := d.state.Endpoints[e.ID]
	if !ok || !cur.JoinedAt.Equal(e.JoinedAt) {
		return
	}
	d.log.Info("endpoint's veth and container are gone; forgetting it", "endpoint", short(e.ID), "network", short(e.NetworkID))
	delete(d.state.Endpoints, e.ID)
	d.publishEndpointsLocked(e.NetworkID)
	if err := d.saveLocked(); err != nil {
		d.log.Error("saving state", "err", err)
	}
	d.kickLoop()
}

// learnIfName records the name of an endpoint's interface in its
// container, once Docker has moved it there.
func (d *Driver) learnIfName(ctx context.Context, e Endpoint, sandbox string) {
	name, err := d.cfg.DataPlane.ContainerInterface(ctx, e.NetworkID, e.ID, sandbox)
	if err != nil || name == "" {
		d.log.Debug("container interface not found (yet)", "endpoint", short(e.ID), "sandbox", sandbox, "err", err)
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	cur, ok := d.state.Endpoints[e.ID]
	if !ok || !cur.JoinedAt.Equal(e.JoinedAt) || cur.CtrIfName == name {
		return
	}
	cur.CtrIfName = name
	if err := d.saveLocked(); err != nil {
		d.log.Error("saving state", "err", err)
	}
}

// SetPrivateKey switches the WireGuard key (key rotation).
func (d *Driver) SetPrivateKey(ctx context.Context, k crypto.PrivateKey) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.key = k
	return d.applyLocked(ctx)
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
