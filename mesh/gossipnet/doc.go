// Package gossipnet is the gossip port: memberlist's transport, made to
// work with members behind NAT.
//
// It owns what crosses the gossip port below memberlist: the sockets
// (NetTransport: UDP and TCP on one port, plus a don't-fragment socket
// for path MTU probes), the header sealed with the cluster key in front
// of every datagram (seal.go), routing each member's packets to where
// its packets come from (Transport), reflection requests on the relay
// port, path MTU probes, and both sides of the dialback protocol on the
// gossip port's streams.
//
// It knows nothing of what the gossip carries, nor of the cluster: no
// records, catalog, consensus, driver, nor mesh's configuration. What it
// must know of members (their published addresses, NAT status, header
// versions, identities and generations) the caller hands it as
// RouteHints; what it learns (sightings, reflections) the caller reads
// back. Deciding from these is mesh/reachability's (NAT assessment, the
// path MTU search) and mesh's (which address to advertise after a
// dialback). The bytes on the wire are shared with every agent version
// in a rolling upgrade: change them only with a new header version.
package gossipnet
