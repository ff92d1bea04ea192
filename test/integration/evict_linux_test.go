package integration

import (
	"context"
	"crypto/tls"
	be "encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

// TestEvictCompromisedMember: a member that is compromised and keeps
// running, uncooperative, is evicted by the procedure of docs/evict.md:
// on every other host the cluster key file is rotated to a new key (added,
// made primary, then the old one removed), and `wgmesh forget` releases
// its blocks. The evicted host is the Raft leader when it starts, the
// worst case: it holds established consensus connections to every other
// host. Afterwards it can neither read nor send gossip, nor complete a
// consensus TLS handshake, nor keep using a connection made before,
// nor claim anything; its blocks are free again, and the other hosts'
// containers reach each other but no longer it.
func TestEvictCompromisedMember(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	l := newLabWith(t, lab.Config{Hosts: 4, OwnKeyFiles: true})

	// The cluster forms: four members, a leader, everyone registered.
	var leader string
	poll.Eventually(t, 90*time.Second, "the cluster forms with three voters", func() error {
		for _, h := range l.Hosts {
			st, err := statusOf(ctx, h)
			if err != nil {
				return err
			}
			if len(st.Members) != 4 || !allAlive(st) || !st.Consensus.Registered || st.Consensus.Leader == "" {
				return fmt.Errorf("%s: %d members, registered %v, leader %q", h.Name, len(st.Members), st.Consensus.Registered, st.Consensus.Leader)
			}
			// Three voters, or the good hosts hold no majority once the
			// leader is cut off (a loaded machine promotes slowly).
			voters := 0
			for _, s := range st.Consensus.Servers {
				if s.Voter {
					voters++
				}
			}
			if voters != 3 {
				return fmt.Errorf("%s: %d voters, want 3", h.Name, voters)
			}
			if leader != "" && st.Consensus.Leader != leader {
				return fmt.Errorf("%s follows %s, others %s", h.Name, st.Consensus.Leader, leader)
			}
			leader = st.Consensus.Leader
		}
		return nil
	})
	var evil *lab.Host
	var good []*lab.Host
	for _, h := range l.Hosts {
		if h.Name == leader {
			evil = h
		} else {
			good = append(good, h)
		}
	}
	if evil == nil {
		t.Fatalf("the leader %q is none of the lab's hosts", leader)
	}
	t.Logf("%s, the Raft leader, is the compromised host", evil.Name)

	// One network, a stand-in container on each host.
	const subnet = "10.81.0.0/16"
	nets := map[*lab.Host]*lab.PluginNetwork{}
	ctrs := map[*lab.Host]*lab.Container{}
	for _, h := range l.Hosts {
		n, err := h.Plugin().CreateNetwork(ctx, subnet)
		if err != nil {
			t.Fatal(err)
		}
		ep, err := h.Plugin().AttachTo(ctx, n, h.ContainerNS("c"))
		if err != nil {
			t.Fatal(err)
		}
		c, err := h.NewContainer(ctx, "c", ep)
		if err != nil {
			t.Fatal(err)
		}
		nets[h], ctrs[h] = n, c
	}
	for _, a := range l.Hosts {
		for _, b := range l.Hosts {
			if a != b {
				firstPing(ctx, t, ctrs[a], ctrs[b].IP)
			}
		}
	}
	st, err := statusOf(ctx, evil)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Networks) != 1 || len(st.Networks[0].Blocks) != 1 {
		t.Fatalf("%s's networks: %+v", evil.Name, st.Networks)
	}
	evilBlock := st.Networks[0].Blocks[0]

	// The rotation, on the good hosts only: evil keeps running with the
	// old key. Each step waits until every good agent reloaded its file.
	oldKey, err := os.ReadFile(l.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(ctx, binary, "keygen").Output()
	if err != nil {
		t.Fatal(err)
	}
	oldK, newK := strings.TrimSpace(string(oldKey)), strings.TrimSpace(string(out))
	for i, keys := range [][]string{{oldK, newK}, {newK, oldK}, {newK}} {
		for _, h := range good {
			if err := h.WriteKeyFile(keys...); err != nil {
				t.Fatal(err)
			}
		}
		poll.Eventually(t, 20*time.Second, fmt.Sprintf("the good agents load key step %d", i+1), func() error {
			for _, h := range good {
				b, _ := os.ReadFile(h.AgentLog())
				if n := strings.Count(string(b), "cluster keyring updated"); n < i+1 {
					return fmt.Errorf("%s loaded %d key files", h.Name, n)
				}
			}
			return nil
		})
		if i < 2 {
			// Let the good hosts' gossip and Raft settle on the keys of
			// this step before the next one.
			time.Sleep(3 * time.Second)
		}
	}
	rotated := time.Now()
	ring := func(keys ...string) crypto.Keyring {
		var r crypto.Keyring
		for _, k := range keys {
			b, err := crypto.ParseClusterKey(k)
			if err != nil {
				t.Fatal(err)
			}
			r = append(r, b)
		}
		return r
	}

	// The good hosts elect a leader among themselves: no connection
	// evil made before the rotation keeps it leading them.
	poll.Eventually(t, 60*time.Second, "a good host leads the others", func() error {
		for _, h := range good {
			st, err := statusOf(ctx, h)
			if err != nil {
				return err
			}
			if st.Consensus.Leader == "" || st.Consensus.Leader == evil.Name {
				return fmt.Errorf("%s follows %q", h.Name, st.Consensus.Leader)
			}
		}
		return nil
	})
	t.Logf("a good host leads %s after the old key was removed", time.Since(rotated).Round(time.Second))

	// Gossip: the good hosts see evil dead and refuse its packets; evil
	// sees every other host dead.
	poll.Eventually(t, 60*time.Second, "gossip cuts evil off", func() error {
		for _, h := range good {
			st, err := statusOf(ctx, h)
			if err != nil {
				return err
			}
			if m, ok := member(st, evil.Name); ok && m.State.Reachable() {
				return fmt.Errorf("%s sees %s %s", h.Name, evil.Name, m.State)
			}
			if st.Gossip.Refused["packet-bad-header"] == 0 {
				return fmt.Errorf("%s refused no gossip packet", h.Name)
			}
		}
		st, err := statusOf(ctx, evil)
		if err != nil {
			return err
		}
		for _, m := range st.Members {
			if !m.Self && m.State.Reachable() {
				return fmt.Errorf("%s still sees %s %s", evil.Name, m.Name, m.State)
			}
		}
		return nil
	})

	// Consensus TLS from evil's namespace: with the old key alone, or
	// with a certificate of the old key, every good host refuses; with
	// the new key (the control) the same dial works, so the refusals are
	// the key's doing.
	for _, h := range good {
		addr := netip.AddrPortFrom(h.Addr, 7947).String()
		if err := consensusStatusFrom(evil, addr, ring(oldK)); err == nil {
			t.Errorf("%s, with the old key, talks consensus with %s", evil.Name, h.Name)
		} else {
			t.Logf("old key -> %s: %v", h.Name, err)
		}
		if err := consensusStatusFrom(evil, addr, ring(oldK, newK)); err == nil {
			t.Errorf("%s, presenting a certificate of the old key, talks consensus with %s", evil.Name, h.Name)
		}
		if err := consensusStatusFrom(evil, addr, ring(newK)); err != nil {
			t.Errorf("control: the new key from %s's namespace cannot talk to %s: %v", evil.Name, h.Name, err)
		}
	}

	// Forget it, on a good host: accepted once gossip sees it dead.
	var forgetOut string
	poll.Eventually(t, 60*time.Second, "`wgmesh forget` is accepted", func() error {
		out, err := good[0].Wgmesh(ctx, "forget", evil.Name)
		forgetOut = out
		return err
	})
	t.Logf("wgmesh forget %s: %s", evil.Name, strings.TrimSpace(forgetOut))

	poll.Eventually(t, 60*time.Second, "the good hosts drop evil", func() error {
		for _, h := range good {
			st, err := statusOf(ctx, h)
			if err != nil {
				return err
			}
			if m, ok := member(st, evil.Name); ok && m.State.Reachable() {
				return fmt.Errorf("%s sees %s %s", h.Name, evil.Name, m.State)
			}
			for _, s := range st.Consensus.Servers {
				if s.Name == evil.Name {
					return fmt.Errorf("%s's Raft configuration still has %s", h.Name, evil.Name)
				}
			}
			for _, p := range st.Problems {
				if strings.Contains(p, "wgmesh forget "+evil.Name) {
					return fmt.Errorf("%s: %s", h.Name, p)
				}
			}
			if len(st.Networks) != 1 {
				return fmt.Errorf("%s's networks: %+v", h.Name, st.Networks)
			}
			for _, p := range st.Networks[0].Peers {
				if p.Node == evil.Name {
					return fmt.Errorf("%s keeps %s as a WireGuard peer", h.Name, evil.Name)
				}
			}
		}
		return nil
	})

	// Evil claims nothing: its own network needs a block, and no
	// consensus connection of its is left to get one.
	cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
	n, err := evil.Plugin().CreateNetwork(cctx, "10.82.0.0/16")
	if err == nil {
		_, err = evil.Plugin().Attach(cctx, n)
	}
	if err == nil {
		t.Errorf("%s, evicted, still claims address blocks", evil.Name)
	} else {
		t.Logf("the evicted host's claim: %v", err)
	}
	ccancel()

	// Its block is free: a good host gets an address in it.
	want := evilBlock.Addr().Next()
	for want.String() == ctrs[evil].IP || want.String() == strings.Split(nets[evil].Gateway, "/")[0] {
		want = want.Next()
	}
	if !evilBlock.Contains(want) {
		t.Fatalf("no spare address in %s", evilBlock)
	}
	ep, err := good[0].Plugin().AttachAt(ctx, nets[good[0]], good[0].ContainerNS("in-evil-block"), want.String())
	if err != nil {
		t.Fatalf("an address in the evicted host's block %s: %v", evilBlock, err)
	}
	if _, err := good[0].NewContainer(ctx, "in-evil-block", ep); err != nil {
		t.Fatal(err)
	}

	// The good hosts' containers reach each other, and not evil's; nor
	// does evil's container reach theirs.
	for _, a := range good {
		for _, b := range good {
			if a != b {
				if out, err := ctrs[a].Exec(ctx, "ping", "-n", "-c", "2", "-W", "2", ctrs[b].IP); err != nil {
					t.Errorf("%s -> %s after the eviction: %v\n%s", a.Name, b.Name, err, out)
				}
			}
		}
		if _, err := ctrs[a].Exec(ctx, "ping", "-n", "-c", "2", "-W", "1", ctrs[evil].IP); err == nil {
			t.Errorf("%s's container still reaches the evicted host's", a.Name)
		}
		if _, err := ctrs[evil].Exec(ctx, "ping", "-n", "-c", "2", "-W", "1", ctrs[a].IP); err == nil {
			t.Errorf("the evicted host's container still reaches %s's", a.Name)
		}
	}
}

func statusOf(ctx context.Context, h *lab.Host) (*driver.Status, error) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := driver.NewControlClient(h.ControlSock()).Status(cctx)
	if err != nil {
		return nil, fmt.Errorf("status of %s: %w", h.Name, err)
	}
	return st, nil
}

