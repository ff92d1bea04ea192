package dns

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/test/poll"
)

// fakeDocker is a Docker engine in memory: containers with their
// attachments, and an event stream the test feeds. It counts inspects.
type fakeDocker struct {
	mu         sync.Mutex
	subnets    map[string]netip.Prefix // wgmesh network ID -> subnet
	containers map[string]Container
	gw         map[string]netip.Addr
	inspects   int
	events     chan Event
	fail       error
}

func newFakeDocker() *fakeDocker {
	return &fakeDocker{subnets: map[string]netip.Prefix{"netred": red, "netblue": blue}, containers: map[string]Container{},
		gw: map[string]netip.Addr{}, events: make(chan Event, 16)}
}

func (f *fakeDocker) Endpoints(ctx context.Context, driver string) ([]Endpoint, map[string]netip.Addr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if driver != "wgmesh" {
		return nil, nil, fmt.Errorf("driver %q", driver)
	}
	if f.fail != nil {
		return nil, nil, f.fail
	}
	var out []Endpoint
	for id, c := range f.containers {
		for nid, att := range c.Networks {
			if s, ok := f.subnets[nid]; ok {
				out = append(out, Endpoint{NetworkID: nid, Subnet: s, ContainerID: id, EndpointID: att.EndpointID, Addr: att.Addr})
			}
		}
	}
	return out, maps.Clone(f.gw), nil
}

func (f *fakeDocker) Container(ctx context.Context, id string) (Container, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.inspects++
	c, ok := f.containers[id]
	if !ok {
		return Container{}, fmt.Errorf("no such container %s", id)
	}
	c.Networks = maps.Clone(c.Networks)
	return c, nil
}

func (f *fakeDocker) Events(ctx context.Context) (<-chan Event, <-chan error) {
	out := make(chan Event)
	errc := make(chan error, 1)
	go func() {
		defer close(out)
		for {
			select {
			case <-ctx.Done():
				errc <- nil
				return
			case ev := <-f.events:
				select {
				case out <- ev:
				case <-ctx.Done():
					errc <- nil
					return
				}
			}
		}
	}()
	return out, errc
}

// run starts a container, or changes it, and sends its event.
func (f *fakeDocker) run(c Container, gw string) {
	f.mu.Lock()
	f.containers[c.ID] = c
	if gw != "" {
		f.gw[c.ID] = netip.MustParseAddr(gw)
	}
	f.mu.Unlock()
	f.events <- Event{ContainerID: c.ID}
}

func (f *fakeDocker) remove(id string) {
	f.mu.Lock()
	delete(f.containers, id)
	delete(f.gw, id)
	f.mu.Unlock()
	f.events <- Event{ContainerID: id}
}

func (f *fakeDocker) inspected() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.inspects
}

// fakePublisher records what the watcher publishes.
type fakePublisher struct {
	mu    sync.Mutex
	names []mesh.Name
	calls int
}

func (p *fakePublisher) SetNames(names []mesh.Name) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.names = slices.Clone(names)
	p.calls++
	return nil
}

func (p *fakePublisher) looks() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.calls
}

func (p *fakePublisher) published() map[string]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[string]string{}
	for _, n := range p.names {
		out[fmt.Sprintf("%s %s %v", n.Subnet, n.Name, n.Aliases)] = n.Addr.String()
	}
	return out
}

func att(ep, addr string, names ...string) Attachment {
	return Attachment{EndpointID: ep, Addr: netip.MustParseAddr(addr), Names: names}
}

