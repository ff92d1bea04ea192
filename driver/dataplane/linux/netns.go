package linux

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// inNS runs fn on an OS thread switched into ns. The thread is used only
// for fn: if it cannot be switched back it stays locked and the runtime
// discards it, so no other goroutine ever runs in the wrong namespace.
func inNS(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("getting current network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace: %w", err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("leaving network namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// mountNS is where the data plane pins network namespaces: a mount
// namespace given by path (/proc/1/ns/mnt, the host's), or, when path is
// empty, the process's own.
//
// The pins must be made in the host's mount namespace. An agent that
// runs in a mount namespace of its own whose mounts do not propagate to
// the host (systemd makes one for ProtectSystem= or ReadWritePaths=, and
// turns MountFlags=shared into slave for it) would otherwise pin them in
// that namespace only: when the agent stops, the kernel drops its mount
// namespace, with it the last reference to each network namespace, and
// with those every container's veth.
type mountNS struct{ path string }

// hostMountNS returns the mountNS for path, or the process's own when
// path is empty or is the namespace the process already runs in (as with
// a managed plugin, the first process of its own PID namespace).
func hostMountNS(path string) (mountNS, error) {
	if path == "" {
		return mountNS{}, nil
	}
	var host, self unix.Stat_t
	if err := unix.Stat(path, &host); err != nil {
		return mountNS{}, fmt.Errorf("host mount namespace %s: %w (reaching another process's namespaces takes CAP_SYS_PTRACE; "+
			"an agent that runs in the host's mount namespace may be given its own with --host-mount-ns self)", path, err)
	}
	if err := unix.Stat("/proc/self/ns/mnt", &self); err != nil {
		return mountNS{}, fmt.Errorf("own mount namespace: %w", err)
	}
	if host.Dev == self.Dev && host.Ino == self.Ino {
		return mountNS{}, nil
	}
	return mountNS{path: path}, nil
}

// own reports whether m is the process's own mount namespace.
func (m mountNS) own() bool { return m.path == "" }

// do runs fn on an OS thread of its own, switched into the mount
// namespace, and discards the thread afterwards: it stays locked, so the
// runtime ends it rather than run another goroutine in its namespaces.
// fn may change the thread's network namespace too.
//
// setns(CLONE_NEWNS) refuses a thread that shares its filesystem
// attributes (root, working directory) with others, as every thread of a
// Go process does; unshare(CLONE_FS) gives the thread copies of its own.
// It needs CAP_SYS_ADMIN and CAP_SYS_CHROOT.
func (m mountNS) do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		errc <- func() error {
			if m.own() {
				return fn()
			}
			if err := unix.Unshare(unix.CLONE_FS); err != nil {
				return fmt.Errorf("unsharing filesystem attributes: %w", err)
			}
			fd, err := unix.Open(m.path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("opening mount namespace %s: %w", m.path, err)
			}
			defer unix.Close(fd)
			if err := unix.Setns(fd, unix.CLONE_NEWNS); err != nil {
				return fmt.Errorf("entering mount namespace %s: %w", m.path, err)
			}
			return fn()
		}()
	}()
	return <-errc
}

// createNS creates a network namespace and pins it to path with a bind
// mount, so that it outlives this process: containers' veth pairs live
// in it. setup runs inside the new namespace.
func (m mountNS) createNS(path string, setup func() error) (netns.NsHandle, error) {
	ns := netns.None()
	err := m.do(func() error {
		f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
		if err != nil {
			return fmt.Errorf("creating %s: %w", path, err)
		}
		f.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare: %w", err)
		}
		src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(src, path, "none", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("pinning: %w", err)
		}
		if err := setup(); err != nil {
			return err
		}
		ns, err = netns.GetFromPath(path)
		return err
	})
	if err != nil {
		if ns.IsOpen() {
			ns.Close()
		}
		_ = m.removeNS(path)
		return netns.None(), fmt.Errorf("creating network namespace %s: %w", path, err)
	}
	return ns, nil
}

// errNotPinned says a path holds no pinned network namespace.
var errNotPinned = errors.New("no network namespace pinned")

// openNS opens the network namespace pinned at path.
func (m mountNS) openNS(path string) (netns.NsHandle, error) {
	ns := netns.None()
	err := m.do(func() error {
		var st unix.Statfs_t
		if err := unix.Statfs(path, &st); err != nil || st.Type != unix.NSFS_MAGIC {
			return errNotPinned
		}
		var err error
		ns, err = netns.GetFromPath(path)
		return err
	})
	return ns, err
}

// removeNS unpins a namespace. The kernel frees it, and every link in it,
// once nothing else holds it.
func (m mountNS) removeNS(path string) error {
	return m.do(func() error {
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("unmounting %s: %w", path, err)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("removing %s: %w", path, err)
		}
		return nil
	})
}

// ensureSharedMount makes dir a shared mount point, as `ip netns` does for
// /run/netns. A mount namespace created later (a dockerd started after
// us, say) then receives our unmounts too and does not keep deleted
// namespaces alive.
func (m mountNS) ensureSharedMount(dir string) error {
	return m.do(func() error {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		err := unix.Mount("", dir, "none", unix.MS_SHARED|unix.MS_REC, "")
		if errors.Is(err, unix.EINVAL) {
			// Not a mount point yet.
			if err := unix.Mount(dir, dir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
				return fmt.Errorf("bind-mounting %s: %w", dir, err)
			}
			err = unix.Mount("", dir, "none", unix.MS_SHARED|unix.MS_REC, "")
		}
		if err != nil {
			return fmt.Errorf("making %s a shared mount: %w", dir, err)
		}
		return nil
	})
}

// releaseSharedMount undoes ensureSharedMount once dir holds nothing.
func (m mountNS) releaseSharedMount(dir string) error {
	return m.do(func() error {
		entries, err := os.ReadDir(dir)
		if err != nil || len(entries) > 0 {
			return nil
		}
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmounting %s: %w", dir, err)
		}
		return nil
	})
}

// setupNetworkNS prepares a fresh network namespace: loopback up.
// Forwarding is switched on per interface (setRoutingConf).
func setupNetworkNS() error {
	h, err := newHandle()
	if err != nil {
		return err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return err
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("bringing up lo: %w", err)
	}
	return nil
}
