package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// Claims is what creating a network and starting its first containers
// costs, for the build under test and for a baseline build of an earlier
// commit, each in a lab of its own, one after the other.
type Claims struct {
	Current  ClaimRun  `json:"current"`
	Baseline *ClaimRun `json:"baseline,omitempty"`
	// BaselineSkipped says why no baseline was measured.
	BaselineSkipped string `json:"baseline_skipped,omitempty"`
}

// ClaimRun is one build's measurements.
type ClaimRun struct {
	// Build is what the binary's `wgmesh version` printed.
	Build  string `json:"build"`
	Binary string `json:"binary"`
	// Host is where networks were created new and containers run;
	// CopyHost where the copies were created. Leader is the consensus
	// leader of the current build's cluster (the baseline has none):
	// Host is a follower where possible, as most hosts of a cluster are,
	// whose claims go to the leader and come back.
	Host     string    `json:"host"`
	CopyHost string    `json:"copy_host"`
	Leader   string    `json:"leader,omitempty"`
	Ops      []ClaimOp `json:"ops"`
}

// ClaimOp is one operation, timed over every sample.
type ClaimOp struct {
	Op string `json:"op"`
	Stat
	// Calls are the plugin calls the operation made, as the agent of the
	// host it ran on timed them (its debug log's took=).
	Calls []CallStat `json:"plugin_calls,omitempty"`
}

// CallStat is one plugin call within an operation.
type CallStat struct {
	Call string `json:"call"`
	Stat
}

// Stat is a median and p95 over samples, in milliseconds.
type Stat struct {
	MedianMs float64   `json:"median_ms"`
	P95Ms    float64   `json:"p95_ms"`
	Samples  []float64 `json:"samples_ms"`
}

func newStat(samples []float64) Stat {
	s := Stat{Samples: samples}
	if len(samples) > 0 {
		sorted := slices.Clone(samples)
		slices.Sort(sorted)
		s.MedianMs, s.P95Ms = median(sorted), percentile(sorted, 0.95)
	}
	return s
}

// The operations, in the order of a sample.
const (
	opCreateNew  = "network create, new to the cluster"
	opCreateCopy = "network create, copy of a cluster network"
	opRunFirst   = "first docker run -d"
	opRunSecond  = "second docker run -d"
	// opRunCopy is the first container on the copy's host: in the
	// current build's cluster, the leader's own claim.
	opRunCopy = "first docker run -d on the copy's host"
	// opCreateAndRun is derived: opCreateNew plus opRunFirst of the same
	// sample. Where the claim of a block happens moved from one to the
	// other between the builds; this is what a user waits for in all.
	opCreateAndRun = "network create + first docker run"
)

var claimOps = []string{opCreateNew, opCreateCopy, opRunFirst, opRunSecond, opRunCopy}

// Op returns the operation named op, or nil.
func (r *ClaimRun) Op(op string) *ClaimOp {
	for i := range r.Ops {
		if r.Ops[i].Op == op {
			return &r.Ops[i]
		}
	}
	return nil
}

// claimHosts: two hosts with dockerd where the operations run, and one
// with only an agent, so that both builds decide in a cluster of three,
// the smallest that keeps working with a host down.
const claimHosts, claimDockerHosts = 3, 2

