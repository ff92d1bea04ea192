package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// NAT is what hosts behind NAT cost: the lab of the NAT test (h1
// reachable at its own address, h2 and h3 behind NATs that keep one
// mapping per source, h3's uplink of MTU 1280, h4 behind a NAT that maps
// each destination to a port of its own), agents with default settings.
type NAT struct {
	// KnownMs: agents started to every host knowing every host's NAT.
	KnownMs float64 `json:"nat_known_ms"`
	// Each is timed from containers attached on a new network on two
	// hosts to the first ping between them.
	//
	// Public: h1 and h2, one reachable (no punching). Punch: h2 and h3,
	// both behind NAT, a direct path punched through both. Relay: h2
	// and h4, relayed by h1 from the start (h4's NAT maps per
	// destination). Fallback: h2 and h3 with UDP from h2 to h3 blocked,
	// so that the direct attempt fails and the pair falls back to h1.
	Public   Stat `json:"public"`
	Punch    Stat `json:"punch"`
	Relay    Stat `json:"relay"`
	Fallback Stat `json:"fallback"`
	// PunchTimeout is the agents' --punch-timeout, for the fallback.
	PunchTimeout string `json:"punch_timeout"`
	// Throughput, TCP with one stream, Gbit/s, each path on its own.
	Throughput []NATPath `json:"throughput"`
	// PMTUMs: agents started to h1 knowing the 1280 path to h3;
	// ShrinkMs: h2's uplink shrunk to 1280 to h1 knowing it.
	PMTUMs   float64 `json:"pmtu_found_ms"`
	ShrinkMs float64 `json:"pmtu_shrink_noticed_ms"`
	// PMTUInterval is the agents' --pmtu-interval.
	PMTUInterval string `json:"pmtu_interval"`
	// DF: what a full-size ping with DF from h1's container to h3's
	// learns (the route MTU of the smaller path, from h1's namespace).
	DF string `json:"df_ping"`
}

// NATPath is one path's throughput.
type NATPath struct {
	Name string  `json:"name"`
	From string  `json:"from"`
	To   string  `json:"to"`
	Path string  `json:"path"`
	MTU  int     `json:"path_mtu"`
	Gbps float64 `json:"tcp_1_stream_gbps"`
	// Intact: a 16 MiB transfer's hashes matched at both ends.
	Intact bool `json:"intact"`
}

// natSites is the lab of the NAT benchmark (see NAT).
var natSites = []lab.Site{{}, {NAT: lab.NATPreserving}, {NAT: lab.NATPreserving, UplinkMTU: 1280}, {NAT: lab.NATRandom}}

// The agents' settings in the NAT benchmark: the defaults, given so that
// the report says what they were.
const (
	natPunchTimeout = 8 * time.Second
	natPMTUInterval = 30 * time.Second
)

// natEvery is how often the NAT benchmark looks whether what it times
// has happened: its figures include up to this much of waiting.
const natEvery = 100 * time.Millisecond

