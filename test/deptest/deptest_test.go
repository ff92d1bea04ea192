// Package deptest keeps wgmesh's imports going one way:
// cmd → driver → mesh → crypto, mesh → mesh/gossipnet, mesh → mesh/records,
// mesh → mesh/reachability → mesh/gossipnet and mesh/records, and
// driver → driver/dataplane. The cluster-wide code must not grow a
// dependency on the host's kernel or on Docker, and crypto stands alone.
package deptest

import (
	"encoding/json"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// deps lists the packages pkg imports, directly or not.
func deps(t *testing.T, pkg string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", "-json=ImportPath", pkg).Output()
	if err != nil {
		t.Fatalf("go list %s: %v", pkg, err)
	}
	var all []string
	dec := json.NewDecoder(strings.NewReader(string(out)))
	for dec.More() {
		var p struct{ ImportPath string }
		if err := dec.Decode(&p); err != nil {
			t.Fatal(err)
		}
		all = append(all, p.ImportPath)
	}
	return all
}

const mod = "github.com/wgmesh/wgmesh/"

func TestImportDirection(t *testing.T) {
	forbidden := map[string][]string{
		// Imports nothing of ours but internal helpers.
		mod + "crypto": {mod + "mesh", mod + "driver", mod + "cmd", mod + "test"},
		// Cluster-wide: no OS, no WireGuard, no Docker, nothing host-local.
		mod + "mesh": {"github.com/vishvananda/", "github.com/google/nftables", "golang.zx2c4.com/wireguard", "github.com/docker/",
			"github.com/moby/", mod + "driver", mod + "cmd"},
		// The gossip port below memberlist: mesh imports it, never the
		// reverse, and it knows nothing of records, catalog, consensus
		// or the driver (mod+"mesh" covers mesh/consensus and
		// mesh/catalog too).
		mod + "mesh/gossipnet": {"github.com/vishvananda/", "github.com/google/nftables", "golang.zx2c4.com/wireguard", "github.com/docker/",
			"github.com/moby/", mod + "mesh", mod + "driver", mod + "cmd"},
		// The signed records and their replica: mesh imports them, never
		// the reverse, and they know nothing of the gossip port, consensus
		// or the driver (mesh/catalog they may use; mesh itself they cannot,
		// it imports them).
		mod + "mesh/records": {"github.com/vishvananda/", "github.com/google/nftables", "golang.zx2c4.com/wireguard", "github.com/docker/",
			"github.com/moby/", mod + "mesh/gossipnet", mod + "mesh/consensus", mod + "driver", mod + "cmd"},
		// NAT observation and path MTU probing: mesh imports it, never
		// the reverse, and it knows nothing of consensus or the driver.
		// Of the rest of mesh it uses only what allowed lists.
		mod + "mesh/reachability": {"github.com/vishvananda/", "github.com/google/nftables", "golang.zx2c4.com/wireguard", "github.com/docker/",
			"github.com/moby/", mod + "mesh", mod + "driver", mod + "cmd"},
		// Desired state only; the implementations live below it.
		mod + "driver/dataplane": {"github.com/vishvananda/", "github.com/google/nftables", "golang.zx2c4.com/wireguard/device", mod + "mesh", mod + "driver/dataplane/linux"},
		// The driver talks to the kernel and to Docker only through its
		// interfaces.
		mod + "driver": {"github.com/vishvananda/", "github.com/google/nftables", "golang.zx2c4.com/wireguard/device", "github.com/moby/", mod + "driver/dataplane/linux", mod + "cmd"},
		// The polling helper of every test package, the lab and the
		// bench: it imports nothing of ours, so that any of them can.
		mod + "test/poll": {mod},
	}
	// Exceptions to forbidden: what a package may import although a ban
	// covers it.
	allowed := map[string][]string{
		// mesh/records needs mesh/catalog's name and subnet rules.
		mod + "mesh/reachability": {mod + "mesh/gossipnet", mod + "mesh/records", mod + "mesh/catalog"},
	}
	for pkg, bans := range forbidden {
		for _, d := range deps(t, pkg) {
			if d == pkg || slices.ContainsFunc(allowed[pkg], func(a string) bool { return strings.HasPrefix(d, a) }) {
				continue
			}
			for _, ban := range bans {
				if strings.HasPrefix(d, ban) {
					t.Errorf("%s imports %s", strings.TrimPrefix(pkg, mod), d)
				}
			}
		}
	}
}
