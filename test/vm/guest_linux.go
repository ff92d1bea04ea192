package vm

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The guest side. The host's binary is the VM's /init: as PID 1 it
// mounts what the tests need, then starts itself again chrooted into the
// host's root file system (read-only over 9p) to run the steps, reaps
// every orphan meanwhile, and finally reports the runner's status through
// QEMU's isa-debug-exit port.
//
//	PID 1 (initramfs root)                 runner (own mount namespace,
//	                                               host's root moved to /)
//	 mount /proc /sys /dev, load modules
//	 mount 9p root at /mnt/root,
//	   tmpfs /run, overlay /tmp, ...
//	 READY ─── start ───────────────────▶  for each step: BEGIN, run, END
//	 reap orphans until the runner exits ◀── exit status
//	 DONE, write status to port 0xf4 ───▶ QEMU exits (status<<1)|1

const (
	newRoot = "/mnt/root"
	// runnerArg makes /init the runner; runnerPath is where the runner
	// finds a copy of /init in the new root.
	runnerArg  = "wgmesh-vm-guest-runner"
	runnerPath = "/run/wgmesh-vm/init"
	planEnv    = "WGMESH_VM_PLAN"
	// debugExitPort is where -device isa-debug-exit listens.
	debugExitPort = 0xf4
)

// IsGuest reports whether this process is the VM's init or its runner,
// so that a command can hand over to GuestMain before parsing its flags.
func IsGuest() bool {
	return os.Getpid() == 1 || (len(os.Args) > 1 && os.Args[1] == runnerArg)
}

// GuestMain runs the guest side and never returns.
func GuestMain() {
	if os.Getpid() != 1 {
		os.Exit(runSteps())
	}
	runtime.LockOSThread()
	plan, err := readPlan()
	if err != nil {
		fmt.Printf("\nwgmesh-vm: reading the plan: %v\n", err)
		report("", guestSetupError)
	}
	if err := setupGuest(plan); err != nil {
		fmt.Println()
		fmt.Println(marker(plan.Token, "SETUP-FAILED %v", err))
		report(plan.Token, guestSetupError)
	}
	fmt.Printf("\nwgmesh-vm: guest kernel %s, %d CPUs, clock source %s\n", uname(), runtime.NumCPU(), readTrim("/sys/devices/system/clocksource/clocksource0/current_clocksource"))
	fmt.Println(marker(plan.Token, "READY %s", strings.Fields(readTrim("/proc/uptime") + " 0")[0]))
	report(plan.Token, superviseRunner(plan))
}

func readPlan() (*Plan, error) {
	b, err := os.ReadFile(planPath)
	if err != nil {
		return nil, err
	}
	var p Plan
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, err
	}
	return &p, nil
}

// setupGuest prepares the machine and the root the steps run in.
func setupGuest(plan *Plan) error {
	type mnt struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}
	mountAll := func(ms []mnt) error {
		for _, m := range ms {
			if err := os.MkdirAll(m.dst, 0o755); err != nil && !errors.Is(err, unix.EROFS) {
				return err
			}
			if err := unix.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil {
				return fmt.Errorf("mounting %s on %s: %w", m.fstype, m.dst, err)
			}
		}
		return nil
	}
	if err := mountAll([]mnt{
		{"proc", "/proc", "proc", 0, ""},
		{"sysfs", "/sys", "sysfs", 0, ""},
		{"devtmpfs", "/dev", "devtmpfs", 0, ""},
		{"tmpfs", "/run", "tmpfs", 0, "mode=0755"},
	}); err != nil {
		return err
	}
	for _, m := range plan.Modules {
		if err := loadModule(filepath.Join("/lib/modules", plan.Release, m)); err != nil {
			return err
		}
	}
	// The host's root, read-only, with the page cache on (cache=loose):
	// nothing changes it while the tests run, and binaries load from it
	// once.
	if err := mountAll([]mnt{{"root", newRoot, "9p", unix.MS_RDONLY, "trans=virtio,version=9p2000.L,msize=512000,cache=loose"}}); err != nil {
		return err
	}
	for _, d := range []string{"/run/tmp/upper", "/run/tmp/work"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod("/run/tmp/upper", 0o1777); err != nil {
		return err
	}
	r := func(p string) string { return filepath.Join(newRoot, p) }
	if err := mountAll([]mnt{
		{"proc", r("/proc"), "proc", 0, ""},
		{"sysfs", r("/sys"), "sysfs", 0, ""},
		{"devtmpfs", r("/dev"), "devtmpfs", 0, ""},
		{"devpts", r("/dev/pts"), "devpts", 0, "newinstance,ptmxmode=0666"},
		{"tmpfs", r("/dev/shm"), "tmpfs", 0, "mode=1777"},
		{"tmpfs", r("/run"), "tmpfs", 0, "mode=0755"},
		// /tmp is writable, yet shows what the host has there: a clone
		// of the project under /tmp still finds its binaries.
		{"overlay", r("/tmp"), "overlay", 0, "lowerdir=" + r("/tmp") + ",upperdir=/run/tmp/upper,workdir=/run/tmp/work"},
	}); err != nil {
		return err
	}
	// The runner is a copy of /init that the chroot can reach.
	if err := copyFile("/init", r(runnerPath)); err != nil {
		return err
	}
	// Optional: cgroups are not needed by the tests.
	_ = unix.Mount("cgroup2", r("/sys/fs/cgroup"), "cgroup2", 0, "")
	if plan.ModulesDir != "" {
		// Every module of the kernel, for on-demand loading.
		if err := unix.Mount(r(plan.ModulesDir), filepath.Join("/lib/modules", plan.Release), "", unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("bind-mounting the module tree %s: %w", plan.ModulesDir, err)
		}
	}
	if err := os.WriteFile("/proc/sys/kernel/modprobe", []byte("/sbin/modprobe"), 0o644); err != nil {
		return err
	}
	_ = unix.Sethostname([]byte("wgmesh-vm"))
	lo, err := netlink.LinkByName("lo")
	if err == nil {
		err = netlink.LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("bringing up lo: %w", err)
	}
	return nil
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o755)
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("loading %s: %w", filepath.Base(path), err)
	}
	return nil
}

