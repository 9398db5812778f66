# bench/io.sh's exits-per-MiB table. Input: "@@X <vmm> exits=N io_exits=N ..." (bench/kvm-counters.sh;
# "-" when KVM's debugfs counter could not be read) and "@@B <vmm> BENCH ..." lines. MiB moved: fio's
# "(81.5MiB/10001msec)" totals and iperf3's receiver "207 MBytes" (units are binary for both).
function mib(v, u) { return u ~ /^G/ ? v * 1024 : u ~ /^K/ ? v / 1024 : u == "B" ? v / 1048576 : v }
function num_unit(t,   v, u) {
    v = t; sub(/ ?[KMG]?i?B.*$/, "", v)
    u = t; sub(/^[0-9.]+ ?/, "", u)
    return mib(v + 0, u)
}
$1 == "@@X" { v = $3; sub(/^exits=/, "", v); x[$2] = v == "-" ? "" : v; order[++n] = $2; next }
$1 == "@@B" && /IOPS=/ && match($0, /\([0-9.]+[KMG]?i?B\/[0-9]+msec\)/) {
    moved[$2] += num_unit(substr($0, RSTART + 1, RLENGTH - 2)); next
}
$1 == "@@B" && /iperf_/ && match($0, /[0-9.]+ [KMG]Bytes/) { moved[$2] += num_unit(substr($0, RSTART, RLENGTH)) }
END {
    for (i = 1; i <= n; i++) {
        v = order[i]
        printf "%s: %s KVM exits, %.0f MiB moved, %s exits/MiB\n", v, x[v] == "" ? "n/a" : x[v], moved[v],
            (x[v] == "" || moved[v] == 0) ? "n/a" : sprintf("%.1f", x[v] / moved[v])
    }
}
