package sim

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

func TestRunNamesSmallCluster(t *testing.T) {
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
		Logger:     slog.New(slog.NewTextHandler(newTestWriter(t), nil)),
	}, PerNode: 4, Changes: 3}
	res, err := RunNames(context.Background(), cfg)
	if err != nil {
		t.Fatalf("%v (result so far %+v)", err, res)
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
