package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/driver/dataplane"
	"github.com/wgmesh/wgmesh/driver/dataplane/linux"
	"github.com/wgmesh/wgmesh/driver/dns"
	"github.com/wgmesh/wgmesh/driver/dockerapi"
	"github.com/wgmesh/wgmesh/driver/relay"
	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/mesh/consensus"
)

// agentFlags are the agent's settings. Every path is configurable: hosts
// that share a filesystem (test hosts, or containers) must not collide.
type agentFlags struct {
	nodeName        string
	bindAddr        string
	advertiseAddr   string
	gossipPort      int
	raftPort        int
	join            listFlag
	clusterKeyFile  string
	insecure        bool
	stateDir        string
	runDir          string
	hostMountNS     string
	pluginSocket    string
	controlSocket   string
	wgPort          int
	wgMode          string
	wgKeepalive     time.Duration
	mtu             int
	leaveOnShutdown bool
	wgKeyRotation   time.Duration
	metricsAddr     string
	syncNetworks    bool
	dockerHost      string
	driverName      string
	dnsAddr         string
	dnsUpstream     listFlag
	logLevel        string
	logFormat       string
	relayPorts      string
	relayRate       int64
	punchTimeout    time.Duration
	directRetry     time.Duration
	pmtuInterval    time.Duration
	server          string
	serverKeyFile   string
}

func (f *agentFlags) register(fs *flag.FlagSet) {
	host, _ := os.Hostname()
	fs.StringVar(&f.nodeName, "node-name", host, "this node's unique name in the cluster")
	fs.StringVar(&f.bindAddr, "bind-addr", "0.0.0.0", "address gossip (TCP and UDP), consensus (TCP) and the relay ports (UDP) listen on; WireGuard listens on every address")
	fs.StringVar(&f.advertiseAddr, "advertise-addr", "", "address members reach this node at, for gossip, consensus and WireGuard: set it on a reachable host whose address is on its interface; "+
		"leave it unset behind NAT, where members tell the node how they see it, and on a VM whose public address is a 1:1 NAT, which its seeds find "+
		"by dialing it back (default: --bind-addr if it is one address, else the address seeds reach this node at unsolicited, else the private "+
		"address of the interface with the default route)")
	fs.IntVar(&f.gossipPort, "gossip-port", 7946, "gossip port, TCP and UDP")
	fs.IntVar(&f.raftPort, "raft-port", 0, "consensus port, TCP, mutual TLS (default: gossip port + 1)")
	fs.Var(&f.join, "join", "seed address(es) host[:port] to join, comma-separated or repeated")
	fs.StringVar(&f.clusterKeyFile, "cluster-key-file", "", "file with the cluster key(s) that encrypt gossip, mode 0600 (create with 'wgmesh keygen')")
	fs.BoolVar(&f.insecure, "insecure", false, "gossip without encryption (never on an untrusted network)")
	fs.StringVar(&f.stateDir, "state-dir", "/var/lib/wgmesh", "directory for keys and state")
	fs.StringVar(&f.runDir, "run-dir", "/run/wgmesh", "directory for runtime files (network namespaces)")
	fs.StringVar(&f.hostMountNS, "host-mount-ns", "/proc/1/ns/mnt", "mount namespace in which network namespaces are pinned, so that they outlive the agent whatever mount namespace it runs in; 'self' for the agent's own (a managed plugin's)")
	fs.StringVar(&f.pluginSocket, "plugin-socket", "/run/docker/plugins/wgmesh.sock", "Docker plugin socket")
	fs.StringVar(&f.controlSocket, "control-socket", "", "control socket for 'wgmesh status' (default RUN-DIR/control.sock)")
	fs.IntVar(&f.wgPort, "wg-port", 51820, "first WireGuard UDP port; each network on a host takes the next free one")
	fs.StringVar(&f.wgMode, "wg-mode", dataplane.ModeAuto, "WireGuard implementation: auto, kernel or userspace")
	fs.DurationVar(&f.wgKeepalive, "wg-keepalive", 25*time.Second, "WireGuard persistent keepalive, keeps NAT mappings open (0 disables)")
	fs.IntVar(&f.mtu, "mtu", 0, "default MTU of container interfaces (default: underlay MTU minus WireGuard overhead)")
	fs.BoolVar(&f.leaveOnShutdown, "leave-on-shutdown", false, "leave the cluster when stopped, instead of letting peers keep this node through a restart")
	fs.DurationVar(&f.wgKeyRotation, "wg-key-rotation", 0, "rotate this node's WireGuard key pair this often (0: only on 'wgmesh rotate-keys')")
	fs.BoolVar(&f.syncNetworks, "sync-networks", true, "create here the wgmesh networks created on other hosts, and remove them likewise, through the local Docker API")
	fs.StringVar(&f.dockerHost, "docker-host", "unix:///var/run/docker.sock", "the local Docker engine's API, for --sync-networks to find containers that lost their interface, and for the names of --dns-addr")
	fs.StringVar(&f.driverName, "driver-name", "wgmesh", "this plugin's name in Docker (a managed plugin's is wgmesh:latest)")
	fs.StringVar(&f.dnsAddr, "dns-addr", defaultDNSAddr, "address of the DNS server that answers containers with the names of containers on every host "+
		"(dockerd needs it as its first --dns); off when empty or \"off\"")
	fs.Var(&f.dnsUpstream, "dns-upstream", "DNS server(s) addr[:port] for names outside the mesh, comma-separated or repeated (default: the nameservers of /etc/resolv.conf)")
	fs.StringVar(&f.metricsAddr, "metrics-addr", "", "serve Prometheus metrics on this address, e.g. 127.0.0.1:9586 (off when empty)")
	fs.StringVar(&f.relayPorts, "relay-ports", "51900-51999", "UDP ports FIRST-LAST this host relays on for members that cannot reach each other, when members reach it at its advertised address; the first also tells members how their NAT maps them ('off': none)")
	fs.Int64Var(&f.relayRate, "relay-rate", 0, "bytes per second each relayed pair may send through this host (0: no limit)")
	fs.DurationVar(&f.punchTimeout, "punch-timeout", 8*time.Second, "how long a direct path to a peer (through NAT or not) may take to bring a handshake before the pair is relayed")
	fs.DurationVar(&f.directRetry, "direct-retry", time.Minute, "least time a relayed pair waits before trying a direct path again (doubles with each failure, up to 30m)")
	fs.DurationVar(&f.pmtuInterval, "pmtu-interval", 30*time.Second, "path MTU timing: the known value to each host is confirmed every sixth of this (a shrink is noticed within that and a search), a larger one looked for every ten")
	fs.StringVar(&f.server, "server", string(consensus.ServerAuto), "whether this host may vote in consensus: auto (when members can reach it), always (ahead of auto hosts) or never; see docs/threat-model.md")
	fs.StringVar(&f.serverKeyFile, "server-key-file", "", "file with the server key, mode 0600 (create with 'wgmesh keygen'): give it only to the hosts that may vote, and a leader that holds it promotes no other host")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&f.logFormat, "log-format", "text", "text or json")
}

