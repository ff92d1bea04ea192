//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// Containers find each other by name across hosts: Docker's embedded
// resolver answers the names of its own host and forwards the others to
// the agent's DNS server (dockerd runs with --dns lab.DNSAddr), which
// answers from the names the mesh spreads.

// resolver queries Docker's resolver (127.0.0.11) from inside a
// container, as the container's own programs do.
type resolver struct {
	t *testing.T
	c *lab.DNSClient
}

func newResolver(t *testing.T, h *lab.Host, ctr string) *resolver {
	t.Helper()
	ns, err := h.ContainerNetNS(testCtx(t), ctr)
	if err != nil {
		t.Fatal(err)
	}
	c, err := lab.NewDNSClient(ns, "127.0.0.11:53")
	if err != nil {
		t.Fatalf("DNS client in %s: %v", ctr, err)
	}
	t.Cleanup(func() { c.Close() })
	return &resolver{t, c}
}

// lookup returns name's addresses, sorted, and the answer's code.
func (r *resolver) lookup(name string) ([]string, int) {
	r.t.Helper()
	addrs, m, _, err := r.c.Query(testCtx(r.t), name)
	if err != nil {
		r.t.Fatalf("looking up %s: %v", name, err)
	}
	slices.Sort(addrs)
	return addrs, m.Rcode
}

// waitName waits until name resolves to want (sorted; none: the name
// does not exist) and returns how long that took.
func (r *resolver) waitName(name string, want []string, within time.Duration) time.Duration {
	r.t.Helper()
	start := time.Now()
	// Often: the callers log how long names take to spread.
	if err := poll.Every(context.Background(), 20*time.Millisecond, within, name+" resolving", func() error {
		if got, rcode := r.lookup(name); !slices.Equal(got, want) || (len(want) == 0 && rcode != dns.RcodeNameError) {
			return fmt.Errorf("%v (%s), want %v", got, dns.RcodeToString[rcode], want)
		}
		return nil
	}); err != nil {
		r.t.Fatal(err)
	}
	return time.Since(start)
}

