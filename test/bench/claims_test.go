package bench

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParsePluginCalls(t *testing.T) {
	log := `time=2026-11-30T01:02:03.000Z level=DEBUG msg="plugin call" component=driver call=/IpamDriver.RequestPool took=1.5ms
time=2026-11-30T01:02:03.001Z level=INFO msg="address pool registered" component=driver pool=wgmesh/10.100.0.0/16
time=2026-11-30T01:02:03.002Z level=DEBUG msg="plugin call" component=driver call=/IpamDriver.RequestAddress took=32.25ms
time=2026-11-30T01:02:03.003Z level=WARN msg="plugin call failed" component=driver call=/IpamDriver.RequestAddress took=750µs kind=forbidden err="x"
time=2026-11-30T01:02:03.004Z level=DEBUG msg="plugin call" component=driver call=/NetworkDriver.CreateNetwork took=5.7ms
time=2026-11-30T01:02:03.005Z level=DEBUG msg="reconciled" component=driver took=9ms
`
	got, err := parsePluginCalls(strings.NewReader(log))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{"/IpamDriver.RequestPool": 1.5, "/IpamDriver.RequestAddress": 33, "/NetworkDriver.CreateNetwork": 5.7}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("calls (-want +got):\n%s", d)
	}
}

func TestUnknownFlagsHelp(t *testing.T) {
	help := `Usage of wgmesh agent:
  -advertise-addr string
    	address peers reach this node at
  -join value
    	seed address(es)
  -sync-networks
    	create here the wgmesh networks created on other hosts (default true)
`
	known := map[string]bool{}
	for _, m := range helpFlagRE.FindAllStringSubmatch(help, -1) {
		known[m[1]] = true
	}
	if d := cmp.Diff(map[string]bool{"advertise-addr": true, "join": true, "sync-networks": true}, known); d != "" {
		t.Errorf("flags (-want +got):\n%s", d)
	}
}

func TestClaimsTarget(t *testing.T) {
	run := func(create, first float64) ClaimRun {
		return ClaimRun{Ops: []ClaimOp{
			{Op: opCreateNew, Stat: newStat([]float64{create, create})},
			{Op: opRunFirst, Stat: newStat([]float64{first, first})},
		}}
	}
	for _, tc := range []struct {
		cur, base ClaimRun
		met       bool
	}{
		{run(60, 300), run(60, 300), true},
		{run(66, 330), run(60, 300), true},
		{run(67, 300), run(60, 300), false},
		{run(60, 331), run(60, 300), false},
	} {
		c := Claims{Current: tc.cur, Baseline: &tc.base}
		if got := c.target(); got.Met != tc.met || got.NA {
			t.Errorf("%v vs %v: %+v, want met %v", tc.cur.Ops, tc.base.Ops, got, tc.met)
		}
	}
	c := Claims{Current: run(60, 300), BaselineSkipped: "shallow clone"}
	if got := c.target(); got.Met || !got.NA || !strings.Contains(got.Measured, "shallow clone") {
		t.Errorf("without a baseline: %+v", got)
	}
}
