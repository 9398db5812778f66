#!/bin/bash
# Block and network throughput of tern beside QEMU's microvm machine, same kernel, root
# filesystem, disks and TAP, same run:
#   fio in the guest on a raw 512 MiB disk: 4 KiB random read (IOPS, iodepth 32, libaio),
#   1 MiB sequential read and write (MiB/s, iodepth 8); O_DIRECT in the guest, the host page
#   cache behind both VMMs (tern twice: io_engine Sync, pread/pwrite on the drive's worker
#   thread, and Async, io_uring; QEMU: cache=writeback, aio=threads, its defaults);
#   iperf3 guest -> host and host -> guest over a TAP (QEMU: vhost=off, userspace virtio-net
#   like tern), inside a network namespace of its own.
#   Per VMM, the KVM exits of its whole run (boot included; KVM's debugfs `exits` counter on
#   the host that runs it, L1 in the nest, sampled while the VM lives: bench/kvm-counters.sh)
#   and the MiB fio and iperf3 moved, and their ratio.
# Needs the guest kit's rootfs.ext4 (fio and iperf3 inside): $TERN_GUEST_DIR or ../shared/guest.
# With -p, PCI beside virtio-mmio: tern (Async) on virtio-mmio and on PCI (machine-config.pci,
# virtio-pci + MSI-X), QEMU's microvm on virtio-mmio and with its PCIe host (pcie=on:
# virtio-blk-pci, virtio-net-pci), the kernel without pci=off for the PCI ones. (q35 boots
# through SeaBIOS, which did not get through in the nest: see bench/boot.sh.)
# Runs directly on hardware KVM, otherwise inside the nest, like the tests.
#   bench/io.sh [-t SECONDS] [-p]     (default 10 s per fio job, 5 s per iperf3 direction)
# IO_VMMS (a list of tern-Sync tern-Async tern-pci qemu qemu-pcie qemu-q35) picks the VMMs.
set -euo pipefail
cd "$(dirname "$0")/.."
T=10 PCI=
while getopts 't:p' o; do case $o in t) T=$OPTARG ;; p) PCI=1 ;; *) exit 2 ;; esac; done
. bench/lib.sh
command -v iperf3 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null
bench_setup io
G=${TERN_GUEST_DIR:-../shared/guest}
[ -f "$G/rootfs.ext4" ] || { echo "bench/io.sh: needs $G/rootfs.ext4 (the guest kit's root filesystem with fio and iperf3)" >&2; exit 1; }
cp "$(command -v iperf3)" bench/kvm-counters.sh "$D/"
IT=$(( T / 2 > 0 ? T / 2 : 1 ))
cat > "$D/bench.sh" <<SH
ip addr add 172.16.0.2/24 dev eth0 && ip link set eth0 up
for d in /sys/block/vd*; do [ "\$(cat \$d/size)" = 1048576 ] && data=/dev/\${d##*/}; done
echo "BENCH data disk \$data"
f() { fio --name=\$1 --filename=\$data --direct=1 --ioengine=libaio --time_based --runtime=$T \$2 | grep -E '(read|write): IOPS=' | sed "s/^/BENCH \$1 /"; }
f randread "--rw=randread --bs=4k --iodepth=32"
f seqread "--rw=read --bs=1M --iodepth=8"
f seqwrite "--rw=write --bs=1M --iodepth=8"
iperf3 -c 172.16.0.1 -t $IT -f m | grep receiver | sed 's/^/BENCH iperf_guest_to_host /'
iperf3 -c 172.16.0.1 -t $IT -f m -R | grep receiver | sed 's/^/BENCH iperf_host_to_guest /'
SH
cp "$G/rootfs.ext4" "$D/rootfs.ext4"
debugfs -w -R "write $D/bench.sh /bench.sh" "$D/rootfs.ext4" >/dev/null 2>&1
ARGS="console=ttyS0 reboot=k panic=1 pci=off quiet guest.script=/bench.sh"
PARGS="console=ttyS0 reboot=k panic=1 quiet guest.script=/bench.sh"
# tern twice: io_engine Sync (pread/pwrite on the drive's worker thread) and Async (io_uring);
# with -p, Async on PCI too (tern-pci).
for engine in Sync Async pci; do
a=$ARGS pci=
if [ $engine = pci ]; then a=$PARGS pci=', "pci": true'; fi
cat > "$D/tern-$engine.json" <<JSON
{"boot-source": {"kernel_image_path": "vmlinux", "boot_args": "$a"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 512$pci},
 "drives": [{"drive_id": "rootfs", "path_on_host": "root.img", "is_root_device": true, "is_read_only": true},
            {"drive_id": "data", "path_on_host": "data.img", "is_root_device": false, "io_engine": "$( [ $engine = Sync ] && echo Sync || echo Async )"}],
 "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}]}
JSON
done
# The root disk first, so that it is /dev/vda for both VMMs.
Q="./qemu-system-x86_64 -L fw -M microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off -enable-kvm -cpu host -m 512 -smp 1 -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel vmlinux -drive id=root,file=root.img,format=raw,if=none,readonly=on -device virtio-blk-device,drive=root -drive id=data,file=data.img,format=raw,if=none -device virtio-blk-device,drive=data -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off -device virtio-net-device,netdev=n0,mac=06:00:ac:10:00:02"
QPCI="./qemu-system-x86_64 -L fw -M microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off,pcie=on -enable-kvm -cpu host -m 512 -smp 1 -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel vmlinux -drive id=root,file=root.img,format=raw,if=none,readonly=on -device virtio-blk-pci,drive=root -drive id=data,file=data.img,format=raw,if=none -device virtio-blk-pci,drive=data -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off -device virtio-net-pci,netdev=n0,mac=06:00:ac:10:00:02,romfile="
# q35 (SeaBIOS, the same virtio-pci devices) only when asked for, IO_VMMS="... qemu-q35": its guest
# reset at fio's start in the nest (docs/benchmarks.md).
Q35="./qemu-system-x86_64 -L fw -M q35 -enable-kvm -cpu host -m 512 -smp 1 -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel vmlinux -drive id=root,file=root.img,format=raw,if=none,readonly=on -device virtio-blk-pci,drive=root -drive id=data,file=data.img,format=raw,if=none -device virtio-blk-pci,drive=data -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off -device virtio-net-pci,netdev=n0,mac=06:00:ac:10:00:02,romfile="
VMMS="tern-Sync tern-Async qemu"
[ -n "$PCI" ] && VMMS="tern-Async tern-pci qemu qemu-pcie"
VMMS=${IO_VMMS:-$VMMS}
cat > "$D/run.sh" <<SH
. ./kvm-counters.sh
./tern-bench mktap tap0
ip link set lo up; ip addr add 172.16.0.1/24 dev tap0; ip link set tap0 up
./iperf3 -s -D
for vmm in $VMMS; do
  cp rootfs.ext4 root.img; rm -f data.img; dd if=/dev/zero of=data.img bs=1M count=512 2>/dev/null
  kvm_sample_start
  case \$vmm in
  tern-*) ./tern-bench run --timeout 600 -- ./tern --no-api --level Warning --config-file \$vmm.json > out.\$vmm ;;
  qemu) ./tern-bench run --timeout 600 -- $Q -append "$ARGS root=/dev/vda ro" > out.\$vmm ;;
  qemu-pcie) ./tern-bench run --timeout 600 -- $QPCI -append "$PARGS root=/dev/vda ro" > out.\$vmm ;;
  qemu-q35) ./tern-bench run --timeout 600 -- $Q35 -append "$PARGS root=/dev/vda ro" > out.\$vmm ;;
  esac
  echo "@@X \$vmm \$(kvm_sample_stop)"
  echo "@@R \$vmm \$(tail -1 out.\$vmm)"
  grep -o 'BENCH [^"\\\\]*' out.\$vmm | sed "s/^/@@B \$vmm /"
