package sim

import (
	"context"
	"log/slog"
	"sync/atomic"
)

// Log messages of package mesh that the simulation counts. They are
// matched by text, so a rewording in mesh shows up as a zero count here.
const (
	msgClaimLost  = "address block claim lost"
	msgMemberDead = "member dead"
)

// events are counts of notable mesh log records, shared by every node.
type events struct {
	claimsLost, memberDeaths atomic.Int64
}

// countingHandler counts the records in events and hands those at min
// and above to next. It is enabled at every level so that mesh's debug
// records reach it whatever next does with them.
type countingHandler struct {
	next slog.Handler
	min  slog.Level
	ev   *events
}

var _ slog.Handler = (*countingHandler)(nil)

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *countingHandler) Handle(ctx context.Context, r slog.Record) error {
	switch r.Message {
	case msgClaimLost:
		h.ev.claimsLost.Add(1)
	case msgMemberDead:
		h.ev.memberDeaths.Add(1)
	}
	if r.Level < h.min || !h.next.Enabled(ctx, r.Level) {
		return nil
	}
	return h.next.Handle(ctx, r)
}

func (h *countingHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &countingHandler{next: h.next.WithAttrs(as), min: h.min, ev: h.ev}
}

func (h *countingHandler) WithGroup(name string) slog.Handler {
	return &countingHandler{next: h.next.WithGroup(name), min: h.min, ev: h.ev}
}