// hostMountNSSelf is --host-mount-ns for the agent's own mount namespace.
const hostMountNSSelf = "self"

func (f *agentFlags) validate() error {
	if f.controlSocket == "" {
		f.controlSocket = filepath.Join(f.runDir, "control.sock")
	}
	for name, p := range map[string]string{"--state-dir": f.stateDir, "--run-dir": f.runDir, "--plugin-socket": f.pluginSocket, "--control-socket": f.controlSocket} {
		if !filepath.IsAbs(p) {
			return fmt.Errorf("%s %q must be an absolute path", name, p)
		}
	}
	if f.hostMountNS != hostMountNSSelf && !filepath.IsAbs(f.hostMountNS) {
		return fmt.Errorf("--host-mount-ns %q must be an absolute path or %q", f.hostMountNS, hostMountNSSelf)
	}
	if f.clusterKeyFile == "" && !f.insecure {
		return errors.New("gossip must be encrypted: pass --cluster-key-file (make one with: " +
			"wgmesh keygen > /etc/wgmesh/cluster.key; chmod 600 /etc/wgmesh/cluster.key), or choose --insecure explicitly")
	}
	if f.clusterKeyFile != "" && f.insecure {
		return errors.New("--insecure and --cluster-key-file contradict each other")
	}
	if _, err := consensus.ParseServerMode(f.server); err != nil {
		return err
	}
	if f.server == string(consensus.ServerNever) && f.serverKeyFile != "" {
		return errors.New("--server=never and --server-key-file contradict each other: the key is for hosts that may vote")
	}
	if f.wgPort <= 0 || f.wgPort > 65535 {
		return fmt.Errorf("--wg-port %d out of range", f.wgPort)
	}
	if f.gossipPort <= 0 || f.gossipPort > 65535 {
		return fmt.Errorf("--gossip-port %d out of range", f.gossipPort)
	}
	if f.raftPort < 0 || f.raftPort > 65535 || f.raftPort == 0 && f.gossipPort == 65535 {
		return fmt.Errorf("--raft-port %d out of range", f.raftPort)
	}
	if f.raftPort == f.gossipPort {
		return errors.New("--raft-port must differ from --gossip-port")
	}
	if f.mtu != 0 && (f.mtu < dataplane.MinMTU || f.mtu > dataplane.MaxMTU) {
		return fmt.Errorf("--mtu %d outside %d..%d", f.mtu, dataplane.MinMTU, dataplane.MaxMTU)
	}
	if f.wgKeepalive < 0 {
		return errors.New("--wg-keepalive must not be negative")
	}
	if f.wgKeyRotation != 0 && f.wgKeyRotation < time.Minute {
		return errors.New("--wg-key-rotation must be 0 or at least 1m")
	}
	if _, _, err := parsePortRange(f.relayPorts); err != nil {
		return fmt.Errorf("--relay-ports: %w", err)
	}
	if f.relayRate < 0 {
		return errors.New("--relay-rate must not be negative")
	}
	if f.punchTimeout < time.Second || f.directRetry < time.Second {
		return errors.New("--punch-timeout and --direct-retry must be at least 1s")
	}
	if f.pmtuInterval < time.Second {
		return errors.New("--pmtu-interval must be at least 1s")
	}
	return f.validateDNS()
}

