package integration

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// Settings of TestRollingUpgrade from the environment:
//
//	WGMESH_PREV_BINARY   the agent of the previous release (make prev
//	                     builds bin/wgmesh-prev; make unit and make vmtest
//	                     pass it). Set to a missing file, the test skips:
//	                     that is how make says the release commit is not
//	                     in the clone.
//	WGMESH_PREV_RELEASE  without WGMESH_PREV_BINARY, the commit the test
//	                     builds the previous agent from (git archive), by
//	                     default defaultPrevRelease.
//
// defaultPrevRelease is the last release: keep it equal to the Makefile's
// PREV_RELEASE, and move both on at each release.
const defaultPrevRelease = "559f90d"

// TestRollingUpgrade: users upgrade a running cluster host by host, so
// whatever hosts persist (state directory, Raft log and snapshots) or
// send each other (gossip, Raft, consensus RPC) must keep a cluster of
// the previous release's agents and this build's working while they are
// mixed. Three hosts start on the previous release, with a network and a
// stand-in container on each; then each host in turn has its agent
// stopped and this build started on the same state. After each step every
// agent is back in the cluster, the endpoints keep their addresses, no
// block or address is owned twice in any agent's view, every container
// reaches every other, and a new container gets an address in a block
// claimed through consensus, on an upgraded host and on one not yet
// upgraded. Two orders: followers first and the leader last (an old
// leader with new followers), and the leader first (then a new leader
// with an old follower). At the end all agents restart at once on this
// build, from state written partly by the old one.
func TestRollingUpgrade(t *testing.T) {
	prev := prevBinary(t)
	for _, bin := range []string{prev, binary} {
		out, err := exec.Command(bin, "version").CombinedOutput()
		if err != nil {
			t.Fatalf("%s version: %v: %s", bin, err, out)
		}
		t.Logf("%s: %s", bin, strings.TrimSpace(string(out)))
	}
	// The two orders run side by side, each in a lab of its own: most of
	// the time goes to waiting for elections and handshakes, not CPU.
	t.Run("followers-first", func(t *testing.T) {
		t.Parallel()
		u := newUpgradeLab(t, prev, "10.86.0.0/16")
		u.upgrade(u.pick(false))
		u.upgrade(u.pick(false))
		u.upgrade(u.pick(true))
		if !u.seenOldLeaderNewFollower {
			t.Error("no step had an old leader with a new follower: the order proved less than it should")
		}
		u.restartAll()
	})
	t.Run("leader-first", func(t *testing.T) {
		t.Parallel()
		u := newUpgradeLab(t, prev, "10.87.0.0/16")
		u.upgrade(u.pick(true))
		u.upgrade(u.pick(true))
		u.upgrade(u.pick(false))
		if !u.seenNewLeaderOldFollower {
			t.Error("no step had a new leader with an old follower: the order proved less than it should")
		}
	})
}

// prevBinary returns the previous release's agent, building it from git
// history if the environment names none, or skips the test, loudly,
// when there is none to be had.
func prevBinary(t *testing.T) string {
	t.Helper()
	skip := func(format string, args ...any) {
		t.Helper()
		msg := "SKIP: rolling upgrades from the previous release are NOT TESTED: " + fmt.Sprintf(format, args...)
		fmt.Fprintln(os.Stderr, "integration: "+msg)
		t.Skip(msg)
	}
	if p := os.Getenv("WGMESH_PREV_BINARY"); p != "" {
		if _, err := os.Stat(p); err != nil {
			skip("WGMESH_PREV_BINARY: %v (make prev says why; a shallow clone lacks the release's commit)", err)
		}
		return p
	}
	rev := os.Getenv("WGMESH_PREV_RELEASE")
	if rev == "" {
		rev = defaultPrevRelease
	}
	full, err := exec.Command("git", "rev-parse", "-q", "--verify", rev+"^{commit}").Output()
	if err != nil {
		skip("commit %s is not in this clone's history (shallow?), and WGMESH_PREV_BINARY is unset", rev)
	}
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Fatalf("git rev-parse --show-toplevel: %v", err)
	}
	src := t.TempDir()
	// From the top: in a subdirectory git archive takes only that one.
	archive := exec.Command("sh", "-c", `git archive "$1" | tar -x -C "$2"`, "sh", strings.TrimSpace(string(full)), src)
	archive.Dir = strings.TrimSpace(string(top))
	if out, err := archive.CombinedOutput(); err != nil {
		t.Fatalf("extracting %s: %v: %s", rev, err, out)
	}
	bin := filepath.Join(t.TempDir(), "wgmesh-prev")
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-X main.version="+rev, "-o", bin, "./cmd/wgmesh")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	start := time.Now()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the agent of %s: %v\n%s", rev, err, out)
	}
	t.Logf("built the agent of %s in %s", rev, time.Since(start).Round(time.Millisecond))
	return bin
}

