#!/bin/bash
# Runs every test: unit tests, host-KVM payload tests, CLI tests, and the guest-boot scenarios
# (directly on hardware KVM, otherwise nested in QEMU; see tests/common/mod.rs).
# Guest kernels come from $TERN_GUEST_DIR or ../shared/guest when present, else from
# tools/make-guest.sh (Debian's cloud kernel). Pass extra cargo test arguments after the script.
# Every test binary runs even after one fails (--no-fail-fast); the run ends with one summary of
# every failure, the scenarios' reruns, and the whole run's time.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
bash tools/deps.sh
mkdir -p target
rm -f target/scenario-summary.txt target/virtio-recoveries.txt
log=target/test-output.log
: > "$log"
status=0
cargo test --workspace -j2 --no-fail-fast "$@" 2>&1 | tee -a "$log" || status=$?
[ "${PIPESTATUS[0]}" = 0 ] || status=1
# The unit tests once more, built for aarch64 and run under qemu-user (static binaries; see
# .cargo/config.toml), on x86_64 hosts that have the cross toolchain (tools/deps.sh).
if [ "$(uname -m)" = x86_64 ] && [ -d /usr/lib/rustlib/aarch64-unknown-linux-gnu ] &&
   command -v qemu-aarch64-static >/dev/null; then
    echo "== unit tests on aarch64 (qemu-user) ==" | tee -a "$log"
    PATH=/usr/bin:$PATH CARGO_TARGET_DIR=target/cross cargo test -j2 --no-fail-fast \
        --target aarch64-unknown-linux-gnu --workspace --exclude tern --lib 2>&1 | tee -a "$log" ||
        status=1
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
echo "== integration scenarios =="
if [ -f target/scenario-summary.txt ]; then
    cat target/scenario-summary.txt
    awk '{n[$6]+=$2} END {printf "total: %d nested, %d direct\n", n["nested"], n["direct"]}' target/scenario-summary.txt
    reruns=$(sed -n 's/.*(\([0-9][0-9]*\) rerun.*/\1/p' target/scenario-summary.txt | awk '{s += $1} END {print s + 0}')
    echo "scenarios rerun: $reruns"
    recoveries=0
    [ -f target/virtio-recoveries.txt ] && recoveries=$(wc -l < target/virtio-recoveries.txt)
    echo "virtio recoveries (lost wake-ups tern's worker made up for): $recoveries"
    [ "$recoveries" = 0 ] || sed 's/^/  /' target/virtio-recoveries.txt
else
    echo "no integration scenario ran"
fi
echo "== summary =="
# cargo prints "test NAME ... FAILED" per failed test and "error: test failed, to rerun pass
# `--test X`" (or "--lib") per failed binary.
failed=$(grep -E '^test .* \.\.\. FAILED$' "$log" | sed 's/^test \(.*\) \.\.\. FAILED$/\1/' || true)
binaries=$(grep -E '^error: (test failed|[0-9]+ targets? failed)' -A20 "$log" | grep -E '^\s+`' || true)
if [ -n "$failed" ] || [ "$status" != 0 ]; then
    echo "FAILED tests:"
    if [ -n "$failed" ]; then printf '  %s\n' $failed; else echo "  (no single test named: see $log)"; fi
    [ -n "$binaries" ] && { echo "in:"; echo "$binaries"; }
else
    echo "every test passed"
fi
echo "whole run: $(( $(date +%s) - started )) s"
exit $status