// parsePortRange parses FIRST-LAST (at least two ports), or "off".
func parsePortRange(s string) (first, count uint16, err error) {
	if s == "off" || s == "" {
		return 0, 0, nil
	}
	a, b, ok := strings.Cut(s, "-")
	lo, err1 := strconv.ParseUint(a, 10, 16)
	hi, err2 := strconv.ParseUint(b, 10, 16)
	if !ok || err1 != nil || err2 != nil || lo == 0 || hi <= lo {
		return 0, 0, fmt.Errorf("%q is not FIRST-LAST with 0 < FIRST < LAST <= 65535, or off", s)
	}
	return uint16(lo), uint16(hi - lo + 1), nil
}

func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q is not text or json", format)
}

func runAgent(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var f agentFlags
	fs := newFlagSet("agent", stderr)
	f.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %v", fs.Args())
	}
	if err := f.validate(); err != nil {
		return err
	}
	log, err := newLogger(stderr, f.logLevel, f.logFormat)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return agent(ctx, &f, log)
}

func agent(ctx context.Context, f *agentFlags, log *slog.Logger) error {
	if err := os.MkdirAll(f.stateDir, 0o700); err != nil {
		return fmt.Errorf("creating state directory: %w", err)
	}
	unlock, err := lockStateDir(f.stateDir)
	if err != nil {
		return err
	}
	defer unlock()
	identity, created, err := crypto.LoadOrCreateIdentity(filepath.Join(f.stateDir, "identity.key"))
	if err != nil {
		return fmt.Errorf("identity key: %w", err)
	}
	if created {
		log.Info("generated this node's identity key", "id", identity.ID().String())
	}
	key, created, err := crypto.LoadOrCreatePrivateKey(filepath.Join(f.stateDir, "private.key"))
	if err != nil {
		return fmt.Errorf("WireGuard key: %w", err)
	}
	if created {
		log.Info("generated WireGuard key pair", "public_key", key.Public().String())
	}
	var ring crypto.Keyring
	if f.clusterKeyFile != "" {
		if ring, err = crypto.LoadKeyring(f.clusterKeyFile); err != nil {
			return fmt.Errorf("cluster key: %w", err)
		}
	} else {
		log.Warn("gossip is NOT encrypted (--insecure): anyone on the network can read and forge cluster state")
	}

	mountNS := f.hostMountNS
	if mountNS == hostMountNSSelf {
		mountNS = ""
	}
	dp, err := linux.New(linux.Config{RunDir: f.runDir, HostMountNS: mountNS, Mode: f.wgMode, Logger: log})
	if err != nil {
		return fmt.Errorf("data plane: %w", err)
	}
	defer dp.Close()

	mcfg := mesh.DefaultConfig()
	mcfg.Name = f.nodeName
	mcfg.Identity = identity
	mcfg.BindAddr = f.bindAddr
	mcfg.BindPort = f.gossipPort
	mcfg.RaftPort = f.raftPort
	mcfg.AdvertiseAddr = f.advertiseAddr
	mcfg.Join = f.join
	mcfg.Keyring = ring
	mcfg.PublicKey = key.Public()
	mcfg.WGMode = dp.Mode()
	mcfg.StateDir = f.stateDir
	mcfg.LeaveOnShutdown = f.leaveOnShutdown
	mcfg.Logger = log
	relayPort, relayPorts, _ := parsePortRange(f.relayPorts)
	mcfg.RelayPort, mcfg.RelayPorts = relayPort, relayPorts
	mcfg.PMTUInterval = f.pmtuInterval
	mcfg.Server, _ = consensus.ParseServerMode(f.server)
	if f.serverKeyFile != "" {
		if mcfg.ServerKey, err = crypto.LoadServerKey(f.serverKeyFile); err != nil {
			return fmt.Errorf("--server-key-file: %w", err)
		}
	}
	m, err := mesh.New(mcfg)
	if err != nil {
		return fmt.Errorf("mesh: %w", err)
	}

	mtu := f.mtu
	if mtu == 0 {
		mtu = derivedMTU(m.Addr(), log)
	}
	dcfg := driver.DefaultConfig()
	dcfg.Mesh = m
	dcfg.DataPlane = dp
	dcfg.StateDir = f.stateDir
	dcfg.PrivateKey = key
	dcfg.PortBase = uint16(f.wgPort)
	dcfg.DefaultMTU = mtu
	dcfg.Keepalive = f.wgKeepalive
	dcfg.DriverName = f.driverName
	dcfg.Logger = log
	dcfg.PunchTimeout, dcfg.DirectRetry = f.punchTimeout, f.directRetry
	if relayPorts > 0 {
		bind, err := netip.ParseAddr(f.bindAddr)
		if err != nil {
			return fmt.Errorf("--bind-addr: %w", err)
		}
		rs := relay.New(relay.Config{BindAddr: bind, MaxRate: f.relayRate, Logger: log})
		defer rs.Close()
		dcfg.Relay, dcfg.RelayPort, dcfg.RelayPorts = rs, relayPort, relayPorts
	}
	// Docker's API serves network sync, tells whether the container of
	// an endpoint that lost its veth pair still runs, and feeds names.
	docker, err := dockerapi.New(f.dockerHost)
	if err != nil {
		return err
	}
	defer docker.Close()
	dcfg.Docker = docker
	dcfg.SyncNetworks = f.syncNetworks
	dnsSvc, err := newDNS(f, m, docker, log)
	if err != nil {
		return err
	}
	if dnsSvc != nil {
		dcfg.DNS = func() *dns.Status { return dnsSvc.Status(m.NameStats()) }
	}
	d, err := driver.New(dcfg)
	if err != nil {
		return fmt.Errorf("driver: %w", err)
	}
	if err := d.Restore(ctx); err != nil {
		// The loop retries; Docker must still reach the plugin.
		log.Error("restoring networks", "err", err)
	}

	pluginL, err := driver.Listen(f.pluginSocket)
	if err != nil {
		return err
	}
	controlL, err := driver.ListenControl(f.controlSocket)
	if err != nil {
		pluginL.Close()
		return err
	}
	log.Info("wgmesh agent running", "version", version, "node", f.nodeName, "addr", m.Addr(),
		"id", identity.ID().String(), "public_key", key.Public().String(), "wg_mode", dp.Mode(), "mtu", mtu,
		"plugin_socket", f.pluginSocket, "control_socket", f.controlSocket)

	control := &driver.Control{
		Driver: d,
		Forget: m.Forget,
		RotateKeys: func(ctx context.Context) error {
			return rotateKeys(ctx, filepath.Join(f.stateDir, "private.key"), m, d, log)
		},
	}

	// Shutdown order: stop taking Docker's calls, then leave gossip, then
	// (deferred) release the data plane.
	meshCtx, stopMesh := context.WithCancel(context.Background())
	defer stopMesh()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return m.Run(meshCtx) })
	g.Go(func() error { return d.Run(gctx) })
	g.Go(func() error { return d.RunSync(gctx) })
	g.Go(func() error {
		if err := d.Handler().Serve(pluginL); err != nil && !errors.Is(err, net.ErrClosed) {
			return fmt.Errorf("plugin socket: %w", err)
		}
		return nil
	})
	g.Go(func() error { return control.Serve(gctx, controlL) })
	if dnsSvc != nil {
		g.Go(func() error { return dnsSvc.Run(gctx) })
	}
	if f.clusterKeyFile != "" {
		g.Go(func() error { watchKeyring(gctx, f.clusterKeyFile, ring, m, log); return nil })
	}
	if f.metricsAddr != "" {
		g.Go(func() error { return serveMetrics(gctx, f.metricsAddr, d, log) })
	}
	if f.wgKeyRotation > 0 {
		g.Go(func() error {
			t := time.NewTicker(f.wgKeyRotation)
			defer t.Stop()
			for {
				select {
				case <-gctx.Done():
					return nil
				case <-t.C:
					if err := control.RotateKeys(gctx); err != nil {
						log.Error("scheduled WireGuard key rotation", "err", err)
					}
				}
			}
		})
	}
	g.Go(func() error {
		<-gctx.Done()
		pluginL.Close()
		os.Remove(f.pluginSocket)
		stopMesh()
		return nil
	})
	err = g.Wait()
	os.Remove(f.controlSocket)
	log.Info("wgmesh agent stopped")
	return err
}

