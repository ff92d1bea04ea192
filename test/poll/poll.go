// Package poll waits for a condition that another goroutine, process or
// host makes true: it calls the condition again and again until it holds
// or the time allowed runs out, and then says what it waited for, how
// long, and why the condition last failed.
//
// The tests of wgmesh, the lab and the bench use it instead of loops of
// their own around time.Sleep. It imports nothing of wgmesh, so that any
// of them can.
package poll

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

// Until's wait between two calls of a condition starts at first and
// doubles after each call up to maxWait: a condition that holds soon is
// seen soon, and one that takes seconds costs a call every maxWait.
const (
	first   = 10 * time.Millisecond
	maxWait = 200 * time.Millisecond
)

// Until calls cond until it returns nil, ctx ends, or timeout passes. It
// waits 10 ms after the first call, twice as long after each further one,
// and at most 200 ms. It returns nil as soon as cond does; otherwise its
// error says what was awaited and for how long, and wraps cond's last
// error (and ctx's cause, if ctx ended). cond is called at least once, and
// once more when timeout has passed.
func Until(ctx context.Context, timeout time.Duration, what string, cond func() error) error {
	return wall.until(ctx, first, maxWait, timeout, what, cond)
}

// Every is Until with the same wait, interval, between all calls of cond:
// for a caller that times how long the awaited thing took, which a short
// interval measures finely, or whose cond is costly enough to call seldom.
func Every(ctx context.Context, interval, timeout time.Duration, what string, cond func() error) error {
	return wall.until(ctx, interval, interval, timeout, what, cond)
}

// Eventually is Until in a test: it fails t at once (t.Fatal) with
// Until's error. It does not end with t's context, so that it works in a
// t.Cleanup function too.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	if err := Until(context.Background(), timeout, what, cond); err != nil {
		t.Fatal(err)
	}
}

// Bool makes a condition for Until from a function that only says whether
// the awaited thing holds; the error it returns while it does not is
// "still false".
func Bool(cond func() bool) func() error {
	return func() error {
		if cond() {
			return nil
		}
		return errFalse
	}
}

var errFalse = errors.New("still false")

// clock is time as until sees it: wall, but in this package's tests.
type clock struct {
	now func() time.Time
	// sleep waits d, or less if ctx ends first.
	sleep func(ctx context.Context, d time.Duration)
}

var wall = clock{now: time.Now, sleep: sleep}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// until calls cond until it returns nil, ctx ends, or timeout passes,
// waiting wait after the first call and twice as long after each further
// one, up to maxWait.
func (c clock) until(ctx context.Context, wait, maxWait, timeout time.Duration, what string, cond func() error) error {
	start := c.now()
	deadline := start.Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w after %v: %w", what, context.Cause(ctx), c.now().Sub(start).Round(time.Millisecond), err)
		}
		left := deadline.Sub(c.now())
		if left <= 0 {
			return fmt.Errorf("%s: not so after %v: %w", what, timeout, err)
		}
		c.sleep(ctx, min(wait, left))
		wait = min(2*wait, maxWait)
	}
}
