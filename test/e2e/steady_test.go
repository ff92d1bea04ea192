//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
)

// pingRun is a steady ping from a container, to measure an outage.
type pingRun struct {
	interval time.Duration
	count    int
	done     chan struct{}
	out      string
	err      error
}

// startPing pings dst from a container every interval, count times, with
// the host's iputils ping (it reports each reply's sequence number).
func startPing(t *testing.T, h *lab.Host, ctr, dst string, interval time.Duration, count int) *pingRun {
	t.Helper()
	p := &pingRun{interval: interval, count: count, done: make(chan struct{})}
	secs := strconv.FormatFloat(interval.Seconds(), 'f', 3, 64)
	go func() {
		defer close(p.done)
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(count)*interval+time.Minute)
		defer cancel()
		// -w: without a deadline, ping -c exits right after the last
		// request and counts its reply, still in flight, as lost.
		deadline := strconv.Itoa(int((time.Duration(count)*interval + 5*time.Second).Seconds()))
		p.out, p.err = h.InContainer(ctx, ctr, "ping", "-n", "-i", secs, "-c", strconv.Itoa(count), "-w", deadline, dst)
	}()
	return p
}

// pingResult says how much a steady ping lost.
type pingResult struct {
	Sent, Received int
	// LongestGap is the longest run of lost pings, as time.
	LongestGap time.Duration
	Lost       []int // sequence numbers
}

func (r pingResult) String() string {
	s := fmt.Sprintf("%d of %d pings lost, longest outage %s", r.Sent-r.Received, r.Sent, r.LongestGap)
	if len(r.Lost) > 0 && len(r.Lost) <= 10 {
		s += fmt.Sprintf(" (seq %v)", r.Lost)
	}
	return s
}

var seqRE = regexp.MustCompile(`icmp_seq=(\d+)`)

// wait waits for the ping to finish and reads what it lost.
func (p *pingRun) wait(t *testing.T) pingResult {
	t.Helper()
	<-p.done
	got := map[int]bool{}
	for _, m := range seqRE.FindAllStringSubmatch(p.out, -1) {
		n, _ := strconv.Atoi(m[1])
		if strings.Contains(p.out, "icmp_seq="+m[1]+" ttl") {
			got[n] = true
		}
	}
	r := pingResult{Sent: p.count}
	gap := 0
	for seq := 1; seq <= p.count; seq++ {
		if got[seq] {
			gap = 0
			continue
		}
		gap++
		r.Lost = append(r.Lost, seq)
		if d := time.Duration(gap) * p.interval; d > r.LongestGap {
			r.LongestGap = d
		}
	}
	r.Received = r.Sent - len(r.Lost)
	if r.Received == 0 {
		t.Fatalf("steady ping got nothing through: %v\n%s", p.err, p.out)
	}
	return r
}
