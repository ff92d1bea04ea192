package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/wgmesh/wgmesh/driver"
)

// NSPath is the host's network namespace, for nsenter.
func (h *Host) NSPath() string { return "/run/netns/" + h.NetNS }

// DockerSock is the host's Docker API socket.
func (h *Host) DockerSock() string { return filepath.Join(h.Dir, "docker.sock") }

// ControlSock is the host's wgmesh control socket.
func (h *Host) ControlSock() string { return filepath.Join(h.Dir, "run", "control.sock") }

// RunDir is the agent's --run-dir: the pins of its networks' namespaces
// are in RunDir/netns, one per network ID.
func (h *Host) RunDir() string { return filepath.Join(h.Dir, "run") }

// PluginDir is the host's /run/docker/plugins.
func (h *Host) PluginDir() string { return filepath.Join(h.Dir, "plugins") }

// AgentLog and DockerLog are where their output goes.
func (h *Host) AgentLog() string  { return filepath.Join(h.Dir, "agent.log") }
func (h *Host) DockerLog() string { return filepath.Join(h.Dir, "dockerd.log") }

// KeyFile is the cluster key file the host's agent reads: the lab's, or
// with Config.OwnKeyFiles one of the host's own.
func (h *Host) KeyFile() string {
	if h.lab.cfg.OwnKeyFiles {
		return filepath.Join(h.Dir, "cluster.key")
	}
	return h.lab.KeyFile
}

// WriteKeyFile replaces the host's cluster key file (Config.OwnKeyFiles)
// with keys, one a line, primary first, as an operator rotating the key
// would: written aside and renamed over it, so that the agent, which
// watches the file, never reads half of it.
func (h *Host) WriteKeyFile(keys ...string) error {
	if !h.lab.cfg.OwnKeyFiles {
		return errors.New("lab: the hosts share one key file (Config.OwnKeyFiles is off)")
	}
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(strings.TrimSpace(k) + "\n")
	}
	tmp := h.KeyFile() + ".new"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, h.KeyFile())
}

// StartDocker starts the host's dockerd and waits until it answers.
// extra are more daemon flags, such as --live-restore. The host's other
// methods (StartAgent, say) may run while it waits: an engine may not
// answer before the plugins of its networks do.
//
// dockerd runs in the host's network namespace and in its mount
// namespace (mountNSLocked).
func (h *Host) StartDocker(ctx context.Context, extra ...string) error {
	h.mu.Lock()
	if h.dockerd != nil && !h.dockerd.exited() {
		h.mu.Unlock()
		return errors.New("dockerd already running")
	}
	mntns, err := h.mountNSLocked(ctx)
	if err != nil {
		h.mu.Unlock()
		return err
	}
	// dockerd starts a containerd of its own (the mount namespace hides
	// a system one's socket). That containerd, its shim and runc are the
	// engine's: they are first on dockerd's PATH.
	e := h.lab.cfg.Engine
	args := []string{"--data-root", filepath.Join(h.Dir, "data"), "--exec-root", filepath.Join(h.Dir, "exec"),
		"-H", "unix://" + h.DockerSock(), "--pidfile", filepath.Join(h.Dir, "docker.pid")}
	if e.Proxy != "" {
		args = append(args, "--userland-proxy-path", e.Proxy)
	}
	args = append(args, "--dns", DNSAddr)
	args = append(args, h.lab.cfg.DockerArgs...)
	args = append(args, extra...)
	script := fmt.Sprintf("export PATH=%s && exec %s %s", shellQuote(e.path()), shellQuote(e.Dockerd), shellJoin(args))
	p, err := start("nsenter", []string{"--net=" + h.NSPath(), "--mount=" + fmt.Sprintf("/proc/%d/ns/mnt", mntns), "sh", "-c", script}, h.DockerLog())
	if err != nil {
		h.mu.Unlock()
		return err
	}
	h.dockerd = p
	h.mu.Unlock()
	return p.waitReady(ctx, "dockerd", h.DockerLog(), 60*time.Second, 200*time.Millisecond, func() error {
		_, err := run(ctx, e.Docker, "-H", "unix://"+h.DockerSock(), "version")
		return err
	})
}

