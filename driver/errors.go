package driver

import (
	"errors"
	"fmt"
)

// Kind classifies errors the way Docker's errdefs do, so that logs and
// status can tell a user's mistake from a fault of the host.
type Kind int

const (
	KindSystem Kind = iota
	KindInvalidParameter
	KindNotFound
	KindForbidden
)

func (k Kind) String() string {
	switch k {
	case KindInvalidParameter:
		return "invalid parameter"
	case KindNotFound:
		return "not found"
	case KindForbidden:
		return "forbidden"
	}
	return "system"
}

// Error is an error with a Kind. Docker shows its message to the user
// verbatim, so messages say what to do and never contain secrets.
type Error struct {
	Kind Kind
	Err  error
}

func (e *Error) Error() string { return e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

func invalidParam(format string, args ...any) error {
	return &Error{KindInvalidParameter, fmt.Errorf(format, args...)}
}

func notFound(format string, args ...any) error {
	return &Error{KindNotFound, fmt.Errorf(format, args...)}
}

func forbidden(format string, args ...any) error {
	return &Error{KindForbidden, fmt.Errorf(format, args...)}
}

// KindOf returns err's Kind; errors without one are system errors.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return KindSystem
}
