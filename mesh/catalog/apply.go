package catalog

import "time"

// Apply applies a log entry without endorsement (protocol 1), as
// ApplyLog does.
func (s *State) Apply(index uint64, at time.Time, entry []byte) Result {
	return s.ApplyLog(index, at, entry, nil)
}

// ApplyLog applies a log entry at index, appended by the leader at time
// at with the Raft log Extensions ext (the leader's endorsement, if any).
// It is deterministic: every node applying the same entries in the same
// order reaches the same state and the same results. A refused command
// changes nothing but Index (and Protocol: the leader chose the entry's
// format, whatever becomes of the command).
//
// An entry without endorsement applies with the rules of protocol 1, as
// wgmesh before protocol 2 applies it, so that replicas of both agree
// while a cluster is upgraded host by host; an endorsed entry applies
// with the rules of protocol 2 (see Protocol).
func (s *State) ApplyLog(index uint64, at time.Time, entry, ext []byte) Result {
	s.Index = index
	end, err := DecodeEndorsement(ext)
	if err != nil {
		return refuse(CodeInvalid, "%v", err)
	}
	if end != nil {
		s.Protocol = max(s.Protocol, end.Protocol)
	}
	e := applying{index: index, at: at, end: end}
	sig, c, err := DecodeSigned(entry)
	if err != nil {
		return refuse(CodeInvalid, "%v", err)
	}
	if r, ok := s.authenticate(sig, c); !ok {
		return r
	}
	switch c.Op {
	case OpInit:
		if s.ClusterID != "" {
			return refuse(CodeInvalid, "cluster %s is already initialised", s.ClusterID)
		}
		if r, ok := e.registrable(&c.Init.Register); !ok {
			return r
		}
		s.ClusterID = c.Init.ClusterID
		return s.register(e, c.Node, c.BootID, &c.Init.Register)
	case OpRegister:
		if s.ClusterID == "" {
			return refuse(CodeNotInitialised, "the cluster is not initialised")
		}
		if r, ok := e.registrable(c.Register); !ok {
			return r
		}
		return s.register(e, c.Node, c.BootID, c.Register)
	}
	if s.ClusterID == "" {
		return refuse(CodeNotInitialised, "the cluster is not initialised")
	}
	n := s.Nodes[c.Node]
	if c.BootID != n.BootID {
		return refuse(CodeStale, "command of node %s comes from an earlier run of it (boot %s, current %s)", c.Node, c.BootID, n.BootID)
	}
	switch {
	case c.Seq == 0:
		return refuse(CodeInvalid, "command without sequence number")
	case c.Seq == n.LastSeq:
		// A retry of a command that was applied: same answer.
		return n.LastResult
	case c.Seq < n.LastSeq:
		return refuse(CodeStale, "command %d of node %s is older than its last (%d)", c.Seq, c.Node, n.LastSeq)
	}
	var r Result
	switch c.Op {
	case OpEnsureNetwork:
		r = s.ensureNetwork(e, c.Node, c.Network)
	case OpSetSpec:
		r = s.setSpec(c.Spec)
	case OpDeleteNetwork:
		r = s.deleteNetwork(e, c.Node, c.Delete.Subnet)
	case OpReserve:
		r = s.reserve(e, c.Node, c.Reserve)
	case OpClaim:
		r = s.claim(e, c.Node, c.Claim)
	case OpRelease:
		// Also a deleted network's: under protocol 2 its blocks stay
		// with their hosts until each gives them back (deleteNetwork).
		if nw, ok := s.Networks[c.Release.Subnet]; ok {
			for _, b := range c.Release.Blocks {
				if nw.Blocks[b] == c.Node {
					delete(nw.Blocks, b)
				}
			}
		}
	case OpAdopt:
		r = s.adopt(e, c.Node, c.Adopt)
	case OpForget:
		r = s.forget(e, c.Node, c.Forget.Name)
	}
	// The result's network is for the caller, not worth keeping.
	n.LastSeq, n.LastResult = c.Seq, Result{Code: r.Code, Message: r.Message, Block: r.Block}
	return r
}

// applying is the entry being applied: where it is in the log, when the
// leader appended it, and the leader's endorsement (nil: protocol 1).
type applying struct {
	index uint64
	at    time.Time
	end   *Endorsement
}

// rules2 reports whether the entry applies with the rules of protocol 2.
func (e applying) rules2() bool { return e.end != nil }

// checked reports whether the leader checked the command (see
// Endorsement.Checked).
func (e applying) checked() bool { return e.end != nil && e.end.Checked }