// claims measures the current build, then the baseline.
func (b *Bench) claims(ctx context.Context) (*Claims, error) {
	// Every sample takes a /16 of its own, 10.100.0.0/16 and up.
	if b.cfg.ClaimSamples < 1 || b.cfg.ClaimSamples > 150 {
		return nil, fmt.Errorf("%d claim samples: want 1 to 150", b.cfg.ClaimSamples)
	}
	c := &Claims{}
	b.logf("claims: current build %s", b.cfg.Binary)
	cur, err := b.claimRun(ctx, b.cfg.Binary, false)
	if err != nil {
		return nil, fmt.Errorf("current build: %w", err)
	}
	c.Current = *cur
	switch {
	case b.cfg.Baseline == "":
		c.BaselineSkipped = "no baseline binary given (-baseline)"
	default:
		if _, err := os.Stat(b.cfg.Baseline); err != nil {
			c.BaselineSkipped = fmt.Sprintf("no baseline binary %s: make builds it from commit %s of the git history, "+
				"which this clone does not have (a shallow clone?)", b.cfg.Baseline, b.cfg.BaselineRev)
			break
		}
		b.logf("claims: baseline build %s", b.cfg.Baseline)
		base, err := b.claimRun(ctx, b.cfg.Baseline, true)
		var skip *skipError
		switch {
		case errors.As(err, &skip):
			c.BaselineSkipped = skip.why
		case err != nil:
			return nil, fmt.Errorf("baseline build: %w", err)
		default:
			c.Baseline = base
		}
	}
	if c.BaselineSkipped != "" {
		b.logf("claims: baseline skipped: %s", c.BaselineSkipped)
	}
	return c, nil
}

// skipError is a reason not to measure a build that is not a failure of
// the run.
type skipError struct{ why string }

func (e *skipError) Error() string { return e.why }

// claimRun measures one build in a lab of its own. The baseline predates
// the cluster's consensus: it is ready once its members see each other.
func (b *Bench) claimRun(ctx context.Context, binary string, baseline bool) (*ClaimRun, error) {
	version, err := run(ctx, binary, "version")
	if err != nil {
		return nil, err
	}
	r := &ClaimRun{Build: strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(version), "wgmesh")), Binary: binary}
	l, err := lab.New(ctx, lab.Config{Hosts: claimHosts, DockerHosts: claimDockerHosts, Binary: binary, Docker: true, Log: b.cfg.Log,
		NoNames: baseline})
	if err != nil {
		return nil, err
	}
	defer l.Close()
	if baseline {
		// An older agent refuses flags it does not know: say which,
		// rather than fail to start.
		if missing, err := unknownFlags(ctx, binary, l.Hosts[0].AgentArgs()); err != nil {
			return nil, err
		} else if len(missing) > 0 {
			return nil, &skipError{fmt.Sprintf("the lab gives agents flags the baseline %s lacks: %s", r.Build, strings.Join(missing, ", "))}
		}
	}
	if err := l.StartAgents(ctx); err != nil {
		return nil, err
	}
	if err := waitCluster(ctx, l.Hosts, !baseline); err != nil {
		return nil, err
	}
	// The lowest-named node starts the cluster and leads it: h1.
	h1, h2 := l.Hosts[1], l.Hosts[0]
	if !baseline {
		st, err := driver.NewControlClient(h1.ControlSock()).Status(ctx)
		if err != nil {
			return nil, err
		}
		r.Leader = st.Consensus.Leader
		if r.Leader == h1.Name {
			h1, h2 = h2, h1
		}
	}
	r.Host, r.CopyHost = h1.Name, h2.Name

	// The first use of the plugin by each dockerd, and its first
	// container, pay for discovery and warm-up: a sample that is not
	// counted takes them.
	if _, err := b.claimSample(ctx, h1, h2, "warmup", "10.99.0.0/16"); err != nil {
		return nil, fmt.Errorf("warm-up: %w", err)
	}
	samples := map[string][]float64{}
	calls := map[string]map[string][]float64{}
	for _, op := range claimOps {
		calls[op] = map[string][]float64{}
	}
	for i := range b.cfg.ClaimSamples {
		s, err := b.claimSample(ctx, h1, h2, fmt.Sprintf("cl%d", i), fmt.Sprintf("10.%d.0.0/16", 100+i))
		if err != nil {
			return nil, fmt.Errorf("sample %d: %w", i+1, err)
		}
		for _, op := range claimOps {
			samples[op] = append(samples[op], s.wall[op])
			for call, ms := range s.calls[op] {
				calls[op][call] = append(calls[op][call], ms)
			}
		}
		samples[opCreateAndRun] = append(samples[opCreateAndRun], s.wall[opCreateNew]+s.wall[opRunFirst])
		b.logf("claims %s sample %d: create %.0f ms, copy %.0f ms, first run %.0f ms, second run %.0f ms, first run on %s %.0f ms", r.Build, i+1,
			s.wall[opCreateNew], s.wall[opCreateCopy], s.wall[opRunFirst], s.wall[opRunSecond], h2.Name, s.wall[opRunCopy])
	}
	for _, op := range append(slices.Clone(claimOps), opCreateAndRun) {
		o := ClaimOp{Op: op, Stat: newStat(samples[op])}
		for _, call := range slices.Sorted(maps.Keys(calls[op])) {
			o.Calls = append(o.Calls, CallStat{Call: call, Stat: newStat(calls[op][call])})
		}
		r.Ops = append(r.Ops, o)
	}
	return r, nil
}

