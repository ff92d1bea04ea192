// Command wgmesh is a Docker network plugin that joins containers on many
// hosts into one network encrypted by WireGuard.
//
//	wgmesh agent --join SEED --cluster-key-file /etc/wgmesh/cluster.key
//	wgmesh status [--json]
//	wgmesh keygen
//	wgmesh forget NODE
//	wgmesh network rm NAME
//	wgmesh recover
//	wgmesh rotate-keys
//	wgmesh version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"agent", "run the agent: gossip, WireGuard and the Docker plugin", runAgent},
		{"status", "show nodes, networks and WireGuard peers (exit 1 if unhealthy)", runStatus},
		{"keygen", "print a new cluster key", runKeygen},
		{"forget", "release the address blocks of a node that is gone for good", runForget},
		{"network", "network rm NAME: remove a network from every host", runNetwork},
		{"recover", "make this stopped node the only voter, when most voters are gone for good", runRecover},
		{"rotate-keys", "give this node a new WireGuard key pair", runRotateKeys},
		{"version", "print the version", func(_ context.Context, _ []string, stdout, _ io.Writer) error {
			_, err := fmt.Fprintln(stdout, "wgmesh", version)
			return err
		}},
	}
}

// errUsage reports bad arguments; the message was already printed.
var errUsage = errors.New("usage")

// exitCode is an error that asks for a specific exit status, such as an
// unhealthy `status`.
type exitCode int

func (e exitCode) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		err := c.run(ctx, args[1:], stdout, stderr)
		var code exitCode
		switch {
		case err == nil:
			return 0
		case errors.Is(err, flag.ErrHelp):
			return 0
		case errors.Is(err, errUsage):
			return 2
		case errors.As(err, &code):
			return int(code)
		}
		fmt.Fprintf(stderr, "wgmesh %s: %v\n", c.name, err)
		return 1
	}
	fmt.Fprintf(stderr, "wgmesh: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "wgmesh: one encrypted network for containers on many hosts (a Docker network plugin)")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Usage: wgmesh COMMAND [flags]")
	fmt.Fprintln(w)
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-12s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Every flag can also be set as an environment variable: --cluster-key-file is WGMESH_CLUSTER_KEY_FILE.")
	fmt.Fprintln(w, "Run 'wgmesh COMMAND -h' for a command's flags.")
}

// newFlagSet returns a flag set that prints errors and help to stderr.
func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("wgmesh "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// parseFlags parses args, then fills every flag not given on the command
// line from its WGMESH_* environment variable.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] {
			return
		}
		// An empty value means unset: a managed plugin's config lists
		// every variable, most of them empty.
		if v := os.Getenv(envName(f.Name)); v != "" {
			if err := f.Value.Set(v); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %w", envName(f.Name), v, err))
			}
		}
	})
	return errors.Join(errs...)
}

func envName(flagName string) string {
	return "WGMESH_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// listFlag is a repeatable, comma-separated flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*l = append(*l, s)
		}
	}
	return nil
}
