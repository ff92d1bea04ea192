package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// SoakConfig configures a soak: mesh's randomized safety test
// (TestSafetyRandomized) run for many steps from one seed.
type SoakConfig struct {
	// Go is the go command; Dir the module's root.
	Go, Dir string
	// Steps and Seed are passed as WGMESH_SOAK_STEPS and WGMESH_SOAK_SEED.
	Steps int
	Seed  uint64
	// Timeout is go test's -timeout; the run as a whole, the build
	// included, is stopped a few minutes after it.
	Timeout time.Duration
	// TestFlags are more flags for go test, such as -race.
	TestFlags []string
	// Strict is passed as WGMESH_SAFETY_STRICT: "1" runs every fault kind
	// that finds a hole not fixed yet, or a list of them, "kind,kind".
	Strict string
	// LogFile receives the test's whole output.
	LogFile string
	// Log receives progress: the test's output but its per-step lines,
	// and a line every ProgressEvery steps.
	Log io.Writer
}

// ProgressEvery is how many steps of a soak pass between progress lines.
const ProgressEvery = 100

// SoakResult is what a soak found.
type SoakResult struct {
	Started time.Time `json:"started"`
	Machine string    `json:"machine"`
	Commit  string    `json:"commit"`
	Command string    `json:"command"`
	Seed    uint64    `json:"seed"`
	Steps   int       `json:"steps"`
	// StepsDone is the last step the test logged, plus one.
	StepsDone int `json:"steps_done"`
	// Result is passed, failed, timed out or interrupted.
	Result string `json:"result"`
	// Summary is the test's own line: faults by kind, time, addresses.
	Summary string `json:"summary,omitempty"`
	Faults  int    `json:"faults"`
	// Kinds counts steps by kind, in the test's order.
	Kinds []KindCount `json:"kinds,omitempty"`
	// TestTook is the test's own time for the steps; Took the whole run's.
	TestTook string `json:"test_took,omitempty"`
	Took     string `json:"took"`
	LogFile  string `json:"log_file"`
	// Tail is the end of the output of a run that did not pass.
	Tail []string `json:"tail,omitempty"`
}

// KindCount is how many steps of one kind a soak took.
type KindCount struct {
	Kind  string `json:"kind"`
	Count int    `json:"count"`
}

var (
	// seed 7: 3000 steps, 812 faults in 14m2s: allocate 1080, contested 178, ...; 61 addresses held at the end, none twice
	soakSummaryRE = regexp.MustCompile(`seed (\d+): (\d+) steps, (\d+) faults in (\S+): (.*); \d+ addresses held at the end.*`)
	soakStepRE    = regexp.MustCompile(`^\s+safety_test\.go:\d+: step (\d+): `)
)

// Soak runs the safety test and returns what it found; a test that
// failed or timed out is a result, not an error.
func Soak(ctx context.Context, cfg SoakConfig) (*SoakResult, error) {
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	args := append([]string{"test", "-count=1", "-v", "-timeout", cfg.Timeout.String(), "-run", "^TestSafetyRandomized$"}, cfg.TestFlags...)
	args = append(args, "./mesh/")
	strict := ""
	if cfg.Strict != "" {
		strict = "WGMESH_SAFETY_STRICT=" + cfg.Strict + " "
	}
	r := &SoakResult{Started: time.Now(), Machine: machine(), Seed: cfg.Seed, Steps: cfg.Steps, LogFile: cfg.LogFile,
		Command: fmt.Sprintf("%sWGMESH_SOAK_STEPS=%d WGMESH_SOAK_SEED=%d go %s", strict, cfg.Steps, cfg.Seed, strings.Join(args, " "))}
	if out, err := exec.CommandContext(ctx, "git", "-C", cfg.Dir, "describe", "--tags", "--always", "--dirty").Output(); err == nil {
		r.Commit = strings.TrimSpace(string(out))
	}
	f, err := os.Create(cfg.LogFile)
	if err != nil {
		return nil, err
	}
	defer f.Close()

	// go test's own -timeout ends the test; this bounds the build and
	// a test binary that would not end.
	parent := ctx
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout+10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cfg.Go, args...)
	cmd.Dir = cfg.Dir
	cmd.Env = append(os.Environ(), fmt.Sprintf("WGMESH_SOAK_STEPS=%d", cfg.Steps), fmt.Sprintf("WGMESH_SOAK_SEED=%d", cfg.Seed),
		"WGMESH_SAFETY_STRICT="+cfg.Strict)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	// go test runs the test binary as its child: on a cancel, stop the
	// whole process group this started, not only go.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting go test: %w", err)
	}
	waitErr := make(chan error, 1)
	go func() {
		err := cmd.Wait()
		pw.Close()
		waitErr <- err
	}()
	tail := r.scan(pr, f, cfg.Log)
	err = <-waitErr
	r.Took = time.Since(r.Started).Round(time.Second).String()
	switch {
	case err == nil && r.Summary != "":
		r.Result = "passed"
	case parent.Err() != nil:
		r.Result = "interrupted"
	case timedOut(tail) || ctx.Err() != nil:
		r.Result = "timed out"
	default:
		r.Result = "failed"
	}
	if r.Result != "passed" {
		r.Tail = tail
	}
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) && ctx.Err() == nil {
		return r, fmt.Errorf("go test: %w", err)
	}
	return r, nil
}

