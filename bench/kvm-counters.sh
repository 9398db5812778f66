# shellcheck shell=sh
# Sourced by the run scripts bench/io.sh and bench/boot-trace.sh write (they run where the VMMs
# run: this host, or L1 in the nest). KVM's debugfs counters (/sys/kernel/debug/kvm/exits, ...)
# sum over the VMs that exist: a VM's counts leave them when it ends, so reading them after a
# VMM exited gives nothing. kvm_sample_start keeps the last reading taken while a VM existed
# (every 0.1 s; the last tenth of a second before the VM ends is not counted), kvm_sample_stop
# prints it: "exits=N io_exits=N ..." ("-" for a counter that cannot be read).
KVM_DEBUGFS=/sys/kernel/debug/kvm
KVM_COUNTERS="exits io_exits mmio_exits halt_exits irq_exits irq_window_exits signal_exits request_irq_exits hypercalls"
[ -d "$KVM_DEBUGFS" ] || mount -t debugfs none /sys/kernel/debug 2>/dev/null
kvm_counters() {
    for c in $KVM_COUNTERS; do printf '%s=%s ' "$c" "$(cat "$KVM_DEBUGFS/$c" 2>/dev/null || echo -)"; done
}
kvm_sample_start() {
    rm -f kvm-counters.last
    (
        while sleep 0.1; do
            c=$(kvm_counters)
            case $c in "exits=0 "* | "exits=- "*) ;; *) echo "$c" > kvm-counters.tmp && mv kvm-counters.tmp kvm-counters.last ;; esac
        done
    ) &
    KVM_SAMPLER=$!
}
kvm_sample_stop() {
    kill "$KVM_SAMPLER" 2>/dev/null; wait "$KVM_SAMPLER" 2>/dev/null
    cat kvm-counters.last 2>/dev/null || echo "exits=-"
}
# kvm_hist_start / kvm_hist_stop: KVM's kvm_pio and kvm_mmio trace events counted by port
# and by guest-physical address (ftrace hist triggers), for what the VMs ran in between; stop
# prints the N (default 12) most frequent of each as "pio port=0x3f8 rw=1 hits=N" and
# "mmio gpa=0x... type=N hits=N" lines.
KVM_TRACING=/sys/kernel/tracing
kvm_hist_start() {
    [ -d "$KVM_TRACING/events" ] || mount -t tracefs nodev "$KVM_TRACING" 2>/dev/null
    echo 'hist:keys=port.hex,rw:sort=hitcount.descending:size=4096' > "$KVM_TRACING/events/kvm/kvm_pio/trigger" 2>/dev/null
    echo 'hist:keys=gpa.hex,type:sort=hitcount.descending:size=4096' > "$KVM_TRACING/events/kvm/kvm_mmio/trigger" 2>/dev/null
}
kvm_hist_stop() {
    n=${1:-12}
    for e in kvm_pio kvm_mmio; do
        h=$KVM_TRACING/events/kvm/$e
        if [ -r "$h/hist" ]; then
            grep '^{' "$h/hist" | head -n "$n" | tr -d '{}:,' |
                awk -v e="${e#kvm_}" '{ out = e; for (i = 1; i < NF; i += 2) out = out " " $i "=" $(i + 1); print out }'
        else
            echo "${e#kvm_} unavailable (no tracefs or no hist triggers)"
        fi
    done
    echo '!hist:keys=port.hex,rw:sort=hitcount.descending:size=4096' > "$KVM_TRACING/events/kvm/kvm_pio/trigger" 2>/dev/null
    echo '!hist:keys=gpa.hex,type:sort=hitcount.descending:size=4096' > "$KVM_TRACING/events/kvm/kvm_mmio/trigger" 2>/dev/null
}
