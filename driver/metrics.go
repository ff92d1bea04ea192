package driver

import (
	"context"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/wgmesh/wgmesh/mesh"
)

// metrics are the driver's own counters; the rest is read from Status at
// scrape time, so that per-peer series come and go with the peers.
type metrics struct {
	reconcileErrors prometheus.Counter
	repairs         prometheus.Counter
	pluginCalls     *prometheus.CounterVec
}

func newMetrics() *metrics {
	return &metrics{
		reconcileErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "wgmesh_reconcile_errors_total",
			Help: "Data-plane reconcile passes that failed and will be retried.",
		}),
		repairs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "wgmesh_endpoint_repairs_total",
			Help: "Interfaces recreated in running containers that had lost them.",
		}),
		pluginCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "wgmesh_plugin_requests_total",
			Help: "Docker plugin calls by call and result (ok or the error kind).",
		}, []string{"call", "result"}),
	}
}

var (
	descMembers = prometheus.NewDesc("wgmesh_members", "Cluster members by state, as this node sees them.", []string{"state"}, nil)
	descMember  = prometheus.NewDesc("wgmesh_member_info", "One series per member, labelled with its state.", []string{"node", "state", "wg_mode"}, nil)
	descNets    = prometheus.NewDesc("wgmesh_networks", "wgmesh networks on this host.", nil, nil)
	descEPs     = prometheus.NewDesc("wgmesh_endpoints", "Container endpoints on this host.", []string{"network"}, nil)
	descBroken  = prometheus.NewDesc("wgmesh_endpoints_broken", "Endpoints whose running container lost its interface and could not be repaired.", []string{"network"}, nil)
	descPeers   = prometheus.NewDesc("wgmesh_peers", "WireGuard peers of a network.", []string{"network"}, nil)
	descHSAge   = prometheus.NewDesc("wgmesh_peer_last_handshake_age_seconds", "Time since the last WireGuard handshake with a peer (absent before the first).", []string{"network", "peer"}, nil)
	descRx      = prometheus.NewDesc("wgmesh_peer_receive_bytes_total", "Bytes received from a WireGuard peer.", []string{"network", "peer"}, nil)
	descTx      = prometheus.NewDesc("wgmesh_peer_transmit_bytes_total", "Bytes sent to a WireGuard peer.", []string{"network", "peer"}, nil)
	descBlocks  = prometheus.NewDesc("wgmesh_ipam_blocks", "Address blocks this host owns in a network.", []string{"network"}, nil)
	descAddrs   = prometheus.NewDesc("wgmesh_ipam_addresses", "Addresses in this host's blocks, used or free.", []string{"network", "state"}, nil)
	descGossipM = prometheus.NewDesc("wgmesh_gossip_messages_total", "wgmesh gossip messages (not memberlist's probes).", []string{"direction"}, nil)
	descGossipB = prometheus.NewDesc("wgmesh_gossip_bytes_total", "wgmesh gossip payload bytes.", []string{"direction"}, nil)
	descProbs   = prometheus.NewDesc("wgmesh_problems", "Problems wgmesh status reports; 0 when healthy.", nil, nil)

	descLeader    = prometheus.NewDesc("wgmesh_consensus_leader", "1 while this node leads the cluster's Raft.", nil, nil)
	descServers   = prometheus.NewDesc("wgmesh_consensus_servers", "Servers of the Raft configuration, by suffrage.", []string{"suffrage"}, nil)
	descApplied   = prometheus.NewDesc("wgmesh_consensus_applied_index", "Index of the last catalog entry applied on this node.", nil, nil)
	descCRefused  = prometheus.NewDesc("wgmesh_consensus_refused_total", "Consensus connections and commands refused, by reason (forged signatures, non-voters sending Raft, ...).", []string{"reason"}, nil)
	descGRefused  = prometheus.NewDesc("wgmesh_gossip_refused_total", "Gossip records refused, by reason (entry-forged: signed by another identity than its node's).", []string{"reason"}, nil)
	descProposals = prometheus.NewDesc("wgmesh_consensus_proposal_seconds", "Time for this node's commands (claims, ...) to commit and apply here, by operation.", []string{"op"}, nil)
	descLeaders   = prometheus.NewDesc("wgmesh_consensus_leader_changes_total", "Leader changes this node saw.", nil, nil)
)

// collector exports the driver to Prometheus.
type collector struct{ d *Driver }

