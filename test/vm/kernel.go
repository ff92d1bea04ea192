package vm

import (
	"bufio"
	"bytes"
	"cmp"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// MetaPackage is the Debian package whose dependency is the current
// kernel image.
const MetaPackage = "linux-image-amd64"

// Kernel is a Debian kernel unpacked in the cache.
type Kernel struct {
	// Package is the image package and its version, e.g.
	// linux-image-6.1.0-57-amd64 6.1.192-3.
	Package, Version string
	// Release is what uname -r says, e.g. 6.1.0-57-amd64.
	Release string
	// Vmlinux is the uncompressed ELF kernel, which QEMU boots directly
	// through its PVH entry point (no decompression in the emulated CPU).
	Vmlinux string
	// ModulesDir is lib/modules/RELEASE, with depmod's indexes.
	ModulesDir string
}

// DefaultCacheDir is ${XDG_CACHE_HOME:-$HOME/.cache}/wgmesh/vm, or
// $WGMESH_VM_CACHE if set.
func DefaultCacheDir() (string, error) {
	if d := os.Getenv("WGMESH_VM_CACHE"); d != "" {
		return d, nil
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("no cache directory: set WGMESH_VM_CACHE: %w", err)
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "wgmesh", "vm"), nil
}

// EnsureKernel returns the current Debian kernel from the cache, and
// fetches and unpacks it first if it is not there. It asks apt which
// package is current (a local look-up), downloads it with apt-get
// download (running apt-get update only when that fails), unpacks it
// with dpkg-deb without installing it, indexes its modules with depmod
// and extracts the ELF kernel from the bzImage.
func EnsureKernel(ctx context.Context, cacheDir string, log io.Writer) (*Kernel, error) {
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, err
	}
	// One fetch at a time: concurrent runs wait for each other here.
	lock, err := os.OpenFile(filepath.Join(cacheDir, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return nil, fmt.Errorf("locking %s: %w", cacheDir, err)
	}

	pkg, version, err := candidate(ctx)
	if err != nil {
		// No package index at all: a kernel fetched before still serves.
		if k, cerr := newestCached(cacheDir); cerr == nil {
			fmt.Fprintf(log, "vm: %v; using the cached %s %s\n", err, k.Package, k.Version)
			return k, nil
		}
		fmt.Fprintf(log, "vm: %v; running apt-get update\n", err)
		if uerr := aptUpdate(ctx); uerr != nil {
			return nil, uerr
		}
		if pkg, version, err = candidate(ctx); err != nil {
			return nil, err
		}
	}
	if k, err := loadCached(filepath.Join(cacheDir, "kernels", pkg+"_"+version)); err == nil {
		return k, nil
	}
	fmt.Fprintf(log, "vm: fetching %s %s\n", pkg, version)
	work, err := os.MkdirTemp(cacheDir, "fetch-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	deb, err := download(ctx, work, pkg, version)
	if err != nil {
		fmt.Fprintf(log, "vm: %v; running apt-get update and trying again\n", err)
		if uerr := aptUpdate(ctx); uerr != nil {
			return nil, errors.Join(err, uerr)
		}
		// The update may have brought a newer kernel.
		if pkg, version, err = candidate(ctx); err != nil {
			return nil, err
		}
		if k, err := loadCached(filepath.Join(cacheDir, "kernels", pkg+"_"+version)); err == nil {
			return k, nil
		}
		if deb, err = download(ctx, work, pkg, version); err != nil {
			return nil, err
		}
	}
	return unpack(ctx, cacheDir, work, deb, pkg, version, log)
}

var dependsRE = regexp.MustCompile(`(?m)^Depends:.*?\b(linux-image-[0-9][^ ,()]*)\s*\(= ([^)]+)\)`)

// candidate asks apt which kernel image package linux-image-amd64
// currently depends on.
func candidate(ctx context.Context) (pkg, version string, err error) {
	out, err := exec.CommandContext(ctx, "apt-cache", "show", "--no-all-versions", MetaPackage).Output()
	if err != nil {
		return "", "", fmt.Errorf("apt-cache show %s: %w", MetaPackage, err)
	}
	m := dependsRE.FindSubmatch(out)
	if m == nil {
		return "", "", fmt.Errorf("apt-cache show %s names no kernel image package", MetaPackage)
	}
	return string(m[1]), string(m[2]), nil
}

func aptUpdate(ctx context.Context) error {
	cmd := exec.CommandContext(ctx, "apt-get", "update", "-qq")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("apt-get update: %w\n%s", err, out)
	}
	return nil
}

// download fetches the package into dir and returns the file's path.
func download(ctx context.Context, dir, pkg, version string) (string, error) {
	cmd := exec.CommandContext(ctx, "apt-get", "download", "-q", pkg+"="+version)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("apt-get download %s=%s: %w\n%s", pkg, version, err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
	if len(debs) != 1 {
		return "", fmt.Errorf("apt-get download %s left %d packages", pkg, len(debs))
	}
	return debs[0], nil
}

// unpack turns a downloaded kernel package into a cache entry.
func unpack(ctx context.Context, cacheDir, work, deb, pkg, version string, log io.Writer) (*Kernel, error) {
	root := filepath.Join(work, "root")
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", deb, root).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("unpacking %s: %w\n%s", deb, err, out)
	}
	os.Remove(deb)
	releases, _ := os.ReadDir(filepath.Join(root, "lib", "modules"))
	if len(releases) != 1 {
		return nil, fmt.Errorf("%s holds %d module trees, want one", pkg, len(releases))
	}
	release := releases[0].Name()
	if out, err := exec.CommandContext(ctx, sbin("depmod"), "-b", root, release).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("depmod for %s: %w\n%s", release, err, out)
	}
	entry := filepath.Join(work, "entry")
	if err := os.MkdirAll(filepath.Join(entry, "lib"), 0o755); err != nil {
		return nil, err
	}
	if err := os.Rename(filepath.Join(root, "lib", "modules"), filepath.Join(entry, "lib", "modules")); err != nil {
		return nil, err
	}
	if err := extractVmlinux(ctx, filepath.Join(root, "boot", "vmlinuz-"+release), filepath.Join(entry, "vmlinux")); err != nil {
		return nil, err
	}
	meta := fmt.Sprintf("package %s\nversion %s\nrelease %s\n", pkg, version, release)
	if err := os.WriteFile(filepath.Join(entry, "kernel.txt"), []byte(meta), 0o644); err != nil {
		return nil, err
	}
	dst := filepath.Join(cacheDir, "kernels", pkg+"_"+version)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return nil, err
	}
	os.RemoveAll(dst)
	if err := os.Rename(entry, dst); err != nil {
		return nil, err
	}
	fmt.Fprintf(log, "vm: cached %s in %s\n", release, dst)
	pruneKernels(filepath.Dir(dst), dst, log)
	return loadCached(dst)
}

