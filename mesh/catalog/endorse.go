package catalog

import "encoding/json"

// Protocol versions of the catalog's log entries.
//
// Version 1 is what wgmesh wrote before this file existed (559f90d): a
// log entry is a member's signed command and nothing else, and Apply
// trusts every member with every other member's state.
//
// Version 2 adds the leader's endorsement (Endorsement) and the rules
// that depend on it: a member's command touches only its own blocks and
// records unless the leader checked, before appending it, what Apply
// cannot see (liveness, containers in use); and every table a member can
// grow is bounded. Apply uses the version-2 rules only for entries the
// leader marked as version 2, and the leader marks entries only once
// every registered node advertises version 2 (Register.Protocol) or the
// cluster already switched (State.Protocol): a replica of an older
// wgmesh ignores the mark and would apply the entry with the old rules,
// so the mark is never written while such a replica may exist.
const (
	ProtocolLegacy   = 1
	ProtocolEndorsed = 2
	// Protocol is the highest version this code speaks, advertised in
	// its registrations.
	Protocol = ProtocolEndorsed
)

// Endorsement is what the leader adds to a member's signed command when
// it appends it to the log. It travels in the Raft log entry's
// Extensions, which only the leader sets: a member sends the leader the
// signed command alone, and a leader of an older wgmesh appends entries
// without Extensions, so no member can endorse its own command.
// (Voters, and so leaders, are trusted; other members are not.)
type Endorsement struct {
	// Protocol is the entry's version (ProtocolEndorsed or later).
	Protocol int `json:"protocol"`
	// Checked says the leader checked the command against what only it
	// sees and found it allowed: for OpForget, that gossip does not see
	// the node; for OpDeleteNetwork, that no host reports containers on
	// the network. Without it, such a command may touch only the
	// signer's own state.
	Checked bool `json:"checked,omitempty"`
}

// Encode is the endorsement as Raft log Extensions.
func (e Endorsement) Encode() []byte {
	b, _ := json.Marshal(e)
	return b
}

// maxEndorsementBytes bounds a decoded endorsement.
const maxEndorsementBytes = 1 << 10

// DecodeEndorsement decodes a log entry's Extensions: none is a legacy
// entry (nil, nil).
func DecodeEndorsement(b []byte) (*Endorsement, error) {
	if len(b) == 0 {
		return nil, nil
	}
	if len(b) > maxEndorsementBytes {
		return nil, invalid("leader endorsement of %d bytes exceeds %d", len(b), maxEndorsementBytes)
	}
	var e Endorsement
	if err := json.Unmarshal(b, &e); err != nil {
		return nil, invalid("leader endorsement: %v", err)
	}
	if e.Protocol < ProtocolEndorsed {
		return nil, invalid("leader endorsement of protocol %d", e.Protocol)
	}
	return &e, nil
}
