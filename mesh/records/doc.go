// Package records is what each member says about itself by gossip,
// signed with its identity key, and the replica of it every node holds.
//
// It owns the records (NodeInfo in memberlist's node metadata,
// NetworkEntry, RelaySession, Observation, NameRecord), their limits and
// validation, the signed envelope and the bytes of every gossip message,
// push/pull state and saved gossip file, and Replica: the records merged
// from gossip, each kept only if it is signed by the identity of the
// node it is about — the identity the catalog binds to the node's name
// or, before the catalog knows the node, the one its own info names. A
// member cannot speak for another, and these checks are why.
//
// It does not send or receive anything, hold a lock, or decide what a
// record means for the cluster: gossip (memberlist and mesh/gossipnet),
// consensus, liveness and publishing this node's own records are mesh's,
// which signs them with this package's Sign and stores them with the
// replica's SetOwn methods. Only mesh/catalog's name and subnet rules
// are used from the rest of wgmesh. The bytes here are shared with every
// agent version in a rolling upgrade and with the saved gossip on disk:
// change them only with a new protocol version.
package records