// claimSample is one sample's wall times and plugin calls, by operation.
type claimSample struct {
	wall  map[string]float64
	calls map[string]map[string]float64
}

// claimSample creates a network new to the cluster on h1, its copy on
// h2, runs two containers on h1 and one on h2, timing each command; then
// removes all of it.
func (b *Bench) claimSample(ctx context.Context, h1, h2 *lab.Host, name, subnet string) (claimSample, error) {
	s := claimSample{wall: map[string]float64{}, calls: map[string]map[string]float64{}}
	create := []string{"network", "create", "-d", "wgmesh", "--ipam-driver", "wgmesh", "--subnet", subnet, name}
	steps := []struct {
		op   string
		host *lab.Host
		args []string
	}{
		{opCreateNew, h1, create},
		{opCreateCopy, h2, create},
		{opRunFirst, h1, []string{"run", "-d", "--name", name + "-a", "--network", name, lab.Image, "sleep", "600"}},
		{opRunSecond, h1, []string{"run", "-d", "--name", name + "-b", "--network", name, lab.Image, "sleep", "600"}},
		{opRunCopy, h2, []string{"run", "-d", "--name", name + "-c", "--network", name, lab.Image, "sleep", "600"}},
	}
	defer func() {
		ctx := context.WithoutCancel(ctx)
		_, _ = h1.Docker(ctx, "rm", "-f", name+"-a", name+"-b")
		_, _ = h2.Docker(ctx, "rm", "-f", name+"-c")
		_, _ = h1.Docker(ctx, "network", "rm", name)
		_, _ = h2.Docker(ctx, "network", "rm", name)
		// Whatever an agent does after a removal (giving blocks back)
		// is done before the next sample starts.
		time.Sleep(300 * time.Millisecond)
	}()
	for _, st := range steps {
		off := logSize(st.host.AgentLog())
		began := time.Now()
		if _, err := st.host.Docker(ctx, st.args...); err != nil {
			return s, err
		}
		s.wall[st.op] = ms(time.Since(began))
		calls, err := pluginCalls(st.host.AgentLog(), off)
		if err != nil {
			return s, err
		}
		s.calls[st.op] = calls
	}
	return s, nil
}

// waitCluster waits until every host sees all of them alive and, with
// consensus, is a registered member of a cluster that has a leader.
func waitCluster(ctx context.Context, hosts []*lab.Host, consensus bool) error {
	return poll.Every(ctx, 200*time.Millisecond, 90*time.Second, "the cluster ready", func() error {
		for _, h := range hosts {
			if why := clusterReady(ctx, h, len(hosts), consensus); why != "" {
				return errors.New(why)
			}
		}
		return nil
	})
}

func clusterReady(ctx context.Context, h *lab.Host, want int, consensus bool) string {
	st, err := driver.NewControlClient(h.ControlSock()).Status(ctx)
	if err != nil {
		return fmt.Sprintf("%s: %v", h.Name, err)
	}
	alive := 0
	for _, m := range st.Members {
		if m.State == mesh.Alive {
			alive++
		}
	}
	if alive != want {
		return fmt.Sprintf("%s sees %d of %d members alive", h.Name, alive, want)
	}
	if !consensus {
		return ""
	}
	cs := st.Consensus
	if !cs.Registered || cs.Leader == "" {
		return fmt.Sprintf("%s: consensus %s, leader %q, problem %q", h.Name, cs.State, cs.Leader, cs.Problem)
	}
	// Every host a voter, as a small cluster settles: what a claim waits
	// for then is what it waits for day to day.
	voters := 0
	for _, s := range cs.Servers {
		if s.Voter {
			voters++
		}
	}
	if voters != want {
		return fmt.Sprintf("%s sees %d of %d hosts as voters", h.Name, voters, want)
	}
	return ""
}

