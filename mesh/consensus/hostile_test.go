package consensus

// Members that hold the cluster key are not trusted the way voters are:
// these tests play such a member and check that it can neither move nor
// remove a voter, answer in another server's place, nor take a joining
// node over.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/test/poll"
)

// hostileCluster starts voters a, b and c and then mallory, a registered
// member that is not a voter, and returns the leader, a voter that is not
// the leader, and mallory.
func hostileCluster(t *testing.T) (c *cluster, leader, victim, mallory *tnode) {
	c = newCluster(t)
	for _, name := range []string{"a", "b", "c"} {
		c.add(name, name != "a").start()
	}
	c.waitVoters(3, "a", "b", "c")
	mallory = c.add("mallory", true)
	mallory.start()
	c.waitVoters(3, "a", "b", "c", "mallory")
	st := c.nodes["a"].status()
	leader = c.nodes[st.Leader]
	for _, s := range st.Servers {
		if s.Name == "mallory" && s.Voter {
			t.Fatal("mallory became a voter")
		}
		if s.Voter && s.Name != st.Leader && victim == nil {
			victim = c.nodes[s.Name]
		}
	}
	return c, leader, victim, mallory
}

// serverOf returns how the leader's configuration lists a node.
func serverOf(t *testing.T, leader, n *tnode) (raft.Server, bool) {
	t.Helper()
	f := leader.node.raftServer().GetConfiguration()
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	for _, s := range f.Configuration().Servers {
		if s.ID == raft.ServerID(n.id.ID().String()) {
			return s, true
		}
	}
	return raft.Server{}, false
}