// upgradeLab is a lab whose hosts move from the previous release's agent
// to this build's, with what the test made in it.
type upgradeLab struct {
	t      *testing.T
	ctx    context.Context
	l      *lab.Lab
	prev   string
	subnet netip.Prefix
	start  time.Time
	// nets is the network as each host's Docker created it.
	nets []*lab.PluginNetwork
	ctrs []*upgradeCtr
	// taken are blocks this test asked for, so that two asks in a row
	// never pick the same one.
	taken []netip.Prefix
	// Which mixed clusters a step saw, with the leader on which build.
	seenOldLeaderNewFollower, seenNewLeaderOldFollower bool
}

// upgradeCtr is a stand-in container and its endpoint, on l.Hosts[host].
type upgradeCtr struct {
	host int
	ep   *lab.PluginEndpoint
	c    *lab.Container
}

func newUpgradeLab(t *testing.T, prev, subnet string) *upgradeLab {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	u := &upgradeLab{t: t, ctx: ctx, prev: prev, subnet: netip.MustParsePrefix(subnet), start: time.Now()}
	cfg := lab.Config{Hosts: 3, Binary: prev, Dir: filepath.Join(t.TempDir(), "lab"),
		AgentArgs: []string{"--wg-mode", wgMode}}
	l, err := lab.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	u.l = l
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("WGMESH_TEST_LOG") != "" {
			for _, h := range l.Hosts {
				b, _ := os.ReadFile(h.AgentLog())
				t.Logf("agent log of %s (%s):\n%s", h.Name, u.build(h), tail(string(b), 60))
			}
		}
		if err := l.Close(); err != nil {
			t.Errorf("closing the lab: %v", err)
		}
	})
	if err := l.StartAgents(ctx); err != nil {
		t.Fatal(err)
	}
	u.waitCluster("all on the previous release")

	// The network and a container on every host, at once (see
	// TestAgentsFormAClusterAndCarryTraffic).
	u.nets = make([]*lab.PluginNetwork, len(l.Hosts))
	u.ctrs = make([]*upgradeCtr, len(l.Hosts))
	errs := make(chan error, len(l.Hosts))
	for i, h := range l.Hosts {
		go func() {
			n, err := h.Plugin().CreateNetwork(ctx, subnet)
			if err != nil {
				errs <- err
				return
			}
			u.nets[i] = n
			ep, err := h.Plugin().AttachTo(ctx, n, h.ContainerNS("c0"))
			if err != nil {
				errs <- err
				return
			}
			c, err := h.NewContainer(ctx, "c0", ep)
			u.ctrs[i] = &upgradeCtr{host: i, ep: ep, c: c}
			errs <- err
		}()
	}
	for range l.Hosts {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	u.check("all on the previous release", u.l.Hosts[0])
	return u
}

func (u *upgradeLab) logf(format string, args ...any) {
	u.t.Helper()
	u.t.Logf("[%5.1fs] %s", time.Since(u.start).Seconds(), fmt.Sprintf(format, args...))
}

func (u *upgradeLab) isNew(h *lab.Host) bool { return h.Binary() != u.prev }

