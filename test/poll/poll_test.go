package poll

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

var errNotYet = errors.New("not yet")

// failing returns a condition that fails n times, saying how often it was
// called, and then holds; and the count of its calls.
func failing(n int) (func() error, *int) {
	calls := 0
	return func() error {
		calls++
		if calls <= n {
			return fmt.Errorf("call %d: %w", calls, errNotYet)
		}
		return nil
	}, &calls
}

func TestUntilHoldsAfterTries(t *testing.T) {
	cond, calls := failing(3)
	start := time.Now()
	if err := Until(context.Background(), time.Minute, "the fourth call", cond); err != nil {
		t.Fatal(err)
	}
	if *calls != 4 {
		t.Errorf("%d calls, want 4", *calls)
	}
	// 10 + 20 + 40 ms of waits, far below the minute allowed.
	if took := time.Since(start); took < 70*time.Millisecond || took > 10*time.Second {
		t.Errorf("took %v, want 70 ms and a little more", took)
	}
}

func TestUntilTimeout(t *testing.T) {
	cond, calls := failing(1 << 30)
	start := time.Now()
	err := Until(context.Background(), 300*time.Millisecond, "the impossible", cond)
	took := time.Since(start)
	if err == nil {
		t.Fatal("no error")
	}
	if !errors.Is(err, errNotYet) {
		t.Errorf("%v does not wrap the condition's error", err)
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("%v says the context ended", err)
	}
	want := fmt.Sprintf("the impossible: not so after 300ms: call %d: not yet", *calls)
	if err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	if took < 300*time.Millisecond || took > 10*time.Second {
		t.Errorf("gave up after %v, want 300 ms", took)
	}
	if *calls < 3 {
		t.Errorf("%d calls in %v", *calls, took)
	}
}

func TestUntilContextEnds(t *testing.T) {
	why := errors.New("the test is over")
	ctx, cancel := context.WithCancelCause(context.Background())
	time.AfterFunc(100*time.Millisecond, func() { cancel(why) })
	cond, calls := failing(1 << 30)
	var err error
	returns(t, func() { err = Until(ctx, time.Hour, "the impossible", cond) })
	if err == nil {
		t.Fatal("no error")
	}
	if !errors.Is(err, why) || !errors.Is(err, errNotYet) {
		t.Errorf("%v does not wrap both the context's cause and the condition's error", err)
	}
	if !strings.HasPrefix(err.Error(), "the impossible: the test is over after ") || !strings.HasSuffix(err.Error(), fmt.Sprintf(": call %d: not yet", *calls)) {
		t.Errorf("error %q", err)
	}
}

// returns fails t unless f returns within 10 s: it is to return soon
// after a context ends.
func returns(t *testing.T, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("still waiting 10 s after the context ended")
	}
}

// A condition that holds is a success even if the context has ended.
func TestUntilEndedContextHolds(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	cond, calls := failing(0)
	if err := Until(ctx, time.Minute, "x", cond); err != nil || *calls != 1 {
		t.Errorf("%v after %d calls", err, *calls)
	}
	cond, calls = failing(1)
	if err := Until(ctx, time.Minute, "x", cond); !errors.Is(err, context.Canceled) || *calls != 1 {
		t.Errorf("%v after %d calls, want context.Canceled after 1", err, *calls)
	}
}

// fake is a clock that only moves when until sleeps, and records the
// waits.
type fake struct {
	t     time.Time
	waits []time.Duration
}

func (f *fake) clock() clock {
	return clock{
		now: func() time.Time { return f.t },
		sleep: func(_ context.Context, d time.Duration) {
			f.waits = append(f.waits, d)
			f.t = f.t.Add(d)
		},
	}
}

const ms = time.Millisecond