// outsideDNS runs the lab's outside world's DNS server for the test: the
// upstream of the agents, which answers outside.test and says that any
// other name does not exist. Without it, names nobody knows get SERVFAIL.
func outsideDNS(t *testing.T) *lab.OutsideDNS {
	t.Helper()
	out, err := theLab.StartOutsideDNS(map[string]netip.Addr{"outside.test": netip.MustParseAddr(lab.WANServer)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(out.Close)
	return out
}

// webServer is the command of a container serving its name over HTTP.
func webServer(text string) []string {
	return []string{"sh", "-c", "echo " + text + " > /www/index.html && exec httpd -f -p 80 -h /www"}
}

// TestNames: a container's name and aliases resolve on every host of its
// network; an alias on two hosts answers with both, in turns; a name
// goes everywhere within seconds of its container stopping or leaving
// the network; a new container's name reaches the other hosts fast.
func TestNames(t *testing.T) {
	ctx := testCtx(t)
	h1, h2, h3 := theLab.Hosts[0], theLab.Hosts[1], theLab.Hosts[2]
	outsideDNS(t)
	network(t, "dn", "10.100.0.0/16", nil)
	web := container(t, h1, "web", "dn", []string{"--network-alias", "www"}, webServer("hello-from-h1")...)
	web2 := container(t, h2, "web2", "dn", []string{"--network-alias", "www"}, webServer("hello-from-h2")...)
	container(t, h3, "cli", "dn", nil)
	r := newResolver(t, h3, "cli")

	r.waitName("web", []string{web}, 10*time.Second)
	r.waitName("web2", []string{web2}, 10*time.Second)
	both := []string{web, web2}
	slices.Sort(both)
	r.waitName("www", both, 10*time.Second)
	// By name, with the container's own tools.
	out, err := h3.Docker(ctx, "exec", "cli", "wget", "-qO-", "http://web/")
	if err != nil || !strings.Contains(out, "hello-from-h1") {
		t.Fatalf("wget http://web/ from h3: %v\n%s", err, out)
	}
	out, err = h3.Docker(ctx, "exec", "cli", "nslookup", "www")
	if err != nil || !strings.Contains(out, web) || !strings.Contains(out, web2) {
		t.Fatalf("nslookup www on h3: %v\n%s", err, out)
	}
	// Round robin: the first address changes from one answer to another.
	first := map[string]int{}
	for range 30 {
		addrs, _, _, err := r.c.Query(ctx, "www")
		if err != nil || len(addrs) != 2 {
			t.Fatalf("www: %v %v", addrs, err)
		}
		first[addrs[0]]++
	}
	if len(first) != 2 {
		t.Errorf("www answered in one order only: %v", first)
	}
	// A name that exists nowhere does not exist, and the container's
	// own short ID (an alias Docker gives every container) resolves.
	if _, rcode := r.lookup("no-such-container"); rcode != dns.RcodeNameError {
		t.Errorf("a name that exists nowhere: %s", dns.RcodeToString[rcode])
	}
	id, err := h1.Docker(ctx, "inspect", "-f", "{{.Id}}", "web")
	if err != nil {
		t.Fatal(err)
	}
	r.waitName(strings.TrimSpace(id)[:12], []string{web}, 5*time.Second)

	// A new container's name on another host: how long from docker run
	// until it resolves there.
	start := time.Now()
	late := container(t, h1, "late", "dn", nil)
	r.waitName("late", []string{late}, 10*time.Second)
	t.Logf("a new container's name resolved on another host %s after docker run began", time.Since(start).Round(time.Millisecond))

	// Stopping takes the name away everywhere; so does leaving the
	// network.
	if _, err := h2.Docker(ctx, "stop", "-t", "0", "web2"); err != nil {
		t.Fatal(err)
	}
	took := r.waitName("web2", nil, 10*time.Second)
	r.waitName("www", []string{web}, 5*time.Second)
	t.Logf("a stopped container's name stopped resolving on another host after %s", took.Round(time.Millisecond))
	if _, err := h1.Docker(ctx, "network", "disconnect", "dn", "late"); err != nil {
		t.Fatal(err)
	}
	took = r.waitName("late", nil, 10*time.Second)
	t.Logf("a disconnected container's name stopped resolving on another host after %s", took.Round(time.Millisecond))
	// Connecting again brings it back.
	if _, err := h1.Docker(ctx, "network", "connect", "--alias", "again", "dn", "late"); err != nil {
		t.Fatal(err)
	}
	ip, err := h1.ContainerIP(ctx, "late", "dn")
	if err != nil {
		t.Fatal(err)
	}
	r.waitName("again", []string{ip}, 10*time.Second)

	// The agents report their part.
	for _, h := range theLab.Hosts {
		st := status(t, h)
		if st.DNS == nil || st.DNS.Docker == nil || !slices.Equal(st.DNS.Docker.Servers, []string{lab.DNSAddr}) || len(st.DNS.Problems) > 0 {
			t.Errorf("%s: DNS status %+v", h.Name, st.DNS)
		}
	}
	if st := status(t, h3); st.DNS.Server.Answered == 0 {
		t.Errorf("h3 answered no query from the mesh: %+v", st.DNS.Server)
	}
}

// TestNamesIsolation: a container learns the names of its own networks
// only; on two networks, it learns both.
func TestNamesIsolation(t *testing.T) {
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	outsideDNS(t)
	network(t, "dred", "10.101.0.0/16", nil, h1, h2)
	network(t, "dblue", "10.102.0.0/16", nil, h1, h2)
	rip := container(t, h1, "rname", "dred", []string{"--network-alias", "shared"})
	bip := container(t, h1, "bname", "dblue", []string{"--network-alias", "shared"})
	container(t, h2, "rcli", "dred", nil)
	container(t, h2, "bcli", "dblue", nil)
	rr, br := newResolver(t, h2, "rcli"), newResolver(t, h2, "bcli")
	rr.waitName("rname", []string{rip}, 10*time.Second)
	br.waitName("bname", []string{bip}, 10*time.Second)
	rr.waitName("shared", []string{rip}, 5*time.Second)
	br.waitName("shared", []string{bip}, 5*time.Second)
	for _, c := range []struct {
		r    *resolver
		name string
	}{{rr, "bname"}, {br, "rname"}} {
		if addrs, rcode := c.r.lookup(c.name); rcode != dns.RcodeNameError {
			t.Errorf("a container learned %s of another network: %v %s", c.name, addrs, dns.RcodeToString[rcode])
		}
	}
	// On both networks: both names.
	if _, err := h2.Docker(testCtx(t), "network", "connect", "dblue", "rcli"); err != nil {
		t.Fatal(err)
	}
	rr.waitName("bname", []string{bip}, 10*time.Second)
	both := []string{rip, bip}
	slices.Sort(both)
	rr.waitName("shared", both, 5*time.Second)
}

// TestNamesOutside: names outside the mesh resolve through the host's
// upstream (the lab's outside world), from containers on wgmesh networks
// and on Docker's default bridge alike.
func TestNamesOutside(t *testing.T) {
	ctx := testCtx(t)
	h1 := theLab.Hosts[0]
	out := outsideDNS(t)
	network(t, "dout", "10.103.0.0/16", nil, h1)
	container(t, h1, "ocli", "dout", nil)
	r := newResolver(t, h1, "ocli")
	r.waitName("outside.test", []string{lab.WANServer}, 10*time.Second)
	if _, rcode := r.lookup("nowhere.test"); rcode != dns.RcodeNameError {
		t.Errorf("nowhere.test: %s", dns.RcodeToString[rcode])
	}
	if out.Queries() == 0 {
		t.Fatal("the outside server got no query: the answer came from elsewhere")
	}
	// A container on the default bridge has lab.DNSAddr as its resolver.
	container(t, h1, "obridge", "bridge", nil)
	got, err := h1.Docker(ctx, "exec", "obridge", "nslookup", "outside.test")
	if err != nil || !strings.Contains(got, lab.WANServer) {
		t.Fatalf("nslookup outside.test on the default bridge: %v\n%s", err, got)
	}
}

// TestNamesCompose: a compose project per host; a service on one host
// reaches a service of another host's project by its service name, on a
// shared external wgmesh network.
func TestNamesCompose(t *testing.T) {
	compose := os.Getenv("WGMESH_E2E_COMPOSE")
	if compose == "" {
		t.Skip("WGMESH_E2E_COMPOSE (the docker-compose binary .ci/compose.sh prints) is not set")
	}
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	network(t, "dcomp", "10.104.0.0/16", nil, h1, h2)
	dir := t.TempDir()
	project := func(h *lab.Host, name, service string, cmd []string) {
		t.Helper()
		var quoted []string
		for _, c := range cmd {
			quoted = append(quoted, fmt.Sprintf("%q", c))
		}
		file := filepath.Join(dir, name+".yaml")
		yaml := fmt.Sprintf(`services:
  %s:
    image: %s
    pull_policy: never
    command: [%s]
networks:
  default:
    name: dcomp
    external: true
`, service, lab.Image, strings.Join(quoted, ", "))
		if err := os.WriteFile(file, []byte(yaml), 0o644); err != nil {
			t.Fatal(err)
		}
		run := func(args ...string) (string, error) {
			cmd := exec.CommandContext(ctx, compose, append([]string{"-p", name, "-f", file}, args...)...)
			cmd.Env = append(os.Environ(), "DOCKER_HOST=unix://"+h.DockerSock(), "DOCKER_CONFIG="+filepath.Join(dir, "docker-config"))
			out, err := cmd.CombinedOutput()
			return string(out), err
		}
		if out, err := run("up", "-d"); err != nil {
			t.Fatalf("compose up %s on %s: %v\n%s", name, h.Name, err, out)
		}
		t.Cleanup(func() {
			if out, err := run("down", "-t", "0"); err != nil {
				t.Errorf("compose down %s on %s: %v\n%s", name, h.Name, err, out)
			}
		})
	}
	project(h1, "back", "api", webServer("compose-api-on-h1"))
	project(h2, "front", "web", []string{"sleep", "86400"})
	var out string
	poll.Eventually(t, 20*time.Second, "front's web getting an answer from http://api/", func() error {
		var err error
		out, err = h2.Docker(ctx, "exec", "front-web-1", "wget", "-qO-", "http://api/")
		return err
	})
	if !strings.Contains(out, "compose-api-on-h1") {
		t.Fatalf("front's web got %q from http://api/", out)
	}
	// The container name compose gives resolves too.
	if out, err := h2.Docker(ctx, "exec", "front-web-1", "nslookup", "back-api-1"); err != nil {
		t.Fatalf("nslookup back-api-1: %v\n%s", err, out)
	}
}

// TestNamesNeighbour: the agent's DNS server answers this host's
// containers only. A machine on the host's LAN segment that routes
// lab.DNSAddr to the host gets no answer, over UDP or TCP, while on that
// host a container on a wgmesh network, one on a bridge network and the
// wgmesh network, and one on a bridge network only still resolve (the
// first two a remote container's name, all three an outside name).
func TestNamesNeighbour(t *testing.T) {
	ctx := testCtx(t)
	h1, h2 := theLab.Hosts[0], theLab.Hosts[1]
	out := outsideDNS(t)
	network(t, "dnb", "10.122.0.0/16", nil, h1, h2)
	far := container(t, h2, "nbfar", "dnb", nil)
	if _, err := h1.Docker(ctx, "network", "create", "-d", "bridge", "--subnet", "172.30.5.0/24", "nbbr"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = h1.Docker(context.Background(), "rm", "-f", "nbboth", "nbbridge")
		_, _ = h1.Docker(context.Background(), "network", "rm", "nbbr")
	})
	container(t, h1, "nbmesh", "dnb", nil)
	container(t, h1, "nbboth", "nbbr", nil)
	if _, err := h1.Docker(ctx, "network", "connect", "dnb", "nbboth"); err != nil {
		t.Fatal(err)
	}
	container(t, h1, "nbbridge", "nbbr", nil)

	nb, err := theLab.AddNeighbour(ctx, "nb", netip.MustParseAddr("192.168.77.60"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nb.Close)
	if out, err := nb.Exec(ctx, "ip", "route", "add", lab.DNSAddr+"/32", "via", h1.Addr.String()); err != nil {
		t.Fatalf("routing %s to h1: %v\n%s", lab.DNSAddr, err, out)
	}

	// This host's containers resolve first: the agent is serving.
	for _, c := range []struct {
		ctr    string
		remote bool
	}{{"nbmesh", true}, {"nbboth", true}, {"nbbridge", false}} {
		r := newResolver(t, h1, c.ctr)
		if c.remote {
			r.waitName("nbfar", []string{far}, 10*time.Second)
		}
		r.waitName("outside.test", []string{lab.WANServer}, 10*time.Second)
	}

	// The neighbour asks the agent directly, over UDP and TCP, for an
	// outside name (recursion) and a mesh name.
	before := out.Queries()
	server := netip.AddrPortFrom(netip.MustParseAddr(lab.DNSAddr), 53).String()
	for _, proto := range []string{"udp", "tcp"} {
		for _, name := range []string{"outside.test", "nbfar"} {
			err := lab.InNetNS(nb.NSPath(), func() error {
				c := &dns.Client{Net: proto, Timeout: 2 * time.Second}
				m, _, err := c.Exchange(new(dns.Msg).SetQuestion(dns.Fqdn(name), dns.TypeA), server)
				if err == nil {
					return fmt.Errorf("answered %s", strings.ReplaceAll(m.String(), "\n", " "))
				}
				return nil
			})
			if err != nil {
				t.Errorf("a neighbour asking %s over %s: %v", name, proto, err)
			}
		}
	}
	if n := out.Queries() - before; n != 0 {
		t.Errorf("the neighbour's queries made the agent ask upstream %d times", n)
	}
	// They reached the agent, which dropped them (so the test shows the
	// agent's doing, not a path that does not exist).
	if st := status(t, h1); st.DNS == nil || st.DNS.Server.Foreign < 4 {
		t.Errorf("h1 dropped fewer than the neighbour's 4 queries: %+v", st.DNS)
	}
	// The containers still resolve afterwards.
	newResolver(t, h1, "nbmesh").waitName("outside.test", []string{lab.WANServer}, 5*time.Second)
}
