package catalog

// Bounds on what members can make the catalog hold. Every replica keeps
// the whole catalog in memory, writes it to disk, and sends it to every
// joining host as a snapshot (at most maxSnapshotBytes): a table any
// member can grow without bound would, past that size, keep every new
// host out. Commands that would exceed a bound are refused with
// CodeLimit (entries of protocol 2 and later; see Protocol).
const (
	// MaxNodes bounds node records. Registering needs only an identity
	// the registering host makes itself, so one member holding the
	// cluster key could register identities without end: the bound is
	// on the whole table. A record goes away with `wgmesh forget`.
	MaxNodes = 2048
	// MaxNetworksPerNode bounds the live networks one member created.
	MaxNetworksPerNode = 64
	// MaxNetworks bounds network records, live and deleted. A deleted
	// network's record (its tombstone) only tells hosts to remove their
	// copies; when the table is full, creating a network drops the
	// oldest tombstone, and only live networks can fill it.
	MaxNetworks = 1024
	// MaxBlocksPerNode bounds the blocks one member owns in one
	// network: at the smallest default block size (/28) that is 16384
	// addresses, far more than one host runs containers.
	MaxBlocksPerNode = 1024
	// MaxAux bounds a network's --aux-address reservations.
	MaxAux = 256
	// MaxForgotten bounds the tombstones of forgotten identities. When
	// it is reached, a forget drops the oldest tombstone (by the log
	// index of the forget): that identity could then register again,
	// which matters only for a host forgotten long ago that comes back
	// with its old state directory.
	MaxForgotten = 1024
)
