//! Pause, snapshot, kill, restore in a new tern: the guest's tick counter continues where it
//! was, and damaged snapshot files are refused with their reason before any VM exists. Each
//! scenario runs on x86_64 and on aarch64.

mod common;

use common::{Outcome, Scenario};

/// The first tern: boot, wait for ticks, try a snapshot while running (refused), pause, try
/// a diff snapshot (refused: this VM does not track dirty pages) and an unwritable path
/// (refused, VM intact), snapshot, SIGKILL.
const CREATE_STEPS: &str = r#"[
    {"wait": "GUEST TICK 10"},
    {"req": "PUT /snapshot/create", "body": {"snapshot_type": "Full", "snapshot_path": "snap.state", "mem_file_path": "snap.mem"}},
    {"req": "PATCH /vm", "body": {"state": "Paused"}},
    {"req": "PUT /snapshot/create", "body": {"snapshot_type": "Diff", "snapshot_path": "snap.state", "mem_file_path": "snap.mem"}},
    {"req": "PUT /snapshot/create", "body": {"snapshot_type": "Full", "snapshot_path": "no/such/dir/snap.state", "mem_file_path": "snap.mem"}},
    {"req": "PUT /snapshot/create", "body": {"snapshot_type": "Full", "snapshot_path": "snap.state", "mem_file_path": "snap.mem"}},
    {"kill": true}
]"#;

/// The second tern loads damaged files first (each refused, no VM built), then the real one.
const PRE: &str = r#"cat > restore.steps.json <<'STEPS'
[
    {"req": "PUT /snapshot/load", "body": {"snapshot_path": "trunc.state", "mem_backend": {"backend_type": "File", "backend_path": "snap.mem"}, "resume_vm": true}},
    {"req": "PUT /snapshot/load", "body": {"snapshot_path": "flip.state", "mem_backend": {"backend_type": "File", "backend_path": "snap.mem"}, "resume_vm": true}},
    {"req": "PUT /snapshot/load", "body": {"snapshot_path": "snap.state", "mem_backend": {"backend_type": "File", "backend_path": "short.mem"}, "resume_vm": true}},
    {"req": "PUT /snapshot/load", "body": {"snapshot_path": "snap.state", "mem_backend": {"backend_type": "File", "backend_path": "snap.mem"}, "resume_vm": true}}
]
STEPS
cat > uffd.steps.json <<'STEPS'
[{"req": "PUT /snapshot/load", "body": {"snapshot_path": "snap.state", "mem_backend": {"backend_type": "Uffd", "backend_path": "uffd.sock"}, "resume_vm": true}}]
STEPS
"#;

const POST: &str = r#"head -c 100 snap.state > trunc.state
cp snap.state flip.state
printf '\377' | dd of=flip.state bs=1 seek=200 conv=notrunc 2>/dev/null
head -c 1048576 snap.mem > short.mem
ls -l snap.state snap.mem | sed 's/^/HOST FILE /'
./tern-bench run --timeout 90 --marker 'GUEST TICK 75' --marker 'GUEST POWEROFF' --api-sock restore.sock --steps restore.steps.json -- ./tern --api-sock restore.sock > restore.result 2>&1
echo "RESTORE_JSON $(grep '^{' restore.result)"
# The sysctl exists exactly when the kernel has userfaultfd (the arm64 test kernel, which is
# also the arm64 nest's L1, has not).
if [ -e /proc/sys/vm/unprivileged_userfaultfd ]; then
./tern-bench uffd-serve uffd.sock snap.mem > uffd.out 2>&1 &
handler=$!
sleep 0.5
./tern-bench run --timeout 90 --marker 'GUEST TICK 75' --marker 'GUEST POWEROFF' --api-sock uffd-restore.sock --steps uffd.steps.json -- ./tern --api-sock uffd-restore.sock > uffd.result 2>&1
# The handler ends when tern closes its connection; a stuck one is not waited for.
for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 $handler 2>/dev/null || break; sleep 0.5; done
kill $handler 2>/dev/null
wait $handler
cat uffd.out
echo "UFFD_JSON $(grep '^{' uffd.result)"
else
echo "UFFD_SKIP $(uname -m) $(uname -r): this kernel has no userfaultfd (CONFIG_USERFAULTFD)"
fi
"#;

