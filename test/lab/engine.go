package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
)

// Engine is the Docker engine the lab's hosts run: the paths of its
// programs. dockerd starts a containerd of its own on every host, found on
// its PATH, and containerd finds its shim and runc there too: StartDocker
// puts the engine's directories first on it.
type Engine struct {
	// Label names the engine, as its version starts: "20.10", "29".
	Label string
	// Dockerd, Containerd and Runc are the daemon and the runtime.
	Dockerd, Containerd, Runc string
	// ShimDir holds containerd-shim-runc-v2.
	ShimDir string
	// Proxy is the userland proxy dockerd runs for published ports;
	// empty leaves it to dockerd.
	Proxy string
	// Docker is the CLI. It must speak an API version the engine accepts:
	// Engine 29 refuses the 20.10 CLI's.
	Docker string
}

// DebianEngine is Debian's docker.io 20.10, with its containerd and runc:
// the engine the lab runs unless told otherwise.
func DebianEngine() Engine {
	return Engine{
		Label:      "20.10",
		Dockerd:    "/usr/sbin/dockerd",
		Containerd: "/usr/bin/containerd",
		Runc:       "/usr/sbin/runc",
		ShimDir:    "/usr/bin",
		Proxy:      "/usr/sbin/docker-proxy",
		Docker:     "/usr/bin/docker",
	}
}

// DirEngine is an engine whose programs are all in dir, as .ci/engine29.sh
// builds Docker Engine 29: dockerd, docker-proxy, containerd,
// containerd-shim-runc-v2, runc and the docker CLI.
func DirEngine(label, dir string) Engine {
	return Engine{
		Label:      label,
		Dockerd:    filepath.Join(dir, "dockerd"),
		Containerd: filepath.Join(dir, "containerd"),
		Runc:       filepath.Join(dir, "runc"),
		ShimDir:    dir,
		Proxy:      filepath.Join(dir, "docker-proxy"),
		Docker:     filepath.Join(dir, "docker"),
	}
}

// check reports the engine's programs that are missing.
func (e Engine) check() []string {
	var missing []string
	for _, p := range []string{e.Dockerd, e.Containerd, e.Runc, filepath.Join(e.ShimDir, "containerd-shim-runc-v2"), e.Docker, e.Proxy} {
		if p == "" {
			continue
		}
		if _, err := exec.LookPath(p); err != nil {
			missing = append(missing, p)
		}
	}
	return missing
}

// path is dockerd's PATH: where it finds containerd, where containerd
// finds the shim and the shim finds runc, then the usual directories for
// the tools dockerd runs (iptables, ip6tables, modprobe).
func (e Engine) path() string {
	var dirs []string
	seen := map[string]bool{}
	for _, d := range []string{filepath.Dir(e.Containerd), e.ShimDir, filepath.Dir(e.Runc), filepath.Dir(e.Dockerd),
		"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"} {
		if !seen[d] {
			seen[d] = true
			dirs = append(dirs, d)
		}
	}
	return strings.Join(dirs, ":")
}

// EngineVersion is what a host's engine says it is.
type EngineVersion struct {
	Server, API, Client string
	// Components are the versions of the engine's parts (Engine,
	// containerd, runc, docker-init) as `docker version` lists them.
	Components map[string]string
}

func (v EngineVersion) String() string {
	s := fmt.Sprintf("server %s (API %s), client %s", v.Server, v.API, v.Client)
	for _, c := range []string{"containerd", "runc"} {
		if cv, ok := v.Components[c]; ok {
			s += fmt.Sprintf(", %s %s", c, cv)
		}
	}
	return s
}

// EngineVersion asks the host's engine for its versions, and fails if the
// server is not the lab's engine (its version does not start with the
// engine's label).
func (h *Host) EngineVersion(ctx context.Context) (EngineVersion, error) {
	out, err := h.Docker(ctx, "version", "--format", "{{json .}}")
	if err != nil {
		return EngineVersion{}, err
	}
	var raw struct {
		Client struct{ Version string }
		Server struct {
			Version, APIVersion string
			Components          []struct{ Name, Version string }
		}
	}
	if err := json.Unmarshal([]byte(out), &raw); err != nil {
		return EngineVersion{}, fmt.Errorf("reading docker version: %w: %s", err, out)
	}
	v := EngineVersion{Server: raw.Server.Version, API: raw.Server.APIVersion, Client: raw.Client.Version, Components: map[string]string{}}
	for _, c := range raw.Server.Components {
		v.Components[c.Name] = c.Version
	}
	want := h.lab.cfg.Engine.Label
	if !strings.HasPrefix(v.Server, want+".") && v.Server != want {
		return v, fmt.Errorf("%s runs engine %s, not %s", h.Name, v.Server, want)
	}
	return v, nil
}
