package durable

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestWriteFileSyncsCreatedDirectories: a directory WriteFile creates is
// an entry of its parent, which survives a power cut only once the
// parent is synced; so is the file, in the last directory.
func TestWriteFileSyncsCreatedDirectories(t *testing.T) {
	root := t.TempDir()
	var synced []string
	old := syncDir
	syncDir = func(dir string) error {
		synced = append(synced, dir)
		return old(dir)
	}
	t.Cleanup(func() { syncDir = old })

	path := filepath.Join(root, "a", "b", "c", "file")
	if err := WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{root, filepath.Join(root, "a"), filepath.Join(root, "a", "b"), filepath.Join(root, "a", "b", "c")} {
		if !slices.Contains(synced, dir) {
			t.Errorf("%s not synced (synced: %v)", dir, synced)
		}
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "x" {
		t.Fatalf("read back %q, %v", b, err)
	}
	for _, dir := range []string{filepath.Join(root, "a"), filepath.Join(root, "a", "b", "c")} {
		if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("%s: %v, %v", dir, fi.Mode(), err)
		}
	}

	// Directories that exist are not synced again for nothing: only the
	// file's own directory is.
	synced = nil
	if err := WriteFile(path, []byte("y"), 0o600); err != nil {
		t.Fatal(err)
	}
	if want := []string{filepath.Join(root, "a", "b", "c")}; !slices.Equal(synced, want) {
		t.Errorf("rewriting synced %v, want %v", synced, want)
	}
}

// TestWriteFileUnderAFile: a path through a regular file is an error,
// and nothing is created.
func TestWriteFileUnderAFile(t *testing.T) {
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "f"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(filepath.Join(root, "f", "x", "y"), []byte("x"), 0o600); err == nil {
		t.Fatal("writing under a regular file succeeded")
	}
}
