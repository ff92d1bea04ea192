#!/usr/bin/env bash
# Prints the path of a Go toolchain new enough for go.mod. Uses the go on
# PATH or in /usr/local/go if it is; otherwise fetches the official
# toolchain from the Go module proxy into ~/.cache/wgmesh (no Debian
# release packages a new enough Go).
set -euo pipefail
need_minor=26
release=go1.26.8

usable() {
	local v
	v=$("$1" env GOVERSION 2>/dev/null) || return 1
	v=${v#go}
	[ "${v%%.*}" -gt 1 ] || [ "$(echo "$v" | cut -d. -f2)" -ge "$need_minor" ]
}

for go in "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go; do
	if [ -n "$go" ] && [ -x "$go" ] && usable "$go"; then
		echo "$go"
		exit 0
	fi
done

cache=${XDG_CACHE_HOME:-$HOME/.cache}/wgmesh
root=$cache/golang.org/toolchain@v0.0.1-$release.linux-amd64
if [ ! -x "$root/bin/go" ]; then
	echo "go.sh: fetching $release from ${GOPROXY_URL:-https://proxy.golang.org}" >&2
	mkdir -p "$cache"
	zip=$cache/$release.zip
	curl -fsSL --retry 3 -o "$zip" "${GOPROXY_URL:-https://proxy.golang.org}/golang.org/toolchain/@v/v0.0.1-$release.linux-amd64.zip"
	unzip -q -o "$zip" -d "$cache"
	rm -f "$zip"
	chmod +x "$root"/bin/* "$root"/pkg/tool/*/* 2>/dev/null || true
fi
echo "$root/bin/go"
