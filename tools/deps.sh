#!/bin/bash
# Installs what tern's build, tests and demo need on Debian/Ubuntu, skipping what is there:
# a Rust toolchain (>= 1.85, for edition 2024), and for the nest (hosts without hardware KVM)
# QEMU, busybox-static, cpio, binutils, kmod, xz-utils, zstd, lz4; on x86_64 hosts the arm64
# cross toolchain and qemu-system-aarch64 for the aarch64 scenarios; and schemathesis (PyPI,
# in a venv) for the OpenAPI test.
set -euo pipefail
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need qemu-system-x86_64 qemu-system-x86
# The nest and the guest initramfs copy /bin/busybox as it is: it must be the static one.
if [ ! -x /bin/busybox ] || readelf -l /bin/busybox 2>/dev/null | grep -q INTERP; then missing+=(busybox-static); fi
need cpio cpio
need readelf binutils
need depmod kmod
need xz xz-utils
need zstd zstd
need lz4 lz4
# The SMBIOS unit test decodes tern's tables with dmidecode (--from-dump).
need dmidecode dmidecode
need python3 python3
need cc gcc
# userfaultfd-sys generates its bindings with bindgen, which needs libclang.
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || missing+=(libclang-dev)
rust_ok() {
    command -v cargo >/dev/null 2>&1 || return 1
    local v; v=$(rustc --version 2>/dev/null | awk '{print $2}')
    [ "$(printf '%s\n1.85.0\n' "$v" | sort -V | head -1)" = 1.85.0 ]
}
if ! rust_ok; then
    # Debian bookworm ships a current Rust as rustc-web/cargo-web (bookworm-security).
    if apt-cache show rustc-web >/dev/null 2>&1; then missing+=(rustc-web cargo-web); else missing+=(rustc cargo); fi
fi
# ARM64 (on x86_64 hosts): the nest's QEMU, and Debian's cross toolchain for tern
# (rustc-web with the arm64 standard library, the aarch64 linker and libc, clippy).
update=
if [ "$(uname -m)" = x86_64 ] && command -v dpkg >/dev/null; then
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        $SUDO dpkg --add-architecture arm64
        update=1
    fi
    need qemu-system-aarch64 qemu-system-arm
    need aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
    need qemu-aarch64-static qemu-user-static
    [ -f /usr/aarch64-linux-gnu/lib/libc.a ] || missing+=(libc6-dev-arm64-cross)
    # The arm64 std must match rustc-web's version: install them together. rust-web-src lets
    # cargo build std for macOS (aarch64-apple-darwin) to type-check the devices crate.
    if [ ! -d /usr/lib/rustlib/aarch64-unknown-linux-gnu ] || [ ! -x /usr/bin/cargo ] ||
       [ ! -x /usr/bin/cargo-clippy ] || [ ! -d /usr/lib/rustlib/src/rust/library ]; then
        missing+=(rustc-web cargo-web libstd-rust-web-dev:arm64 rust-web-clippy rust-web-src)
    fi
fi
# The nest's QEMU: 10 from bookworm-backports on Debian 12 (QEMU 7.2's TCG-emulated SVM hung
# L1 in about half the x86 suites; docs/testing.md has the measurements). The source line uses
# the same mirror as bookworm itself.
backports=
if command -v dpkg >/dev/null && [ "$(. /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-}")" = bookworm ]; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        uri=$(awk '/^URIs:/ {u = $2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == "bookworm") {print u; exit}}' \
            /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
        [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
        if [ -n "$uri" ]; then
            echo "deb $uri bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/tern-bookworm-backports.list >/dev/null
            update=1
        fi
    fi
    grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ && backports=1
fi
qemu_major() { "$1" --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'; }
nest_qemu=(qemu-system-x86)
[ "$(uname -m)" = x86_64 ] && nest_qemu+=(qemu-system-arm)
# TERN_NEST_QEMU=distro keeps the distribution's QEMU (to compare the two).
new_qemu=
if [ -n "$backports" ] && [ "${TERN_NEST_QEMU:-}" != distro ]; then
    for q in qemu-system-x86_64 qemu-system-aarch64; do
        [ "$q" = qemu-system-aarch64 ] && [ "$(uname -m)" != x86_64 ] && continue
        v=$(qemu_major "$q" || true); [ "${v:-0}" -ge 10 ] || new_qemu=1
    done
    # installed below, from bookworm-backports
    rest=(); for m in "${missing[@]}"; do case $m in qemu-system-x86|qemu-system-arm) ;; *) rest+=("$m") ;; esac; done
    missing=("${rest[@]}")
fi
if [ ${#missing[@]} -gt 0 ] || [ -n "$update" ]; then
    [ ${#missing[@]} -eq 0 ] || echo "tools/deps.sh: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq
    if [ ${#missing[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi
if [ -n "$new_qemu" ]; then
    echo "tools/deps.sh: installing QEMU 10 from bookworm-backports for the nest" >&2
    [ ${#missing[@]} -gt 0 ] || [ -n "$update" ] || $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        -t bookworm-backports "${nest_qemu[@]}" >/dev/null
fi
rust_ok || { echo "tools/deps.sh: no Rust >= 1.85 after installing; install one (rustup) and retry" >&2; exit 1; }

# schemathesis (PyPI), for the OpenAPI conformance test, in a private venv.
VENV=${TERN_CACHE:-$HOME/.cache/tern}/venv
ST_VERSION=4.32.5
if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$ST_VERSION"; then
    python3 -m venv "$VENV" 2>/dev/null || {
        $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null && python3 -m venv "$VENV"; }
    echo "tools/deps.sh: installing schemathesis $ST_VERSION into $VENV" >&2
    "$VENV/bin/pip" install -q "schemathesis==$ST_VERSION" ||
        echo "tools/deps.sh: warning: schemathesis did not install; tests/openapi.rs will skip" >&2
fi
