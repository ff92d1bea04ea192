package vm

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Plan is what the guest runs, written by the host into the initramfs as
// planPath.
type Plan struct {
	// Token is a random string of this run that every marker carries, so
	// that no test output can pass for one.
	Token string `json:"token"`
	// Release is the kernel's release (uname -r).
	Release string `json:"release"`
	// Modules are loaded in this order at boot, as paths relative to
	// /lib/modules/RELEASE in the initramfs.
	Modules []string `json:"modules"`
	// ModulesDir is the host's copy of the kernel's whole module tree, seen
	// through the shared root: bind-mounted over the initramfs's so that
	// the kernel can load any module on demand.
	ModulesDir string `json:"modules_dir"`
	// Env is added to every step's environment.
	Env   []string `json:"env"`
	Steps []Step   `json:"steps"`
}

// Step is one program the guest runs, with the host's paths: the guest
// sees the host's root file system.
type Step struct {
	Name string   `json:"name"`
	Path string   `json:"path"`
	Args []string `json:"args"`
	// Dir is the working directory; empty means /.
	Dir string `json:"dir"`
}

// Where the initramfs holds what the guest needs.
const (
	planPath    = "/wgmesh-vm/plan.json"
	busyboxPath = "/bin/busybox"
)

// Exit statuses the guest reports through isa-debug-exit. QEMU exits with
// (status << 1) | 1: 1 when every step passed, 3 when one failed, 5 when
// the guest could not even set up.
const (
	guestPassed     = 0
	guestFailed     = 1
	guestSetupError = 2
)

// Markers are whole lines the guest prints on the console:
//
//	WGMESH-VM <token> READY <uptime seconds>
//	WGMESH-VM <token> BEGIN <index> <name>
//	WGMESH-VM <token> END <index> <name> <exit status> <seconds>
//	WGMESH-VM <token> DONE <status>
//	WGMESH-VM <token> SETUP-FAILED <message>
//
// The kernel may print into the middle of a line of ours, so the host
// looks for them anywhere in a line.
const markerWord = "WGMESH-VM"

func marker(token, format string, args ...any) string {
	return fmt.Sprintf("%s %s %s", markerWord, token, fmt.Sprintf(format, args...))
}

// console follows the guest's console output and records what the
// markers say.
type console struct {
	re *regexp.Regexp
	// readyAt is when the guest was ready to run steps, as host time since
	// QEMU started, and readyUptime the guest's uptime then.
	readyAt     time.Duration
	readyUptime float64
	ready       bool
	begun       map[int]string
	ended       map[int]StepResult
	// running is the step begun and not yet ended, 0 if none; noTests
	// marks steps that were Go test binaries whose -test.run matched
	// nothing.
	running    int
	noTests    map[int]bool
	done       bool
	doneStatus int
	setupError string
}

func newConsole(token string) *console {
	return &console{
		re:    regexp.MustCompile(markerWord + ` ` + regexp.QuoteMeta(token) + ` (READY|BEGIN|END|DONE|SETUP-FAILED)(?: (.*))?$`),
		begun: map[int]string{}, ended: map[int]StepResult{}, noTests: map[int]bool{},
	}
}

// line records one line of console output, seen at elapsed since QEMU
// started. It reports whether the line was a marker.
func (c *console) line(s string, elapsed time.Duration) bool {
	m := c.re.FindStringSubmatch(s)
	if m == nil {
		if c.running != 0 && strings.Contains(s, "testing: warning: no tests to run") {
			c.noTests[c.running] = true
		}
		return false
	}
	var f []string
	if m[2] != "" {
		f = regexp.MustCompile(`\s+`).Split(m[2], -1)
	}
	switch m[1] {
	case "READY":
		if len(f) == 1 {
			c.ready, c.readyAt = true, elapsed
			c.readyUptime, _ = strconv.ParseFloat(f[0], 64)
		}
	case "BEGIN":
		if len(f) == 2 {
			if i, err := strconv.Atoi(f[0]); err == nil {
				c.begun[i] = f[1]
				c.running = i
			}
		}
	case "END":
		if len(f) == 4 {
			i, err1 := strconv.Atoi(f[0])
			status, err2 := strconv.Atoi(f[2])
			secs, err3 := strconv.ParseFloat(f[3], 64)
			if err1 == nil && err2 == nil && err3 == nil {
				c.ended[i] = StepResult{Name: f[1], Status: status, Took: time.Duration(secs * float64(time.Second))}
				c.running = 0
			}
		}
	case "DONE":
		if len(f) == 1 {
			if st, err := strconv.Atoi(f[0]); err == nil {
				c.done, c.doneStatus = true, st
			}
		}
	case "SETUP-FAILED":
		c.setupError = m[2]
	}
	return true
}

// StepResult is how a step ended in the guest.
type StepResult struct {
	Name   string
	Status int // exit status; -1 when killed by a signal
	Took   time.Duration
}

// Result is what a run of the VM found.
type Result struct {
	// Boot is the time from starting QEMU until the guest was ready to
	// run the first step (kernel boot, modules, shared root mounted).
	Boot time.Duration
	// GuestUptime is the guest kernel's uptime at that point.
	GuestUptime time.Duration
	// Total is the time QEMU ran.
	Total time.Duration
	Steps []StepResult
}

// Passed reports whether every step passed.
func (r *Result) Passed() bool {
	for _, s := range r.Steps {
		if s.Status != 0 {
			return false
		}
	}
	return len(r.Steps) > 0
}

// verdict checks what the console and QEMU's exit status say against the
// plan, and fails unless every step demonstrably ran to its end. exitCode
// is QEMU's exit status.
func (c *console) verdict(plan *Plan, exitCode int) (*Result, error) {
	r := &Result{Boot: c.readyAt, GuestUptime: time.Duration(c.readyUptime * float64(time.Second))}
	if c.setupError != "" {
		return r, fmt.Errorf("the guest could not set up: %s", c.setupError)
	}
	if !c.ready {
		return r, fmt.Errorf("the guest never became ready (QEMU exit status %d): see the console output above", exitCode)
	}
	for i, s := range plan.Steps {
		name, ok := c.begun[i+1]
		if !ok || name != s.Name {
			return r, fmt.Errorf("step %d (%s) never started in the guest", i+1, s.Name)
		}
		end, ok := c.ended[i+1]
		if !ok || end.Name != s.Name {
			return r, fmt.Errorf("step %d (%s) started but never ended in the guest", i+1, s.Name)
		}
		if c.noTests[i+1] {
			return r, fmt.Errorf("step %d (%s) ran no test: its -test.run matched nothing", i+1, s.Name)
		}
		r.Steps = append(r.Steps, end)
	}
	if !c.done {
		return r, fmt.Errorf("the guest did not finish (QEMU exit status %d)", exitCode)
	}
	if exitCode&1 == 0 {
		return r, fmt.Errorf("QEMU exited with %d, not through the guest's isa-debug-exit", exitCode)
	}
	if got := exitCode >> 1; got != c.doneStatus {
		return r, fmt.Errorf("the guest reported status %d on the console but %d through isa-debug-exit", c.doneStatus, got)
	}
	want := guestPassed
	if !r.Passed() {
		want = guestFailed
	}
	if c.doneStatus != want {
		return r, fmt.Errorf("the guest reported status %d, but its steps say %d", c.doneStatus, want)
	}
	return r, nil
}