// unknownFlags returns the flags in args that `binary agent -h` does not
// list.
func unknownFlags(ctx context.Context, binary string, args []string) ([]string, error) {
	// -h prints the flags and exits with status 2 (flag.ErrHelp).
	help, _ := run(ctx, binary, "agent", "-h")
	known := map[string]bool{}
	for _, m := range helpFlagRE.FindAllStringSubmatch(help, -1) {
		known[m[1]] = true
	}
	if len(known) == 0 {
		return nil, fmt.Errorf("%s agent -h lists no flags: %s", binary, strings.TrimSpace(help))
	}
	var missing []string
	for _, a := range args {
		name, ok := strings.CutPrefix(a, "-")
		if !ok {
			continue
		}
		name = strings.TrimPrefix(name, "-")
		name, _, _ = strings.Cut(name, "=")
		if !known[name] {
			missing = append(missing, "--"+name)
		}
	}
	return missing, nil
}

// helpFlagRE matches a flag in the flag package's usage output.
var helpFlagRE = regexp.MustCompile(`(?m)^\s+-{1,2}([a-zA-Z0-9][a-zA-Z0-9-]*)\b`)

// logSize is a log file's size: where what is logged next starts.
func logSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

var (
	callRE = regexp.MustCompile(`\bcall=(\S+)`)
	tookRE = regexp.MustCompile(`\btook=(\S+)`)
)

// pluginCalls reads an agent's log from offset and sums, by call, the
// took= of every plugin call it logged (at debug level, in slog's text
// format: call=/IpamDriver.RequestAddress took=1.234ms), in milliseconds.
func pluginCalls(path string, offset int64) (map[string]float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		return nil, err
	}
	return parsePluginCalls(f)
}

func parsePluginCalls(r io.Reader) (map[string]float64, error) {
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.Contains(line, `msg="plugin call`) {
			continue
		}
		c, t := callRE.FindStringSubmatch(line), tookRE.FindStringSubmatch(line)
		if c == nil || t == nil {
			continue
		}
		d, err := time.ParseDuration(t[1])
		if err != nil {
			return nil, fmt.Errorf("agent log: took=%s: %w", t[1], err)
		}
		out[c[1]] += ms(d)
	}
	return out, sc.Err()
}

// claimsSlack is how much slower than the baseline a median may be and
// still count as no slower: single runs here differ by more than that.
const claimsSlack = 1.10

// target checks that creating a network and its first docker run got no
// slower than the baseline's.
func (c *Claims) target() Target {
	t := Target{Goal: fmt.Sprintf("network create and first docker run no slower than before (median ≤ %.2f × baseline's)", claimsSlack)}
	if c.Baseline == nil {
		t.Measured, t.NA = "no baseline: "+c.BaselineSkipped, true
		return t
	}
	t.Met = true
	var parts []string
	for _, op := range []struct{ name, short string }{{opCreateNew, "network create"}, {opRunFirst, "first docker run"}} {
		cur, base := c.Current.Op(op.name), c.Baseline.Op(op.name)
		if cur == nil || base == nil || len(cur.Samples) == 0 || len(base.Samples) == 0 {
			t.Met = false
			parts = append(parts, op.short+" not measured")
			continue
		}
		ratio := cur.MedianMs / base.MedianMs
		t.Met = t.Met && ratio <= claimsSlack
		parts = append(parts, fmt.Sprintf("%s %.0f ms vs %.0f ms (×%.2f)", op.short, cur.MedianMs, base.MedianMs, ratio))
	}
	t.Measured = strings.Join(parts, "; ")
	return t
}
