// Package vm runs test binaries inside a QEMU virtual machine that boots
// Debian's stock kernel, so that kernel features the machine running the
// tests lacks (kernel WireGuard, above all) are tested all the same.
//
// No disk image is built. The guest's root file system is the host's own,
// shared read-only over 9p (virtio-9p), so the test binaries, their tools
// (ip, ping, iperf3, busybox) and their libraries are the host's, run
// unchanged. The guest gets /run, /dev/shm and /tmp of its own in memory
// (/tmp as an overlay on the host's), and never writes to the host. The
// initramfs holds only this package's guest side (as /init), a static
// busybox (as the kernel's modprobe), the modules needed at boot and the
// plan of what to run.
//
// QEMU runs without KVM where there is none (software emulation, TCG):
// expect a guest a few times slower than the host. The guest reports
// through QEMU's isa-debug-exit device; the host trusts a run only if the
// console shows every step start and end and the exit status agrees.
package vm

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Config configures a run.
type Config struct {
	// CacheDir holds fetched kernels; DefaultCacheDir if empty.
	CacheDir string
	// Steps run in order; each is a program on the host's file system.
	Steps []Step
	// Env is added to every step's environment.
	Env []string
	// Memory in MiB and CPUs of the guest.
	MemoryMiB, CPUs int
	// CPU is QEMU's -cpu model. Under emulation qemu64 is 2-3 times as
	// fast as max: it has no AVX to emulate.
	CPU string
	// Accel is QEMU's accelerator: tcg (software emulation, the default),
	// or kvm where /dev/kvm runs ordinary guests.
	Accel string
	// Timeout bounds the whole run, fetching the kernel included; QEMU is
	// killed when it passes.
	Timeout time.Duration
	// Console receives the guest's console output as it comes (nil:
	// discarded); so does LogFile, if set, in full.
	Console io.Writer
	LogFile string
	// Log receives the harness's own progress lines (nil: discarded).
	Log io.Writer
	// Busybox is a static busybox; found on PATH if empty.
	Busybox string
	// Init is the static binary the guest runs as /init: the running
	// executable if empty. It must call GuestMain when IsGuest.
	Init string
}

// DefaultConfig is a guest of 2 CPUs and 3 GiB, with the run bounded to
// 30 minutes.
func DefaultConfig() Config {
	return Config{MemoryMiB: 3072, CPUs: 2, CPU: "qemu64", Accel: "tcg", Timeout: 30 * time.Minute}
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if len(c.Steps) == 0 {
		return errors.New("nothing to run")
	}
	if c.MemoryMiB < 256 || c.CPUs < 1 || c.Timeout <= 0 {
		return fmt.Errorf("memory %d MiB, %d CPUs, timeout %s: want at least 256 MiB, 1 CPU and a timeout", c.MemoryMiB, c.CPUs, c.Timeout)
	}
	names := map[string]bool{}
	for i, s := range c.Steps {
		if s.Name == "" || strings.ContainsAny(s.Name, " \t\n") {
			return fmt.Errorf("step %d: name %q must be one word", i+1, s.Name)
		}
		if names[s.Name] {
			return fmt.Errorf("step %d: name %s used twice", i+1, s.Name)
		}
		names[s.Name] = true
		if !filepath.IsAbs(s.Path) || (s.Dir != "" && !filepath.IsAbs(s.Dir)) {
			return fmt.Errorf("step %s: paths must be absolute", s.Name)
		}
		for _, hidden := range []string{"/run", "/proc", "/sys", "/dev"} {
			if s.Path == hidden || strings.HasPrefix(s.Path, hidden+"/") {
				return fmt.Errorf("step %s: %s is under %s, which the guest has its own of", s.Name, s.Path, hidden)
			}
		}
		st, err := os.Stat(s.Path)
		if err != nil {
			return fmt.Errorf("step %s: %w", s.Name, err)
		}
		if st.Mode()&0o111 == 0 {
			return fmt.Errorf("step %s: %s is not executable", s.Name, s.Path)
		}
	}
	for _, e := range c.Env {
		if !strings.Contains(e, "=") {
			return fmt.Errorf("environment entry %q is not NAME=VALUE", e)
		}
	}
	return nil
}

