#!/bin/bash
# Where a guest's boot time goes, tern beside QEMU's microvm machine: same kernel, initramfs and
# command line, same run, one boot each (-n RUNS: more, one after the other):
#   - the guest's uptime at "GUEST BOOTED" (guest/init prints it as GUEST UPTIME);
#   - the KVM exits of each whole boot by kind: KVM's debugfs counters (exits, io_exits,
#     mmio_exits, halt_exits, irq_exits, ...) on the host that runs both VMMs (L1 in the nest),
#     and the most frequent port I/O and MMIO exits by port and address (ftrace hist triggers
#     on kvm_pio and kvm_mmio): bench/kvm-counters.sh;
#   - the guest's initcalls that took 5 ms or more (`initcall_debug`, read from dmesg by a
#     script on a small drive once booted: the console stays `quiet`, as in bench/boot.sh).
# With FIRECRACKER=/path/to/firecracker, Firecracker boots the same guest from the same
# configuration file too.
# Runs directly on hardware KVM, otherwise inside the nest, like the tests.
#   bench/boot-trace.sh [-n RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=1
while getopts 'n:' o; do case $o in n) N=$OPTARG ;; *) exit 2 ;; esac; done
. bench/lib.sh
bench_setup boot-trace
ARGS="console=ttyS0 reboot=k panic=1 pci=off quiet initcall_debug log_buf_len=1M guest.script=/dev/vda"
printf '%s\n' \
    'dmesg | grep -E "initcall .* after [0-9]{4,} usecs" | sed "s/^/BENCH slow /"' \
    'echo "BENCH dmesg_lines $(dmesg | wc -l)"' > "$D/trace.sh"
cp "$D/trace.sh" "$D/trace.img"
truncate -s 4096 "$D/trace.img"
cat > "$D/tern.json" <<JSON
{"boot-source": {"kernel_image_path": "vmlinux", "initrd_path": "initramfs.cpio.gz",
  "boot_args": "$ARGS guest.cmd=shell"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
 "drives": [{"drive_id": "trace", "path_on_host": "trace.img", "is_root_device": false, "is_read_only": true}]}
JSON
Q="./qemu-system-x86_64 -L fw -M microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off -enable-kvm -cpu host -m 256 -smp 1 -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel vmlinux -initrd initramfs.cpio.gz -drive id=trace,file=trace.img,format=raw,if=none,readonly=on -device virtio-blk-device,drive=trace"
vmms="tern qemu" fc=()
if [ -n "${FIRECRACKER:-}" ]; then
    cp "$FIRECRACKER" "$D/firecracker"; fc=("$D/firecracker"); vmms="tern firecracker qemu"
fi
cp bench/kvm-counters.sh "$D/"
cat > "$D/run.sh" <<SH
. ./kvm-counters.sh
for i in \$(seq $N); do
  for vmm in $vmms; do
    kvm_sample_start; kvm_hist_start
    if [ \$vmm != qemu ]; then
      ./tern-bench run --timeout 120 --marker "GUEST BOOTED" -- ./\$vmm --no-api --level Warning --config-file tern.json > out.\$vmm
    else
      ./tern-bench run --timeout 120 --marker "GUEST BOOTED" -- $Q -append "$ARGS guest.cmd=shell" > out.\$vmm
    fi
    echo "@@X \$vmm \$(kvm_sample_stop)"
    kvm_hist_stop | sed "s/^/@@H \$vmm /"
    grep -q 'BENCH dmesg_lines' out.\$vmm || { echo "@@F \$vmm did not boot or its script did not end:"; tail -c 3000 out.\$vmm | sed 's/^/@@F /'; }
    grep -o 'GUEST UPTIME [0-9. ]*' out.\$vmm | sed "s/^/@@B \$vmm /"
    grep -o '"GUEST BOOTED",[0-9.]*' out.\$vmm | sed "s/^/@@B \$vmm marker_ms /"
    grep -o 'BENCH [^"\\\\]*' out.\$vmm | sed "s/^/@@B \$vmm /"
  done
done
SH
if hw_kvm; then
    where="directly on hardware KVM"
    (cd "$D" && sh run.sh) > "$D/out.txt"
else
    where="nested: L1 under QEMU TCG (-cpu max,+svm), both VMMs inside L1 with its KVM"
    L1_MEM=2048 NEST_TIMEOUT=$((N * 600 + 300)) bash tools/nest-x86_64.sh -s "$D/run.sh" \
        "$D/tern" "$D/tern-bench" "$D/vmlinux" "$D/initramfs.cpio.gz" "$D/tern.json" \
        "$D/trace.img" "$D/qemu-system-x86_64" "$D/fw" "$D/kvm-counters.sh" "${fc[@]}" > "$D/out.txt"
fi
echo "# bench/boot-trace.sh -n $N ($where)"
echo "# qemu: $("$QEMU" --version | head -1); kernel: $KERNEL"
grep -a '^@@B ' "$D/out.txt" | sed 's/^@@B //'
echo "# KVM exits of each whole boot, by kind (bench/kvm-counters.sh)"
grep -a '^@@X ' "$D/out.txt" | sed 's/^@@X //'
echo "# the most frequent port I/O and MMIO exits of each boot (KVM's kvm_pio and kvm_mmio events)"
grep -a '^@@H ' "$D/out.txt" | sed 's/^@@H //'
grep -a '^@@F ' "$D/out.txt" | sed 's/^@@F //' >&2 || true
