#!/bin/bash
# Run a script inside an arm64 "L1" Linux guest that QEMU TCG emulates with
# virtualization (EL2) and a GICv3 (`-M virt,virtualization=on,gic-version=3
# -cpu max`), so L1 has a real, nested arm64 /dev/kvm. tern's aarch64 scenarios
# run this way on x86_64 hosts; on an ARM64 host with KVM they run directly.
#
#   tools/nest-aarch64.sh -s SCRIPT [FILE|DIR ...]
#
# FILEs/DIRs go to /nest in L1 (the script's working directory). Binaries must be
# static (tern's cross build is: see .cargo/config.toml). SCRIPT runs with busybox
# sh, stdin /dev/null.
# Console (stdout): "NEST L1 UP uptime=<s>", "NEST KVM ok|MISSING",
# "NEST CMD START", the script's output, "NEST EXIT rc=<N>".
# Exit status: N, or 255 if L1 never printed NEST EXIT (panic, timeout, ...).
#
# Environment: L1_KERNEL (an arm64 Image with KVM built in, required: the arm64
# test kernel of ../shared/guest/aarch64 is one, and so is Debian's cloud-arm64 kernel
# that tools/make-guest.sh --arch aarch64 unpacks), L1_MODULES (a directory of .ko files
# and an `order` file naming them in load order, which L1 loads: make-guest.sh's
# nest-modules/ for Debian's kernel, whose tun is a module), TERN_CACHE (default ~/.cache/tern),
# L1_MEM (MiB, default 2048; must exceed what an L2 guest maps), L1_SMP (2),
# L1_APPEND, L1_GIC (3, or 2 to give L1 a GICv2 and so test tern's GICv2 fallback),
# NEST_TIMEOUT (s, default 1200), NEST_IDLE (s: kill an L1 silent that
# long; off by default), NEST_QEMU_ARGS, NEST_LOG (copy of the console, default
# $TERN_CACHE/nest-aarch64/last-console.log), NEST_REBUILD=1.
# Needs: qemu-system-aarch64 (qemu-system-arm), cpio, apt-get with the arm64
# architecture (for busybox-static:arm64, downloaded, not installed).
set -euo pipefail

ME=${0##*/}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=SCRIPTDIR/lib-nest.sh
. "$HERE/lib-nest.sh"
die() { echo "$ME: $*" >&2; exit 255; }
usage() { echo "usage: $ME -s SCRIPT [FILE|DIR ...]  (see the header of $0)" >&2; exit 2; }

SCRIPT=
while getopts 's:h' o; do
    case $o in s) SCRIPT=$OPTARG ;; *) usage ;; esac
done
shift $((OPTIND - 1))
[ -n "$SCRIPT" ] || usage
[ -f "$SCRIPT" ] || die "no such script: $SCRIPT"
for f in "$@"; do [ -e "$f" ] || die "no such file: $f"; done
for t in qemu-system-aarch64 cpio timeout; do
    command -v "$t" >/dev/null || die "needs $t"
done
[ -n "${L1_KERNEL:-}" ] && [ -f "$L1_KERNEL" ] ||
    die "set L1_KERNEL to an arm64 Image with KVM built in (e.g. ../shared/guest/aarch64/Image)"

TERN_CACHE=${TERN_CACHE:-$HOME/.cache/tern}
C=$TERN_CACHE/nest-aarch64
BASE=$C/base.cpio
mkdir -p "$C"
# shellcheck source=SCRIPTDIR/lib-arm64-busybox.sh
. "$HERE/lib-arm64-busybox.sh"
BUSYBOX=$(arm64_busybox "$C/busybox") || die "no arm64 busybox"

# ---- the cached base initramfs: busybox, /init ---------------------------------
if [ "${NEST_REBUILD:-0}" = 1 ] || [ ! -f "$BASE" ] || [ "$0" -nt "$BASE" ] || [ "$HERE/lib-nest.sh" -nt "$BASE" ] ||
   [ "$BUSYBOX" -nt "$BASE" ]; then
    echo "$ME: building the L1 base initramfs" >&2
    R=$C/base.root; rm -rf "$R"
    mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,etc,nest}
    cp "$BUSYBOX" "$R/bin/busybox"; ln -s busybox "$R/bin/sh"
    nest_write_init "$R/init"
    (cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$BASE.tmp"
    mv "$BASE.tmp" "$BASE"
    rm -rf "$R"
fi

# ---- the per-run cpio: /nest/<files>, /nest-cmd.sh ----------------------------
RUN=$(mktemp -d "${TMPDIR:-/tmp}/tern-nest-arm64.XXXXXX")
trap 'rm -rf "$RUN"' EXIT
mkdir -p "$RUN/root/nest"
for f in "$@"; do cp -a "$f" "$RUN/root/nest/"; done
if [ -n "${L1_MODULES:-}" ]; then
    [ -f "$L1_MODULES/order" ] || die "L1_MODULES=$L1_MODULES has no order file"
    mkdir -p "$RUN/root/lib/modules/nest" "$RUN/root/etc"
    while read -r m; do cp "$L1_MODULES/$m.ko" "$RUN/root/lib/modules/nest/"; done < "$L1_MODULES/order"
    cp "$L1_MODULES/order" "$RUN/root/etc/nest-modules"
fi
cp "$SCRIPT" "$RUN/root/nest-cmd.sh"
(cd "$RUN/root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$RUN/run.cpio"
cat "$BASE" "$RUN/run.cpio" > "$RUN/initramfs.cpio"

# ---- boot L1 under TCG ------------------------------------------------------------
LOG=$RUN/console.log
: > "$LOG"
nest_watchdog
set +e
# shellcheck disable=SC2086
timeout -k 5 "${NEST_TIMEOUT:-1200}" qemu-system-aarch64 -accel tcg \
    -M "virt,virtualization=on,gic-version=${L1_GIC:-3}" -cpu max \
    -m "${L1_MEM:-2048}" -smp "${L1_SMP:-2}" -nographic -no-reboot -nodefaults -no-user-config \
    -serial stdio -kernel "$L1_KERNEL" -initrd "$RUN/initramfs.cpio" $(nest_monitor_args) ${NEST_QEMU_ARGS:-} \
    -append "console=ttyAMA0 panic=-1 quiet loglevel=4 $(nest_append)" </dev/null 2>&1 |
    sed -u 's/\r//g' | tee -a "$LOG"
qrc=${PIPESTATUS[0]}
set -e
nest_finish "$qrc" "${NEST_LOG:-$C/last-console.log}"
