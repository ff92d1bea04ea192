// Package lab builds a cluster of simulated hosts on one machine for
// wgmesh's end-to-end tests, its demo and its benchmarks.
//
// Each host is a network namespace with its own dockerd and wgmesh agent;
// the hosts share one underlay, a bridge in another namespace, with an MTU
// of 1400 like many cloud networks. A router namespace on the underlay
// stands in for the outside world, with a server at 198.51.100.10.
//
//	        ┌──────── <prefix>-sw: br0 (MTU 1400) ────────┐
//	        │                │               │             │
//	<prefix>-h1       <prefix>-h2     <prefix>-h3    <prefix>-wan
//	192.168.77.11     .12             .13            192.168.77.1, 198.51.100.10
//	dockerd + agent   dockerd + agent dockerd + agent
//
// A host may instead sit behind a NAT router of its own (Config.Sites),
// in a private network, as hosts in a cloud's private subnet or an office
// do; the router's uplink takes its place on the underlay:
//
//	br0 ── <prefix>-rN: eth0 192.168.77.(100+N)  ─ NAT ─  lan0 10.99.N.1 ── <prefix>-hN: eth0 10.99.N.2
//
// The router masquerades what its host sends (iptables MASQUERADE: the
// source port is kept where it can be, one mapping per source; or with
// --random-fully, a random port per destination), and drops what arrives
// from outside unless it belongs to a connection its host began, on the
// way to its host as on the way to itself, as home and cloud routers do.
// Hosts behind such a NAT are not seeds: nobody can reach them first.
// A one-to-one router instead maps its address onto its host's both
// ways, as a cloud maps a VM's public address: that host is reachable
// there, and a seed. Hosts behind a router are told no address to
// advertise: they find out, as a user's would.
//
// Every path a host uses is its own (Dir/hN/...): hosts share the machine's
// filesystem. Everything the lab starts is stopped by PID in Close, and
// all traffic stays inside the lab's namespaces.
package lab

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/wgmesh/wgmesh/test/poll"
)

// Underlay addressing of the lab.
const (
	UnderlayPrefix = "192.168.77.0/24"
	RouterAddr     = "192.168.77.1"
	// WANServer is the "outside world": a server in the router namespace.
	WANServer   = "198.51.100.10"
	underlayMTU = 1400
	// UnderlayMTU is the MTU of the hosts' links to the bridge.
	UnderlayMTU = underlayMTU
	// Image is the busybox image built on every host.
	Image = "wgmesh-busybox:lab"
)

// Config configures a lab.
type Config struct {
	// Hosts is the number of simulated hosts.
	Hosts int
	// Dir holds everything of the lab; empty makes a temporary directory.
	Dir string
	// Binary is the wgmesh binary the agents run.
	Binary string
	// Docker starts a dockerd on each host, and builds the busybox image.
	Docker bool
	// Engine is the Docker engine the hosts run; the zero Engine is
	// DebianEngine.
	Engine Engine
	// DockerHosts limits dockerd to the first N hosts (0: all), for
	// scale tests where most hosts only run an agent.
	DockerHosts int
	// AgentArgs are extra flags for every agent.
	AgentArgs []string
	// SeedHosts, if set, makes only the first SeedHosts hosts seeds:
	// a fresh agent starts no cluster while a seed is out of sight, so
	// hosts started later (a joiner) must not be the first ones' seeds.
	SeedHosts int
	// NoNames is for an agent built before names across hosts (a
	// benchmark's baseline): it gets no --dns-upstream, which it would
	// refuse.
	NoNames bool
	// DockerArgs are extra flags for every dockerd. Every dockerd gets
	// --dns DNSAddr in any case, as hosts running wgmesh should.
	DockerArgs []string
	// SyncNetworks lets agents create networks created elsewhere. Off by
	// default: most tests choose on which hosts a network exists.
	SyncNetworks bool
	// OwnKeyFiles gives each host a cluster key file of its own
	// (Host.KeyFile), a copy of the lab's, so that a test can change the
	// keys of some hosts and not others: a rotation that leaves one out.
	OwnKeyFiles bool
	// Sites places the hosts, by index (host N is Sites[N-1]); hosts
	// past its end sit on the underlay.
	Sites []Site
	// Log receives progress lines; nil discards them.
	Log io.Writer
}

