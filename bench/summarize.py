#!/usr/bin/env python3
"""Summarises bench/boot.sh's results.jsonl ("<vmm> <kind> <tern-bench JSON>" per line) as Markdown."""
import argparse, json, statistics, sys

ap = argparse.ArgumentParser()
ap.add_argument("results")
ap.add_argument("--where", default="")
ap.add_argument("--runs", default="")
ap.add_argument("--mem", default="")
ap.add_argument("--qemu", default="")
ap.add_argument("--kernel", default="")
a = ap.parse_args()

boot, mem, failures = {}, {}, []
for line in open(a.results):
    vmm, kind, js = line.split(" ", 2)
    try:
        r = json.loads(js)
    except ValueError:
        failures.append(f"{vmm} {kind}: unreadable report")
        continue
    if kind == "boot":
        booted = dict(r["markers"]).get("GUEST BOOTED")
        if booted is None or r["timed_out"]:
            failures.append(f"{vmm} boot: no GUEST BOOTED (exit {r['exit_code']})")
            continue
        uptime = next((float(l.split()[2]) for _, _, l in r["lines"]
                       if l.startswith("GUEST UPTIME ")), float("nan"))
        boot.setdefault(vmm, []).append((booted, r["wall_ms"], r["max_rss_kib"], uptime))
    else:
        s = r.get("mem_sample")
        if not s:
            failures.append(f"{vmm} mem: no sample")
            continue
        mem.setdefault(vmm, []).append(s)

def mmm(xs):
    return f"{min(xs):.0f} / {statistics.median(xs):.0f} / {max(xs):.0f}"

print(f"Runs: {a.runs} per VMM, 1 vCPU, {a.mem} MiB, {a.where}. Kernel {a.kernel}; {a.qemu}.\n")
print("| VMM | to `GUEST BOOTED` (ms) | guest uptime then (s, median) | to exit (ms) | peak RSS (MiB) | RSS at boot (MiB) | guest RAM resident (MiB) | VMM overhead (MiB) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
known = ("tern", "firecracker", "qemu", "tern-pci", "qemu-q35", "qemu-microvm-pcie")
for vmm in [v for v in known if v in boot or v in mem] + [v for v in boot if v not in known]:
    b, m = boot.get(vmm, []), mem.get(vmm, [])
    if not b or not m:
        print(f"| {vmm} | no data | | | | | | |")
        continue
    print(f"| {vmm} | {mmm([x[0] for x in b])} | {statistics.median([x[3] for x in b]):.2f} | {mmm([x[1] for x in b])} | "
          f"{statistics.median([x[2] for x in b]) / 1024:.1f} | "
          f"{statistics.median([s['rss_kib'] for s in m]) / 1024:.1f} | "
          f"{statistics.median([s['guest_rss_kib'] for s in m]) / 1024:.1f} | "
          f"{mmm([s['overhead_kib'] / 1024 for s in m]).replace(' / ', ' / ')} |")
print("\nTimes are min / median / max; memory columns are medians except overhead (min / median / max).")
if failures:
    print("\nFailures: " + "; ".join(failures))
    sys.exit(1)
