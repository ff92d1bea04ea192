package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"
	"github.com/docker/go-plugins-helpers/network"
	"github.com/docker/go-plugins-helpers/sdk"
)

// Manifest is the answer to /Plugin.Activate: one plugin, both drivers,
// so users write `-d wgmesh --ipam-driver wgmesh`.
const Manifest = `{"Implements": ["NetworkDriver", "IpamDriver"]}`

// protocol selects how errors are encoded.
type protocol int

const (
	protoNetwork protocol = iota
	protoIPAM
)

// maxRequestBytes bounds a plugin request; real ones are a few hundred bytes.
const maxRequestBytes = 1 << 20

type call struct {
	path  string
	proto protocol
	fn    func(ctx context.Context, body []byte) (any, error)
}

// decode parses a request body into a request of type T.
func decode[T any](name string, body []byte) (*T, error) {
	var req T
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, invalidParam("malformed %s request: %v", name, err)
	}
	return &req, nil
}

// with adapts a typed driver method to a call.
func with[T any](name string, fn func(context.Context, *T) (any, error)) func(context.Context, []byte) (any, error) {
	return func(ctx context.Context, body []byte) (any, error) {
		req, err := decode[T](name, body)
		if err != nil {
			return nil, err
		}
		return fn(ctx, req)
	}
}

// empty is the success answer of calls that return nothing.
var empty = struct{}{}

func (d *Driver) calls() []call {
	nd := func(path string, fn func(context.Context, []byte) (any, error)) call {
		return call{"/NetworkDriver." + path, protoNetwork, fn}
	}
	id := func(path string, fn func(context.Context, []byte) (any, error)) call {
		return call{"/IpamDriver." + path, protoIPAM, fn}
	}
	return []call{
		nd("GetCapabilities", func(context.Context, []byte) (any, error) { return d.Capabilities(), nil }),
		nd("GwAllocCheck", func(ctx context.Context, body []byte) (any, error) {
			// Sent with a body of options, or none at all.
			return d.GwAllocCheck(ctx, &gwAllocCheckRequest{})
		}),
		nd("CreateNetwork", with("CreateNetwork", func(ctx context.Context, r *network.CreateNetworkRequest) (any, error) {
			return empty, d.CreateNetwork(ctx, r)
		})),
		nd("DeleteNetwork", with("DeleteNetwork", func(ctx context.Context, r *network.DeleteNetworkRequest) (any, error) {
			return empty, d.DeleteNetwork(ctx, r)
		})),
		// Only a Swarm manager allocates networks, and only for drivers of
		// global scope; answer as a driver with nothing to allocate.
		nd("AllocateNetwork", with("AllocateNetwork", func(context.Context, *network.AllocateNetworkRequest) (any, error) {
			return &network.AllocateNetworkResponse{Options: map[string]string{}}, nil
		})),
		nd("FreeNetwork", with("FreeNetwork", func(context.Context, *network.FreeNetworkRequest) (any, error) {
			return empty, nil
		})),
		nd("CreateEndpoint", with("CreateEndpoint", func(ctx context.Context, r *network.CreateEndpointRequest) (any, error) {
			return d.CreateEndpoint(ctx, r)
		})),
		nd("DeleteEndpoint", with("DeleteEndpoint", func(ctx context.Context, r *network.DeleteEndpointRequest) (any, error) {
			return empty, d.DeleteEndpoint(ctx, r)
		})),
		nd("EndpointOperInfo", with("EndpointOperInfo", func(ctx context.Context, r *network.InfoRequest) (any, error) {
			return d.EndpointInfo(ctx, r)
		})),
		nd("Join", with("Join", func(ctx context.Context, r *network.JoinRequest) (any, error) {
			return d.Join(ctx, r)
		})),
		nd("Leave", with("Leave", func(ctx context.Context, r *network.LeaveRequest) (any, error) {
			return empty, d.Leave(ctx, r)
		})),
		// Discovery is sent only with Swarm or a cluster store; gossip
		// does this job for wgmesh.
		nd("DiscoverNew", with("DiscoverNew", func(context.Context, *network.DiscoveryNotification) (any, error) {
			return empty, nil
		})),
		nd("DiscoverDelete", with("DiscoverDelete", func(context.Context, *network.DiscoveryNotification) (any, error) {
			return empty, nil
		})),
		// Published ports go through docker_gwbridge, which Docker's
		// bridge driver programs itself.
		nd("ProgramExternalConnectivity", with("ProgramExternalConnectivity", func(context.Context, *network.ProgramExternalConnectivityRequest) (any, error) {
			return empty, nil
		})),
		nd("RevokeExternalConnectivity", with("RevokeExternalConnectivity", func(context.Context, *network.RevokeExternalConnectivityRequest) (any, error) {
			return empty, nil
		})),

		id("GetCapabilities", func(context.Context, []byte) (any, error) { return d.IpamCapabilities(), nil }),
		id("GetDefaultAddressSpaces", func(context.Context, []byte) (any, error) { return d.DefaultAddressSpaces(), nil }),
		id("RequestPool", with("RequestPool", func(ctx context.Context, r *ipam.RequestPoolRequest) (any, error) {
			return d.RequestPool(ctx, r)
		})),
		id("ReleasePool", with("ReleasePool", func(ctx context.Context, r *ipam.ReleasePoolRequest) (any, error) {
			return empty, d.ReleasePool(ctx, r)
		})),
		id("RequestAddress", with("RequestAddress", func(ctx context.Context, r *ipam.RequestAddressRequest) (any, error) {
			return d.RequestAddress(ctx, r)
		})),
		id("ReleaseAddress", with("ReleaseAddress", func(ctx context.Context, r *ipam.ReleaseAddressRequest) (any, error) {
			return empty, d.ReleaseAddress(ctx, r)
		})),
	}
}