// NAT kinds of a Site's router.
const (
	// NATPreserving: MASQUERADE, which keeps a source port where it can:
	// one mapping per source, whatever the destination.
	NATPreserving = "preserving"
	// NATRandom: MASQUERADE --random-fully: a random port for each
	// destination (a "symmetric" NAT).
	NATRandom = "random"
	// NATOneToOne maps the router's address onto the host's, both ways
	// (DNAT of everything that arrives, SNAT of everything the host
	// sends): a cloud VM's public address, which is on none of its
	// interfaces. Such a host is reachable, at the router's address,
	// and can be a seed there.
	NATOneToOne = "one-to-one"
)

// Site is where a host sits.
type Site struct {
	// NAT puts the host behind a router of that kind; "" on the
	// underlay.
	NAT string
	// UplinkMTU is the MTU of the router's link to the underlay; 0 is
	// the underlay's. A smaller one makes a path that drops larger
	// packets without a word on the way in (the underlay's bridge does)
	// and answers them with ICMP on the way out (the router does).
	UplinkMTU int
	// DropFragNeeded makes the router drop ICMP "fragmentation needed"
	// both ways, the ones it makes and the ones it forwards, as many
	// firewalls do: with a smaller UplinkMTU, a black hole that says
	// nothing either way.
	DropFragNeeded bool
}

// Lab is a running set of simulated hosts.
type Lab struct {
	cfg     Config
	Dir     string
	Prefix  string
	Switch  string // namespace of the underlay bridge
	WAN     string // namespace of the router and outside server
	KeyFile string
	Hosts   []*Host
	ownDir  bool

	mu     sync.Mutex
	closed bool
	// neighbours are the namespaces AddNeighbour made and Close has not
	// removed.
	neighbours []string
	// networks are the IDs of the networks `docker network create` made
	// on the lab's hosts.
	networks map[string]bool
}

func (l *Lab) noteNetwork(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.networks == nil {
		l.networks = make(map[string]bool)
	}
	l.networks[id] = true
}

// NetworkIDs lists the IDs of every network created on the lab's hosts
// through Host.Docker, removed since or not: what a check for leftovers
// on the machine (outside the lab's namespaces) can tell the lab's own
// from another lab's running beside it.
func (l *Lab) NetworkIDs() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	ids := make([]string, 0, len(l.networks))
	for id := range l.networks {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// Host is one simulated host.
type Host struct {
	lab   *Lab
	Index int    // 1-based
	Name  string // h1, h2, ...
	NetNS string // namespace name, under /run/netns
	Addr  netip.Addr
	Dir   string
	// Site is where it sits; behind NAT, Router is the router's
	// namespace and Public the router's address on the underlay.
	Site   Site
	Router string
	Public netip.Addr

	mu      sync.Mutex
	dockerd *proc
	agent   *proc
	// binary, if set, is the wgmesh binary of this host instead of the
	// lab's (SetBinary).
	binary string
	// mountNS holds the mount namespace dockerd runs in.
	mountNS *proc
	// containers are stand-in container namespaces made by NewContainer.
	containers []string
}

// proc is a process the lab started.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	log  *os.File
}

