#!/usr/bin/env bash
# Builds Docker Engine 29 from Go modules, once, for the end-to-end suite,
# and prints the directory that holds it (progress goes to stderr):
#
#   dockerd, docker-proxy          github.com/moby/moby/v2         (Docker 29)
#   containerd, containerd-shim-runc-v2
#                                  github.com/containerd/containerd/v2
#   runc                           github.com/opencontainers/runc  (cgo, seccomp)
#   docker                         github.com/docker/cli           (the CLI)
#
# Modules come through the go command (its GOPROXY). A directory whose
# stamp file lists these versions is complete: the script then only
# prints it. A build goes to a staging directory that replaces the cache
# only when everything is built, so a failure leaves no stamp behind.
#
# WGMESH_ENGINE29_DIR overrides the cache directory. GO overrides the go
# command (default: what .ci/go.sh prints).
set -euo pipefail

# moby's v2 module carries Docker Engine's daemon. v2.0.0-beta.24 is Docker
# 29.8.1: its releases/versions.yaml has "last: 29.8.0, next: 29.8.1" and it
# was tagged the day docker/cli tagged v29.8.1. dockerd reports the version
# given at link time, so it is set here, as moby's hack/make/.go-autogen does.
moby_version=v2.0.0-beta.24
docker_version=29.8.1
containerd_version=v2.4.2
runc_version=v1.5.3
# docker/cli has no go.mod (its tags are +incompatible); it keeps its
# requirements in vendor.mod.
cli_version=v29.8.1+incompatible
# The one newer toolchain a module may ask for.
newer_toolchain=go1.27.3
# Bump when how the binaries are built changes, so caches are rebuilt.
recipe=2

cache=${WGMESH_ENGINE29_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/wgmesh/engine29}
binaries=(dockerd docker-proxy containerd containerd-shim-runc-v2 runc docker)
want="moby/moby/v2 $moby_version (docker $docker_version)
containerd/containerd/v2 $containerd_version
opencontainers/runc $runc_version
docker/cli $cli_version
recipe $recipe"

complete() {
	[ -f "$cache/versions" ] && [ "$(cat "$cache/versions")" = "$want" ] || return 1
	local b
	for b in "${binaries[@]}"; do
		[ -x "$cache/$b" ] || return 1
	done
}

if complete; then
	echo "$cache"
	exit 0
fi

log() { echo "engine29: $*" >&2; }

parent=$(dirname "$cache")
mkdir -p "$parent"
# One build at a time; a second caller waits and then finds it complete.
exec 9>"$cache.lock"
flock 9
if complete; then
	echo "$cache"
	exit 0
fi

