#!/bin/bash
# Is it tern or the nest? The same interrupt-heavy guest under tern and under QEMU, taking
# turns in one x86 nest: 2 vCPUs, 512 MiB, a virtio-rng on PCI (tern: machine-config.pci,
# MSI-X through irqfds; QEMU: microvm with its PCIe host and virtio-rng-pci, MSI-X through
# its irqfds), the guest reads 1 MiB from /dev/hwrng (about 16,000 requests and MSIs, most
# to the idle vCPU) and powers off. `pci_all_devices` failed in exactly that phase (an L2
# vCPU with a CR3 outside its RAM, and a triple fault while an MSI was delivered to an idle
# vCPU: docs/testing.md). L1 traces its KVM (nest.kvmtrace=1) and prints the trace at the
# first L2 shutdown, whichever VMM's.
#   tools/nest-rng-stress.sh [-n ROUNDS] [-d]    (default 10; one tern and one QEMU boot each)
# -d: Debian's cloud kernel with its virtio modules (tools/make-guest.sh: bzImage and
# initramfs-virtio), the guest of pci_all_devices, instead of ../shared's test kernel.
# Prints one line per boot and a count per VMM; raw results in target/rng-stress/.
set -euo pipefail
cd "$(dirname "$0")/.."
N=10 DEB=
while getopts 'n:d' o; do case $o in n) N=$OPTARG ;; d) DEB=1 ;; *) exit 2 ;; esac; done
. bench/lib.sh
bench_setup rng-stress
if [ -n "$DEB" ]; then
    own=${TERN_CACHE:-$HOME/.cache/tern}/guest
    cp "$own/bzImage" "$D/vmlinux"; cp "$own/initramfs-virtio.cpio.gz" "$D/initramfs.cpio.gz"
fi
# irqaffinity=1: the rng's interrupt goes to vCPU 1 under both VMMs, the idle one, as it did in
# pci_all_devices.
ARGS="console=ttyS0 reboot=k panic=1 quiet irqaffinity=1 guest.hwrng=1 guest.cmd=poweroff"
cat > "$D/tern.json" <<JSON
{"boot-source": {"kernel_image_path": "vmlinux", "initrd_path": "initramfs.cpio.gz", "boot_args": "$ARGS"},
 "machine-config": {"vcpu_count": 2, "mem_size_mib": 512, "pci": true}, "drives": [], "entropy": {}}
JSON
Q="./qemu-system-x86_64 -L fw -M microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off,pcie=on -enable-kvm -cpu host -m 512 -smp 2 -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel vmlinux -initrd initramfs.cpio.gz -device virtio-rng-pci"
cat > "$D/run.sh" <<SH
for i in \$(seq $N); do
  ./tern-bench run --timeout 120 --marker 'GUEST HWRNG_BYTES' --marker 'GUEST POWEROFF' -- ./tern --no-api --level Warning --config-file tern.json > r.tern.\$i 2>&1
  echo "@@S tern \$i \$(grep '^{' r.tern.\$i)"
  ./tern-bench run --timeout 120 --marker 'GUEST HWRNG_BYTES' --marker 'GUEST POWEROFF' -- $Q -append "$ARGS" > r.qemu.\$i 2>&1
  echo "@@S qemu \$i \$(grep '^{' r.qemu.\$i)"
done
SH
L1_APPEND=${L1_APPEND:-nest.kvmtrace=1} L1_MEM=3072 NEST_TIMEOUT=$((N * 300 + 300)) NEST_IDLE=400 \
    bash tools/nest-x86_64.sh -s "$D/run.sh" "$D/tern" "$D/tern-bench" "$D/vmlinux" \
    "$D/initramfs.cpio.gz" "$D/tern.json" "$D/qemu-system-x86_64" "$D/fw" > "$D/out.txt" || true
python3 - "$D/out.txt" <<'PY'
import json, sys
counts = {}
for line in open(sys.argv[1], errors="replace"):
    if not line.startswith("@@S "):
        continue
    _, vmm, i, js = line.rstrip("\n").split(" ", 3)
    try:
        r = json.loads(js)
    except ValueError:
        what = "no report"
    else:
        m = dict(r["markers"])
        text = " ".join(l for _, _, l in r["lines"])
        if m.get("GUEST POWEROFF") is not None:
            what = "ok"
        elif "triple fault" in text:
            what = "triple fault"
        elif r["timed_out"]:
            what = "timed out" + (" after the rng read" if m.get("GUEST HWRNG_BYTES") else " in the rng read")
        else:
            what = f"exit {r['exit_code']} signal {r['signal']} without poweroff"
    counts.setdefault(vmm, {}).setdefault(what, 0)
    counts[vmm][what] += 1
    print(f"{vmm} {i}: {what}")
for vmm, c in counts.items():
    print(vmm, ", ".join(f"{k}: {v}" for k, v in sorted(c.items())))
PY
grep -a "KVMTRACE stopped\|NEST MONITOR\|killing it" "$D/out.txt" | head -5 || true