// rotateKeys gives the node a new WireGuard key: stored first, so a crash
// cannot lose it, then published to peers and applied locally.
func rotateKeys(ctx context.Context, path string, m *mesh.Mesh, d *driver.Driver, log *slog.Logger) error {
	k, err := crypto.GeneratePrivateKey()
	if err != nil {
		return err
	}
	if err := crypto.StorePrivateKey(path, k); err != nil {
		return err
	}
	// The devices take the new key before the peers hear of it: a peer
	// that handshook with the new public key while this host still
	// answered with the old one would be ignored, and would only try
	// again after WireGuard's rekey timeout (5 s of lost traffic). This
	// way a peer's packets are dropped only until gossip brings the key.
	// The key is announced even if a device refused it: the stored key
	// is what every device gets from now on.
	err = d.SetPrivateKey(ctx, k)
	m.SetPublicKey(k.Public())
	if err != nil {
		return fmt.Errorf("applying the new key: %w", err)
	}
	log.Info("WireGuard key rotated", "public_key", k.Public().String())
	return nil
}

// serveMetrics serves Prometheus metrics until ctx is done.
func serveMetrics(ctx context.Context, addr string, d *driver.Driver, log *slog.Logger) error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), d.Collector())
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	log.Info("serving metrics", "addr", l.Addr().String())
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics: %w", err)
	}
	return nil
}

