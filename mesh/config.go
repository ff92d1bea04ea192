package mesh

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/hashicorp/go-sockaddr"
	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
	"github.com/wgmesh/wgmesh/mesh/catalog"
	"github.com/wgmesh/wgmesh/mesh/consensus"
	"github.com/wgmesh/wgmesh/mesh/records"
)

// Config configures a Mesh.
type Config struct {
	// Name is this node's name in the cluster; the cluster binds it to
	// Identity on first join.
	Name string
	// Identity is this node's identity key: it signs what the node
	// publishes and authenticates it to the cluster.
	Identity crypto.Identity
	// BindAddr and BindPort are where gossip listens (TCP and UDP).
	BindAddr string
	BindPort int
	// RaftPort is where consensus listens (TCP, mutual TLS); 0 means
	// BindPort+1.
	RaftPort int
	// AdvertiseAddr is the address peers use for gossip, consensus and
	// WireGuard; hosts behind NAT must set it. Empty: the bind address,
	// or else the first private address of this host.
	AdvertiseAddr string
	// Join lists seed addresses (host or host:port).
	Join []string
	// Keyring encrypts gossip and keys consensus TLS. Nil means no
	// encryption key, which the caller must have chosen explicitly.
	Keyring crypto.Keyring
	// PublicKey is this node's WireGuard public key.
	PublicKey crypto.PublicKey
	// WGMode is reported to peers ("kernel" or "userspace").
	WGMode string
	// StateDir holds the consensus log and this node's saved gossip.
	// Empty keeps everything in memory (tests).
	StateDir string
	Logger   *slog.Logger
	// Memberlist is the base memberlist configuration; nil means
	// memberlist.DefaultLANConfig. Name, addresses, delegates and
	// keyring are always set by Mesh.
	Memberlist *memberlist.Config
	// Transport overrides memberlist's network transport (tests).
	Transport memberlist.Transport
	// RaftListener and RaftDial override consensus networking (tests).
	RaftListener net.Listener
	RaftDial     consensus.DialFunc
	// Consensus tunes Raft and the autopilot; zero values take defaults.
	Consensus ConsensusTiming
	// ReconnectInterval is how often a node retries its seeds while alone
	// and tries to reach members it believes dead, which is how a
	// partition heals after memberlist has given up on the other side.
	ReconnectInterval time.Duration
	// DirectFanout: in clusters up to this size a node sends its own
	// changes straight to every member as well as gossiping them.
	DirectFanout int
	// LeaveOnShutdown makes Run leave the cluster when it stops, so that
	// peers drop this node at once. Off, peers keep their WireGuard
	// configuration through an agent restart.
	LeaveOnShutdown bool
	// LeaveTimeout bounds the graceful leave on shutdown.
	LeaveTimeout time.Duration
	// RelayPort and RelayPorts are the UDP ports this node relays on
	// for members that cannot reach each other, RelayPort to
	// RelayPort+RelayPorts-1; 0 relays nothing. The first answers
	// members asking how their gossip port is seen (package
	// reachability); the others carry the relay sessions, which the
	// driver serves. The node offers them only while members see it at
	// the address it advertises.
	RelayPort, RelayPorts uint16
	// Server and ServerKey say whether this node may vote in consensus
	// (consensus/servers.go): --server and --server-key-file.
	Server    consensus.ServerMode
	ServerKey []byte
	// PMTUInterval times path MTU probes to each member reached
	// directly (package reachability): a sixth of it between
	// confirmations, ten of it between searches for a larger value; 0
	// means 30 s, negative turns probing off.
	PMTUInterval time.Duration
	// NameTombstoneTTL is how long removed container names are
	// remembered (names.go); 0 means 5 minutes.
	NameTombstoneTTL time.Duration
}

// ConsensusTiming tunes consensus (see consensus.Config).
type ConsensusTiming struct {
	Raft                *raft.Config
	StableWait          time.Duration
	DeadVoterTimeout    time.Duration
	DeadNonvoterTimeout time.Duration
	Tick                time.Duration
	MaxVoters           int
}

func (c *Config) serverFeatures() uint32 {
	var f uint32
	switch c.Server {
	case consensus.ServerAlways:
		f |= records.FeatureServerAlways
	case consensus.ServerNever:
		f |= records.FeatureServerNever
	}
	if len(c.ServerKey) > 0 {
		f |= records.FeatureServerKey
	}
	return f
}

// DefaultConfig returns defaults for a LAN or a set of cloud hosts.
func DefaultConfig() Config {
	host, _ := os.Hostname()
	return Config{
		Name:              host,
		BindAddr:          "0.0.0.0",
		BindPort:          7946,
		ReconnectInterval: 5 * time.Second,
		DirectFanout:      32,
		LeaveTimeout:      2 * time.Second,
	}
}

// Validate checks the configuration.
func (c *Config) Validate() error {
	if err := catalog.ValidName(c.Name); err != nil {
		return fmt.Errorf("node name: %w", err)
	}
	if c.Identity.IsZero() {
		return errors.New("no identity key")
	}
	if c.BindPort < 0 || c.BindPort > 65535 {
		return fmt.Errorf("gossip port %d out of range", c.BindPort)
	}
	if c.RaftPort < 0 || c.RaftPort > 65535 || c.RaftPort == 0 && c.BindPort == 65535 {
		return fmt.Errorf("consensus port %d out of range", c.RaftPort)
	}
	if net.ParseIP(c.BindAddr) == nil {
		return fmt.Errorf("bind address %q is not an IP address", c.BindAddr)
	}
	if c.AdvertiseAddr != "" {
		a, err := netip.ParseAddr(c.AdvertiseAddr)
		if err != nil || a.IsUnspecified() {
			return fmt.Errorf("advertise address %q is not a usable IP address", c.AdvertiseAddr)
		}
	}
	if c.PublicKey.IsZero() {
		return errors.New("no WireGuard public key")
	}
	if c.ReconnectInterval <= 0 {
		return errors.New("reconnect interval must be positive")
	}
	if c.RelayPort == 0 && c.RelayPorts != 0 || c.RelayPort != 0 && (c.RelayPorts < 2 || int(c.RelayPort)+int(c.RelayPorts) > 65536) {
		return fmt.Errorf("relay ports %d to %d: want at least two, within 1 to 65535", c.RelayPort, int(c.RelayPort)+int(c.RelayPorts)-1)
	}
	return nil
}

func (c *Config) raftPort() int {
	if c.RaftPort != 0 {
		return c.RaftPort
	}
	return c.BindPort + 1
}

// advertiseAddr picks the address peers reach this node at, the way
// memberlist would, but before memberlist starts: the address goes into
// this node's metadata.
func advertiseAddr(cfg Config) (netip.Addr, error) {
	if cfg.AdvertiseAddr != "" {
		return netip.ParseAddr(cfg.AdvertiseAddr)
	}
	if a, err := netip.ParseAddr(cfg.BindAddr); err == nil && !a.IsUnspecified() {
		return a, nil
	}
	ip, err := sockaddr.GetPrivateIP()
	if err != nil {
		return netip.Addr{}, fmt.Errorf("finding an address to advertise: %w", err)
	}
	if ip == "" {
		return netip.Addr{}, errors.New("no private address to advertise; set --advertise-addr")
	}
	return netip.ParseAddr(ip)
}
