package dns

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// DaemonDNS is the DNS setting of the local dockerd: the servers it gives
// containers instead of the host's (--dns, or "dns" in daemon.json).
type DaemonDNS struct {
	Servers []string `json:"servers"`
	// Source says where the setting was read: dockerd's flags or its
	// configuration file.
	Source string `json:"source"`
}

// defaultDaemonConfig is where dockerd reads its settings, unless
// --config-file says otherwise.
const defaultDaemonConfig = "/etc/docker/daemon.json"

// ReadDaemonDNS finds dockerd behind the unix socket at sock (the peer's
// credentials name its process) and reads its DNS setting from its
// command line, else from its configuration file. It fails where it
// cannot tell: a TCP Docker host, or a dockerd in another PID namespace
// (a managed plugin).
func ReadDaemonDNS(sock string) (DaemonDNS, error) {
	pid, err := peerPID(sock)
	if err != nil {
		return DaemonDNS{}, err
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return DaemonDNS{}, fmt.Errorf("reading dockerd's command line: %w", err)
	}
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	return daemonDNS(args, os.ReadFile)
}

// daemonDNS reads the setting from dockerd's arguments and, if they do
// not have it, from its configuration file.
func daemonDNS(args []string, readFile func(string) ([]byte, error)) (DaemonDNS, error) {
	var servers []string
	config := defaultDaemonConfig
	for i := 1; i < len(args); i++ {
		a := args[i]
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "--") || name != "dns" && name != "config-file" {
			continue
		}
		if !hasValue {
			if i+1 >= len(args) {
				break
			}
			i++
			value = args[i]
		}
		if name == "dns" {
			servers = append(servers, value)
		} else {
			config = value
		}
	}
	if len(servers) > 0 {
		return DaemonDNS{Servers: servers, Source: "dockerd's --dns flags"}, nil
	}
	b, err := readFile(config)
	if errors.Is(err, fs.ErrNotExist) {
		return DaemonDNS{Source: config + " (none)"}, nil
	}
	if err != nil {
		return DaemonDNS{}, fmt.Errorf("reading dockerd's settings: %w", err)
	}
	var cfg struct {
		DNS []string `json:"dns"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return DaemonDNS{}, fmt.Errorf("reading dockerd's settings %s: %w", config, err)
	}
	return DaemonDNS{Servers: cfg.DNS, Source: config}, nil
}

// peerPID returns the process that listens on the unix socket at path.
func peerPID(path string) (int, error) {
	c, err := net.Dial("unix", path)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, fmt.Errorf("reading the credentials of dockerd's socket: %w", credErr)
	}
	if cred.Pid <= 0 {
		return 0, errors.New("dockerd runs in another PID namespace")
	}
	return int(cred.Pid), nil
}

// daemonProblem says what is wrong with dockerd's setting for a server at
// addr, or "" if nothing is: the server must be dockerd's first, or
// Docker asks another server first and never us.
func daemonProblem(d DaemonDNS, addr netip.Addr) string {
	if len(d.Servers) > 0 && d.Servers[0] == addr.String() {
		return ""
	}
	have := "none"
	if len(d.Servers) > 0 {
		have = strings.Join(d.Servers, ", ")
	}
	return fmt.Sprintf(`Docker does not send containers' DNS queries for names it does not know to wgmesh (its DNS servers: %s, from %s): `+
		`add "dns": ["%s"] to /etc/docker/daemon.json (or --dns %s to dockerd's flags) and restart Docker; `+
		`until then containers resolve only the names of containers on their own host`, have, d.Source, addr, addr)
}

// HostUpstreams reads the nameservers of a resolv.conf file, leaving out
// exclude (this server) and addresses that are not IP addresses.
func HostUpstreams(path string, exclude netip.Addr) ([]netip.AddrPort, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []netip.AddrPort
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || f[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(f[1])
		if err != nil || a == exclude {
			continue
		}
		ap := netip.AddrPortFrom(a.Unmap(), 53)
		if !slices.Contains(out, ap) {
			out = append(out, ap)
		}
	}
	return out, sc.Err()
}

// ParseUpstream reads an upstream server, "ADDR" or "ADDR:PORT" (IPv6 in
// brackets with a port).
func ParseUpstream(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("DNS upstream %q is not an address or address:port", s)
	}
	return netip.AddrPortFrom(a, 53), nil
}

// formatAddrs lists addresses for status.
func formatAddrs(as []netip.AddrPort) string {
	var s []string
	for _, a := range as {
		if a.Port() == 53 {
			s = append(s, a.Addr().String())
		} else {
			s = append(s, a.String())
		}
	}
	return strings.Join(s, ", ")
}
