package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/wgmesh/wgmesh/mesh"
)

// Mesh is what the service needs of the mesh.
type Mesh interface {
	NameSource
	NamePublisher
}

// ServiceConfig configures a Service: the server, the watcher and the
// check of dockerd's setting together, as the agent runs them.
type ServiceConfig struct {
	// Listen is the server's address (port 53).
	Listen    netip.AddrPort
	Upstreams []netip.AddrPort
	Mesh      Mesh
	Docker    Docker
	// DriverName is wgmesh's name in Docker.
	DriverName string
	// DockerSocket is the local dockerd's unix socket, whose DNS setting
	// is checked; empty skips the check (a TCP Docker host).
	DockerSocket string
	// Links lists the host's links and their addresses (the agent gives
	// dns/hostaddr's List); nil: none known, only loopback is answered
	// besides Docker's bridges.
	Links func() ([]LinkAddrs, error)
	// Server tunes the server (zero: DefaultConfig); Listen, Upstreams,
	// Clients and Names are set from the fields above.
	Server Config
	Logger *slog.Logger
}

// Service runs the DNS server and the watcher of Docker's containers, and
// checks that dockerd sends its queries to the server.
type Service struct {
	cfg     ServiceConfig
	srv     *Server
	w       *Watcher
	sources *Sources

	mu      sync.Mutex
	daemon  *DaemonDNS
	checkEr error
}

// dockerGrace is how long Docker may be unreadable before status says so.
const dockerGrace = time.Minute

// daemonCheckEvery is how often dockerd's setting is read again: it only
// changes with a restart of Docker.
const daemonCheckEvery = 30 * time.Second