// TestMemberCannotMoveOrRemoveVoter: a member that is not a voter sends
// the leader a join "for" a voter at an address it controls, a leave
// "for" the voter, and a join of its own at the voter's address; the
// voter stays a voter where it was, and nobody else shares its address.
func TestMemberCannotMoveOrRemoveVoter(t *testing.T) {
	_, leader, victim, mallory := hostileCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	before, ok := serverOf(t, leader, victim)
	if !ok || before.Suffrage != raft.Voter || string(before.Address) != victim.addr {
		t.Fatalf("victim %s before: %+v", victim.name, before)
	}
	check := func(what string) {
		t.Helper()
		time.Sleep(300 * time.Millisecond) // let a wrongly accepted change commit
		s, ok := serverOf(t, leader, victim)
		if !ok || s.Suffrage != raft.Voter || s.Address != before.Address {
			t.Fatalf("after %s: victim %s is %+v (present %v), was %+v", what, victim.name, s, ok, before)
		}
		f := leader.node.raftServer().GetConfiguration()
		_ = f.Error()
		for _, o := range f.Configuration().Servers {
			if o.ID != before.ID && o.Address == before.Address {
				t.Fatalf("after %s: server %s shares the victim's address %s", what, shortID(string(o.ID)), o.Address)
			}
		}
	}
	// An address of mallory's own that no server has yet.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	forJoin := &request{Method: methodJoin, RaftAddr: l.Addr().String(), Forwarded: true, For: victim.id.ID()}
	resp, _, err := mallory.node.call(ctx, leader.addr, forJoin)
	t.Logf("forwarded join for the victim: err %v, answer %+v", err, resp)
	check("a forwarded join for the victim")

	leave := &request{Method: methodLeave, Forwarded: true, For: victim.id.ID()}
	resp, _, err = mallory.node.call(ctx, leader.addr, leave)
	t.Logf("forwarded leave for the victim: err %v, answer %+v", err, resp)
	check("a forwarded leave for the victim")

	// Claims that do not hold: signed by mallory; the victim's, but of
	// another run, another cluster, another request, or long ago.
	fresh := forwardClaim{Method: methodLeave, For: victim.id.ID(), Cluster: leader.node.ClusterID(), BootID: victim.node.run.bootID, Time: time.Now().Unix()}
	forged := []struct {
		what   string
		signer crypto.Identity
		claim  forwardClaim
		req    request
	}{
		{"signed by mallory", mallory.id, fresh, request{Method: methodLeave}},
		{"of an earlier run", victim.id, func(c forwardClaim) forwardClaim { c.BootID = "0123"; return c }(fresh), request{Method: methodLeave}},
		{"of another cluster", victim.id, func(c forwardClaim) forwardClaim { c.Cluster = "other"; return c }(fresh), request{Method: methodLeave}},
		{"of an hour ago", victim.id, func(c forwardClaim) forwardClaim { c.Time -= 3600; return c }(fresh), request{Method: methodLeave}},
		{"for a leave, sent as a join", victim.id, fresh, request{Method: methodJoin, RaftAddr: l.Addr().String()}},
		{"for a join at the victim's address", victim.id, func(c forwardClaim) forwardClaim {
			c.Method, c.RaftAddr = methodJoin, victim.addr
			return c
		}(fresh), request{Method: methodJoin, RaftAddr: l.Addr().String()}},
	}
	for _, f := range forged {
		req := f.req
		req.Forwarded, req.For = true, victim.id.ID()
		req.Claim = mustJSON(f.claim)
		req.Sig = f.signer.Sign(claimPurpose, req.Claim)
		resp, _, err := mallory.node.call(ctx, leader.addr, &req)
		if err == nil && resp.Err == "" {
			t.Errorf("a claim %s was accepted", f.what)
		}
		check("a claim " + f.what)
	}

	// Its own join, but at the victim's address: a dial could no longer
	// tell the two apart (Raft refuses duplicate addresses too).
	own := &request{Method: methodJoin, RaftAddr: victim.addr}
	resp, _, err = mallory.node.call(ctx, leader.addr, own)
	t.Logf("own join at the victim's address: err %v, answer %+v", err, resp)
	check("mallory's join at the victim's address")

	// The victim itself, over TLS, asks to move: it moves, but as a
	// non-voter, to be promoted again only once it answers there.
	resp, _, err = victim.node.call(ctx, leader.addr, &request{Method: methodJoin, RaftAddr: l.Addr().String()})
	if err != nil || resp.Err != "" {
		t.Fatalf("the victim's own move: %v %s", err, resp.Err)
	}
	if s, ok := serverOf(t, leader, victim); !ok || s.Suffrage != raft.Nonvoter || string(s.Address) != l.Addr().String() {
		t.Fatalf("after the victim's own move: %+v (present %v)", s, ok)
	}
}

// TestJoinThroughMember: a node that cannot reach the leader registers
// and asks to be admitted through members, its join carrying its signed
// claim.
func TestJoinThroughMember(t *testing.T) {
	c := newCluster(t)
	for _, name := range []string{"a", "b", "c"} {
		c.add(name, name != "a").start()
	}
	c.waitVoters(3, "a", "b", "c")
	leader := c.nodes["a"].status().Leader
	j := c.add("j", true)
	c.mu.Lock()
	c.cut = map[string]map[string]bool{"j": {leader: true}}
	c.mu.Unlock()
	j.start()
	c.waitVoters(3, "a", "b", "c", "j")
	if st := j.status(); st.Leader != leader || st.State != "non-voter" {
		t.Fatalf("j: %+v", st)
	}
}

