#!/bin/bash
# Control-socket benchmark: tern's REST API beside QEMU's QMP, both measured by
# `tern-bench api-bench`:
#   - spawn -> the socket accepts a connection;
#   - N sequential reads: tern `GET /` (a new connection per request, as curl does) and QEMU
#     `query-status` (one QMP session);
#   - N sequential pause/resume requests with a running guest: tern `PATCH /vm`
#     Paused/Resumed, QEMU `stop`/`cont`.
# Start-up and reads run directly on this host (no guest is needed for them). Pause/resume
# needs a running guest: directly on hardware KVM, otherwise inside the nest.
#   bench/api.sh [-n N]      (default 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
N=10000
while getopts 'n:' o; do case $o in n) N=$OPTARG ;; *) exit 2 ;; esac; done
. bench/lib.sh
bench_setup api
B=target/release/tern-bench

echo "== start-up and reads, on this host =="
$B api-bench --proto tern --sock "$D/tern.sock" -n "$N" -- target/release/tern --api-sock "$D/tern.sock" --level Off \
    | tee "$D/host-tern.json"
$B api-bench --proto qmp --sock "$D/qmp.sock" -n "$N" -- "$QEMU" -M microvm -nodefaults -no-user-config -display none -S \
    -qmp "unix:$D/qmp.sock,server=on,wait=off" | tee "$D/host-qemu.json"

echo "== pause/resume with a running guest =="
ARGS="console=ttyS0 reboot=k panic=1 pci=off quiet guest.cmd=shell"
cat > "$D/steps.json" <<JSON
[{"req": "PUT /boot-source", "body": {"kernel_image_path": "vmlinux", "initrd_path": "initramfs.cpio.gz", "boot_args": "$ARGS"}},
 {"req": "PUT /machine-config", "body": {"vcpu_count": 1, "mem_size_mib": 256}},
 {"req": "PUT /actions", "body": {"action_type": "InstanceStart"}},
 {"sleep_ms": 3000}]
JSON
cat > "$D/run.sh" <<RUN
./tern-bench api-bench --proto tern --sock t.sock -n $N --pause --steps steps.json -- ./tern --api-sock t.sock --level Off > nest-tern.json
echo "@@R tern \$(cat nest-tern.json)"
./tern-bench api-bench --proto qmp --sock q.sock -n $N --pause -- ./qemu-system-x86_64 -L fw -M microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off -enable-kvm -cpu host -m 256 -smp 1 -nodefaults -no-user-config -display none -serial file:/dev/null -kernel vmlinux -initrd initramfs.cpio.gz -append "$ARGS" -qmp unix:q.sock,server=on,wait=off > nest-qemu.json
echo "@@R qemu \$(cat nest-qemu.json)"
RUN
if hw_kvm; then
    (cd "$D" && sh run.sh) | tee "$D/out.txt"
else
    L1_MEM=3072 NEST_TIMEOUT=1800 bash tools/nest-x86_64.sh -s "$D/run.sh" "$D/tern" "$D/tern-bench" "$D/vmlinux" \
        "$D/initramfs.cpio.gz" "$D/steps.json" "$D/qemu-system-x86_64" "$D/fw" > "$D/out.txt"
fi
grep -a '^@@R ' "$D/out.txt" | sed 's/^@@R //'
