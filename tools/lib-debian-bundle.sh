# shellcheck shell=sh
# Debian programs for another machine (a test guest, the arm64 nest's L1), with the shared
# libraries they load, without installing them (POSIX sh; sourced).
#
# debb_arch ARCH: sets DEBB_DEB (amd64|arm64), DEBB_TRIPLET and DEBB_LD (the dynamic
#   loader's file name) for ARCH (x86_64|aarch64).
# debb_fetch DIR PKG[=VERSION]...: apt-get downloads the packages for $DEBB_DEB and the
#   libraries they depend on, recursively (the lib* and zlib1g packages of the closure), and
#   unpacks them into DIR/root; once (DIR/done marks it). arm64 needs the architecture in apt
#   (dpkg --add-architecture arm64; apt-get update), as tools/deps.sh sets up.
# debb_libs DIR DEST BIN...: copies the loader and the libraries BINs load, directly or
#   through each other (DT_NEEDED), from DIR/root into DEST (flat, by the names asked for).
# debb_check LIBDIR FILE...: fails, naming it, if a library FILEs (or the libraries in
#   LIBDIR) need is not in LIBDIR.
# debb_runner FILE: writes FILE, a script that runs `FILE TOOL ARGS...` = bin/TOOL beside it
#   through lib/ beside it (the bundled loader, its --library-path).

debb_arch() {
    case $1 in
        x86_64) DEBB_DEB=amd64 DEBB_TRIPLET=x86_64-linux-gnu DEBB_LD=ld-linux-x86-64.so.2 ;;
        aarch64) DEBB_DEB=arm64 DEBB_TRIPLET=aarch64-linux-gnu DEBB_LD=ld-linux-aarch64.so.1 ;;
        *) echo "lib-debian-bundle: unknown architecture '$1' (x86_64 or aarch64)" >&2; return 2 ;;
    esac
}

debb_fetch() {
    _dir=$1; shift
    [ -f "$_dir/done" ] && return 0
    rm -rf "$_dir"; mkdir -p "$_dir/debs"
    _apt_root=
    [ "$(id -u)" != 0 ] || _apt_root="-o APT::Sandbox::User=root"
    _get=
    for _p in "$@"; do
        case $_p in *=*) _get="$_get ${_p%%=*}:$DEBB_DEB=${_p#*=}" ;; *) _get="$_get $_p:$DEBB_DEB" ;; esac
    done
    # shellcheck disable=SC2086 # word splitting wanted
    _libs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances $_get | grep -v '^ ' | grep -v '<' |
        grep -E '^(lib|zlib1g(:|$))' | sort -u) || {
        echo "lib-debian-bundle: apt-cache depends$_get failed" >&2; return 1; }
    # (apt names a package of the host's architecture or of "all" without a suffix.)
    _get="$_get $_libs"
    # shellcheck disable=SC2086 # word splitting wanted
    (cd "$_dir/debs" && apt-get $_apt_root download $_get >&2) || {
        echo "lib-debian-bundle: apt-get download failed (for arm64: dpkg --add-architecture arm64 && apt-get update)" >&2
        return 1
    }
    for _d in "$_dir"/debs/*.deb; do dpkg -x "$_d" "$_dir/root"; done
    touch "$_dir/done"
}

debb_libs() {
    _root=$1 _dest=$2; shift 2
    mkdir -p "$_dest"
    _find() { # NAME: the library NAME in the unpacked packages, links followed
        for _d in "$_root/root/lib/$DEBB_TRIPLET" "$_root/root/usr/lib/$DEBB_TRIPLET"; do
            [ -e "$_d/$1" ] && { readlink -f "$_d/$1"; return 0; }
        done
        return 1
    }
    _todo="$*" _seen=" "
    _f=$(_find "$DEBB_LD") || { echo "lib-debian-bundle: no $DEBB_LD in libc6:$DEBB_DEB" >&2; return 1; }
    cp "$_f" "$_dest/$DEBB_LD"
    while [ -n "$_todo" ]; do
        set -- $_todo
        _f=$1; shift; _todo="$*"
        for _n in $(readelf -d "$_f" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            case $_seen in *" $_n "*) continue ;; esac
            _seen="$_seen$_n "
            _l=$(_find "$_n") || { echo "lib-debian-bundle: no $_n (needed by ${_f##*/})" >&2; return 1; }
            cp "$_l" "$_dest/$_n"
            _todo="$_todo $_l"
        done
    done
}

debb_check() {
    _lib=$1; shift
    _missing=
    for _f in "$@" "$_lib"/*.so*; do
        for _n in $(readelf -d "$_f" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            [ -e "$_lib/$_n" ] || _missing="$_missing $_n(${_f##*/})"
        done
    done
    [ -z "$_missing" ] || { echo "lib-debian-bundle: missing libraries:$_missing" >&2; return 1; }
}

debb_runner() {
    cat > "$1" <<EOR
#!/bin/sh
# ${1##*/} TOOL ARGS...: a bundled tool through the bundled loader and libraries.
here=\$(cd "\${0%/*}" && pwd)
t=\$1; shift
exec "\$here/lib/$DEBB_LD" --library-path "\$here/lib" "\$here/bin/\$t" "\$@"
EOR
    chmod +x "$1"
}
