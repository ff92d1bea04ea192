package mesh

// A power cut for the safety test. A graceful stop writes what a node
// still has to write (its catalog copy, the tail of its Raft log); a
// crash loses every write the node did not sync. The Raft log is written
// through crashFS, a layer over raft-wal's file system that remembers,
// for every write since a file's last sync, the bytes it overwrote. A
// crash image of a node's state directory is a copy of it in which those
// writes are undone: what a disk holds after the power fails.
//
// The other files of the state directory (the catalog copy, node.json,
// Raft's snapshots, the WAL's bolt meta store) are written through os by
// code that syncs before it renames, so a plain copy of them is what the
// disk holds. That is an approximation: a mutation that drops one of
// those syncs would go unseen (see test/mutate and docs/testing.md).

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"testing"

	walfs "github.com/hashicorp/raft-wal/fs"
	"github.com/hashicorp/raft-wal/types"
)

type crashFS struct {
	mu   sync.Mutex
	dirs map[string]*crashDir // by WAL directory
}

// crashDir is the unsynced writes of the segment files in one WAL
// directory, by file name, oldest first.
type crashDir struct {
	mu      sync.Mutex
	pending map[string][]undo
}

type undo struct {
	off int64
	old []byte
}

func newCrashFS() *crashFS { return &crashFS{dirs: map[string]*crashDir{}} }

// crashSegmentSize is small enough for the safety test's log to span
// segments, so that compaction drops entries and a node that was down
// long enough gets a snapshot installed.
const crashSegmentSize = 8 << 10

// open is consensus.WALForTest: every start of a node opens its log
// afresh, with nothing pending.
func (c *crashFS) open(dir string) (types.VFS, int) {
	d := &crashDir{pending: map[string][]undo{}}
	c.mu.Lock()
	c.dirs[filepath.Clean(dir)] = d
	c.mu.Unlock()
	return &crashVFS{real: walfs.New(), d: d}, crashSegmentSize
}

func (c *crashFS) dir(walDir string) *crashDir {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dirs[filepath.Clean(walDir)]
}

type crashVFS struct {
	real types.VFS
	d    *crashDir
}

func (v *crashVFS) ListDir(dir string) ([]string, error) { return v.real.ListDir(dir) }
func (v *crashVFS) Delete(dir, name string) error {
	v.d.mu.Lock()
	delete(v.d.pending, name)
	v.d.mu.Unlock()
	return v.real.Delete(dir, name)
}
func (v *crashVFS) OpenReader(dir, name string) (types.ReadableFile, error) {
	return v.real.OpenReader(dir, name)
}

func (v *crashVFS) Create(dir, name string, size uint64) (types.WritableFile, error) {
	f, err := v.real.Create(dir, name, size)
	if err != nil {
		return nil, err
	}
	return &crashFile{WritableFile: f, name: name, d: v.d}, nil
}

func (v *crashVFS) OpenWriter(dir, name string) (types.WritableFile, error) {
	f, err := v.real.OpenWriter(dir, name)
	if err != nil {
		return nil, err
	}
	return &crashFile{WritableFile: f, name: name, d: v.d}, nil
}

type crashFile struct {
	types.WritableFile
	name string
	d    *crashDir
}

func (f *crashFile) WriteAt(p []byte, off int64) (int, error) {
	f.d.mu.Lock()
	defer f.d.mu.Unlock()
	old := make([]byte, len(p))
	n, err := f.WritableFile.ReadAt(old, off)
	if err != nil && err != io.EOF {
		return 0, err
	}
	f.d.pending[f.name] = append(f.d.pending[f.name], undo{off, old[:n]})
	return f.WritableFile.WriteAt(p, off)
}

func (f *crashFile) Sync() error {
	f.d.mu.Lock()
	defer f.d.mu.Unlock()
	if err := f.WritableFile.Sync(); err != nil {
		return err
	}
	delete(f.d.pending, f.name)
	return nil
}

// crashImage copies the state directory src to dst as a power cut at
// this moment would leave it.
func (c *crashFS) crashImage(t testing.TB, src, dst string) {
	t.Helper()
	walDir := filepath.Join(src, "raft", "wal")
	d := c.dir(walDir)
	if d != nil {
		// Hold the log still while its segments are copied.
		d.mu.Lock()
		defer d.mu.Unlock()
	}
	err := filepath.WalkDir(src, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, path)
		to := filepath.Join(dst, rel)
		if e.IsDir() {
			return os.MkdirAll(to, 0o700)
		}
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			return nil // removed while we copy: a rename under way
		}
		if err != nil {
			return err
		}
		if d != nil && filepath.Dir(path) == walDir {
			list := d.pending[e.Name()]
			for i := len(list) - 1; i >= 0; i-- {
				u := list[i]
				if int(u.off)+len(u.old) <= len(b) {
					copy(b[u.off:], u.old)
				}
			}
		}
		return os.WriteFile(to, b, 0o600)
	})
	if err != nil {
		t.Fatalf("taking a crash image of %s: %v", src, err)
	}
}

// replaceDir makes dir hold exactly what image holds.
func replaceDir(t testing.TB, dir, image string) {
	t.Helper()
	for _, e := range mustReadDir(t, dir) {
		if err := os.RemoveAll(filepath.Join(dir, e)); err != nil {
			t.Fatal(err)
		}
	}
	err := filepath.WalkDir(image, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(image, path)
		to := filepath.Join(dir, rel)
		if e.IsDir() {
			return os.MkdirAll(to, 0o700)
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		return os.WriteFile(to, b, 0o600)
	})
	if err != nil {
		t.Fatalf("restoring %s from %s: %v", dir, image, err)
	}
}

// powerCut crashes nodes at once as a power cut would: nobody hears from
// them again, and their state directories keep only what they synced.
func powerCut(cfs *crashFS, nodes ...*testNode) {
	if len(nodes) == 0 {
		return
	}
	c := nodes[0].c
	c.net.mu.Lock()
	for _, n := range nodes {
		c.net.down[n.name] = true
	}
	c.net.breakLocked()
	c.net.mu.Unlock()
	images := make([]string, len(nodes))
	for i, n := range nodes {
		image, err := os.MkdirTemp("", "wgmesh-crash-")
		if err != nil {
			c.t.Fatal(err)
		}
		defer os.RemoveAll(image)
		cfs.crashImage(c.t, n.dir, image)
		images[i] = image
	}
	for i, n := range nodes {
		n.stop()
		replaceDir(c.t, n.dir, images[i])
	}
}

func (n *testNode) powerCut(cfs *crashFS) { powerCut(cfs, n) }
