package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/driver"
	"github.com/wgmesh/wgmesh/mesh/consensus"
)

// controlFlag registers --control-socket, defaulting like the agent's.
func controlFlag(fs interface {
	StringVar(*string, string, string, string)
}, p *string) {
	fs.StringVar(p, "control-socket", filepath.Join("/run/wgmesh", "control.sock"), "the agent's control socket")
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", stderr)
	var socket string
	var asJSON bool
	controlFlag(fs, &socket)
	fs.BoolVar(&asJSON, "json", false, "print JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	st, err := driver.NewControlClient(socket).Status(ctx)
	if err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(st); err != nil {
			return err
		}
	} else {
		printStatus(stdout, st, time.Now())
	}
	if !st.Healthy {
		// A health check: scripts and systemd can act on it.
		return exitCode(1)
	}
	return nil
}

func printStatus(w io.Writer, st *driver.Status, now time.Time) {
	fmt.Fprintf(w, "node %s at %s, %s WireGuard, public key %s\n", st.Node.Name, st.Node.Addr, st.Node.WGMode, st.Node.PublicKey)
	cs := st.Consensus
	var voters []string
	for _, s := range cs.Servers {
		if s.Voter {
			voters = append(voters, s.Name)
		}
	}
	fmt.Fprintf(w, "cluster %s: this node %s, leader %s, voters %s, %d servers, applied index %d\n\n",
		orDash(cs.ClusterID, cs.ClusterID != ""), cs.State, orDash(cs.Leader, cs.Leader != ""), orDash(strings.Join(voters, ","), len(voters) > 0),
		len(cs.Servers), cs.AppliedIndex)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tADDRESS\tSTATE\tSINCE\tRTT\tNAT\tPATH MTU\tWIREGUARD\tPUBLIC KEY")
	for _, m := range st.Members {
		since, rtt := "-", "-"
		if !m.Since.IsZero() {
			since = ago(now, m.Since)
		}
		if m.RTT > 0 {
			rtt = m.RTT.Round(10 * time.Microsecond).String()
		}
		state := m.State.String()
		if m.Self {
			state = "self"
		}
		nat := orDash(string(m.NAT), m.NAT != "")
		if m.Public.IsValid() {
			nat += " " + m.Public.String()
		}
		if m.Relay {
			nat += ", relays"
		}
		pmtu := "-"
		if m.PathMTU > 0 {
			pmtu = strconv.Itoa(m.PathMTU)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.Name, m.Addr, state, since, rtt, nat, pmtu, m.WGMode, m.PublicKey.Short()+"…")
	}
	tw.Flush()
	for _, n := range st.Networks {
		fmt.Fprintf(w, "\nnetwork %s  link %s  port %d  mtu %d  gateway %s  blocks %s\n",
			n.Subnet, n.Interface, n.Port, n.MTU, orDash(n.Gateway.String(), n.Gateway.IsValid()), joinPrefixes(n.Blocks))
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		if len(n.Endpoints) > 0 {
			fmt.Fprintln(tw, "  ENDPOINT\tADDRESS\tMAC\t")
			for _, e := range n.Endpoints {
				fmt.Fprintf(tw, "  %s\t%s\t%s\t\n", shortID(e.ID), e.Addr, e.MAC)
			}
		}
		if len(n.Peers) > 0 {
			fmt.Fprintln(tw, "  PEER\tPATH\tENDPOINT\tPATH MTU\tALLOWED IPS\tSTATE\tHANDSHAKE\tRX\tTX")
			for _, p := range n.Peers {
				hs := "never"
				if !p.LastHandshake.IsZero() {
					hs = ago(now, p.LastHandshake) + " ago"
				}
				path := orDash(p.Path, p.Path != "")
				if p.Via != "" {
					path += " via " + p.Via
				}
				mtu := "-"
				if p.PathMTU > 0 {
					mtu = strconv.Itoa(p.PathMTU)
				}
				if p.RouteMTU > 0 {
					mtu += fmt.Sprintf(" (inner %d)", p.RouteMTU)
				}
				fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Node, path, p.Endpoint, mtu, joinPrefixes(p.AllowedIPs), p.State, hs,
					bytesIEC(p.RxBytes), bytesIEC(p.TxBytes))
			}
		}
		tw.Flush()
	}
	if len(st.Relay) > 0 {
		fmt.Fprintln(w, "\nrelaying for others")
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "  NETWORK\tPAIR\tPORT\tFROM\tFORWARDED\tDROPPED")
		for _, r := range st.Relay {
			fmt.Fprintf(tw, "  %s\t%s – %s\t%d\t%s, %s\t%s, %s\t%d\n", r.Network, r.A, r.B, r.Port, orDash(r.AddrA.String(), r.AddrA.IsValid()),
				orDash(r.AddrB.String(), r.AddrB.IsValid()), bytesIEC(int64(r.BytesAB)), bytesIEC(int64(r.BytesBA)), r.Dropped)
		}
		tw.Flush()
	}
	fmt.Fprintf(w, "\ngossip: sent %d messages (%s), received %d (%s)\n",
		st.Gossip.SentMessages, bytesIEC(int64(st.Gossip.SentBytes)), st.Gossip.ReceivedMessages, bytesIEC(int64(st.Gossip.ReceivedBytes)))
	if st.DNS != nil {
		fmt.Fprintln(w, st.DNS.Summary())
	}
	if st.Healthy {
		fmt.Fprintln(w, "healthy")
		return
	}
	fmt.Fprintln(w, "\nPROBLEMS:")
	for _, p := range st.Problems {
		fmt.Fprintf(w, "  ! %s\n", p)
	}
}

