package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Write stores the report as name.md and name.json in dir.
func (r *Report) Write(dir, name string) (mdPath string, err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	j, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, name+".json"), append(j, '\n'), 0o644); err != nil {
		return "", err
	}
	drawn, err := r.WriteChart(filepath.Join(dir, name+".png"))
	if err != nil {
		return "", err
	}
	if drawn {
		r.chart = name + ".png"
	}
	mdPath = filepath.Join(dir, name+".md")
	return mdPath, os.WriteFile(mdPath, []byte(r.Markdown()), 0o644)
}

// Rerender reads a report from its JSON file, checks the targets again
// and writes it anew beside it, chart included: for a change of
// presentation without a new run.
func Rerender(jsonPath string) (mdPath string, err error) {
	b, err := os.ReadFile(jsonPath)
	if err != nil {
		return "", err
	}
	var r Report
	if err := json.Unmarshal(b, &r); err != nil {
		return "", fmt.Errorf("reading %s: %w", jsonPath, err)
	}
	r.Targets = r.check()
	return r.Write(filepath.Dir(jsonPath), strings.TrimSuffix(filepath.Base(jsonPath), ".json"))
}

// Markdown renders the report for people.
func (r *Report) Markdown() string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	p("# wgmesh benchmark, %s", r.Started.Format("2006-01-02 15:04 MST"))
	p("")
	p("Machine: %s. Configuration: %s. Took %s.", r.Machine, r.Config, r.Took)
	p("All cases ran in this one run on this one machine; compare them as ratios, not with other runs.")
	p("")
	p("## Targets")
	p("")
	p("| target | measured | met |")
	p("|---|---|---|")
	for _, t := range r.Targets {
		met := "yes"
		switch {
		case t.NA:
			met = "n/a"
		case !t.Met:
			met = "**no**"
		}
		p("| %s | %s | %s |", t.Goal, t.Measured, met)
	}
	if len(r.DataPlane) > 0 {
		p("")
		r.dataPlaneMarkdown(p)
	}
	if len(r.FirstPing.Samples) > 0 || len(r.Convergence) > 0 {
		p("")
		r.controlPlaneMarkdown(p)
	}
	if r.Claims != nil {
		p("")
		r.Claims.markdown(p)
	}
	if r.NAT != nil {
		p("")
		r.NAT.markdown(p)
	}
	if r.Names != nil {
		p("")
		r.namesMarkdown(p)
	}
	if len(r.Simulation) > 0 || len(r.SimErrors) > 0 {
		p("")
		p("## Simulation beyond this machine")
		p("")
		p(simulationTable(r.Simulation))
		for _, e := range r.SimErrors {
			p("- failed: %s", e)
		}
		if len(r.SimErrors) > 0 {
			p("")
			p("A size fails where one process cannot run that many memberlists at LAN timing on this machine's cores:")
			p("probes and their answers wait for a CPU past their timeouts, healthy nodes are declared dead, and")
			p("membership never settles. Such sizes need a machine with more cores.")
		}
	}
	return b.String()
}

func (r *Report) dataPlaneMarkdown(p func(string, ...any)) {
	p("## Data plane: two simulated hosts, medians of %d runs [their range]", len(firstRuns(r)))
	p("")
	if r.chart != "" {
		p("![throughput](%s)", r.chart)
		p("")
	}
	p("| case | TCP 1 stream | TCP 4 streams | vs wireguard-go (1 / 4) | ping avg | ping p99 | CPU s per GB |")
	p("|---|---|---|---|---|---|---|")
	for _, c := range r.DataPlane {
		if c.Skipped != "" {
			p("| %s | skipped: %s | | | | | |", c.Label(), c.Skipped)
			continue
		}
		vs := ""
		if c.Emulated {
			vs = "n/a: emulated"
		} else if ref := r.dataCaseOn("wireguard-go", c.GRO); ref != nil && len(ref.Runs) > 0 {
			vs = fmt.Sprintf("%.0f %% / %.0f %%", c.TCP1Gbps/ref.TCP1Gbps*100, c.TCP4Gbps/ref.TCP4Gbps*100)
		}
		p("| %s | %.2f Gbit/s%s | %.2f Gbit/s%s | %s | %.3f ms | %.3f ms | %.1f |", c.Label(), c.TCP1Gbps, c.spread(func(m Run) float64 { return m.TCP1Gbps }),
			c.TCP4Gbps, c.spread(func(m Run) float64 { return m.TCP4Gbps }), vs, c.PingAvgMs, c.PingP99Ms, c.CPUSecPerGB)
	}
	p("")
	noted := map[string]bool{}
	for _, c := range r.DataPlane {
		if !noted[c.Name] {
			p("- **%s**: %s", c.Name, c.Note)
			noted[c.Name] = true
		}
	}
	if r.dataCaseOn("raw underlay", true) != nil {
		p("- **GRO on**: the same case with GRO switched on along the underlay (each host's eth0 and its bridge port, with")
		p("  UDP GRO for forwarded packets), as a real NIC has it; the lab's veths have it off. Measured in the same rounds.")
	}
	p("")
	p("iperf3 TCP between the ends (%s); ping every 10 ms. CPU seconds per GB count the whole machine (both hosts", strings.Split(r.Config, ", ")[1])
	p("run on it), iperf3 included, per GB received.")
	r.cpuMarkdown(p)
	if r.Limit != nil {
		r.Limit.markdown(r, p)
	}
}