// registrable refuses, under protocol 2, a node that speaks an older
// one: it would apply the cluster's entries with older rules than every
// other replica, and hold a state of its own.
func (e applying) registrable(r *Register) (Result, bool) {
	if e.rules2() && r.Protocol < e.end.Protocol {
		return refuse(CodeOutdated, "this cluster runs catalog protocol %d, and this node's wgmesh speaks %d: upgrade wgmesh on this host",
			e.end.Protocol, max(r.Protocol, ProtocolLegacy)), false
	}
	return Result{}, true
}

// authenticate checks that a command is signed by the identity it speaks
// for: the one it registers, or the one the state binds its node to.
func (s *State) authenticate(sig Signed, c *Command) (Result, bool) {
	id, registering := c.SignerID()
	if !registering {
		n, ok := s.Nodes[c.Node]
		if !ok {
			return refuse(CodeNotRegistered, "node %s is not registered in the cluster", c.Node), false
		}
		id = n.ID
	}
	if !sig.VerifiedBy(id) {
		return refuse(CodeBadSignature, "command in the name of node %s is not signed by its identity %s", c.Node, id.Short()), false
	}
	return Result{}, true
}

func (s *State) register(e applying, name, boot string, r *Register) Result {
	at := e.at
	if f, ok := s.Forgotten[r.ID]; ok {
		return refuse(CodeForgotten, "this node's identity was forgotten by the cluster (it was node %s, forgotten by %s at %s); "+
			"a forgotten node cannot come back: remove its state directory to join as a new node", f.Name, f.By, f.At.UTC().Format(time.RFC3339))
	}
	if other, ok := s.NodeByID(r.ID); ok && other.Name != name {
		return refuse(CodeIdentityInUse, "this node's identity is registered as node %s; one identity has one name: "+
			"start it with --node-name %s, or give this host a state directory of its own", other.Name, other.Name)
	}
	n, ok := s.Nodes[name]
	if !ok {
		if e.rules2() && len(s.Nodes) >= MaxNodes {
			return refuse(CodeLimit, "the cluster holds %d nodes, the most it can: remove nodes that are gone for good "+
				"(`wgmesh forget NODE` on a healthy host) before another can join", MaxNodes)
		}
		s.Nodes[name] = &Node{Name: name, ID: r.ID, Addr: r.Addr, BootID: boot, Generation: r.Generation, Registered: at, Seen: at,
			Protocol: r.Protocol}
		return Result{}
	}
	if n.ID != r.ID {
		return refuse(CodeNameTaken, "node name %s is taken by another node (identity %s, at %s); this host (identity %s, at %s) must use another --node-name, "+
			"or, if %s is gone for good, run `wgmesh forget %s` on a healthy host first",
			name, n.ID.Short(), n.Addr, r.ID.Short(), r.Addr, name, name)
	}
	if n.BootID == boot {
		return Result{} // a retry
	}
	if r.Generation <= n.Generation {
		return refuse(CodeRolledBack, "node %s starts from state generation %d, but the cluster has seen generation %d of it (last at %s): "+
			"its state directory is an older copy (a restored backup or VM snapshot), or another host runs with a copy of it; "+
			"this node claims nothing until an operator fixes it (see docs/operations.md, Failures)", name, r.Generation, n.Generation, n.Addr)
	}
	n.Addr, n.BootID, n.Generation, n.Seen = r.Addr, boot, r.Generation, at
	n.LastSeq, n.LastResult = 0, Result{}
	n.Protocol = r.Protocol
	return Result{}
}

func (s *State) forget(e applying, by, name string) Result {
	if by == name {
		return refuse(CodeInvalid, "a node cannot forget itself")
	}
	n, ok := s.Nodes[name]
	if !ok {
		return refuse(CodeNotRegistered, "no node %s in the cluster", name)
	}
	if e.rules2() && !e.checked() {
		// Whether the node is down is known to gossip, not to the log:
		// only the leader's check that it is lets a member forget it.
		return refuse(CodeNotEndorsed, "forgetting node %s needs the leader's check that gossip does not see it; "+
			"this entry has none", name)
	}
	delete(s.Nodes, name)
	f := Forgotten{Name: name, By: by, At: e.at}
	if e.rules2() {
		f.Index = e.index
		s.pruneForgotten(MaxForgotten - 1)
	}
	s.Forgotten[n.ID] = f
	for _, nw := range s.Networks {
		for b, owner := range nw.Blocks {
			if owner == name {
				delete(nw.Blocks, b)
			}
		}
	}
	return Result{}
}
