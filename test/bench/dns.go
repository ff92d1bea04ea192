package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
	mdns "github.com/miekg/dns"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/driver/dns"
	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/test/bench/sim"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// Names is what the benchmark measured of container names across hosts.
type Names struct {
	// Engine is the hosts' Docker engine.
	Engine string `json:",omitempty"`
	// Lookups from inside a container on h1 through Docker's resolver
	// (127.0.0.11): a container on h1 (Docker answers), one on h2 (Docker
	// forwards to the agent's server, which answers from the mesh), and
	// an outside name: every time a new one (forwarded by the agent to
	// the lab's outside DNS server), and the same one again (from the
	// agent's cache).
	Local, Remote, OutsideCold, OutsideCached Latency
	// AtServer: the container on h2's name, asked of the agent's server
	// directly from the container, without Docker's resolver.
	AtServer Latency
	// HandlerMicros is the server's own time for a mesh name among 1000
	// (in this process, no network).
	HandlerMicros float64
	// NewName: from `docker run -d` on h2 until the container's name
	// resolves in a container on h1; DockerRun is how long the command
	// itself took.
	NewName, DockerRun Latency
	// MessageBytes is the mean size of a name message the hosts sent.
	MessageBytes float64
	// Sim is the names simulation at the smallest simulated size.
	Sim      *sim.NamesResult `json:",omitempty"`
	SimError string           `json:",omitempty"`
}

// Latency summarizes samples in milliseconds.
type Latency struct {
	MedianMs float64   `json:"median_ms"`
	P95Ms    float64   `json:"p95_ms"`
	MaxMs    float64   `json:"max_ms"`
	Samples  []float64 `json:"-"`
}

func latencyOf(samples []float64) Latency {
	s := slices.Clone(samples)
	slices.Sort(s)
	l := Latency{MedianMs: median(s), P95Ms: percentile(s, 0.95), Samples: samples}
	if len(s) > 0 {
		l.MaxMs = s[len(s)-1]
	}
	return l
}

func (l Latency) String() string {
	return fmt.Sprintf("median %s, p95 %s (%d)", msText(l.MedianMs), msText(l.P95Ms), len(l.Samples))
}

func msText(v float64) string {
	if v < 1 {
		return fmt.Sprintf("%.0f µs", v*1000)
	}
	return fmt.Sprintf("%.1f ms", v)
}

