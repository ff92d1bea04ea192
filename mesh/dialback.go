package mesh

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/wgmesh/wgmesh/internal/durable"
	"github.com/wgmesh/wgmesh/mesh/gossipnet"
)

// Dialback: before it joins, a node that was not told the address to
// advertise finds out whether it is reachable at the address its seeds
// see it come from. A cloud VM whose public address is mapped 1:1 onto
// its private one (the ordinary case on the large clouds) does not see
// that address on any interface; advertising the private one, it would
// count as behind NAT, never vote and never relay, and a cluster of
// such VMs alone would have no reachable host.
//
// The node asks each seed, over the seed's gossip port, where it sees
// the node and to connect back to it there, unsolicited, at its
// consensus port: the protocol is the gossip transport's
// (mesh/gossipnet/dialback.go). A NAT that only lets in what its host
// began drops that connection; a 1:1 NAT (or forwarded ports) lets it
// through. This file decides what to make of the answers.
//
// A seed is a member, and members are not trusted (docs/threat-model):
// one seed could name an address that is not this node's and dial back
// itself. So the node adopts an address only if every seed that
// answered names the same one and at least two of them reached it there
// (one, where only one answered, or where the address is the one
// confirmed on an earlier start). Nothing else rests on it: the NAT
// assessment after joining (mesh/reachability) still checks that every observer
// sees the node at the address it advertises, and calls it behind NAT
// if not, as it would have without dialback.

const (
	// dialbackPatience: a node none of whose seeds answer, and that has
	// no address confirmed before, asks again for this long: when a
	// whole cluster starts at once, its seeds come up within moments.
	dialbackPatience = 6 * time.Second
	// publicAddrFile keeps the address confirmed by dialback.
	publicAddrFile = "public-addr.json"
)

// judgeDialbacks decides from the seeds' answers whether the node is
// reachable at an address other than local, the one it would advertise;
// saved is the address confirmed on an earlier start (invalid if none). It returns the address to advertise
// instead of local (invalid: keep local), and why, for the log.
func judgeDialbacks(local netip.Addr, all []gossipnet.DialbackAnswer, saved netip.Addr) (netip.Addr, string) {
	var seen netip.Addr
	reached, answers := 0, 0
	for _, a := range all {
		if !a.Seen.IsValid() {
			continue
		}
		answers++
		if seen.IsValid() && a.Seen != seen {
			return netip.Addr{}, fmt.Sprintf("seeds disagree on this host's address (%s, %s)", seen, a.Seen)
		}
		seen = a.Seen
		if a.Reached {
			reached++
		}
	}
	switch {
	case !seen.IsValid():
		if saved.IsValid() && saved != local {
			return saved, "no seed answered; the address confirmed on an earlier start"
		}
		return netip.Addr{}, "no seed answered"
	case seen == local:
		return netip.Addr{}, "seeds see this host at the address it has"
	}
	// Where only one seed answers (the others not up yet), its word
	// is taken: a hostile seed gains nothing by it that a hostile seed
	// naming no address does not, as the NAT assessment after joining
	// calls a node behind NAT whom observers see elsewhere.
	need := min(2, answers)
	switch {
	case reached >= need:
		return seen, fmt.Sprintf("%d seeds reached this host there unsolicited", reached)
	case reached >= 1 && seen == saved:
		return seen, "a seed reached this host there unsolicited, as on an earlier start"
	case reached == 0:
		return netip.Addr{}, fmt.Sprintf("seeds see this host at %s but cannot reach it there (behind NAT)", seen)
	}
	return netip.Addr{}, fmt.Sprintf("only %d of %d seeds reached this host at %s", reached, need, seen)
}

