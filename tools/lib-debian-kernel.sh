# shellcheck shell=bash
# Sourced by tools/nest-x86_64.sh and tools/make-guest.sh: find and fetch
# Debian's cloud kernel package (linux-image-<kver>, kver like
# 6.1.0-56-cloud-amd64) with apt-get download; no root needed unless the apt
# lists are empty and `apt-get update` has to run.
#
#   kver=$(debk_kver)          version: $L1_KVER, else what the metapackage
#                              linux-image-cloud-amd64 depends on, else the
#                              newest one already in the cache
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

debk_candidate() {
    { apt-cache depends linux-image-cloud-amd64 2>/dev/null || true; } |
        sed -n 's/^ *Depends: linux-image-\([0-9][^ ]*-cloud-amd64\)$/\1/p' | sed -n 1p
}

debk_kver() {
    local v=${L1_KVER:-} f
    [ -n "$v" ] || v=$(debk_candidate)
    if [ -z "$v" ]; then            # apt knows nothing: newest cached one
        for f in "$DEBK_CACHE"/*/root/boot/vmlinuz-*; do
            [ -f "$f" ] && v=$(printf '%s\n' "$v" "${f##*/vmlinuz-}" | sort -V | tail -n1)
        done
    fi
    if [ -z "$v" ]; then
        debk_apt_update_once
        v=$(debk_candidate)
    fi
    [ -n "$v" ] || { debk_log "cannot find the Debian cloud kernel version (set L1_KVER)"; return 1; }
    echo "$v"
}

debk_fetch() {
    local kver=$1 d=$DEBK_CACHE/$1 depmod
    if [ ! -f "$d/root/boot/vmlinuz-$kver" ]; then
        debk_log "downloading linux-image-$kver"
        rm -rf "$d"; mkdir -p "$d/deb"
        if ! (cd "$d/deb" && apt-get "${debk_apt_opts[@]}" -q download "linux-image-$kver" >&2); then
            debk_apt_update_once
            (cd "$d/deb" && apt-get "${debk_apt_opts[@]}" -q download "linux-image-$kver" >&2) ||
                { debk_log "apt-get download linux-image-$kver failed"; return 1; }
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