func TestBackoff(t *testing.T) {
	for _, tc := range []struct {
		name            string
		wait, max, time time.Duration
		want            []time.Duration
	}{
		// Until's: doubling from 10 ms to 200 ms; the last wait ends at
		// the deadline, where cond is called once more.
		{"until", first, maxWait, time.Second, []time.Duration{10 * ms, 20 * ms, 40 * ms, 80 * ms, 160 * ms, 200 * ms, 200 * ms, 200 * ms, 90 * ms}},
		{"every", 50 * ms, 50 * ms, 175 * ms, []time.Duration{50 * ms, 50 * ms, 50 * ms, 25 * ms}},
		{"at once", first, maxWait, 0, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fake{t: time.Unix(1e9, 0)}
			start := f.t
			cond, calls := failing(1 << 30)
			err := f.clock().until(context.Background(), tc.wait, tc.max, tc.time, "x", cond)
			if !errors.Is(err, errNotYet) {
				t.Fatalf("error %v", err)
			}
			if !slices.Equal(f.waits, tc.want) {
				t.Errorf("waits %v, want %v", f.waits, tc.want)
			}
			if *calls != len(tc.want)+1 {
				t.Errorf("%d calls after %d waits", *calls, len(tc.want))
			}
			if got := f.t.Sub(start); got != tc.time {
				t.Errorf("gave up after %v, want %v", got, tc.time)
			}
		})
	}
}

// Until and Every wait as TestBackoff says they do.
func TestBackoffParameters(t *testing.T) {
	if first != 10*ms || maxWait != 200*ms {
		t.Errorf("Until waits from %v up to %v; its comment says 10 ms to 200 ms", first, maxWait)
	}
	f := &fake{t: time.Unix(1e9, 0)}
	saved := wall
	wall = f.clock()
	defer func() { wall = saved }()
	cond, _ := failing(1 << 30)
	_ = Every(context.Background(), 30*ms, 100*ms, "x", cond)
	if want := []time.Duration{30 * ms, 30 * ms, 30 * ms, 10 * ms}; !slices.Equal(f.waits, want) {
		t.Errorf("Every waits %v, want %v", f.waits, want)
	}
	f.waits = nil
	_ = Until(context.Background(), 100*ms, "x", cond)
	if want := []time.Duration{10 * ms, 20 * ms, 40 * ms, 30 * ms}; !slices.Equal(f.waits, want) {
		t.Errorf("Until waits %v, want %v", f.waits, want)
	}
}

func TestSleepEndsWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	returns(t, func() { sleep(ctx, time.Hour) })
	start := time.Now()
	sleep(context.Background(), 50*time.Millisecond)
	if took := time.Since(start); took < 50*time.Millisecond {
		t.Errorf("slept %v of 50 ms", took)
	}
}

// fakeTB records what Eventually fails it with.
type fakeTB struct {
	testing.TB
	fatal []any
}

func (f *fakeTB) Helper()           {}
func (f *fakeTB) Fatal(args ...any) { f.fatal = append(f.fatal, args...) }

func TestEventually(t *testing.T) {
	var ft fakeTB
	cond, calls := failing(2)
	Eventually(&ft, time.Minute, "the third call", cond)
	if ft.fatal != nil || *calls != 3 {
		t.Errorf("failed with %v after %d calls", ft.fatal, *calls)
	}
	cond, _ = failing(1 << 30)
	Eventually(&ft, 50*time.Millisecond, "the impossible", cond)
	if len(ft.fatal) != 1 {
		t.Fatalf("failed with %v", ft.fatal)
	}
	if err, ok := ft.fatal[0].(error); !ok || !errors.Is(err, errNotYet) || !strings.HasPrefix(err.Error(), "the impossible: not so after 50ms: call ") {
		t.Errorf("failed with %v", ft.fatal[0])
	}
}

func TestBool(t *testing.T) {
	n := 0
	cond := Bool(func() bool { n++; return n > 1 })
	if err := cond(); err == nil || err.Error() != "still false" {
		t.Errorf("first call: %v", err)
	}
	if err := cond(); err != nil {
		t.Errorf("second call: %v", err)
	}
}