// Handler returns the plugin's HTTP handler, serving both protocols.
func (d *Driver) Handler() sdk.Handler {
	h := sdk.NewHandler(Manifest)
	for _, c := range d.calls() {
		h.HandleFunc(c.path, d.serve(c))
	}
	return h
}

// serve wraps a call: bounded body, a deadline, errors in the field the
// protocol expects, and no panic ever reaching Docker.
func (d *Driver) serve(c call) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		defer func() {
			if p := recover(); p != nil {
				d.log.Error("panic in plugin call", "call", c.path, "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
				writeError(w, c.proto, http.StatusInternalServerError, errors.New("internal error in wgmesh; see the agent's log"))
			}
		}()
		if r.Method != http.MethodPost {
			writeError(w, c.proto, http.StatusMethodNotAllowed, invalidParam("%s wants POST, got %s", c.path, r.Method))
			return
		}
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequestBytes))
		if err != nil {
			writeError(w, c.proto, http.StatusBadRequest, invalidParam("reading %s request: %v", c.path, err))
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), d.cfg.RequestTimeout)
		defer cancel()
		res, err := c.fn(ctx, body)
		log := d.log.With("call", c.path, "took", time.Since(start).Round(time.Microsecond))
		if err != nil {
			kind := KindOf(err)
			level := slog.LevelWarn
			if kind == KindSystem {
				level = slog.LevelError
			}
			log.Log(ctx, level, "plugin call failed", "kind", kind.String(), "err", err)
			d.metrics.pluginCalls.WithLabelValues(c.path[1:], kind.String()).Inc()
			// Docker treats every status but 200 as failure; the code is
			// for people reading traces. Never 404: that means "no such
			// call" and is taken as success for some.
			status := http.StatusInternalServerError
			if kind == KindInvalidParameter {
				status = http.StatusBadRequest
			}
			writeError(w, c.proto, status, err)
			return
		}
		log.Debug("plugin call")
		d.metrics.pluginCalls.WithLabelValues(c.path[1:], "ok").Inc()
		sdk.EncodeResponse(w, res, false)
	}
}

// errorBody carries an error in the field each protocol names:
// NetworkDriver answers have "Err" (libnetwork docs/remote.md), IpamDriver
// answers "Error" (docs/ipam.md). The status is not 200, and on any other
// status Docker's plugin client reads "Err" whatever the protocol, so IPAM
// errors carry the message in both fields.
type errorBody struct {
	Err   string `json:"Err"`
	Error string `json:"Error,omitempty"`
}

func writeError(w http.ResponseWriter, proto protocol, status int, err error) {
	body := errorBody{Err: err.Error()}
	if proto == protoIPAM {
		body.Error = body.Err
	}
	w.Header().Set("Content-Type", sdk.DefaultContentTypeV1_1)
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}

// Listen opens the plugin socket, replacing a stale one. Docker finds a
// plugin named wgmesh at /run/docker/plugins/wgmesh.sock.
func Listen(path string) (net.Listener, error) {
	return listenUnix(path, 0o755, 0o660)
}

// listenUnix opens a unix socket at path with mode sockMode, creating its
// directory with dirMode and replacing a stale socket.
func listenUnix(path string, dirMode, sockMode os.FileMode) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), dirMode); err != nil {
		return nil, fmt.Errorf("creating %s: %w", filepath.Dir(path), err)
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	if err := os.Chmod(path, sockMode); err != nil {
		l.Close()
		return nil, fmt.Errorf("setting mode of %s: %w", path, err)
	}
	return l, nil
}

// removeStaleSocket removes a socket nobody answers on; a live one means
// another agent serves it, and taking it over would split the host.
func removeStaleSocket(path string) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("%s is in use by another process; is another wgmesh agent running?", path)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("removing stale socket %s: %w", path, err)
	}
	return nil
}
