package dns

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/wgmesh/wgmesh/mesh"
)

// Docker is what the watcher needs of the local engine. It is never
// called from a plugin call: dockerd may hold locks while it calls the
// plugin.
type Docker interface {
	// Endpoints lists the endpoints of running containers on this
	// host's networks of driver, and every container's address on
	// docker_gwbridge, by container ID.
	Endpoints(ctx context.Context, driver string) ([]Endpoint, map[string]netip.Addr, error)
	// Container inspects a container: its name and its attachment to
	// every network it is on.
	Container(ctx context.Context, id string) (Container, error)
	// Events reports the containers that started, stopped, were renamed
	// or removed, or connected to or disconnected from a network, until
	// ctx is done or the stream fails; then it closes the channel and
	// sends the error, if any, on the other.
	Events(ctx context.Context) (<-chan Event, <-chan error)
}

// Endpoint is a container's endpoint on a wgmesh network.
type Endpoint struct {
	NetworkID   string
	Subnet      netip.Prefix
	ContainerID string
	EndpointID  string
	Addr        netip.Addr
}

// Container is what the watcher keeps of an inspected container.
type Container struct {
	ID   string
	Name string
	// Networks are its attachments, by network ID.
	Networks map[string]Attachment
}

// Attachment is a container's endpoint on one network.
type Attachment struct {
	EndpointID string
	Addr       netip.Addr
	// Names are its DNS names there: network aliases (compose service
	// names among them) and, from Docker 25 on, DNSNames.
	Names []string
}

// Event names the container a Docker event was about.
type Event struct{ ContainerID string }

// NamePublisher is where the watcher publishes this host's names
// (mesh.Mesh).
type NamePublisher interface {
	SetNames([]mesh.Name) error
}

var _ NamePublisher = (*mesh.Mesh)(nil)

// WatcherConfig configures a Watcher.
type WatcherConfig struct {
	Docker Docker
	// DriverName is wgmesh's name in Docker.
	DriverName string
	Names      NamePublisher
	// Resync is how often the watcher looks at Docker without an event;
	// Debounce how long it gathers events before it looks.
	Resync   time.Duration
	Debounce time.Duration
	Logger   *slog.Logger
}

// Watcher learns the names of the containers on this host's wgmesh
// networks from Docker's events and a periodic look, publishes them to
// the mesh, and tells the server which container a query comes from
// (Clients).
type Watcher struct {
	cfg  WatcherConfig
	log  *slog.Logger
	kick chan struct{}
	// kickUnknown asks for a look for an address the watcher does not
	// know; such looks are spaced by unknownLookEvery. waiters bounds the
	// queries waiting for one.
	kickUnknown chan struct{}
	waiters     chan struct{}

	mu sync.Mutex
	// cache holds inspected containers; an event about one drops it,
	// and marks it dirty for the look that runs meanwhile.
	cache map[string]Container
	dirty map[string]bool
	// index maps every address of a container with a wgmesh endpoint to
	// the subnets of its wgmesh networks.
	index map[netip.Addr][]netip.Prefix
	// negative remembers addresses that are no such container's, until.
	negative map[netip.Addr]time.Time
	// started and done count looks at Docker; doneCh is closed and
	// replaced when one ends.
	started, done uint64
	doneCh        chan struct{}
	names         int
	lastErr       error
	lastOK        time.Time
	failingSince  time.Time
}

var _ Clients = (*Watcher)(nil)

// negativeFor is how long an address that is no wgmesh container's is
// not looked up again; an event about a container clears it sooner.
const negativeFor = 30 * time.Second

// Bounds on what queries from addresses the watcher does not know may
// cost, when they come from many (forged) addresses: the looks at Docker
// they cause are spaced by unknownLookEvery, at most maxUnknownWaiters
// wait for one (the others are taken for no container's at once, and
// not remembered), and the negative cache holds maxNegative addresses.
const (
	unknownLookEvery  = 500 * time.Millisecond
	maxUnknownWaiters = 64
	maxNegative       = 4096
)