// mountNSLocked returns the PID of a process that holds the host's mount
// namespace, starting one if there is none (at first, and after a crash,
// as a host boots with an empty /run).
//
// Mounted there are a tmpfs over /run/containerd, which hides a system
// containerd (docker.io starts one under systemd: hosts must not share
// containers' processes), and the host's plugin directory over
// /run/docker/plugins, where dockerd looks for wgmesh's socket. The
// namespace is a slave of the machine's, so the agent's namespace
// unmounts reach it and it never pins a deleted network namespace. It
// outlives dockerd, as a real host's does: what the engine mounts there
// (its containers' network namespaces, the shim sockets in
// /run/containerd) is still there when dockerd starts again, which is
// what live-restore needs.
func (h *Host) mountNSLocked(ctx context.Context) (int, error) {
	if h.mountNS != nil && !h.mountNS.exited() {
		return h.mountNS.cmd.Process.Pid, nil
	}
	if err := os.MkdirAll("/run/docker/plugins", 0o755); err != nil {
		return 0, err
	}
	script := fmt.Sprintf("{ [ ! -d /run/containerd ] || mount -t tmpfs tmpfs /run/containerd; } && "+
		"mount --bind %s /run/docker/plugins && exec sleep infinity", shellQuote(h.PluginDir()))
	p, err := start("nsenter", []string{"--net=" + h.NSPath(), "unshare", "-m", "--propagation", "slave", "sh", "-c", script},
		filepath.Join(h.Dir, "mountns.log"))
	if err != nil {
		return 0, err
	}
	pid := p.cmd.Process.Pid
	err = p.waitReady(ctx, "mount namespace", filepath.Join(h.Dir, "mountns.log"), 10*time.Second, 20*time.Millisecond, func() error {
		// Ready once the mounts are made and sh is sleep.
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil || strings.TrimSpace(string(comm)) != "sleep" {
			return errors.New("not ready")
		}
		return nil
	})
	if err != nil {
		p.stop(syscall.SIGKILL, time.Second)
		return 0, err
	}
	h.mountNS = p
	return pid, nil
}

// DockerCommand is the docker CLI of the host's engine with the flag that
// points it at the host, as one shell word list (for make's DOCKER).
func (h *Host) DockerCommand() string {
	return shellJoin([]string{h.lab.cfg.Engine.Docker, "-H", "unix://" + h.DockerSock()})
}

// InDockerMountNS runs a command in dockerd's mount namespace, where the
// host's mounts are as a managed plugin of that dockerd sees them.
func (h *Host) InDockerMountNS(ctx context.Context, name string, args ...string) (string, error) {
	pid, err := os.ReadFile(filepath.Join(h.Dir, "docker.pid"))
	if err != nil {
		return "", err
	}
	return run(ctx, "nsenter", append([]string{"-t", strings.TrimSpace(string(pid)), "-m", name}, args...)...)
}

// StopDocker stops dockerd with sig (SIGTERM stops its containers first;
// SIGKILL is a crash).
func (h *Host) StopDocker(sig syscall.Signal) {
	h.mu.Lock()
	p := h.dockerd
	h.dockerd = nil
	h.mu.Unlock()
	p.stop(sig, 30*time.Second)
}

// LoadImage imports the busybox image into the host's Docker.
func (h *Host) LoadImage(ctx context.Context) error {
	buf, err := imageTar()
	if err != nil {
		return err
	}
	_, err = runIn(ctx, buf, h.lab.cfg.Engine.Docker, "-H", "unix://"+h.DockerSock(), "import", "-c", "CMD [\"/bin/sh\"]", "-", Image)
	return err
}

// Docker runs the docker CLI against this host.
func (h *Host) Docker(ctx context.Context, args ...string) (string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.dockerLocked(ctx, args...)
}

func (h *Host) dockerLocked(ctx context.Context, args ...string) (string, error) {
	out, err := run(ctx, h.lab.cfg.Engine.Docker, append([]string{"-H", "unix://" + h.DockerSock()}, args...)...)
	if err == nil && len(args) >= 2 && args[0] == "network" && args[1] == "create" {
		h.lab.noteNetwork(strings.TrimSpace(out))
	}
	return out, err
}