func (u *upgradeLab) build(h *lab.Host) string {
	if u.isNew(h) {
		return "new"
	}
	return "old"
}

func (u *upgradeLab) hostIndex(name string) int {
	return slices.IndexFunc(u.l.Hosts, func(h *lab.Host) bool { return h.Name == name })
}

// pick returns the host to upgrade next: the leader if it still runs the
// previous release and leader is set, else an old follower, else
// whichever old host is left.
func (u *upgradeLab) pick(leader bool) *lab.Host {
	u.t.Helper()
	st := u.statuses()
	var old []*lab.Host
	for _, h := range u.l.Hosts {
		if !u.isNew(h) {
			old = append(old, h)
		}
	}
	if len(old) == 0 {
		u.t.Fatal("no host left to upgrade")
	}
	lead := st[0].Consensus.Leader
	for _, h := range old {
		if (h.Name == lead) == leader {
			return h
		}
	}
	return old[0]
}

// upgrade stops h's agent as a package upgrade does (SIGTERM), starts
// this build on the same state, and checks the cluster.
func (u *upgradeLab) upgrade(h *lab.Host) {
	u.t.Helper()
	wasLeader := u.statuses()[0].Consensus.Leader == h.Name
	role := "follower"
	if wasLeader {
		role = "leader"
	}
	label := fmt.Sprintf("%s (%s) upgraded", h.Name, role)
	u.logf("upgrading %s, the %s", h.Name, role)
	h.StopAgent(syscall.SIGTERM)
	h.SetBinary(binary)
	if err := h.StartAgent(u.ctx); err != nil {
		u.t.Fatalf("%s: %v", label, err)
	}
	leader := u.waitCluster(label)
	// Leader-first: the hosts left on the previous release may elect
	// one of theirs again, and a new leader with an old follower would
	// go untested. Stopping that old leader lets the new hosts, a
	// majority by now, elect one of theirs; it comes back as a follower.
	var newer int
	for _, x := range u.l.Hosts {
		if u.isNew(x) {
			newer++
		}
	}
	if wasLeader && !u.isNew(leader) && newer > len(u.l.Hosts)/2 {
		u.logf("%s, still on the previous release, was elected: restarting it so that a new host leads", leader.Name)
		leader.StopAgent(syscall.SIGTERM)
		u.waitLeader(func(h *lab.Host) bool { return u.isNew(h) })
		if err := leader.StartAgent(u.ctx); err != nil {
			u.t.Fatal(err)
		}
		u.waitCluster(label + ", old leader restarted")
	}
	// A container on the host just upgraded, and on one not yet.
	u.check(label, append([]*lab.Host{h}, u.anyOld()...)...)
}

// restartAll stops every agent, then starts them all at once on the
// state they left.
func (u *upgradeLab) restartAll() {
	u.t.Helper()
	u.logf("restarting every agent at once")
	var wg sync.WaitGroup
	for _, h := range u.l.Hosts {
		wg.Go(func() { h.StopAgent(syscall.SIGTERM) })
	}
	wg.Wait()
	if err := u.l.StartAgents(u.ctx); err != nil {
		u.t.Fatal(err)
	}
	u.waitCluster("all restarted")
	u.check("all restarted", u.l.Hosts...)
}

// statuses asks every agent for its status.
func (u *upgradeLab) statuses() []*driver.Status {
	u.t.Helper()
	st, err := u.tryStatuses()
	if err != nil {
		u.t.Fatal(err)
	}
	return st
}

func (u *upgradeLab) tryStatuses() ([]*driver.Status, error) {
	out := make([]*driver.Status, len(u.l.Hosts))
	for i, h := range u.l.Hosts {
		st, err := driver.NewControlClient(h.ControlSock()).Status(u.ctx)
		if err != nil {
			return nil, fmt.Errorf("status of %s (%s): %w", h.Name, u.build(h), err)
		}
		out[i] = st
	}
	return out, nil
}