func (b *Bench) nat(ctx context.Context) (r *NAT, err error) {
	b.logf("nat: four hosts, three behind NAT routers")
	l, err := lab.New(ctx, lab.Config{Hosts: 4, Binary: b.cfg.Binary, Sites: natSites, Log: b.cfg.Log,
		AgentArgs: []string{"--punch-timeout", natPunchTimeout.String(), "--pmtu-interval", natPMTUInterval.String()}})
	if err != nil {
		return nil, err
	}
	defer l.Close()
	defer func() {
		if err != nil {
			// What the agents said helps more than the symptom.
			for _, h := range l.Hosts {
				log, _ := os.ReadFile(h.AgentLog())
				lines := strings.Split(strings.TrimSpace(string(log)), "\n")
				b.logf("nat: agent log of %s, last lines:\n%s", h.Name, strings.Join(lines[max(0, len(lines)-40):], "\n"))
			}
		}
	}()
	started := time.Now()
	if err := l.StartAgents(ctx); err != nil {
		return nil, err
	}
	h := l.Hosts
	r = &NAT{PunchTimeout: natPunchTimeout.String(), PMTUInterval: natPMTUInterval.String()}
	if err := poll.Every(ctx, natEvery, 2*time.Minute, "every host's NAT", func() error { return natsKnown(ctx, l) }); err != nil {
		return nil, err
	}
	r.KnownMs = ms(time.Since(started))
	// The 1280 path to h3, as h1 sees it.
	if err := poll.Every(ctx, natEvery, 2*time.Minute, "h1's path MTU to h3", func() error {
		st, err := driver.NewControlClient(h[0].ControlSock()).Status(ctx)
		if err != nil {
			return err
		}
		for _, m := range st.Members {
			if m.Name == "h3" && m.PathMTU == 1280 {
				return nil
			}
		}
		return errors.New("not 1280 yet")
	}); err != nil {
		return nil, err
	}
	r.PMTUMs = ms(time.Since(started))

	subnet := 0
	pair := func(a, c *lab.Host, wantPath string) (float64, error) {
		subnet++
		s := fmt.Sprintf("10.%d.0.0/16", 130+subnet)
		ctrs := make([]*lab.Container, 2)
		errs := make(chan error, 2)
		for i, x := range []*lab.Host{a, c} {
			go func() {
				n, err := x.Plugin().CreateNetwork(ctx, s)
				if err == nil {
					var ep *lab.PluginEndpoint
					if ep, err = x.Plugin().Attach(ctx, n); err == nil {
						ctrs[i], err = x.NewContainer(ctx, "n"+strconv.Itoa(subnet), ep)
					}
				}
				errs <- err
			}()
		}
		for range 2 {
			if err := <-errs; err != nil {
				return 0, err
			}
		}
		start := time.Now()
		if err := poll.Every(ctx, natEvery, time.Minute, "first ping", func() error {
			_, err := ctrs[0].Exec(ctx, "ping", "-n", "-c", "1", "-W", "0.1", ctrs[1].IP)
			return err
		}); err != nil {
			return 0, err
		}
		took := ms(time.Since(start))
		// The path it took (the agent looks at its sessions a few times a
		// second).
		err := poll.Every(ctx, natEvery, 10*time.Second, "the path", func() error {
			st, err := driver.NewControlClient(a.ControlSock()).Status(ctx)
			if err != nil {
				return err
			}
			for _, n := range st.Networks {
				for _, p := range n.Peers {
					if n.Subnet.String() == s && p.Node == c.Name && !strings.HasPrefix(p.Path, wantPath) {
						return fmt.Errorf("%s reaches %s on %s: %q, want %q", a.Name, c.Name, s, p.Path, wantPath)
					}
				}
			}
			return nil
		})
		if err != nil {
			return 0, err
		}
		return took, nil
	}
	samples := max(b.cfg.NATSamples, 1)
	measure := func(name string, a, c *lab.Host, path string) (Stat, error) {
		var vs []float64
		for i := range samples {
			v, err := pair(a, c, path)
			if err != nil {
				return Stat{}, fmt.Errorf("%s, sample %d: %w", name, i+1, err)
			}
			vs = append(vs, v)
			b.logf("nat: %s %.0f ms", name, v)
		}
		return newStat(vs), nil
	}
	if r.Public, err = measure("reachable host and host behind NAT", h[0], h[1], "direct"); err != nil {
		return nil, err
	}
	if r.Punch, err = measure("two hosts behind NAT, punched", h[1], h[2], "direct"); err != nil {
		return nil, err
	}
	if r.Relay, err = measure("relayed from the start (NAT per destination)", h[1], h[3], "relayed"); err != nil {
		return nil, err
	}
	block := []string{"FORWARD", "-i", "eth0", "-s", h[1].Public.String(), "-p", "udp", "-j", "DROP"}
	if _, err := h[2].RouterExec(ctx, "iptables", append([]string{"-I"}, block...)...); err != nil {
		return nil, err
	}
	r.Fallback, err = measure("fallback to the relay (UDP blocked one way)", h[1], h[2], "relayed")
	if _, uerr := h[2].RouterExec(ctx, "iptables", append([]string{"-D"}, block...)...); uerr != nil && err == nil {
		err = uerr
	}
	if err != nil {
		return nil, err
	}

	// Throughput: one network on all four hosts.
	ctrs := map[string]*lab.Container{}
	for _, x := range h {
		n, err := x.Plugin().CreateNetwork(ctx, "10.129.0.0/16")
		if err != nil {
			return nil, err
		}
		ep, err := x.Plugin().Attach(ctx, n)
		if err != nil {
			return nil, err
		}
		if ctrs[x.Name], err = x.NewContainer(ctx, "t", ep); err != nil {
			return nil, err
		}
	}
	for _, p := range []NATPath{
		{Name: "direct, to a host behind NAT", From: "h1", To: "h2"},
		{Name: "relayed by h1", From: "h2", To: "h4"},
		{Name: "punched through two NATs, 1280 path", From: "h2", To: "h3"},
		{Name: "relayed by h1, 1280 path", From: "h4", To: "h3"},
	} {
		from, to := ctrs[p.From], ctrs[p.To]
		if err := poll.Every(ctx, natEvery, time.Minute, "a path from "+p.From+" to "+p.To, func() error {
			if _, err := from.Exec(ctx, "ping", "-n", "-c", "1", "-W", "0.2", to.IP); err != nil {
				return err
			}
			st, err := driver.NewControlClient(l.Hosts[p.From[1]-'1'].ControlSock()).Status(ctx)
			if err != nil {
				return err
			}
			for _, n := range st.Networks {
				for _, peer := range n.Peers {
					if n.Subnet.String() == "10.129.0.0/16" && peer.Node == p.To {
						p.Path, p.MTU = peer.Path, peer.PathMTU
						if peer.Via != "" {
							p.Path += " via " + peer.Via
						}
					}
				}
			}
			if p.Path != "direct" && !strings.HasPrefix(p.Path, "relayed") {
				return fmt.Errorf("path %q", p.Path)
			}
			return nil
		}); err != nil {
			return nil, err
		}
		tr, err := lab.TCPTransfer(ctx, from, to, 5201, 16<<20, time.Minute)
		if err != nil {
			return nil, fmt.Errorf("TCP %s -> %s: %w", p.From, p.To, err)
		}
		p.Intact = tr.OK()
		c := &dataCase{client: from.Exec, server: to.Exec, serverIP: to.IP}
		stop := startServer(ctx, c)
		p.Gbps, _, err = b.iperf(ctx, c, 1)
		stop()
		if err != nil {
			return nil, fmt.Errorf("iperf3 %s -> %s: %w", p.From, p.To, err)
		}
		b.logf("nat: TCP %s -> %s (%s, path MTU %d): %.2f Gbit/s, 16 MiB intact: %v", p.From, p.To, p.Path, p.MTU, p.Gbps, p.Intact)
		r.Throughput = append(r.Throughput, p)
	}
	// A container's full-size packet with DF to h3 is answered with the
	// smaller path's MTU by h1's namespace.
	out, _ := ctrs["h1"].Exec(ctx, "ping", "-n", "-c", "1", "-W", "1", "-M", "do", "-s", "1312", ctrs["h3"].IP)
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "mtu") {
			r.DF = strings.TrimSpace(line)
		}
	}

	// h2's uplink shrinks to 1280: how long until h1 knows.
	shrunk := time.Now()
	if _, err := run(ctx, "ip", "-n", l.Switch, "link", "set", l.Prefix+"-r2", "mtu", "1280"); err != nil {
		return nil, err
	}
	if _, err := h[1].RouterExec(ctx, "ip", "link", "set", "eth0", "mtu", "1280"); err != nil {
		return nil, err
	}
	if err := poll.Every(ctx, natEvery, 3*time.Minute, "the shrunk path to h2", func() error {
		st, err := driver.NewControlClient(h[0].ControlSock()).Status(ctx)
		if err != nil {
			return err
		}
		for _, m := range st.Members {
			if m.Name == "h2" && m.PathMTU == 1280 {
				return nil
			}
		}
		return errors.New("not 1280 yet")
	}); err != nil {
		return nil, err
	}
	r.ShrinkMs = ms(time.Since(shrunk))
	return r, nil
}

