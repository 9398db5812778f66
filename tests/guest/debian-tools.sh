#!/bin/sh
# debian-tools.sh OUT.img [FILE...]: a tar image (a read-only drive for a test guest) holding
# Debian's lspci and dmidecode for $TERN_GUEST_ARCH (x86_64 or aarch64) with the shared
# libraries they load, and FILEs. The guest unpacks it with `tar -xf /dev/vdX -C /t` and runs
# `/t/run lspci -n`: /t/run starts a tool through the bundled dynamic loader, so the busybox
# guest needs no libc of its own. The packages are downloaded once into
# $TERN_CACHE/debian-tools/ARCH (tools/lib-debian-bundle.sh).
set -eu
OUT=$1; shift
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../../tools/lib-debian-bundle.sh
. "$HERE/../../tools/lib-debian-bundle.sh"
ARCH=${TERN_GUEST_ARCH:-x86_64}
debb_arch "$ARCH"
CACHE=${TERN_CACHE:-$HOME/.cache/tern}/debian-tools/$ARCH
debb_fetch "$CACHE" pciutils dmidecode

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin"
cp "$CACHE/root/usr/bin/lspci" "$CACHE/root/usr/sbin/dmidecode" "$STAGE/bin/"
debb_libs "$CACHE" "$STAGE/lib" "$STAGE/bin/lspci" "$STAGE/bin/dmidecode"
debb_runner "$STAGE/run"
for f in "$@"; do cp "$f" "$STAGE/"; done
tar -cf "$OUT" -C "$STAGE" .
# A whole number of sectors for the block device (tar reads the zeros as its end).
truncate -s %4096 "$OUT"
