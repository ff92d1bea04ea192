#!/usr/bin/env bash
# Builds Docker Compose v2 from its Go module, once, for the end-to-end
# suite, and prints the path of the binary (progress goes to stderr). The
# binary runs standalone as docker-compose, or as the CLI plugin
# docker-compose in a cli-plugins directory.
#
# The module comes through the go command (its GOPROXY), and is built
# with its own requirements, as .ci/engine29.sh builds the engine. A
# directory whose stamp file names this version is complete: the script
# then only prints the binary's path.
#
# WGMESH_COMPOSE_DIR overrides the cache directory. GO overrides the go
# command (default: what .ci/go.sh prints).
set -euo pipefail

compose_version=v2.40.3
# Bump when how the binary is built changes, so caches are rebuilt.
recipe=1

cache=${WGMESH_COMPOSE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wgmesh/compose}
want="docker/compose/v2 $compose_version
recipe $recipe"

complete() {
	[ -f "$cache/versions" ] && [ "$(cat "$cache/versions")" = "$want" ] && [ -x "$cache/docker-compose" ]
}

if complete; then
	echo "$cache/docker-compose"
	exit 0
fi

log() { echo "compose: $*" >&2; }

parent=$(dirname "$cache")
mkdir -p "$parent"
# One build at a time; a second caller waits and then finds it complete.
exec 9>"$cache.lock"
flock 9
if complete; then
	echo "$cache/docker-compose"
	exit 0
fi

here=$(cd "$(dirname "$0")" && pwd)
GO=${GO:-$("$here/go.sh")}
export GOTOOLCHAIN=local
export GOFLAGS=-buildvcs=false

stage=$(mktemp -d "$parent/.compose.XXXXXX")
work=$(mktemp -d "${TMPDIR:-/tmp}/wgmesh-compose.XXXXXX")
cleanup() {
	chmod -R u+w "$work" 2>/dev/null || true
	rm -rf "$work" "$stage"
}
trap cleanup EXIT

start=$(date +%s)
log "building Compose $compose_version into $cache (takes several minutes on 2 cores)"
dir=$(cd "$work" && "$GO" mod download -json "github.com/docker/compose/v2@$compose_version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
if [ -z "$dir" ] || [ ! -d "$dir" ]; then
	log "downloading github.com/docker/compose/v2@$compose_version failed"
	exit 1
fi
src=$work/compose
mkdir -p "$src"
cp -R "$dir/." "$src"
chmod -R u+w "$src"
# Module zips keep only vendor/modules.txt, which the go command refuses.
rm -rf "$src/vendor"
pkgv=github.com/docker/compose/v2/internal
(cd "$src" && CGO_ENABLED=0 "$GO" build -mod=mod -trimpath -tags "osusergo netgo" \
	-ldflags "-s -w -X $pkgv.Version=$compose_version" -o "$stage/docker-compose" ./cmd)
"$stage/docker-compose" version >&2
echo "$want" >"$stage/versions"
rm -rf "$cache"
mv "$stage" "$cache"
chmod 755 "$cache"
log "built in $(($(date +%s) - start)) s"
echo "$cache/docker-compose"
