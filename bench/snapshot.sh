#!/bin/bash
# Snapshot create and restore times of tern (File and Uffd back-ends) beside QEMU (microvm,
# migration to a file), for guests of several sizes, measured by tern-bench in the same run:
#   create:  tern: PUT /snapshot/create request -> answer (paused VM, state + memory files,
#            fsync'd); QEMU: QMP migrate "exec:cat > FILE && sync FILE" sent (VM stopped,
#            migration bandwidth unlimited: QEMU's default caps it at 32 MiB/s) ->
#            query-migrate says completed
#   load:    tern: PUT /snapshot/load request -> answer (state checked, memory mapped, VM
#            rebuilt); Uffd: with `tern-bench uffd-serve` as the page-fault handler
#   running: tern: load request sent -> the restored guest's next console line (a tick it
#            prints every 0.2 s, so up to 200 ms of this is the guest's own wait); QEMU:
#            process start with -incoming "exec:cat FILE" -> QMP query-status says running
#            (QEMU has no load request: start-up is in its figure, and it reads all of
#            memory before the guest runs)
# The guest touches all its memory first (so the memory file is written in full).
# Runs directly on hardware KVM, otherwise inside the nest (tools/nest-x86_64.sh).
# -f zero fills the guest's RAM with zeros (pages both VMMs skip: tern leaves them as holes,
# QEMU sends them as zero pages); -f data (the default) with 0xaa bytes, as a guest whose
# memory is in use.
#   bench/snapshot.sh [-n RUNS] [-m "MIB MIB ..."] [-f data|zero]   (default 3, 128 and 2048)
# Prints a Markdown table; raw JSON lines go to target/bench/snapshot/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
N=3 SIZES="128 2048" FILL=data
while getopts 'n:m:f:' o; do case $o in n) N=$OPTARG ;; m) SIZES=$OPTARG ;; f) FILL=$OPTARG ;; *) exit 2 ;; esac; done
case $FILL in
    zero) FILLCMD='dd if=/dev/zero of=/tmp/fill bs=1M count=%s 2>/dev/null' ;;
    data) FILLCMD="dd if=/dev/zero bs=1M count=%s 2>/dev/null | tr '\\\\000' '\\\\252' > /tmp/fill" ;;
    *) echo "-f: zero or data" >&2; exit 2 ;;
esac
. bench/lib.sh
bench_setup snapshot
MAX=0
for m in $SIZES; do
    [ "$m" -gt "$MAX" ] && MAX=$m
    # Fill most of RAM in a tmpfs, then tick.
    fill=$((m * 3 / 4))
    cat > "$D/vm-$m.json" <<JSON
{"boot-source": {"kernel_image_path": "vmlinux", "initrd_path": "initramfs.cpio.gz",
  "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet guest.cmd=shell guest.script=/dev/vda"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": $m},
 "drives": [{"drive_id": "script", "path_on_host": "fill-$m.img", "is_root_device": false, "is_read_only": true}]}
JSON
    printf "mount -o remount,size=%sM /tmp 2>/dev/null\n$FILLCMD\ni=0\nwhile :; do i=\$((i+1)); echo \"GUEST TICK \$i\"; sleep 0.2; done\n" \
        "$m" "$fill" > "$D/fill-$m.img"
    truncate -s %4096 "$D/fill-$m.img"
    cat > "$D/create-$m.steps.json" <<JSON
[{"wait": "GUEST TICK 3"}, {"req": "PATCH /vm", "body": {"state": "Paused"}},
 {"req": "PUT /snapshot/create", "body": {"snapshot_type": "Full", "snapshot_path": "s-$m.state", "mem_file_path": "s-$m.mem"}},
 {"kill": true}]
JSON
    cat > "$D/load-$m.steps.json" <<JSON
[{"req": "PUT /snapshot/load", "body": {"snapshot_path": "s-$m.state", "mem_backend": {"backend_type": "File", "backend_path": "s-$m.mem"}, "resume_vm": true}},
 {"sleep_ms": 1500}, {"kill": true}]
JSON
    cat > "$D/qemu-$m.sh" <<SH
#!/bin/sh
exec ./qemu-system-x86_64 -L fw -M microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off -enable-kvm -cpu host -m $m -smp 1 -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel vmlinux -initrd initramfs.cpio.gz -drive id=s,file=fill-$m.img,format=raw,if=none,readonly=on -device virtio-blk-device,drive=s -append "console=ttyS0 reboot=k panic=1 pci=off quiet guest.cmd=shell guest.script=/dev/vda" -qmp unix:q.sock,server=on,wait=off "\$@"
SH
    cat > "$D/qcreate-$m.steps.json" <<JSON
[{"wait": "GUEST TICK 3"},
 {"qmp": {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1099511627776}}},
 {"qmp": {"execute": "stop"}},
 {"qmp": {"execute": "migrate", "arguments": {"uri": "exec:cat > q-$m.mig && sync q-$m.mig"}}},
 {"qmp": {"execute": "query-migrate"}, "until": "\"completed\""},
 {"kill": true}]
JSON
    cat > "$D/qload.steps.json" <<JSON
[{"qmp": {"execute": "query-status"}, "until": "\"status\": \"running\""}, {"sleep_ms": 1500}, {"kill": true}]
JSON
    cat > "$D/uffd-$m.steps.json" <<JSON
[{"req": "PUT /snapshot/load", "body": {"snapshot_path": "s-$m.state", "mem_backend": {"backend_type": "Uffd", "backend_path": "u.sock"}, "resume_vm": true}},
 {"sleep_ms": 1500}, {"kill": true}]