// Collector returns a Prometheus collector of the driver's state.
func (d *Driver) Collector() prometheus.Collector { return collector{d} }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descMembers, descMember, descNets, descEPs, descBroken, descPeers, descHSAge, descRx, descTx,
		descBlocks, descAddrs, descGossipM, descGossipB, descProbs,
		descLeader, descServers, descApplied, descCRefused, descGRefused, descProposals, descLeaders} {
		ch <- d
	}
	c.d.metrics.reconcileErrors.Describe(ch)
	c.d.metrics.repairs.Describe(ch)
	c.d.metrics.pluginCalls.Describe(ch)
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	c.d.metrics.reconcileErrors.Collect(ch)
	c.d.metrics.repairs.Collect(ch)
	c.d.metrics.pluginCalls.Collect(ch)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.d.Status(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(descProbs, err)
		return
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}
	byState := map[mesh.Liveness]int{}
	for _, m := range st.Members {
		byState[m.State]++
		gauge(descMember, 1, m.Name, m.State.String(), m.WGMode)
	}
	for s := mesh.Unknown; s <= mesh.Left; s++ {
		gauge(descMembers, float64(byState[s]), s.String())
	}
	gauge(descNets, float64(len(st.Networks)))
	now := time.Now()
	for _, n := range st.Networks {
		net := n.Subnet.String()
		gauge(descEPs, float64(len(n.Endpoints)), net)
		broken := 0
		for _, e := range n.Endpoints {
			if e.Broken != "" {
				broken++
			}
		}
		gauge(descBroken, float64(broken), net)
		gauge(descPeers, float64(len(n.Peers)), net)
		gauge(descBlocks, float64(len(n.Blocks)), net)
		for _, p := range n.Peers {
			if !p.LastHandshake.IsZero() {
				gauge(descHSAge, now.Sub(p.LastHandshake).Seconds(), net, p.Node)
			}
			counter(descRx, float64(p.RxBytes), net, p.Node)
			counter(descTx, float64(p.TxBytes), net, p.Node)
		}
		used, free := c.d.addressUsage(n.ID)
		gauge(descAddrs, float64(used), net, "used")
		gauge(descAddrs, float64(free), net, "free")
	}
	counter(descGossipM, float64(st.Gossip.SentMessages), "sent")
	counter(descGossipM, float64(st.Gossip.ReceivedMessages), "received")
	counter(descGossipB, float64(st.Gossip.SentBytes), "sent")
	counter(descGossipB, float64(st.Gossip.ReceivedBytes), "received")
	gauge(descProbs, float64(len(st.Problems)))

	cs := st.Consensus
	leader := 0.0
	if cs.State == "leader" {
		leader = 1
	}
	gauge(descLeader, leader)
	voters, nonvoters := 0, 0
	for _, s := range cs.Servers {
		if s.Voter {
			voters++
		} else {
			nonvoters++
		}
	}
	gauge(descServers, float64(voters), "voter")
	gauge(descServers, float64(nonvoters), "nonvoter")
	gauge(descApplied, float64(cs.AppliedIndex))
	counter(descLeaders, float64(cs.Stats.LeaderChanges))
	for reason, n := range cs.Stats.Refused {
		counter(descCRefused, float64(n), reason)
	}
	for reason, n := range st.Gossip.Refused {
		counter(descGRefused, float64(n), reason)
	}
	for op, p := range cs.Stats.Proposals {
		ch <- prometheus.MustNewConstSummary(descProposals, p.Count, p.Total.Seconds(), nil, string(op))
	}
}

// addressUsage counts the addresses of a network's own blocks that are
// handed out, and those still free for containers.
func (d *Driver) addressUsage(netID string) (used, free int) {
	v := d.cfg.Mesh.View()
	d.mu.Lock()
	defer d.mu.Unlock()
	n, ok := d.state.Networks[netID]
	if !ok {
		return 0, 0
	}
	p := d.state.Pools[n.PoolID]
	if p == nil {
		return 0, 0
	}
	reserved := v.Reserved(n.Subnet)
	for _, b := range v.OwnBlocks(n.Subnet) {
		for a := b.Addr(); b.Contains(a); a = a.Next() {
			switch {
			case slices.Contains(reserved, a):
				// The network's, not this host's.
			case p.Allocated[a] != "":
				used++
			case p.usable(a) && preferred(a) && p.inRange(a):
				free++
			}
		}
	}
	return used, free
}
