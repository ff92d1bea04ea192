package bench

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/wgmesh/wgmesh/test/bench/sim"
)

// SimResult is one run of the in-process simulation.
type SimResult struct {
	Concurrent bool `json:"concurrent_claims"`
	sim.Result
}

// simulate runs n meshes in this process, claiming blocks all at once
// (a network created everywhere at the same moment) and one after another.
// A quick run shortens push/pull and the idle window, so that it only
// checks the simulation works.
func simulate(ctx context.Context, n int, quick bool, log *slog.Logger) ([]SimResult, error) {
	var out []SimResult
	for _, concurrent := range []bool{true, false} {
		cfg := sim.Config{Nodes: n, ConcurrentClaims: concurrent, Logger: log}
		if quick {
			cfg.Memberlist = func() *memberlist.Config {
				c := sim.DefaultMemberlist()
				c.PushPullInterval = time.Second
				return c
			}
			cfg.Settle, cfg.IdleWindow = 500*time.Millisecond, 2*time.Second
		}
		r, err := sim.Run(ctx, cfg)
		if err != nil {
			return out, err
		}
		out = append(out, SimResult{Concurrent: concurrent, Result: r})
	}
	return out, nil
}

func simulationTable(rs []SimResult) string {
	var b strings.Builder
	fmt.Fprintln(&b, "Real meshes (memberlist gossip, encryption, block claims) in one process on loopback, no data plane.")
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "| nodes | claims | members converged | full peer sets | joining node a peer of all | gossip per node, idle | claim traffic per node | largest entry |")
	fmt.Fprintln(&b, "|---|---|---|---|---|---|---|---|")
	for _, r := range rs {
		mode := "one after another"
		if r.Concurrent {
			mode = "all at once"
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %s | %s | %.0f B/s | %.0f KiB | %d B |\n", r.Nodes, mode,
			r.MembershipConverged.Round(1e6), r.PeersConverged.Round(1e6), r.JoinReachable.Round(1e6),
			r.BytesPerNodePerSecond, r.ClaimBytesPerNode/1024, r.MaxEntryBytes)
	}
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "Consensus: every node runs a Raft server of the catalog on loopback, over TLS. Raft bytes are what nodes write on")
	fmt.Fprintln(&b, "those connections (TLS records); the busiest node is the leader, which replicates to every other. CPU is the whole")
	fmt.Fprintln(&b, "process's, all nodes together.")
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "| nodes | claims | every node registered | Raft per node, idle | Raft of the busiest node, idle | Raft per node, claims | CPU, idle | CPU, claims |")
	fmt.Fprintln(&b, "|---|---|---|---|---|---|---|---|")
	for _, r := range rs {
		mode := "one after another"
		if r.Concurrent {
			mode = "all at once"
		}
		busiest := fmt.Sprintf("%.1f KiB/s", r.IdleRaftMaxBytesPerSecond/1024)
		if r.IdleRaftMaxNode != "" && r.IdleRaftMaxNode == r.Leader {
			busiest += " (the leader)"
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %.0f B/s | %s | %.0f KiB | %.2f cores | %.1f s |\n", r.Nodes, mode,
			r.Registered.Round(1e6), r.IdleRaftBytesPerNodePerSecond, busiest, r.ClaimRaftBytesPerNode/1024,
			r.IdleCPUCores, r.ClaimCPU.Seconds())
	}
	return b.String()
}
