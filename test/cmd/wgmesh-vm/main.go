// Command wgmesh-vm runs test binaries inside a QEMU virtual machine with
// Debian's stock kernel, for what the machine's own kernel lacks (kernel
// WireGuard). See package test/vm.
//
//	wgmesh-vm [flags] [--] [-C DIR] BINARY [ARG...] [--- [-C DIR] BINARY [ARG...]]...
//
// Each BINARY runs in the guest, in order, in DIR (default /), with the
// host's file system as its root ("--" ends the flags before a first
// step that starts with -C). Build it with CGO_ENABLED=0: the same
// binary is the guest's /init. It exits with the first failing step's
// status, 0 if every step passed, and 125 if the VM itself failed (no
// kernel, no QEMU, a guest that never reported, a timeout).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/wgmesh/wgmesh/test/vm"
)

// vmFailed is the exit status when the VM, not a step, failed.
const vmFailed = 125

type envFlag []string

func (e *envFlag) String() string     { return strings.Join(*e, " ") }
func (e *envFlag) Set(v string) error { *e = append(*e, v); return nil }

func main() {
	if vm.IsGuest() {
		vm.GuestMain()
	}
	os.Exit(run())
}

func run() int {
	cfg := vm.DefaultConfig()
	fs := flag.NewFlagSet("wgmesh-vm", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: wgmesh-vm [flags] [--] [-C DIR] BINARY [ARG...] [--- [-C DIR] BINARY [ARG...]]...")
		fs.PrintDefaults()
	}
	var env envFlag
	fs.Var(&env, "env", "NAME=VALUE added to every step's environment (repeatable)")
	fs.DurationVar(&cfg.Timeout, "timeout", cfg.Timeout, "bound on the whole run; QEMU is killed when it passes")
	fs.IntVar(&cfg.MemoryMiB, "memory", cfg.MemoryMiB, "guest memory in MiB")
	fs.IntVar(&cfg.CPUs, "cpus", cfg.CPUs, "guest CPUs")
	fs.StringVar(&cfg.CPU, "cpu", cfg.CPU, "QEMU CPU model")
	fs.StringVar(&cfg.Accel, "accel", envOr("WGMESH_VM_ACCEL", cfg.Accel), "QEMU accelerator: tcg (emulation) or kvm ($WGMESH_VM_ACCEL)")
	fs.StringVar(&cfg.CacheDir, "cache", "", "kernel cache (default $WGMESH_VM_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/wgmesh/vm)")
	fs.StringVar(&cfg.LogFile, "log", "", "also write the guest's console output to this file")
	quiet := fs.Bool("quiet", false, "do not stream the guest's console output")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return 2
	}
	steps, err := parseSteps(fs.Args())
	if err != nil {
		fmt.Fprintln(os.Stderr, "wgmesh-vm:", err)
		fs.Usage()
		return 2
	}
	cfg.Steps, cfg.Env = steps, env
	cfg.Log = os.Stderr
	if !*quiet {
		cfg.Console = os.Stdout
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	res, err := vm.Run(ctx, cfg)
	if res != nil {
		summary(res)
	}
	if err != nil {
		fmt.Printf("wgmesh-vm: FAILED: %v\n", err)
		return vmFailed
	}
	for _, s := range res.Steps {
		if s.Status != 0 {
			return max(1, min(s.Status, 124))
		}
	}
	fmt.Println("wgmesh-vm: all steps passed")
	return 0
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// parseSteps splits the arguments on "---" into steps.
func parseSteps(args []string) ([]vm.Step, error) {
	var steps []vm.Step
	var cur []string
	flush := func() error {
		if len(cur) == 0 {
			return errors.New("empty step")
		}
		var s vm.Step
		if cur[0] == "-C" {
			if len(cur) < 3 {
				return errors.New("-C needs a directory and a binary after it")
			}
			dir, err := filepath.Abs(cur[1])
			if err != nil {
				return err
			}
			s.Dir, cur = dir, cur[2:]
		}
		p, err := filepath.Abs(cur[0])
		if err != nil {
			return err
		}
		s.Path, s.Args = p, cur[1:]
		s.Name = filepath.Base(p)
		for _, o := range steps {
			if o.Name == s.Name {
				s.Name += "#" + strconv.Itoa(len(steps)+1)
			}
		}
		steps = append(steps, s)
		cur = nil
		return nil
	}
	for _, a := range args {
		if a == "---" {
			if err := flush(); err != nil {
				return nil, err
			}
			continue
		}
		cur = append(cur, a)
	}
	if err := flush(); err != nil {
		return nil, err
	}
	return steps, nil
}

func summary(r *vm.Result) {
	fmt.Println()
	if r.Boot > 0 {
		fmt.Printf("wgmesh-vm: booted in %s (guest kernel uptime %s when ready)\n", r.Boot.Round(10*time.Millisecond), r.GuestUptime.Round(10*time.Millisecond))
	}
	for _, s := range r.Steps {
		verdict := "PASS"
		if s.Status != 0 {
			verdict = fmt.Sprintf("FAIL (exit status %d)", s.Status)
		}
		fmt.Printf("wgmesh-vm: %-4s %s in %s\n", verdict, s.Name, s.Took.Round(100*time.Millisecond))
	}
	fmt.Printf("wgmesh-vm: VM ran for %s\n", r.Total.Round(100*time.Millisecond))
}
