package sim

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/wgmesh/wgmesh/mesh"
	"github.com/wgmesh/wgmesh/test/poll"
)

// NamesConfig configures a simulation of container names: every node
// publishes the names of its containers at once, then names change one
// at a time, then the cluster idles with them.
type NamesConfig struct {
	Config
	// PerNode is how many container names every node publishes; 0 means
	// 10.
	PerNode int
	// Changes is how many single changes are timed; 0 means 20.
	Changes int
}

// NamesResult is what a names run measured. Bytes are what nodes send as
// their transports see it (compressed and encrypted, without IP/UDP/TCP
// headers), unless they are called payload: wgmesh's own records before
// memberlist compresses and encrypts them (mesh.Stats).
type NamesResult struct {
	Nodes, PerNode int
	// Published runs from every node publishing PerNode names at once
	// until every node holds all Nodes*PerNode.
	Published time.Duration
	// PublishBytesPerNode is what a node sent in that time, beyond the
	// idle traffic of the same span without names.
	PublishBytesPerNode float64
	// ChangeMedian and ChangeMax: one node changes one name (a container
	// starts or stops) until every node has the change.
	ChangeMedian, ChangeMax time.Duration
	// ChangePayloadBytesPerNode is the name payload a node sent per
	// change (its own, relayed, and direct); ChangeMessagesPerNode the
	// name messages.
	ChangePayloadBytesPerNode float64
	ChangeMessagesPerNode     float64
	// RecordBytes is the mean size of a name message.
	RecordBytes float64
	// IdleBaselineBytesPerNodePerSecond is idle traffic before any name
	// existed, IdleBytesPerNodePerSecond with every name in place: the
	// difference is what holding names costs, push/pull carrying them.
	IdleBaselineBytesPerNodePerSecond float64
	IdleBytesPerNodePerSecond         float64
	// PushPullBytes is one push/pull exchange with every name (TCP, both
	// directions), and StatePayloadBytes the names' part of one state.
	PushPullBytes     float64
	StatePayloadBytes float64
}

var nameSubnet = netip.MustParsePrefix("10.64.0.0/10")

// RunNames runs a names simulation and stops every node before it
// returns.
func RunNames(ctx context.Context, cfg NamesConfig) (NamesResult, error) {
	if cfg.PerNode == 0 {
		cfg.PerNode = 10
	}
	if cfg.Changes == 0 {
		cfg.Changes = 20
	}
	cfg.Config = cfg.Config.withDefaults()
	res := NamesResult{Nodes: cfg.Nodes, PerNode: cfg.PerNode}
	if err := cfg.Validate(); err != nil {
		return res, err
	}
	if cfg.PerNode < 1 || cfg.PerNode > 1000 {
		return res, fmt.Errorf("%d names per node out of range 1..1000", cfg.PerNode)
	}
	ctx, cancel := context.WithTimeoutCause(ctx, cfg.Timeout, fmt.Errorf("%w after %v", ErrTimeout, cfg.Timeout))
	defer cancel()
	s, err := newSim(cfg.Config)
	if err != nil {
		return res, err
	}
	defer s.close()
	err = s.runNames(ctx, cfg, &res)
	return res, err
}

// names of node i's containers; version v of container k.
func containerNames(i, perNode, k, v int) mesh.Name {
	// Each node's containers are in a /24 of its own, as blocks are.
	base := nameSubnet.Addr().As4()
	base[1] += byte(i >> 8)
	base[2] = byte(i)
	base[3] = byte(k + 2)
	return mesh.Name{Subnet: nameSubnet, Endpoint: fmt.Sprintf("%012x", i*1000+k), Name: fmt.Sprintf("app-%d-%d", i, k),
		Aliases: []string{fmt.Sprintf("svc-%d", k), fmt.Sprintf("v%d", v)}, Addr: netip.AddrFrom4(base)}
}