// names measures lookups and name spreading on the two hosts of l.
func (b *Bench) names(ctx context.Context, l *lab.Lab) (*Names, error) {
	h1, h2 := l.Hosts[0], l.Hosts[1]
	r := &Names{}
	if v, err := h1.EngineVersion(ctx); err == nil {
		r.Engine = "Docker " + v.Server
	}
	out, err := l.StartOutsideDNS(map[string]netip.Addr{"*.outside.test": netip.MustParseAddr(lab.WANServer)})
	if err != nil {
		return nil, err
	}
	defer out.Close()
	if err := l.CreateNetwork(ctx, "dnsnet", "10.96.0.0/16", nil, h1, h2); err != nil {
		return nil, err
	}
	defer func() {
		for _, h := range []*lab.Host{h1, h2} {
			if ids, _ := h.Docker(context.Background(), "ps", "-aq", "--filter", "network=dnsnet"); strings.TrimSpace(ids) != "" {
				_, _ = h.Docker(context.Background(), append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
			}
		}
		_ = l.RemoveNetwork(context.Background(), "dnsnet", h1, h2)
	}()
	for _, c := range []struct {
		h    *lab.Host
		name string
	}{{h1, "near"}, {h1, "probe"}, {h2, "far"}} {
		if _, err := c.h.RunContainer(ctx, c.name, "dnsnet", nil); err != nil {
			return nil, err
		}
	}
	ns, err := h1.ContainerNetNS(ctx, "probe")
	if err != nil {
		return nil, err
	}
	docker, err := lab.NewDNSClient(ns, "127.0.0.11:53")
	if err != nil {
		return nil, err
	}
	defer docker.Close()
	direct, err := lab.NewDNSClient(ns, net.JoinHostPort(lab.DNSAddr, "53"))
	if err != nil {
		return nil, err
	}
	defer direct.Close()
	if err := waitResolves(ctx, docker, "far", 20*time.Second); err != nil {
		return nil, err
	}

	n := max(b.cfg.Pings, 20)
	measure := func(c *lab.DNSClient, name func(int) string) (Latency, error) {
		var samples []float64
		for i := -5; i < n; i++ {
			addrs, m, took, err := c.Query(ctx, name(i))
			if err != nil {
				return Latency{}, fmt.Errorf("looking up %s: %w", name(i), err)
			}
			if len(addrs) == 0 {
				return Latency{}, fmt.Errorf("%s does not resolve: %s", name(i), mdns.RcodeToString[m.Rcode])
			}
			if i >= 0 { // the first few warm up
				samples = append(samples, float64(took.Microseconds())/1000)
			}
		}
		return latencyOf(samples), nil
	}
	same := func(s string) func(int) string { return func(int) string { return s } }
	if r.Local, err = measure(docker, same("near")); err != nil {
		return nil, err
	}
	if r.Remote, err = measure(docker, same("far")); err != nil {
		return nil, err
	}
	stamp := fmt.Sprint(time.Now().UnixNano())
	if r.OutsideCold, err = measure(docker, func(i int) string { return fmt.Sprintf("c%s-%d.outside.test", stamp, i+5) }); err != nil {
		return nil, err
	}
	if r.OutsideCached, err = measure(docker, same("www.outside.test")); err != nil {
		return nil, err
	}
	if r.AtServer, err = measure(direct, same("far")); err != nil {
		return nil, err
	}
	r.HandlerMicros = handlerTime()
	b.logf("names: local %s, remote %s, outside %s (cached %s), at the server %s, handler %.1f µs",
		r.Local, r.Remote, r.OutsideCold, r.OutsideCached, r.AtServer, r.HandlerMicros)

	// New names on h2, seen from h1.
	before := nameTraffic(ctx, l)
	var spread, runs []float64
	for i := range max(b.cfg.FirstPingSamples, 2) {
		name := fmt.Sprintf("new%d", i)
		start := time.Now()
		if _, err := h2.Docker(ctx, "run", "-d", "--name", name, "--network", "dnsnet", lab.Image, "sleep", "600"); err != nil {
			return nil, err
		}
		runs = append(runs, float64(time.Since(start).Microseconds())/1000)
		if err := waitResolves(ctx, docker, name, 20*time.Second); err != nil {
			return nil, err
		}
		spread = append(spread, float64(time.Since(start).Microseconds())/1000)
		if _, err := h2.Docker(ctx, "rm", "-f", name); err != nil {
			return nil, err
		}
	}
	r.NewName, r.DockerRun = latencyOf(spread), latencyOf(runs)
	after := nameTraffic(ctx, l)
	if msgs := after.SentMessages - before.SentMessages; msgs > 0 {
		r.MessageBytes = float64(after.SentBytes-before.SentBytes) / float64(msgs)
	}
	b.logf("names: docker run to resolvable on another host %s (docker run itself %s); name messages of %.0f bytes",
		r.NewName, r.DockerRun, r.MessageBytes)
	return r, nil
}

func waitResolves(ctx context.Context, c *lab.DNSClient, name string, within time.Duration) error {
	// Every 5 ms: the callers time how long a name takes to spread.
	return poll.Every(ctx, 5*time.Millisecond, within, name+" resolving", func() error {
		addrs, _, _, err := c.Query(ctx, name)
		if err == nil && len(addrs) == 0 {
			err = errors.New("no address")
		}
		return err
	})
}

// nameTraffic sums the name gossip the lab's agents sent.
func nameTraffic(ctx context.Context, l *lab.Lab) mesh.NameTraffic {
	var t mesh.NameTraffic
	for _, h := range l.Hosts {
		st, err := driver.NewControlClient(h.ControlSock()).Status(ctx)
		if err != nil {
			continue
		}
		t.SentMessages += st.Gossip.Names.SentMessages
		t.SentBytes += st.Gossip.Names.SentBytes
	}
	return t
}

// handlerTime is the DNS server's time for one mesh name among 1000, in
// microseconds, called directly.
func handlerTime() float64 {
	var records []mesh.NameRecord
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	for i := range 1000 {
		records = append(records, mesh.NameRecord{Node: "h1", Subnet: subnet, Endpoint: fmt.Sprintf("%012x", i), Version: 1,
			Name: fmt.Sprintf("c%d", i), Aliases: []string{"svc"}, Addr: netip.AddrFrom4([4]byte{10, 60, byte(i / 250), byte(i%250 + 2)})})
	}
	src := netip.MustParseAddr("172.18.0.2")
	cfg := dns.DefaultConfig()
	cfg.Listen = netip.MustParseAddrPort("169.254.53.53:53")
	cfg.Clients = staticClients{src: {subnet}}
	cfg.Names = staticNames(records)
	s, err := dns.New(cfg)
	if err != nil {
		return math.NaN()
	}
	w := &discardWriter{remote: &net.UDPAddr{IP: src.AsSlice(), Port: 4000}}
	q := new(mdns.Msg).SetQuestion("c500.", mdns.TypeA)
	const rounds = 20000
	start := time.Now()
	for range rounds {
		s.ServeDNS(w, q)
	}
	return float64(time.Since(start).Nanoseconds()) / rounds / 1000
}

type staticClients map[netip.Addr][]netip.Prefix

func (c staticClients) Networks(_ context.Context, a netip.Addr) []netip.Prefix { return c[a] }

type staticNames []mesh.NameRecord

func (n staticNames) LiveNames() []mesh.NameRecord { return n }
func (n staticNames) NameChanges() <-chan struct{} { return nil }

type discardWriter struct{ remote net.Addr }

func (w *discardWriter) LocalAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(169, 254, 53, 53), Port: 53}
}
func (w *discardWriter) RemoteAddr() net.Addr        { return w.remote }
func (w *discardWriter) WriteMsg(*mdns.Msg) error    { return nil }
func (w *discardWriter) Write(b []byte) (int, error) { return len(b), nil }
func (w *discardWriter) Close() error                { return nil }
func (w *discardWriter) TsigStatus() error           { return nil }
func (w *discardWriter) TsigTimersOnly(bool)         {}
func (w *discardWriter) Hijack()                     {}

