// Package logbridge routes the line-oriented logs of hashicorp libraries
// (memberlist's log.Logger, raft's hclog) into log/slog, mapping their
// "[DEBUG]", "[INFO]", "[WARN]", "[ERR]" and "[ERROR]" prefixes to levels.
package logbridge

import (
	"bytes"
	"context"
	"io"
	"log"
	"log/slog"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// Writer turns each line written to it into a record of l.
type Writer struct{ l *slog.Logger }

var _ io.Writer = Writer{}

// New returns a Writer logging to l.
func New(l *slog.Logger) Writer { return Writer{l} }

var prefixes = []struct {
	tag   string
	level slog.Level
}{
	{"[TRACE]", slog.LevelDebug - 4}, {"[DEBUG]", slog.LevelDebug}, {"[INFO]", slog.LevelInfo},
	{"[WARN]", slog.LevelWarn}, {"[ERR]", slog.LevelError}, {"[ERROR]", slog.LevelError},
}

func (w Writer) Write(p []byte) (int, error) {
	for _, line := range bytes.Split(bytes.TrimRight(p, "\n"), []byte("\n")) {
		msg := string(bytes.TrimSpace(line))
		if msg == "" {
			continue
		}
		level := slog.LevelInfo
		for _, pfx := range prefixes {
			if rest, ok := strings.CutPrefix(msg, pfx.tag); ok {
				msg, level = strings.TrimSpace(rest), pfx.level
				break
			}
		}
		msg = strings.TrimPrefix(msg, "memberlist: ")
		w.l.Log(context.Background(), level, msg)
	}
	return len(p), nil
}

// StdLogger is a log.Logger for memberlist.
func StdLogger(l *slog.Logger) *log.Logger { return log.New(New(l), "", 0) }

// Hclog is an hclog.Logger for raft, at level (raft is chatty at debug).
func Hclog(l *slog.Logger, name string, level hclog.Level) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:        name,
		Level:       level,
		Output:      New(l),
		DisableTime: true,
	})
}
