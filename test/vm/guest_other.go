//go:build !linux

package vm

// IsGuest reports false: the guest side runs only on Linux.
func IsGuest() bool { return false }

// GuestMain is only for Linux guests.
func GuestMain() { panic("vm: the guest side runs only on Linux") }
