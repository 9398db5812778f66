#!/bin/bash
# Build tern's test/demo guest from Debian packages only (no /work/shared):
#   $OUT/bzImage            Debian's cloud kernel (linux-image-<kver>-cloud-amd64)
#   $OUT/initramfs.cpio.gz  busybox-static + applet links, /init = guest/init,
#                           /dev/console, /dev/null
#   $OUT/initramfs-virtio.cpio.gz  the same plus the kernel's virtio modules (mmio, pci, blk,
#                           net, rng, balloon, vsock) in /lib/modules/tern, which
#                           guest/init loads; it also mounts root= and switches to it
#   $OUT/rootfs.ext4        the same tree (with the modules) as an ext4 root
#                           filesystem, /sbin/init = guest/init
#   $OUT/vmlinux            the same kernel as an ELF (extracted from bzImage by
#                           tools/extract-vmlinux.py; it keeps the PVH note)
#   $OUT/cmdline            a recommended kernel command line
# OUT defaults to $TERN_CACHE/guest (TERN_CACHE: ~/.cache/tern). L1_KVER pins
# the kernel version. Outputs newer than their inputs are left alone.
#
# The cloud kernel has virtio (blk/net/mmio/...) as modules: use initramfs-virtio
# with it for devices (and to boot rootfs.ext4: root=/dev/vda with that initramfs).
#
# --arch aarch64 builds the arm64 guest the same way into OUT (default
# $TERN_CACHE/guest/aarch64): Debian's linux-image-<kver>-cloud-arm64 (ARM64_KVER pins it)
# as $OUT/Image (an uncompressed arm64 Image; KVM is built in, so the arm64 nest boots it
# as L1 too), busybox-static:arm64 (downloaded, not installed), the same initramfs,
# initramfs-virtio and rootfs.ext4, and $OUT/nest-modules/ (tun and its dependencies,
# for L1: tools/nest-aarch64.sh's L1_MODULES).
# Needs: busybox-static, cpio, gzip, kmod (modprobe), e2fsprogs (mke2fs), apt-get, python3, binutils
# (readelf), and zstd or lz4 if the kernel is compressed that way; root only
# for mknod (without it /init takes its console from devtmpfs).
set -euo pipefail

ME=${0##*/}
HERE=$(cd "$(dirname "$0")" && pwd)
INIT=$HERE/../guest/init
BUSYBOX=/bin/busybox
# shellcheck source=SCRIPTDIR/lib-debian-kernel.sh
. "$HERE/lib-debian-kernel.sh"
ARCH=x86_64
if [ "${1:-}" = --arch ]; then ARCH=${2:-}; fi
case $ARCH in
    x86_64) OUT=${OUT:-$TERN_CACHE/guest} ;;
    aarch64) OUT=${OUT:-$TERN_CACHE/guest/aarch64} ;;
    *) echo "$ME: unknown architecture '$ARCH' (x86_64 or aarch64)" >&2; exit 2 ;;
esac
EPOCH=${SOURCE_DATE_EPOCH:-1704067200}      # fixed timestamps: same bytes each build

[ -f "$INIT" ] || { echo "$ME: missing $INIT" >&2; exit 1; }
[ -x "$BUSYBOX" ] || { echo "$ME: needs busybox-static ($BUSYBOX)" >&2; exit 1; }
mkdir -p "$OUT"

# pack_tree ROOT OUTPUT: ROOT as a reproducible gzip'd newc cpio
pack_tree() {
    find "$1" -exec touch -h -d "@$EPOCH" {} +
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n > "$2.tmp"
    mv "$2.tmp" "$2"
}

GUEST_BUSYBOX=$BUSYBOX
if [ "$ARCH" = aarch64 ]; then
    # shellcheck source=SCRIPTDIR/lib-arm64-busybox.sh
    . "$HERE/lib-arm64-busybox.sh"
    GUEST_BUSYBOX=$(arm64_busybox "$OUT/busybox")
fi

KVER=$(debk_kver "$ARCH")
KROOT=$(debk_fetch "$KVER")

# newer OUTPUT INPUT...: true if OUTPUT exists and is newer than every INPUT
newer() {
    local o=$1 i; shift
    [ -e "$o" ] || return 1
    for i in "$@"; do [ "$o" -nt "$i" ] || return 1; done
}