// natsKnown reports whether every host knows every host's NAT as the lab
// built it.
func natsKnown(ctx context.Context, l *lab.Lab) error {
	want := map[string]string{"": "none", lab.NATPreserving: "consistent", lab.NATRandom: "symmetric"}
	for _, h := range l.Hosts {
		st, err := driver.NewControlClient(h.ControlSock()).Status(ctx)
		if err != nil {
			return err
		}
		if len(st.Members) != len(l.Hosts) {
			return fmt.Errorf("%s sees %d members", h.Name, len(st.Members))
		}
		for _, m := range st.Members {
			if site := l.Hosts[m.Name[1]-'1'].Site; string(m.NAT) != want[site.NAT] {
				return fmt.Errorf("%s sees %s's NAT as %q", h.Name, m.Name, m.NAT)
			}
		}
	}
	return nil
}

// natTargets are the goals of the NAT measurements.
func (r *NAT) targets() []Target {
	var t []Target
	var direct, relayed *NATPath
	for i := range r.Throughput {
		switch r.Throughput[i].From + r.Throughput[i].To {
		case "h1h2":
			direct = &r.Throughput[i]
		case "h2h4":
			relayed = &r.Throughput[i]
		}
	}
	t = append(t,
		target("two hosts behind NAT punch a direct path: median < 2 s", fmt.Sprintf("median %.0f ms, p95 %.0f ms", r.Punch.MedianMs, r.Punch.P95Ms),
			len(r.Punch.Samples) > 0 && r.Punch.MedianMs < 2000),
		target("a pair that cannot punch is relayed: median < 2 s", fmt.Sprintf("median %.0f ms", r.Relay.MedianMs),
			len(r.Relay.Samples) > 0 && r.Relay.MedianMs < 2000),
		target("a failed direct attempt falls back to the relay within the punch timeout + 3 s", fmt.Sprintf("median %.0f ms (punch timeout %s)", r.Fallback.MedianMs, r.PunchTimeout),
			len(r.Fallback.Samples) > 0 && r.Fallback.MedianMs < msOf(r.PunchTimeout)+3000),
	)
	intact := len(r.Throughput) > 0
	for _, p := range r.Throughput {
		intact = intact && p.Intact
	}
	t = append(t, target("TCP arrives intact on every path, direct, punched and relayed, across the 1280 black hole too",
		fmt.Sprintf("%d paths", len(r.Throughput)), intact))
	if direct != nil && relayed != nil {
		t = append(t, Target{Goal: "relayed TCP vs direct (same MTU; the relay shares this machine's cores)",
			Measured: fmt.Sprintf("%.0f %% (%.2f vs %.2f Gbit/s)", relayed.Gbps/direct.Gbps*100, relayed.Gbps, direct.Gbps), NA: true})
	}
	t = append(t, target("a path shrinking later is noticed within two --pmtu-interval and a search", fmt.Sprintf("%.1f s (interval %s)", r.ShrinkMs/1000, r.PMTUInterval),
		r.ShrinkMs > 0 && r.ShrinkMs < 2*msOf(r.PMTUInterval)+10000))
	return t
}

