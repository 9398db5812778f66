#!/bin/bash
# Boots a demo VM with tern and shows its console.
# With hardware KVM: an interactive shell in the guest (type `poweroff` or Ctrl-D to leave).
# Without (e.g. a VM without nested virtualization, or kvm_pvm): the same VM nested inside a
# QEMU-emulated L1 with real KVM, booting to its markers and powering off.
# Environment: TERN_GUEST_DIR (a directory with vmlinux or bzImage), KERNEL, INITRD, VCPUS, MEM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/deps.sh
cargo build --release -j2 --bin tern
OWN=${TERN_CACHE:-$HOME/.cache/tern}/guest
bash tools/make-guest.sh >/dev/null
G=${TERN_GUEST_DIR:-../shared/guest}
if [ -z "${KERNEL:-}" ]; then
    if [ -f "$G/vmlinux" ]; then KERNEL=$G/vmlinux; else KERNEL=$OWN/bzImage; fi
fi
INITRD=${INITRD:-$OWN/initramfs.cpio.gz}
D=target/demo; rm -rf "$D"; mkdir -p "$D"
cp target/release/tern "$KERNEL" "$INITRD" "$D/"
k=$(basename "$KERNEL"); i=$(basename "$INITRD")
hw_kvm() { [ -c /dev/kvm ] && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; }
if hw_kvm; then cmd=shell; else cmd=poweroff; fi
cat > "$D/vm.json" <<JSON
{
  "boot-source": {
    "kernel_image_path": "$k",
    "initrd_path": "$i",
    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off guest.cmd=$cmd"
  },
  "machine-config": { "vcpu_count": ${VCPUS:-2}, "mem_size_mib": ${MEM:-512} }
}
JSON
cd "$D"
if hw_kvm; then
    echo "== tern: booting $k with hardware KVM (leave the guest shell with poweroff or Ctrl-D) =="
    exec ./tern --no-api --config-file vm.json
fi
echo "== no hardware KVM here: booting $k with tern inside a nested L1 (QEMU TCG + SVM) =="
printf './tern --no-api --config-file vm.json\necho "tern exited with $?"\n' > run.sh
exec bash ../../tools/nest-x86_64.sh -s run.sh tern "$k" "$i" vm.json
