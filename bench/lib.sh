# Shared set-up of the bench/ scripts (sourced). bench_setup NAME: installs what is needed,
# builds tern and tern-bench (release), makes tern's guest, and sets
#   D       target/bench/NAME, emptied, with QEMU's microvm firmware in D/fw
#   KERNEL  $TERN_GUEST_DIR/vmlinux, ../shared/guest/vmlinux, or tern's own
#   INITRD  tern's initramfs (guest/init)
#   QEMU    the host's qemu-system-x86_64
# hw_kvm: true when /dev/kvm is hardware KVM (else the bench runs nested).
bench_setup() {
    bash tools/deps.sh
    cargo build --release -j2 --bin tern --bin tern-bench
    bash tools/make-guest.sh >/dev/null
    local own=${TERN_CACHE:-$HOME/.cache/tern}/guest g=${TERN_GUEST_DIR:-../shared/guest}
    KERNEL=$g/vmlinux; [ -f "$KERNEL" ] || KERNEL=$own/vmlinux
    INITRD=$own/initramfs.cpio.gz
    QEMU=$(command -v qemu-system-x86_64)
    D=target/bench/$1; rm -rf "$D"; mkdir -p "$D/fw"
    local f
    # pvh.bin: q35 and pc load an ELF vmlinux with a PVH note through this option ROM.
    for f in bios-microvm.bin qboot.rom linuxboot_dma.bin pvh.bin kvmvapic.bin; do
        cp -L "/usr/share/qemu/$f" "$D/fw/" 2>/dev/null || true
    done
    # q35's SeaBIOS (for bench -p); only this one from the seabios package, whose
    # bios-microvm.bin is a SeaBIOS build that cannot boot -kernel with microvm's options.
    cp -L /usr/share/qemu/bios-256k.bin "$D/fw/" 2>/dev/null ||
        cp -L /usr/share/seabios/bios-256k.bin "$D/fw/" 2>/dev/null || true
    # microvm's firmware is qboot: QEMU 10's data package (bookworm-backports) ships it only as
    # qboot.rom, while the machine still asks for bios-microvm.bin.
    [ -f "$D/fw/bios-microvm.bin" ] || cp "$D/fw/qboot.rom" "$D/fw/bios-microvm.bin" 2>/dev/null || true
    cp target/release/tern target/release/tern-bench "$KERNEL" "$INITRD" "$QEMU" "$D/"
}
hw_kvm() { [ -c /dev/kvm ] && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; }
