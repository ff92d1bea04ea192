package catalog

import (
	"errors"
	"fmt"
	"net/netip"
)

// Code classifies a refused command, so that callers can tell the user
// what to do.
type Code string

const (
	CodeOK              Code = ""
	CodeInvalid         Code = "invalid"
	CodeBadSignature    Code = "bad-signature"
	CodeNotRegistered   Code = "not-registered"
	CodeNameTaken       Code = "name-taken"
	CodeIdentityInUse   Code = "identity-in-use"
	CodeRolledBack      Code = "rolled-back"
	CodeForgotten       Code = "forgotten"
	CodeStale           Code = "stale"
	CodeNoNetwork       Code = "no-network"
	CodeNetworkConflict Code = "network-conflict"
	CodeNoFreeBlock     Code = "no-free-block"
	CodeBlockTaken      Code = "block-taken"
	CodeNotInitialised  Code = "not-initialised"
	// Codes of protocol 2 (see Protocol). wgmesh before it shows them
	// as the message they come with.
	CodeNotEndorsed Code = "not-endorsed"
	CodeAlive       Code = "alive"
	CodeInUse       Code = "in-use"
	CodeLimit       Code = "limit"
	CodeOutdated    Code = "outdated"
)

// Result is a command's outcome.
type Result struct {
	Code    Code         `json:"code,omitempty"`
	Message string       `json:"message,omitempty"`
	Block   netip.Prefix `json:"block,omitzero"`
	Network *Network     `json:"network,omitempty"`
}

// Err returns the refusal as an error, or nil.
func (r Result) Err() error {
	if r.Code == CodeOK {
		return nil
	}
	return &Error{Code: r.Code, Message: r.Message}
}

func refuse(code Code, format string, args ...any) Result {
	return Result{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Error is a refused command.
type Error struct {
	Code    Code
	Message string
}

func (e *Error) Error() string { return e.Message }

// Is makes errors.Is(err, &Error{Code: c}) match any refusal with code c.
func (e *Error) Is(target error) bool {
	var t *Error
	return errors.As(target, &t) && t.Message == "" && t.Code == e.Code
}

// Sentinels for errors.Is.
var (
	ErrInvalid         = &Error{Code: CodeInvalid}
	ErrNameTaken       = &Error{Code: CodeNameTaken}
	ErrIdentityInUse   = &Error{Code: CodeIdentityInUse}
	ErrRolledBack      = &Error{Code: CodeRolledBack}
	ErrForgotten       = &Error{Code: CodeForgotten}
	ErrNotRegistered   = &Error{Code: CodeNotRegistered}
	ErrBadSignature    = &Error{Code: CodeBadSignature}
	ErrStale           = &Error{Code: CodeStale}
	ErrNoNetwork       = &Error{Code: CodeNoNetwork}
	ErrNetworkConflict = &Error{Code: CodeNetworkConflict}
	ErrNoFreeBlock     = &Error{Code: CodeNoFreeBlock}
	ErrBlockTaken      = &Error{Code: CodeBlockTaken}
	ErrNotInitialised  = &Error{Code: CodeNotInitialised}
	ErrNotEndorsed     = &Error{Code: CodeNotEndorsed}
	ErrAlive           = &Error{Code: CodeAlive}
	ErrInUse           = &Error{Code: CodeInUse}
	ErrLimit           = &Error{Code: CodeLimit}
	ErrOutdated        = &Error{Code: CodeOutdated}
)

func invalid(format string, args ...any) error {
	return &Error{Code: CodeInvalid, Message: fmt.Sprintf(format, args...)}
}
