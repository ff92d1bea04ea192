package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
)

// The flag reference, docs/flags.md, is made from the agent's own flag
// set, so it cannot fall behind: this test fails when the file differs
// from what the flags say, and `make docs` (go test -run TestFlagsDoc
// -update-docs) writes it.

var updateDocs = flag.Bool("update-docs", false, "rewrite docs/flags.md from the agent's flags")

const flagsDocPath = "../../docs/flags.md"

func flagsDoc() []byte {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var f agentFlags
	f.register(fs)
	host, _ := os.Hostname()
	var b bytes.Buffer
	b.WriteString("<!-- Made from the agent's flag set by `make docs`; do not edit (TestFlagsDoc checks it). -->\n")
	b.WriteString("# `wgmesh agent` flags\n\n")
	b.WriteString("Every flag can also be set as an environment variable, `WGMESH_` and the flag's name in upper case\n")
	b.WriteString("with `-` as `_`: `--cluster-key-file` is `WGMESH_CLUSTER_KEY_FILE`. A flag given on the command line wins;\n")
	b.WriteString("an empty variable counts as unset. The managed plugin takes the same variables (`docker plugin set`).\n\n")
	b.WriteString("| flag | environment | default | meaning |\n|---|---|---|---|\n")
	fs.VisitAll(func(fl *flag.Flag) {
		def := fl.DefValue
		if fl.Name == "node-name" && def == host {
			def = "the host name"
		}
		if def != "" {
			def = "`" + def + "`"
		}
		usage := strings.ReplaceAll(fl.Usage, "|", `\|`)
		fmt.Fprintf(&b, "| `--%s` | `%s` | %s | %s |\n", fl.Name, envName(fl.Name), def, usage)
	})
	return b.Bytes()
}

func TestFlagsDoc(t *testing.T) {
	want := flagsDoc()
	if *updateDocs {
		if err := os.WriteFile(flagsDocPath, want, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	got, err := os.ReadFile(flagsDocPath)
	if err != nil {
		t.Fatalf("reading the flag reference: %v (run: make docs)", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("docs/flags.md is out of date with the agent's flags: run make docs")
	}
}
