package main

import (
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/wgmesh/wgmesh/test/vm"
)

func TestParseSteps(t *testing.T) {
	got, err := parseSteps([]string{"-C", "/src/pkg", "/bin/a.test", "-test.v", "---", "/bin/b", "---", "/other/b", "x"})
	if err != nil {
		t.Fatal(err)
	}
	want := []vm.Step{
		{Name: "a.test", Path: "/bin/a.test", Args: []string{"-test.v"}, Dir: "/src/pkg"},
		{Name: "b", Path: "/bin/b", Args: []string{}},
		{Name: "b#3", Path: "/other/b", Args: []string{"x"}},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Fatal(d)
	}
	for _, bad := range [][]string{nil, {"/bin/a", "---"}, {"---", "/bin/a"}, {"-C", "/dir"}} {
		if _, err := parseSteps(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