// AgentArgs are the flags StartAgent gives this host's agent.
func (h *Host) AgentArgs(extra ...string) []string {
	args := []string{"agent", "--node-name", h.Name}
	if h.Site.NAT == "" {
		args = append(args, "--advertise-addr", h.Addr.String())
	}
	args = append(args,
		"--join", h.lab.Seeds(h),
		"--cluster-key-file", h.KeyFile(),
		"--state-dir", filepath.Join(h.Dir, "state"),
		"--run-dir", h.RunDir(),
		"--plugin-socket", filepath.Join(h.PluginDir(), "wgmesh.sock"),
		"--control-socket", h.ControlSock(),
		"--docker-host", "unix://"+h.DockerSock(),
		"--sync-networks="+strconv.FormatBool(h.lab.cfg.SyncNetworks),
		"--log-level", "debug",
	)
	if !h.lab.cfg.NoNames {
		// Names outside the mesh go to the lab's outside world, never to
		// the machine's resolvers.
		args = append(args, "--dns-upstream", WANServer)
	}
	args = append(args, h.lab.cfg.AgentArgs...)
	return append(args, extra...)
}

// Sandbox is how an agent is confined, as a service manager would run it.
// The zero Sandbox runs it in the machine's mount namespace with every
// capability.
type Sandbox struct {
	// PrivateMountNS runs the agent in a mount namespace of its own, a
	// slave of the machine's, with /usr, /boot and /etc read-only: what
	// systemd makes of ProtectSystem=full and ReadWritePaths=. Mounts the
	// agent makes there do not reach the machine, and go when it stops.
	PrivateMountNS bool
	// Capabilities, if set, is the agent's capability bounding set, as
	// CapabilityBoundingSet= sets it: names such as CAP_NET_ADMIN.
	Capabilities []string
}

// command wraps an agent command line in the sandbox: every wrapper execs
// the next, so the agent keeps the PID the lab started.
func (sb Sandbox) command(argv []string) []string {
	if len(sb.Capabilities) > 0 {
		set := []string{"-all"}
		for _, c := range sb.Capabilities {
			set = append(set, "+"+strings.TrimPrefix(strings.ToLower(c), "cap_"))
		}
		argv = append([]string{"setpriv", "--bounding-set", strings.Join(set, ","), "--inh-caps", "-all", "--"}, argv...)
	}
	if sb.PrivateMountNS {
		var ro []string
		for _, d := range []string{"/usr", "/boot", "/etc"} {
			ro = append(ro, fmt.Sprintf("{ [ ! -d %[1]s ] || { mount --bind %[1]s %[1]s && mount -o remount,bind,ro %[1]s; }; }", d))
		}
		script := strings.Join(ro, " && ") + ` && exec "$@"`
		argv = append([]string{"unshare", "-m", "--propagation", "slave", "sh", "-c", script, "sh"}, argv...)
	}
	return argv
}

// StartAgent starts the host's wgmesh agent and waits until its control
// socket answers.
func (h *Host) StartAgent(ctx context.Context, extra ...string) error {
	return h.StartAgentIn(ctx, Sandbox{}, extra...)
}

// StartAgentIn starts the host's agent confined by sb and waits until its
// control socket answers.
func (h *Host) StartAgentIn(ctx context.Context, sb Sandbox, extra ...string) error {
	h.mu.Lock()
	if h.agent != nil && !h.agent.exited() {
		h.mu.Unlock()
		return errors.New("agent already running")
	}
	// The machine's mount namespace is the lab hosts' host mount
	// namespace: the lab runs in it (PID 1's may be out of reach). Given
	// in the environment, which an agent from before the flag ignores
	// (the benchmark runs one as its baseline).
	env := []string{"env", fmt.Sprintf("WGMESH_HOST_MOUNT_NS=/proc/%d/ns/mnt", os.Getpid()), h.binaryLocked()}
	argv := sb.command(append(env, h.AgentArgs(extra...)...))
	p, err := start("nsenter", append([]string{"--net=" + h.NSPath()}, argv...), h.AgentLog())
	if err != nil {
		h.mu.Unlock()
		return err
	}
	h.agent = p
	h.mu.Unlock()
	// Up once it answers; unhealthy is fine, it may not have joined yet.
	return p.waitReady(ctx, "agent", h.AgentLog(), 30*time.Second, 100*time.Millisecond, func() error {
		_, err := driver.NewControlClient(h.ControlSock()).Status(ctx)
		return err
	})
}

