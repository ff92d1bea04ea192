package consensus

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/wgmesh/wgmesh/mesh/catalog"
)

// metrics counts what consensus did and refused.
type metrics struct {
	leaderChanges atomic.Uint64
	configChanges atomic.Uint64

	mu        sync.Mutex
	refusals  map[string]uint64
	applies   map[string]uint64 // by op and code
	proposals map[catalog.Op]Durations
}

// Durations sums how long operations took.
type Durations struct {
	Count uint64        `json:"count"`
	Total time.Duration `json:"total_ns"`
	Max   time.Duration `json:"max_ns"`
}

// Stats are the counters, for status and metrics.
type Stats struct {
	LeaderChanges uint64                   `json:"leader_changes"`
	ConfigChanges uint64                   `json:"config_changes"`
	Refused       map[string]uint64        `json:"refused,omitempty"`
	Applied       map[string]uint64        `json:"applied,omitempty"`
	Proposals     map[catalog.Op]Durations `json:"proposals,omitempty"`
}

func newMetrics() *metrics {
	return &metrics{refusals: map[string]uint64{}, applies: map[string]uint64{}, proposals: map[catalog.Op]Durations{}}
}

func (m *metrics) refused(reason string) {
	m.mu.Lock()
	m.refusals[reason]++
	m.mu.Unlock()
}

func (m *metrics) applied(op catalog.Op, code catalog.Code) {
	key := string(op)
	if code != catalog.CodeOK {
		key += "/" + string(code)
	}
	m.mu.Lock()
	m.applies[key]++
	m.mu.Unlock()
}

func (m *metrics) proposal(op catalog.Op, d time.Duration) {
	m.mu.Lock()
	p := m.proposals[op]
	p.Count++
	p.Total += d
	p.Max = max(p.Max, d)
	m.proposals[op] = p
	m.mu.Unlock()
}

func (m *metrics) stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := Stats{LeaderChanges: m.leaderChanges.Load(), ConfigChanges: m.configChanges.Load(),
		Refused: map[string]uint64{}, Applied: map[string]uint64{}, Proposals: map[catalog.Op]Durations{}}
	for k, v := range m.refusals {
		s.Refused[k] = v
	}
	for k, v := range m.applies {
		s.Applied[k] = v
	}
	for k, v := range m.proposals {
		s.Proposals[k] = v
	}
	return s
}
