package consensus

import (
	"context"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/test/poll"
)

// holeConn loses writes larger than limit: the connection stalls the way
// one across a path MTU black hole does.
type holeConn struct {
	net.Conn
	limit int
}

func (c holeConn) Write(b []byte) (int, error) {
	if len(b) > c.limit {
		return len(b), nil
	}
	return c.Conn.Write(b)
}

// TestBlackHoleNamed: a node whose consensus connections to the others
// stall while gossip still shows them up is told why: its claim fails
// with ErrUnreachable (not "most voters are down"), and its status lists
// the members whose connections time out. A connection that works again
// clears the report.
func TestBlackHoleNamed(t *testing.T) {
	c := newCluster(t)
	names := []string{"a", "b", "c"}
	for _, name := range names {
		c.add(name, name != "a").start()
	}
	c.waitVoters(3, names...)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := ensure(ctx, c.nodes["a"], "10.60.0.0/16"); err != nil {
		t.Fatal(err)
	}

	// c's paths to both others turn into black holes; what connections
	// it had die with them.
	c.mu.Lock()
	c.hole = map[string]map[string]int{"c": {"a": 200, "b": 200}}
	keep := c.conns[:0]
	for _, tc := range c.conns {
		if tc.from == "c" || tc.to == "c" {
			tc.c.Close()
			continue
		}
		keep = append(keep, tc)
	}
	c.conns = keep
	c.mu.Unlock()

	cctx, ccancel := context.WithTimeout(ctx, 15*time.Second)
	_, err := claim(cctx, c.nodes["c"], "10.60.0.0/16")
	ccancel()
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("a claim through the black hole: %v; want ErrUnreachable", err)
	}
	if !errors.Is(err, ErrNoLeader) {
		t.Fatalf("ErrUnreachable must stay an ErrNoLeader for callers of before: %v", err)
	}
	st := c.nodes["c"].status()
	named := map[string]bool{}
	for _, u := range st.Unreachable {
		if u.Count < 1 || u.Err == "" || u.Since.IsZero() {
			t.Errorf("incomplete report %+v", u)
		}
		named[u.Name] = true
	}
	if !named["a"] && !named["b"] {
		t.Fatalf("c's status names no member whose connections time out: %+v", st.Unreachable)
	}
	t.Logf("c's claim: %v", err)

	// The hole closes: the next connections work, and the reports go.
	c.mu.Lock()
	c.hole = nil
	c.mu.Unlock()
	poll.Eventually(t, 30*time.Second, "a claim and a clean status once the path works", func() error {
		cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
		defer ccancel()
		if _, err := claim(cctx, c.nodes["c"], "10.60.0.0/16"); err != nil {
			return err
		}
		for _, u := range c.nodes["c"].status().Unreachable {
			if u.Name == c.nodes["c"].status().Leader {
				return fmt.Errorf("the leader %s still listed: %+v", u.Name, u)
			}
		}
		return nil
	})
}