// NewWatcher creates a watcher. It starts nothing; Run does.
func NewWatcher(cfg WatcherConfig) (*Watcher, error) {
	if cfg.Docker == nil || cfg.Names == nil || cfg.DriverName == "" {
		return nil, errors.New("dns: watcher needs Docker, a name publisher and the driver's name")
	}
	if cfg.Resync <= 0 {
		cfg.Resync = 30 * time.Second
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = 50 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Watcher{cfg: cfg, log: cfg.Logger.With("component", "dns"), kick: make(chan struct{}, 1),
		kickUnknown: make(chan struct{}, 1), waiters: make(chan struct{}, maxUnknownWaiters),
		cache: map[string]Container{}, dirty: map[string]bool{}, index: map[netip.Addr][]netip.Prefix{}, negative: map[netip.Addr]time.Time{},
		doneCh: make(chan struct{})}, nil
}

func (w *Watcher) kickLoop() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// Run watches Docker until ctx is done.
func (w *Watcher) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Add(1)
	go w.loopEvents(ctx, &wg)
	defer wg.Wait()
	t := time.NewTicker(w.cfg.Resync)
	defer t.Stop()
	failing := false
	var lastUnknown time.Time
	for {
		err := w.look(ctx)
		switch {
		case err != nil && ctx.Err() != nil:
			return nil
		case err != nil && !failing:
			w.log.Warn("reading container names from Docker; retrying", "err", err)
			failing = true
		case err == nil && failing:
			w.log.Info("reading container names from Docker works again")
			failing = false
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-w.kick:
			// Gather the events of one change (a compose project
			// starting, say) into one look.
			if !sleep(ctx, w.cfg.Debounce) {
				return nil
			}
		case <-w.kickUnknown:
			// An event meanwhile makes the look sooner; it serves the
			// waiting queries as well.
			wait := time.NewTimer(max(w.cfg.Debounce, time.Until(lastUnknown.Add(unknownLookEvery))))
			select {
			case <-ctx.Done():
				wait.Stop()
				return nil
			case <-wait.C:
			case <-w.kick:
				wait.Stop()
				if !sleep(ctx, w.cfg.Debounce) {
					return nil
				}
			}
			lastUnknown = time.Now()
		}
	}
}

