#!/bin/bash
# Runs every test: unit tests, host-KVM payload tests, CLI tests, and the guest-boot scenarios
# (directly on hardware KVM, otherwise nested in QEMU; see tests/common/mod.rs).
# Guest kernels come from $TERN_GUEST_DIR or ../shared/guest when present, else from
# tools/make-guest.sh (Debian's cloud kernel). Pass extra cargo test arguments after the script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/deps.sh
rm -f target/scenario-summary.txt
status=0
cargo test --workspace -j2 "$@" || status=$?
# The unit tests once more, built for aarch64 and run under qemu-user (static binaries; see
# .cargo/config.toml), on x86_64 hosts that have the cross toolchain (tools/deps.sh).
if [ "$(uname -m)" = x86_64 ] && [ -d /usr/lib/rustlib/aarch64-unknown-linux-gnu ] &&
   command -v qemu-aarch64-static >/dev/null; then
    echo "== unit tests on aarch64 (qemu-user) =="
    PATH=/usr/bin:$PATH CARGO_TARGET_DIR=target/cross cargo test -j2 \
        --target aarch64-unknown-linux-gnu --workspace --exclude tern --lib || status=$?
fi
echo "== integration scenarios =="
if [ -f target/scenario-summary.txt ]; then
    cat target/scenario-summary.txt
    awk '{n[$6]+=$2} END {printf "total: %d nested, %d direct\n", n["nested"], n["direct"]}' target/scenario-summary.txt
else
    echo "no integration scenario ran"
fi
exit $status
