package sim

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// memberlist's Shutdown does not wait for a probe under way,
		// which ends by itself at its timeout.
		goleak.IgnoreAnyFunction("github.com/hashicorp/memberlist.(*Memberlist).probeNode"),
		// raft's NetworkTransport leaves a goroutine blocked in a pooled
		// connection's read until the connection closes, after Close
		// (as the consensus tests allow); under load it is still there
		// when the check runs.
		goleak.IgnoreTopFunction("github.com/hashicorp/raft.(*NetworkTransport).listen"),
		goleak.IgnoreAnyFunction("github.com/hashicorp/raft.(*NetworkTransport).handleConn"),
	)
}

// testWriter sends logs to t.Log, so they show only for failing tests,
// until the test ends: memberlist's goroutines may still log after a run
// returned, and t.Log panics once the test is over.
type testWriter struct {
	t    *testing.T
	mu   sync.Mutex
	done bool
}

func newTestWriter(t *testing.T) *testWriter {
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		w.done = true
		w.mu.Unlock()
	})
	return w
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(string(p[:len(p)-1]))
	}
	return len(p), nil
}

func TestRunSmallCluster(t *testing.T) {
	for _, concurrent := range []bool{true, false} {
		name := "sequential"
		if concurrent {
			name = "concurrent"
		}
		t.Run(name, func(t *testing.T) {
			cfg := Config{
				Nodes:            5,
				ConcurrentClaims: concurrent,
				Timeout:          20 * time.Second,
				// A push/pull every second keeps the warm-up short and
				// puts push/pulls into the idle window.
				Memberlist: func() *memberlist.Config {
					c := DefaultMemberlist()
					c.PushPullInterval = time.Second
					return c
				},
				Settle:     500 * time.Millisecond,
				IdleWindow: 2 * time.Second,
				Logger:     slog.New(slog.NewTextHandler(newTestWriter(t), nil)),
			}
			res, err := Run(context.Background(), cfg)
			if err != nil {
				t.Fatalf("%v (result so far %+v)", err, res)
			}
			t.Logf("%+v", res)
			if res.Nodes != 5 || res.MembershipConverged <= 0 || res.PeersConverged <= 0 || res.JoinReachable <= 0 {
				t.Errorf("a phase was not timed: %+v", res)
			}
			if res.BytesPerNodePerSecond <= 0 || res.MessagesPerNodePerSecond <= 0 || res.IdleStreamBytesPerNodePerSecond <= 0 || res.ClaimBytesPerNode <= 0 {
				t.Errorf("no traffic counted: %+v", res)
			}
			// An entry holds at least a node name, a subnet and a block.
			if res.MaxEntryBytes < 40 || res.Goroutines == 0 {
				t.Errorf("entries or goroutines not measured: %+v", res)
			}
			if res.Registered < res.MembershipConverged || res.IdleRaftBytesPerNodePerSecond <= 0 || res.ClaimRaftBytesPerNode <= 0 || res.Leader == "" {
				t.Errorf("consensus not measured: %+v", res)
			}
			// One dial may time out on a machine busy with other tests
			// (the stream slots wait at most the dial's timeout).
			if res.MemberDeaths != 0 || res.DialErrors > 1 {
				t.Errorf("five idle nodes on loopback saw failures: %+v", res)
			}
		})
	}
}

// TestRunTimesOut: a run that cannot finish stops by itself, reports
// ErrTimeout, and leaves nothing running (TestMain checks).
func TestRunTimesOut(t *testing.T) {
	res, err := Run(context.Background(), Config{Nodes: 3, Timeout: 300 * time.Millisecond})
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("err = %v, want ErrTimeout", err)
	}
	if res.JoinReachable != 0 {
		t.Fatalf("join timed in a run that timed out: %+v", res)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		cfg Config
		ok  bool
	}{
		{Config{Nodes: 2}, true},
		{DefaultConfig(), true},
		{Config{Nodes: 1}, false},
		{Config{Nodes: maxNodes + 1}, false},
		{Config{Nodes: 10, Networks: len(subnets) + 1}, false},
		{Config{Nodes: 10, Timeout: -time.Second}, false},
	} {
		cfg := tc.cfg.withDefaults()
		if err := cfg.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v: Validate() = %v, want ok %v", tc.cfg, err, tc.ok)
		}
	}
}
