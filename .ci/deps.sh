#!/usr/bin/env bash
# Installs the Debian packages that wgmesh's tests, demo and benchmarks
# use, if any is missing. Needs root only when something must be installed.
set -euo pipefail
# depmod and modprobe live in sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

# command -> package
declare -A want=(
	[dockerd]=docker.io
	[ip]=iproute2
	[nsenter]=util-linux
	[iptables]=iptables
	[ping]=iputils-ping
	[iperf3]=iperf3
	# make bench: GRO on the lab's underlay (lab.SetUnderlayGRO).
	[ethtool]=ethtool
	[wg]=wireguard-tools
	[tcpdump]=tcpdump
	[curl]=curl
	[unzip]=unzip
	[git]=git
	[gcc]=gcc
	# make vmtest: QEMU, and for the kernel it boots: apt-get download,
	# dpkg-deb, depmod and modprobe --show-depends, xz for the bzImage.
	[qemu-system-x86_64]=qemu-system-x86
	[depmod]=kmod
	[modprobe]=kmod
	[xz]=xz-utils
	[dpkg-deb]=dpkg
	# The systemd unit's test: systemd-analyze verify docs/wgmesh.service.
	[systemd-analyze]=systemd
)
missing=()
for cmd in "${!want[@]}"; do
	command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
# The lab's container image needs a static busybox.
if ! busybox_path=$(command -v busybox) || ! file -L "$busybox_path" 2>/dev/null | grep -q 'statically linked'; then
	missing+=(busybox-static file)
fi
# cgo (for -race) needs the C library headers.
[ -e /usr/include/stdio.h ] || missing+=(libc6-dev)

# Two commands may name one package.
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | grep .)

if ((${#missing[@]} == 0)); then
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	echo "deps: missing ${missing[*]}; run as root to install them" >&2
	exit 1
fi
echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq </dev/null >&2
apt-get install -y -qq --no-install-recommends ca-certificates "${missing[@]}" </dev/null >&2