// simulateNames runs the names simulation with n nodes.
func simulateNames(ctx context.Context, n int, quick bool, log *slog.Logger) (sim.NamesResult, error) {
	cfg := sim.NamesConfig{Config: sim.Config{Nodes: n, Logger: log}}
	if quick {
		cfg.Memberlist = func() *memberlist.Config {
			c := sim.DefaultMemberlist()
			c.PushPullInterval = time.Second
			return c
		}
		cfg.Settle, cfg.IdleWindow, cfg.Changes = 500*time.Millisecond, 2*time.Second, 3
	} else {
		// One scaled push/pull interval: every node's exchange is in it.
		// Two such windows, a warm-up and the publishing outlast the
		// default timeout.
		cfg.IdleWindow, cfg.Timeout = pushPullInterval(n), 20*time.Minute
	}
	return sim.RunNames(ctx, cfg)
}

// pushPullInterval is memberlist's push/pull interval with the LAN
// defaults, scaled past 32 nodes as memberlist does.
func pushPullInterval(n int) time.Duration {
	base := memberlist.DefaultLANConfig().PushPullInterval
	if n <= 32 {
		return base
	}
	return time.Duration(math.Ceil(math.Log2(float64(n))-5)+1) * base
}

// retransmits is how often a node sends each name message it has:
// mesh's RetransmitMult of 4 times memberlist's ceil(log10(n+1)).
func retransmits(n int) float64 { return 4 * math.Ceil(math.Log10(float64(n+1))) }

// nameEstimate is the name traffic a node sends, in bytes per second of
// payload, with n hosts of k containers each and c changes (a container
// starting or stopping) per host per minute: every change is sent
// retransmits(n) times by every node (memberlist's gossip, each node
// relaying news once), and every push/pull sends the whole state of n*k
// records, two per node per scaled interval.
func nameEstimate(n, k int, c, msgBytes, stateRecordBytes float64) (changes, pushPull float64) {
	changes = float64(n) * c / 60 * retransmits(n) * msgBytes
	pushPull = 2 * float64(n*k) * stateRecordBytes / pushPullInterval(n).Seconds()
	return changes, pushPull
}

