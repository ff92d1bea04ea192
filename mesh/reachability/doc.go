// Package reachability is how this node learns how others reach it and
// how large a packet crosses to each of them.
//
// It owns two jobs of mesh's. The Tracker keeps the observations of this
// node that members send it (where they see its gossip and WireGuard
// ports from), the relays' reflections, and what this node last told
// each member it observes; from them it judges this node's NAT (none,
// consistent or symmetric) and where members outside see it, and it says
// which observations to send, which relays to ask for a reflection and
// what the gossip transport must know to reach each member (route
// hints). The Prober measures the path MTU to every member reached
// directly, with probes the gossip transport sends.
//
// It decides; it does not publish, send or lock. Signing this node's
// info and entries with what it judged, sending the observations,
// liveness and the replica are mesh's: the Tracker reads the members
// through the Cluster interface and is called with mesh's lock held, so
// it holds none of its own and must never call back into mesh by any
// other way. It must not import mesh, mesh/consensus, the driver or cmd;
// mesh/gossipnet (the probes and sightings) and mesh/records (the
// observation's bytes) are all it uses of wgmesh besides crypto.
package reachability
