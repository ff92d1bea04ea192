package bench

import (
	"io"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestSoakScan(t *testing.T) {
	out := `=== RUN   TestSafetyRandomized
=== RUN   TestSafetyRandomized/7
    safety_test.go:485: step 0: n2 allocates in 10.60.0.0/22 (<nil>)
    safety_test.go:485: step 1: crash n0
    safety_test.go:514: seed 7: 2 steps, 1 faults in 3s: allocate 1, crash 1; 5 addresses held at the end, none twice
--- PASS: TestSafetyRandomized (4.01s)
    --- PASS: TestSafetyRandomized/7 (4.01s)
PASS
`
	var r SoakResult
	var log, progress strings.Builder
	tail := r.scan(strings.NewReader(out), &log, &progress)
	if log.String() != out {
		t.Errorf("log file differs from the output:\n%s", log.String())
	}
	if strings.Contains(progress.String(), "step 0") || !strings.Contains(progress.String(), "--- PASS") {
		t.Errorf("progress shows steps or misses the result:\n%s", progress.String())
	}
	want := SoakResult{StepsDone: 2, Faults: 1, TestTook: "3s",
		Summary: "seed 7: 2 steps, 1 faults in 3s: allocate 1, crash 1; 5 addresses held at the end, none twice",
		Kinds:   []KindCount{{"allocate", 1}, {"crash", 1}}}
	if d := cmp.Diff(want, r); d != "" {
		t.Errorf("result (-want +got):\n%s", d)
	}
	if len(tail) != 8 || timedOut(tail) {
		t.Errorf("tail %q", tail)
	}
}

func TestSoakTailStopsAtDump(t *testing.T) {
	out := "    safety_test.go:485: step 0: join n3\npanic: test timed out after 5s\n\trunning tests:\n\ngoroutine 1 [running]:\nmain.x()\n"
	var r SoakResult
	tail := r.scan(strings.NewReader(out), io.Discard, io.Discard)
	if !timedOut(tail) || strings.Contains(strings.Join(tail, "\n"), "goroutine 1") {
		t.Errorf("tail %q", tail)
	}
}