func (r *Report) namesMarkdown(p func(string, ...any)) {
	nm := r.Names
	p("## Names across hosts")
	p("")
	if nm.Local.MedianMs > 0 {
		p("Lookups from a container on host 1, through Docker's resolver (127.0.0.11, %s), %d each after 5 to warm up:", nm.Engine, len(nm.Local.Samples))
		p("")
		p("| name | answered by | median | p95 | max |")
		p("|---|---|---|---|---|")
		for _, row := range []struct {
			name, by string
			l        Latency
		}{
			{"a container on host 1", "Docker itself", nm.Local},
			{"a container on host 2", "Docker → the agent's server, from the mesh", nm.Remote},
			{"an outside name, new each time", "Docker → agent → the lab's outside DNS server", nm.OutsideCold},
			{"an outside name, again", "Docker → agent's cache", nm.OutsideCached},
			{"a container on host 2, asked of the agent directly", "the agent's server, without Docker", nm.AtServer},
		} {
			p("| %s | %s | %s | %s | %s |", row.name, row.by, msText(row.l.MedianMs), msText(row.l.P95Ms), msText(row.l.MaxMs))
		}
		p("")
		p("The server's own time for a name of the mesh (among 1000, called in process): %.1f µs.", nm.HandlerMicros)
		p("")
		p("`docker run -d` on host 2 until the name resolves in a container on host 1: %s (the `docker run` command itself: %s).",
			nm.NewName, nm.DockerRun)
	}
	if s := nm.Sim; s != nil {
		p("")
		p("Simulated, %d real meshes in one process (gossip as on real hosts, %d container names each):", s.Nodes, s.PerNode)
		p("")
		p("| all publish at once, until every node has all %d | one change reaches every node (median, max) | name payload sent per node per change | name messages per node per change | name message | idle gossip per node without names → with them | one push/pull exchange with them | names in one state |",
			s.Nodes*s.PerNode)
		p("|---|---|---|---|---|---|---|---|")
		p("| %s | %s, %s | %.0f B | %.1f | %.0f B | %.0f → %.0f B/s | %.0f KiB | %.0f KiB |", s.Published.Round(time.Millisecond),
			s.ChangeMedian.Round(time.Millisecond), s.ChangeMax.Round(time.Millisecond), s.ChangePayloadBytesPerNode, s.ChangeMessagesPerNode,
			s.RecordBytes, s.IdleBaselineBytesPerNodePerSecond, s.IdleBytesPerNodePerSecond, s.PushPullBytes/1024, s.StatePayloadBytes/1024)
	}
	if nm.SimError != "" {
		p("")
		p("- names simulation failed: %s", nm.SimError)
	}
	msg, rec := nm.MessageBytes, 0.0
	if s := nm.Sim; s != nil && s.RecordBytes > 0 {
		msg = s.RecordBytes
		rec = s.StatePayloadBytes / float64(s.Nodes*s.PerNode)
	}
	if msg == 0 {
		return
	}
	if rec == 0 {
		rec = msg
	}
	p("")
	p("Estimated name payload a node sends (before memberlist compresses and encrypts it), from a message of %.0f B and", msg)
	p("%.0f B per record in a push/pull state as measured: each change is sent %s times by every node (memberlist's", rec, "4·⌈log₁₀(n+1)⌉")
	p("retransmissions, each node relaying news once), and push/pull sends the whole state twice per node per interval")
	p("(30 s, scaled up past 32 nodes: 90 s at 100, 180 s at 1,000).")
	p("")
	p("| hosts | containers per host | changes per host per minute | changes | push/pull | total |")
	p("|---|---|---|---|---|---|")
	for _, n := range []int{100, 1000} {
		for _, kc := range []struct {
			k int
			c float64
		}{{10, 1}, {50, 5}} {
			ch, pp := nameEstimate(n, kc.k, kc.c, msg, rec)
			p("| %d | %d | %.0f | %s | %s | %s |", n, kc.k, kc.c, rate(ch), rate(pp), rate(ch+pp))
		}
	}
}

func rate(bps float64) string {
	if bps >= 1024 {
		return fmt.Sprintf("%.1f KiB/s", bps/1024)
	}
	return fmt.Sprintf("%.0f B/s", bps)
}
