package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/vm"
)

// The machine has no WireGuard module, so kernel WireGuard is measured in
// a VM with Debian's kernel (package test/vm): emulated, without KVM, so
// its figures say what the kernel path does relative to the VM's own
// underlay, not how it compares with the cases measured on the machine.

// VMCaseName is the data-plane case measured inside the VM.
const VMCaseName = "kernel WireGuard (VM, emulated)"

// GuestCommand is the subcommand of wgmesh-lab that runs the benchmark's
// part inside the VM; vmResultPrefix starts the line it reports on.
const (
	GuestCommand   = "bench-vm-guest"
	vmResultPrefix = "WGMESH-BENCH-VM "
)

// vmDataPlane boots the VM, measures kernel WireGuard and the raw
// underlay there with the same code as the other cases, and returns the
// kernel case. self is the wgmesh-lab binary: static, it is also the
// guest's init.
func (b *Bench) vmDataPlane(ctx context.Context) (CaseResult, error) {
	r := CaseResult{Name: VMCaseName, Emulated: true}
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		r.Skipped = "no qemu-system-x86_64 here (make deps installs it)"
		return r, nil
	}
	self, err := os.Executable()
	if err != nil {
		return r, err
	}
	binary, err := filepath.Abs(b.cfg.Binary)
	if err != nil {
		return r, err
	}
	cfg := vm.DefaultConfig()
	cfg.Steps = []vm.Step{{Name: "bench", Path: self, Args: []string{GuestCommand,
		"-binary", binary, "-runs", strconv.Itoa(b.cfg.Runs), "-duration", b.cfg.Duration.String(), "-pings", strconv.Itoa(b.cfg.Pings)}}}
	cfg.Timeout = 5*time.Minute + time.Duration(b.cfg.Runs)*(2*b.cfg.Duration+time.Duration(b.cfg.Pings)*20*time.Millisecond+30*time.Second)
	var console bytes.Buffer
	cfg.Console = io.MultiWriter(&console, b.cfg.Log)
	cfg.Log = b.cfg.Log
	res, err := vm.Run(ctx, cfg)
	if err != nil {
		return r, err
	}
	if !res.Passed() {
		return r, errors.New("the benchmark inside the VM failed (its console output is above)")
	}
	var guest vmReport
	sc := bufio.NewScanner(&console)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if _, js, ok := strings.Cut(sc.Text(), vmResultPrefix); ok {
			if err := json.Unmarshal([]byte(js), &guest); err != nil {
				return r, fmt.Errorf("reading the VM's results: %w", err)
			}
		}
	}
	var kernel, underlay *CaseResult
	for i := range guest.Cases {
		switch guest.Cases[i].Name {
		case "kernel WireGuard":
			kernel = &guest.Cases[i]
		case "raw underlay":
			underlay = &guest.Cases[i]
		}
	}
	if kernel == nil || underlay == nil || len(kernel.Runs) == 0 || len(underlay.Runs) == 0 {
		return r, fmt.Errorf("the VM reported no kernel WireGuard and underlay results: %+v", guest)
	}
	r.Runs = kernel.Runs
	r.summarize()
	r.Note = fmt.Sprintf("emulated (qemu without KVM): the kernel module between two hosts in a VM (%s: Debian's kernel, QEMU CPU model %s, booted in %.1f s), "+
		"configured with wg(8), MTU 1340. The same VM's raw underlay: %.2f / %.2f Gbit/s, ping %.3f ms, so kernel WireGuard there ran at %.0f %% / %.0f %% of it. "+
		"Emulation makes everything in the VM many times slower: compare with that underlay, not with the cases above",
		guest.Machine, cfg.CPU, res.Boot.Seconds(), underlay.TCP1Gbps, underlay.TCP4Gbps, underlay.PingAvgMs,
		r.TCP1Gbps/underlay.TCP1Gbps*100, r.TCP4Gbps/underlay.TCP4Gbps*100)
	return r, nil
}

// vmReport is what the guest reports.
type vmReport struct {
	Machine string       `json:"machine"`
	Cases   []CaseResult `json:"cases"`
}

// GuestDataPlane is the benchmark's part inside the VM: two lab hosts
// without Docker or agents, the raw underlay and kernel WireGuard between
// them, measured like the cases outside; the results go to stdout as one
// line.
func GuestDataPlane(ctx context.Context, cfg Config) error {
	b := New(cfg)
	l, err := lab.New(ctx, lab.Config{Hosts: 2, Binary: cfg.Binary, Log: cfg.Log})
	if err != nil {
		return err
	}
	defer l.Close()
	h1, h2 := l.Hosts[0], l.Hosts[1]
	cases := []*dataCase{{name: "raw underlay", client: h1.Exec, server: h2.Exec, serverIP: h2.Addr.String()}}
	kwg, err := setupKernelWG(ctx, h1, h2)
	if kwg.stop != nil {
		defer kwg.stop()
	}
	if err != nil {
		return err
	}
	if kwg.skip != "" {
		return fmt.Errorf("kernel WireGuard in the VM: %s", kwg.skip)
	}
	cases = append(cases, kwg)
	results, err := b.measureCases(ctx, cases, nil)
	if err != nil {
		return err
	}
	js, err := json.Marshal(vmReport{Machine: machine(), Cases: results})
	if err != nil {
		return err
	}
	fmt.Printf("\n%s%s\n", vmResultPrefix, js)
	return nil
}
