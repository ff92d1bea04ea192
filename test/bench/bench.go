package bench

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"strings"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
)

// Config configures a benchmark run.
type Config struct {
	// Binary is the wgmesh binary; WireguardGo a wireguard-go binary built
	// from the module wgmesh uses.
	Binary, WireguardGo string
	// Runs per data-plane case; the report gives medians.
	Runs int
	// Duration of each iperf3 test; Pings per latency test.
	Duration time.Duration
	Pings    int
	// FirstPingSamples: how many `docker run` to first ping are timed.
	FirstPingSamples int
	// ClaimSamples: how many times network creation and the first
	// containers are timed, per build.
	ClaimSamples int
	// Baseline is a wgmesh binary of an earlier commit, BaselineRev,
	// whose network creation and first containers are measured beside
	// Binary's; empty, or a file that does not exist, skips it with a
	// note in the report.
	Baseline, BaselineRev string
	// ClusterSizes for the convergence measurements.
	ClusterSizes []int
	// SimSizes for the in-process simulation of larger clusters.
	SimSizes []int
	// SimQuick shortens the simulation's idle phases (smoke runs).
	SimQuick bool
	// NATSamples: how many times each kind of path between hosts behind
	// NAT is set up and timed.
	NATSamples int
	// NoData, NoControl, NoClaims, NoSim and NoNAT leave a part out; NoVM
	// leaves out the data-plane case of kernel WireGuard in a VM.
	NoData, NoControl, NoClaims, NoSim, NoNAT, NoVM bool
	Log                                             io.Writer
	// NoNames leaves out names across hosts (dns.go): lookups in the two
	// hosts with dockerd, and a names simulation of NamesSimNodes.
	NoNames       bool
	NamesSimNodes int
	// Engine is the Docker engine of the hosts with dockerd; zero is the
	// lab's default.
	Engine lab.Engine
	// Profile samples one more TCP run of each data-plane case with perf
	// (profile.go).
	Profile bool
	// GRO measures every data-plane case a second time with GRO switched
	// on along the underlay, as a real NIC has it (lab.SetUnderlayGRO),
	// interleaved with the underlay as the lab makes it.
	GRO bool
}

// SetParts keeps only the parts named in a comma-separated list of
// data, control, claims, sim, nat and names.
func (c *Config) SetParts(list string) error {
	c.NoData, c.NoControl, c.NoClaims, c.NoSim, c.NoNAT, c.NoNames = true, true, true, true, true, true
	for _, p := range strings.Split(list, ",") {
		switch strings.TrimSpace(p) {
		case "data":
			c.NoData = false
		case "control":
			c.NoControl = false
		case "claims":
			c.NoClaims = false
		case "sim":
			c.NoSim = false
		case "nat":
			c.NoNAT = false
		case "names":
			c.NoNames = false
		default:
			return fmt.Errorf("unknown part %q: want data, control, claims, sim, nat or names", p)
		}
	}
	return nil
}

// Full is the configuration of `make bench`.
func Full() Config {
	return Config{Runs: 5, Duration: 5 * time.Second, Pings: 300, FirstPingSamples: 15, ClaimSamples: 15,
		ClusterSizes: []int{3, 10, 25}, SimSizes: []int{100, 250, 500}, NATSamples: 10, NamesSimNodes: 100, Profile: true, GRO: true}
}

// Smoke is a tiny run that checks the benchmark still works.
func Smoke() Config {
	return Config{Runs: 1, Duration: time.Second, Pings: 20, FirstPingSamples: 2, ClaimSamples: 2,
		ClusterSizes: []int{3}, SimSizes: []int{10}, SimQuick: true, NATSamples: 1, NamesSimNodes: 10, Profile: true, GRO: true}
}

// Bench runs benchmarks.
type Bench struct{ cfg Config }

// New returns a Bench.
func New(cfg Config) *Bench {
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	return &Bench{cfg: cfg}
}

func (b *Bench) logf(format string, args ...any) {
	fmt.Fprintf(b.cfg.Log, "bench: "+format+"\n", args...)
}

