package consensus

// Hooks for the randomized safety test of package mesh, which plays a
// hostile member and real crashes. The agent never calls or sets them;
// they live outside _test.go files only because another package's tests
// use them.

import (
	"context"

	"github.com/hashicorp/raft-wal/types"

	"github.com/wgmesh/wgmesh/crypto"
)

// RawRequestForTest is one request on the consensus port, with every
// field under the sender's control, as a hostile member could write it.
type RawRequestForTest struct {
	Method    string // "apply", "join", "status" or "leave"
	Entry     []byte
	RaftAddr  string
	Forwarded bool
	For       crypto.NodeID
}

// SendRawForTest sends req to the node at addr over this node's own TLS
// identity and returns the error text of the answer ("" when it was
// carried out) and whether the answering node said it is not the leader.
func (n *Node) SendRawForTest(ctx context.Context, addr string, req RawRequestForTest) (answer string, notLeader bool, err error) {
	resp, _, err := n.call(ctx, addr, &request{Method: req.Method, Entry: req.Entry, RaftAddr: req.RaftAddr, Forwarded: req.Forwarded, For: req.For})
	if err != nil {
		return "", false, err
	}
	if resp.Err == "" && resp.Result.Code != "" {
		return string(resp.Result.Code) + ": " + resp.Result.Message, false, nil
	}
	return resp.Err, resp.NotLeader, nil
}

// WALForTest, when set, gives the file system under the Raft log kept in
// dir (tests put a layer there that loses unsynced writes on a simulated
// power cut) and the size of its segments (0: the agent's). Small
// segments let a test's log be compacted for real: raft-wal drops only
// whole segments, and serves compacted entries still in its last one. It
// must be set before any node starts.
var WALForTest func(dir string) (types.VFS, int)