JSON
done
{
    echo 'for i in $(seq '"$N"'); do'
    echo '  for m in '"$SIZES"'; do'
    echo '    echo "@@R create $m $(./tern-bench run --timeout 300 --api-sock c.sock --steps create-$m.steps.json -- ./tern --api-sock c.sock --config-file vm-$m.json)"'
    echo '    echo "@@R load $m $(./tern-bench run --timeout 60 --marker "GUEST TICK" --api-sock l.sock --steps load-$m.steps.json -- ./tern --api-sock l.sock)"'
    echo '    ./tern-bench uffd-serve u.sock s-$m.mem > /dev/null 2>&1 & h=$!; sleep 0.3'
    echo '    echo "@@R uffd $m $(./tern-bench run --timeout 60 --marker "GUEST TICK" --api-sock u2.sock --steps uffd-$m.steps.json -- ./tern --api-sock u2.sock)"'
    echo '    kill $h 2>/dev/null; wait $h 2>/dev/null'
    echo '    rm -f s-$m.state s-$m.mem'
    echo '    echo "@@R qcreate $m $(./tern-bench run --timeout 300 --api-sock q.sock --steps qcreate-$m.steps.json -- sh qemu-$m.sh)"'
    echo '    echo "@@R qload $m $(./tern-bench run --timeout 30 --marker "GUEST TICK" --api-sock q.sock --steps qload.steps.json -- sh qemu-$m.sh -incoming "exec:cat q-$m.mig")"'
    echo '    rm -f q-$m.mig'
    echo '  done'
    echo 'done'
} > "$D/run.sh"
files=("$D/tern" "$D/tern-bench" "$D/vmlinux" "$D/initramfs.cpio.gz" "$D/qemu-system-x86_64" "$D/fw" "$D/qload.steps.json")
for m in $SIZES; do files+=("$D/vm-$m.json" "$D/fill-$m.img" "$D/create-$m.steps.json" "$D/load-$m.steps.json" "$D/uffd-$m.steps.json" "$D/qemu-$m.sh" "$D/qcreate-$m.steps.json"); done
if hw_kvm; then
    where="directly on hardware KVM"
    (cd "$D" && sh run.sh) > "$D/out.txt"
else
    where="nested: L1 under QEMU TCG (-cpu max,+svm), tern inside L1 with its KVM; the files are in L1's RAM (tmpfs)"
    # L1 holds the guest and its memory file (in its tmpfs): twice the largest guest, plus L1.
    L1_MEM=$((MAX * 3 + 2048)) NEST_TIMEOUT=$((N * 900 + 300)) bash tools/nest-x86_64.sh -s "$D/run.sh" \
        "${files[@]}" > "$D/out.txt"
fi
grep -a '^@@R ' "$D/out.txt" | sed 's/^@@R //' > "$D/results.jsonl"
python3 - "$D/results.jsonl" "$where" "$FILL" <<'PY'
import json, sys, statistics
rows = {}
for line in open(sys.argv[1]):
    kind, mib, js = line.split(" ", 2)
    r = json.loads(js)
    calls = {c["request"]: c for c in r.get("api", [])}
    d = rows.setdefault(int(mib), {"create": [], "load": [], "running": [], "uload": [], "urunning": [], "qcreate": [], "qrunning": []})
    if kind == "qcreate":
        m = calls.get("QMP migrate")
        done = calls.get("QMP query-migrate")
        if m and done and m["status"] == 200 and '"completed"' in done["body"]:
            d["qcreate"].append(done["done_ms"] - m["sent_ms"])
    elif kind == "qload":
        # QEMU has no load request: process start -> QMP query-status says "running" (the
        # incoming migration is complete and the vCPUs run).
        st = calls.get("QMP query-status")
        if st and '"status": "running"' in st["body"]:
            d["qrunning"].append(st["done_ms"])
            tick = next((t for t, _, l in r["lines"] if "GUEST TICK" in l), None)
            d.setdefault("qtick", []).append(tick)
    elif kind == "create":
        c = calls.get("PUT /snapshot/create")
        if c and c["status"] == 204:
            d["create"].append(c["done_ms"] - c["sent_ms"])
    else:
        c = calls.get("PUT /snapshot/load")
        tick = next((t for t, _, l in r["lines"] if "GUEST TICK" in l), None)
        load, running = ("load", "running") if kind == "load" else ("uload", "urunning")
        if c and c["status"] == 204:
            d[load].append(c["done_ms"] - c["sent_ms"])
            if tick is not None:
                d[running].append(tick - c["sent_ms"])
med = lambda v: f"{statistics.median(v):.0f} (n={len(v)})" if v else "—"
print(f"Where: {sys.argv[2]}. Fill: {sys.argv[3]}. Milliseconds, median of the runs.\n")
print("| guest RAM | tern: create | tern File: load | tern File: load → guest's next line | tern Uffd: load | tern Uffd: load → guest's next line | QEMU: create (migrate → completed) | QEMU: start with -incoming → running |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for mib in sorted(rows):
    d = rows[mib]
    print(f"| {mib} MiB | {med(d['create'])} | {med(d['load'])} | {med(d['running'])} | {med(d['uload'])} | {med(d['urunning'])} | {med(d['qcreate'])} | {med(d['qrunning'])} |")
for mib in sorted(rows):
    ticks = rows[mib].get("qtick", [])
    print(f"\nQEMU {mib} MiB: the restored guest's next console line came after {ticks} ms (None: not within 1.5 s of running)")
PY
echo
echo "# qemu: $("$QEMU" --version | head -1); kernel: $KERNEL"
