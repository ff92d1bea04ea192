package consensus

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// Requests a node sends to the cluster's leader (or to any member, which
// passes them on to the leader once). Each is one framed JSON message
// each way on a stream of its own.
const (
	methodApply  = "apply"
	methodJoin   = "join"
	methodStatus = "status"
	methodLeave  = "leave"
)

type request struct {
	Method string `json:"method"`
	// Entry is a signed catalog command (apply).
	Entry []byte `json:"entry,omitempty"`
	// RaftAddr is where the caller serves Raft (join).
	RaftAddr string `json:"raft_addr,omitempty"`
	// Forwarded marks a request passed on by a member that is not the
	// leader; it is never passed on again.
	Forwarded bool `json:"forwarded,omitempty"`
	// For is the identity a forwarded join or leave speaks for.
	For crypto.NodeID `json:"for,omitzero"`
	// Claim and Sig are For's own signed statement of a forwarded join
	// or leave (forwardClaim), which the leader checks: the member that
	// passes the request on is not trusted to say whom it is for.
	// Compatibility: nodes of before these fields drop them (encoding/json
	// ignores unknown fields), and a leader of before ignores them.
	Claim []byte `json:"claim,omitempty"`
	Sig   []byte `json:"sig,omitempty"`
}

// forwardClaim is what a node signs when a member may pass its join or
// leave on to the leader. It is bound to the request, the cluster and
// this run of the node (a restarted node has a new boot ID, so a claim
// of an earlier run is worthless), and it expires.
type forwardClaim struct {
	Method   string        `json:"method"`
	For      crypto.NodeID `json:"for"`
	RaftAddr string        `json:"raft_addr,omitempty"`
	Cluster  string        `json:"cluster"`
	BootID   string        `json:"boot"`
	// Time is when it was signed (Unix seconds).
	Time int64 `json:"time"`
}

const (
	claimPurpose = "consensus forwarded request v1"
	// claimMaxAge is how far a claim's time may be from the leader's
	// clock. It is generous for clocks that drift: the boot ID already
	// makes a claim useless once its node restarts.
	claimMaxAge = 10 * time.Minute
)

// sign attaches this node's claim to a join or leave that a member may
// pass on to the leader of cluster.
func (n *Node) sign(req *request, cluster string) {
	req.Claim = mustJSON(forwardClaim{Method: req.Method, For: n.id, RaftAddr: req.RaftAddr, Cluster: cluster, BootID: n.run.bootID, Time: time.Now().Unix()})
	req.Sig = n.cfg.Identity.Sign(claimPurpose, req.Claim)
}

// speaksFor returns the identity a join or leave acts for: the peer's
// own, proven by the TLS handshake, or, for a request a member passed
// on, the identity whose signed claim it carries.
func (n *Node) speaksFor(peer crypto.NodeID, req *request) (crypto.NodeID, error) {
	if !req.Forwarded {
		return peer, nil
	}
	if len(req.Claim) == 0 || !req.For.Verify(claimPurpose, req.Claim, req.Sig) {
		n.metrics.refused("forward-unproven")
		return crypto.NodeID{}, fmt.Errorf("a %s passed on for node %s does not carry its signed claim (is the forwarding member older than this leader? the node asks the leader directly too)", req.Method, req.For.Short())
	}
	var c forwardClaim
	if err := json.Unmarshal(req.Claim, &c); err != nil {
		n.metrics.refused("forward-unproven")
		return crypto.NodeID{}, fmt.Errorf("reading the claim of node %s: %w", req.For.Short(), err)
	}
	var boot string
	n.fsm.Read(func(s *catalog.State) {
		if node, ok := s.NodeByID(req.For); ok {
			boot = node.BootID
		}
	})
	age := time.Since(time.Unix(c.Time, 0))
	var err error
	switch {
	case c.Method != req.Method || c.For != req.For || c.RaftAddr != req.RaftAddr:
		err = fmt.Errorf("the claim of node %s is for another request", req.For.Short())
	case c.Cluster != n.ClusterID():
		err = fmt.Errorf("the claim of node %s is for cluster %q", req.For.Short(), c.Cluster)
	case boot == "" || c.BootID != boot:
		err = fmt.Errorf("the claim of node %s is not of its registered run", req.For.Short())
	case age > claimMaxAge || age < -claimMaxAge:
		err = fmt.Errorf("the claim of node %s was signed %s ago (clocks apart?)", req.For.Short(), age.Round(time.Second))
	}
	if err != nil {
		n.metrics.refused("forward-unproven")
		return crypto.NodeID{}, err
	}
	return req.For, nil
}

type response struct {
	Err string `json:"err,omitempty"`
	// NotLeader is set when the answering node could not reach a leader.
	NotLeader bool           `json:"not_leader,omitempty"`
	Result    catalog.Result `json:"result,omitzero"`
	Index     uint64         `json:"index,omitempty"`
	Status    *PeerStatus    `json:"status,omitempty"`
}

