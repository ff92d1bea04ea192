// Package bench measures wgmesh side by side with its peers and the
// physical limit on this machine, in one run, so that the report can
// state ratios rather than absolute figures that drift between runs.
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// dataCase is one way of carrying traffic between two simulated hosts.
type dataCase struct {
	name string
	note string
	// skip, when set, says why the case cannot run here.
	skip string
	// client and server run a command at the two ends.
	client, server func(ctx context.Context, name string, args ...string) (string, error)
	// serverIP is the address the client reaches the server at.
	serverIP string
	stop     func()
	// engine lists the processes that do the WireGuard work (none for
	// the kernel's); engineComm is their command name, for perf.
	engine     func() []int
	engineComm string
	// rx is the host whose eth0 receives the server's traffic from the
	// underlay, where the profile run counts UDP batches.
	rx *lab.Host
}

// CaseResult is the median of a data-plane case's runs.
type CaseResult struct {
	Name        string  `json:"name"`
	Note        string  `json:"note,omitempty"`
	Skipped     string  `json:"skipped,omitempty"`
	TCP1Gbps    float64 `json:"tcp_1_stream_gbps"`
	TCP4Gbps    float64 `json:"tcp_4_streams_gbps"`
	PingAvgMs   float64 `json:"ping_avg_ms"`
	PingP99Ms   float64 `json:"ping_p99_ms"`
	CPUSecPerGB float64 `json:"cpu_seconds_per_gb"`
	// The CPU seconds per GB by kind, and those of the WireGuard
	// process (profile.go).
	UserSecPerGB    float64 `json:"user_seconds_per_gb"`
	SysSecPerGB     float64 `json:"system_seconds_per_gb"`
	SoftirqSecPerGB float64 `json:"softirq_seconds_per_gb"`
	EngineSecPerGB  float64 `json:"engine_seconds_per_gb"`
	Runs            []Run   `json:"runs"`
	// Profile is perf's view of one more run, if taken.
	Profile *Profile `json:"profile,omitempty"`
	// Emulated is set for a case measured in a VM without KVM, whose
	// figures compare only with that VM's own underlay.
	Emulated bool `json:"emulated,omitempty"`
	// GRO: measured with GRO on along the underlay.
	GRO bool `json:"underlay_gro,omitempty"`
}

// Label names the case and, if it is not the lab's own, its underlay.
func (r CaseResult) Label() string {
	if r.GRO {
		return r.Name + ", GRO on"
	}
	return r.Name
}

// Run is one measurement of a case.
type Run struct {
	TCP1Gbps, TCP4Gbps   float64
	PingAvgMs, PingP99Ms float64
	CPUSecPerGB          float64
	// Of one stream's run, per GB: by kind, and the WireGuard process's.
	UserSecPerGB, SysSecPerGB, SoftirqSecPerGB, EngineSecPerGB float64
}

// cpuCost is a TCP run's CPU time per GB received.
type cpuCost struct {
	Total, User, Sys, Softirq, Engine float64
}

func run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// setupCases prepares every data-plane case on the lab's first two hosts.
func (b *Bench) setupCases(ctx context.Context, l *lab.Lab) ([]*dataCase, error) {
	h1, h2 := l.Hosts[0], l.Hosts[1]
	var cases []*dataCase
	add := func(c *dataCase, err error) error {
		if err != nil {
			return fmt.Errorf("setting up %s: %w", c.name, err)
		}
		cases = append(cases, c)
		return nil
	}
	if err := add(&dataCase{name: "raw underlay", note: "veth + bridge between the host namespaces, MTU 1400: the physical limit",
		client: h1.Exec, server: h2.Exec, serverIP: h2.Addr.String()}, nil); err != nil {
		return nil, err
	}
	wg, err := b.setupWireguardGo(ctx, h1, h2)
	if err := add(wg, err); err != nil {
		return cases, err
	}
	vx, err := setupVXLAN(ctx, h1, h2)
	if err := add(vx, err); err != nil {
		return cases, err
	}
	wm, err := setupWgmesh(ctx, l, commName(b.cfg.Binary))
	if err := add(wm, err); err != nil {
		return cases, err
	}
	kwg, err := setupKernelWG(ctx, h1, h2)
	if err := add(kwg, err); err != nil {
		return cases, err
	}
	for _, c := range cases {
		c.rx = h2
	}
	return cases, nil
}