// Run boots the VM, runs the steps and returns what happened. The error
// is nil only if the VM ran every step to its end and reported it
// properly; the steps' own success is in Result.Passed.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	ctx, cancel := context.WithTimeoutCause(ctx, cfg.Timeout, fmt.Errorf("timed out after %s", cfg.Timeout))
	defer cancel()
	if cfg.Console == nil {
		cfg.Console = io.Discard
	}
	if cfg.CacheDir == "" {
		var err error
		if cfg.CacheDir, err = DefaultCacheDir(); err != nil {
			return nil, err
		}
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, fmt.Errorf("qemu-system-x86_64 not found (Debian package qemu-system-x86; make deps installs it): %w", err)
	}
	if cfg.Busybox == "" {
		if cfg.Busybox, err = exec.LookPath("busybox"); err != nil {
			return nil, fmt.Errorf("busybox not found (Debian package busybox-static): %w", err)
		}
	}
	if cfg.Init == "" {
		if cfg.Init, err = os.Executable(); err != nil {
			return nil, err
		}
	}

	t0 := time.Now()
	k, err := EnsureKernel(ctx, cfg.CacheDir, cfg.Log)
	if err != nil {
		return nil, fmt.Errorf("getting the kernel: %w", err)
	}
	mods, err := moduleOrder(ctx, k, bootModules)
	if err != nil {
		return nil, err
	}
	tok := make([]byte, 8)
	_, _ = rand.Read(tok)
	plan := &Plan{Token: hex.EncodeToString(tok), Release: k.Release, Modules: mods, ModulesDir: k.ModulesDir, Env: cfg.Env, Steps: cfg.Steps}
	work, err := os.MkdirTemp(cfg.CacheDir, "run-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	initrd := filepath.Join(work, "initramfs.cpio")
	f, err := os.Create(initrd)
	if err != nil {
		return nil, err
	}
	err = writeInitramfs(f, cfg.Init, cfg.Busybox, k, plan)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("building the initramfs: %w", err)
	}
	fmt.Fprintf(cfg.Log, "vm: kernel %s (%s %s), initramfs with %d modules, ready after %s\n",
		k.Release, k.Package, k.Version, len(mods), time.Since(t0).Round(time.Millisecond))
	return boot(ctx, cfg, qemu, k, initrd, plan)
}

// kernelArgs is the guest's kernel command line.
func kernelArgs() string {
	return strings.Join([]string{
		"console=ttyS0", "loglevel=4",
		// A panic or oops ends the VM at once instead of hanging until
		// the timeout: -no-reboot turns the reboot into QEMU's exit.
		"panic=-1", "oops=panic",
		// Under emulation every mitigation is pure cost, and zeroing
		// every allocated page too.
		"mitigations=off", "init_on_alloc=0",
		// The emulated TSC follows the host's clock; without this the
		// kernel falls back to the HPET, whose every read is emulated.
		"tsc=reliable",
		"rdinit=/init",
	}, " ")
}

// qemuArgs is QEMU's command line.
func qemuArgs(cfg Config, k *Kernel, initrd string) []string {
	return []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-machine", "q35", "-accel", cfg.Accel,
		"-cpu", cfg.CPU, "-smp", strconv.Itoa(cfg.CPUs), "-m", strconv.Itoa(cfg.MemoryMiB),
		"-kernel", k.Vmlinux, "-initrd", initrd, "-append", kernelArgs(),
		"-serial", "stdio",
		"-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
		"-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
		"-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=root",
	}
}

// boot runs QEMU until the guest reports, QEMU ends or the timeout
// passes, and checks what the guest said.
func boot(ctx context.Context, cfg Config, qemu string, k *Kernel, initrd string, plan *Plan) (*Result, error) {
	out := cfg.Console
	if cfg.LogFile != "" {
		lf, err := os.Create(cfg.LogFile)
		if err != nil {
			return nil, err
		}
		defer lf.Close()
		out = io.MultiWriter(cfg.Console, lf)
	}
	cmd := exec.Command(qemu, qemuArgs(cfg, k, initrd)...)
	cmd.Stdin = nil
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	// QEMU dies with us, whatever happens to us.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		pw.Close()
		pr.Close()
		return nil, fmt.Errorf("starting QEMU: %w", err)
	}
	pw.Close()
	pid := cmd.Process.Pid
	fmt.Fprintf(cfg.Log, "vm: QEMU started (pid %d): %d CPUs (%s, %s), %d MiB\n", pid, cfg.CPUs, cfg.CPU, cfg.Accel, cfg.MemoryMiB)

	con := newConsole(plan.Token)
	read := make(chan error, 1)
	go func() {
		defer pr.Close()
		br := bufio.NewReaderSize(pr, 64<<10)
		for {
			line, err := br.ReadString('\n')
			if line != "" {
				_, _ = io.WriteString(out, strings.ReplaceAll(line, "\r", ""))
				con.line(strings.TrimRight(line, "\r\n"), time.Since(start))
			}
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = nil
				}
				read <- err
				return
			}
		}
	}()
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()

	var why error
	select {
	case err := <-waited:
		waited <- err
	case <-ctx.Done():
		why = context.Cause(ctx)
	}
	if why != nil {
		fmt.Fprintf(cfg.Log, "vm: %v: killing QEMU (pid %d)\n", why, pid)
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	werr := <-waited
	<-read
	total := time.Since(start)
	code := cmd.ProcessState.ExitCode()
	res, err := con.verdict(plan, code)
	res.Total = total
	if why != nil {
		return res, fmt.Errorf("the VM %w", why)
	}
	if code < 0 {
		return res, fmt.Errorf("QEMU: %w", werr)
	}
	return res, err
}
