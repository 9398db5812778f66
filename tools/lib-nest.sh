# shellcheck shell=bash
# Shared by tools/nest-*.sh (sourced; they set ME, RUN and LOG first).

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
    cp "$LOG" "$saved" 2>/dev/null || echo "$ME: cannot save the console log to $saved" >&2
    rc=$(sed -n 's/.*NEST EXIT rc=\([0-9][0-9]*\).*/\1/p' "$LOG" | tail -n1)
    if [ -z "$rc" ]; then
        echo "$ME: L1 did not print NEST EXIT (qemu exit status $qrc; 124 = NEST_TIMEOUT hit, or the NEST_IDLE watchdog); console: $saved" >&2
        exit 255
    fi
    exit "$rc"
}