// resolveSeeds resolves the seeds (host or host:port, port defaulting to
// port) and leaves out this host's own addresses at port (a seed list
// shared by every host names the host itself too).
func resolveSeeds(ctx context.Context, seeds []string, port int, own func(netip.Addr) bool) []gossipnet.Seed {
	var out []gossipnet.Seed
	seen := map[netip.AddrPort]bool{}
	for _, s := range seeds {
		host, p := s, port
		if h, ps, err := net.SplitHostPort(s); err == nil {
			n, err := strconv.Atoi(ps)
			if err != nil {
				continue
			}
			host, p = h, n
		}
		if p <= 0 || p > 65535 {
			continue
		}
		ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		if err != nil || len(ips) == 0 {
			continue
		}
		a := netip.AddrPortFrom(ips[0].Unmap(), uint16(p))
		if seen[a] || p == port && own(a.Addr()) {
			continue
		}
		seen[a] = true
		out = append(out, gossipnet.Seed{Name: s, Addr: a})
	}
	return out
}

// savedPublic is the address dialback confirmed, kept in the state
// directory for the next start.
type savedPublic struct {
	Addr netip.Addr `json:"addr"`
	At   time.Time  `json:"at"`
}

func loadPublicAddr(dir string) netip.Addr {
	if dir == "" {
		return netip.Addr{}
	}
	b, err := os.ReadFile(filepath.Join(dir, publicAddrFile))
	if err != nil {
		return netip.Addr{}
	}
	var s savedPublic
	if json.Unmarshal(b, &s) != nil {
		return netip.Addr{}
	}
	return s.Addr
}

func savePublicAddr(dir string, a netip.Addr) error {
	if dir == "" {
		return nil
	}
	p := filepath.Join(dir, publicAddrFile)
	if !a.IsValid() {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	return durable.WriteFile(p, mustJSON(savedPublic{a, time.Now().UTC()}), 0o600)
}

// discoverAddr is advertiseAddr's last step for a node told no address:
// it asks the seeds (dialback) and returns the address to advertise,
// local or the one seeds reach this node at.
func discoverAddr(ctx context.Context, cfg Config, t *gossipnet.Transport, l *net.TCPListener, local netip.Addr, log *slog.Logger) netip.Addr {
	seeds := resolveSeeds(ctx, cfg.Join, cfg.BindPort, isOwnAddr)
	saved := loadPublicAddr(cfg.StateDir)
	if len(seeds) == 0 {
		return local
	}
	var answers []gossipnet.DialbackAnswer
	for wait := 250 * time.Millisecond; ; wait *= 2 {
		answers = t.AskDialbacks(ctx, seeds, l, local, log)
		if answered(answers) || saved.IsValid() || ctx.Err() != nil {
			break
		}
		log.Debug("no seed answered how it sees this host; asking again", "in", wait)
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	addr, why := judgeDialbacks(local, answers, saved)
	if !addr.IsValid() {
		log.Info("advertising this host's own address", "addr", local, "why", why)
		var seen netip.Addr
		for _, a := range answers {
			seen = cmp.Or(seen, a.Seen)
		}
		if seen == local && saved.IsValid() {
			// Reachable at its own address now: the saved one is stale.
			if err := savePublicAddr(cfg.StateDir, netip.Addr{}); err != nil {
				log.Warn("removing the saved public address", "err", err)
			}
		}
		return local
	}
	log.Info("advertising the address seeds reach this host at", "addr", addr, "local", local, "why", why)
	if addr != saved {
		if err := savePublicAddr(cfg.StateDir, addr); err != nil {
			log.Warn("saving the public address", "err", err)
		}
	}
	return addr
}

func answered(as []gossipnet.DialbackAnswer) bool {
	for _, a := range as {
		if a.Seen.IsValid() {
			return true
		}
	}
	return false
}

// isOwnAddr reports whether a is an address of this host.
func isOwnAddr(a netip.Addr) bool {
	if a.IsLoopback() {
		return true
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return false
	}
	for _, x := range addrs {
		if p, err := netip.ParsePrefix(x.String()); err == nil && p.Addr().Unmap() == a {
			return true
		}
	}
	return false
}