// retry runs try until it succeeds, and fails the test with its last
// error when timeout passes.
func (u *upgradeLab) retry(label, what string, timeout time.Duration, try func() error) {
	u.t.Helper()
	if err := poll.Until(u.ctx, timeout, what, try); err != nil {
		u.t.Fatalf("%s: %v (builds: %s)", label, err, u.builds())
	}
}

func (u *upgradeLab) builds() string {
	var s []string
	for _, h := range u.l.Hosts {
		s = append(s, h.Name+"="+u.build(h))
	}
	return strings.Join(s, " ")
}

// waitCluster waits until every agent sees all three alive, all three
// are Raft voters, and they agree on a leader; it returns the leader and
// notes which mix of builds the cluster is.
func (u *upgradeLab) waitCluster(label string) *lab.Host {
	u.t.Helper()
	var leader *lab.Host
	u.retry(label, "back in the cluster", 45*time.Second, func() error {
		sts, err := u.tryStatuses()
		if err != nil {
			return err
		}
		lead := sts[0].Consensus.Leader
		for i, st := range sts {
			name := u.l.Hosts[i].Name
			if len(st.Members) != len(u.l.Hosts) || !allAlive(st) {
				return fmt.Errorf("%s sees members %s", name, members(st))
			}
			if s := st.Consensus.State; s != "leader" && s != "follower" {
				return fmt.Errorf("%s is %s in Raft (%s)", name, s, st.Consensus.Problem)
			}
			if st.Consensus.Leader == "" || st.Consensus.Leader != lead {
				return fmt.Errorf("%s sees leader %q, %s sees %q", name, st.Consensus.Leader, u.l.Hosts[0].Name, lead)
			}
			voters := 0
			for _, s := range st.Consensus.Servers {
				if s.Voter {
					voters++
				}
			}
			if voters != len(u.l.Hosts) {
				return fmt.Errorf("%s sees %d voters: %+v", name, voters, st.Consensus.Servers)
			}
		}
		i := u.hostIndex(lead)
		if i < 0 {
			return fmt.Errorf("unknown leader %q", lead)
		}
		leader = u.l.Hosts[i]
		return nil
	})
	for _, h := range u.l.Hosts {
		if h == leader {
			continue
		}
		switch {
		case !u.isNew(leader) && u.isNew(h):
			u.seenOldLeaderNewFollower = true
		case u.isNew(leader) && !u.isNew(h):
			u.seenNewLeaderOldFollower = true
		}
	}
	u.logf("%s: in the cluster, leader %s (%s); %s", label, leader.Name, u.build(leader), u.builds())
	return leader
}

// waitLeader waits until the running agents agree on a leader that ok
// accepts.
func (u *upgradeLab) waitLeader(ok func(*lab.Host) bool) {
	u.t.Helper()
	u.retry("re-election", "a leader on this build", 45*time.Second, func() error {
		for _, h := range u.l.Hosts {
			if h.AgentPID() == 0 {
				continue
			}
			st, err := driver.NewControlClient(h.ControlSock()).Status(u.ctx)
			if err != nil {
				return err
			}
			i := u.hostIndex(st.Consensus.Leader)
			if (st.Consensus.State != "leader" && st.Consensus.State != "follower") || i < 0 || !ok(u.l.Hosts[i]) {
				return fmt.Errorf("%s is %s, leader %q", h.Name, st.Consensus.State, st.Consensus.Leader)
			}
		}
		return nil
	})
}

func members(st *driver.Status) string {
	var s []string
	for _, m := range st.Members {
		s = append(s, m.Name+":"+m.State.String())
	}
	return strings.Join(s, " ")
}

// check checks the network after a step (see TestRollingUpgrade),
// attaches a new container on each host of on, and checks again.
func (u *upgradeLab) check(label string, on ...*lab.Host) {
	u.t.Helper()
	u.checkState(label)
	for _, h := range on {
		u.attach(label, h)
	}
	u.checkState(label + ", new containers")
	u.checkPings(label)
}