// TestDialChecksIdentity: when another member answers at a server's
// address, the Raft dial to that server refuses it, and so does a call
// to the leader.
func TestDialChecksIdentity(t *testing.T) {
	c, leader, victim, mallory := hostileCluster(t)
	sl := &streamLayer{m: leader.node.mux, addr: tcpAddr(leader.addr)}
	conn, err := sl.Dial(raft.ServerAddress(victim.addr), 5*time.Second)
	if err != nil {
		t.Fatalf("Raft dial of %s before the swap: %v", victim.name, err)
	}
	conn.Close()

	c.mu.Lock()
	c.redirect = map[string]map[string]string{
		leader.name: {victim.addr: mallory.addr},
		victim.name: {leader.addr: mallory.addr},
	}
	c.mu.Unlock()
	conn, err = sl.Dial(raft.ServerAddress(victim.addr), 5*time.Second)
	if err == nil {
		conn.Close()
		t.Fatalf("the leader's Raft dial of %s accepted mallory in its place", victim.name)
	}
	t.Logf("Raft dial refused: %v", err)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	poll.Eventually(t, 5*time.Second, victim.name+" knows the leader", func() error {
		if addr, _ := victim.node.leader(); addr != leader.addr {
			return fmt.Errorf("leader at %q", addr)
		}
		return nil
	})
	if _, err := victim.node.callLeader(ctx, &request{Method: methodStatus}); err == nil {
		t.Fatal("a call to the leader was answered by mallory")
	} else {
		t.Logf("call to the leader refused: %v", err)
	}
}

// liar is a hostile server with the cluster key that says it leads the
// cluster and accepts every request.
type liar struct {
	mux   *mux
	id    crypto.NodeID
	addr  string
	asked atomic.Int64
}

func startLiar(t *testing.T, c *cluster, name, clusterID string) (*liar, *tnode) {
	t.Helper()
	h := c.add(name, false)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tlsc, err := crypto.NewClusterTLS(h.id, c.key)
	if err != nil {
		t.Fatal(err)
	}
	lr := &liar{id: h.id.ID(), addr: l.Addr().String()}
	lr.mux = newMux(l, tlsc, nil, testLogger(t, name))
	lr.mux.rpc = func(conn net.Conn, _ crypto.NodeID) {
		defer conn.Close()
		var req request
		if readFrame(conn, &req) != nil {
			return
		}
		lr.asked.Add(1)
		resp := response{Index: 1}
		if req.Method == methodStatus {
			resp.Status = &PeerStatus{ClusterID: clusterID, State: "leader", LeaderID: lr.id, LeaderAddr: lr.addr, AppliedIndex: 1 << 20, LastIndex: 1 << 20}
		}
		_ = writeFrame(conn, resp)
	}
	lr.mux.wg.Add(1)
	go lr.mux.serve()
	t.Cleanup(lr.mux.close)
	c.mu.Lock()
	h.addr, h.fakeCluster = lr.addr, clusterID
	c.mu.Unlock()
	return lr, h
}

// TestJoinerChecksLeader: a joining node whose only reachable member
// names itself the leader neither registers through it nor accepts Raft
// traffic from it; once it reaches the real members it joins the real
// leader, though the liar still names itself.
func TestJoinerChecksLeader(t *testing.T) {
	c := newCluster(t)
	a, b := c.add("a", false), c.add("b", true)
	a.start()
	b.start()
	c.waitVoters(1, "a", "b")
	lr, _ := startLiar(t, c, "h", a.node.ClusterID())

	j := c.add("j", true)
	c.mu.Lock()
	c.cut = map[string]map[string]bool{"j": {"a": true, "b": true}}
	c.mu.Unlock()
	j.start()
	poll.Eventually(t, 10*time.Second, "j asked the liar", func() error {
		if lr.asked.Load() == 0 {
			return errors.New("not yet")
		}
		return nil
	})
	time.Sleep(time.Second) // several join attempts
	if j.node.allowRaft(lr.id) {
		t.Fatal("j accepts Raft traffic (a snapshot, a configuration) from the liar")
	}
	if st := j.status(); st.Registered {
		t.Fatalf("j thinks it registered through the liar: %+v", st)
	}
	t.Logf("j while only the liar answers: %q", j.status().Problem)

	c.mu.Lock()
	c.cut = nil
	c.mu.Unlock()
	c.waitVoters(3, "a", "b", "j")
	if j.node.allowRaft(lr.id) {
		t.Fatal("j accepts Raft traffic from the liar")
	}
	if st := j.status(); st.Leader != a.status().Leader {
		t.Fatalf("j follows %q, the cluster %q", st.Leader, a.status().Leader)
	}
}
