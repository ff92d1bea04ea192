//go:build e2e

package e2e

import (
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/test/poll"
)

// TestNamesHostFailure: a host crashes. The names of its containers are
// withdrawn on the other hosts when gossip declares it failed, and come
// back with it.
func TestNamesHostFailure(t *testing.T) {
	ctx := testCtx(t)
	h1, h3 := theLab.Hosts[0], theLab.Hosts[2]
	outsideDNS(t)
	network(t, "dhf", "10.105.0.0/16", nil)
	ip3 := container(t, h3, "doomed", "dhf", []string{"--restart=always"})
	container(t, h1, "survivor", "dhf", nil)
	r := newResolver(t, h1, "survivor")
	r.waitName("doomed", []string{ip3}, 10*time.Second)

	h3.Crash()
	crashed := time.Now()
	r.waitName("doomed", nil, 60*time.Second)
	gone := time.Since(crashed)
	if m := member(status(t, h1), h3.Name); m == nil || m.State != mesh.Dead {
		t.Errorf("the name went while h1 sees %s as %v", h3.Name, m)
	}
	t.Logf("a crashed host's names were withdrawn %s after the crash", gone.Round(100*time.Millisecond))

	if err := h3.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h3.StartDocker(ctx); err != nil {
		t.Fatal(err)
	}
	poll.Eventually(t, 90*time.Second, "doomed resolving to its new address", func() error {
		ip, err := h3.ContainerIP(ctx, "doomed", "dhf")
		if err != nil {
			return err
		}
		if got, _ := r.lookup("doomed"); len(got) != 1 || got[0] != ip {
			return fmt.Errorf("doomed resolves to %v, is at %s", got, ip)
		}
		return nil
	})
	// An agent restart alone keeps the names: the restarted agent
	// publishes them again at once.
	h3.StopAgent(syscall.SIGTERM)
	if err := h3.StartAgent(ctx); err != nil {
		t.Fatal(err)
	}
	ip, err := h3.ContainerIP(ctx, "doomed", "dhf")
	if err != nil {
		t.Fatal(err)
	}
	r.waitName("doomed", []string{ip}, 10*time.Second)
}