// anyOld returns a host still on the previous release, or none.
func (u *upgradeLab) anyOld() []*lab.Host {
	for _, h := range u.l.Hosts {
		if !u.isNew(h) {
			return []*lab.Host{h}
		}
	}
	return nil
}

// attach claims a block nobody owns for a new container on h: its fixed
// address (docker run --ip) lies in that block, so the address can only
// come through a claim committed by the cluster's Raft.
func (u *upgradeLab) attach(label string, h *lab.Host) {
	u.t.Helper()
	owned := slices.Clone(u.taken)
	for _, st := range u.statuses() {
		for _, n := range st.Networks {
			owned = append(owned, n.Blocks...)
			for _, p := range n.Peers {
				owned = append(owned, p.AllowedIPs...)
			}
		}
	}
	var block netip.Prefix
	base := u.subnet.Addr().As4()
	for k := 1; k < 256 && !block.IsValid(); k++ {
		b := netip.PrefixFrom(netip.AddrFrom4([4]byte{base[0], base[1], byte(k), 0}), 24)
		if !slices.ContainsFunc(owned, b.Overlaps) {
			block = b
		}
	}
	if !block.IsValid() {
		u.t.Fatalf("%s: no free block left in %s", label, u.subnet)
	}
	u.taken = append(u.taken, block)
	a := block.Addr().As4()
	a[3] = 10
	addr := netip.AddrFrom4(a).String()
	i := slices.Index(u.l.Hosts, h)
	name := fmt.Sprintf("c%d", len(u.ctrs))
	start := time.Now()
	ep, err := h.Plugin().AttachAt(u.ctx, u.nets[i], h.ContainerNS(name), addr)
	if err != nil {
		u.t.Fatalf("%s: a new container on %s (%s) at %s: %v", label, h.Name, u.build(h), addr, err)
	}
	c, err := h.NewContainer(u.ctx, name, ep)
	if err != nil {
		u.t.Fatal(err)
	}
	u.ctrs = append(u.ctrs, &upgradeCtr{host: i, ep: ep, c: c})
	u.logf("%s: new container %s on %s (%s) at %s, block %s claimed in %s", label, name, h.Name, u.build(h), ep.Address, block,
		time.Since(start).Round(time.Millisecond))
}

