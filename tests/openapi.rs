//! api/openapi.yaml is kept true: schemathesis (PyPI) generates requests from it against a live
//! tern socket and checks every answer against the spec (status codes, content types, response
//! schemas) and that none is a 5xx; tests/schemathesis_run.py also counts requests, server errors
//! and hangs at a proxy of its own. tools/deps.sh installs schemathesis in $TERN_CACHE/venv.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn schemathesis_finds_no_server_errors_hangs_or_spec_mismatches() {
    let cache = std::env::var("TERN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/tern")
        });
    let st = cache.join("venv/bin/st");
    if !st.exists() {
        eprintln!(
            "SKIPPED: schemathesis is not installed at {} (run tools/deps.sh)",
            st.display()
        );
        return;
    }
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/schemathesis_run.py"
        ))
        .arg(env!("CARGO_BIN_EXE_tern"))
        .arg(&st)
        .arg(&work)
        .arg("40")
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("SCHEMATHESIS "))
        .unwrap_or_else(|| panic!("no summary line; stdout:\n{stdout}\nstderr:\n{stderr}"));
    eprintln!("{line}");
    let field = |k: &str| -> String {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(str::to_string))
            .unwrap_or_default()
    };
    let requests: u64 = field("requests").parse().unwrap_or(0);
    assert!(
        requests >= 1000,
        "only {requests} requests were generated:\n{stdout}"
    );
    assert_eq!(field("server_errors"), "0", "{stdout}");
    assert_eq!(field("hangs"), "0", "{stdout}");
    assert_eq!(
        field("tern_alive"),
        "True",
        "tern died during the run:\n{stdout}"
    );
    assert_eq!(
        field("st_rc"),
        "0",
        "schemathesis found failures (see {}):\n{stdout}",
        work.display()
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
}
