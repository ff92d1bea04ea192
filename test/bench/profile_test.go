package bench

import (
	"os"
	"reflect"
	"testing"
)

func TestParsePerf(t *testing.T) {
	byComm := `# Samples: 1K of event 'cpu-clock'
#
# Overhead  Command          Shared Object
# ........  ...............  ....................
#
    59.90%  wireguard-go     wireguard-go
    34.03%  wireguard-go     [kernel.kallsyms]
     1.89%  iperf3           libc.so.6
`
	want := []ProfileRow{{"wireguard-go wireguard-go", 59.90}, {"wireguard-go [kernel]", 34.03}, {"iperf3 libc.so.6", 1.89}}
	if got := parsePerf(byComm, 2); !reflect.DeepEqual(got, want) {
		t.Errorf("by command: %+v, want %+v", got, want)
	}
	bySym := `# Overhead  Symbol
    20.50%  [.] golang.org/x/crypto/chacha20poly1305.(*chacha20poly1305).sealGeneric
     9.10%  [k] copy_user_enhanced_fast_string
`
	want = []ProfileRow{{"golang.org/x/crypto/chacha20poly1305.(*chacha20poly1305).sealGeneric", 20.5}, {"copy_user_enhanced_fast_string", 9.1}}
	if got := parsePerf(bySym, 1); !reflect.DeepEqual(got, want) {
		t.Errorf("by symbol: %+v, want %+v", got, want)
	}
}

func TestProcCPUCountsThisProcess(t *testing.T) {
	before := procCPU([]int{os.Getpid()})
	x := 0
	for i := range 200_000_000 {
		x += i % 7
	}
	if after := procCPU([]int{os.Getpid()}); after <= before {
		t.Fatalf("CPU time of this process did not grow: %.2f then %.2f (%d)", before, after, x)
	}
	if s := readCPUSplit(); s.User <= 0 || s.System <= 0 {
		t.Fatalf("machine CPU split %+v", s)
	}
}

func TestCountUDP(t *testing.T) {
	out := `18:40:01.1 IP 192.168.77.11.52001 > 192.168.77.12.52002: UDP, length 1372
18:40:01.2 IP 192.168.77.11.52001 > 192.168.77.12.52002: UDP, length 5488
18:40:01.3 IP 192.168.77.11.52001 > 192.168.77.12.52002: UDP, length 1373
18:40:01.4 IP 192.168.77.11.7946 > 192.168.77.12.7946: UDP, length 120
`
	// 1372+28 is exactly the MTU: a single packet; 1373+28 is not.
	u := countUDP(out, 1400)
	if u != (UDPBatches{Seen: 4, Batched: 2, MaxBytes: 5488}) {
		t.Fatalf("got %+v", u)
	}
}
