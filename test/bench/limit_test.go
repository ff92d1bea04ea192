package bench

import (
	"math"
	"runtime"
	"strings"
	"testing"
	"time"
)

func TestMeasureAEAD(t *testing.T) {
	seal, open := measureAEAD(50 * time.Millisecond)
	// Any machine this runs on does tens of MB/s at the very least; zero
	// means an operation failed (opening a packet it sealed, say).
	if seal < 0.01 || open < 0.01 {
		t.Fatalf("seal %.3f GB/s, open %.3f GB/s", seal, open)
	}
}

func TestUnderlayLimit(t *testing.T) {
	// 0.5 s/GB raw, 2 GB/s sealing and 4 GB/s opening: 0.5+0.5+0.25.
	u := underlayLimit(0.5, 2, 4, true)
	if math.Abs(u.SecPerGB-1.25) > 1e-9 || !u.GRO {
		t.Fatalf("limit %+v, want 1.25 s/GB with GRO", u)
	}
	if want := float64(runtime.NumCPU()) / 1.25 * 8; math.Abs(u.Gbps-want) > 1e-9 {
		t.Fatalf("%.2f Gbit/s, want %.2f", u.Gbps, want)
	}
	if u := underlayLimit(0.5, 0, 4, false); u.SecPerGB != 0 || u.Gbps != 0 {
		t.Fatalf("an unmeasured AEAD gave a limit: %+v", u)
	}
}

func TestMeasureLimitTakesEachUnderlaysRawCase(t *testing.T) {
	run := []Run{{}}
	results := []CaseResult{
		{Name: "raw underlay", CPUSecPerGB: 0.8, Runs: run},
		{Name: "wgmesh", CPUSecPerGB: 9, Runs: run},
		{Name: "raw underlay", GRO: true, CPUSecPerGB: 0.4, Runs: run},
	}
	l := measureLimit(results, 20*time.Millisecond)
	if len(l.Underlays) != 2 || l.Underlays[0].RawSecPerGB != 0.8 || l.Underlays[0].GRO ||
		l.Underlays[1].RawSecPerGB != 0.4 || !l.Underlays[1].GRO {
		t.Fatalf("underlays %+v", l.Underlays)
	}
	r := &Report{Config: "1 runs, 1s per iperf3 test", DataPlane: results, Limit: &l}
	md := r.Markdown()
	for _, want := range []string{"### The limit on this machine", "| GRO on | 0.40 s/GB"} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}
