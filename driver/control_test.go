package driver

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/wgmesh/wgmesh/crypto"
)

// TestControl drives the control API through its client, as `wgmesh
// status`, `wgmesh forget` and `wgmesh rotate-keys` do.
func TestControl(t *testing.T) {
	h := newHarness(t)
	n := h.createNetwork("net control", "10.60.0.0/16", nil)

	var forgotten []string
	newKey, _ := crypto.GeneratePrivateKey()
	c := &Control{
		Driver: h.d,
		Forget: func(_ context.Context, node string) error {
			if node == testNode {
				return errors.New("a node cannot forget itself")
			}
			forgotten = append(forgotten, node)
			return nil
		},
		RotateKeys: func(ctx context.Context) error { return h.d.SetPrivateKey(ctx, newKey) },
	}
	path := filepath.Join(t.TempDir(), "c.sock")
	l, err := ListenControl(path)
	if err != nil {
		t.Fatal(err)
	}
	// Only root may talk to the agent.
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket mode %v (%v), want 0600", fi.Mode().Perm(), err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	cl := NewControlClient(path)
	defer cl.http.CloseIdleConnections()

	st, err := cl.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Node.Name != testNode || len(st.Networks) != 1 || st.Networks[0].ID != n.id || !st.Healthy {
		t.Errorf("status = %+v", st)
	}

	if err := cl.Forget(ctx, "node-b"); err != nil || len(forgotten) != 1 || forgotten[0] != "node-b" {
		t.Errorf("forget node-b: %v, forgotten %v", err, forgotten)
	}
	if err := cl.Forget(ctx, testNode); err == nil || !strings.Contains(err.Error(), "cannot forget itself") {
		t.Errorf("forget self: %v, want the hook's error", err)
	}
	if err := cl.Forget(ctx, ""); err == nil || !strings.Contains(err.Error(), "node") {
		t.Errorf("forget nobody: %v", err)
	}

	pub, err := cl.RotateKeys(ctx)
	if err != nil || pub != newKey.Public().String() {
		t.Errorf("rotate-keys answered %q, %v; want %s", pub, err, newKey.Public())
	}
	if got := h.fake.Config().PrivateKey; got.Public() != newKey.Public() {
		t.Error("the data plane did not get the new key")
	}

	if err := cl.do(ctx, http.MethodGet, "/v1/forget", nil, nil); err == nil {
		t.Error("GET /v1/forget succeeded")
	}
}

// TestControlLongSocketPath: a socket path longer than a socket address
// holds still works, as a managed plugin's does on the host.
func TestControlLongSocketPath(t *testing.T) {
	h := newHarness(t)
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	short := filepath.Join(t.TempDir(), "c.sock")
	l, err := ListenControl(short)
	if err != nil {
		t.Fatal(err)
	}
	long := filepath.Join(dir, "control.sock")
	if err := os.Rename(short, long); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- (&Control{Driver: h.d}).Serve(ctx, l) }()
	defer func() { cancel(); <-done }()
	if len(long) <= 108 {
		t.Fatalf("path of %d bytes is not long enough to test", len(long))
	}
	if _, err := NewControlClient(long).Status(ctx); err != nil {
		t.Fatalf("status over a %d-byte socket path: %v", len(long), err)
	}
}
