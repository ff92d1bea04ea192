package bench

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
)

// StartCost compares `docker run --rm ... true` on a wgmesh network with
// the same on a local bridge network of the same engine: what attaching
// through wgmesh adds to a container's start and removal.
type StartCost struct {
	WgmeshMs []float64 `json:"wgmesh_ms"`
	BridgeMs []float64 `json:"bridge_ms"`
	// Ratio is the median of wgmesh's times over the median of the
	// bridge's.
	Ratio float64 `json:"ratio"`
}

// startCost times Samples runs of each, interleaved, on one host.
func (b *Bench) startCost(ctx context.Context, l *lab.Lab) (StartCost, error) {
	h := l.Hosts[0]
	var r StartCost
	if err := l.CreateNetwork(ctx, "scnet", "10.93.0.0/16", nil, h); err != nil {
		return r, err
	}
	defer func() { _ = l.RemoveNetwork(context.Background(), "scnet", h) }()
	if _, err := h.Docker(ctx, "network", "create", "scbridge"); err != nil {
		return r, err
	}
	defer func() { _, _ = h.Docker(context.Background(), "network", "rm", "scbridge") }()
	timeRun := func(network string) (float64, error) {
		start := time.Now()
		if _, err := h.Docker(ctx, "run", "--rm", "--network", network, lab.Image, "true"); err != nil {
			return 0, fmt.Errorf("docker run on %s: %w", network, err)
		}
		return ms(time.Since(start)), nil
	}
	// One of each first, untimed: the first container of a network pays
	// for things later ones do not (the host's block, the bridge).
	for _, n := range []string{"scnet", "scbridge"} {
		if _, err := timeRun(n); err != nil {
			return r, err
		}
	}
	for i := range b.cfg.FirstPingSamples {
		// Alternate which goes first, so neither always follows the other.
		order := []string{"scnet", "scbridge"}
		if i%2 == 1 {
			order = []string{"scbridge", "scnet"}
		}
		for _, n := range order {
			t, err := timeRun(n)
			if err != nil {
				return r, err
			}
			if n == "scnet" {
				r.WgmeshMs = append(r.WgmeshMs, t)
			} else {
				r.BridgeMs = append(r.BridgeMs, t)
			}
		}
	}
	if mb := median(r.BridgeMs); mb > 0 {
		r.Ratio = median(r.WgmeshMs) / mb
	}
	b.logf("docker run --rm true: wgmesh %.0f ms, bridge %.0f ms (medians), %.2f×", median(r.WgmeshMs), median(r.BridgeMs), r.Ratio)
	return r, nil
}

// markdown reports the start cost, with the spread of each.
func (s *StartCost) markdown(p func(string, ...any)) {
	spread := func(vs []float64) string {
		if len(vs) == 0 {
			return "—"
		}
		return fmt.Sprintf("%.0f ms [%.0f–%.0f]", median(vs), slices.Min(vs), slices.Max(vs))
	}
	p("")
	p("`docker run --rm … true` on one host, %d of each, interleaved: on a wgmesh network %s, on a local", len(s.WgmeshMs), spread(s.WgmeshMs))
	p("bridge network of the same engine %s (median [range]): %.2f×.", spread(s.BridgeMs), s.Ratio)
}