# (dpkg -x keeps the package's old mtimes: compare the version as well)
# Debian's arm64 vmlinuz is an uncompressed Image (older releases gzip it: unpacked here).
KIMAGE=bzImage; [ "$ARCH" = aarch64 ] && KIMAGE=Image
if newer "$OUT/$KIMAGE" "$KROOT/boot/vmlinuz-$KVER" &&
   [ "$(cat "$OUT/kernel-version" 2>/dev/null)" = "$KVER" ]; then
    echo "$ME: $KIMAGE is up to date"
else
    if [ "$ARCH" = aarch64 ] && gzip -t "$KROOT/boot/vmlinuz-$KVER" 2>/dev/null; then
        gzip -dc "$KROOT/boot/vmlinuz-$KVER" > "$OUT/$KIMAGE.tmp"
    else
        cp "$KROOT/boot/vmlinuz-$KVER" "$OUT/$KIMAGE.tmp"
    fi
    mv "$OUT/$KIMAGE.tmp" "$OUT/$KIMAGE"
    echo "$KVER" > "$OUT/kernel-version"
fi

# copy_modules KROOT KVER DIR LIST MODULE...: each module and its dependencies (modprobe
# resolves modules.dep), dependencies first, as plain .ko files in DIR (busybox insmod wants
# them uncompressed), their names in load order appended to LIST.
copy_modules() {
    local kroot=$1 kver=$2 dir=$3 list=$4 m deps p b; shift 4
    mkdir -p "$dir"; touch "$list"
    for m in "$@"; do
        deps=$(modprobe -C /dev/null -d "$kroot" -S "$kver" --show-depends "$m") ||
            { echo "$ME: module $m is not in $kver" >&2; return 1; }
        for p in $(printf '%s\n' "$deps" | sed -n 's/^insmod \([^ ]*\).*/\1/p'); do
            b=${p##*/}; b=${b%%.ko*}
            grep -qx "$b" "$list" && continue
            case $p in
                *.ko.xz)  xz -dc "$p" ;;
                *.ko.zst) zstd -qdc "$p" ;;
                *)        cat "$p" ;;
            esac > "$dir/$b.ko"
            echo "$b" >> "$list"
        done
    done
}

VIRTIO_MODULES="virtio_mmio virtio_pci virtio_blk virtio_net virtio-rng virtio_balloon vmw_vsock_virtio_transport"
if newer "$OUT/initramfs.cpio.gz" "$INIT" "$GUEST_BUSYBOX" "$0" &&
   newer "$OUT/initramfs-virtio.cpio.gz" "$INIT" "$GUEST_BUSYBOX" "$0" "$OUT/kernel-version" &&
   newer "$OUT/rootfs.ext4" "$INIT" "$GUEST_BUSYBOX" "$0" "$OUT/kernel-version"; then
    echo "$ME: initramfs.cpio.gz, initramfs-virtio.cpio.gz and rootfs.ext4 are up to date"
else
    R=$(mktemp -d "${TMPDIR:-/tmp}/tern-guest.XXXXXX")
    trap 'rm -rf "$R"' EXIT
    mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,etc}
    cp "$GUEST_BUSYBOX" "$R/bin/busybox"
    # Applet links at build time (bin/sh, sbin/init, usr/bin/tr, ...), listed by the host's
    # busybox of the same Debian release (an arm64 one cannot run here to list its own).
    for a in $("$BUSYBOX" --list-full); do
        [ -e "$R/$a" ] || ln -s /bin/busybox "$R/$a"
    done
    install -m 755 "$INIT" "$R/init"
    # The kernel opens /dev/console for init's stdio before init runs.
    if ! { mknod -m 600 "$R/dev/console" c 5 1 && mknod -m 666 "$R/dev/null" c 1 3; }; then
        echo "$ME: warning: mknod failed (not root?): no /dev/console in the cpio;" \
             "init falls back to devtmpfs's" >&2
    fi
    pack() { pack_tree "$R" "$1"; }
    pack "$OUT/initramfs.cpio.gz"
    # The virtio modules, dependencies first (modprobe resolves modules.dep); busybox insmod
    # wants plain .ko files.
    : > "$R/etc/tern-modules"
    # shellcheck disable=SC2086
    copy_modules "$KROOT" "$KVER" "$R/lib/modules/tern" "$R/etc/tern-modules" $VIRTIO_MODULES
    pack "$OUT/initramfs-virtio.cpio.gz"
    # The root filesystem: the same tree, guest/init as /sbin/init.
    rm -f "$R/init" "$R/sbin/init"
    install -m 755 "$INIT" "$R/sbin/init"
    command -v mke2fs >/dev/null || PATH=$PATH:/sbin:/usr/sbin
    rm -f "$OUT/rootfs.ext4.tmp"
    truncate -s 32M "$OUT/rootfs.ext4.tmp"
    E2FSPROGS_FAKE_TIME=$EPOCH mke2fs -q -t ext4 -L ternroot -U 6b1e2d1c-7e2a-4f4e-9d55-0d9f3c1f7a01 \
        -E root_owner=0:0 -d "$R" "$OUT/rootfs.ext4.tmp"
    mv "$OUT/rootfs.ext4.tmp" "$OUT/rootfs.ext4"
