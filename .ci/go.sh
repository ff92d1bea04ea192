#!/usr/bin/env bash
# Prints the path of a Go toolchain new enough for go.mod: the go on PATH
# or in /usr/local/go if it is. A go that is too old but knows toolchain
# switching (Go 1.21 or newer) fetches the release through its own module
# proxy setting (go env GOPROXY); with none of these, this fails and says
# what to install.
set -euo pipefail
need_minor=26
release=go1.26.8

minor() { # GOVERSION of a go -> its minor version, or nothing
	local v
	v=$("$1" env GOVERSION 2>/dev/null) || return 0
	v=${v#go1.}
	echo "${v%%.*}" | grep -E '^[0-9]+$' || true
}

candidates=("$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go /usr/lib/go/bin/go)
for go in "${candidates[@]}"; do
	if [ -n "$go" ] && [ -x "$go" ] && m=$(minor "$go") && [ -n "$m" ] && [ "$m" -ge "$need_minor" ]; then
		echo "$go"
		exit 0
	fi
done

for go in "${candidates[@]}"; do
	if [ -n "$go" ] && [ -x "$go" ] && m=$(minor "$go") && [ -n "$m" ] && [ "$m" -ge 21 ]; then
		echo "go.sh: $go is older than Go 1.$need_minor; it fetches $release" >&2
		root=$(cd / && GOTOOLCHAIN=$release "$go" env GOROOT) || root=
		if [ -x "$root/bin/go" ]; then
			echo "$root/bin/go"
			exit 0
		fi
	fi
done

echo "go.sh: wgmesh needs Go 1.$need_minor or newer, and none was found on PATH or in /usr/local/go." >&2
echo "go.sh: install an official Go release of 1.$need_minor or newer and run this again." >&2
exit 1