// NewService creates the service. It starts nothing; Run does.
func NewService(cfg ServiceConfig) (*Service, error) {
	if cfg.Mesh == nil || cfg.Docker == nil {
		return nil, errors.New("dns: service needs the mesh and Docker")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	w, err := NewWatcher(WatcherConfig{Docker: cfg.Docker, DriverName: cfg.DriverName, Names: cfg.Mesh, Logger: cfg.Logger})
	if err != nil {
		return nil, err
	}
	scfg := cfg.Server
	if scfg.UpstreamTimeout == 0 {
		scfg = DefaultConfig()
	}
	scfg.Listen, scfg.Upstreams, scfg.Clients, scfg.Names, scfg.Logger = cfg.Listen, cfg.Upstreams, w, cfg.Mesh, cfg.Logger
	// Containers reach the server from Docker's bridge networks; a
	// Docker that cannot list them leaves the server to loopback.
	var sources *Sources
	if bl, ok := cfg.Docker.(BridgeLister); ok {
		sources = NewSources(bl.BridgeSubnets, cfg.Links, cfg.Logger)
	} else {
		cfg.Logger.Warn("Docker's bridge networks are unknown: the DNS server answers only queries from the host itself", "component", "dns")
	}
	scfg.Sources = sources
	srv, err := New(scfg)
	if err != nil {
		return nil, err
	}
	return &Service{cfg: cfg, srv: srv, w: w, sources: sources}, nil
}

// Run runs the server and the watcher until ctx is done.
func (s *Service) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	errs := make([]error, 3)
	wg.Add(2)
	go func() { defer wg.Done(); errs[0] = s.srv.Run(ctx) }()
	go func() { defer wg.Done(); errs[1] = s.w.Run(ctx) }()
	if s.sources != nil {
		wg.Add(1)
		go func() { defer wg.Done(); errs[2] = s.sources.Run(ctx) }()
	}
	if s.cfg.DockerSocket != "" {
		t := time.NewTicker(daemonCheckEvery)
	loop:
		for {
			s.checkDaemon()
			select {
			case <-ctx.Done():
				break loop
			case <-t.C:
			}
		}
		t.Stop()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (s *Service) checkDaemon() {
	d, err := ReadDaemonDNS(s.cfg.DockerSocket)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.daemon, s.checkEr = nil, err
		return
	}
	if p := daemonProblem(d, s.cfg.Listen.Addr()); p != "" && (s.daemon == nil || daemonProblem(*s.daemon, s.cfg.Listen.Addr()) == "") {
		s.cfg.Logger.Warn(p, "component", "dns")
	}
	s.daemon, s.checkEr = &d, nil
}

// Status is the DNS part of `wgmesh status`.
type Status struct {
	Addr      netip.AddrPort   `json:"addr"`
	Upstreams []netip.AddrPort `json:"upstreams"`
	// Docker is dockerd's DNS setting, if it could be read; DockerCheck
	// why not, if it could not.
	Docker      *DaemonDNS   `json:"docker,omitempty"`
	DockerCheck string       `json:"docker_check,omitempty"`
	Server      ServerStats  `json:"server"`
	Watcher     WatcherStats `json:"watcher"`
	// Known is how many containers of every host the mesh has names for.
	Known    int      `json:"known"`
	Problems []string `json:"problems,omitempty"`
	// Notes are advice that is no problem (the health check ignores
	// them). A new optional field: an older CLI ignores it.
	Notes []string `json:"notes,omitempty"`
}

// Status reports the service's state and its problems.
func (s *Service) Status(names mesh.NameStats) *Status {
	st := &Status{Addr: s.cfg.Listen, Upstreams: s.cfg.Upstreams, Server: s.srv.Stats(), Watcher: s.w.Stats(), Known: names.Known}
	s.mu.Lock()
	st.Docker = s.daemon
	if s.checkEr != nil {
		st.DockerCheck = s.checkEr.Error()
	}
	s.mu.Unlock()
	if st.Docker != nil {
		if p := daemonProblem(*st.Docker, s.cfg.Listen.Addr()); p != "" {
			st.Problems = append(st.Problems, p)
		}
		if n := fallbackNote(*st.Docker, s.cfg.Listen.Addr()); n != "" {
			st.Notes = append(st.Notes, n)
		}
	}
	if st.Server.ListenError != "" {
		st.Problems = append(st.Problems, fmt.Sprintf("the DNS server cannot listen on %s: %s", s.cfg.Listen, st.Server.ListenError))
	}
	if len(s.cfg.Upstreams) == 0 {
		st.Problems = append(st.Problems, "the DNS server has no upstream resolvers (none in /etc/resolv.conf): names outside the mesh do not resolve in containers; set --dns-upstream")
	}
	if st.Watcher.Error != "" && time.Since(st.Watcher.FailingSince) > dockerGrace {
		// Docker starts after the agent, and restarts: only lasting
		// trouble is a problem.
		st.Problems = append(st.Problems, fmt.Sprintf("cannot read container names from Docker for %s: %s; "+
			"names of this host's containers do not resolve on other hosts", time.Since(st.Watcher.FailingSince).Round(time.Second), st.Watcher.Error))
	}
	return st
}

// fallbackNote is the advice for a dockerd that has the server at addr
// as its only DNS server: dockerd forwards only to it, so while the agent
// is down or restarting every container on the host loses outside names
// (docs/design.md, "Names across hosts").
func fallbackNote(d DaemonDNS, addr netip.Addr) string {
	if len(d.Servers) != 1 || d.Servers[0] != addr.String() {
		return ""
	}
	return fmt.Sprintf(`while the agent is down or restarting, containers here resolve no outside names: dockerd forwards them only to %s; `+
		`add a resolver containers can reach (not a 127.x address) as a fallback, "dns": ["%s", "<resolver>"], and restart Docker`, addr, addr)
}

// Summary is a one-line account of the service, for `wgmesh status`,
// with a line for each note.
func (st *Status) Summary() string {
	docker := "dockerd's setting unknown (" + st.DockerCheck + ")"
	if st.Docker != nil {
		docker = "dockerd forwards to " + formatList(st.Docker.Servers)
	}
	var notes strings.Builder
	for _, n := range st.Notes {
		notes.WriteString("\n  note: " + n)
	}
	return fmt.Sprintf("dns %s: %d names here, %d in the mesh; %s; upstreams %s; answered %d, forwarded %d, cached %d, failed %d",
		st.Addr.Addr(), st.Watcher.Names, st.Known, docker, orNone(formatAddrs(st.Upstreams)), st.Server.Answered, st.Server.Forwarded,
		st.Server.Cached, st.Server.Failed) + notes.String()
}

func formatList(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return fmt.Sprint(s)
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