// wgKeys makes a WireGuard key pair with wg(8).
func wgKeys(ctx context.Context) (priv, pub string, err error) {
	priv, err = run(ctx, "wg", "genkey")
	if err != nil {
		return "", "", err
	}
	cmd := exec.CommandContext(ctx, "wg", "pubkey")
	cmd.Stdin = strings.NewReader(priv)
	out, err := cmd.Output()
	return strings.TrimSpace(priv), strings.TrimSpace(string(out)), err
}

// configureWG sets up a WireGuard link named iface, already created, on
// both hosts with wg(8): the same keys, ports, MTU and addressing for the
// userspace and the kernel case.
func configureWG(ctx context.Context, h1, h2 *lab.Host, iface [2]string, subnet string, ports [2]int) error {
	var privs, pubs [2]string
	for i := range privs {
		var err error
		if privs[i], pubs[i], err = wgKeys(ctx); err != nil {
			return err
		}
	}
	hosts := [2]*lab.Host{h1, h2}
	for i, h := range hosts {
		o := 1 - i
		keyFile, err := os.CreateTemp("", "wgbench-key-")
		if err != nil {
			return err
		}
		defer os.Remove(keyFile.Name())
		if _, err := keyFile.WriteString(privs[i]); err != nil {
			return err
		}
		keyFile.Close()
		steps := [][]string{
			{"wg", "set", iface[i], "private-key", keyFile.Name(), "listen-port", strconv.Itoa(ports[i]),
				"peer", pubs[o], "endpoint", fmt.Sprintf("%s:%d", hosts[o].Addr, ports[o]), "allowed-ips", fmt.Sprintf(subnet, o+1) + "/32"},
			{"ip", "addr", "add", fmt.Sprintf(subnet, i+1) + "/24", "dev", iface[i]},
			{"ip", "link", "set", iface[i], "mtu", "1340", "up"},
		}
		for _, s := range steps {
			if _, err := h.Exec(ctx, s[0], s[1:]...); err != nil {
				return err
			}
		}
	}
	return nil
}

// setupWireguardGo runs standalone wireguard-go on both hosts: the same
// encryption engine as wgmesh's userspace path, without wgmesh.
func (b *Bench) setupWireguardGo(ctx context.Context, h1, h2 *lab.Host) (*dataCase, error) {
	c := &dataCase{name: "wireguard-go", note: "standalone wireguard-go between the hosts, configured with wg(8), MTU 1340",
		client: h1.Exec, server: h2.Exec, serverIP: "10.97.0.2", engineComm: "wireguard-go"}
	ifaces := [2]string{"wgb" + h1.NetNS[3:9] + "a", "wgb" + h2.NetNS[3:9] + "b"}
	var procs []*exec.Cmd
	// nsenter execs wireguard-go, which keeps its PID.
	c.engine = func() []int {
		var pids []int
		for _, p := range procs {
			pids = append(pids, p.Process.Pid)
		}
		return pids
	}
	c.stop = func() {
		// SIGTERM lets wireguard-go remove its UAPI socket, which a
		// killed one leaves in the machine's /var/run/wireguard.
		for _, p := range procs {
			_ = p.Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { _ = p.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				_ = p.Process.Kill()
				<-done
			}
		}
		for _, iface := range ifaces {
			_ = os.Remove("/var/run/wireguard/" + iface + ".sock")
		}
	}
	for i, h := range []*lab.Host{h1, h2} {
		cmd := exec.Command("nsenter", "--net="+h.NSPath(), b.cfg.WireguardGo, "-f", ifaces[i])
		cmd.Env = append(os.Environ(), "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1")
		if err := cmd.Start(); err != nil {
			c.stop()
			return c, err
		}
		procs = append(procs, cmd)
	}
	// wireguard-go creates its UAPI socket once the TUN is up.
	for _, iface := range ifaces {
		if err := poll.Every(ctx, 50*time.Millisecond, 10*time.Second, "wireguard-go's socket of "+iface, func() error {
			_, err := os.Stat("/var/run/wireguard/" + iface + ".sock")
			return err
		}); err != nil {
			c.stop()
			return c, err
		}
	}
	if err := configureWG(ctx, h1, h2, ifaces, "10.97.0.%d", [2]int{52001, 52002}); err != nil {
		c.stop()
		return c, err
	}
	return c, nil
}