// spread is " [min–max]" of a figure over the case's runs, when there is
// more than one.
func (r CaseResult) spread(f func(Run) float64) string {
	if len(r.Runs) < 2 {
		return ""
	}
	lo, hi := f(r.Runs[0]), f(r.Runs[0])
	for _, m := range r.Runs[1:] {
		lo, hi = min(lo, f(m)), max(hi, f(m))
	}
	return fmt.Sprintf(" [%.2f–%.2f]", lo, hi)
}

// cpuMarkdown says where the CPU goes in each case (profile.go).
func (r *Report) cpuMarkdown(p func(string, ...any)) {
	p("")
	p("### Where the CPU goes: one TCP stream, CPU seconds per GB received (medians)")
	p("")
	p("| case | all | user | system | softirq | the WireGuard process |")
	p("|---|---|---|---|---|---|")
	for _, c := range r.DataPlane {
		if c.Skipped != "" || len(c.Runs) == 0 {
			continue
		}
		eng := "(kernel or none)"
		if c.EngineSecPerGB > 0 {
			eng = fmt.Sprintf("%.2f", c.EngineSecPerGB)
		}
		p("| %s | %.2f | %.2f | %.2f | %.2f | %s |", c.Label(), c.CPUSecPerGB, c.UserSecPerGB, c.SysSecPerGB, c.SoftirqSecPerGB, eng)
	}
	p("")
	p("User, system and softirq split the machine's time (/proc/stat); the WireGuard process is standalone")
	p("wireguard-go, or both wgmesh agents (their user and system time, /proc/PID/stat), a part of the rest.")
	header := false
	for _, c := range r.DataPlane {
		if c.Profile == nil {
			continue
		}
		if !header {
			p("")
			p("perf (cpu-clock, the whole machine) during one more run of each case, not counted above: the shares")
			p("of the samples by command and binary (`[kernel]`: that command's time in the kernel), and the")
			p("hottest functions of the WireGuard process.")
			header = true
		}
		p("")
		if c.Profile.Skipped != "" {
			p("- **%s**: no profile: %s", c.Label(), c.Profile.Skipped)
			continue
		}
		var rows []string
		for _, row := range c.Profile.ByCommand {
			rows = append(rows, fmt.Sprintf("%s %.1f %%", row.What, row.Percent))
		}
		p("- **%s**: %s", c.Label(), strings.Join(rows, "; "))
		if u := c.Profile.UDP; u != nil && u.Seen > 0 {
			p("  - UDP into the receiving host (its eth0, after GRO): %d of %d datagrams were batches larger than the MTU (largest %d bytes)",
				u.Batched, u.Seen, u.MaxBytes)
		}
		if len(c.Profile.Engine) > 0 {
			rows = rows[:0]
			for _, row := range c.Profile.Engine {
				rows = append(rows, fmt.Sprintf("`%s` %.1f %%", row.What, row.Percent))
			}
			p("  - its hottest functions (share of its samples): %s", strings.Join(rows, "; "))
		}
	}
}

func (r *Report) controlPlaneMarkdown(p func(string, ...any)) {
	p("## Control plane")
	if len(r.FirstPing.Samples) > 0 {
		p("")
		p("`docker run` to the first ping that crosses to another host (timed by the container itself): median **%.0f ms**, p95 %.0f ms, over %d samples: %s ms.",
			r.FirstPing.MedianMs, r.FirstPing.P95Ms, len(r.FirstPing.Samples), formatSamples(r.FirstPing.Samples))
	}
	if r.StartCost != nil {
		r.StartCost.markdown(p)
	}
	if len(r.Convergence) == 0 {
		return
	}
	p("")
	p("| hosts | full WireGuard peer sets after start | agents' CPU until then | joining host: peer of all | joining host: handshake with all | agent RSS (with peers) | agent RSS idle | gossip per node |")
	p("|---|---|---|---|---|---|---|---|")
	for _, c := range r.Convergence {
		p("| %d | %.0f ms | %.1f s | %.0f ms | %.0f ms | %.1f MiB | %.1f MiB | %.0f B/s |", c.Hosts, c.StartMs, c.StartCPUSeconds, c.JoinPeersMs, c.JoinReachableMs, c.RSSMiB, c.IdleRSSMiB, c.GossipBytesPerSec)
	}
	p("")
	p("Each host is a network namespace running a real agent with userspace WireGuard; they start together and each creates")
	p("the network and attaches an endpoint (a container's first, which claims the host's block) as soon as it answers. Gossip per node is every byte on the gossip port of one host (both directions,")
	p("memberlist's probes included) while the cluster is idle. Where the agents' CPU time until convergence comes")
	p("close to this machine's cores times the time it took, the agents were waiting for a CPU, which hosts of their")
	p("own would not.")
}

