#!/bin/bash
# Run a script inside an "L1" Linux guest that has a real /dev/kvm, for
# integration tests that need KVM on hosts whose own /dev/kvm cannot run
# stock Linux guests (kvm_pvm). QEMU TCG emulates an x86_64 PC with AMD SVM
# (`-cpu max,+svm`: QEMU 7.2's TCG emulates SVM with nested paging, not VMX),
# L1 is Debian's cloud kernel with kvm-amd loaded from an initramfs.
#
#   tools/nest-x86_64.sh -s SCRIPT [FILE|DIR ...]
#
# FILEs/DIRs go to /nest in L1 (the script's working directory); dynamically
# linked x86_64 ELF files get their interpreter and libraries from this host,
# at the same paths. SCRIPT runs with busybox sh, stdin /dev/null.
# Console (stdout): "NEST L1 UP uptime=<s>", "NEST KVM ok|MISSING",
# "NEST CMD START", the script's output, "NEST EXIT rc=<N>".
# Exit status: N, or 255 if L1 never printed NEST EXIT (panic, timeout, ...).
#
# Environment: TERN_CACHE (default ~/.cache/tern), L1_KVER, L1_MEM (MiB,
# default 2048; must exceed what an L2 guest maps), L1_SMP (2), L1_APPEND,
# NEST_QEMU_ARGS (more QEMU options, e.g. "-d cpu_reset -D /tmp/q.log"),
# NEST_TIMEOUT (s, default 1200), NEST_IDLE (s: kill an L1 silent that long; off
# by default), NEST_LOG (copy of the console, default
# $TERN_CACHE/nest-x86_64/last-console.log), NEST_REBUILD=1.
# Needs: qemu-system-x86, busybox-static, cpio, binutils, kmod, apt-get.
set -euo pipefail

ME=${0##*/}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=SCRIPTDIR/lib-nest.sh
. "$HERE/lib-nest.sh"
die() { echo "$ME: $*" >&2; exit 255; }
usage() { echo "usage: $ME -s SCRIPT [FILE|DIR ...]  (see the header of $0)" >&2; exit 2; }

SCRIPT=
while getopts 's:h' o; do
    case $o in s) SCRIPT=$OPTARG ;; *) usage ;; esac
done
shift $((OPTIND - 1))
[ -n "$SCRIPT" ] || usage
[ -f "$SCRIPT" ] || die "no such script: $SCRIPT"
for f in "$@"; do [ -e "$f" ] || die "no such file: $f"; done
for t in qemu-system-x86_64 cpio readelf timeout; do
    command -v "$t" >/dev/null || die "needs $t"
done
[ -x /bin/busybox ] || die "needs busybox-static (/bin/busybox)"

# shellcheck source=SCRIPTDIR/lib-debian-kernel.sh
. "$HERE/lib-debian-kernel.sh"
KVER=$(debk_kver) || exit 255
KROOT=$(debk_fetch "$KVER") || exit 255
VMLINUZ=$KROOT/boot/vmlinuz-$KVER
C=$TERN_CACHE/nest-x86_64/$KVER
BASE=$C/base.cpio
mkdir -p "$C"