func (s *sim) runNames(ctx context.Context, cfg NamesConfig, res *NamesResult) error {
	n := cfg.Nodes
	cluster, err := s.addNodes(n)
	if err != nil {
		return err
	}
	for _, nd := range cluster {
		s.started = time.Now()
		s.start(ctx, nd)
	}
	if _, err := s.waitAll(ctx, "membership", cluster, membersAlive(n)); err != nil {
		return err
	}
	if _, err := s.waitAll(ctx, "registration", cluster, registered); err != nil {
		return err
	}
	s.log.Info("names: cluster up", "nodes", n)

	// Idle without names, after the first push/pulls.
	warm := s.started.Add(pushPullScale(s.cfg.Memberlist().PushPullInterval, n))
	if err := sleep(ctx, max(s.cfg.Settle, time.Until(warm))); err != nil {
		return err
	}
	idle, _, _, err := s.idleRate(ctx, cluster)
	if err != nil {
		return err
	}
	res.IdleBaselineBytesPerNodePerSecond = idle

	// Everyone publishes at once.
	want := n * cfg.PerNode
	versions := make([][]int, n)
	before, began := s.traffic(cluster), time.Now()
	for i, nd := range cluster {
		versions[i] = make([]int, cfg.PerNode)
		if err := nd.m.SetNames(nodeNames(i, cfg.PerNode, versions[i])); err != nil {
			return err
		}
	}
	at, err := s.waitAll(ctx, "names", cluster, func(nd *node) error {
		if got := len(nd.m.LiveNames()); got != want {
			return fmt.Errorf("%s has %d of %d names", nd.name, got, want)
		}
		return nil
	})
	if err != nil {
		return err
	}
	res.Published = at.Sub(began)
	used := s.traffic(cluster).sub(before)
	res.PublishBytesPerNode = float64(used.Bytes())/float64(n) - idle*at.Sub(began).Seconds()
	s.log.Info("names: all published", "names", want, "took", res.Published)

	// One change at a time, once the retransmissions of the publishing
	// have drained.
	payload := func() (bytes, msgs uint64) {
		for _, nd := range cluster {
			st := nd.m.Stats().Names
			bytes, msgs = bytes+st.SentBytes, msgs+st.SentMessages
		}
		return
	}
	drain := func() error {
		_, last := payload()
		quiet := time.Now()
		return poll.Every(ctx, 250*time.Millisecond, 2*time.Minute, "name gossip settling", func() error {
			if _, m := payload(); m != last {
				last, quiet = m, time.Now()
			}
			if time.Since(quiet) < time.Second {
				return errors.New("a name message in the last second")
			}
			return nil
		})
	}
	if err := drain(); err != nil {
		return err
	}
	var took []time.Duration
	b0, m0 := payload()
	for c := range cfg.Changes {
		i, k := (c*7919)%n, c%cfg.PerNode
		versions[i][k]++
		alias := fmt.Sprintf("v%d", versions[i][k])
		began := time.Now()
		if err := cluster[i].m.SetNames(nodeNames(i, cfg.PerNode, versions[i])); err != nil {
			return err
		}
		at, err := s.waitAll(ctx, "change", cluster, func(nd *node) error {
			for _, r := range nd.m.LiveNames() {
				if r.Name == fmt.Sprintf("app-%d-%d", i, k) && slices.Contains(r.Aliases, alias) {
					return nil
				}
			}
			return fmt.Errorf("%s does not have change %d yet", nd.name, c)
		})
		if err != nil {
			return err
		}
		took = append(took, at.Sub(began))
		// Let the change's gossip drain before the next one.
		if err := drain(); err != nil {
			return err
		}
	}
	b1, m1 := payload()
	slices.Sort(took)
	res.ChangeMedian, res.ChangeMax = took[len(took)/2], took[len(took)-1]
	res.ChangePayloadBytesPerNode = float64(b1-b0) / float64(n) / float64(cfg.Changes)
	res.ChangeMessagesPerNode = float64(m1-m0) / float64(n) / float64(cfg.Changes)
	if m1 > m0 {
		res.RecordBytes = float64(b1-b0) / float64(m1-m0)
	}
	s.log.Info("names: changes timed", "median", res.ChangeMedian, "max", res.ChangeMax)

	// Idle with every name in place.
	var stateBefore uint64
	for _, nd := range cluster {
		stateBefore += nd.m.Stats().Names.StateBytes
	}
	idle, pushPull, streams, err := s.idleRate(ctx, cluster)
	if err != nil {
		return err
	}
	res.IdleBytesPerNodePerSecond, res.PushPullBytes = idle, pushPull
	var stateAfter uint64
	for _, nd := range cluster {
		stateAfter += nd.m.Stats().Names.StateBytes
	}
	// A push/pull exchange is one TCP connection carrying two states.
	// (Probes that fall back to TCP count as connections too, so this
	// errs low.)
	if streams > 0 {
		res.StatePayloadBytes = float64(stateAfter-stateBefore) / float64(2*streams)
	}
	return s.failed()
}

// nodeNames is node i's set of names, container k at version v[k].
func nodeNames(i, perNode int, v []int) []mesh.Name {
	out := make([]mesh.Name, perNode)
	for k := range perNode {
		out[k] = containerNames(i, perNode, k, v[k])
	}
	return out
}

// idleRate measures what a node sends per second over the idle window,
// and the bytes of one push/pull exchange in it.
func (s *sim) idleRate(ctx context.Context, cluster []*node) (bytesPerSec, pushPull float64, streams uint64, err error) {
	before, began := s.traffic(cluster), time.Now()
	if err := sleep(ctx, s.cfg.IdleWindow); err != nil {
		return 0, 0, 0, err
	}
	used := s.traffic(cluster).sub(before)
	secs := time.Since(began).Seconds()
	if used.Streams > 0 {
		pushPull = float64(used.StreamBytes) / float64(used.Streams)
	}
	return float64(used.Bytes()) / float64(len(cluster)) / secs, pushPull, used.Streams, s.failed()
}
