//! Pause, snapshot, kill, restore in a new tern: the guest's tick counter continues where it
//! was, and damaged snapshot files are refused with their reason before any VM exists.
//! (x86_64: ARM64 snapshots are not built yet.)

mod common;

use common::{Outcome, Scenario};

/// The first tern: boot, wait for ticks, try a snapshot while running (refused), pause, try
/// a diff snapshot (refused) and an unwritable path (refused, VM intact), snapshot, SIGKILL.
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
"#;

const POST: &str = r#"head -c 100 snap.state > trunc.state
cp snap.state flip.state
printf '\377' | dd of=flip.state bs=1 seek=200 conv=notrunc 2>/dev/null
head -c 1048576 snap.mem > short.mem
ls -l snap.state snap.mem | sed 's/^/HOST FILE /'
./tern-bench run --timeout 90 --marker 'GUEST TICK 75' --marker 'GUEST POWEROFF' --api-sock restore.sock --steps restore.steps.json -- ./tern --api-sock restore.sock > restore.result 2>&1
echo "RESTORE_JSON $(grep '^{' restore.result)"
"#;

const SCENARIOS: &[Scenario] = &[Scenario {
    guest_cmd: "ticks",
    extra_args: "guest.ticks=75",
    api_steps: Some(CREATE_STEPS),
    api_with_config: true,
    pre: PRE,
    post: POST,
    timeout_s: 120,
    x86_only: true,
    ..Scenario::new("snapshot_restore")
}];

static BATCHES: common::Batches = common::Batches::new();

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
    let Some(first) = common::outcomes(&BATCHES, "snapshot", SCENARIOS, "snapshot_restore").pop()
    else {
        return;
    };
    let ctx = || {
        format!(
            "{}\napi: {:#?}\npost:\n{}",
            first.console(),
            first.api,
            first.post
        )
    };
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

    let json = first
        .post
        .lines()
        .find_map(|l| l.strip_prefix("RESTORE_JSON "))
        .unwrap_or_else(|| panic!("no restore report; {}", ctx()));
    let second: Outcome =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("restore report: {e}; {}", ctx()));
    let ctx2 = || format!("{}\napi: {:#?}", second.console(), second.api);
    let statuses: Vec<u16> = second.api.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [400, 400, 400, 204], "{}", ctx2());
    assert!(second.api[0].body.contains("truncated"), "{}", ctx2());
    assert!(second.api[1].body.contains("corrupt"), "{}", ctx2());
    assert!(second.api[2].body.contains("bytes of RAM"), "{}", ctx2());
    // The counter goes on from where it was: no restart, no gap (a tick line cut by the
    // pause may be split, hence last + 1 or + 2 first), up to the end and a clean power-off.
    let after = ticks(&second);
    let first_after = *after
        .first()
        .unwrap_or_else(|| panic!("no ticks; {}", ctx2()));
    assert!(
        first_after == last + 1 || first_after == last + 2,
        "before: ..{last}, after: {after:?}; {}",
        ctx2()
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "{after:?}; {}",
        ctx2()
    );
    assert_eq!(after.last(), Some(&75), "{}", ctx2());
    assert!(second.marker_ms("GUEST POWEROFF").is_some(), "{}", ctx2());
    assert_eq!(second.exit_code, Some(0), "{}", ctx2());
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
}