done
SH
if hw_kvm; then
    where="directly on hardware KVM"
    (cd "$D" && unshare -n sh run.sh) > "$D/out.txt"
else
    where="nested: L1 under QEMU TCG (-cpu max,+svm), both VMMs inside L1 with its KVM"
    echo 'unshare -n sh run-inner.sh' > "$D/run-outer.sh"; mv "$D/run.sh" "$D/run-inner.sh"
    L1_MEM=3072 NEST_TIMEOUT=1800 bash tools/nest-x86_64.sh -s "$D/run-outer.sh" \
        "$D/tern" "$D/tern-bench" "$D/vmlinux" "$D/tern-Sync.json" "$D/tern-Async.json" "$D/tern-pci.json" "$D/rootfs.ext4" "$D/iperf3" \
        "$D/run-inner.sh" "$D/qemu-system-x86_64" "$D/fw" "$D/kvm-counters.sh" > "$D/out.txt"
fi
echo "# bench/io.sh -t $T ($where)"
echo "# qemu: $("$QEMU" --version | head -1); kernel: $KERNEL"
grep -a '^@@B ' "$D/out.txt" | sed 's/^@@B //'
echo "# per VMM: KVM exits of its whole run (boot included), MiB fio and iperf3 moved, exits per MiB"
grep -a '^@@B \|^@@X ' "$D/out.txt" | awk -f bench/exits-per-mib.awk