// pruneKernels removes the other kernels of the cache, once a newer one
// is there: each takes some 450 MB. Ones unpacked less than a day ago
// stay, in case a run that started with one still loads its modules.
func pruneKernels(dir, keep string, log io.Writer) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		if p == keep {
			continue
		}
		if st, err := os.Stat(filepath.Join(p, "kernel.txt")); err == nil && time.Since(st.ModTime()) < 24*time.Hour {
			continue
		}
		fmt.Fprintf(log, "vm: removing the older kernel %s\n", e.Name())
		_ = os.RemoveAll(p)
	}
}

// sbin finds a tool of kmod where a user's PATH may not look.
func sbin(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin"} {
		if p := filepath.Join(dir, name); unix.Access(p, unix.X_OK) == nil {
			return p
		}
	}
	return name
}

// loadCached reads a complete cache entry; kernel.txt is written last.
func loadCached(dir string) (*Kernel, error) {
	b, err := os.ReadFile(filepath.Join(dir, "kernel.txt"))
	if err != nil {
		return nil, err
	}
	k := &Kernel{Vmlinux: filepath.Join(dir, "vmlinux")}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		key, val, _ := strings.Cut(sc.Text(), " ")
		switch key {
		case "package":
			k.Package = val
		case "version":
			k.Version = val
		case "release":
			k.Release = val
		}
	}
	if k.Release == "" {
		return nil, fmt.Errorf("%s: no release", dir)
	}
	k.ModulesDir = filepath.Join(dir, "lib", "modules", k.Release)
	for _, p := range []string{k.Vmlinux, filepath.Join(k.ModulesDir, "modules.dep")} {
		if _, err := os.Stat(p); err != nil {
			return nil, err
		}
	}
	return k, nil
}