func startWatcher(t *testing.T, d Docker, p NamePublisher, resync time.Duration) *Watcher {
	t.Helper()
	w, err := NewWatcher(WatcherConfig{Docker: d, DriverName: "wgmesh", Names: p, Resync: resync, Debounce: 5 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return w
}

// TestWatcher: names follow Docker's events; every address of a
// container maps to its wgmesh networks; a container is inspected again
// only when an event says it changed.
func TestWatcher(t *testing.T) {
	d := newFakeDocker()
	p := &fakePublisher{}
	w := startWatcher(t, d, p, time.Hour)
	web := Container{ID: "c1" + fmt.Sprint(time.Now().UnixNano()), Name: "web", Networks: map[string]Attachment{
		"netred":    att("e1e1e1e1e1e1e1e1", "10.60.1.2", "www", "web", "c1short"),
		"netbridge": att("e9e9e9e9e9e9", "172.20.0.2"),
	}}
	d.run(web, "172.18.0.2")
	want := map[string]string{"10.60.0.0/16 web [www c1short]": "10.60.1.2"}
	poll.Eventually(t, 5*time.Second, "web's names published", func() error {
		if got := p.published(); !maps.Equal(got, want) {
			return fmt.Errorf("published %v", got)
		}
		return nil
	})
	ctx := context.Background()
	for _, a := range []string{"10.60.1.2", "172.20.0.2", "172.18.0.2"} {
		if got := w.Networks(ctx, netip.MustParseAddr(a)); !slices.Equal(got, []netip.Prefix{red}) {
			t.Errorf("%s: %v", a, got)
		}
	}
	p.mu.Lock()
	if p.names[0].Endpoint != "e1e1e1e1e1e1" {
		t.Errorf("endpoint %q", p.names[0].Endpoint)
	}
	p.mu.Unlock()

	// It connects to blue too.
	web.Networks = maps.Clone(web.Networks)
	web.Networks["netblue"] = att("e2e2e2e2e2e2", "10.61.1.2")
	d.run(web, "")
	want["10.61.0.0/16 web []"] = "10.61.1.2"
	poll.Eventually(t, 5*time.Second, "web on blue too", func() error {
		if got := w.Networks(ctx, netip.MustParseAddr("172.18.0.2")); !slices.Equal(got, []netip.Prefix{red, blue}) {
			return fmt.Errorf("networks %v", got)
		}
		if got := p.published(); !maps.Equal(got, want) {
			return fmt.Errorf("published %v", got)
		}
		return nil
	})
	// A periodic look with no change inspects nothing.
	n := d.inspected()
	w.kickLoop()
	time.Sleep(100 * time.Millisecond)
	if d.inspected() != n {
		t.Errorf("an unchanged container was inspected %d more times", d.inspected()-n)
	}

	// It stops: its names and addresses go.
	d.remove(web.ID)
	poll.Eventually(t, 5*time.Second, "web's names gone", func() error {
		if got := p.published(); len(got) != 0 {
			return fmt.Errorf("published %v", got)
		}
		return nil
	})
	if got := w.Networks(ctx, netip.MustParseAddr("172.18.0.2")); got != nil {
		t.Errorf("a stopped container's address maps to %v", got)
	}
	if st := w.Stats(); st.Names != 0 || st.Error != "" || st.LastOK.IsZero() {
		t.Errorf("stats %+v", st)
	}
}

// TestWatcherFirstQuery: a container's first query may come before its
// start event is handled: the lookup looks at Docker itself. An address
// that is no container's is not looked up again at every query.
func TestWatcherFirstQuery(t *testing.T) {
	d := newFakeDocker()
	p := &fakePublisher{}
	w := startWatcher(t, d, p, time.Hour)
	poll.Eventually(t, 5*time.Second, "the watcher's first look", func() error {
		if p.looks() == 0 {
			return fmt.Errorf("no first look")
		}
		return nil
	})
	// Started without an event (the stream lags).
	d.mu.Lock()
	d.containers["c2"] = Container{ID: "c2", Name: "fresh", Networks: map[string]Attachment{"netred": att("e3e3e3e3e3e3", "10.60.3.2")}}
	d.gw["c2"] = netip.MustParseAddr("172.18.0.3")
	d.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if got := w.Networks(ctx, netip.MustParseAddr("172.18.0.3")); !slices.Equal(got, []netip.Prefix{red}) {
		t.Fatalf("first query: %v", got)
	}
	looks := p.looks()
	for range 5 {
		if got := w.Networks(ctx, netip.MustParseAddr("172.18.0.99")); got != nil {
			t.Fatalf("stranger: %v", got)
		}
	}
	time.Sleep(50 * time.Millisecond)
	if extra := p.looks() - looks; extra > 1 {
		t.Errorf("an unknown address made %d looks at Docker", extra)
	}
}

// TestWatcherDockerDown: while Docker cannot be read, the names stay as
// they were; the error shows in the stats.
func TestWatcherDockerDown(t *testing.T) {
	d := newFakeDocker()
	p := &fakePublisher{}
	d.containers["c3"] = Container{ID: "c3", Name: "db", Networks: map[string]Attachment{"netred": att("e4e4e4e4e4e4", "10.60.4.2")}}
	w := startWatcher(t, d, p, 20*time.Millisecond)
	poll.Eventually(t, 5*time.Second, "db's name published", func() error {
		if len(p.published()) != 1 {
			return fmt.Errorf("published %v", p.published())
		}
		return nil
	})
	d.mu.Lock()
	d.fail = fmt.Errorf("dockerd is restarting")
	d.mu.Unlock()
	poll.Eventually(t, 5*time.Second, "Docker's error in the stats", func() error {
		if st := w.Stats(); st.Error == "" {
			return fmt.Errorf("no error yet")
		}
		return nil
	})
	if len(p.published()) != 1 {
		t.Errorf("names dropped while Docker is down: %v", p.published())
	}
}