/// Devices across a restore. Before the snapshot the guest writes a random MiB to its data
/// drive with O_DIRECT, configures eth0, and starts a vsock echo server; then it polls a
/// control drive. After the restore the host writes "GO" there, and the guest reads the data
/// back with O_DIRECT, pings the host, and serves the host's vsock echo; the host inflates the
/// balloon through the restored VM's API.
const DEV_CREATE_STEPS: &str = r#"[
    {"wait": "GUEST READY"},
    {"req": "PATCH /vm", "body": {"state": "Paused"}},
    {"req": "PUT /snapshot/create", "body": {"snapshot_type": "Full", "snapshot_path": "dev.state", "mem_file_path": "dev.mem"}},
    {"kill": true}
]"#;

macro_rules! dev_pre {
    () => {
        r#"./tern-bench mktap tap0
ip link set lo up
ip addr add 172.16.0.1/24 dev tap0 && ip link set tap0 up
truncate -s 4M data.img
truncate -s 4K control.img
cat > dev-restore.steps.json <<'STEPS'
[
    {"req": "PUT /snapshot/load", "body": {"snapshot_path": "dev.state", "mem_backend": {"backend_type": "File", "backend_path": "dev.mem"}, "resume_vm": true}},
    {"wait": "GUEST BLK_MD5_AFTER"},
    {"req": "PATCH /balloon", "body": {"amount_mib": 64}},
    {"req": "GET /balloon/statistics", "until": "\"actual_mib\":64,"}
]
STEPS
"#
    };
}

const DEV_PRE: &str = dev_pre!();

const DEV_SCRIPT: &str = r#"dd if=/dev/urandom of=/tmp/pattern bs=1M count=1 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null
echo "GUEST BLK_MD5_BEFORE $(md5sum < /tmp/pattern)"
ip addr add 172.16.0.2/24 dev eth0 && ip link set eth0 up
ping -c 1 -W 5 172.16.0.1 >/dev/null && echo 'GUEST PING_BEFORE ok'
cat /dev/vdc > /tmp/ve && chmod +x /tmp/ve
/tmp/ve server 5000 100 > /tmp/srv.log 2>&1 &
srv=$!
sleep 1
echo GUEST READY
until dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | grep -q GO; do sleep 0.2; done
echo "GUEST BLK_MD5_AFTER $(dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | md5sum)"
ping -c 3 -W 5 172.16.0.1 >/dev/null && echo 'GUEST PING_AFTER ok'
wait $srv
sed 's/^/GUEST /' /tmp/srv.log
sleep 6
"#;

const DEV_POST: &str = r#"./tern-bench run --timeout 120 --marker 'GUEST POWEROFF' --api-sock dev-restore.sock --steps dev-restore.steps.json -- ./tern --api-sock dev-restore.sock > dev-restore.result 2>&1 &
run=$!
sleep 2
printf GO | dd of=control.img conv=notrunc 2>/dev/null
./tern-bench vsock-connect vsock.sock 5000 100 > vsock_cli.out 2>&1
wait $run
cat vsock_cli.out
echo "RESTORE_JSON $(grep '^{' dev-restore.result)"
"#;

/// One snapshot, three restores at once, each in its own directory (its own copy of the
/// control drive; the state and memory files are shared, mapped privately by each). Each
/// guest is then told a different word through its control drive and answers with it.
const THREE_CREATE_STEPS: &str = r#"[
    {"wait": "GUEST READY"},
    {"req": "PATCH /vm", "body": {"state": "Paused"}},
    {"req": "PUT /snapshot/create", "body": {"snapshot_type": "Full", "snapshot_path": "three.state", "mem_file_path": "three.mem"}},
    {"kill": true}
]"#;

const THREE_PRE: &str = r#"truncate -s 4K control3.img
cat > three-restore.steps.json <<'STEPS'
[{"req": "PUT /snapshot/load", "body": {"snapshot_path": "../three.state", "mem_backend": {"backend_type": "File", "backend_path": "../three.mem"}, "resume_vm": true}}]
STEPS
"#;

const THREE_SCRIPT: &str = r#"echo GUEST READY
until w=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | tr -d '\000'); [ -n "$w" ]; do sleep 0.2; done
echo "GUEST GOT $w"
"#;

