package mesh

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/wgmesh/wgmesh/internal/durable"
	"github.com/wgmesh/wgmesh/mesh/records"
)

// The gossip records a node knows are saved, so that after an agent
// restart its WireGuard peers are configured at once, before gossip has
// caught up: a kernel WireGuard link that outlived the agent keeps its
// sessions. Nothing here is trusted more than gossip: the saved records
// are signed, checked again when loaded, and used only where the catalog
// vouches for them. This node's own entries are not kept; the driver
// publishes them again when it restores its networks. Its own names are
// (names.go).

const gossipFile = "gossip.json"

// saveEvery throttles saving the gossip records.
const saveEvery = 5 * time.Second

func (m *Mesh) gossipPath() string { return filepath.Join(m.cfg.StateDir, gossipFile) }

func (m *Mesh) loadGossip() error {
	if m.cfg.StateDir == "" {
		return nil
	}
	b, err := os.ReadFile(m.gossipPath())
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	s, err := records.DecodeStateMsg(b)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, si := range s.Infos {
		n, err := records.DecodeInfo(si)
		if err != nil {
			continue
		}
		m.state.rep.MergeInfo(n, si, m.bound)
	}
	for _, e := range s.Entries {
		m.state.rep.MergeEntry(e, m.bound)
	}
	for _, r := range s.Sessions {
		m.state.rep.MergeSession(r, m.bound)
	}
	now := time.Now()
	for _, n := range s.Names {
		rec, err := records.DecodeName(n)
		switch {
		case err != nil:
		case rec.Node != m.cfg.Name:
			m.state.rep.MergeName(n, m.bound, now)
		case m.cfg.Identity.ID().Verify(records.PurposeName, n.Data, n.Sig):
			// This node's own, from its last run.
			m.state.rep.SetOwnName(rec, n, now)
		}
	}
	return nil
}

func (m *Mesh) saveGossipThrottled() {
	m.mu.Lock()
	due := m.state.gossipDirty && time.Since(m.state.lastSave) >= saveEvery
	m.mu.Unlock()
	if due {
		m.saveGossip()
	}
}

// saveGossip writes the records if they changed. It is best effort: the
// file only speeds up a restart.
func (m *Mesh) saveGossip() {
	if m.cfg.StateDir == "" {
		return
	}
	m.mu.Lock()
	if !m.state.gossipDirty {
		m.mu.Unlock()
		return
	}
	s := m.state.rep.Snapshot(true)
	var others []records.Signed
	for _, e := range s.Entries {
		if ne, err := records.DecodeEntry(e); err == nil && ne.Node != m.cfg.Name {
			others = append(others, e)
		}
	}
	s.Entries = others
	var sessions []records.Signed
	for _, r := range s.Sessions {
		if rs, err := records.DecodeSession(r); err == nil && rs.Relay != m.cfg.Name {
			sessions = append(sessions, r)
		}
	}
	s.Sessions = sessions
	m.state.gossipDirty = false
	m.state.lastSave = time.Now()
	m.mu.Unlock()
	if err := durable.WriteFile(m.gossipPath(), mustJSON(s), 0o600); err != nil {
		m.log.Warn("saving gossip records", "path", m.gossipPath(), "err", err)
	}
}