// newestCached returns the most recently unpacked kernel in the cache.
func newestCached(cacheDir string) (*Kernel, error) {
	entries, err := os.ReadDir(filepath.Join(cacheDir, "kernels"))
	if err != nil {
		return nil, err
	}
	type cand struct {
		k   *Kernel
		mod int64
	}
	var cs []cand
	for _, e := range entries {
		dir := filepath.Join(cacheDir, "kernels", e.Name())
		k, err := loadCached(dir)
		if err != nil {
			continue
		}
		st, _ := os.Stat(filepath.Join(dir, "kernel.txt"))
		cs = append(cs, cand{k, st.ModTime().UnixNano()})
	}
	if len(cs) == 0 {
		return nil, errors.New("no kernel in the cache")
	}
	slices.SortFunc(cs, func(a, b cand) int { return cmp.Compare(b.mod, a.mod) })
	return cs[0].k, nil
}

// extractVmlinux writes the ELF kernel inside a bzImage to dst. The
// bzImage's setup header says where its compressed payload is; Debian
// compresses it with xz (with x86 BCJ, which only xz(1) undoes), older
// kernels with gzip.
func extractVmlinux(ctx context.Context, bzImage, dst string) error {
	img, err := os.ReadFile(bzImage)
	if err != nil {
		return err
	}
	payload, err := bzPayload(img)
	if err != nil {
		return fmt.Errorf("%s: %w", bzImage, err)
	}
	var elf []byte
	switch {
	case bytes.HasPrefix(payload, []byte("\xfd7zXZ\x00")):
		cmd := exec.CommandContext(ctx, "xz", "--single-stream", "-dc")
		cmd.Stdin = bytes.NewReader(payload)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if elf, err = cmd.Output(); err != nil {
			return fmt.Errorf("decompressing %s with xz: %w: %s", bzImage, err, stderr.String())
		}
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		zr, err := gzip.NewReader(bytes.NewReader(payload))
		if err != nil {
			return err
		}
		zr.Multistream(false)
		if elf, err = io.ReadAll(zr); err != nil {
			return fmt.Errorf("decompressing %s: %w", bzImage, err)
		}
	default:
		return fmt.Errorf("%s: payload compressed in an unknown way (% x)", bzImage, payload[:min(6, len(payload))])
	}
	if !bytes.HasPrefix(elf, []byte("\x7fELF")) {
		return fmt.Errorf("%s: payload is not an ELF kernel", bzImage)
	}
	return os.WriteFile(dst, elf, 0o644)
}

// bzPayload returns the compressed kernel inside a bzImage (Linux boot
// protocol 2.08+: payload_offset and payload_length in the setup header,
// counted from the protected-mode code after the setup sectors).
func bzPayload(img []byte) ([]byte, error) {
	if len(img) < 0x250 || string(img[0x202:0x206]) != "HdrS" {
		return nil, errors.New("not a bzImage")
	}
	if binary.LittleEndian.Uint16(img[0x206:]) < 0x208 {
		return nil, errors.New("boot protocol older than 2.08: no payload fields")
	}
	setupSects := int(img[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	off := (setupSects+1)*512 + int(binary.LittleEndian.Uint32(img[0x248:]))
	n := int(binary.LittleEndian.Uint32(img[0x24c:]))
	if off < 0 || n <= 0 || off+n > len(img) {
		return nil, fmt.Errorf("payload %d+%d outside the image of %d bytes", off, n, len(img))
	}
	return img[off : off+n], nil
}