# ---- the cached base initramfs: busybox, modules, /init --------------------
if [ "${NEST_REBUILD:-0}" = 1 ] || [ ! -f "$BASE" ] || [ "$0" -nt "$BASE" ] || [ "$HERE/lib-nest.sh" -nt "$BASE" ] ||
   [ "$HERE/lib-debian-kernel.sh" -nt "$BASE" ]; then
    echo "$ME: building the L1 base initramfs ($KVER)" >&2
    R=$C/base.root; rm -rf "$R"
    mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,etc,nest,lib/modules/nest}
    cp /bin/busybox "$R/bin/busybox"; ln -s busybox "$R/bin/sh"
    : > "$R/etc/nest-modules"
    # modprobe resolves modules.dep: dependencies first, each printed once
    # per request ("insmod PATH" lines; "builtin NAME" for built-ins).
    seen=" "
    for m in kvm kvm_amd tun vhost_net vhost_vsock virtio_pci virtio_console; do
        deps=$(modprobe -C /dev/null -d "$KROOT" -S "$KVER" --show-depends "$m" 2>/dev/null) ||
            { echo "$ME: warning: module $m not in $KVER" >&2; continue; }
        for p in $(printf '%s\n' "$deps" | sed -n 's/^insmod \([^ ]*\).*/\1/p'); do
            b=${p##*/}; b=${b%%.ko*}
            case $seen in *" $b "*) continue ;; esac
            seen="$seen$b "
            case $p in                      # busybox insmod wants plain .ko
                *.ko.xz)  xz -dc "$p" ;;
                *.ko.zst) zstd -qdc "$p" ;;
                *)        cat "$p" ;;
            esac > "$R/lib/modules/nest/$b.ko"
            echo "$b" >> "$R/etc/nest-modules"
        done
    done
    nest_write_init "$R/init"
    (cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$BASE.tmp"
    mv "$BASE.tmp" "$BASE"
    rm -rf "$R"
fi

# ---- the per-run cpio: /nest/<files>, their libraries, /nest-cmd.sh --------
RUN=$(mktemp -d "${TMPDIR:-/tmp}/tern-nest.XXXXXX")
trap 'rm -rf "$RUN"' EXIT
mkdir -p "$RUN/root/nest"

# copy_libs ELF: its interpreter and NEEDED libraries (recursively) into
# $RUN/root at their host paths. Dereferenced copies, so the merged-/usr
# symlinks (/lib64 -> usr/lib64) become plain directories in L1.
LIBDIRS="/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /usr/lib64 /usr/local/lib /lib /usr/lib"
copy_libs() {
    local elf=$1 lib d p
    p=$(readelf -l "$elf" 2>/dev/null | sed -n 's/.*program interpreter: \(.*\)]$/\1/p')
    if [ -n "$p" ] && [ ! -e "$RUN/root$p" ]; then
        mkdir -p "$RUN/root${p%/*}"; cp -L "$p" "$RUN/root$p"
    fi
    for lib in $(readelf -d "$elf" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'); do
        p=
        for d in $LIBDIRS; do
            if [ -e "$d/$lib" ]; then p=$d/$lib; break; fi
        done
        [ -n "$p" ] || { echo "$ME: warning: $lib (needed by $elf) not found" >&2; continue; }
        [ -e "$RUN/root$p" ] && continue
        mkdir -p "$RUN/root$d"; cp -L "$p" "$RUN/root$p"
        copy_libs "$p"
    done
}

for f in "$@"; do
    cp -a "$f" "$RUN/root/nest/"
    while IFS= read -r -d '' e; do
        if readelf -h "$e" 2>/dev/null | grep -q 'Machine:.*X86-64'; then copy_libs "$e"; fi
    done < <(find "$RUN/root/nest/$(basename "$f")" -type f -print0)
done
cp "$SCRIPT" "$RUN/root/nest-cmd.sh"
(cd "$RUN/root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$RUN/run.cpio"
cat "$BASE" "$RUN/run.cpio" > "$RUN/initramfs.cpio"

# ---- boot L1 under TCG ------------------------------------------------------
# The kernel's own console (ttyS0, a file) at loglevel 5: warnings and the stack dumps that
# come with them (a soft lockup's, every CPU's), without the boot chatter.
LOG=$RUN/console.log
: > "$LOG"
# L1's command writes to a virtio console whose QEMU end is a file, streamed from there:
# QEMU drops what a virtio console writes while its chardev cannot take it, and a stdio pipe
# whose reader lags fills up (run 12's report lost its tail that way); a file always takes it.
CMDOUT=$RUN/command.out
: > "$CMDOUT"
nest_watchdog
set +e
timeout -k 5 "${NEST_TIMEOUT:-1200}" qemu-system-x86_64 -accel tcg -M pc -cpu max,+svm \
    -m "${L1_MEM:-2048}" -smp "${L1_SMP:-2}" -nographic -no-reboot -nodefaults -no-user-config \
    -serial "file:$RUN/kernel.log" \
    -device virtio-serial-pci -chardev "file,id=nestcon,path=$CMDOUT" -device virtconsole,chardev=nestcon \
    -kernel "$VMLINUZ" -initrd "$RUN/initramfs.cpio" $(nest_monitor_args) ${NEST_QEMU_ARGS:-} \
    -append "console=ttyS0 panic=-1 quiet loglevel=5 softlockup_all_cpu_backtrace=1 nest.console=hvc0 $(nest_append)" \
    </dev/null > "$RUN/qemu.out" 2>&1 &
qpid=$!
# no \r, and no terminal resets/escapes (SeaBIOS, kernel) before markers
tail -n +1 -F --pid="$qpid" "$CMDOUT" 2>/dev/null |
    sed -u 's/\r//g; s/\x1bc//g; s/\x1b\[[0-9;?]*[A-Za-z]//g' | tee -a "$LOG"
wait "$qpid"
qrc=$?
set -e
# QEMU's own words (an error, the signal that ended it) after the command's output.
if [ -s "$RUN/qemu.out" ]; then tee -a "$LOG" < "$RUN/qemu.out"; fi
nest_finish "$qrc" "${NEST_LOG:-$TERN_CACHE/nest-x86_64/last-console.log}"