// sleep waits for d, or until ctx is done, and reports whether ctx is
// still live.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// loopEvents follows Docker's events, and opens the stream again when it
// ends (dockerd restarts), until ctx is done.
func (w *Watcher) loopEvents(ctx context.Context, wg *sync.WaitGroup) {
	defer wg.Done()
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		evs, errs := w.cfg.Docker.Events(ctx)
		opened := time.Now()
		// A new stream may have missed events: look again.
		w.kickLoop()
		for ev := range evs {
			w.mu.Lock()
			delete(w.cache, ev.ContainerID)
			w.dirty[ev.ContainerID] = true
			clear(w.negative)
			w.mu.Unlock()
			w.kickLoop()
		}
		if err := <-errs; err != nil && ctx.Err() == nil {
			w.log.Debug("Docker's event stream ended", "err", err)
		}
		if time.Since(opened) > 10*time.Second {
			backoff = 100 * time.Millisecond
		}
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// look reads the containers of this host's wgmesh networks, publishes
// their names and rebuilds the index of their addresses.
func (w *Watcher) look(ctx context.Context) error {
	w.mu.Lock()
	w.started++
	n := w.started
	clear(w.dirty)
	cache := maps.Clone(w.cache)
	w.mu.Unlock()
	defer w.finish(n)

	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	eps, gw, err := w.cfg.Docker.Endpoints(ctx, w.cfg.DriverName)
	if err != nil {
		w.setErr(err)
		return err
	}
	byContainer := map[string][]Endpoint{}
	for _, e := range eps {
		byContainer[e.ContainerID] = append(byContainer[e.ContainerID], e)
	}
	for id := range cache {
		if _, ok := byContainer[id]; !ok {
			delete(cache, id)
		}
	}
	var names []mesh.Name
	index := map[netip.Addr][]netip.Prefix{}
	for _, id := range slices.Sorted(maps.Keys(byContainer)) {
		ceps := byContainer[id]
		c, ok := cache[id]
		if !ok || !sameEndpoints(c, ceps) {
			// New, or connected or disconnected since it was inspected.
			if c, err = w.cfg.Docker.Container(ctx, id); err != nil {
				w.log.Debug("inspecting a container", "container", shortID(id), "err", err) // removed meanwhile
				delete(cache, id)
				continue
			}
			cache[id] = c
		}
		var subnets []netip.Prefix
		for _, e := range ceps {
			if !slices.Contains(subnets, e.Subnet) {
				subnets = append(subnets, e.Subnet)
			}
			n := mesh.Name{Subnet: e.Subnet, Endpoint: shortID(e.EndpointID), Name: c.Name, Addr: e.Addr}
			for _, a := range c.Networks[e.NetworkID].Names {
				if a != c.Name && !slices.Contains(n.Aliases, a) {
					n.Aliases = append(n.Aliases, a)
				}
			}
			names = append(names, n)
		}
		slices.SortFunc(subnets, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
		for _, att := range c.Networks {
			if att.Addr.IsValid() {
				index[att.Addr] = subnets
			}
		}
		if a, ok := gw[id]; ok {
			index[a] = subnets
		}
	}
	if err := w.cfg.Names.SetNames(names); err != nil {
		w.log.Warn("some container names cannot be published", "err", err)
	}
	now := time.Now()
	w.mu.Lock()
	// What an event dropped while this look ran may be stale here; the
	// look the event asked for inspects it again.
	for id := range w.cache {
		if _, ok := cache[id]; !ok {
			delete(w.cache, id)
		}
	}
	for id, c := range cache {
		if !w.dirty[id] {
			w.cache[id] = c
		}
	}
	w.index = index
	for a, until := range w.negative {
		if _, ok := index[a]; ok || now.After(until) {
			delete(w.negative, a)
		}
	}
	w.names = len(names)
	w.mu.Unlock()
	w.setErr(nil)
	return nil
}

func (w *Watcher) finish(n uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.done = max(w.done, n)
	close(w.doneCh)
	w.doneCh = make(chan struct{})
}

func (w *Watcher) setErr(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.lastErr = err
	switch {
	case err == nil:
		w.lastOK, w.failingSince = time.Now(), time.Time{}
	case w.failingSince.IsZero():
		w.failingSince = time.Now()
	}
}

// sameEndpoints reports whether an inspected container still has the
// wgmesh endpoints Docker lists for it.
func sameEndpoints(c Container, eps []Endpoint) bool {
	for _, e := range eps {
		if att, ok := c.Networks[e.NetworkID]; !ok || att.EndpointID != e.EndpointID || att.Addr != e.Addr {
			return false
		}
	}
	return true
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// Networks implements Clients. An address it does not know makes it look
// at Docker once more (a container's first query may come before its
// start event): it waits, within ctx, for a look that starts after the
// query came. An address that is still unknown then is not looked up
// again for negativeFor, or until the next event. When too many queries
// wait already, it does not wait (see maxUnknownWaiters).
func (w *Watcher) Networks(ctx context.Context, addr netip.Addr) []netip.Prefix {
	w.mu.Lock()
	if s, ok := w.index[addr]; ok {
		w.mu.Unlock()
		return s
	}
	if until, ok := w.negative[addr]; ok && time.Now().Before(until) {
		w.mu.Unlock()
		return nil
	}
	target := w.started + 1
	w.mu.Unlock()
	select {
	case w.waiters <- struct{}{}:
		defer func() { <-w.waiters }()
	default:
		return nil
	}
	select {
	case w.kickUnknown <- struct{}{}:
	default:
	}
	for {
		w.mu.Lock()
		if w.done >= target {
			s, ok := w.index[addr]
			if !ok {
				w.addNegativeLocked(addr)
			}
			w.mu.Unlock()
			return s
		}
		ch := w.doneCh
		w.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil
		case <-ch:
		}
	}
}

// addNegativeLocked remembers that addr is no container's, within
// maxNegative: when it is full of live entries, addr is not remembered
// (its next query waits for a look again, within the bounds above).
func (w *Watcher) addNegativeLocked(addr netip.Addr) {
	now := time.Now()
	if len(w.negative) >= maxNegative {
		for a, until := range w.negative {
			if now.After(until) {
				delete(w.negative, a)
			}
		}
		if len(w.negative) >= maxNegative {
			return
		}
	}
	w.negative[addr] = now.Add(negativeFor)
}

// WatcherStats is what the watcher reports in status.
type WatcherStats struct {
	// Names is how many container endpoints on wgmesh networks this host
	// publishes names for.
	Names int
	// Error is why the last look at Docker failed, if it did, and
	// FailingSince since when looks fail.
	Error        string    `json:",omitempty"`
	LastOK       time.Time `json:",omitzero"`
	FailingSince time.Time `json:",omitzero"`
}

// Stats reports what the watcher knows.
func (w *Watcher) Stats() WatcherStats {
	w.mu.Lock()
	defer w.mu.Unlock()
	st := WatcherStats{Names: w.names, LastOK: w.lastOK, FailingSince: w.failingSince}
	if w.lastErr != nil {
		st.Error = w.lastErr.Error()
	}
	return st
}
