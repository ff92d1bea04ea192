// Package netnstest runs tests that need root inside network namespaces
// of their own, so that nothing they create can touch the machine's
// network.
//
// Main re-executes the test binary in a new network and mount namespace:
// every thread of the process is then isolated, including the ones Go or
// wireguard-go start on their own, which switching a single locked thread
// would not cover, and every mount the tests make vanishes with the
// process even if it crashes.
package netnstest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

const envIsolated = "WGMESH_TEST_ISOLATED"

// Main runs m isolated when the process is root; otherwise the tests run
// as they are and the ones that need root skip. Use it from TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(netnstest.Main(m)) }
func Main(m *testing.M) int {
	if os.Geteuid() != 0 {
		return m.Run()
	}
	if os.Getenv(envIsolated) == "1" {
		if err := setupIsolated(); err != nil {
			fmt.Fprintln(os.Stderr, "netnstest:", err)
			return 1
		}
		code := m.Run()
		// Closing everything must stop every goroutine, wireguard-go's
		// included.
		if err := goleak.Find(); code == 0 && err != nil {
			fmt.Fprintln(os.Stderr, "netnstest: goroutines leaked:", err)
			return 1
		}
		return code
	}
	cmd := exec.Command("/proc/self/exe", os.Args[1:]...)
	cmd.Env = append(os.Environ(), envIsolated+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: unix.CLONE_NEWNET | unix.CLONE_NEWNS,
		Pdeathsig:  syscall.SIGKILL,
	}
	if err := cmd.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		fmt.Fprintln(os.Stderr, "netnstest: re-running tests isolated:", err)
		return 1
	}
	return 0
}

// setupIsolated makes the new mount namespace private (mounts made here
// stay here) and brings up loopback in the new network namespace.
func setupIsolated() error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making mounts private: %w", err)
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(lo)
}

// SkipUnlessRoot skips a test that needs root; under Main, a root test
// always runs isolated.
func SkipUnlessRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if os.Getenv(envIsolated) != "1" {
		t.Fatal("root test not isolated: call netnstest.Main from TestMain")
	}
}

// EnvRequireKernelWG, set to 1, turns SkipUnlessKernelWireGuard's skip
// into a failure: where kernel WireGuard must exist (the VM of make
// vmtest), a test that silently skipped would prove nothing.
const EnvRequireKernelWG = "WGMESH_REQUIRE_KERNEL_WG"

// SkipUnlessKernelWireGuard skips a test unless this kernel can create
// WireGuard links, or fails it if EnvRequireKernelWG is 1. Call it after
// SkipUnlessRoot.
func SkipUnlessKernelWireGuard(t testing.TB) {
	t.Helper()
	probe := &netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: "wgprobe0"}}
	err := netlink.LinkAdd(probe)
	if err == nil {
		_ = netlink.LinkDel(probe)
		return
	}
	if os.Getenv(EnvRequireKernelWG) == "1" {
		t.Fatalf("no kernel WireGuard here, but %s=1 requires it: %v", EnvRequireKernelWG, err)
	}
	t.Skipf("no kernel WireGuard here: %v", err)
}

// NS is a named network namespace for a test: a bind mount in the test's
// temporary directory that nsenter can enter.
type NS struct {
	Path   string
	Handle netns.NsHandle
	NL     *netlink.Handle
}

// NewNS creates a network namespace with loopback up, removed when the
// test ends.
func NewNS(t testing.TB, name string) *NS {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		// A throwaway locked thread: it is unshared into the new
		// namespace and never unlocked, so the runtime discards it.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- unix.Mount(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), path, "none", unix.MS_BIND, "")
	}()
	if err := <-errc; err != nil {
		t.Fatalf("creating namespace %s: %v", name, err)
	}
	h, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	// Routing only: the other families need modules a minimal kernel
	// may not have loaded.
	nl, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE)
	if err != nil {
		t.Fatal(err)
	}
	ns := &NS{Path: path, Handle: h, NL: nl}
	t.Cleanup(func() {
		nl.Close()
		h.Close()
		_ = unix.Unmount(path, unix.MNT_DETACH)
	})
	lo, err := nl.LinkByName("lo")
	if err == nil {
		err = nl.LinkSetUp(lo)
	}
	if err != nil {
		t.Fatalf("loopback up in %s: %v", name, err)
	}
	return ns
}

// Exec runs a command inside the namespace and returns its combined output.
func (ns *NS) Exec(ctx context.Context, name string, args ...string) (string, error) {
	return Exec(ctx, ns.Path, name, args...)
}

// Exec runs a command inside the network namespace at nsPath.
func Exec(ctx context.Context, nsPath, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + nsPath, "--", name}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s %v in %s: %w\n%s", name, args, filepath.Base(nsPath), err, out.String())
	}
	return out.String(), nil
}

// Ping sends count pings from the namespace and fails the test unless all
// are answered.
func (ns *NS) Ping(t testing.TB, dst string, extra ...string) {
	t.Helper()
	args := append([]string{"ping", "-c", "3", "-W", "2"}, extra...)
	if out, err := ns.Exec(context.Background(), "busybox", append(args, dst)...); err != nil {
		t.Fatalf("ping %s from %s: %v", dst, filepath.Base(ns.Path), err)
	} else if !bytes.Contains([]byte(out), []byte(" 0% packet loss")) {
		t.Fatalf("ping %s from %s lost packets:\n%s", dst, filepath.Base(ns.Path), out)
	}
}

// NoPing fails the test if a ping from the namespace gets through.
func (ns *NS) NoPing(t testing.TB, dst string) {
	t.Helper()
	if out, err := ns.Exec(context.Background(), "busybox", "ping", "-c", "2", "-W", "1", dst); err == nil {
		t.Fatalf("ping %s from %s got through but must not:\n%s", dst, filepath.Base(ns.Path), out)
	}
}
