package consensus

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/hashicorp/raft"

	"github.com/wgmesh/wgmesh/crypto"
)

// Config configures a Node.
type Config struct {
	Name     string
	Identity crypto.Identity
	TLS      *crypto.ClusterTLS
	// Addr is the address this node advertises (for registration).
	Addr netip.Addr
	// Dir holds Raft's log, stable store and snapshots, and this node's
	// generation counter. Empty keeps everything in memory (tests).
	Dir string
	// Listener accepts consensus connections; Advertise is where other
	// nodes reach it (host:port).
	Listener  net.Listener
	Advertise string
	// Dial opens connections; nil dials TCP.
	Dial       DialFunc
	Membership Membership
	Logger     *slog.Logger

	// Timing: Raft's base config (nil: production defaults), how long a
	// gossip view must stay the same before this node may bootstrap a
	// cluster, and how long the autopilot waits before replacing a dead
	// voter and dropping a dead non-voter.
	Raft                *raft.Config
	StableWait          time.Duration
	DeadVoterTimeout    time.Duration
	DeadNonvoterTimeout time.Duration
	// MaxVoters caps the voter set (3 or 5; default 5).
	MaxVoters int
	// Tick is how often the join and autopilot loop runs.
	Tick time.Duration
	// Server says whether this node may vote (servers.go); ServerKey,
	// when set, is the key that names the hosts that may.
	Server    ServerMode
	ServerKey []byte
}

// DefaultRaftConfig is Raft's timing for hosts across clouds: the library
// defaults are tuned for one LAN; these tolerate round trips of a few
// hundred milliseconds while still electing a new leader in seconds.
func DefaultRaftConfig() *raft.Config {
	c := raft.DefaultConfig()
	// Raft heartbeats every follower at a tenth of HeartbeatTimeout: at
	// 3 s, idle hosts exchange a few small messages a second, and a
	// failed leader is replaced within seconds (claims wait that long).
	c.HeartbeatTimeout = 3 * time.Second
	c.ElectionTimeout = 3 * time.Second
	c.LeaderLeaseTimeout = 1500 * time.Millisecond
	// An idle leader sends every follower an empty append every
	// CommitTimeout to tell it of commits; applyLocal tells them at once
	// with a barrier instead, so this only bounds a rare miss.
	c.CommitTimeout = time.Second
	c.SnapshotThreshold = 1024
	c.TrailingLogs = 1024
	c.SnapshotInterval = 60 * time.Second
	return c
}

func (c *Config) setDefaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Raft == nil {
		c.Raft = DefaultRaftConfig()
	}
	if c.StableWait == 0 {
		c.StableWait = 2 * time.Second
	}
	if c.DeadVoterTimeout == 0 {
		c.DeadVoterTimeout = 30 * time.Second
	}
	if c.DeadNonvoterTimeout == 0 {
		c.DeadNonvoterTimeout = 2 * time.Minute
	}
	if c.MaxVoters == 0 {
		c.MaxVoters = 5
	}
	if c.Tick == 0 {
		c.Tick = 250 * time.Millisecond
	}
}

func (c *Config) validate() error {
	switch {
	case c.Name == "":
		return errors.New("consensus: no node name")
	case c.Identity.IsZero():
		return errors.New("consensus: no identity")
	case c.TLS == nil:
		return errors.New("consensus: no TLS")
	case c.Listener == nil || c.Advertise == "":
		return errors.New("consensus: no listener or advertised address")
	case c.Membership == nil:
		return errors.New("consensus: no membership")
	case !c.Addr.IsValid():
		return errors.New("consensus: no address")
	case c.MaxVoters != 1 && c.MaxVoters != 3 && c.MaxVoters != 5:
		return fmt.Errorf("consensus: max voters %d is not 1, 3 or 5", c.MaxVoters)
	}
	if err := c.Server.validate(); err != nil {
		return err
	}
	return nil
}
