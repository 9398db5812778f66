# shellcheck shell=bash
# Shared by tools/nest-*.sh (sourced; nest_watchdog and nest_finish need ME, RUN and LOG).

# nest_write_init FILE: L1's /init. It mounts the usual file systems, loads the modules named
# in /etc/nest-modules (if any), says whether /dev/kvm is there, runs /nest-cmd.sh in /nest,
# prints "NEST EXIT rc=<N>" and powers L1 off.
# With nest.stuck=S on L1's command line (nest_append), a process named tern, tern-bench or qemu-* that has
# run longer than S seconds is reported once, as evidence of where it hangs: every thread's
# state, wait channel, CPU time and kernel stack, and the kernel log's tail ("NEST STUCK" lines).
nest_write_init() {
    cat > "$1" <<'EOF'
#!/bin/sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts
for d in /tmp /run /dev/shm; do mount -t tmpfs tmpfs $d; done
if [ -f /etc/nest-modules ]; then
    while read -r m; do insmod /lib/modules/nest/$m.ko || echo "NEST insmod $m failed"; done < /etc/nest-modules
fi
# nest.console=hvc0: everything from here on goes to that console (a virtio console), not the
# boot console the kernel keeps (docs/testing.md: L1's 16550 output stalled for minutes).
con=$(sed -n 's/.*nest\.console=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$con" ]; then
    i=0; while [ ! -c "/dev/$con" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    if [ -c "/dev/$con" ]; then exec > "/dev/$con" 2>&1; else echo "NEST console $con missing: staying on the boot console"; fi
fi
read -r up _ < /proc/uptime; echo "NEST L1 UP uptime=$up"
ip link set lo up
if [ -c /dev/kvm ]; then echo "NEST KVM ok"; else echo "NEST KVM MISSING"; fi
stuck=$(sed -n 's/.*nest\.stuck=\([0-9][0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$stuck" ]; then
    (
        reported=" "
        while sleep 10; do
            read -r up _ < /proc/uptime
            for d in /proc/[0-9]*; do
                p=${d#/proc/}
                read -r comm < "$d/comm" 2>/dev/null || continue
                case $comm in tern|tern-bench|qemu-system-*) ;; *) continue ;; esac
                case $reported in *" $p "*) continue ;; esac
                # field 22 of stat: start time in clock ticks (100 a second)
                age=$(awk -v up="$up" '{sub(/^.*\) /, ""); printf "%d", up - $20 / 100}' "$d/stat" 2>/dev/null) || continue
                [ "${age:-0}" -gt "$stuck" ] || continue
                reported="$reported$p "
                echo "NEST STUCK pid $p ($comm) running ${age} s (> ${stuck} s): $(grep -E '^ShdPnd' "$d/status" | tr -s '\t' ' '), its threads"
                for t in "$d"/task/*; do
                    read -r tc < "$t/comm"
                    st=$(awk '{sub(/^.*\) /, ""); print "state " $1 " utime " $12 " stime " $13 " cpu " $37}' "$t/stat")
                    echo "NEST STUCK  thread ${t##*/} ($tc) $st $(grep -E '^SigPnd' "$t/status" | tr -s '\t' ' ') wchan $(cat "$t/wchan" 2>/dev/null)"
                    sed 's/^/NEST STUCK    /' "$t/stack" 2>/dev/null
                done
                # What the process said last (tern-bench's --live copy in the scenario's
                # directory: its stderr holds a panic or an error).
                # tern-bench sits in the same directory: its report needs only its threads.
                [ "$comm" = tern-bench ] && continue
                live=$(ls -t "$(readlink "$d/cwd")"/*.live 2>/dev/null | head -n 1)
                if [ -n "$live" ]; then
                    echo "NEST STUCK last lines of $live:"
                    tail -n 40 "$live" | sed 's/^/NEST STUCK    /'
                fi
                # Every CPU's backtrace (a CPU that no longer schedules leaves killed threads
                # alive), then the kernel log's tail.
                { echo l > /proc/sysrq-trigger; } 2>/dev/null
                sleep 1
                echo "NEST STUCK kernel log tail:"
                dmesg | tail -n 80 | sed 's/^/NEST STUCK    /'
            done
        done
    ) &
fi
# nest.kvmtrace=1: L1's KVM traces every exit, injected exception and guest page fault into
# ftrace's ring buffer, which stops at the first shutdown exit (an L2 triple fault: SVM exit
# 0x7f, VMX reason 2); the last lines before it are printed ("NEST KVMTRACE"), as evidence of
# what the L2 guest was doing when it died.
if grep -q 'nest\.kvmtrace=1' /proc/cmdline; then
    T=/sys/kernel/tracing
    mount -t tracefs nodev $T 2>/dev/null
    if [ -w $T/events/kvm/kvm_exit/enable ]; then
        # Per CPU; a few thousand events. Printing the trace formats the whole buffer, which
        # under TCG took longer than the rest of a batch with 8 MiB (run 15: L1 powered off
        # before one line of it came out).
        echo 512 > $T/buffer_size_kb
        for e in kvm_exit kvm_inj_exception kvm_page_fault kvm_inj_virq kvm_userspace_exit; do
            echo 1 > $T/events/kvm/$e/enable 2>/dev/null || echo "NEST KVMTRACE no event $e"
        done
        if grep -q svm /proc/cpuinfo; then sd=127; else sd=2; fi
        echo "traceoff if exit_reason==$sd" > $T/events/kvm/kvm_exit/trigger ||
            echo "NEST KVMTRACE cannot set the shutdown trigger"
        echo 1 > $T/tracing_on
        echo "NEST KVMTRACE on (stops at exit reason $sd)"
        (
            while sleep 2; do
                [ "$(cat $T/tracing_on)" = 0 ] || continue
                : > /tmp/kvmtrace.printing
                echo "NEST KVMTRACE stopped at a shutdown exit; the last 600 events:"
                tail -n 600 $T/trace | sed 's/^/NEST KVMTRACE /'
                echo "NEST KVMTRACE end"
                : > /tmp/kvmtrace.done
                break
            done
        ) &
    else
        echo "NEST KVMTRACE unavailable (no tracefs or no kvm events)"
    fi
fi
cd /nest
echo "NEST CMD START"
sh /nest-cmd.sh </dev/null
rc=$?
# A shutdown trace being printed (or about to be: the printer looks every 2 s) is waited for,
# at most 5 minutes, so that poweroff does not cut it off.
if [ -e /sys/kernel/tracing/tracing_on ] && grep -q 'nest\.kvmtrace=1' /proc/cmdline &&
    [ "$(cat /sys/kernel/tracing/tracing_on)" = 0 ]; then
    n=0
    while [ ! -e /tmp/kvmtrace.done ] && [ $n -lt 300 ]; do sleep 1; n=$((n + 1)); done
fi
echo "NEST EXIT rc=$rc"
poweroff -f
EOF
    chmod 755 "$1"
}

# nest_append: what L1's command line gets besides the console: nest.stuck (NEST_IDLE less a
# minute, so that a hung tern is reported before the watchdog ends L1) and L1_APPEND.
nest_append() {
    local a=${L1_APPEND:-}
    if [ -n "${NEST_IDLE:-}" ] && [ "$NEST_IDLE" -gt 90 ]; then a="nest.stuck=$((NEST_IDLE - 60)) $a"; fi
    echo "$a"
}

# nest_monitor_args: QEMU's human monitor on a socket in $RUN, for nest_monitor_report.
nest_monitor_args() { echo "-monitor unix:$RUN/monitor.sock,server=on,wait=off"; }

# nest_monitor_report: what a silent L1's CPUs are doing, from QEMU's monitor, as
# "NEST MONITOR" lines: whether each vCPU is halted, its registers, on x86 each local APIC
# (its timer, the interrupts requested and in service); then an NMI to every CPU, and
# whether L1's consoles say anything within 15 s of it (an L1 that answers an NMI has
# CPUs that run; one that stays silent is wedged deeper).
nest_monitor_report() {
    [ -S "$RUN/monitor.sock" ] || { echo "NEST MONITOR no monitor socket"; return 0; }
    local before after
    before=$(cat "$LOG" "$RUN/kernel.log" 2>/dev/null | wc -c)
    python3 - "$RUN/monitor.sock" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
def cmd(c):
    if c:
        s.sendall(c.encode() + b"\n")
    out, end = b"", time.time() + 10
    while time.time() < end and not out.rstrip().endswith(b"(qemu)"):
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        out += chunk
    text = out.decode(errors="replace").replace("\r", "")
    for line in text.splitlines():
        line = line.strip()
        # (the monitor echoes each command with terminal escapes: left out)
        if line and line != "(qemu)" and not line.startswith("QEMU ") and "\x1b" not in line:
            print("NEST MONITOR", line)
    return text
cmd("")
cpus = cmd("info cpus")
cmd("info registers -a")
n = sum(1 for l in cpus.splitlines() if "CPU #" in l)
for i in range(n):
    print(f"NEST MONITOR --- local APIC of CPU {i}")
    cmd(f"cpu {i}")
    if "unknown command" in cmd("info lapic"):
        break
cmd("nmi")
PY
    sleep 15
    after=$(cat "$LOG" "$RUN/kernel.log" 2>/dev/null | wc -c)
    echo "NEST MONITOR after the NMI L1's consoles grew by $((after - before)) bytes"
}

# nest_watchdog: with NEST_IDLE=S, an L1 that prints nothing for S seconds is taken for hung
# (seen under TCG: L1 stops, and the run would wait for NEST_TIMEOUT) and its QEMU is killed.
nest_watchdog() {
    [ -n "${NEST_IDLE:-}" ] || return 0
    (
        last=$(stat -c %s "$LOG"); quiet=0
        while sleep 10; do
            now=$(stat -c %s "$LOG" 2>/dev/null) || exit 0
            if [ "$now" = "$last" ]; then quiet=$((quiet + 10)); else quiet=0; last=$now; fi
            if [ "$quiet" -ge "$NEST_IDLE" ]; then
                echo "$ME: L1 printed nothing for ${NEST_IDLE} s: killing it" >&2
                nest_monitor_report >> "$LOG" 2>&1 || true
                pkill -f -- "-initrd $RUN/initramfs.cpio" || true
                exit 0
            fi
        done
    ) &
    WATCHDOG=$!
    trap 'kill "$WATCHDOG" 2>/dev/null; rm -rf "$RUN"' EXIT
}

# nest_finish QEMU_STATUS SAVED: keeps a copy of the console at SAVED and exits with the
# status L1's command reported (255 when L1 never reported one).
nest_finish() {
    local qrc=$1 saved=$2 rc
    # The kernel's own console, when the command's output had a console of its own.
    if [ -s "$RUN/kernel.log" ]; then
        { echo "--- L1 kernel console ---"; sed 's/\r//g; s/\x1bc//g; s/\x1b\[[0-9;?]*[A-Za-z]//g' "$RUN/kernel.log"; } | tee -a "$LOG"
    fi
    cp "$LOG" "$saved" 2>/dev/null || echo "$ME: cannot save the console log to $saved" >&2
    rc=$(sed -n 's/.*NEST EXIT rc=\([0-9][0-9]*\).*/\1/p' "$LOG" | tail -n1)
    if [ -z "$rc" ]; then
        echo "$ME: L1 did not print NEST EXIT (qemu exit status $qrc; 124 = NEST_TIMEOUT hit, or the NEST_IDLE watchdog); console: $saved" >&2
        exit 255
    fi
    exit "$rc"
}