// PeerStatus is a node's consensus state, as the status request returns it.
type PeerStatus struct {
	ClusterID    string        `json:"cluster_id"`
	State        string        `json:"state"`
	LeaderID     crypto.NodeID `json:"leader_id,omitzero"`
	LeaderAddr   string        `json:"leader_addr,omitempty"`
	AppliedIndex uint64        `json:"applied_index"`
	LastIndex    uint64        `json:"last_index"`
	// LowestName and LowestID are the lowest alive member the answering
	// node knows, for the bootstrap decision.
	LowestName string        `json:"lowest_name,omitempty"`
	LowestID   crypto.NodeID `json:"lowest_id,omitzero"`
	// YourGeneration is the generation of the asking node that the
	// answering node's catalog holds (0: none, or an agent of 559f90d),
	// for the asking node to find out that it was rolled back
	// (rollback.go).
	YourGeneration uint64 `json:"your_generation,omitempty"`
	// BootID names the answering node's run, for the leader to tell a
	// clone's registration from a restart (clone.go). Absent from agents
	// of 559f90d.
	BootID string `json:"boot_id,omitempty"`
	// ServerProof proves that the answering node holds the server key
	// (servers.go); the TLS handshake proves whose it is.
	ServerProof []byte `json:"server_proof,omitempty"`
}

// maxFrame bounds one message.
const maxFrame = catalog.MaxEntryBytes + 64<<10

func writeFrame(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	var hdr [4]byte
	binary.BigEndian.PutUint32(hdr[:], uint32(len(b)))
	if _, err := w.Write(append(hdr[:], b...)); err != nil {
		return err
	}
	return nil
}

func readFrame(r io.Reader, v any) error {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > maxFrame {
		return fmt.Errorf("message of %d bytes exceeds %d", n, maxFrame)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// rpcTimeout bounds serving one request (an apply waits for a commit).
const rpcTimeout = 30 * time.Second

// serveRPC answers one request on conn from peer.
func (n *Node) serveRPC(conn net.Conn, peer crypto.NodeID) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(rpcTimeout))
	var req request
	if err := readFrame(conn, &req); err != nil {
		n.metrics.refused("rpc-frame")
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	resp := n.handleRPC(ctx, peer, &req)
	_ = writeFrame(conn, resp)
}

func (n *Node) handleRPC(ctx context.Context, peer crypto.NodeID, req *request) response {
	if req.Method == methodStatus {
		st := n.peerStatus()
		st.YourGeneration = n.generationOf(peer)
		return response{Status: &st}
	}
	if req.Forwarded {
		// Only a member of the cluster passes requests on, and only
		// once. What it passes on acts only for whoever signed it: an
		// entry is signed, a join or leave carries a signed claim.
		if _, ok := n.registeredID(peer); !ok {
			n.metrics.refused("forward-not-member")
			return response{Err: "only registered members forward requests"}
		}
	}
	if !n.isLeader() {
		if req.Forwarded {
			return response{NotLeader: true, Err: "not the leader"}
		}
		// The claim, if any, goes along: a node of before claims does
		// not sign, and a leader of before does not need it.
		fwd := *req
		fwd.Forwarded, fwd.For = true, peer
		resp, err := n.callLeader(ctx, &fwd)
		if err != nil {
			return response{NotLeader: true, Err: err.Error()}
		}
		return resp
	}
	switch req.Method {
	case methodApply:
		r, index, err := n.applyLocal(ctx, req.Entry)
		if err != nil {
			return response{Err: err.Error(), NotLeader: errors.Is(err, errNotLeader)}
		}
		return response{Result: r, Index: index}
	case methodJoin:
		who, err := n.speaksFor(peer, req)
		if err == nil {
			err = n.admit(who, req.RaftAddr, !req.Forwarded)
		}
		if err != nil {
			return response{Err: err.Error(), NotLeader: errors.Is(err, errNotLeader)}
		}
		return response{}
	case methodLeave:
		who, err := n.speaksFor(peer, req)
		if err == nil {
			err = n.removeServer(who)
		}
		if err != nil {
			return response{Err: err.Error(), NotLeader: errors.Is(err, errNotLeader)}
		}
		return response{}
	}
	n.metrics.refused("rpc-method")
	return response{Err: fmt.Sprintf("unknown request %q", req.Method)}
}

// call sends one request to the node at addr.
func (n *Node) call(ctx context.Context, addr string, req *request) (response, crypto.NodeID, error) {
	conn, peer, err := n.mux.dialStream(ctx, addr, streamRPC)
	if err != nil {
		return response{}, crypto.NodeID{}, fmt.Errorf("connecting to %s: %w", addr, err)
	}
	defer conn.Close()
	deadline := time.Now().Add(rpcTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if err := writeFrame(conn, req); err != nil {
		n.mux.health.record(addr, err)
		return response{}, peer, fmt.Errorf("sending to %s: %w", addr, err)
	}
	var resp response
	if err := readFrame(conn, &resp); err != nil {
		if ctx.Err() == nil {
			n.mux.health.record(addr, err)
		}
		return response{}, peer, fmt.Errorf("reading the answer of %s: %w", addr, err)
	}
	return resp, peer, nil
}

// callID sends one request to the node want at addr, and refuses the
// answer of any other node there.
func (n *Node) callID(ctx context.Context, addr string, want crypto.NodeID, req *request) (response, error) {
	resp, peer, err := n.call(ctx, addr, req)
	if err == nil && peer != want {
		n.metrics.refused("wrong-peer")
		return response{}, fmt.Errorf("node %s answered at %s in the place of node %s", peer.Short(), addr, want.Short())
	}
	return resp, err
}

// callLeader sends a request to the leader this node's Raft knows of,
// checking that the leader is who answers at its address.
func (n *Node) callLeader(ctx context.Context, req *request) (response, error) {
	addr, id := n.leader()
	if addr == "" || id.IsZero() {
		return response{}, errNoLeader
	}
	return n.callID(ctx, addr, id, req)
}

var (
	errNotLeader = errors.New("not the leader")
	errNoLeader  = errors.New("no leader known")
)
