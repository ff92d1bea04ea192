package sim

import (
	"bytes"
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

// lockedBuffer keeps logs that memberlist may still write after a run
// returned (its last gossip round), which t.Log must not get once the
// test is over.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestRunNamesSmallCluster(t *testing.T) {
	var logs lockedBuffer
	cfg := NamesConfig{Config: Config{
		Nodes:   5,
		Timeout: 30 * time.Second,
		Memberlist: func() *memberlist.Config {
			c := DefaultMemberlist()
			c.PushPullInterval = time.Second
			return c
		},
		Settle:     500 * time.Millisecond,
		IdleWindow: 2 * time.Second,
		Logger:     slog.New(slog.NewTextHandler(&logs, nil)),
	}, PerNode: 4, Changes: 3}
	res, err := RunNames(context.Background(), cfg)
	if err != nil {
		t.Fatalf("%v (result so far %+v)\n%s", err, res, logs.String())
	}
	t.Logf("%+v", res)
	if res.Published <= 0 || res.ChangeMedian <= 0 || res.ChangeMax < res.ChangeMedian {
		t.Errorf("a phase was not timed: %+v", res)
	}
	if res.ChangePayloadBytesPerNode <= 0 || res.RecordBytes < 150 || res.RecordBytes > 1100 || res.PushPullBytes <= 0 || res.StatePayloadBytes <= 0 {
		t.Errorf("traffic not counted: %+v", res)
	}
	if res.IdleBytesPerNodePerSecond <= res.IdleBaselineBytesPerNodePerSecond {
		t.Errorf("idle with names %.0f B/s, without %.0f B/s", res.IdleBytesPerNodePerSecond, res.IdleBaselineBytesPerNodePerSecond)
	}
}