// SetBinary makes the host run another wgmesh binary from its next
// StartAgent on, as a host does once its package is upgraded (or
// downgraded); "" goes back to the lab's Config.Binary. The running agent
// is left alone: stop it first.
func (h *Host) SetBinary(path string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.binary = path
}

// Binary is the wgmesh binary the host's agent starts from.
func (h *Host) Binary() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.binaryLocked()
}

func (h *Host) binaryLocked() string {
	if h.binary != "" {
		return h.binary
	}
	return h.lab.cfg.Binary
}

// StopAgent stops the agent with sig: SIGTERM is a clean stop, SIGKILL a
// crash.
func (h *Host) StopAgent(sig syscall.Signal) {
	h.mu.Lock()
	p := h.agent
	h.agent = nil
	h.mu.Unlock()
	p.stop(sig, 20*time.Second)
}

// AgentPID is the agent's process ID, or 0.
func (h *Host) AgentPID() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.agent == nil || h.agent.exited() {
		return 0
	}
	return h.agent.cmd.Process.Pid
}

// Wgmesh runs a wgmesh command (args[0]) against this host's agent.
func (h *Host) Wgmesh(ctx context.Context, args ...string) (string, error) {
	cmd := []string{"--net=" + h.NSPath(), h.Binary(), args[0], "--control-socket", h.ControlSock()}
	return run(ctx, "nsenter", append(cmd, args[1:]...)...)
}

// Exec runs a command in the host's network namespace.
func (h *Host) Exec(ctx context.Context, name string, args ...string) (string, error) {
	return run(ctx, "nsenter", append([]string{"--net=" + h.NSPath(), name}, args...)...)
}

// ContainerPID returns the PID of a running container's init process.
func (h *Host) ContainerPID(ctx context.Context, container string) (int, error) {
	out, err := h.Docker(ctx, "inspect", "-f", "{{.State.Pid}}", container)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil || pid == 0 {
		return 0, fmt.Errorf("container %s is not running", container)
	}
	return pid, nil
}

// InContainer runs a host tool (ping, iperf3, tcpdump...) in a
// container's network namespace: the busybox image does not have them.
func (h *Host) InContainer(ctx context.Context, container, name string, args ...string) (string, error) {
	pid, err := h.ContainerPID(ctx, container)
	if err != nil {
		return "", err
	}
	return run(ctx, "nsenter", append([]string{fmt.Sprintf("--net=/proc/%d/ns/net", pid), name}, args...)...)
}

// ContainerIP returns a container's address on a network.
func (h *Host) ContainerIP(ctx context.Context, container, network string) (string, error) {
	out, err := h.Docker(ctx, "inspect", "-f", fmt.Sprintf("{{(index .NetworkSettings.Networks %q).IPAddress}}", network), container)
	if err != nil {
		return "", err
	}
	ip := strings.TrimSpace(out)
	if ip == "" || ip == "<no value>" {
		return "", fmt.Errorf("container %s has no address on %s", container, network)
	}
	return ip, nil
}

// Crash kills every process of the host at once, as a power cut would:
// the agent, dockerd, containerd, and the containers.
func (h *Host) Crash() {
	h.mu.Lock()
	agent, dockerd := h.agent, h.dockerd
	h.agent, h.dockerd = nil, nil
	h.mu.Unlock()
	for _, pid := range h.pidsInNetNS() {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	agent.stop(syscall.SIGKILL, 10*time.Second)
	dockerd.stop(syscall.SIGKILL, 10*time.Second)
}

// killRemaining stops what is left in the host's namespace after its
// agent and dockerd: containerd shims and containers of a crashed host.
func (h *Host) killRemaining() {
	for _, pid := range h.pidsInNetNS() {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// pidsInNetNS lists processes whose network namespace is the host's, or
// whose parent's is (a container has a namespace of its own, but its
// shim is in the host's). All of them descend from what the lab started.
func (h *Host) pidsInNetNS() []int {
	var st unix.Stat_t
	if err := unix.Stat(h.NSPath(), &st); err != nil {
		return nil
	}
	hostNS := st.Ino
	entries, _ := os.ReadDir("/proc")
	inHost := map[int]bool{}
	parent := map[int]int{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		var ns unix.Stat_t
		if unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &ns) == nil && ns.Ino == hostNS {
			inHost[pid] = true
		}
		parent[pid] = ppid(pid)
	}
	var out []int
	for pid := range parent {
		for p, hops := pid, 0; p > 1 && hops < 8; p, hops = parent[p], hops+1 {
			if inHost[p] {
				out = append(out, pid)
				break
			}
		}
	}
	return out
}

func ppid(pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "PPid:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// unmountUnder lazily unmounts every mount below dir (network namespaces
// an agent keeps alive, and their shared parent mount).
func (h *Host) unmountUnder(dir string) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var mounts []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			mounts = append(mounts, f[4])
		}
	}
	for i := len(mounts) - 1; i >= 0; i-- {
		_ = unix.Unmount(mounts[i], unix.MNT_DETACH)
	}
}