fi

if [ "$ARCH" = aarch64 ]; then
    # L1 of the arm64 nest boots the same kernel: it needs tun for the TAP scenarios.
    if ! newer "$OUT/nest-modules/order" "$OUT/kernel-version" "$0"; then
        rm -rf "$OUT/nest-modules"
        copy_modules "$KROOT" "$KVER" "$OUT/nest-modules" "$OUT/nest-modules/order.tmp" tun
        mv "$OUT/nest-modules/order.tmp" "$OUT/nest-modules/order"
    fi
    echo "console=ttyAMA0 panic=1 quiet" > "$OUT/cmdline"
    for f in Image initramfs.cpio.gz initramfs-virtio.cpio.gz rootfs.ext4 nest-modules cmdline; do
        echo "$OUT/$f"
    done
    exit 0
fi

# The same kernel as an ELF vmlinux (it has the PVH note), for PVH and 64-bit ELF boots.
# extract-vmlinux.py does what the kernel's scripts/extract-vmlinux does: it tries each
# compression magic found in the bzImage and keeps the first stream that is an ELF.
if [ -s "$OUT/vmlinux" ] && newer "$OUT/vmlinux" "$OUT/bzImage" "$HERE/extract-vmlinux.py"; then
    echo "$ME: vmlinux is up to date"
else
    command -v python3 >/dev/null ||
        { echo "$ME: needs python3 (package python3) to extract vmlinux" >&2; exit 1; }
    if ! python3 "$HERE/extract-vmlinux.py" "$OUT/bzImage" "$OUT/vmlinux.tmp" >&2; then
        rm -f "$OUT/vmlinux.tmp"
        # gzip/xz/lzma/bzip2 come with Python; zstd and lz4 need their tools.
        miss=
        command -v zstd >/dev/null || miss+=" zstd (package zstd)"
        command -v lz4 >/dev/null || miss+=" lz4 (package lz4)"
        echo "$ME: could not extract vmlinux from $OUT/bzImage${miss:+; missing:$miss}" >&2
        exit 1
    fi
    mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
    # PVH entry: Xen ELF note 18 (XEN_ELFNOTE_PHYS32_ENTRY), needs CONFIG_PVH.
    if ! command -v readelf >/dev/null; then
        echo "$ME: warning: no readelf (package binutils): PVH note not checked" >&2
    elif ! LC_ALL=C readelf -n "$OUT/vmlinux" 2>/dev/null |
            grep -E 'XEN_ELFNOTE_PHYS32_ENTRY|Unknown note type: \(0x00000012\)' >/dev/null; then
        echo "$ME: warning: $OUT/vmlinux has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY):" \
             "boot_protocol \"pvh\" will refuse it" >&2
    fi
fi

echo "console=ttyS0 reboot=k panic=1 quiet" > "$OUT/cmdline"
echo "$OUT/bzImage"
echo "$OUT/vmlinux"
echo "$OUT/initramfs.cpio.gz"
echo "$OUT/initramfs-virtio.cpio.gz"
echo "$OUT/rootfs.ext4"
echo "$OUT/cmdline"