// watchKeyring reloads the cluster key file on SIGHUP and whenever it
// changes, which is how a cluster rotates its key without downtime: on
// every host, add the new key as a second line; then make it the first;
// then remove the old one. A file that does not parse keeps the current
// keys.
func watchKeyring(ctx context.Context, path string, current crypto.Keyring, m *mesh.Mesh, log *slog.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	poll := time.NewTicker(2 * time.Second)
	defer poll.Stop()
	// Polling reads the file only when its metadata changed.
	last, _ := os.Stat(path)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
		case <-poll.C:
			fi, err := os.Stat(path)
			if err == nil && last != nil && sameFile(fi, last) {
				continue
			}
			last = fi
		}
		ring, err := crypto.LoadKeyring(path)
		if err != nil {
			log.Error("reloading the cluster key file; keeping the current keys", "err", err)
			continue
		}
		if ring.Equal(current) {
			continue
		}
		if err := m.SetKeyring(ring); err != nil {
			log.Error("installing the reloaded cluster keys", "err", err)
			continue
		}
		current = ring
	}
}

// sameFile reports whether two stats of a path show the same file,
// unchanged: the same inode (an atomic rename makes a new one), size and
// modification time.
func sameFile(a, b os.FileInfo) bool {
	return os.SameFile(a, b) && a.Size() == b.Size() && a.ModTime().Equal(b.ModTime())
}

// derivedMTU is the underlay MTU of the interface holding addr (or of the
// default route) minus WireGuard's overhead.
func derivedMTU(addr netip.Addr, log *slog.Logger) int {
	underlay, err := linux.UnderlayMTU(addr)
	if err != nil {
		log.Warn("cannot find the underlay MTU; assuming 1500", "err", err)
		underlay = 1500
	}
	return dataplane.MTUFor(underlay, addr.Is6() && !addr.Is4In6())
}
