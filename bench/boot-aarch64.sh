#!/bin/bash
# ARM64 boot time and VMM memory overhead: tern with its devices on virtio-mmio and on PCI
# (machine-config.pci: virtio-pci, MSI-X through the GICv3 ITS) beside QEMU's virt machine
# with the same device on virtio-mmio and on virtio-pci, same kernel, initramfs and command
# line, same run, measured by tern-bench as bench/boot.sh does on x86 (every VM has one
# virtio-rng device; boot = spawn -> "GUEST BOOTED", memory = VMM RSS minus its guest RAM,
# 200 ms after it).
# Runs directly on an ARM64 host with KVM, otherwise inside the arm64 nest
# (tools/nest-aarch64.sh: L1 under QEMU TCG with EL2 and a GICv3), like the tests. QEMU for
# the ARM64 side is Debian's qemu-system-arm of the host's QEMU version for arm64, downloaded
# with its libraries (tools/lib-debian-bundle.sh), not installed.
#   bench/boot-aarch64.sh [-n RUNS] [-m MIB]     (default 5 runs, 256 MiB, 1 vCPU)
# Prints a Markdown table; raw JSON lines go to target/bench/boot-aarch64/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
N=5 MEM=256
while getopts 'n:m:' o; do case $o in n) N=$OPTARG ;; m) MEM=$OPTARG ;; *) exit 2 ;; esac; done
bash tools/deps.sh
PATH=/usr/bin:$PATH cargo build --release -j2 --target aarch64-unknown-linux-gnu --bin tern --bin tern-bench
CACHE=${TERN_CACHE:-$HOME/.cache/tern}
OWN=$CACHE/guest/aarch64
OUT=$OWN bash tools/make-guest.sh --arch aarch64 >/dev/null
# The same guest as the tests: ../shared's kernel (virtio built in) with tern's initramfs, or
# Debian's cloud kernel with its virtio modules in the initramfs.
g=${TERN_GUEST_DIR:-../shared/guest}/aarch64
if [ -f "$g/Image" ]; then
    KERNEL=$g/Image INITRD=$OWN/initramfs.cpio.gz MODULES=
else
    KERNEL=$OWN/Image INITRD=$OWN/initramfs-virtio.cpio.gz MODULES=$OWN/nest-modules
fi
D=target/bench/boot-aarch64
rm -rf "$D"; mkdir -p "$D/q/bin"
cp target/aarch64-unknown-linux-gnu/release/tern target/aarch64-unknown-linux-gnu/release/tern-bench "$D/"
cp "$KERNEL" "$D/Image"; cp "$INITRD" "$D/initramfs.cpio.gz"

# QEMU for arm64, the version the host runs for x86.
# shellcheck source=../tools/lib-debian-bundle.sh
. tools/lib-debian-bundle.sh
debb_arch aarch64
QVER=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
debb_fetch "$CACHE/qemu-arm64-${QVER//[:~+]/_}" "qemu-system-arm${QVER:+=$QVER}"
cp "$CACHE/qemu-arm64-${QVER//[:~+]/_}/root/usr/bin/qemu-system-aarch64" "$D/q/bin/"
debb_libs "$CACHE/qemu-arm64-${QVER//[:~+]/_}" "$D/q/lib" "$D/q/bin/qemu-system-aarch64"
debb_runner "$D/q/run"
debb_check "$D/q/lib" "$D/q/bin/qemu-system-aarch64"

ARGS="console=ttyAMA0 panic=1 quiet"
for cmd in poweroff shell; do
    for pci in false true; do
        n=tern; [ $pci = true ] && n=tern-pci
        cat > "$D/$n-$cmd.json" <<JSON
{"boot-source": {"kernel_image_path": "Image", "initrd_path": "initramfs.cpio.gz",
  "boot_args": "$ARGS guest.cmd=$cmd"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": $MEM, "pci": $pci}, "drives": [],
 "entropy": {}}
JSON
    done
done
COMMON="-M virt,gic-version=3 -accel kvm -cpu host -m $MEM -smp 1 -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel Image -initrd initramfs.cpio.gz"
Q="./q/run qemu-system-aarch64 $COMMON -device virtio-rng-device"
QPCI="./q/run qemu-system-aarch64 $COMMON -device virtio-rng-pci"
run() { # NAME KIND COMMAND: one tern-bench line of run.sh (COMMAND quoted for sh)
    local opts='--marker "GUEST BOOTED"'
    [ "$2" = mem ] && opts='--mem-sample-after "GUEST BOOTED" --kill-after "GUEST BOOTED" --guest-mib '"$MEM"
    echo "  echo \"@@R $1 $2 \$(./tern-bench run --timeout 120 $opts -- $3)\""
}
{
    echo 'for i in $(seq '"$N"'); do'
    for kind in boot mem; do
        cmd=poweroff; [ $kind = mem ] && cmd=shell
        run tern $kind "./tern --no-api --level Warning --config-file tern-$cmd.json"
        run tern-pci $kind "./tern --no-api --level Warning --config-file tern-pci-$cmd.json"
        run qemu-virt $kind "$Q -append \"$ARGS guest.cmd=$cmd\""
        run qemu-virt-pci $kind "$QPCI -append \"$ARGS guest.cmd=$cmd\""
    done
    echo 'done'
} > "$D/run.sh"
if [ "$(uname -m)" = aarch64 ] && [ -c /dev/kvm ]; then
    where="directly on ARM64 KVM"
    (cd "$D" && sh run.sh) > "$D/out.txt"
else
    where="nested: arm64 L1 under QEMU TCG (-M virt,virtualization=on, GICv3), both VMMs inside L1 with its KVM"
    L1_KERNEL=$KERNEL L1_MODULES=$MODULES L1_MEM=$((MEM + 2048)) NEST_TIMEOUT=$((N * 8 * 120 + 600)) \
        bash tools/nest-aarch64.sh -s "$D/run.sh" "$D/tern" "$D/tern-bench" "$D/Image" \
        "$D/initramfs.cpio.gz" "$D"/tern*.json "$D/q" > "$D/out.txt"
fi
grep -a '^@@R ' "$D/out.txt" | sed 's/^@@R //' > "$D/results.jsonl"
python3 bench/summarize.py "$D/results.jsonl" --where "$where" --runs "$N" --mem "$MEM" \
    --qemu "QEMU $QVER (qemu-system-arm:arm64)" --kernel "$KERNEL"
