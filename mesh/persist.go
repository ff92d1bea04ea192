package mesh

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/wgmesh/wgmesh/internal/durable"
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
	s, err := decodeStateMsg(b)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, si := range s.Infos {
		n, err := decodeInfo(si)
		if err != nil {
			continue
		}
		m.rep.mergeInfo(n, si, m.bound)
	}
	for _, e := range s.Entries {
		m.rep.mergeEntry(e, m.bound)
	}
	for _, r := range s.Sessions {
		m.rep.mergeSession(r, m.bound)
	}
	now := time.Now()
	for _, n := range s.Names {
		rec, err := decodeName(n)
		switch {
		case err != nil:
		case rec.Node != m.cfg.Name:
			m.rep.mergeName(n, m.bound, now)
		case m.cfg.Identity.ID().Verify(purposeName, n.Data, n.Sig):
			// This node's own, from its last run.
			m.rep.setOwnName(rec, n, now)
		}
	}
	return nil
}

// decodeInfo decodes a saved info and checks its self-signature.
func decodeInfo(s signed) (NodeInfo, error) {
	n, _, err := decodeMeta(encodeMeta(s))
	return n, err
}

func (m *Mesh) saveGossipThrottled() {
	m.mu.Lock()
	due := m.gossipDirty && time.Since(m.lastSave) >= saveEvery
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
	if !m.gossipDirty {
		m.mu.Unlock()
		return
	}
	s := m.rep.snapshot(true)
	var others []signed
	for _, e := range s.Entries {
		if ne, err := decodeEntry(e); err == nil && ne.Node != m.cfg.Name {
			others = append(others, e)
		}
	}
	s.Entries = others
	var sessions []signed
	for _, r := range s.Sessions {
		if rs, err := decodeSession(r); err == nil && rs.Relay != m.cfg.Name {
			sessions = append(sessions, r)
		}
	}
	s.Sessions = sessions
	m.gossipDirty = false
	m.lastSave = time.Now()
	m.mu.Unlock()
	if err := durable.WriteFile(m.gossipPath(), mustJSON(s), 0o600); err != nil {
		m.log.Warn("saving gossip records", "path", m.gossipPath(), "err", err)
	}
}
