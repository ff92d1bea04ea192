package driver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"time"
)

// Control is the agent's local control API, served on a unix socket only
// root can open: it reports status and takes operator commands.
type Control struct {
	Driver *Driver
	// Forget and RotateKeys carry out `wgmesh forget` and
	// `wgmesh rotate-keys`.
	Forget     func(ctx context.Context, node string) error
	RotateKeys func(ctx context.Context) error
}

// Handler returns the control API's HTTP handler.
func (c *Control) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		st, err := c.Driver.Status(r.Context())
		if err != nil {
			controlError(w, http.StatusInternalServerError, err)
			return
		}
		writeJSON(w, http.StatusOK, st)
	})
	mux.HandleFunc("POST /v1/forget", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Node string `json:"node"`
		}
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&req); err != nil || req.Node == "" {
			controlError(w, http.StatusBadRequest, errors.New(`want {"node": "<name>"}`))
			return
		}
		if err := c.Forget(r.Context(), req.Node); err != nil {
			controlError(w, http.StatusConflict, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"forgotten": req.Node})
	})
	mux.HandleFunc("POST /v1/network-rm", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Network string `json:"network"`
		}
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&req); err != nil || req.Network == "" {
			controlError(w, http.StatusBadRequest, errors.New(`want {"network": "<name or subnet>"}`))
			return
		}
		subnet, err := c.Driver.RemoveClusterNetwork(r.Context(), req.Network)
		if err != nil {
			controlError(w, http.StatusConflict, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"removed": req.Network, "subnet": subnet.String()})
	})
	mux.HandleFunc("POST /v1/rotate-keys", func(w http.ResponseWriter, r *http.Request) {
		if err := c.RotateKeys(r.Context()); err != nil {
			controlError(w, http.StatusInternalServerError, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"public_key": c.Driver.currentKey().Public().String()})
	})
	return mux
}

// Serve serves the control API on l until ctx is done.
func (c *Control) Serve(ctx context.Context, l net.Listener) error {
	srv := &http.Server{Handler: c.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// ListenControl opens the control socket with mode 0600.
func ListenControl(path string) (net.Listener, error) {
	return listenUnix(path, 0o700, 0o600)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func controlError(w http.ResponseWriter, status int, err error) {
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

// ControlClient talks to an agent's control socket.
type ControlClient struct {
	path string
	http *http.Client
}

// NewControlClient returns a client for the socket at path.
func NewControlClient(path string) *ControlClient {
	return &ControlClient{path: path, http: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialUnix(ctx, path)
		}},
	}}
}

// dialUnix connects to a unix socket, also one whose path is longer than
// the 108 bytes a socket address holds, such as a managed plugin's
// (/var/lib/docker/plugins/<id>/propagated-mount/control.sock): it goes
// through /proc/self/fd and a descriptor of the directory.
func dialUnix(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	const maxSunPath = 107
	if len(path) <= maxSunPath {
		return d.DialContext(ctx, "unix", path)
	}
	dir, err := os.Open(filepath.Dir(path))
	if err != nil {
		return nil, err
	}
	defer dir.Close()
	return d.DialContext(ctx, "unix", fmt.Sprintf("/proc/self/fd/%d/%s", dir.Fd(), filepath.Base(path)))
}

func (c *ControlClient) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, _ := json.Marshal(in)
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://wgmesh"+path, body)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("reaching the agent at %s (is it running?): %w", c.path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("agent answered %s", resp.Status)
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(b, out)
}

// Status fetches the agent's status.
func (c *ControlClient) Status(ctx context.Context) (*Status, error) {
	var st Status
	if err := c.do(ctx, http.MethodGet, "/v1/status", nil, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// RemoveNetwork asks the agent to remove a network from the cluster.
func (c *ControlClient) RemoveNetwork(ctx context.Context, network string) (netip.Prefix, error) {
	var out struct {
		Subnet netip.Prefix `json:"subnet"`
	}
	err := c.do(ctx, http.MethodPost, "/v1/network-rm", map[string]string{"network": network}, &out)
	return out.Subnet, err
}

// Forget asks the agent to forget a node.
func (c *ControlClient) Forget(ctx context.Context, node string) error {
	return c.do(ctx, http.MethodPost, "/v1/forget", map[string]string{"node": node}, nil)
}

// RotateKeys asks the agent for a new WireGuard key pair and returns the
// new public key.
func (c *ControlClient) RotateKeys(ctx context.Context) (string, error) {
	var out struct {
		PublicKey string `json:"public_key"`
	}
	err := c.do(ctx, http.MethodPost, "/v1/rotate-keys", nil, &out)
	return out.PublicKey, err
}
