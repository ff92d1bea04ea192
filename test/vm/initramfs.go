package vm

import (
	"bufio"
	"cmp"
	"context"
	"debug/elf"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

// cpioWriter writes the "newc" cpio format the kernel unpacks as
// initramfs.
type cpioWriter struct {
	w   *bufio.Writer
	ino int
	err error
}

func newCPIOWriter(w io.Writer) *cpioWriter { return &cpioWriter{w: bufio.NewWriter(w), ino: 1} }

// Mode bits of cpio entries (as in stat(2)).
const (
	cpioDir     = 0o040000
	cpioFile    = 0o100000
	cpioSymlink = 0o120000
	cpioCharDev = 0o020000
)

func (c *cpioWriter) header(name string, mode, size, rdevMajor, rdevMinor int) {
	if c.err != nil {
		return
	}
	nlink := 1
	if mode&0o170000 == cpioDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	c.ino++
	_, c.err = c.w.WriteString(hdr + name + "\x00")
	c.pad(len(hdr) + len(name) + 1)
}

func (c *cpioWriter) pad(n int) {
	if c.err == nil && n%4 != 0 {
		_, c.err = c.w.Write(make([]byte, 4-n%4))
	}
}

// Dir adds a directory; parents must come first.
func (c *cpioWriter) Dir(name string) { c.header(name, cpioDir|0o755, 0, 0, 0) }

// File adds a file with the given content.
func (c *cpioWriter) File(name string, perm int, data []byte) {
	c.header(name, cpioFile|perm, len(data), 0, 0)
	if c.err == nil {
		_, c.err = c.w.Write(data)
	}
	c.pad(len(data))
}

// Symlink adds a symbolic link.
func (c *cpioWriter) Symlink(name, target string) {
	c.header(name, cpioSymlink|0o777, len(target), 0, 0)
	if c.err == nil {
		_, c.err = c.w.WriteString(target)
	}
	c.pad(len(target))
}

// CharDev adds a character device node.
func (c *cpioWriter) CharDev(name string, perm, major, minor int) {
	c.header(name, cpioCharDev|perm, 0, major, minor)
}

// Close writes the trailer and flushes.
func (c *cpioWriter) Close() error {
	c.header("TRAILER!!!", 0, 0, 0, 0)
	if c.err != nil {
		return c.err
	}
	return c.w.Flush()
}

// bootModules are loaded at boot: virtio-9p for the shared root, overlay
// for a writable /tmp over the host's, and what wgmesh and its tests use.
// The kernel loads anything else on demand (through busybox modprobe).
var bootModules = []string{
	"virtio_pci", "9pnet_virtio", "9p", "overlay",
	"wireguard", "veth", "tun", "bridge", "xfrm_user", "nfnetlink",
}

// moduleOrder resolves modules and their dependencies against a module
// tree with modprobe --show-depends, and returns the files to load, in
// order, relative to the tree. Built-in modules need no file.
func moduleOrder(ctx context.Context, k *Kernel, names []string) ([]string, error) {
	base := filepath.Dir(filepath.Dir(filepath.Dir(k.ModulesDir))) // above lib/modules/RELEASE
	args := append([]string{"-d", base, "-S", k.Release, "--show-depends", "-a"}, names...)
	out, err := exec.CommandContext(ctx, sbin("modprobe"), args...).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("modprobe --show-depends: %w\n%s", err, out)
	}
	return parseShowDepends(string(out), k.ModulesDir)
}

// parseShowDepends reads modprobe --show-depends output: "insmod PATH
// [params]" and "builtin NAME" lines. Files come out once each, first
// occurrence first, relative to dir.
func parseShowDepends(out, dir string) ([]string, error) {
	var files []string
	seen := map[string]bool{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] == "builtin" {
			continue
		}
		if f[0] != "insmod" || len(f) < 2 {
			return nil, fmt.Errorf("unexpected modprobe output %q", line)
		}
		rel, err := filepath.Rel(dir, f[1])
		if err != nil || strings.HasPrefix(rel, "..") {
			return nil, fmt.Errorf("module %s is outside %s", f[1], dir)
		}
		if !seen[rel] {
			seen[rel] = true
			files = append(files, rel)
		}
	}
	return files, nil
}

// isStatic reports whether an executable needs no dynamic loader: the
// initramfs has none.
func isStatic(p string) error {
	f, err := elf.Open(p)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked; the initramfs needs a static binary", p)
		}
	}
	return nil
}

// writeInitramfs writes the initramfs to w: init (the guest side of this
// package, a static binary), a static busybox as /sbin/modprobe for the
// kernel's on-demand module loading, the boot modules, and the plan.
func writeInitramfs(w io.Writer, initBin, busybox string, k *Kernel, plan *Plan) error {
	for _, p := range []string{initBin, busybox} {
		if err := isStatic(p); err != nil {
			return err
		}
	}
	c := newCPIOWriter(w)
	for _, d := range []string{"bin", "sbin", "dev", "proc", "sys", "mnt", "mnt/root", "run", "wgmesh-vm", "lib", "lib/modules"} {
		c.Dir(d)
	}
	c.CharDev("dev/console", 0o600, 5, 1)
	c.CharDev("dev/null", 0o666, 1, 3)
	for _, f := range []struct{ src, dst string }{{initBin, "init"}, {busybox, strings.TrimPrefix(busyboxPath, "/")}} {
		data, err := os.ReadFile(f.src)
		if err != nil {
			return err
		}
		c.File(f.dst, 0o755, data)
	}
	c.Symlink("sbin/modprobe", busyboxPath)
	modRoot := path.Join("lib/modules", k.Release)
	dirs := map[string]bool{modRoot: true}
	c.Dir(modRoot)
	for _, m := range plan.Modules {
		for d := path.Dir(path.Join(modRoot, m)); !dirs[d]; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	// Parents before children: sorted by depth, then name.
	var ds []string
	for d := range dirs {
		if d != modRoot {
			ds = append(ds, d)
		}
	}
	slices.SortFunc(ds, func(a, b string) int {
		return cmp.Or(cmp.Compare(strings.Count(a, "/"), strings.Count(b, "/")), cmp.Compare(a, b))
	})
	for _, d := range ds {
		c.Dir(d)
	}
	for _, m := range plan.Modules {
		data, err := os.ReadFile(filepath.Join(k.ModulesDir, m))
		if err != nil {
			return err
		}
		c.File(path.Join(modRoot, m), 0o644, data)
	}
	for _, idx := range []string{"modules.dep", "modules.alias", "modules.symbols", "modules.builtin", "modules.order"} {
		data, err := os.ReadFile(filepath.Join(k.ModulesDir, idx))
		if err != nil {
			return err
		}
		c.File(path.Join(modRoot, idx), 0o644, data)
	}
	p, err := json.MarshalIndent(plan, "", "  ")
	if err != nil {
		return err
	}
	c.File(strings.TrimPrefix(planPath, "/"), 0o644, p)
	return c.Close()
}