func firstRuns(r *Report) []Run {
	for _, c := range r.DataPlane {
		if len(c.Runs) > 0 {
			return c.Runs
		}
	}
	return nil
}

func formatSamples(vs []float64) string {
	s := make([]string, len(vs))
	for i, v := range vs {
		s[i] = fmt.Sprintf("%.0f", v)
	}
	return strings.Join(s, ", ")
}

func (c *Claims) markdown(p func(string, ...any)) {
	p("## Claims: creating a network and its first containers")
	p("")
	base := c.Baseline
	if base == nil {
		p("Current build %s only; no baseline: %s.", c.Current.Build, c.BaselineSkipped)
	} else {
		p("Current build %s against the baseline %s, each in a lab of its own, one after the other.", c.Current.Build, base.Build)
	}
	for _, run := range []*ClaimRun{&c.Current, base} {
		if run == nil {
			continue
		}
		role := ","
		if run.Leader != "" {
			role = fmt.Sprintf(", a follower of the consensus leader %s,", run.Leader)
			if run.Leader == run.Host {
				role = ", the consensus leader,"
			}
		}
		p("%s: networks created new and containers run on %s%s copies created on %s.", run.Build, run.Host, role, run.CopyHost)
	}
	n := 0
	if op := c.Current.Op(opCreateNew); op != nil {
		n = len(op.Samples)
	}
	p("Wall time of the docker CLI command until it returns, %d samples each (p95 of so few is about their maximum):", n)
	p("")
	if base == nil {
		p("| operation | median | p95 |")
		p("|---|---|---|")
	} else {
		p("| operation | current median | current p95 | baseline median | baseline p95 | current / baseline (median) |")
		p("|---|---|---|---|---|---|")
	}
	for _, cur := range c.Current.Ops {
		if base == nil {
			p("| %s | %.0f ms | %.0f ms |", cur.Op, cur.MedianMs, cur.P95Ms)
			continue
		}
		b := base.Op(cur.Op)
		if b == nil || len(b.Samples) == 0 {
			p("| %s | %.0f ms | %.0f ms | | | |", cur.Op, cur.MedianMs, cur.P95Ms)
			continue
		}
		p("| %s | %.0f ms | %.0f ms | %.0f ms | %.0f ms | %.2f |", cur.Op, cur.MedianMs, cur.P95Ms, b.MedianMs, b.P95Ms, cur.MedianMs/b.MedianMs)
	}
	p("")
	p("The plugin calls of each operation, as the agent of its host timed them (medians; the rest of the wall time is")
	p("the docker CLI, dockerd and the container's start):")
	p("")
	if base == nil {
		p("| operation | plugin call | median | p95 |")
		p("|---|---|---|---|")
	} else {
		p("| operation | plugin call | current median | current p95 | baseline median | baseline p95 |")
		p("|---|---|---|---|---|---|")
	}
	for _, cur := range c.Current.Ops {
		calls := map[string][2]*CallStat{}
		var names []string
		add := func(run *ClaimRun, i int) {
			op := run.Op(cur.Op)
			if op == nil {
				return
			}
			for k := range op.Calls {
				cs := &op.Calls[k]
				v, seen := calls[cs.Call]
				if !seen {
					names = append(names, cs.Call)
				}
				v[i] = cs
				calls[cs.Call] = v
			}
		}
		add(&c.Current, 0)
		if base != nil {
			add(base, 1)
		}
		slices.Sort(names)
		for _, name := range names {
			v := calls[name]
			cell := func(cs *CallStat) string {
				if cs == nil {
					return "– | –"
				}
				return fmt.Sprintf("%s | %s", fmtMs(cs.MedianMs), fmtMs(cs.P95Ms))
			}
			if base == nil {
				p("| %s | %s | %s |", cur.Op, name, cell(v[0]))
			} else {
				p("| %s | %s | %s | %s |", cur.Op, name, cell(v[0]), cell(v[1]))
			}
		}
	}
	p("")
	p("Each build runs in a lab of three hosts (two with dockerd, one with only an agent), agents with")
	p("`--sync-networks=false`, so the copy is created by hand. Every sample uses a subnet new to the cluster and")
	p("removes its containers and networks afterwards; one sample before them, not counted, takes each dockerd's first")
	p("use of the plugin. The baseline claims an address block whenever a host creates a network (its gateway came")
	p("from a block of the host), and none for the first container. The current build commits a network new to the")
	p("cluster, with one gateway for all hosts, when it is created (a copy needs no consensus), and claims a block at")
	p("a host's first container; a follower's commands go through the leader, and it waits until it has applied them.")
}

// fmtMs shows a short duration with the precision it needs.
func fmtMs(v float64) string {
	if v < 10 {
		return fmt.Sprintf("%.2f ms", v)
	}
	return fmt.Sprintf("%.0f ms", v)
}
