// Command wgmesh-lab runs wgmesh on simulated hosts on this machine.
//
//	wgmesh-lab demo [-hosts 3] [-binary bin/wgmesh] [-keep]
//	wgmesh-lab bench [flags]
//	wgmesh-lab soak [-steps 3000] [-seed N] [-timeout 60m] [-out bench/results] [-strict 1]
//
// demo builds the hosts (network namespaces, each with its own dockerd
// and wgmesh agent, joined by gossip), creates one wgmesh network on
// all of them, starts a container on each, and shows cross-host pings
// and `wgmesh status`. It needs root. bench runs the benchmarks (make
// bench); soak runs mesh's randomized safety test for many steps and
// writes a report (make soak).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/wgmesh/wgmesh/test/bench"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
	"github.com/wgmesh/wgmesh/test/vm"
)

func main() {
	// The benchmark boots a VM whose init is this binary.
	if vm.IsGuest() {
		vm.GuestMain()
	}
	if len(os.Args) >= 2 && os.Args[1] == bench.GuestCommand {
		os.Exit(benchGuestMain(os.Args[2:]))
	}
	if len(os.Args) >= 2 && os.Args[1] == "bench" {
		os.Exit(benchMain(os.Args[2:]))
	}
	if len(os.Args) >= 2 && os.Args[1] == "soak" {
		os.Exit(soakMain(os.Args[2:]))
	}
	if len(os.Args) < 2 || os.Args[1] != "demo" {
		fmt.Fprintln(os.Stderr, "usage: wgmesh-lab demo [-hosts N] [-binary PATH] [-keep]\n       wgmesh-lab bench [-smoke] [-binary PATH] [-wireguard-go PATH] [-out DIR] [-runs N] [-duration D] [-parts data,control,claims,sim,nat] [-vm=false] [-baseline PATH -baseline-rev REV] [-claim-samples N] [-nat-samples N] [-clusters N,...] [-sim-sizes N,...]\n       wgmesh-lab soak [-steps N] [-seed N] [-timeout D] [-out DIR] [-go PATH] [-race] [-strict 1|kind,...]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet("demo", flag.ExitOnError)
	hosts := fs.Int("hosts", 3, "number of simulated hosts")
	binary := fs.String("binary", "bin/wgmesh", "wgmesh binary")
	keep := fs.Bool("keep", false, "leave the lab running until interrupted")
	_ = fs.Parse(os.Args[2:])
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := demo(ctx, *hosts, *binary, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) {
	fmt.Printf("\n==> "+format+"\n", args...)
}

func demo(ctx context.Context, n int, binary string, keep bool) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("the demo builds network namespaces and runs dockerd: run it as root")
	}
	step("building %d simulated hosts, each with its own dockerd", n)
	l, err := lab.New(ctx, lab.Config{Hosts: n, Binary: binary, Docker: true, SyncNetworks: true, Log: os.Stdout})
	if err != nil {
		return err
	}
	defer func() {
		step("tearing the lab down")
		if err := l.Close(); err != nil {
			fmt.Println("teardown:", err)
		}
	}()
	for _, h := range l.Hosts {
		fmt.Printf("    %s  %-14s  namespace %s  docker -H unix://%s\n", h.Name, h.Addr, h.NetNS, h.DockerSock())
	}

	step("starting a wgmesh agent on every host (gossip encrypted with %s)", l.KeyFile)
	if err := l.StartAgents(ctx); err != nil {
		return err
	}

	step("on %s only: docker network create -d wgmesh --ipam-driver wgmesh --subnet 10.60.0.0/16 app", l.Hosts[0].Name)
	start := time.Now()
	if err := l.CreateNetwork(ctx, "app", "10.60.0.0/16", nil, l.Hosts[0]); err != nil {
		return err
	}
	for _, h := range l.Hosts[1:] {
		if err := poll.Until(ctx, 60*time.Second, "network app on "+h.Name, func() error {
			_, err := h.Docker(ctx, "network", "inspect", "app")
			return err
		}); err != nil {
			return err
		}
		fmt.Printf("    network app appeared on %s after %s (the agents created it through Docker)\n", h.Name, time.Since(start).Round(time.Millisecond))
	}

	step("on every host: docker run -d --network app --name web<N> %s httpd -f -p 80", lab.Image)
	ips := make([]string, n)
	for i, h := range l.Hosts {
		name := fmt.Sprintf("web%d", i+1)
		cmd := []string{"sh", "-c", fmt.Sprintf("echo hello from %s > /www/index.html && exec httpd -f -p 80 -h /www", h.Name)}
		if ips[i], err = h.RunContainer(ctx, name, "app", nil, cmd...); err != nil {
			return err
		}
		fmt.Printf("    %s on %s: %s\n", name, h.Name, ips[i])
	}

	step("cross-host ping (busybox ping inside the containers)")
	for i, h := range l.Hosts {
		for j := range l.Hosts {
			if i == j {
				continue
			}
			out, err := h.Docker(ctx, "exec", fmt.Sprintf("web%d", i+1), "ping", "-c", "3", "-W", "2", ips[j])
			if err != nil {
				return fmt.Errorf("web%d -> web%d: %w", i+1, j+1, err)
			}
			fmt.Printf("    web%d@%s -> web%d@%s (%s): %s\n", i+1, h.Name, j+1, l.Hosts[j].Name, ips[j], pingSummary(out))
		}
	}

	step("cross-host HTTP by name: web1 fetches every other web server (dockerd runs with --dns %s, the agent's DNS server)", lab.DNSAddr)
	for j := 1; j < n; j++ {
		url := fmt.Sprintf("http://web%d/", j+1)
		var out string
		if err := poll.Until(ctx, 10*time.Second, "web1 -> "+url, func() error {
			var err error
			out, err = l.Hosts[0].Docker(ctx, "exec", "web1", "wget", "-qO-", url)
			return err
		}); err != nil {
			return err
		}
		fmt.Printf("    %s (%s) -> %s", url, ips[j], out)
	}

	step("wgmesh status on %s", l.Hosts[0].Name)
	out, err := l.Hosts[0].Wgmesh(ctx, "status")
	fmt.Print(indent(out))
	if err != nil {
		return fmt.Errorf("status reports a problem: %w", err)
	}

	if keep {
		step("lab is running; Ctrl-C tears it down. Try:\n    docker -H unix://%s exec web1 ping %s", l.Hosts[0].DockerSock(), ips[n-1])
		<-ctx.Done()
	}
	return nil
}

// benchMain runs the benchmarks and writes the report.
func benchMain(args []string) int {
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	smoke := fs.Bool("smoke", false, "one tiny case of each kind, to check the benchmark works")
	binary := fs.String("binary", "bin/wgmesh", "wgmesh binary")
	wg := fs.String("wireguard-go", "bin/wireguard-go", "wireguard-go binary, built from the module wgmesh uses")
	out := fs.String("out", "bench/results", "directory for the report")
	runs := fs.Int("runs", 0, "runs per data-plane case (0: the default of the run)")
	duration := fs.Duration("duration", 0, "length of each iperf3 test (0: the default of the run)")
	parts := fs.String("parts", "data,control,claims,sim,nat,names", "which parts to run: data, control, claims, sim, nat, names")
	baseline := fs.String("baseline", "", "wgmesh binary of an earlier commit whose network creation and first containers are measured beside -binary's (claims part; a missing file is skipped with a note)")
	baselineRev := fs.String("baseline-rev", "", "the commit -baseline is built from, for the report")
	claimSamples := fs.Int("claim-samples", 0, "samples per build of the claims part (0: the default of the run)")
	natSamples := fs.Int("nat-samples", 0, "samples of each kind of path in the nat part (0: the default of the run)")
	clusters := fs.String("clusters", "", "cluster sizes for convergence, comma-separated (empty: the default of the run)")
	sims := fs.String("sim-sizes", "", "simulated cluster sizes, comma-separated (empty: the default of the run)")
	render := fs.String("render", "", "re-render the report in this JSON file (targets re-checked) and exit")
	withVM := fs.Bool("vm", true, "measure kernel WireGuard in a VM (emulated; part of the data plane)")
	gro := fs.Bool("gro", true, "measure every data-plane case also with GRO on along the underlay, as a real NIC has it")
	namesSim := fs.Int("names-sim", -1, "nodes of the names simulation (0: none; default: the run's)")
	engineDir := fs.String("engine-dir", "", "run the hosts' Docker from this directory (.ci/engine29.sh's) instead of Debian's docker.io")
	_ = fs.Parse(args)
	if *render != "" {
		path, err := bench.Rerender(*render)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 1
		}
		fmt.Println("report:", path)
		return 0
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: needs root (network namespaces, dockerd)")
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cfg := bench.Full()
	name := time.Now().Format("2006-01-02T150405")
	if *smoke {
		cfg, name = bench.Smoke(), "smoke"
	}
	cfg.Binary, cfg.WireguardGo, cfg.Log = *binary, *wg, os.Stdout
	cfg.NoVM = !*withVM
	cfg.GRO = *gro
	cfg.Baseline, cfg.BaselineRev = *baseline, *baselineRev
	if *claimSamples > 0 {
		cfg.ClaimSamples = *claimSamples
	}
	if *natSamples > 0 {
		cfg.NATSamples = *natSamples
	}
	if *engineDir != "" {
		cfg.Engine = lab.DirEngine("29", *engineDir)
	}
	if *namesSim >= 0 {
		cfg.NamesSimNodes = *namesSim
	}
	if *runs > 0 {
		cfg.Runs = *runs
	}
	if *duration > 0 {
		cfg.Duration = *duration
	}
	for _, l := range []struct {
		flag string
		dst  *[]int
	}{{*clusters, &cfg.ClusterSizes}, {*sims, &cfg.SimSizes}} {
		if l.flag == "" {
			continue
		}
		sizes, err := intList(l.flag)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			return 2
		}
		*l.dst = sizes
	}
	if err := cfg.SetParts(*parts); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 2
	}
	r, err := bench.New(cfg).Run(ctx)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench failed:", err)
		return 1
	}
	path, err := r.Write(*out, name)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench: writing the report:", err)
		return 1
	}
	fmt.Print("\n" + r.Markdown())
	fmt.Println("\nreport:", path)
	return 0
}