func ago(now, t time.Time) string {
	d := now.Sub(t)
	if d < time.Hour {
		return d.Round(time.Second).String()
	}
	return d.Round(time.Minute).String()
}

func orDash(s string, ok bool) string {
	if !ok {
		return "-"
	}
	return s
}

func joinPrefixes[T fmt.Stringer](ps []T) string {
	if len(ps) == 0 {
		return "-"
	}
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func bytesIEC(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func runKeygen(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("keygen", stderr)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	k, err := crypto.GenerateClusterKey()
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(stdout, k)
	return err
}

func runForget(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("forget", stderr)
	var socket string
	controlFlag(fs, &socket)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, "usage: wgmesh forget [--control-socket PATH] NODE")
		return errUsage
	}
	node := fs.Arg(0)
	if err := driver.NewControlClient(socket).Forget(ctx, node); err != nil {
		return err
	}
	_, err := fmt.Fprintf(stdout, "forgot %s; its address blocks are free\n", node)
	return err
}

func runRotateKeys(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("rotate-keys", stderr)
	var socket string
	controlFlag(fs, &socket)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	pub, err := driver.NewControlClient(socket).RotateKeys(ctx)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "new public key %s\n", pub)
	return err
}

func runNetwork(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	const use = "usage: wgmesh network [--control-socket PATH] rm NAME|SUBNET"
	fs := newFlagSet("network", stderr)
	var socket string
	controlFlag(fs, &socket)
	// Flags may come before or after "rm".
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	rest := fs.Args()
	if len(rest) == 0 || rest[0] != "rm" {
		fmt.Fprintln(stderr, use)
		return errUsage
	}
	if err := parseFlags(fs, rest[1:]); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, use)
		return errUsage
	}
	subnet, err := driver.NewControlClient(socket).RemoveNetwork(ctx, fs.Arg(0))
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "removed network %s (%s) from the cluster; every host removes its copy\n", fs.Arg(0), subnet)
	return err
}

func runRecover(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("recover", stderr)
	var stateDir string
	fs.StringVar(&stateDir, "state-dir", "/var/lib/wgmesh", "the stopped agent's state directory")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	unlock, err := lockStateDir(stateDir)
	if err != nil {
		return fmt.Errorf("%w; stop the agent first", err)
	}
	defer unlock()
	id, _, err := crypto.LoadOrCreateIdentity(filepath.Join(stateDir, "identity.key"))
	if err != nil {
		return err
	}
	old, err := consensus.Recover(stateDir, id, nil)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "this node is now the only voter of its cluster (it had %d servers); start its agent, and the others rejoin\n", len(old.Servers))
	return nil
}
