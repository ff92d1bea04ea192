package driver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/wgmesh/wgmesh/mesh"
)

func TestPlanSync(t *testing.T) {
	s1 := netip.MustParsePrefix("10.60.0.0/16")
	s2 := netip.MustParsePrefix("10.61.0.0/16")
	app := func(v uint64) *mesh.NetworkSpec { return &mesh.NetworkSpec{Version: v, Name: "app"} }
	gone := func(v uint64) *mesh.NetworkSpec { return &mesh.NetworkSpec{Version: v, Name: "app", Deleted: true} }
	local := func(subnet netip.Prefix, name string, version uint64, containers ...string) localNet {
		return localNet{DockerNetwork: DockerNetwork{ID: "id-" + name, Name: name, Subnet: subnet, Containers: containers}, version: version}
	}
	view := func(entries ...mesh.NetworkEntry) *mesh.View {
		v := &mesh.View{Self: "a", Networks: map[netip.Prefix][]mesh.NetworkEntry{}}
		for _, e := range entries {
			v.Networks[e.Subnet] = append(v.Networks[e.Subnet], e)
		}
		return v
	}
	tests := []struct {
		name     string
		locals   []localNet
		view     *mesh.View
		actions  []string
		problems []string
	}{
		{
			name:    "a network created here is published",
			locals:  []localNet{local(s1, "app", 7)},
			view:    view(),
			actions: []string{"publish 10.60.0.0/16 app v7"},
		},
		{
			name:    "a network created elsewhere is created here",
			view:    view(mesh.NetworkEntry{Node: "b", Subnet: s1, Spec: app(5)}),
			actions: []string{"create 10.60.0.0/16 app v5"},
		},
		{
			name:   "a copy of the newest spec is left alone",
			locals: []localNet{local(s1, "app", 5)},
			view:   view(mesh.NetworkEntry{Node: "b", Subnet: s1, Spec: app(5)}),
		},
		{
			name:    "a removal newer than the local network removes it",
			locals:  []localNet{local(s1, "app", 5)},
			view:    view(mesh.NetworkEntry{Node: "b", Subnet: s1, Spec: gone(9)}),
			actions: []string{"remove 10.60.0.0/16 app"},
		},
		{
			name:     "a network with containers is kept and reported",
			locals:   []localNet{local(s1, "app", 5, "web", "db")},
			view:     view(mesh.NetworkEntry{Node: "b", Subnet: s1, Spec: gone(9)}),
			problems: []string{"removed on b, but containers here still use it: web, db"},
		},
		{
			name:    "a network re-created after a removal is published again",
			locals:  []localNet{local(s1, "app", 12)},
			view:    view(mesh.NetworkEntry{Node: "b", Subnet: s1, Spec: gone(9)}),
			actions: []string{"publish 10.60.0.0/16 app v12"},
		},
		{
			name: "a removed network still used elsewhere is reported where",
			view: view(mesh.NetworkEntry{Node: "a", Subnet: s1, Spec: gone(9)},
				mesh.NetworkEntry{Node: "c", Subnet: s1, Endpoints: 2}),
			problems: []string{"was removed on a, but containers still use it on c (2)"},
		},
		{
			name:     "a different network of the same name blocks the copy",
			locals:   []localNet{local(s2, "app", 3)},
			view:     view(mesh.NetworkEntry{Node: "b", Subnet: s1, Spec: app(5)}, mesh.NetworkEntry{Node: "a", Subnet: s2, Spec: app(3)}),
			problems: []string{"a network of that name already has 10.61.0.0/16"},
		},
		{
			name:     "one subnet, two names",
			locals:   []localNet{local(s1, "web", 3)},
			view:     view(mesh.NetworkEntry{Node: "b", Subnet: s1, Spec: app(5)}),
			problems: []string{"network web here is called app on b"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			actions, problems := planSync(tt.locals, tt.view)
			var got []string
			for _, a := range actions {
				switch a.kind {
				case "remove":
					got = append(got, fmt.Sprintf("remove %s %s", a.subnet, a.local.Name))
				default:
					got = append(got, fmt.Sprintf("%s %s %s v%d", a.kind, a.subnet, a.spec.Name, a.spec.Version))
				}
			}
			if !slices.Equal(got, tt.actions) {
				t.Errorf("actions %q, want %q", got, tt.actions)
			}
			if len(problems) != len(tt.problems) {
				t.Fatalf("problems %q, want %q", problems, tt.problems)
			}
			for i, p := range tt.problems {
				if !strings.Contains(problems[i], p) {
					t.Errorf("problem %q does not say %q", problems[i], p)
				}
			}
		})
	}
}