here=$(cd "$(dirname "$0")" && pwd)
GO=${GO:-$("$here/go.sh")}
export GOTOOLCHAIN=local
# Flags of the caller's environment (such as -mod) must not reach builds of
# other modules.
export GOFLAGS=-buildvcs=false
go_minor() { # go1.26.8 or 1.26.8 -> 26
	local v=${1#go}
	v=${v#1.}
	echo "${v%%.*}"
}
local_go=$("$GO" env GOVERSION)

if ! pkg-config --exists libseccomp 2>/dev/null; then
	if [ "$(id -u)" != 0 ]; then
		log "runc needs libseccomp-dev and pkg-config; run as root to install them"
		exit 1
	fi
	log "installing libseccomp-dev pkg-config"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq </dev/null >&2
	apt-get install -y -qq --no-install-recommends libseccomp-dev pkg-config gcc libc6-dev </dev/null >&2
fi

stage=$(mktemp -d "$parent/.engine29.XXXXXX")
work=$(mktemp -d "${TMPDIR:-/tmp}/wgmesh-engine29.XXXXXX")
cleanup() {
	# Module copies are read-only where the module cache was.
	chmod -R u+w "$work" 2>/dev/null || true
	rm -rf "$work" "$stage"
}
trap cleanup EXIT

# source MOD VERSION: a writable copy of the module, ready to build in, on
# stdout. A copy, not `go install MOD@VERSION`: that refuses modules with
# replace directives, and docker/cli has no go.mod at all. Building in the
# copy uses the module's own requirements and go.sum, as a release does.
source_of() {
	local mod=$1 version=$2 dir src
	# Outside any module, so no go.mod or go.sum of the caller changes.
	dir=$(cd "$work" && "$GO" mod download -json "$mod@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	if [ -z "$dir" ] || [ ! -d "$dir" ]; then
		log "downloading $mod@$version failed"
		return 1
	fi
	src=$work/$(basename "$mod")-$version
	mkdir -p "$src"
	cp -R "$dir/." "$src"
	chmod -R u+w "$src"
	if [ ! -f "$src/go.mod" ] && [ -f "$src/vendor.mod" ]; then
		cp "$src/vendor.mod" "$src/go.mod"
		cp "$src/vendor.sum" "$src/go.sum"
	fi
	echo "$src"
}

# gobuild SRC OUT PKG ARGS...: go build in a module copy. A vendor
# directory is used if the module shipped one whole; module zips keep only
# vendor/modules.txt, which would make the go command refuse to build.
gobuild() {
	local src=$1 out=$2 pkg=$3 mode=-mod=mod need toolchain=local
	shift 3
	if [ -d "$src/vendor" ]; then
		if [ "$(find "$src/vendor" -mindepth 1 -maxdepth 1 | wc -l)" -gt 1 ]; then
			mode=-mod=vendor
		else
			rm -rf "$src/vendor"
		fi
	fi
	need=$(sed -n 's/^go \([0-9.]*\).*/\1/p' "$src/go.mod")
	if [ -n "$need" ] && [ "$(printf '%s\n%s\n' "${local_go#go}" "$need" | sort -V | tail -1)" != "${local_go#go}" ]; then
		if [ "$(go_minor "$need")" -gt "$(go_minor "$newer_toolchain")" ]; then
			log "$pkg needs Go $need, newer than $newer_toolchain"
			return 1
		fi
		toolchain=$newer_toolchain
	fi
	log "building $(basename "$out") from $pkg"
	(cd "$src" && GOTOOLCHAIN=$toolchain "$GO" build "$mode" -trimpath -o "$out" "$@" "$pkg")
}

start=$(date +%s)
buildtime=$(date -u +%Y-%m-%dT%H:%M:%SZ)
log "building into $cache (takes about 10 minutes on 2 cores)"

# dockerd and docker-proxy: static, no cgo, the tags of moby's hack/make.sh.
src=$(source_of github.com/moby/moby/v2 "$moby_version")
pkgv=github.com/moby/moby/v2/dockerversion
# GitCommit names the module version: module zips carry no commit.
ldflags="-s -w -X $pkgv.Version=$docker_version -X $pkgv.GitCommit=$moby_version -X $pkgv.BuildTime=$buildtime"
for cmd in dockerd docker-proxy; do
	CGO_ENABLED=0 gobuild "$src" "$stage/$cmd" ./cmd/"$cmd" -tags "netgo osusergo static_build nri_no_wasm" -ldflags "$ldflags"
done

# containerd and its runc shim: static, the tags of containerd's Makefile
# with STATIC=1.
src=$(source_of github.com/containerd/containerd/v2 "$containerd_version")
pkgv=github.com/containerd/containerd/v2/version
# The revision is the tag: module zips carry no commit.
ldflags="-s -w -X $pkgv.Version=$containerd_version -X $pkgv.Revision=$containerd_version -X $pkgv.Package=github.com/containerd/containerd/v2"
CGO_ENABLED=0 gobuild "$src" "$stage/containerd" ./cmd/containerd -tags "urfave_cli_no_docs osusergo netgo static_build" -ldflags "$ldflags"
CGO_ENABLED=0 gobuild "$src" "$stage/containerd-shim-runc-v2" ./cmd/containerd-shim-runc-v2 -tags "urfave_cli_no_docs osusergo netgo static_build no_grpc" -ldflags "$ldflags"

# runc: cgo with libseccomp, linked statically as runc's `make static`
# does. Without the libpathrs tag (it needs a Rust library) runc uses its
# pure-Go path resolution. Its version is embedded from its VERSION file.
src=$(source_of github.com/opencontainers/runc "$runc_version")
CGO_ENABLED=1 gobuild "$src" "$stage/runc" . -tags "seccomp urfave_cli_no_docs netgo osusergo" \
	-ldflags "-s -w -X main.gitCommit=$runc_version -linkmode external -extldflags -static"

# The CLI: Debian's 20.10 CLI speaks API 1.41, older than Engine 29 accepts.
src=$(source_of github.com/docker/cli "$cli_version")
pkgv=github.com/docker/cli/cli/version
cli_plain=${cli_version%+incompatible}
ldflags="-s -w -X $pkgv.Version=${cli_plain#v} -X $pkgv.GitCommit=$cli_plain -X $pkgv.BuildTime=$buildtime"
CGO_ENABLED=0 gobuild "$src" "$stage/docker" ./cmd/docker -tags "grpcnotrace osusergo netgo" -ldflags "$ldflags"

for b in "${binaries[@]}"; do
	[ -x "$stage/$b" ] || { log "$b was not built"; exit 1; }
done
"$stage/dockerd" --version >&2
"$stage/containerd" --version >&2
"$stage/runc" --version >&2
"$stage/docker" --version >&2
echo "$want" >"$stage/versions"
rm -rf "$cache"
mv "$stage" "$cache"
chmod 755 "$cache"
log "built in $(($(date +%s) - start)) s"
echo "$cache"
