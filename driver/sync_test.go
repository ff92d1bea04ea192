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
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

func TestPlanSync(t *testing.T) {
	s1 := netip.MustParsePrefix("10.60.0.0/16")
	s2 := netip.MustParsePrefix("10.61.0.0/16")
	local := func(subnet netip.Prefix, name string, containers ...string) DockerNetwork {
		return DockerNetwork{ID: "id-" + name, Name: name, Subnet: subnet, Containers: containers}
	}
	type net struct {
		subnet  netip.Prefix
		name    string // "" for no definition yet
		deleted bool
	}
	view := func(nets ...net) *mesh.View {
		st := catalog.NewState()
		for _, n := range nets {
			cn := &catalog.Network{Subnet: n.subnet, BlockBits: 24, Gateway: n.subnet.Addr().Next(), Deleted: n.deleted, DeletedBy: "b"}
			if n.name != "" {
				cn.Spec = &catalog.Spec{Name: n.name}
			}
			st.Networks[n.subnet] = cn
		}
		return &mesh.View{Self: "a", Catalog: st}
	}
	tests := []struct {
		name     string
		locals   []DockerNetwork
		view     *mesh.View
		actions  []string
		problems []string
	}{
		{
			name:    "a network created here is recorded",
			locals:  []DockerNetwork{local(s1, "app")},
			view:    view(net{subnet: s1}),
			actions: []string{"publish 10.60.0.0/16 app"},
		},
		{
			name:    "a network of the cluster is created here",
			view:    view(net{s1, "app", false}),
			actions: []string{"create 10.60.0.0/16 app"},
		},
		{
			name:   "a copy is left alone",
			locals: []DockerNetwork{local(s1, "app")},
			view:   view(net{s1, "app", false}),
		},
		{
			name:    "a network removed from the cluster is removed here",
			locals:  []DockerNetwork{local(s1, "app")},
			view:    view(net{s1, "app", true}),
			actions: []string{"remove 10.60.0.0/16 app"},
		},
		{
			name:     "a removed network with containers is kept and reported",
			locals:   []DockerNetwork{local(s1, "app", "web", "db")},
			view:     view(net{s1, "app", true}),
			problems: []string{"removed from the cluster (by b), but containers here still use it: web, db"},
		},
		{
			name:   "a network the catalog does not know yet is left alone",
			locals: []DockerNetwork{local(s1, "app")},
			view:   view(),
		},
		{
			name:     "a different network of the same name blocks the copy",
			locals:   []DockerNetwork{local(s2, "app")},
			view:     view(net{s1, "app", false}, net{s2, "app", false}),
			problems: []string{"a network of that name already has 10.61.0.0/16"},
		},
		{
			name:     "one subnet, two names",
			locals:   []DockerNetwork{local(s1, "web")},
			view:     view(net{s1, "app", false}),
			problems: []string{"network web here is called app in the cluster"},
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
				case "create":
					got = append(got, fmt.Sprintf("create %s %s", a.subnet, a.create.Name))
				default:
					got = append(got, fmt.Sprintf("%s %s %s", a.kind, a.subnet, a.spec.Name))
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
	// pids are the running containers' process IDs, by endpoint ID.
	pids map[string]int
}

func (f *fakeDocker) EndpointPID(_ context.Context, _, endpointID string) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if pid, ok := f.pids[endpointID]; ok {
		return pid, nil
	}
	return 0, ErrEndpointGone
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

// TestSyncLoop: a local network is recorded in the cluster with its Docker
// name; pruned here, it comes back; removed from the cluster, it goes,
// unless containers use it.
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
	spec := h.mesh.View().Spec(subnet)
	if spec == nil || spec.Name != "app" || spec.Options[optMTU] != "1300" {
		t.Fatalf("recorded spec %+v", spec)
	}

	// A prune here removes this host's copy; the loop puts it back.
	if err := docker.RemoveNetwork(ctx, n.id); err != nil {
		t.Fatal(err)
	}
	h.empty(pathReleasePool, map[string]any{"PoolID": n.poolID})
	if err := h.d.syncOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if len(docker.nets) != 1 || len(h.state().Networks) != 1 {
		t.Fatalf("pruned network not put back: docker %v, state %v", docker.nets, h.state().Networks)
	}
	for _, dn := range docker.nets {
		if dn.Name != "app" || dn.Options[optMTU] != "1300" {
			t.Fatalf("put back as %+v", dn)
		}
	}

	// Removed from the cluster: the loop removes it here.
	if _, err := h.d.RemoveClusterNetwork(ctx, "app"); err != nil {
		t.Fatal(err)
	}
	if err := h.d.syncOnce(ctx); err != nil {
		t.Fatal(err)
	}
	if len(docker.nets) != 0 || len(h.state().Networks) != 0 {
		t.Fatalf("network not removed: docker %v, state %v", docker.nets, h.state().Networks)
	}
	if h.mesh.View().Network(subnet) != nil {
		t.Fatal("the network is still in the cluster")
	}
	if _, err := h.d.RemoveClusterNetwork(ctx, "app"); err == nil {
		t.Fatal("removing a removed network succeeded")
	}
}