// soakTailLines is how much of the end of a failed run's output the
// report keeps. A timeout's goroutine dump is cut at its start.
const soakTailLines = 60

// scan copies the test's output to the log file, shows progress, reads
// the summary, and returns the last lines.
func (r *SoakResult) scan(out io.Reader, logFile, progress io.Writer) []string {
	var tail []string
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	inDump := false
	for sc.Scan() {
		line := sc.Text()
		fmt.Fprintln(logFile, line)
		if m := soakStepRE.FindStringSubmatch(line); m != nil {
			n, _ := strconv.Atoi(m[1])
			r.StepsDone = n + 1
			if r.StepsDone%ProgressEvery == 0 {
				fmt.Fprintf(progress, "soak: %d of %d steps done (%s)\n", r.StepsDone, r.Steps, time.Since(r.Started).Round(time.Second))
			}
		} else if !strings.HasPrefix(line, "=== RUN") {
			fmt.Fprintln(progress, line)
		}
		if strings.HasPrefix(line, "goroutine ") {
			inDump = true
		}
		if !inDump {
			tail = append(tail, line)
			if len(tail) > soakTailLines {
				tail = tail[1:]
			}
		}
		r.parseSummary(line)
	}
	return tail
}

// parseSummary reads the test's closing line, if line is it.
func (r *SoakResult) parseSummary(line string) {
	m := soakSummaryRE.FindStringSubmatch(line)
	if m == nil {
		return
	}
	r.Summary = m[0]
	r.Faults, _ = strconv.Atoi(m[3])
	r.TestTook = m[4]
	r.Kinds = nil
	for _, kv := range strings.Split(m[5], ", ") {
		// "crash 3", or "rollback (off) 2" for a kind not run.
		i := strings.LastIndexByte(kv, ' ')
		k, v, ok := kv[:max(i, 0)], kv[i+1:], i > 0
		n, err := strconv.Atoi(v)
		if ok && err == nil {
			r.Kinds = append(r.Kinds, KindCount{Kind: k, Count: n})
		}
	}
}

func timedOut(tail []string) bool {
	for _, l := range tail {
		if strings.HasPrefix(l, "panic: test timed out") {
			return true
		}
	}
	return false
}

// Markdown renders the soak's report.
func (r *SoakResult) Markdown() string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	p("# wgmesh soak, %s", r.Started.Format("2006-01-02 15:04 MST"))
	p("")
	p("mesh's randomized safety test (`TestSafetyRandomized`): real meshes, memberlist and Raft over loopback, under")
	p("random joins, leaves, crashes with and without disk loss, partitions, duplicate names and a hostile member, with")
	p("the invariants (no overlapping blocks, no address twice) checked after every step.")
	p("")
	result := r.Result
	if result != "passed" {
		result = "**" + result + "**"
	}
	p("| | |")
	p("|---|---|")
	p("| result | %s |", result)
	p("| seed | %d |", r.Seed)
	p("| steps | %d (done: %d) |", r.Steps, r.StepsDone)
	if r.Summary != "" {
		p("| faults | %d |", r.Faults)
		p("| the steps took | %s |", r.TestTook)
	}
	p("| the run took | %s (build included) |", r.Took)
	p("| commit | %s |", r.Commit)
	p("| machine | %s |", r.Machine)
	p("")
	p("Again: `make soak WGMESH_SOAK_SEED=%d WGMESH_SOAK_STEPS=%d`, which runs `%s`.", r.Seed, r.Steps, r.Command)
	p("Its whole output: `%s`.", r.LogFile)
	if len(r.Kinds) > 0 {
		p("")
		p("## Steps by kind")
		p("")
		p("Faults are crash (a power cut: unsynced writes are lost), disk-loss, leave, partition, duplicate-name, hostile, contested, " +
			"hostile-forward, hostile-forget, hostile-delete, rollback, snapshot-crash and majority-power-cut. " +
			"A kind marked (off) runs only with WGMESH_SAFETY_STRICT (make soak SOAK_FLAGS=-strict=1): it finds a hole not fixed yet.")
		p("")
		p("| kind | steps |")
		p("|---|---|")
		for _, k := range r.Kinds {
			p("| %s | %d |", k.Kind, k.Count)
		}
		p("")
		p("The test's summary: `%s`", r.Summary)
	}
	if len(r.Tail) > 0 {
		p("")
		p("## The end of the output")
		p("")
		p("```")
		for _, l := range r.Tail {
			p("%s", l)
		}
		p("```")
	}
	return b.String()
}