const THREE_POST: &str = r#"for i in 1 2 3; do
    mkdir -p r$i && cp control3.img snapshot_three.script.img three-restore.steps.json r$i/
    (cd r$i && ../tern-bench run --timeout 60 --marker 'GUEST GOT' --api-sock r.sock --steps three-restore.steps.json -- ../tern --api-sock r.sock > ../r$i.result 2>&1) &
done
sleep 3
for i in 1 2 3; do printf "word$i" | dd of=r$i/control3.img conv=notrunc 2>/dev/null; done
wait
for i in 1 2 3; do echo "RESTORE$i $(grep '^{' r$i.result)"; done
"#;

/// Diff snapshots. The guest (tracking dirty pages) writes a random file to its RAM-backed
/// /tmp before each snapshot: a Full base, then two Diffs, and a Full at the same point as the
/// second Diff. The host merges base + diff 1 + diff 2 with `tern-rebase-snap`: the result must
/// equal the full memory file byte for byte, and a tern restored from it (with diff 2's state)
/// reads all three files back intact.
const DIFF_CREATE_STEPS: &str = r#"[
    {"wait": "GUEST STEP1"},
    {"req": "PATCH /vm", "body": {"state": "Paused"}},
    {"req": "PUT /snapshot/create", "body": {"snapshot_type": "Full", "snapshot_path": "base.state", "mem_file_path": "base.mem"}},
    {"req": "PATCH /vm", "body": {"state": "Resumed"}},
    {"sh": "printf 2 | dd of=controld.img conv=notrunc 2>/dev/null"},
    {"wait": "GUEST STEP2"},
    {"req": "PATCH /vm", "body": {"state": "Paused"}},
    {"req": "PUT /snapshot/create", "body": {"snapshot_type": "Diff", "snapshot_path": "d1.state", "mem_file_path": "d1.mem"}},
    {"req": "PATCH /vm", "body": {"state": "Resumed"}},
    {"sh": "printf 3 | dd of=controld.img conv=notrunc 2>/dev/null"},
    {"wait": "GUEST STEP3"},
    {"req": "PATCH /vm", "body": {"state": "Paused"}},
    {"req": "PUT /snapshot/create", "body": {"snapshot_type": "Diff", "snapshot_path": "d2.state", "mem_file_path": "d2.mem"}},
    {"req": "PUT /snapshot/create", "body": {"snapshot_type": "Full", "snapshot_path": "full.state", "mem_file_path": "full.mem"}},
    {"kill": true}
]"#;

const DIFF_PRE: &str = r#"truncate -s 4K controld.img
cat > diff-restore.steps.json <<'STEPS'
[{"req": "PUT /snapshot/load", "body": {"snapshot_path": "d2.state", "mem_backend": {"backend_type": "File", "backend_path": "merged.mem"}, "resume_vm": true}}]
STEPS
"#;

const DIFF_SCRIPT: &str = r#"step() { until [ "$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | tr -d '\000')" = "$1" ]; do sleep 0.2; done; }
dd if=/dev/urandom of=/tmp/a bs=1M count=4 2>/dev/null
echo "GUEST SUM_A $(md5sum < /tmp/a)"
echo GUEST STEP1
step 2
dd if=/dev/urandom of=/tmp/b bs=1M count=4 2>/dev/null
echo "GUEST SUM_B $(md5sum < /tmp/b)"
echo GUEST STEP2
step 3
dd if=/dev/urandom of=/tmp/c bs=1M count=4 2>/dev/null
echo "GUEST SUM_C $(md5sum < /tmp/c)"
echo GUEST STEP3
step 4
echo "GUEST AFTER_A $(md5sum < /tmp/a)"
echo "GUEST AFTER_B $(md5sum < /tmp/b)"
echo "GUEST AFTER_C $(md5sum < /tmp/c)"
"#;

const DIFF_POST: &str = r#"cp base.mem merged.mem
./tern-rebase-snap --base-file merged.mem --diff-file d1.mem | sed 's/^/HOST /'
./tern-rebase-snap --base-file merged.mem --diff-file d2.mem | sed 's/^/HOST /'
echo "HOST MERGED $(md5sum < merged.mem)"
echo "HOST FULL $(md5sum < full.mem)"
echo "HOST BASE $(md5sum < base.mem)"
for f in base.mem d1.mem d2.mem full.mem; do echo "HOST SIZE $f $(stat -c '%s %b %B' $f)"; done
printf 4 | dd of=controld.img conv=notrunc 2>/dev/null
./tern-bench run --timeout 60 --marker 'GUEST AFTER_C' --marker 'GUEST POWEROFF' --api-sock dr.sock --steps diff-restore.steps.json -- ./tern --api-sock dr.sock > dr.result 2>&1
echo "RESTORE_JSON $(grep '^{' dr.result)"
"#;

