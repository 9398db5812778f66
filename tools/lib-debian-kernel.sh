# shellcheck shell=bash
# Sourced by tools/nest-x86_64.sh and tools/make-guest.sh: find and fetch
# Debian's cloud kernel package (linux-image-<kver>, kver like
# 6.1.0-56-cloud-amd64 or 6.1.0-56-cloud-arm64) with apt-get download; no root
# needed unless the apt lists are empty and `apt-get update` has to run. The arm64
# package needs the arm64 architecture in apt (tools/deps.sh adds it).
#
#   kver=$(debk_kver [ARCH])   version: $L1_KVER (x86_64) or $ARM64_KVER (aarch64),
#                              else what the metapackage linux-image-cloud-amd64
#                              (or -arm64) depends on, else the newest one already
#                              in the cache; ARCH is x86_64 (default) or aarch64
#   root=$(debk_fetch "$kver") the unpacked package (root/boot/vmlinuz-<kver>,
#                              root/lib/modules/<kver> with modules.dep)
#
# Cache: $TERN_CACHE/debian-kernel/<kver>/{deb,root} (shared by both tools).

TERN_CACHE=${TERN_CACHE:-$HOME/.cache/tern}
DEBK_CACHE=$TERN_CACHE/debian-kernel

debk_log() { echo "${0##*/}: $*" >&2; }

# apt as root drops privileges to _apt, which cannot write into our cache
# (a harmless but noisy warning): keep root there.
debk_apt_opts=()
[ "$(id -u)" != 0 ] || debk_apt_opts=(-o APT::Sandbox::User=root)

debk_apt_update_once() {
    [ -z "${DEBK_UPDATED:-}" ] || return 0
    DEBK_UPDATED=1
    debk_log "running apt-get update"
    apt-get "${debk_apt_opts[@]}" -qq update >&2 || debk_log "apt-get update failed"
}

# debk_flavour ARCH: Debian's name for it (amd64, arm64)
debk_flavour() { case ${1:-x86_64} in aarch64|arm64) echo arm64 ;; *) echo amd64 ;; esac; }

debk_candidate() {
    local f; f=$(debk_flavour "$1")
    { apt-cache depends "linux-image-cloud-$f:$f" 2>/dev/null || true; } |
        sed -n "s/^ *Depends: linux-image-\\([0-9][^ :]*-cloud-$f\\)\\(:$f\\)\\{0,1\\}\$/\\1/p" | sed -n 1p
}

debk_kver() {
    local arch=${1:-x86_64} v f fl
    fl=$(debk_flavour "$arch")
    if [ "$fl" = arm64 ]; then v=${ARM64_KVER:-}; else v=${L1_KVER:-}; fi
    [ -n "$v" ] || v=$(debk_candidate "$arch")
    if [ -z "$v" ]; then            # apt knows nothing: newest cached one
        for f in "$DEBK_CACHE"/*-"$fl"/root/boot/vmlinuz-*; do
            [ -f "$f" ] && v=$(printf '%s\n' "$v" "${f##*/vmlinuz-}" | sort -V | tail -n1)
        done
    fi
    if [ -z "$v" ]; then
        debk_apt_update_once
        v=$(debk_candidate "$arch")
    fi
    [ -n "$v" ] || { debk_log "cannot find Debian's $fl cloud kernel version (set L1_KVER or ARM64_KVER; for arm64: dpkg --add-architecture arm64 && apt-get update)"; return 1; }
    echo "$v"
}

debk_fetch() {
    local kver=$1 d=$DEBK_CACHE/$1 depmod pkg
    pkg=linux-image-$kver:${kver##*-}          # the package's architecture ends its version
    if [ ! -f "$d/root/boot/vmlinuz-$kver" ]; then
        debk_log "downloading $pkg"
        rm -rf "$d"; mkdir -p "$d/deb"
        if ! (cd "$d/deb" && apt-get "${debk_apt_opts[@]}" -q download "$pkg" >&2); then
            debk_apt_update_once
            (cd "$d/deb" && apt-get "${debk_apt_opts[@]}" -q download "$pkg" >&2) ||
                { debk_log "apt-get download $pkg failed"; return 1; }
        fi
        dpkg -x "$d"/deb/linux-image-"$kver"_*.deb "$d/root.tmp"
        mv "$d/root.tmp" "$d/root"
    fi
    # The package ships no modules.dep: depmod makes it at install time.
    if [ ! -s "$d/root/lib/modules/$kver/modules.dep" ]; then
        depmod=$(command -v depmod || echo /sbin/depmod)
        "$depmod" -b "$d/root" "$kver" || { debk_log "depmod failed (package kmod)"; return 1; }
    fi
    echo "$d/root"
}
