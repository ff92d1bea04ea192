package main

import (
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
