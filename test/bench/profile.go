package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
)

// Where the CPU goes. Every measured TCP run splits the machine's CPU time
// (both hosts share it) into user, system and softirq time, and counts the
// time of the process that does the WireGuard work (standalone
// wireguard-go, or the wgmesh agents), per GB received. One more run per
// case, not counted in the medians, samples the whole machine with perf
// (cpu-clock, so it works without hardware counters): by command and
// binary, and the hottest functions of the WireGuard process.

// cpuSplit is CPU time by kind, in seconds.
type cpuSplit struct {
	User, System, Softirq float64
}

// readCPUSplit reads the machine's CPU time so far from /proc/stat:
// user+nice, system, irq+softirq.
func readCPUSplit() cpuSplit {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuSplit{}
	}
	f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
	v := func(i int) float64 {
		if i >= len(f) {
			return 0
		}
		n, _ := strconv.ParseFloat(f[i], 64)
		return n / 100 // USER_HZ
	}
	// cpu user nice system idle iowait irq softirq steal ...
	return cpuSplit{User: v(1) + v(2), System: v(3), Softirq: v(6) + v(7)}
}

func (a cpuSplit) sub(b cpuSplit) cpuSplit {
	return cpuSplit{a.User - b.User, a.System - b.System, a.Softirq - b.Softirq}
}

// procCPU is the CPU time (user and system, all threads) of the processes
// pids so far, in seconds.
func procCPU(pids []int) float64 {
	var total float64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// The command may hold spaces: fields count from after its ')'.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		// utime and stime are fields 14 and 15 of stat, 12 and 13 here.
		if len(f) < 13 {
			continue
		}
		u, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		total += (u + st) / 100
	}
	return total
}

// ProfileRow is one line of a perf report: a share of the samples.
type ProfileRow struct {
	What    string  `json:"what"`
	Percent float64 `json:"percent"`
}

// Profile is what perf saw during one TCP run of a case.
type Profile struct {
	// ByCommand: the samples by command and binary ("[kernel]" for the
	// kernel's part of a command).
	ByCommand []ProfileRow `json:"by_command"`
	// Engine: the hottest functions of the WireGuard process.
	Engine []ProfileRow `json:"engine,omitempty"`
	// Skipped says why there is no profile.
	Skipped string `json:"skipped,omitempty"`
	// UDP: the datagrams the receiving host's eth0 took in during the
	// run, and how many of them were batches larger than the underlay's
	// MTU (a sender's UDP GSO carried whole, or the receiver's GRO).
	UDP *UDPBatches `json:"udp,omitempty"`
}

// UDPBatches counts UDP datagrams as a packet socket sees them, after
// GRO: one larger than the link's MTU is a batch of segments.
type UDPBatches struct {
	Seen    int `json:"seen"`
	Batched int `json:"batched"`
	// MaxBytes is the largest UDP payload seen.
	MaxBytes int `json:"max_bytes"`
}

// profile runs one TCP stream of the case under perf and reads what it
// saw. The case's server must be running.
func (b *Bench) profile(ctx context.Context, c *dataCase) Profile {
	perf, err := exec.LookPath("perf")
	if err != nil {
		return Profile{Skipped: "perf is not installed"}
	}
	dir, err := os.MkdirTemp("", "wgmesh-bench-perf-")
	if err != nil {
		return Profile{Skipped: err.Error()}
	}
	defer os.RemoveAll(dir)
	data := filepath.Join(dir, "perf.data")
	secs := strconv.Itoa(int(b.cfg.Duration.Seconds()))
	rec := exec.CommandContext(ctx, perf, "record", "-q", "-e", "cpu-clock", "-F", "499", "-a", "-o", data, "--", "sleep", secs)
	if err := rec.Start(); err != nil {
		return Profile{Skipped: "perf record: " + err.Error()}
	}
	time.Sleep(100 * time.Millisecond)
	stopCapture := captureUDP(ctx, c.rx, filepath.Join(dir, "udp.pcap"))
	_, _, ierr := b.iperf(ctx, c, 1)
	udp := stopCapture()
	if err := rec.Wait(); err != nil {
		return Profile{Skipped: "perf record: " + err.Error()}
	}
	if ierr != nil {
		return Profile{Skipped: "iperf3 under perf: " + ierr.Error()}
	}
	p := Profile{UDP: udp}
	out, err := run(ctx, perf, "report", "-i", data, "--stdio", "--sort", "comm,dso", "--percent-limit", "1.5")
	if err != nil {
		return Profile{Skipped: "perf report: " + err.Error()}
	}
	p.ByCommand = parsePerf(out, 2)
	if c.engineComm != "" {
		out, err := run(ctx, perf, "report", "-i", data, "--stdio", "--comms", c.engineComm, "--sort", "sym", "--percent-limit", "1.5")
		if err == nil {
			p.Engine = parsePerf(out, 1)
		}
	}
	return p
}