// setupVXLAN links the hosts with kernel VXLAN, Docker overlay's
// (unencrypted) data plane.
func setupVXLAN(ctx context.Context, h1, h2 *lab.Host) (*dataCase, error) {
	c := &dataCase{name: "kernel VXLAN", note: "unencrypted, Docker overlay's data plane, MTU 1350",
		client: h1.Exec, server: h2.Exec, serverIP: "10.98.0.2"}
	for i, h := range []*lab.Host{h1, h2} {
		other := []*lab.Host{h2, h1}[i]
		steps := [][]string{
			{"ip", "link", "add", "vxb", "type", "vxlan", "id", "4242", "dstport", "4790", "remote", other.Addr.String(), "local", h.Addr.String(), "dev", "eth0"},
			{"ip", "addr", "add", fmt.Sprintf("10.98.0.%d/24", i+1), "dev", "vxb"},
			{"ip", "link", "set", "vxb", "mtu", "1350", "up"},
		}
		for _, s := range steps {
			if _, err := h.Exec(ctx, s[0], s[1:]...); err != nil {
				return c, err
			}
		}
	}
	c.stop = func() {
		for _, h := range []*lab.Host{h1, h2} {
			_, _ = h.Exec(context.Background(), "ip", "link", "del", "vxb")
		}
	}
	return c, nil
}

// setupWgmesh runs two containers on a wgmesh network through Docker.
func setupWgmesh(ctx context.Context, l *lab.Lab, comm string) (*dataCase, error) {
	h1, h2 := l.Hosts[0], l.Hosts[1]
	c := &dataCase{name: "wgmesh", note: "containers on a wgmesh network through real Docker (userspace WireGuard here), MTU 1340",
		engineComm: comm, engine: func() []int { return []int{h1.AgentPID(), h2.AgentPID()} }}
	if err := l.CreateNetwork(ctx, "benchnet", "10.99.0.0/16", nil, h1, h2); err != nil {
		return c, err
	}
	c.stop = func() {
		for _, h := range []*lab.Host{h1, h2} {
			_, _ = h.Docker(context.Background(), "rm", "-f", "bench-"+h.Name)
		}
		_ = l.RemoveNetwork(context.Background(), "benchnet", h1, h2)
	}
	var err error
	if _, err = h1.RunContainer(ctx, "bench-"+h1.Name, "benchnet", nil); err != nil {
		return c, err
	}
	if c.serverIP, err = h2.RunContainer(ctx, "bench-"+h2.Name, "benchnet", nil); err != nil {
		return c, err
	}
	c.client = func(ctx context.Context, name string, args ...string) (string, error) {
		return h1.InContainer(ctx, "bench-"+h1.Name, name, args...)
	}
	c.server = func(ctx context.Context, name string, args ...string) (string, error) {
		return h2.InContainer(ctx, "bench-"+h2.Name, name, args...)
	}
	// The first packets set up WireGuard's session; do not time them.
	err = poll.Until(ctx, 20*time.Second, "the containers reaching each other", func() error {
		_, err := c.client(ctx, "ping", "-c", "1", "-W", "1", c.serverIP)
		return err
	})
	return c, err
}

// commName is the command name the kernel gives a process run from path:
// its file name, cut to 15 bytes. perf selects processes by it.
func commName(path string) string {
	name := filepath.Base(path)
	if len(name) > 15 {
		name = name[:15]
	}
	return name
}

// setupKernelWG uses the kernel's WireGuard where the module exists.
func setupKernelWG(ctx context.Context, h1, h2 *lab.Host) (*dataCase, error) {
	c := &dataCase{name: "kernel WireGuard", note: "the kernel module between the hosts, configured with wg(8), MTU 1340",
		client: h1.Exec, server: h2.Exec, serverIP: "10.96.0.2"}
	if _, err := h1.Exec(ctx, "ip", "link", "add", "wgk", "type", "wireguard"); err != nil {
		c.skip = "no WireGuard kernel module on this machine"
		return c, nil
	}
	if _, err := h2.Exec(ctx, "ip", "link", "add", "wgk", "type", "wireguard"); err != nil {
		return c, err
	}
	c.stop = func() {
		for _, h := range []*lab.Host{h1, h2} {
			_, _ = h.Exec(context.Background(), "ip", "link", "del", "wgk")
		}
	}
	return c, configureWG(ctx, h1, h2, [2]string{"wgk", "wgk"}, "10.96.0.%d", [2]int{52101, 52102})
}