// checkState checks, in every agent's view, that the network is there,
// with this host's endpoints at their addresses, and that no block or
// address has two owners; it waits for the views to agree.
func (u *upgradeLab) checkState(label string) {
	u.t.Helper()
	u.retry(label, "the agents' views", 30*time.Second, func() error {
		sts, err := u.tryStatuses()
		if err != nil {
			return err
		}
		own := map[string][]netip.Prefix{} // host -> blocks, its own view
		nets := make([]*driver.NetworkStatus, len(sts))
		for i, st := range sts {
			h := u.l.Hosts[i]
			for j := range st.Networks {
				if st.Networks[j].Subnet == u.subnet {
					nets[i] = &st.Networks[j]
				}
			}
			n := nets[i]
			if n == nil || n.ID != u.nets[i].ID {
				return fmt.Errorf("%s (%s) lost network %s: has %+v", h.Name, u.build(h), u.subnet, st.Networks)
			}
			own[h.Name] = n.Blocks
			for _, c := range u.ctrs {
				if c.host != i {
					continue
				}
				k := slices.IndexFunc(n.Endpoints, func(e driver.EndpointStatus) bool { return e.ID == c.ep.ID })
				if k < 0 {
					return fmt.Errorf("%s (%s) lost endpoint %s of %s", h.Name, u.build(h), c.ep.ID[:12], c.c.Name)
				}
				e := n.Endpoints[k]
				if e.Addr.String() != c.ep.Address || !e.Joined || e.Broken != "" {
					return fmt.Errorf("%s (%s): endpoint of %s is %+v; it was given %s", h.Name, u.build(h), c.c.Name, e, c.ep.Address)
				}
				if !slices.ContainsFunc(n.Blocks, func(b netip.Prefix) bool { return b.Contains(e.Addr.Addr()) }) {
					return fmt.Errorf("%s (%s): endpoint %s is outside its blocks %v", h.Name, u.build(h), e.Addr, n.Blocks)
				}
			}
		}
		// Every view: one owner a block, and each peer's blocks as the
		// peer itself reports them.
		for i, n := range nets {
			h := u.l.Hosts[i]
			type owned struct {
				block netip.Prefix
				node  string
			}
			all := []owned{}
			for _, b := range n.Blocks {
				all = append(all, owned{b, h.Name})
			}
			if len(n.Peers) != len(u.l.Hosts)-1 {
				return fmt.Errorf("%s (%s) has %d peers on %s", h.Name, u.build(h), len(n.Peers), u.subnet)
			}
			for _, p := range n.Peers {
				for _, b := range p.AllowedIPs {
					all = append(all, owned{b, p.Node})
				}
				if !sameBlocks(p.AllowedIPs, own[p.Node]) {
					return fmt.Errorf("%s (%s) sees %s own %v; %s says it owns %v", h.Name, u.build(h), p.Node, p.AllowedIPs, p.Node, own[p.Node])
				}
			}
			for x := range all {
				for y := range x {
					if all[x].block.Overlaps(all[y].block) {
						return fmt.Errorf("in the view of %s (%s), %s of %s overlaps %s of %s", h.Name, u.build(h),
							all[x].block, all[x].node, all[y].block, all[y].node)
					}
				}
			}
		}
		// No address twice, in the cluster: each endpoint's host reports
		// it, and no other.
		seen := map[netip.Addr]string{}
		for i, n := range nets {
			for _, e := range n.Endpoints {
				if other, ok := seen[e.Addr.Addr()]; ok {
					return fmt.Errorf("address %s is held by %s and by %s", e.Addr.Addr(), other, u.l.Hosts[i].Name)
				}
				seen[e.Addr.Addr()] = u.l.Hosts[i].Name
			}
		}
		return nil
	})
}

func sameBlocks(a, b []netip.Prefix) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.SortFunc(a, netip.Prefix.Compare)
	slices.SortFunc(b, netip.Prefix.Compare)
	return slices.Equal(a, b)
}

// checkPings pings every container from every container on another host,
// all pairs at once (a restarted agent's peers may take a WireGuard
// handshake to come back).
func (u *upgradeLab) checkPings(label string) {
	u.t.Helper()
	start := time.Now()
	var (
		mu     sync.Mutex
		failed []string
		wg     sync.WaitGroup
	)
	sem := make(chan struct{}, 8)
	pairs := 0
	for _, a := range u.ctrs {
		for _, b := range u.ctrs {
			if a.host == b.host {
				continue
			}
			pairs++
			wg.Go(func() {
				sem <- struct{}{}
				defer func() { <-sem }()
				if err := pingUntil(u.ctx, a.c, b.c.IP, 30*time.Second); err != nil {
					mu.Lock()
					failed = append(failed, fmt.Sprintf("%s on %s -> %s on %s: %v",
						a.c.Name, u.l.Hosts[a.host].Name, b.c.IP, u.l.Hosts[b.host].Name, err))
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	if len(failed) > 0 {
		slices.Sort(failed)
		u.t.Fatalf("%s: %d of %d pings across hosts failed (builds: %s):\n%s", label, len(failed), pairs, u.builds(), strings.Join(failed, "\n"))
	}
	u.logf("%s: %d containers reach each other across hosts (%d pairs, %s)", label, len(u.ctrs), pairs, time.Since(start).Round(time.Millisecond))
}

// pingUntil pings dst from c until it answers or timeout passes.
func pingUntil(ctx context.Context, c *lab.Container, dst string, timeout time.Duration) error {
	return poll.Until(ctx, timeout, "an answer from "+dst, func() error {
		if out, err := c.Exec(ctx, "ping", "-n", "-c", "1", "-W", "1", dst); err != nil {
			return errors.New(strings.TrimSpace(tail(out, 2)))
		}
		return nil
	})
}
