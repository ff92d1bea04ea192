package main

import (
	"encoding/json"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestSystemdUnit checks docs/wgmesh.service with systemd-analyze verify
// (where it exists), on a copy whose ExecStart names an executable that
// exists here, and checks that the hardening the agent was tested under
// is in it.
func TestSystemdUnit(t *testing.T) {
	b, err := os.ReadFile("../../docs/wgmesh.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	settings := map[string][]string{}
	for _, line := range strings.Split(unit, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "#") {
			settings[k] = append(settings[k], v)
		}
	}
	caps := strings.Fields(strings.Join(settings["CapabilityBoundingSet"], " "))
	for _, c := range []string{"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE"} {
		if !slices.Contains(caps, c) {
			t.Errorf("CapabilityBoundingSet lacks %s: %v", c, caps)
		}
	}
	for k, want := range map[string]string{"NoNewPrivileges": "true", "ProtectSystem": "full", "ProtectHome": "true", "PrivateTmp": "true"} {
		if got := settings[k]; len(got) != 1 || got[0] != want {
			t.Errorf("%s=%v, want %s", k, got, want)
		}
	}
	for _, k := range []string{"PrivateDevices", "ProtectClock", "RestrictNamespaces", "PrivateNetwork", "MountFlags"} {
		if _, ok := settings[k]; ok {
			t.Errorf("%s= breaks the agent", k)
		}
	}
	if got := settings["ExecStart"]; len(got) != 1 || !strings.HasPrefix(got[0], "/usr/local/bin/wgmesh agent") {
		t.Errorf("ExecStart=%v, want /usr/local/bin/wgmesh agent", got)
	}

	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("no systemd-analyze here (make deps installs it)")
	}
	// verify wants ExecStart's program to exist; this test's binary does.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	copied := regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/wgmesh`).ReplaceAllString(unit, "ExecStart="+self)
	path := filepath.Join(t.TempDir(), "wgmesh.service")
	if err := os.WriteFile(path, []byte(copied), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// notInPlugin lists the agent flags a managed plugin deliberately does not
// take, with the reason: everything else a user may need must be settable
// there (docker plugin set) as its WGMESH_* variable.
var notInPlugin = map[string]string{
	"state-dir":      "the state mount's destination is fixed; its source is the mount's settable source",
	"plugin-socket":  "Docker finds a managed plugin's socket where plugin.json's interface.socket says",
	"control-socket": "follows WGMESH_RUN_DIR (RUN-DIR/control.sock), which the host reaches through the state mount",
	"docker-host":    "the docker mount's destination is fixed; its source is the mount's settable source",
}

// TestPluginExposesAgentFlags checks that every agent flag a user may set
// is a settable variable of the managed plugin, and that the plugin lists
// no variable the agent does not know.
func TestPluginExposesAgentFlags(t *testing.T) {
	b, err := os.ReadFile("plugin.json")
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Env []struct {
			Name     string   `json:"name"`
			Settable []string `json:"settable"`
		} `json:"env"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatalf("plugin.json: %v", err)
	}
	env := map[string]bool{}
	for _, e := range cfg.Env {
		env[e.Name] = slices.Contains(e.Settable, "value")
	}
	var f agentFlags
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	f.register(fs)
	flags := map[string]bool{}
	fs.VisitAll(func(fl *flag.Flag) {
		flags[envName(fl.Name)] = true
		settable, listed := env[envName(fl.Name)]
		_, skipped := notInPlugin[fl.Name]
		switch {
		case skipped && listed:
			t.Errorf("--%s is in plugin.json and in notInPlugin", fl.Name)
		case !skipped && !listed:
			t.Errorf("--%s: plugin.json has no %s (add it, or say in notInPlugin why not)", fl.Name, envName(fl.Name))
		case listed && !settable:
			t.Errorf("%s in plugin.json is not settable", envName(fl.Name))
		}
	})
	for name := range env {
		if !flags[name] {
			t.Errorf("plugin.json lists %s, which is no agent flag", name)
		}
	}
	for name := range notInPlugin {
		if fs.Lookup(name) == nil {
			t.Errorf("notInPlugin lists --%s, which is no agent flag", name)
		}
	}
}

// TestFlagHelpAgreesWithDocs checks help texts that once contradicted
// the documentation: a host behind NAT leaves --advertise-addr unset (the
// README's quick start and docs/operations.md, Hosts behind NAT, say so,
// and the test reads them to make sure they still do), and --bind-addr is
// where every listener of the agent's but WireGuard's binds.
func TestFlagHelpAgreesWithDocs(t *testing.T) {
	for path, says := range map[string]string{
		"../../README.md":          "Hosts behind NAT need no port forwarded to them and no `--advertise-addr`",
		"../../docs/operations.md": "A host behind NAT leaves it unset",
	} {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		// Line breaks of the Markdown may fall anywhere in the sentence.
		if !strings.Contains(strings.Join(strings.Fields(string(b)), " "), says) {
			t.Errorf("%s no longer says %q, which the --advertise-addr help agrees with: change both together", path, says)
		}
	}
	var f agentFlags
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	f.register(fs)
	adv := fs.Lookup("advertise-addr").Usage
	if strings.Contains(adv, "set it behind NAT") || !strings.Contains(adv, "leave it unset behind NAT") {
		t.Errorf("--advertise-addr help %q: the docs say a host behind NAT leaves it unset", adv)
	}
	bind := fs.Lookup("bind-addr").Usage
	for _, what := range []string{"gossip", "consensus", "relay"} {
		if !strings.Contains(bind, what) {
			t.Errorf("--bind-addr help %q does not name %s, which listens there too", bind, what)
		}
	}
}