// Report is everything a run measured.
type Report struct {
	Started     time.Time     `json:"started"`
	Took        string        `json:"took"`
	Machine     string        `json:"machine"`
	Config      string        `json:"config"`
	DataPlane   []CaseResult  `json:"data_plane"`
	Limit       *Limit        `json:"limit,omitempty"`
	FirstPing   FirstPing     `json:"first_ping"`
	StartCost   *StartCost    `json:"start_cost,omitempty"`
	Convergence []Convergence `json:"convergence"`
	Claims      *Claims       `json:"claims,omitempty"`
	NAT         *NAT          `json:"nat,omitempty"`
	Simulation  []SimResult   `json:"simulation"`
	SimErrors   []string      `json:"simulation_errors,omitempty"`
	Names       *Names        `json:"names,omitempty"`
	Targets     []Target      `json:"targets"`
	chart       string
}

// Target is one of the goals the benchmark checks.
type Target struct {
	Goal     string `json:"goal"`
	Measured string `json:"measured"`
	Met      bool   `json:"met"`
	// NA: nothing to compare with (Met is false).
	NA bool `json:"not_applicable,omitempty"`
}

// simLog shows the simulation's progress, and its nodes' warnings, in the
// log of the run.
func (b *Bench) simLog() *slog.Logger {
	return slog.New(slog.NewTextHandler(b.cfg.Log, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// Run runs every benchmark and returns the report.
func (b *Bench) Run(ctx context.Context) (*Report, error) {
	r := &Report{Started: time.Now(), Machine: machine(),
		Config: fmt.Sprintf("%d runs, %s per iperf3 test, %d pings, %d first-ping samples, %d claim samples, clusters %v, simulated %v, %d NAT samples",
			b.cfg.Runs, b.cfg.Duration, b.cfg.Pings, b.cfg.FirstPingSamples, b.cfg.ClaimSamples, b.cfg.ClusterSizes, b.cfg.SimSizes, b.cfg.NATSamples)}
	if !b.cfg.NoData || !b.cfg.NoControl || !b.cfg.NoNames {
		if err := b.withDocker(ctx, r); err != nil {
			return nil, err
		}
	}
	if !b.cfg.NoClaims {
		c, err := b.claims(ctx)
		if err != nil {
			return nil, fmt.Errorf("claims: %w", err)
		}
		r.Claims = c
	}
	if !b.cfg.NoNAT {
		n, err := b.nat(ctx)
		if err != nil {
			return nil, fmt.Errorf("nat: %w", err)
		}
		r.NAT = n
	}
	if !b.cfg.NoData && !b.cfg.NoVM {
		// After the other cases, not among them: the VM takes both cores.
		b.logf("data plane: kernel WireGuard in a VM (emulated, without KVM)")
		c, err := b.vmDataPlane(ctx)
		if err != nil {
			return nil, fmt.Errorf("kernel WireGuard in a VM: %w", err)
		}
		r.DataPlane = append(r.DataPlane, c)
	}
	for _, n := range b.cfg.ClusterSizes {
		if b.cfg.NoControl {
			break
		}
		b.logf("convergence: %d hosts", n)
		c, err := b.convergence(ctx, n)
		if err != nil {
			return nil, fmt.Errorf("%d hosts: %w", n, err)
		}
		r.Convergence = append(r.Convergence, c)
	}
	for _, n := range b.cfg.SimSizes {
		if b.cfg.NoSim {
			break
		}
		b.logf("simulation: %d nodes in one process", n)
		s, err := simulate(ctx, n, b.cfg.SimQuick, b.simLog())
		r.Simulation = append(r.Simulation, s...)
		if err != nil {
			if ctx.Err() != nil {
				return nil, err
			}
			// A size this machine cannot simulate is a finding of the
			// report, not a reason to lose the rest of it.
			b.logf("simulating %d nodes failed: %v", n, err)
			r.SimErrors = append(r.SimErrors, fmt.Sprintf("%d nodes: %v", n, err))
		}
	}
	if n := b.cfg.NamesSimNodes; !b.cfg.NoNames && n > 0 {
		b.logf("simulation: names on %d nodes", n)
		s, err := simulateNames(ctx, n, b.cfg.SimQuick, b.simLog())
		if r.Names == nil {
			r.Names = &Names{}
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, err
			}
			b.logf("simulating names on %d nodes failed: %v", n, err)
			r.Names.SimError = fmt.Sprintf("%d nodes: %v", n, err)
		} else {
			r.Names.Sim = &s
		}
	}
	r.Targets = r.check()
	r.Took = time.Since(r.Started).Round(time.Second).String()
	return r, nil
}

// withDocker runs the parts that need two hosts with dockerd: the data
// plane and the first ping.
func (b *Bench) withDocker(ctx context.Context, r *Report) error {
	b.logf("two hosts with dockerd")
	l, err := lab.New(ctx, lab.Config{Hosts: 2, Binary: b.cfg.Binary, Docker: true, Engine: b.cfg.Engine, Log: b.cfg.Log})
	if err != nil {
		return err
	}
	defer l.Close()
	if err := l.StartAgents(ctx); err != nil {
		return err
	}
	if !b.cfg.NoData {
		if r.DataPlane, r.Limit, err = b.dataPlane(ctx, l); err != nil {
			return err
		}
	}
	if !b.cfg.NoControl {
		if r.FirstPing, err = b.firstPing(ctx, l); err != nil {
			return err
		}
		sc, err := b.startCost(ctx, l)
		if err != nil {
			return fmt.Errorf("container start cost: %w", err)
		}
		r.StartCost = &sc
	}
	if !b.cfg.NoNames {
		if r.Names, err = b.names(ctx, l); err != nil {
			return fmt.Errorf("names: %w", err)
		}
	}
	return nil
}

// dataPlane measures every case, round-robin so that drift of the machine
// spreads over all of them alike, then the limit they are measured against.
func (b *Bench) dataPlane(ctx context.Context, l *lab.Lab) ([]CaseResult, *Limit, error) {
	cases, err := b.setupCases(ctx, l)
	defer func() {
		for _, c := range cases {
			if c.stop != nil {
				c.stop()
			}
		}
	}()
	if err != nil {
		return nil, nil, err
	}
	h1, h2 := l.Hosts[0], l.Hosts[1]
	setGRO := func(ctx context.Context, on bool) error { return l.SetUnderlayGRO(ctx, on, h1, h2) }
	results, err := b.measureCases(ctx, cases, setGRO)
	if err != nil {
		return nil, nil, err
	}
	b.logf("data plane: ChaCha20-Poly1305 on one core, for the limit")
	lim := measureLimit(results, time.Second)
	return results, &lim, nil
}

// measureCases runs every case Runs times, round-robin, on each setting of
// the underlay (setGRO, when not nil and Config.GRO asks for it), and
// returns the medians: the cases on the underlay as it is first, then the
// same cases with GRO on.
func (b *Bench) measureCases(ctx context.Context, cases []*dataCase, setGRO func(context.Context, bool) error) ([]CaseResult, error) {
	underlays := []bool{false}
	if b.cfg.GRO && setGRO != nil {
		underlays = append(underlays, true)
		// Leave the underlay as the lab made it for the parts after.
		defer func() { _ = setGRO(context.WithoutCancel(ctx), false) }()
	}
	set := func(u int) error {
		if setGRO == nil {
			return nil
		}
		return setGRO(ctx, underlays[u])
	}
	n := len(cases)
	results := make([]CaseResult, n*len(underlays))
	for u, gro := range underlays {
		for i, c := range cases {
			results[u*n+i] = CaseResult{Name: c.name, Note: c.note, Skipped: c.skip, GRO: gro}
		}
	}
	for run := range b.cfg.Runs {
		// Each run starts with another underlay and one case later, so
		// that whatever a case leaves behind does not always weigh on the
		// same next one.
		for uk := range underlays {
			u := (uk + run) % len(underlays)
			if err := set(u); err != nil {
				return nil, err
			}
			for k := range cases {
				i := (k + run) % n
				c := cases[i]
				if c.skip != "" {
					continue
				}
				m, err := b.measure(ctx, c)
				if err != nil {
					return nil, fmt.Errorf("%s: %w", results[u*n+i].Label(), err)
				}
				results[u*n+i].Runs = append(results[u*n+i].Runs, m)
				b.logf("run %d %-26s 1 stream %.2f Gbit/s, 4 streams %.2f Gbit/s, ping %.3f ms (p99 %.3f), %.1f CPU s/GB",
					run+1, results[u*n+i].Label(), m.TCP1Gbps, m.TCP4Gbps, m.PingAvgMs, m.PingP99Ms, m.CPUSecPerGB)
			}
		}
	}
	for i := range results {
		results[i].summarize()
	}
	if b.cfg.Profile {
		for u := range underlays {
			if err := set(u); err != nil {
				return nil, err
			}
			for i, c := range cases {
				if c.skip != "" {
					continue
				}
				stop := startServer(ctx, c)
				p := b.profile(ctx, c)
				stop()
				results[u*n+i].Profile = &p
				b.logf("profile %-26s %s", results[u*n+i].Label(), p.summary())
			}
		}
	}
	return results, nil
}

// summarize sets the case's figures to the medians of its runs.
func (r *CaseResult) summarize() {
	pick := func(f func(Run) float64) float64 {
		var vs []float64
		for _, m := range r.Runs {
			vs = append(vs, f(m))
		}
		return median(vs)
	}
	if len(r.Runs) == 0 {
		return
	}
	r.TCP1Gbps = pick(func(m Run) float64 { return m.TCP1Gbps })
	r.TCP4Gbps = pick(func(m Run) float64 { return m.TCP4Gbps })
	r.PingAvgMs = pick(func(m Run) float64 { return m.PingAvgMs })
	r.PingP99Ms = pick(func(m Run) float64 { return m.PingP99Ms })
	r.CPUSecPerGB = pick(func(m Run) float64 { return m.CPUSecPerGB })
	r.UserSecPerGB = pick(func(m Run) float64 { return m.UserSecPerGB })
	r.SysSecPerGB = pick(func(m Run) float64 { return m.SysSecPerGB })
	r.SoftirqSecPerGB = pick(func(m Run) float64 { return m.SoftirqSecPerGB })
	r.EngineSecPerGB = pick(func(m Run) float64 { return m.EngineSecPerGB })
}

// underlayName names an underlay setting in the targets.
func underlayName(gro bool) string {
	if gro {
		return "underlay with GRO on"
	}
	return "the lab's underlay"
}

// dataCase is the named case on the underlay as the lab makes it.
func (r *Report) dataCase(name string) *CaseResult { return r.dataCaseOn(name, false) }

// dataCaseOn is the named case on the underlay with GRO on or off.
func (r *Report) dataCaseOn(name string, gro bool) *CaseResult {
	for i := range r.DataPlane {
		if r.DataPlane[i].Name == name && r.DataPlane[i].GRO == gro {
			return &r.DataPlane[i]
		}
	}
	return nil
}

func target(goal, measured string, met bool) Target {
	return Target{Goal: goal, Measured: measured, Met: met}
}

// check compares the measurements with the targets of the benchmark.
func (r *Report) check() []Target {
	var t []Target
	wm, wg := r.dataCase("wgmesh"), r.dataCase("wireguard-go")
	if wm != nil && wg != nil && len(wm.Runs) > 0 && len(wg.Runs) > 0 {
		ratio1, ratio4 := wm.TCP1Gbps/wg.TCP1Gbps, wm.TCP4Gbps/wg.TCP4Gbps
		t = append(t,
			target("wgmesh throughput ≥ 90 % of standalone wireguard-go (1 stream)", fmt.Sprintf("%.1f %%", ratio1*100), ratio1 >= 0.9),
			target("wgmesh throughput ≥ 90 % of standalone wireguard-go (4 streams)", fmt.Sprintf("%.1f %%", ratio4*100), ratio4 >= 0.9),
			target("wgmesh latency within 10 % of standalone wireguard-go (average)", fmt.Sprintf("%+.1f %%", (wm.PingAvgMs/wg.PingAvgMs-1)*100), wm.PingAvgMs <= wg.PingAvgMs*1.1),
		)
	}
	// Issue 16's aims: ahead of stock wireguard-go on either underlay, and
	// close to the machine's limit.
	for _, gro := range []bool{false, true} {
		wm, wg := r.dataCaseOn("wgmesh", gro), r.dataCaseOn("wireguard-go", gro)
		if wm == nil || wg == nil || len(wm.Runs) == 0 || len(wg.Runs) == 0 {
			continue
		}
		t = append(t, target(fmt.Sprintf("wgmesh ahead of standalone wireguard-go, %s (1 / 4 streams, medians)", underlayName(gro)),
			fmt.Sprintf("%.1f %% / %.1f %%", wm.TCP1Gbps/wg.TCP1Gbps*100, wm.TCP4Gbps/wg.TCP4Gbps*100),
			wm.TCP1Gbps > wg.TCP1Gbps && wm.TCP4Gbps > wg.TCP4Gbps))
	}
	if l := r.Limit; l != nil {
		for _, u := range l.Underlays {
			wm := r.dataCaseOn("wgmesh", u.GRO)
			if wm == nil || len(wm.Runs) == 0 || u.SecPerGB == 0 {
				continue
			}
			x := wm.CPUSecPerGB / u.SecPerGB
			t = append(t, target(fmt.Sprintf("wgmesh within 2× of the machine's limit in CPU per GB, %s", underlayName(u.GRO)),
				fmt.Sprintf("%.1f× (%.2f against %.2f s/GB)", x, wm.CPUSecPerGB, u.SecPerGB), x <= 2))
		}
	}
	if len(r.FirstPing.Samples) > 0 {
		t = append(t, target("docker run → first cross-host ping: median < 1 s",
			fmt.Sprintf("median %.0f ms, p95 %.0f ms", r.FirstPing.MedianMs, r.FirstPing.P95Ms), r.FirstPing.MedianMs < 1000))
	}
	if s := r.StartCost; s != nil && s.Ratio > 0 {
		t = append(t, target("docker run --rm on a wgmesh network ≤ 1.05× the same on a local bridge network (medians)",
			fmt.Sprintf("%.2f× (%.0f against %.0f ms)", s.Ratio, median(s.WgmeshMs), median(s.BridgeMs)), s.Ratio <= 1.05))
	}
	if c := r.Claims; c != nil {
		t = append(t, c.target())
	}
	if r.NAT != nil {
		t = append(t, r.NAT.targets()...)
	}
	for _, c := range r.Convergence {
		if c.Hosts == 25 {
			t = append(t,
				target("25 hosts converge < 3 s after start", fmt.Sprintf("%.0f ms", c.StartMs), c.StartMs < 3000),
				target("a joining host is reachable by all < 2 s", fmt.Sprintf("%.0f ms (peer of all after %.0f ms)", c.JoinReachableMs, c.JoinPeersMs), c.JoinReachableMs < 2000),
			)
		}
		if c.IdleRSSMiB > 0 && c.Hosts == r.Convergence[len(r.Convergence)-1].Hosts {
			t = append(t, target("agent RSS < 40 MiB idle", fmt.Sprintf("%.1f MiB", c.IdleRSSMiB), c.IdleRSSMiB < 40))
		}
	}
	if nm := r.Names; nm != nil && nm.AtServer.MedianMs > 0 {
		t = append(t, target("a name of the mesh answers in well under 1 ms at the agent's server (median, asked from a container)",
			fmt.Sprintf("%s (the server's own time %.1f µs)", msText(nm.AtServer.MedianMs), nm.HandlerMicros), nm.AtServer.MedianMs < 0.5))
	}
	return t
}

func machine() string {
	var kernel string
	if out, err := run(context.Background(), "uname", "-r"); err == nil {
		kernel = strings.TrimSpace(out)
	}
	return fmt.Sprintf("%d CPUs, Linux %s, %s", runtime.NumCPU(), kernel, runtime.Version())
}