// Cut makes the underlay drop traffic between this host and the others:
// a partition. Blackhole routes only touch the lab's own namespaces.
func (h *Host) Cut(ctx context.Context, others ...*Host) error {
	for _, o := range others {
		if _, err := h.Exec(ctx, "ip", "route", "replace", "blackhole", o.Addr.String()+"/32"); err != nil {
			return err
		}
		if _, err := o.Exec(ctx, "ip", "route", "replace", "blackhole", h.Addr.String()+"/32"); err != nil {
			return err
		}
	}
	return nil
}

// Heal removes every cut of this host.
func (h *Host) Heal(ctx context.Context) error {
	for _, o := range h.lab.Hosts {
		_, _ = h.Exec(ctx, "ip", "route", "del", "blackhole", o.Addr.String()+"/32")
		_, _ = o.Exec(ctx, "ip", "route", "del", "blackhole", h.Addr.String()+"/32")
	}
	return nil
}

// CreateNetwork creates a wgmesh network with the same name and subnet on
// each of hosts (all hosts if none are given).
func (l *Lab) CreateNetwork(ctx context.Context, name, subnet string, extra []string, hosts ...*Host) error {
	if len(hosts) == 0 {
		hosts = l.Hosts
	}
	args := append([]string{"network", "create", "-d", "wgmesh", "--ipam-driver", "wgmesh", "--subnet", subnet}, extra...)
	args = append(args, name)
	return l.parallel(ctx, hosts, func(ctx context.Context, h *Host) error {
		_, err := h.Docker(ctx, args...)
		return err
	})
}

// RemoveNetwork removes a network from each of hosts (all if none given),
// then from the cluster with `wgmesh network rm`, so that its subnet is
// free for another network and no agent puts it back.
func (l *Lab) RemoveNetwork(ctx context.Context, name string, hosts ...*Host) error {
	if len(hosts) == 0 {
		hosts = l.Hosts
	}
	err := l.parallel(ctx, hosts, func(ctx context.Context, h *Host) error {
		_, err := h.Docker(ctx, "network", "rm", name)
		return err
	})
	if err != nil {
		return err
	}
	if out, err := hosts[0].Wgmesh(ctx, "network", "rm", name); err != nil && !strings.Contains(out, "no network") {
		return fmt.Errorf("removing network %s from the cluster: %w: %s", name, err, out)
	}
	return nil
}

// RunContainer starts a detached container of the lab image on network
// and returns its address there. cmd defaults to a long sleep.
func (h *Host) RunContainer(ctx context.Context, name, network string, opts []string, cmd ...string) (string, error) {
	if len(cmd) == 0 {
		cmd = []string{"sleep", "86400"}
	}
	args := append([]string{"run", "-d", "--name", name, "--network", network}, opts...)
	args = append(args, Image)
	if _, err := h.Docker(ctx, append(args, cmd...)...); err != nil {
		return "", err
	}
	return h.ContainerIP(ctx, name, network)
}

// shellQuote quotes s for sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func shellJoin(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = shellQuote(a)
	}
	return strings.Join(q, " ")
}

// Outside is the address other hosts see this host's packets come from:
// its router's, behind NAT.
func (h *Host) Outside() netip.Addr {
	if h.Router != "" {
		return h.Public
	}
	return h.Addr
}

// RouterExec runs a command in the namespace of the host's NAT router.
func (h *Host) RouterExec(ctx context.Context, name string, args ...string) (string, error) {
	if h.Router == "" {
		return "", fmt.Errorf("host %s has no NAT router", h.Name)
	}
	return run(ctx, "ip", append([]string{"netns", "exec", h.Router, name}, args...)...)
}