// soakMain runs the safety test for many steps and writes its report.
func soakMain(args []string) int {
	fs := flag.NewFlagSet("soak", flag.ExitOnError)
	steps := fs.Int("steps", 3000, "steps of the randomized safety test")
	seedFlag := fs.String("seed", "", "its seed (empty: from the clock)")
	timeout := fs.Duration("timeout", 60*time.Minute, "go test's -timeout")
	out := fs.String("out", "bench/results", "directory for the report, <time>-soak.md")
	logDir := fs.String("log-dir", "bin/soak", "directory for the test's whole output, <time>.log")
	goCmd := fs.String("go", "go", "the go command")
	race := fs.Bool("race", false, "with the race detector (several times slower)")
	strict := fs.String("strict", "", `WGMESH_SAFETY_STRICT: "1" for every fault kind that finds a hole not fixed yet, or "kind,kind"`)
	_ = fs.Parse(args)
	if *steps < 1 || *timeout <= 0 {
		fmt.Fprintln(os.Stderr, "soak: -steps and -timeout must be positive")
		return 2
	}
	seed := uint64(time.Now().UnixNano())
	if *seedFlag != "" {
		v, err := strconv.ParseUint(*seedFlag, 10, 64)
		if err != nil {
			fmt.Fprintf(os.Stderr, "soak: -seed %q: want an unsigned integer\n", *seedFlag)
			return 2
		}
		seed = v
	}
	name := time.Now().Format("2006-01-02T150405")
	for _, d := range []string{*out, *logDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "soak:", err)
			return 1
		}
	}
	cfg := bench.SoakConfig{Go: *goCmd, Dir: ".", Steps: *steps, Seed: seed, Timeout: *timeout,
		LogFile: filepath.Join(*logDir, name+".log"), Log: os.Stdout, Strict: *strict}
	if *race {
		cfg.TestFlags = append(cfg.TestFlags, "-race")
	}
	fmt.Printf("soak: seed %d, %d steps, timeout %s; output in %s\n", seed, *steps, *timeout, cfg.LogFile)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	r, err := bench.Soak(ctx, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		if r == nil {
			return 1
		}
	}
	path := filepath.Join(*out, name+"-soak.md")
	if err := os.WriteFile(path, []byte(r.Markdown()), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "soak: writing the report:", err)
		return 1
	}
	fmt.Printf("soak: %s: seed %d, %d of %d steps; report: %s\n", r.Result, seed, r.StepsDone, *steps, path)
	if r.Result != "passed" {
		return 1
	}
	return 0
}