// iperfPort is where the benchmark's iperf3 servers listen.
const iperfPort = "5299"

// measure runs one round of a case: TCP with 1 and 4 streams, and pings.
func (b *Bench) measure(ctx context.Context, c *dataCase) (Run, error) {
	var r Run
	stopServer := startServer(ctx, c)
	defer stopServer()
	var err error
	var cost cpuCost
	if r.TCP1Gbps, cost, err = b.iperf(ctx, c, 1); err != nil {
		return r, err
	}
	r.CPUSecPerGB, r.UserSecPerGB, r.SysSecPerGB, r.SoftirqSecPerGB, r.EngineSecPerGB = cost.Total, cost.User, cost.Sys, cost.Softirq, cost.Engine
	if r.TCP4Gbps, _, err = b.iperf(ctx, c, 4); err != nil {
		return r, err
	}
	r.PingAvgMs, r.PingP99Ms, err = b.ping(ctx, c)
	return r, err
}

// startServer runs iperf3 -s at the server end until the returned func.
func startServer(ctx context.Context, c *dataCase) func() {
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, _ = c.server(sctx, "iperf3", "-s", "-p", iperfPort, "-B", c.serverIP)
	}()
	return func() { cancel(); <-done }
}

// cpuSeconds is the machine's busy CPU time so far, from /proc/stat.
func cpuSeconds() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
	var busy float64
	for i, v := range f[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		n, _ := strconv.ParseFloat(v, 64)
		busy += n
	}
	return busy / 100 // USER_HZ
}

// iperf runs one TCP test and returns Gbit/s received and CPU seconds
// (of the whole machine: both hosts are on it) per GB moved.
func (b *Bench) iperf(ctx context.Context, c *dataCase, streams int) (gbps float64, cost cpuCost, err error) {
	var pids []int
	if c.engine != nil {
		pids = c.engine()
	}
	// The server may still be starting: retry while it refuses. iperf3 -J
	// reports that in its JSON, and not always in its exit status.
	for attempt := 0; ; attempt++ {
		cpu0, split0, eng0 := cpuSeconds(), readCPUSplit(), procCPU(pids)
		out, err := c.client(ctx, "iperf3", "-c", c.serverIP, "-p", iperfPort, "-t", strconv.Itoa(int(b.cfg.Duration.Seconds())),
			"-P", strconv.Itoa(streams), "-J")
		cpu, split, eng := cpuSeconds()-cpu0, readCPUSplit().sub(split0), procCPU(pids)-eng0
		var res struct {
			Error string `json:"error"`
			End   struct {
				SumReceived struct {
					Bytes         float64 `json:"bytes"`
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
		}
		if jerr := json.Unmarshal([]byte(out), &res); jerr != nil && err == nil {
			return 0, cost, fmt.Errorf("iperf3 output: %w", jerr)
		}
		if strings.Contains(res.Error, "refused") && attempt < 30 {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if err != nil {
			return 0, cost, err
		}
		gb := res.End.SumReceived.Bytes / 1e9
		if gb == 0 {
			return 0, cost, fmt.Errorf("iperf3 with %d streams moved nothing: %s", streams, res.Error)
		}
		cost = cpuCost{Total: cpu / gb, User: split.User / gb, Sys: split.System / gb, Softirq: split.Softirq / gb, Engine: eng / gb}
		return res.End.SumReceived.BitsPerSecond / 1e9, cost, nil
	}
}

var rttRE = regexp.MustCompile(`time=([0-9.]+) ms`)

// ping sends pings 10 ms apart and returns the average and 99th
// percentile round trip.
func (b *Bench) ping(ctx context.Context, c *dataCase) (avg, p99 float64, err error) {
	out, err := c.client(ctx, "ping", "-n", "-c", strconv.Itoa(b.cfg.Pings), "-i", "0.01", "-W", "1", c.serverIP)
	if err != nil {
		return 0, 0, err
	}
	var rtts []float64
	for _, m := range rttRE.FindAllStringSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(m[1], 64)
		rtts = append(rtts, v)
	}
	if len(rtts) == 0 {
		return 0, 0, errors.New("no ping answered")
	}
	slices.Sort(rtts)
	var sum float64
	for _, v := range rtts {
		sum += v
	}
	return sum / float64(len(rtts)), percentile(rtts, 0.99), nil
}

// percentile of sorted values, nearest rank.
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func median(vs []float64) float64 {
	if len(vs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