// fakeDocker plays a Docker engine for the sync loop: it keeps networks by
// ID and, like Docker, calls the plugin to create and remove them.
type fakeDocker struct {
	h    *harness
	mu   sync.Mutex
	nets map[string]DockerNetwork
}

func (f *fakeDocker) Networks(context.Context, string) ([]DockerNetwork, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []DockerNetwork
	for _, n := range f.nets {
		out = append(out, n)
	}
	return out, nil
}

func (f *fakeDocker) CreateNetwork(_ context.Context, _ string, n DockerNetwork) error {
	poolID := f.h.requestPool(poolReq(n.Subnet.String(), "", n.IPAMOptions))
	gw := f.h.requestAddress(gatewayReq(poolID, ""))
	n.ID = dockerID("copy of " + n.Name)
	status, body := f.h.post(pathCreateNetwork, createNetworkReq(n.ID, n.Subnet.String(), gw, nil))
	if status != 200 {
		return errors.New(string(body))
	}
	f.mu.Lock()
	f.nets[n.ID] = n
	f.mu.Unlock()
	return nil
}

func (f *fakeDocker) RemoveNetwork(_ context.Context, id string) error {
	f.h.empty(pathDeleteNetwork, netReq(id))
	f.mu.Lock()
	delete(f.nets, id)
	f.mu.Unlock()
	return nil
}

// TestSyncLoop: a local network is published with its Docker name; a
// newer removal removes it through Docker without echoing a removal back;
// a spec from the mesh is created through Docker as a copy of its version.
func TestSyncLoop(t *testing.T) {
	h := newHarness(t)
	docker := &fakeDocker{h: h, nets: map[string]DockerNetwork{}}
	h.d.cfg.Docker = docker
	subnet := netip.MustParsePrefix("10.60.0.0/16")
	n := h.createNetwork("sync net", subnet.String(), nil)
	docker.nets[n.id] = DockerNetwork{ID: n.id, Name: "app", Subnet: subnet, Options: map[string]string{optMTU: "1300"}}

	ctx := context.Background()
	if err := h.d.syncOnce(ctx); err != nil {
		t.Fatal(err)
	}
	spec, from := h.mesh.View().Spec(subnet)
	if spec == nil || spec.Name != "app" || spec.Deleted || from != testNode || spec.Options[optMTU] != "1300" {
		t.Fatalf("published spec %+v from %s", spec, from)
	}
	created := spec.Version

	// Someone removes it (a newer removal); the loop removes it here.
	if err := h.mesh.PublishSpec(subnet, mesh.NetworkSpec{Name: "app", Deleted: true}); err != nil {
		t.Fatal(err)
	}
	if err := h.d.syncOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if len(docker.nets) != 0 || len(h.state().Networks) != 0 {
		t.Fatalf("network not removed: docker %v, state %v", docker.nets, h.state().Networks)
	}
	removal, _ := h.mesh.View().Spec(subnet)
	if !removal.Deleted {
		t.Fatal("the removal was overwritten")
	}

	// A re-creation published by the mesh is created here as its copy.
	h.empty(pathReleasePool, map[string]any{"PoolID": n.poolID})
	if err := h.mesh.PublishSpec(subnet, mesh.NetworkSpec{Name: "app2"}); err != nil {
		t.Fatal(err)
	}
	again, _ := h.mesh.View().Spec(subnet)
	if err := h.d.syncOnce(ctx); err != nil {
		t.Fatal(err)
	}
	st := h.state()
	if len(st.Networks) != 1 {
		t.Fatalf("copy not created: %+v", st.Networks)
	}
	for _, net := range st.Networks {
		if net.SpecVersion != again.Version || again.Version <= created {
			t.Fatalf("copy stands for version %d, want the spec's %d", net.SpecVersion, again.Version)
		}
	}
	// And it is not published back as a newer definition.
	if err := h.d.syncOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if s, _ := h.mesh.View().Spec(subnet); s.Version != again.Version {
		t.Fatalf("the copy republished itself as version %d", s.Version)
	}
}