/// ARM64 with a GICv2 (the nest gives these scenarios an L1 whose GIC is a GICv2): two vCPUs
/// are snapshotted and restored, and after the restore both take their timer interrupts
/// through the restored distributor and CPU interfaces while two busy loops keep them awake;
/// the guest waits for its go on a drive, so the drive's interrupt (INTx on PCI) arrives
/// through the restored GIC as well. `$p` names the files: one scenario on virtio-mmio, one
/// on PCI.
macro_rules! gicv2_snapshot {
    ($p:literal) => {
        Scenario {
            guest_cmd: "shell",
            vcpus: 2,
            gicv2: true,
            timeout_s: 120,
            api_steps: Some(concat!(
                r#"[
    {"wait": "GUEST READY"},
    {"req": "PATCH /vm", "body": {"state": "Paused"}},
    {"req": "PUT /snapshot/create", "body": {"snapshot_type": "Full", "snapshot_path": ""#,
                $p,
                r#".state", "mem_file_path": ""#,
                $p,
                r#".mem"}},
    {"kill": true}
]"#
            )),
            api_with_config: true,
            drives: &[concat!(
                r#"{"drive_id": "control", "path_on_host": "control"#,
                $p,
                r#".img", "is_root_device": false, "is_read_only": true}"#
            )],
            pre: concat!(
                "truncate -s 4K control", $p, ".img\n",
                "cat > ", $p, "-restore.steps.json <<'STEPS'\n",
                r#"[{"req": "PUT /snapshot/load", "body": {"snapshot_path": ""#, $p,
                r#".state", "mem_backend": {"backend_type": "File", "backend_path": ""#, $p,
                r#".mem"}, "resume_vm": true}}]"#,
                "\nSTEPS\n"
            ),
            script: Some(V2_SCRIPT),
            post: concat!(
                "printf go | dd of=control", $p, ".img conv=notrunc 2>/dev/null\n",
                "./tern-bench run --timeout 60 --marker 'GUEST T2' --marker 'GUEST POWEROFF' --api-sock ",
                $p, "r.sock --steps ", $p, "-restore.steps.json -- ./tern --api-sock ", $p,
                "r.sock > ", $p, "r.result 2>&1\n",
                "echo \"RESTORE_JSON $(grep '^{' ", $p, "r.result)\"\n"
            ),
            ..Scenario::new(concat!("snapshot_", $p))
        }
    };
}

const V2_SCRIPT: &str = r#"echo GUEST READY
until [ "$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | tr -d '\000')" = go ]; do sleep 0.2; done
( while :; do :; done ) & a=$!
( while :; do :; done ) & b=$!
sleep 1
echo "GUEST T1 $(grep arch_timer /proc/interrupts)"
sleep 2
echo "GUEST T2 $(grep arch_timer /proc/interrupts)"
kill $a $b
"#;

const SCENARIOS: &[Scenario] = &[
    Scenario {
        guest_cmd: "ticks",
        extra_args: "guest.ticks=75",
        api_steps: Some(CREATE_STEPS),
        api_with_config: true,
        pre: PRE,
        post: POST,
        timeout_s: 120,
        ..Scenario::new("snapshot_restore")
    },
    Scenario {
        guest_cmd: "shell",
        mem_mib: 256,
        netns: true,
        timeout_s: 120,
        api_steps: Some(DEV_CREATE_STEPS),
        api_with_config: true,
        host_build: Some(
            "$CC -static -O2 -o vsock-echo.img \"$TERN_WORKSPACE/tests/guest/vsock-echo.c\" && truncate -s %4096 vsock-echo.img",
        ),
        drives: &[
            r#"{"drive_id": "data", "path_on_host": "data.img", "is_root_device": false, "is_read_only": false}"#,
            r#"{"drive_id": "control", "path_on_host": "control.img", "is_root_device": false, "is_read_only": true}"#,
            r#"{"drive_id": "tools", "path_on_host": "vsock-echo.img", "is_root_device": false, "is_read_only": true}"#,
        ],
        config_extra: r#""network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}],
            "vsock": {"guest_cid": 3, "uds_path": "vsock.sock"},
            "balloon": {"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#,
        pre: DEV_PRE,
        script: Some(DEV_SCRIPT),
        post: DEV_POST,
        ..Scenario::new("snapshot_devices")
    },
    // The same devices on PCI (machine-config.pci): the state file records the transport,
    // and the restoring tern (no flags, no config) builds virtio-pci functions from it, with
    // their BARs, MSI-X tables and vectors as saved.
    Scenario {
        guest_cmd: "shell",
        mem_mib: 256,
        netns: true,
        timeout_s: 120,
        pci: true,
        api_steps: Some(DEV_CREATE_STEPS),
        api_with_config: true,
        host_build: Some(
            "$CC -static -O2 -o vsock-echo.img \"$TERN_WORKSPACE/tests/guest/vsock-echo.c\" && truncate -s %4096 vsock-echo.img",
        ),
        drives: &[
            r#"{"drive_id": "data", "path_on_host": "data.img", "is_root_device": false, "is_read_only": false}"#,
            r#"{"drive_id": "control", "path_on_host": "control.img", "is_root_device": false, "is_read_only": true}"#,
            r#"{"drive_id": "tools", "path_on_host": "vsock-echo.img", "is_root_device": false, "is_read_only": true}"#,
        ],
        config_extra: r#""network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}],
            "vsock": {"guest_cid": 3, "uds_path": "vsock.sock"},
            "balloon": {"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#,
        // What snapshot_devices left behind (its control drive says GO) goes first.
        pre: concat!(
            "rm -f data.img control.img dev.state dev.mem vsock.sock vsock.sock_*\n",
            dev_pre!()
        ),
        script: Some(DEV_SCRIPT),
        post: DEV_POST,
        ..Scenario::new("snapshot_pci_devices")
    },
    Scenario {
        guest_cmd: "shell",
        timeout_s: 120,
        api_steps: Some(THREE_CREATE_STEPS),
        api_with_config: true,
        drives: &[
            r#"{"drive_id": "control", "path_on_host": "control3.img", "is_root_device": false, "is_read_only": true}"#,
        ],
        pre: THREE_PRE,
        script: Some(THREE_SCRIPT),
        post: THREE_POST,
        ..Scenario::new("snapshot_three")
    },
    Scenario {
        guest_cmd: "shell",
        mem_mib: 128,
        track_dirty_pages: true,
        timeout_s: 120,
        api_steps: Some(DIFF_CREATE_STEPS),
        api_with_config: true,
        drives: &[
            r#"{"drive_id": "control", "path_on_host": "controld.img", "is_root_device": false, "is_read_only": true}"#,
        ],
        pre: DIFF_PRE,
        script: Some(DIFF_SCRIPT),
        post: DIFF_POST,
        ..Scenario::new("snapshot_diff")
    },
    gicv2_snapshot!("gicv2"),
    // On PCI: the functions' interrupts are INTx (a GICv2 has no ITS for MSIs), and the
    // interrupt-map's SPIs are restored with the distributor.
    Scenario {
        pci: true,
        ..gicv2_snapshot!("gicv2_pci")
    },
];

static BATCHES: common::Batches = common::Batches::new();

/// An outcome with its API calls and (for a first tern) what the post commands printed.
fn describe(o: &Outcome) -> String {
    format!("{}\napi: {:#?}\npost:\n{}", o.console(), o.api, o.post)
}

/// The report of a tern the post commands ran, printed after `key `.
fn report(first: &Outcome, key: &str) -> Outcome {
    let json = first
        .post
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .unwrap_or_else(|| panic!("no {key} report; {}", describe(first)));
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{key}: {e}; {}", describe(first)))
}

/// The restored guest's count goes on from `last`: no restart, no gap (a tick line cut by the
/// pause may be split, hence last + 1 or + 2 first), up to 75 and a clean power-off.
fn assert_counts_on(o: &Outcome, last: u32, ctx: &dyn Fn() -> String) {
    let after = ticks(o);
    let first_after = *after
        .first()
        .unwrap_or_else(|| panic!("no ticks; {}", ctx()));
    assert!(
        first_after == last + 1 || first_after == last + 2,
        "before: ..{last}, after: {after:?}; {}",
        ctx()
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "{after:?}; {}",
        ctx()
    );
    assert_eq!(after.last(), Some(&75), "{}", ctx());
    assert!(o.marker_ms("GUEST POWEROFF").is_some(), "{}", ctx());
    assert_eq!(o.exit_code, Some(0), "{}", ctx());
}

/// Tick numbers on the console, in order.
fn ticks(o: &Outcome) -> Vec<u32> {
    o.lines
        .iter()
        .filter_map(|(_, _, l)| l.strip_prefix("GUEST TICK "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

#[test]
fn snapshot_restore_continues_the_guest_and_refuses_damaged_files() {
    for first in common::outcomes(&BATCHES, "snapshot", SCENARIOS, "snapshot_restore") {
        snapshot_restore_continues_the_guest_and_refuses_damaged_files_on(first);
    }
}

fn snapshot_restore_continues_the_guest_and_refuses_damaged_files_on(first: &Outcome) {
    let ctx = || describe(first);
    assert_eq!(first.steps_error, None, "{}", ctx());
    let statuses: Vec<u16> = first.api.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [400, 204, 400, 400, 204], "{}", ctx());
    assert!(first.api[0].body.contains("pause it first"), "{}", ctx());
    assert!(first.api[2].body.contains("Diff"), "{}", ctx());
    assert!(first.api[3].body.contains("no/such/dir"), "{}", ctx());
    assert_eq!(first.signal, Some(9), "tern was killed; {}", ctx());
    let before = ticks(first);
    let last = *before.last().expect("ticks before the snapshot");
    assert!(last >= 10, "{}", ctx());

    let second = report(first, "RESTORE_JSON");
    let ctx2 = || format!("{}\npost:\n{}", describe(&second), first.post);
    let statuses: Vec<u16> = second.api.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [400, 400, 400, 204], "{}", ctx2());
    assert!(second.api[0].body.contains("truncated"), "{}", ctx2());
    assert!(second.api[1].body.contains("corrupt"), "{}", ctx2());
    assert!(second.api[2].body.contains("bytes of RAM"), "{}", ctx2());
    assert_counts_on(&second, last, &ctx2);
    // The same snapshot through the Uffd back-end: a page-fault handler fills pages as the
    // guest touches them, and the guest counts on just the same.
    let load = &second.api[3];
    eprintln!(
        "snapshot_restore: load request took {:.1} ms; first tick after it at {:.0} ms",
        load.done_ms - load.sent_ms,
        second
            .line_times("GUEST TICK")
            .first()
            .map(|t| t.0)
            .unwrap_or(0.0)
    );
    // Only the arm64 test kernel (the arm64 nest's L1) lacks userfaultfd; x86 always has it.
    if let Some(why) = first
        .post
        .lines()
        .find_map(|l| l.strip_prefix("UFFD_SKIP "))
    {
        assert!(why.starts_with("aarch64"), "{why}; {}", ctx());
        eprintln!("SKIPPED the Uffd restore of snapshot_restore on {why}");
        return;
    }
    let third = report(first, "UFFD_JSON");
    let ctx3 = || format!("{}\npost:\n{}", describe(&third), first.post);
    assert_eq!(third.api.first().map(|c| c.status), Some(204), "{}", ctx3());
    assert_counts_on(&third, last, &ctx3);
    let served: u64 = first
        .post
        .lines()
        .find_map(|l| l.strip_prefix("UFFD SERVED "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("the handler served nothing; {}", ctx3()));
    // Lazily: pages the guest touched, not all 65536 of its 256 MiB.
    assert!(served > 0 && served < 65536, "{served} pages; {}", ctx3());
    eprintln!("snapshot_restore: the Uffd handler served {served} pages");
}

#[test]
fn snapshot_devices_work_after_restore() {
    for first in common::outcomes(&BATCHES, "snapshot", SCENARIOS, "snapshot_devices") {
        snapshot_devices_work_after_restore_on(first);
    }
}

fn snapshot_devices_work_after_restore_on(first: &Outcome) {
    let ctx = || describe(first);
    assert_eq!(first.steps_error, None, "{}", ctx());
    let statuses: Vec<u16> = first.api.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [204, 204], "{}", ctx());
    assert!(first.has_line("GUEST PING_BEFORE ok"), "{}", ctx());
    let before = first.guest_value("BLK_MD5_BEFORE").expect("md5 before");
    let second = report(first, "RESTORE_JSON");
    let ctx2 = || {
        format!(
            "{}\napi: {:#?}\npost:\n{}",
            second.console(),
            second.api,
            first.post
        )
    };
    assert_eq!(second.steps_error, None, "{}", ctx2());
    // blk: what was written (O_DIRECT, fsync) before the snapshot reads back after it.
    assert_eq!(
        second.guest_value("BLK_MD5_AFTER"),
        Some(before),
        "{}",
        ctx2()
    );
    // net: the restored interface reaches the host.
    assert!(second.has_line("GUEST PING_AFTER ok"), "{}", ctx2());
    // vsock: the guest's listener survived (connections were reset); a new host connection
    // is echoed 100 times.
    assert!(second.has_line("GUEST VSOCK server OK 100"), "{}", ctx2());
    assert!(
        first.post.contains("HOST VSOCK CLIENT OK 100"),
        "{}",
        ctx2()
    );
    // balloon: the restored VM's balloon inflates on request.
    let stats = second
        .api
        .iter()
        .find(|c| c.request == "GET /balloon/statistics")
        .unwrap_or_else(|| panic!("no statistics; {}", ctx2()));
    let v: serde_json::Value = serde_json::from_str(&stats.body).expect("statistics JSON");
    assert_eq!(v["target_mib"], 64, "{}", ctx2());
    assert_eq!(v["actual_mib"], 64, "{}", ctx2());
    assert_eq!(second.exit_code, Some(0), "{}", ctx2());
}

#[test]
fn snapshot_of_a_pci_vm_restores_on_pci() {
    for first in common::outcomes(&BATCHES, "snapshot", SCENARIOS, "snapshot_pci_devices") {
        snapshot_devices_work_after_restore_on(first);
        let second = report(first, "RESTORE_JSON");
        // The restoring tern had no flag and no configuration: the state file put the
        // devices on PCI again.
        assert!(
            second
                .lines
                .iter()
                .any(|(_, _, l)| l.contains("PCI: 7 device(s) on bus 0")),
            "{}",
            second.console()
        );
        // ARM64: the MSIs above went through the ITS the state file restored.
        if first.arch == common::Arch::Aarch64 {
            assert!(
                second.has_line("a GICv3 with its ITS (registers, and its tables"),
                "{}",
                second.console()
            );
        }
    }
}

#[test]
fn one_snapshot_restores_into_three_terns_at_once() {
    for first in common::outcomes(&BATCHES, "snapshot", SCENARIOS, "snapshot_three") {
        one_snapshot_restores_into_three_terns_at_once_on(first);
    }
}

fn one_snapshot_restores_into_three_terns_at_once_on(first: &Outcome) {
    let ctx = || describe(first);
    assert_eq!(first.steps_error, None, "{}", ctx());
    for i in 1..=3 {
        let o = report(first, &format!("RESTORE{i}"));
        let c = || format!("restore {i}:\n{}\napi: {:#?}", o.console(), o.api);
        assert_eq!(o.api.first().map(|a| a.status), Some(204), "{}", c());
        // Each guest runs on its own: it answers with the word its own drive holds.
        assert_eq!(o.guest_value("GOT"), Some(format!("word{i}")), "{}", c());
        assert!(o.has_line("GUEST SCRIPT END rc=0"), "{}", c());
        assert_eq!(o.exit_code, Some(0), "{}", c());
    }
}

#[test]
fn base_and_two_diffs_merge_to_the_full_snapshot_and_restore() {
    for first in common::outcomes(&BATCHES, "snapshot", SCENARIOS, "snapshot_diff") {
        base_and_two_diffs_merge_to_the_full_snapshot_and_restore_on(first);
    }
}

fn base_and_two_diffs_merge_to_the_full_snapshot_and_restore_on(first: &Outcome) {
    let ctx = || describe(first);
    assert_eq!(first.steps_error, None, "{}", ctx());
    let statuses: Vec<u16> = first.api.iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        [204, 204, 204, 204, 204, 204, 204, 204, 204],
        "{}",
        ctx()
    );
    let host = |key: &str| {
        first
            .post
            .lines()
            .find_map(|l| l.strip_prefix(&format!("HOST {key} ")))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no HOST {key}; {}", ctx()))
    };
    // Merged, the diffs give guest memory exactly as the full snapshot at the same point has
    // it; the base alone does not.
    assert_eq!(host("MERGED"), host("FULL"), "{}", ctx());
    assert_ne!(host("BASE"), host("FULL"), "{}", ctx());
    // Each diff holds only what changed: as large as guest memory, but sparse. 4 MiB of the
    // guest's file plus what the kernel touched, far from all 128 MiB.
    for d in ["d1.mem", "d2.mem"] {
        let f: Vec<u64> = host(&format!("SIZE {d}"))
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        assert_eq!(f.first(), Some(&(128 << 20)), "{d}; {}", ctx());
        let on_disk = f[1] * f[2];
        assert!(
            (4 << 20..64 << 20).contains(&on_disk),
            "{d}: {on_disk} bytes on disk; {}",
            ctx()
        );
        eprintln!("snapshot_diff: {d} holds {} KiB", on_disk / 1024);
    }
    let second = report(first, "RESTORE_JSON");
    let ctx2 = || format!("{}\npost:\n{}", describe(&second), first.post);
    assert_eq!(
        second.api.first().map(|c| c.status),
        Some(204),
        "{}",
        ctx2()
    );
    for f in ["A", "B", "C"] {
        let before = first.guest_value(&format!("SUM_{f}"));
        assert!(before.is_some(), "{}", ctx());
        assert_eq!(
            second.guest_value(&format!("AFTER_{f}")),
            before,
            "{}",
            ctx2()
        );
    }
    assert!(second.has_line("GUEST SCRIPT END rc=0"), "{}", ctx2());
    assert_eq!(second.exit_code, Some(0), "{}", ctx2());
}

#[test]
fn arm64_gicv2_two_vcpus_take_interrupts_after_restore() {
    for first in common::outcomes(&BATCHES, "snapshot", SCENARIOS, "snapshot_gicv2") {
        arm64_gicv2_two_vcpus_take_interrupts_after_restore_on(first);
    }
}

#[test]
fn arm64_gicv2_pci_vm_restores_with_intx() {
    for first in common::outcomes(&BATCHES, "snapshot", SCENARIOS, "snapshot_gicv2_pci") {
        arm64_gicv2_two_vcpus_take_interrupts_after_restore_on(first);
        let second = report(first, "RESTORE_JSON");
        assert!(
            second.has_line("INTx"),
            "the log says the functions use INTx\n{}",
            describe(&second)
        );
    }
}

fn arm64_gicv2_two_vcpus_take_interrupts_after_restore_on(first: &Outcome) {
    let ctx = || describe(first);
    assert_eq!(first.steps_error, None, "{}", ctx());
    let statuses: Vec<u16> = first.api.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [204, 204], "{}", ctx());
    let second = report(first, "RESTORE_JSON");
    let ctx2 = || format!("{}\npost:\n{}", describe(&second), first.post);
    assert_eq!(
        second.api.first().map(|c| c.status),
        Some(204),
        "{}",
        ctx2()
    );
    // A GICv2 in the nest's GICv2 L1; on an ARM64 host the host's own GIC.
    assert!(second.has_line("restored 2 vCPUs and a GICv"), "{}", ctx2());
    // "11:  <cpu0> <cpu1>  GICv2 27 Level arch_timer": both counts grow after the restore.
    let counts = |key: &str| -> Vec<u64> {
        second
            .guest_value(key)
            .unwrap_or_else(|| panic!("no GUEST {key}; {}", ctx2()))
            .split_whitespace()
            .skip(1)
            .take(2)
            .map(|n| {
                n.parse()
                    .unwrap_or_else(|_| panic!("{key}: {n}; {}", ctx2()))
            })
            .collect()
    };
    let (t1, t2) = (counts("T1"), counts("T2"));
    assert_eq!(t1.len(), 2, "{}", ctx2());
    assert!(
        t2[0] > t1[0] && t2[1] > t1[1],
        "{t1:?} -> {t2:?}; {}",
        ctx2()
    );
    assert!(!second.has_line("rcu: INFO"), "{}", ctx2());
    assert!(second.has_line("GUEST SCRIPT END rc=0"), "{}", ctx2());
    assert_eq!(second.exit_code, Some(0), "{}", ctx2());
}