// New builds the lab's namespaces and, if asked, starts dockerd on each
// host. Agents are started with StartAgents.
func New(ctx context.Context, cfg Config) (*Lab, error) {
	if cfg.Hosts < 1 || cfg.Hosts > 200 {
		return nil, fmt.Errorf("lab: %d hosts; want 1 to 200", cfg.Hosts)
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	if cfg.Engine == (Engine{}) {
		cfg.Engine = DebianEngine()
	}
	if err := checkTools(cfg); err != nil {
		return nil, err
	}
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	l := &Lab{cfg: cfg, Prefix: "wgl" + hex.EncodeToString(b)}
	l.Switch, l.WAN = l.Prefix+"-sw", l.Prefix+"-wan"
	var err error
	if cfg.Dir == "" {
		if l.Dir, err = os.MkdirTemp("", "wgmesh-lab-"); err != nil {
			return nil, err
		}
		l.ownDir = true
	} else {
		l.Dir = cfg.Dir
		if err := os.MkdirAll(l.Dir, 0o700); err != nil {
			return nil, err
		}
	}
	if err := l.build(ctx); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

func checkTools(cfg Config) error {
	var missing []string
	tools := []string{"ip", "nsenter", "unshare", "busybox"}
	for _, s := range cfg.Sites {
		if s.NAT != "" {
			tools = append(tools, "iptables")
			break
		}
	}
	for _, t := range tools {
		if _, err := exec.LookPath(t); err != nil {
			missing = append(missing, t)
		}
	}
	if cfg.Docker {
		missing = append(missing, cfg.Engine.check()...)
	}
	if len(missing) > 0 {
		return fmt.Errorf("lab: missing tools %v (run: make deps)", missing)
	}
	return nil
}

// Engine is the Docker engine the lab's hosts run.
func (l *Lab) Engine() Engine { return l.cfg.Engine }

func (l *Lab) logf(format string, args ...any) {
	fmt.Fprintf(l.cfg.Log, "lab: "+format+"\n", args...)
}

func (l *Lab) build(ctx context.Context) error {
	l.logf("building %d hosts in namespaces %s-*", l.cfg.Hosts, l.Prefix)
	steps := [][]string{
		{"ip", "netns", "add", l.Switch},
		{"ip", "-n", l.Switch, "link", "set", "lo", "up"},
		{"ip", "-n", l.Switch, "link", "add", "br0", "mtu", strconv.Itoa(underlayMTU), "type", "bridge"},
		{"ip", "-n", l.Switch, "link", "set", "br0", "up"},
		{"ip", "netns", "add", l.WAN},
		{"ip", "-n", l.WAN, "link", "set", "lo", "up"},
		{"ip", "-n", l.WAN, "addr", "add", WANServer + "/32", "dev", "lo"},
	}
	steps = append(steps, l.plug(l.WAN, "wan", RouterAddr, 0)...)
	for _, s := range steps {
		if _, err := run(ctx, s[0], s[1:]...); err != nil {
			return err
		}
	}
	for i := 1; i <= l.cfg.Hosts; i++ {
		h := &Host{lab: l, Index: i, Name: "h" + strconv.Itoa(i), NetNS: fmt.Sprintf("%s-h%d", l.Prefix, i),
			Addr: netip.MustParseAddr(fmt.Sprintf("192.168.77.%d", 10+i))}
		if i <= len(l.cfg.Sites) {
			h.Site = l.cfg.Sites[i-1]
		}
		h.Dir = filepath.Join(l.Dir, h.Name)
		l.Hosts = append(l.Hosts, h)
		for _, d := range []string{"data", "exec", "plugins", "state", "run"} {
			if err := os.MkdirAll(filepath.Join(h.Dir, d), 0o700); err != nil {
				return err
			}
		}
		steps := [][]string{
			{"ip", "netns", "add", h.NetNS},
			{"ip", "-n", h.NetNS, "link", "set", "lo", "up"},
		}
		if h.Site.NAT == "" {
			steps = append(steps, l.plug(h.NetNS, h.Name, h.Addr.String(), 0)...)
			steps = append(steps, []string{"ip", "-n", h.NetNS, "route", "add", "default", "via", RouterAddr})
		} else {
			nat, err := l.natSteps(h)
			if err != nil {
				return err
			}
			steps = append(steps, nat...)
		}
		for _, s := range steps {
			if _, err := run(ctx, s[0], s[1:]...); err != nil {
				return err
			}
		}
	}
	key, err := run(ctx, l.cfg.Binary, "keygen")
	if err != nil {
		return fmt.Errorf("lab: making a cluster key: %w", err)
	}
	l.KeyFile = filepath.Join(l.Dir, "cluster.key")
	if err := os.WriteFile(l.KeyFile, []byte(key), 0o600); err != nil {
		return err
	}
	if l.cfg.OwnKeyFiles {
		for _, h := range l.Hosts {
			if err := h.WriteKeyFile(key); err != nil {
				return err
			}
		}
	}
	if l.cfg.Docker {
		n := l.cfg.DockerHosts
		if n == 0 || n > len(l.Hosts) {
			n = len(l.Hosts)
		}
		if err := l.parallel(ctx, l.Hosts[:n], func(ctx context.Context, h *Host) error { return h.StartDocker(ctx) }); err != nil {
			return err
		}
		return l.parallel(ctx, l.Hosts[:n], func(ctx context.Context, h *Host) error { return h.LoadImage(ctx) })
	}
	return nil
}

// natSteps puts h behind a router of its own (see the package comment).
func (l *Lab) natSteps(h *Host) ([][]string, error) {
	h.Router = fmt.Sprintf("%s-r%d", l.Prefix, h.Index)
	h.Public = netip.MustParseAddr(fmt.Sprintf("192.168.77.%d", 100+h.Index))
	h.Addr = netip.MustParseAddr(fmt.Sprintf("10.99.%d.2", h.Index))
	r := h.Router
	ipt := func(args ...string) []string { return append([]string{"ip", "netns", "exec", r, "iptables"}, args...) }
	var nat [][]string
	masq := ipt("-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE")
	switch h.Site.NAT {
	case NATPreserving:
		nat = [][]string{masq}
	case NATRandom:
		nat = [][]string{append(masq, "--random-fully")}
	case NATOneToOne:
		nat = [][]string{
			ipt("-t", "nat", "-A", "PREROUTING", "-i", "eth0", "-d", h.Public.String(), "-j", "DNAT", "--to-destination", h.Addr.String()),
			ipt("-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-s", h.Addr.String(), "-j", "SNAT", "--to-source", h.Public.String()),
			// Everything mapped onto the host gets through.
			ipt("-A", "FORWARD", "-i", "eth0", "-d", h.Addr.String(), "-j", "ACCEPT"),
		}
	default:
		return nil, fmt.Errorf("lab: host %s: unknown NAT %q", h.Name, h.Site.NAT)
	}
	steps := [][]string{
		{"ip", "netns", "add", r},
		{"ip", "-n", r, "link", "set", "lo", "up"},
	}
	steps = append(steps, l.plug(r, "r"+strconv.Itoa(h.Index), h.Public.String(), h.Site.UplinkMTU)...)
	mtu := strconv.Itoa(underlayMTU)
	steps = append(steps,
		[]string{"ip", "-n", r, "route", "add", "default", "via", RouterAddr},
		[]string{"ip", "-n", r, "link", "add", "lan0", "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu, "netns", h.NetNS},
		[]string{"ip", "-n", r, "addr", "add", fmt.Sprintf("10.99.%d.1/24", h.Index), "dev", "lan0"},
		[]string{"ip", "-n", r, "link", "set", "lan0", "up"},
		[]string{"ip", "-n", h.NetNS, "addr", "add", h.Addr.String() + "/24", "dev", "eth0"},
		[]string{"ip", "-n", h.NetNS, "link", "set", "eth0", "up"},
		[]string{"ip", "-n", h.NetNS, "route", "add", "default", "via", fmt.Sprintf("10.99.%d.1", h.Index)},
		[]string{"ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"},
	)
	steps = append(steps, nat...)
	steps = append(steps,
		ipt("-A", "INPUT", "-i", "eth0", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"),
		ipt("-A", "INPUT", "-i", "eth0", "-j", "DROP"),
		ipt("-A", "FORWARD", "-i", "eth0", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"),
		ipt("-A", "FORWARD", "-i", "eth0", "-j", "DROP"),
	)
	if h.Site.DropFragNeeded {
		// Inserted first: the rules above accept ICMP errors as RELATED.
		for _, chain := range []string{"OUTPUT", "FORWARD"} {
			steps = append(steps, ipt("-I", chain, "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP"))
		}
	}
	return steps, nil
}

// plug connects a namespace to the underlay bridge as eth0 with addr/24,
// over a link of the given MTU (0: the underlay's).
func (l *Lab) plug(ns, name, addr string, linkMTU int) [][]string {
	outer := l.Prefix + "-" + name
	mtu := strconv.Itoa(underlayMTU)
	if linkMTU != 0 {
		mtu = strconv.Itoa(linkMTU)
	}
	return [][]string{
		{"ip", "link", "add", outer, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu, "netns", ns},
		{"ip", "link", "set", outer, "netns", l.Switch},
		{"ip", "-n", l.Switch, "link", "set", outer, "master", "br0", "up"},
		{"ip", "-n", ns, "link", "set", "eth0", "up"},
		{"ip", "-n", ns, "addr", "add", addr + "/24", "dev", "eth0"},
	}
}

// parallel runs fn for each host at once and joins the errors.
func (l *Lab) parallel(ctx context.Context, hosts []*Host, fn func(context.Context, *Host) error) error {
	errs := make([]error, len(hosts))
	var wg sync.WaitGroup
	for i, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(ctx, h); err != nil {
				errs[i] = fmt.Errorf("%s: %w", h.Name, err)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// StartAgents starts an agent on every host; each joins all the others.
func (l *Lab) StartAgents(ctx context.Context, extra ...string) error {
	return l.parallel(ctx, l.Hosts, func(ctx context.Context, h *Host) error { return h.StartAgent(ctx, extra...) })
}

// Seeds lists the seed hosts' addresses but h's, for --join: the hosts
// others can reach, at the address they reach them at; not those behind
// a NAT that lets nothing in.
func (l *Lab) Seeds(except *Host) string {
	var s []string
	hosts := l.Hosts
	if n := l.cfg.SeedHosts; n > 0 && n < len(hosts) {
		hosts = hosts[:n]
	}
	for _, h := range hosts {
		switch {
		case h == except:
		case h.Site.NAT == "":
			s = append(s, h.Addr.String())
		case h.Site.NAT == NATOneToOne:
			s = append(s, h.Public.String())
		}
	}
	return strings.Join(s, ",")
}

// Close stops every process the lab started and removes its namespaces.
// It is safe to call more than once.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var errs []error
	_ = l.parallel(ctx, l.Hosts, func(ctx context.Context, h *Host) error {
		h.mu.Lock()
		docker := h.dockerd != nil
		h.mu.Unlock()
		if docker {
			// Containers first, so none outlives its dockerd.
			if out, err := h.Docker(ctx, "ps", "-aq"); err == nil && strings.TrimSpace(out) != "" {
				_, _ = h.Docker(ctx, append([]string{"rm", "-f"}, strings.Fields(out)...)...)
			}
		}
		h.StopAgent(syscall.SIGTERM)
		h.StopDocker(syscall.SIGTERM)
		h.killRemaining()
		return nil
	})
	for _, h := range l.Hosts {
		for _, ns := range h.containers {
			_, _ = run(ctx, "ip", "netns", "del", ns)
		}
		// Unpin namespaces an agent left (it keeps them across restarts).
		h.unmountUnder(filepath.Join(h.Dir, "run"))
		if _, err := run(ctx, "ip", "netns", "del", h.NetNS); err != nil && !strings.Contains(err.Error(), "No such file") {
			errs = append(errs, err)
		}
		if h.Router != "" {
			if _, err := run(ctx, "ip", "netns", "del", h.Router); err != nil && !strings.Contains(err.Error(), "No such file") {
				errs = append(errs, err)
			}
		}
	}
	l.mu.Lock()
	neighbours := slices.Clone(l.neighbours)
	l.mu.Unlock()
	for _, ns := range neighbours {
		_, _ = run(ctx, "ip", "netns", "del", ns)
	}
	for _, ns := range []string{l.WAN, l.Switch} {
		if _, err := run(ctx, "ip", "netns", "del", ns); err != nil && !strings.Contains(err.Error(), "No such file") {
			errs = append(errs, err)
		}
	}
	if l.ownDir {
		if err := os.RemoveAll(l.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// run runs a command and returns its combined output.
func run(ctx context.Context, name string, args ...string) (string, error) {
	return runIn(ctx, nil, name, args...)
}

func runIn(ctx context.Context, stdin io.Reader, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = stdin
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// start starts a long-running process with its output in logPath.
func start(name string, args []string, logPath string) (*proc, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = f, f
	// Its own process group, so a Ctrl-C of the test does not hit it
	// before Close can stop it in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{}), log: f}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p, nil
}

// stop signals a process and waits for it, killing it if it lingers.
func (p *proc) stop(sig syscall.Signal, grace time.Duration) {
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// waitReady polls ready every interval until it succeeds, and fails when
// the process exits first or timeout passes; what and log name the
// process and its log in errors.
func (p *proc) waitReady(ctx context.Context, what, log string, timeout, every time.Duration, ready func() error) error {
	// An exit ends the wait at once, through the context.
	ctx, exited := context.WithCancelCause(ctx)
	defer exited(nil)
	err := poll.Every(ctx, every, timeout, what+" coming up", func() error {
		err := ready()
		if err != nil && p.exited() {
			exited(fmt.Errorf("%s exited: %v", what, p.err))
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("%w (log: %s)", err, log)
	}
	return nil
}

// exited reports whether the process has ended.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// busyboxApplets are linked in the lab image.
var busyboxApplets = []string{"sh", "ping", "nc", "httpd", "sleep", "cat", "md5sum", "sha256sum",
	"dd", "head", "wc", "ip", "wget", "echo", "ls", "true", "hostname", "ifconfig", "route", "seq", "tr", "yes", "nslookup"}

// imageTar is a root filesystem with a static busybox and its applets.
func imageTar() (*bytes.Buffer, error) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(bb)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: "bin/", Typeflag: tar.TypeDir, Mode: 0o755}); err != nil {
		return nil, err
	}
	if err := tw.WriteHeader(&tar.Header{Name: "bin/busybox", Mode: 0o755, Size: int64(len(data))}); err != nil {
		return nil, err
	}
	if _, err := tw.Write(data); err != nil {
		return nil, err
	}
	for _, a := range busyboxApplets {
		if err := tw.WriteHeader(&tar.Header{Name: "bin/" + a, Typeflag: tar.TypeSymlink, Linkname: "busybox", Mode: 0o777}); err != nil {
			return nil, err
		}
	}
	for _, d := range []string{"tmp/", "www/", "etc/"} {
		if err := tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o1777}); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return &buf, nil
}

// Neighbour is a namespace on the underlay that is none of the lab's
// hosts: another machine on the hosts' LAN segment.
type Neighbour struct {
	lab  *Lab
	NS   string
	Addr netip.Addr
}

// NSPath is the neighbour's network namespace.
func (n *Neighbour) NSPath() string { return "/run/netns/" + n.NS }

// AddNeighbour plugs a namespace with addr (on UnderlayPrefix) into the
// underlay as <prefix>-<name>. Close removes it; the lab's Close does
// too, if the test did not.
func (l *Lab) AddNeighbour(ctx context.Context, name string, addr netip.Addr) (*Neighbour, error) {
	if !netip.MustParsePrefix(UnderlayPrefix).Contains(addr) {
		return nil, fmt.Errorf("lab: neighbour address %s is not on the underlay %s", addr, UnderlayPrefix)
	}
	n := &Neighbour{lab: l, NS: l.Prefix + "-" + name, Addr: addr}
	steps := [][]string{{"ip", "netns", "add", n.NS}, {"ip", "-n", n.NS, "link", "set", "lo", "up"}}
	steps = append(steps, l.plug(n.NS, name, addr.String(), 0)...)
	l.mu.Lock()
	l.neighbours = append(l.neighbours, n.NS)
	l.mu.Unlock()
	for _, s := range steps {
		if _, err := run(ctx, s[0], s[1:]...); err != nil {
			n.Close()
			return nil, err
		}
	}
	return n, nil
}

// Exec runs a command in the neighbour's namespace.
func (n *Neighbour) Exec(ctx context.Context, name string, args ...string) (string, error) {
	return run(ctx, "ip", append([]string{"netns", "exec", n.NS, name}, args...)...)
}

// Close removes the neighbour's namespace, and with it its link.
func (n *Neighbour) Close() {
	_, _ = run(context.Background(), "ip", "netns", "del", n.NS)
	n.lab.mu.Lock()
	defer n.lab.mu.Unlock()
	if i := slices.Index(n.lab.neighbours, n.NS); i >= 0 {
		n.lab.neighbours = slices.Delete(n.lab.neighbours, i, i+1)
	}
}

// SetUnderlayGRO switches receive offloads on (or back off) along the
// underlay of the given hosts plugged straight into the bridge: GRO on
// each host's eth0 and on its port of the bridge, and UDP GRO for
// forwarded packets on the port, as a real NIC has them. A veth has GRO
// off by default, so without this no UDP or TCP batch forms on the way
// in and a WireGuard socket that asks for UDP GRO never gets one.
func (l *Lab) SetUnderlayGRO(ctx context.Context, on bool, hosts ...*Host) error {
	state := "off"
	if on {
		state = "on"
	}
	for _, h := range hosts {
		if h.Site.NAT != "" {
			return fmt.Errorf("%s: behind a router, not on the bridge", h.Name)
		}
		steps := [][]string{
			{"ip", "netns", "exec", h.NetNS, "ethtool", "-K", "eth0", "gro", state},
			{"ip", "netns", "exec", l.Switch, "ethtool", "-K", l.Prefix + "-" + h.Name, "gro", state, "rx-udp-gro-forwarding", state},
		}
		for _, s := range steps {
			if _, err := run(ctx, s[0], s[1:]...); err != nil {
				return fmt.Errorf("%s: underlay GRO %s: %w", h.Name, state, err)
			}
		}
	}
	return nil
}
