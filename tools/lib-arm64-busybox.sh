# shellcheck shell=bash
# arm64_busybox DIR: prints the path of Debian's static arm64 busybox, downloading
# busybox-static:arm64 into DIR (apt-get download + dpkg -x, not installed) the first time.
# Needs the arm64 architecture in apt (dpkg --add-architecture arm64; apt-get update).
arm64_busybox() {
    local dir=$1 bb=$1/root/bin/busybox apt_root=
    [ "$(id -u)" != 0 ] || apt_root=1      # apt's _apt user cannot write into our cache
    if [ -n "${BUSYBOX_ARM64:-}" ]; then echo "$BUSYBOX_ARM64"; return; fi
    if [ ! -x "$bb" ]; then
        echo "fetching busybox-static:arm64 into $dir" >&2
        rm -rf "$dir"; mkdir -p "$dir"
        (cd "$dir" && apt-get ${apt_root:+-o APT::Sandbox::User=root} download busybox-static:arm64 >&2) ||
            { echo "apt-get download busybox-static:arm64 failed (dpkg --add-architecture arm64 && apt-get update?)" >&2; return 1; }
        dpkg -x "$dir"/busybox-static_*_arm64.deb "$dir/root"
    fi
    echo "$bb"
}
