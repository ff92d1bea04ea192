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
type Writer struct {
	l *slog.Logger
	// quiet lines, those containing one of these, are logged at debug
	// level whatever their prefix says: failures that are expected.
	quiet []string
}

var _ io.Writer = Writer{}

// New returns a Writer logging to l. Lines that contain one of quiet are
// logged at debug level.
func New(l *slog.Logger, quiet ...string) Writer { return Writer{l, quiet} }

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
		for _, q := range w.quiet {
			if strings.Contains(msg, q) {
				level = min(level, slog.LevelDebug)
			}
		}
		w.l.Log(context.Background(), level, msg)
	}
	return len(p), nil
}

// StdLogger is a log.Logger for memberlist; lines that contain one of
// quiet are logged at debug level.
func StdLogger(l *slog.Logger, quiet ...string) *log.Logger { return log.New(New(l, quiet...), "", 0) }

// Hclog is an hclog.Logger for raft, at level (raft is chatty at debug).
func Hclog(l *slog.Logger, name string, level hclog.Level) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:        name,
		Level:       level,
		Output:      New(l),
		DisableTime: true,
	})
}