func member(st *driver.Status, name string) (driver.MemberStatus, bool) {
	i := slices.IndexFunc(st.Members, func(m driver.MemberStatus) bool { return m.Name == name })
	if i < 0 {
		return driver.MemberStatus{}, false
	}
	return st.Members[i], true
}

// consensusStatusFrom asks the consensus port at addr for its status,
// from host h's network namespace, as a node of a fresh identity holding
// ring would: a TLS handshake, the RPC stream byte, one framed request
// and its answer (the framing of mesh/consensus/rpc.go).
func consensusStatusFrom(h *lab.Host, addr string, ring crypto.Keyring) error {
	id, err := crypto.GenerateIdentity()
	if err != nil {
		return err
	}
	ctls, err := crypto.NewClusterTLS(id, ring)
	if err != nil {
		return err
	}
	var c net.Conn
	if err := lab.InNetNS(h.NSPath(), func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	}); err != nil {
		return fmt.Errorf("dialling: %w", err)
	}
	defer c.Close()
	tc := tls.Client(c, ctls.ClientConfig())
	if _, err := crypto.Handshake(tc, 5*time.Second); err != nil {
		return err
	}
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	req, _ := json.Marshal(map[string]string{"method": "status"})
	frame := append([]byte{'C', 0, 0, 0, 0}, req...)
	be.BigEndian.PutUint32(frame[1:5], uint32(len(req)))
	if _, err := tc.Write(frame); err != nil {
		return fmt.Errorf("sending: %w", err)
	}
	var hdr [4]byte
	if _, err := io.ReadFull(tc, hdr[:]); err != nil {
		return fmt.Errorf("reading the answer: %w", err)
	}
	body := make([]byte, be.BigEndian.Uint32(hdr[:]))
	if _, err := io.ReadFull(tc, body); err != nil {
		return fmt.Errorf("reading the answer: %w", err)
	}
	var resp struct {
		Status *struct {
			ClusterID string `json:"cluster_id"`
		} `json:"status"`
	}
	if err := json.Unmarshal(body, &resp); err != nil {
		return err
	}
	if resp.Status == nil || resp.Status.ClusterID == "" {
		return errors.New("no status in the answer")
	}
	return nil
}