// benchGuestMain is the benchmark's part inside the VM.
func benchGuestMain(args []string) int {
	fs := flag.NewFlagSet(bench.GuestCommand, flag.ExitOnError)
	cfg := bench.Smoke()
	fs.StringVar(&cfg.Binary, "binary", "bin/wgmesh", "wgmesh binary (for the lab's cluster key)")
	fs.IntVar(&cfg.Runs, "runs", cfg.Runs, "runs per case")
	fs.DurationVar(&cfg.Duration, "duration", cfg.Duration, "length of each iperf3 test")
	fs.IntVar(&cfg.Pings, "pings", cfg.Pings, "pings per latency test")
	_ = fs.Parse(args)
	cfg.Log = os.Stdout
	if err := bench.GuestDataPlane(context.Background(), cfg); err != nil {
		fmt.Fprintln(os.Stderr, "bench in the VM:", err)
		return 1
	}
	return 0
}

// intList parses a comma-separated list of positive integers.
func intList(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q: want positive integers separated by commas", s)
		}
		out = append(out, n)
	}
	return out, nil
}

// pingSummary pulls "round-trip min/avg/max" out of busybox ping output.
func pingSummary(out string) string {
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "packet loss") || strings.HasPrefix(line, "round-trip") {
			out = strings.TrimSpace(line)
		}
	}
	return out
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ") + "\n"
}
