#!/bin/bash
# Boot time and VMM memory overhead of tern beside QEMU's microvm machine, same kernel, initramfs
# and command line, same run, both measured by tern-bench:
#   boot time: spawn -> the guest's "GUEST BOOTED" console line, and -> exit (guest.cmd=poweroff,
#              for Firecracker guest.cmd=reboot: it has no poweroff on x86, and QEMU's microvm
#              no i8042 for reboot=k)
#   memory:    VMM RSS minus the RSS of its guest-RAM mappings, 200 ms after "GUEST BOOTED"
#              (guest.cmd=shell; the VMM is killed after the sample)
# With FIRECRACKER=/path/to/firecracker (built from source: ../shared/notes/peers.md says how),
# Firecracker boots the same guest from the same configuration file, interleaved with the others.
# With -p, every VM gets one virtio-rng device, and two more VMMs boot beside them: tern with
# its devices on PCI (machine-config.pci, virtio-pci + MSI-X), QEMU's q35 (SeaBIOS,
# virtio-rng-pci) and QEMU's microvm with its PCIe host (pcie=on, virtio-rng-pci), all without
# the kernel's pci=off.
# Runs directly on hardware KVM, otherwise inside the nest (tools/nest-x86_64.sh), like the tests.
#   bench/boot.sh [-n RUNS] [-m MIB] [-p]     (default 10 runs, 256 MiB, 1 vCPU)
# Prints a Markdown table; raw JSON lines go to target/bench/boot/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
N=10 MEM=256 PCI=
while getopts 'n:m:p' o; do case $o in n) N=$OPTARG ;; m) MEM=$OPTARG ;; p) PCI=1 ;; *) exit 2 ;; esac; done
. bench/lib.sh
bench_setup boot
ARGS="console=ttyS0 reboot=k panic=1 pci=off quiet"
PARGS="console=ttyS0 reboot=k panic=1 quiet"
RNG= QRNG= QRNGPCI=
if [ -n "$PCI" ]; then RNG=', "entropy": {}'; QRNG=" -device virtio-rng-device"; QRNGPCI=" -device virtio-rng-pci"; fi
for cmd in poweroff reboot shell; do
cat > "$D/tern-$cmd.json" <<JSON
{"boot-source": {"kernel_image_path": "vmlinux", "initrd_path": "initramfs.cpio.gz",
  "boot_args": "$ARGS guest.cmd=$cmd"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": $MEM}, "drives": []$RNG}
JSON
cat > "$D/tern-pci-$cmd.json" <<JSON
{"boot-source": {"kernel_image_path": "vmlinux", "initrd_path": "initramfs.cpio.gz",
  "boot_args": "$PARGS guest.cmd=$cmd"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": $MEM, "pci": true}, "drives": []$RNG}
JSON
done
COMMON="-enable-kvm -cpu host -m $MEM -smp 1 -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel vmlinux -initrd initramfs.cpio.gz"
Q="./qemu-system-x86_64 -L fw -M microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off $COMMON$QRNG"
Q35="./qemu-system-x86_64 -L fw -M q35 $COMMON$QRNGPCI"
QMP="./qemu-system-x86_64 -L fw -M microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off,pcie=on $COMMON$QRNGPCI"
{
    echo 'for i in $(seq '"$N"'); do'
    if [ -n "$PCI" ]; then
        echo '  echo "@@R tern-pci boot $(./tern-bench run --timeout 60 --marker "GUEST BOOTED" -- ./tern --no-api --level Warning --config-file tern-pci-poweroff.json)"'
        echo '  echo "@@R qemu-q35 boot $(./tern-bench run --timeout 60 --marker "GUEST BOOTED" -- '"$Q35"' -append "'"$PARGS"' guest.cmd=poweroff")"'
        echo '  echo "@@R qemu-microvm-pcie boot $(./tern-bench run --timeout 60 --marker "GUEST BOOTED" -- '"$QMP"' -append "'"$PARGS"' guest.cmd=poweroff")"'
        echo '  echo "@@R tern-pci mem $(./tern-bench run --timeout 60 --mem-sample-after "GUEST BOOTED" --kill-after "GUEST BOOTED" --guest-mib '"$MEM"' -- ./tern --no-api --level Warning --config-file tern-pci-shell.json)"'
        echo '  echo "@@R qemu-q35 mem $(./tern-bench run --timeout 60 --mem-sample-after "GUEST BOOTED" --kill-after "GUEST BOOTED" --guest-mib '"$MEM"' -- '"$Q35"' -append "'"$PARGS"' guest.cmd=shell")"'
        echo '  echo "@@R qemu-microvm-pcie mem $(./tern-bench run --timeout 60 --mem-sample-after "GUEST BOOTED" --kill-after "GUEST BOOTED" --guest-mib '"$MEM"' -- '"$QMP"' -append "'"$PARGS"' guest.cmd=shell")"'
    fi
    echo '  echo "@@R tern boot $(./tern-bench run --timeout 60 --marker "GUEST BOOTED" -- ./tern --no-api --level Warning --config-file tern-poweroff.json)"'
    if [ -n "${FIRECRACKER:-}" ]; then
        echo '  echo "@@R firecracker boot $(./tern-bench run --timeout 60 --marker "GUEST BOOTED" -- ./firecracker --no-api --level Warning --config-file tern-reboot.json)"'
    fi
    echo '  echo "@@R qemu boot $(./tern-bench run --timeout 60 --marker "GUEST BOOTED" -- '"$Q"' -append "'"$ARGS"' guest.cmd=poweroff")"'
    echo '  echo "@@R tern mem $(./tern-bench run --timeout 60 --mem-sample-after "GUEST BOOTED" --kill-after "GUEST BOOTED" --guest-mib '"$MEM"' -- ./tern --no-api --level Warning --config-file tern-shell.json)"'
    if [ -n "${FIRECRACKER:-}" ]; then
        echo '  echo "@@R firecracker mem $(./tern-bench run --timeout 60 --mem-sample-after "GUEST BOOTED" --kill-after "GUEST BOOTED" --guest-mib '"$MEM"' -- ./firecracker --no-api --level Warning --config-file tern-shell.json)"'
    fi
    echo '  echo "@@R qemu mem $(./tern-bench run --timeout 60 --mem-sample-after "GUEST BOOTED" --kill-after "GUEST BOOTED" --guest-mib '"$MEM"' -- '"$Q"' -append "'"$ARGS"' guest.cmd=shell")"'
    echo 'done'
} > "$D/run.sh"
fc=()
if [ -n "${FIRECRACKER:-}" ]; then cp "$FIRECRACKER" "$D/firecracker"; fc=("$D/firecracker"); fi
if hw_kvm; then
    where="directly on hardware KVM"
    (cd "$D" && sh run.sh) > "$D/out.txt"
else
    where="nested: L1 under QEMU TCG (-cpu max,+svm), both VMMs inside L1 with its KVM"
    L1_MEM=$((MEM + 2048)) NEST_TIMEOUT=$((N * 240 + 300)) bash tools/nest-x86_64.sh -s "$D/run.sh" \
        "$D/tern" "$D/tern-bench" "$D/vmlinux" "$D/initramfs.cpio.gz" "$D/tern-poweroff.json" "$D/tern-reboot.json" \
        "$D/tern-shell.json" "$D/tern-pci-poweroff.json" "$D/tern-pci-shell.json" \
        "$D/qemu-system-x86_64" "$D/fw" "${fc[@]}" > "$D/out.txt"
fi
grep -a '^@@R ' "$D/out.txt" | sed 's/^@@R //' > "$D/results.jsonl"
python3 bench/summarize.py "$D/results.jsonl" --where "$where" --runs "$N" --mem "$MEM" \
    --qemu "$("$QEMU" --version | head -1)" --kernel "$KERNEL"