// udpCapture is how many datagrams captureUDP records: enough to tell
// batches from single packets, few enough to weigh little on the run.
const udpCapture = 2000

// captureUDP records the headers of the first UDP datagrams h's eth0
// takes in, until the returned func, which counts them. Nil h, or no
// tcpdump, counts nothing.
func captureUDP(ctx context.Context, h *lab.Host, file string) func() *UDPBatches {
	tcpdump, err := exec.LookPath("tcpdump")
	if h == nil || err != nil {
		return func() *UDPBatches { return nil }
	}
	cctx, cancel := context.WithCancel(ctx)
	cmd := exec.CommandContext(cctx, "ip", "netns", "exec", h.NetNS, tcpdump, "-n", "-i", "eth0", "-Q", "in",
		"-s", "96", "-c", strconv.Itoa(udpCapture), "-w", file, "udp")
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	if err := cmd.Start(); err != nil {
		cancel()
		return func() *UDPBatches { return nil }
	}
	return func() *UDPBatches {
		// tcpdump stops by itself after udpCapture datagrams; a case
		// with fewer (no UDP at all) is interrupted, which flushes.
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(time.Second):
			cancel()
			<-done
		}
		cancel()
		out, err := run(ctx, tcpdump, "-n", "-q", "-r", file)
		if err != nil {
			return nil
		}
		u := countUDP(out, lab.UnderlayMTU)
		return &u
	}
}

var udpLenRE = regexp.MustCompile(`UDP, length (\d+)`)

// countUDP reads tcpdump's lines "... UDP, length N" and counts the
// datagrams whose IP packet (N plus 28 bytes of IPv4 and UDP headers)
// exceeds mtu.
func countUDP(out string, mtu int) UDPBatches {
	var u UDPBatches
	for _, m := range udpLenRE.FindAllStringSubmatch(out, -1) {
		n, _ := strconv.Atoi(m[1])
		u.Seen++
		if n+28 > mtu {
			u.Batched++
		}
		u.MaxBytes = max(u.MaxBytes, n)
	}
	return u
}

var perfLineRE = regexp.MustCompile(`^\s*([0-9.]+)%\s+(.*\S)\s*$`)

// parsePerf reads a perf report's lines "  12.34%  col1  col2 ..." with
// cols columns after the share, dropping the "[k]" marks of symbols.
func parsePerf(out string, cols int) []ProfileRow {
	var rows []ProfileRow
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		m := perfLineRE.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		pct, _ := strconv.ParseFloat(m[1], 64)
		f := strings.Fields(m[2])
		if len(f) == 0 {
			continue
		}
		what := strings.Join(f, " ")
		if cols == 2 && len(f) >= 2 {
			dso := f[len(f)-1]
			if dso == "[kernel.kallsyms]" {
				dso = "[kernel]"
			}
			what = strings.Join(f[:len(f)-1], " ") + " " + dso
		}
		if cols == 1 && len(f) >= 2 && strings.HasPrefix(f[0], "[") {
			what = strings.Join(f[1:], " ")
		}
		rows = append(rows, ProfileRow{What: what, Percent: pct})
	}
	return rows
}

// summary is a line for the log: the three biggest shares.
func (p Profile) summary() string {
	if p.Skipped != "" {
		return "skipped: " + p.Skipped
	}
	var parts []string
	for i, r := range p.ByCommand {
		if i == 3 {
			break
		}
		parts = append(parts, fmt.Sprintf("%s %.0f %%", r.What, r.Percent))
	}
	return strings.Join(parts, ", ")
}