// superviseRunner starts the runner in the new root and reaps every
// process that ends until the runner has; it returns the runner's status.
func superviseRunner(plan *Plan) int {
	b, _ := json.Marshal(plan)
	path := filepath.Join(newRoot, runnerPath)
	proc, err := os.StartProcess(path, []string{path, runnerArg}, &os.ProcAttr{
		Dir:   "/",
		Env:   []string{planEnv + "=" + string(b)},
		Files: []*os.File{nil, os.Stdout, os.Stderr},
		// The runner switches root in a mount namespace of its own:
		// see enterNewRoot.
		Sys: &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS},
	})
	if err != nil {
		fmt.Println(marker(plan.Token, "SETUP-FAILED starting the runner: %v", err))
		return guestSetupError
	}
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			fmt.Printf("wgmesh-vm: waiting for the runner: %v\n", err)
			return guestFailed
		}
		if pid != proc.Pid {
			continue // an orphan
		}
		if ws.Exited() && ws.ExitStatus() == guestPassed {
			return guestPassed
		}
		if ws.Exited() && ws.ExitStatus() == guestSetupError {
			return guestSetupError
		}
		return guestFailed
	}
}

// report tells the host the guest's status and ends the VM.
func report(token string, status int) {
	if token != "" {
		fmt.Println(marker(token, "DONE %d", status))
	}
	// The console is written asynchronously: wait until the UART has
	// sent everything (tcdrain), or QEMU ends before the host sees it.
	_ = unix.IoctlSetInt(int(os.Stdout.Fd()), unix.TCSBRK, 1)
	if f, err := os.OpenFile("/dev/port", os.O_WRONLY, 0); err == nil {
		_, err = f.WriteAt([]byte{byte(status)}, debugExitPort)
		fmt.Printf("wgmesh-vm: isa-debug-exit did not end the VM: %v\n", err)
	} else {
		fmt.Printf("wgmesh-vm: opening /dev/port: %v\n", err)
	}
	// Without the debug exit device the host sees a power-off, which it
	// counts as a failure.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

// runSteps is the runner: it runs every step of the plan in order, in
// the host's root file system, and exits 0 if all passed.
// enterNewRoot makes the host's root the root of the runner's mount
// namespace, as switch_root does at boot, rather than a chroot inside
// it: a process that enters a mount namespace (setns, as wgmesh does to
// pin network namespaces in the host's) gets that namespace's root, and
// under a chroot its paths would lead back to the initramfs.
func enterNewRoot() error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making mounts private: %w", err)
	}
	if err := unix.Chdir(newRoot); err != nil {
		return err
	}
	if err := unix.Mount(newRoot, "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("moving %s to /: %w", newRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return unix.Chdir("/")
}

func runSteps() int {
	if err := enterNewRoot(); err != nil {
		fmt.Printf("wgmesh-vm runner: entering the new root: %v\n", err)
		return guestSetupError
	}
	var plan Plan
	if err := json.Unmarshal([]byte(os.Getenv(planEnv)), &plan); err != nil {
		fmt.Printf("wgmesh-vm runner: reading the plan: %v\n", err)
		return guestSetupError
	}
	env := append([]string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		// The shared root is read-only; /tmp is not.
		"HOME=/tmp",
		"TMPDIR=/tmp",
	}, plan.Env...)
	status := guestPassed
	for i, s := range plan.Steps {
		fmt.Println()
		fmt.Println(marker(plan.Token, "BEGIN %d %s", i+1, s.Name))
		cmd := exec.Command(s.Path, s.Args...)
		cmd.Dir = cmp.Or(s.Dir, "/")
		cmd.Env = env
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		start := time.Now()
		err := cmd.Run()
		code := 0
		if err != nil {
			code = -1
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				code = ee.ExitCode()
			} else {
				fmt.Printf("wgmesh-vm runner: %s: %v\n", s.Name, err)
			}
		}
		if code != 0 {
			status = guestFailed
		}
		took := time.Since(start)
		killLeftovers(s.Name)
		fmt.Println()
		fmt.Println(marker(plan.Token, "END %d %s %d %.1f", i+1, s.Name, code, took.Seconds()))
	}
	return status
}

// killLeftovers ends processes a step left behind (other than init and
// this runner), naming them: a step's processes must end with it.
func killLeftovers(step string) {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == 1 || pid == os.Getpid() {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if len(cmdline) == 0 {
			continue // a kernel thread
		}
		fmt.Printf("wgmesh-vm runner: %s left process %d running: %s\n", step, pid, strings.ReplaceAll(strings.TrimRight(string(cmdline), "\x00"), "\x00", " "))
		_ = unix.Kill(pid, unix.SIGKILL)
	}
}

func uname() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return "?"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func readTrim(p string) string {
	b, _ := os.ReadFile(p)
	return strings.TrimSpace(string(b))
}