func msOf(d string) float64 {
	v, err := time.ParseDuration(d)
	if err != nil {
		return 0
	}
	return ms(v)
}

func (r *NAT) markdown(p func(string, ...any)) {
	p("## Hosts behind NAT")
	p("")
	p("Four hosts: h1 reachable at its own address; h2 and h3 behind NAT routers that keep one mapping per source")
	p("(iptables MASQUERADE), h3's uplink of MTU 1280, which drops larger packets coming in without a word; h4 behind")
	p("one that maps each destination to a port of its own (MASQUERADE --random-fully). Agents with default settings")
	p("(punch timeout %s, path MTU interval %s), none told its public address. Every host knew every host's NAT %.1f s",
		r.PunchTimeout, r.PMTUInterval, r.KnownMs/1000)
	p("after the agents started; h1 knew the 1280 path to h3 after %.1f s.", r.PMTUMs/1000)
	p("")
	p("From containers attached on a new network on two hosts to their first ping (%d samples each):", len(r.Punch.Samples))
	p("")
	p("| pair | path | median | p95 |")
	p("|---|---|---|---|")
	p("| h1, h2: reachable and behind NAT | direct | %.0f ms | %.0f ms |", r.Public.MedianMs, r.Public.P95Ms)
	p("| h2, h3: both behind NAT | punched, direct | %.0f ms | %.0f ms |", r.Punch.MedianMs, r.Punch.P95Ms)
	p("| h2, h4: h4's NAT maps per destination | relayed by h1 from the start | %.0f ms | %.0f ms |", r.Relay.MedianMs, r.Relay.P95Ms)
	p("| h2, h3 with UDP h2 → h3 blocked | direct attempt, then relayed by h1 | %.0f ms | %.0f ms |", r.Fallback.MedianMs, r.Fallback.P95Ms)
	p("")
	p("TCP, one stream (iperf3), each path alone; and a 16 MiB transfer hashed at both ends:")
	p("")
	p("| path | from → to | path MTU | TCP | intact |")
	p("|---|---|---|---|---|")
	for _, t := range r.Throughput {
		p("| %s | %s → %s (%s) | %d | %.2f Gbit/s | %v |", t.Name, t.From, t.To, t.Path, t.MTU, t.Gbps, t.Intact)
	}
	p("")
	p("A full-size ping with DF from h1's container to h3's: `%s`. h2's uplink shrunk to 1280: h1 knew after %.1f s.", r.DF, r.ShrinkMs/1000)
	p("All four hosts, the three routers and the relay share this machine's two cores: relayed traffic crosses")
	p("userspace WireGuard twice and the relay once, on the same CPUs.")
}
