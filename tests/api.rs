//! The REST API on its Unix socket.
//! - Host tests (no KVM needed): a real `tern` process, every pre-boot route with a success and
//!   bad inputs, the VM's configuration unchanged after each refusal, and the socket's life.
//! - One nested (or direct) scenario: a whole VM life driven only through the socket.

mod common;
#[path = "../bench/src/http.rs"]
#[allow(dead_code)]
mod http;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Scenario;

struct Tern {
    child: Child,
    sock: PathBuf,
}

impl Tern {
    fn start(name: &str) -> Self {
        Self::start_args(name, &["--level".as_ref(), "Off".as_ref()])
    }

    /// tern serving on `<name>.sock` with `args`, once its socket answers.
    fn start_args(name: &str, args: &[&std::ffi::OsStr]) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("api");
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["--api-sock", sock.to_str().unwrap()])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("tern starts");
        let t = Tern { child, sock };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http::request(&t.sock, "GET", "/", None).is_err() {
            assert!(
                Instant::now() < deadline,
                "API socket never answered (tern {args:?})"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        t
    }

    fn req(&self, method: &str, path: &str, body: Option<&str>) -> http::HttpResponse {
        http::request(&self.sock, method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn config(&self) -> String {
        self.req("GET", "/vm/config", None).body
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fault(r: &http::HttpResponse) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    v["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message: {r:?}"))
        .to_string()
}

/// `body` is refused with 400, a fault naming `expect`, and the configuration unchanged.
fn refused(t: &Tern, method: &str, path: &str, body: Option<&str>, expect: &str) {
    let before = t.config();
    let r = t.req(method, path, body);
    assert_eq!(r.status, 400, "{method} {path} {body:?}: {r:?}");
    let msg = fault(&r);
    assert!(
        msg.contains(expect),
        "{method} {path} {body:?}: {msg:?} lacks {expect:?}"
    );
    assert_eq!(
        t.config(),
        before,
        "{method} {path} {body:?} changed the configuration"
    );
}

fn kernel() -> String {
    env!("CARGO_BIN_EXE_tern").to_string() // an ELF file: passes the kernel-format check
}

#[test]
fn instance_info_and_version() {
    let t = Tern::start("info");
    let r = t.req("GET", "/", None);
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (v["state"].as_str(), v["app_name"].as_str()),
        (Some("Not started"), Some("tern"))
    );
    let r = t.req("GET", "/version", None);
    assert_eq!(r.status, 200);
    assert!(r.body.contains("firecracker_version"));
    refused(&t, "POST", "/", None, "Invalid request method and/or path");
    refused(
        &t,
        "GET",
        "/no/such/route",
        None,
        "Invalid request method and/or path",
    );
}

#[test]
fn boot_source() {
    let t = Tern::start("boot-source");
    let good = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel()
    );
    assert_eq!(t.req("PUT", "/boot-source", Some(&good)).status, 204);
    assert!(t.config().contains("console=ttyS0"));
    refused(&t, "PUT", "/boot-source", Some("{not json"), "boot-source");
    refused(
        &t,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": 5}"#),
        "boot-source.kernel_image_path: invalid type",
    );
    refused(
        &t,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/no/such"}"#),
        "/no/such",
    );
    refused(
        &t,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/etc/hostname"}"#),
        "not a Linux kernel",
    );
    refused(
        &t,
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}", "extra": 1}}"#,
            kernel()
        )),
        "unknown field `extra`",
    );
    refused(&t, "PUT", "/boot-source", None, "needs a JSON body");
}

#[test]
fn machine_config() {
    let t = Tern::start("machine-config");
    assert_eq!(
        t.req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 512}"#)
        )
        .status,
        204
    );
    assert_eq!(
        t.req("PATCH", "/machine-config", Some(r#"{"mem_size_mib": 256}"#))
            .status,
        204
    );
    let r = t.req("GET", "/machine-config", None);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (v["vcpu_count"].as_u64(), v["mem_size_mib"].as_u64()),
        (Some(2), Some(256))
    );
    refused(
        &t,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 0, "mem_size_mib": 128}"#),
        "machine-config.vcpu_count",
    );
    refused(
        &t,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 0}"#),
        "machine-config.mem_size_mib",
    );
    refused(
        &t,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1}"#),
        "missing field `mem_size_mib`",
    );
    refused(
        &t,
        "PATCH",
        "/machine-config",
        Some(r#"{"vcpu_count": 999}"#),
        "machine-config.vcpu_count",
    );
    refused(
        &t,
        "PATCH",
        "/machine-config",
        Some(r#"{"mem_size_mib": "lots"}"#),
        "invalid type",
    );
    refused(
        &t,
        "PATCH",
        "/machine-config",
        Some(r#"{"mem_size_mib": 1099511627776}"#),
        "more than this host",
    );
    refused(
        &t,
        "PATCH",
        "/machine-config",
        Some(r#"{"smt": true}"#),
        "machine-config.smt",
    );
    // The mmio default shows no `pci` field, as Firecracker's machine-config has none.
    assert!(v.get("pci").is_none(), "{v}");
}

/// `--enable-pci` and the `machine-config.pci` extension choose the transport; the GETs say
/// which it is.
#[test]
fn pci_is_chosen_by_flag_or_machine_config() {
    let pci = |t: &Tern| -> Option<bool> {
        let r = t.req("GET", "/machine-config", None);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        v["pci"].as_bool()
    };
    let args: [&std::ffi::OsStr; 3] = ["--level".as_ref(), "Off".as_ref(), "--enable-pci".as_ref()];
    let t = Tern::start_args("pci-flag", &args);
    assert_eq!(pci(&t), Some(true), "--enable-pci");
    // A Firecracker client's PUT without the field keeps the flag's choice.
    let body = r#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
    assert_eq!(t.req("PUT", "/machine-config", Some(body)).status, 204);
    assert_eq!(pci(&t), Some(true));
    assert!(t.config().contains(r#""pci":true"#), "{}", t.config());
    let off = r#"{"pci": false}"#;
    assert_eq!(t.req("PATCH", "/machine-config", Some(off)).status, 204);
    assert_eq!(pci(&t), Some(false), "turned off through the API");
    let t = Tern::start("pci-api");
    let on = r#"{"vcpu_count": 1, "mem_size_mib": 128, "pci": true}"#;
    assert_eq!(pci(&t), None);
    assert_eq!(t.req("PUT", "/machine-config", Some(on)).status, 204);
    assert_eq!(pci(&t), Some(true));
    refused(
        &t,
        "PATCH",
        "/machine-config",
        Some(r#"{"pci": "yes"}"#),
        "invalid type",
    );
}

#[test]
fn logger_and_serial() {
    let t = Tern::start("logger");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("api");
    let log = dir.join("logger.log");
    let _ = std::fs::remove_file(&log);
    let body = format!(
        r#"{{"log_path": "{}", "level": "Debug", "show_level": true}}"#,
        log.display()
    );
    assert_eq!(t.req("PUT", "/logger", Some(&body)).status, 204);
    t.req("GET", "/", None);
    // The logger's own thread writes the line: wait for it.
    let text = wait_for_text(&log, ":DEBUG API GET /");
    assert!(text.contains(":DEBUG API GET /"), "{text:?}");
    refused(
        &t,
        "PUT",
        "/logger",
        Some(r#"{"level": "Loud"}"#),
        "logger.level",
    );
    refused(
        &t,
        "PUT",
        "/logger",
        Some(r#"{"log_path": "/no/such/dir/x.log"}"#),
        "logger.log_path",
    );
    refused(
        &t,
        "PUT",
        "/logger",
        Some(r#"{"level": 3}"#),
        "invalid type",
    );

    let out = dir.join("serial.out");
    assert_eq!(
        t.req(
            "PUT",
            "/serial",
            Some(&format!(r#"{{"serial_out_path": "{}"}}"#, out.display()))
        )
        .status,
        204
    );
    assert!(t.config().contains("serial.out"));
    refused(
        &t,
        "PUT",
        "/serial",
        Some(r#"{"serial_out_path": 1}"#),
        "invalid type",
    );
    refused(
        &t,
        "PUT",
        "/serial",
        Some(r#"{"path": "x"}"#),
        "unknown field",
    );
}

/// The file's text once it contains `want`, or what it holds after 30 s.
fn wait_for_text(path: &Path, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(want) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A new FIFO at `name` under the test directory.
fn fifo(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("api")
        .join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&p);
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {p:?}"
    );
    p
}

/// FIFOs nobody reads as the log, the metrics and the serial output, and a log flooded past
/// what a pipe holds: every request is still answered (wave 1 opened them blocking and wrote
/// them on the calling thread, so `PUT /logger` never answered).
#[test]
fn outputs_nobody_reads_never_stall_the_api() {
    let t = Tern::start("fifos");
    let log = fifo("nobody-reads.log");
    let body = format!(r#"{{"log_path": "{}", "level": "Debug"}}"#, log.display());
    assert_eq!(t.req("PUT", "/logger", Some(&body)).status, 204);
    let metrics = fifo("nobody-reads.metrics");
    let body = format!(r#"{{"metrics_path": "{}"}}"#, metrics.display());
    assert_eq!(t.req("PUT", "/metrics", Some(&body)).status, 204);
    let serial = fifo("nobody-reads.serial");
    let body = format!(r#"{{"serial_out_path": "{}"}}"#, serial.display());
    assert_eq!(t.req("PUT", "/serial", Some(&body)).status, 204);
    // Each request logs a debug line: 8000 of them are more than a pipe (64 KiB) and the
    // sink's queue (256 KiB) hold.
    for _ in 0..8000 {
        assert_eq!(t.req("GET", "/", None).status, 200);
    }
    for _ in 0..3 {
        let r = t.req(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#),
        );
        assert_eq!(r.status, 204, "{r:?}");
    }
    let prom = t.req("GET", "/tern/v1/metrics", None);
    let missed: u64 = prom
        .body
        .lines()
        .find_map(|l| l.strip_prefix("tern_logger_missed_log_count_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no missed-log counter: {}", prom.body));
    assert!(missed > 0, "the flooded log dropped nothing");
}

/// `--log-path` naming a FIFO nobody reads: tern still comes up and serves.
#[test]
fn log_path_fifo_on_the_command_line() {
    let log = fifo("cli-nobody-reads.log");
    let t = Tern::start_args(
        "cli-fifo",
        &[
            "--level".as_ref(),
            "Debug".as_ref(),
            "--log-path".as_ref(),
            log.as_os_str(),
        ],
    );
    assert_eq!(t.req("GET", "/machine-config", None).status, 200);
}

#[test]
fn metrics_flush_and_prometheus() {
    let t = Tern::start("metrics");
    refused(
        &t,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        "PUT /metrics",
    );
    refused(
        &t,
        "PUT",
        "/metrics",
        Some(r#"{"metrics_path": "/no/such/dir/m.json"}"#),
        "metrics.metrics_path",
    );
    refused(
        &t,
        "PUT",
        "/metrics",
        Some(r#"{"path": "x"}"#),
        "unknown field",
    );
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("api")
        .join("metrics.jsonl");
    let _ = std::fs::remove_file(&path);
    let body = format!(r#"{{"metrics_path": "{}"}}"#, path.display());
    assert_eq!(t.req("PUT", "/metrics", Some(&body)).status, 204);
    refused(&t, "PUT", "/metrics", Some(&body), "already configured");
    t.req("GET", "/", None);
    t.req("GET", "/", None);
    assert_eq!(
        t.req(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#)
        )
        .status,
        204
    );
    assert_eq!(
        t.req(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#)
        )
        .status,
        204
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    // Firecracker's semantics: each line counts what happened since the previous one.
    assert!(
        lines[0]["get_api_requests"]["instance_info_count"]
            .as_u64()
            .unwrap()
            >= 2,
        "{text}"
    );
    assert_eq!(
        lines[1]["get_api_requests"]["instance_info_count"], 0,
        "{text}"
    );
    assert!(
        lines[0]["put_api_requests"]["metrics_fails"]
            .as_u64()
            .unwrap()
            >= 2,
        "{text}"
    );
    assert!(
        lines[0]["api_server"]["process_startup_time_us"]
            .as_u64()
            .unwrap()
            > 0,
        "{text}"
    );
    let prom = t.req("GET", "/tern/v1/metrics", None);
    assert_eq!(prom.status, 200);
    assert!(
        prom.body
            .contains("\ntern_get_api_requests_instance_info_count_total "),
        "{}",
        prom.body
    );
}

#[test]
fn actions_and_vm_state_before_start() {
    let t = Tern::start("actions");
    refused(
        &t,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        "has not started",
    );
    refused(
        &t,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Resumed"}"#),
        "has not started",
    );
    refused(
        &t,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Frozen"}"#),
        "unknown variant",
    );
    refused(
        &t,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Reboot"}"#),
        "unknown variant",
    );
    refused(
        &t,
        "PUT",
        "/actions",
        Some(r#"{}"#),
        "missing field `action_type`",
    );
    // InstanceStart without a boot source is the client's mistake.
    refused(
        &t,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        "boot-source",
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&t.req("GET", "/", None).body).unwrap()["state"],
        "Not started"
    );
}

#[test]
fn entropy() {
    let t = Tern::start("entropy");
    assert_eq!(t.req("PUT", "/entropy", Some("{}")).status, 204);
    let limited = r#"{"rate_limiter": {"bandwidth": {"size": 1024, "refill_time": 100}}}"#;
    assert_eq!(t.req("PUT", "/entropy", Some(limited)).status, 204);
    assert!(t.config().contains(r#""entropy":{"rate_limiter":{"bandwidth":{"one_time_burst":0,"refill_time":100,"size":1024}"#), "{}", t.config());
    refused(
        &t,
        "PUT",
        "/entropy",
        Some(r#"{"rate_limiter": {"bandwidth": {"size": 0, "refill_time": 1}}}"#),
        "entropy.rate_limiter.bandwidth.size",
    );
    refused(
        &t,
        "PUT",
        "/entropy",
        Some(r#"{"rng": 1}"#),
        "unknown field",
    );
    refused(&t, "PUT", "/entropy", Some("[1]"), "entropy");
}

/// `PUT /tern/v1/smbios` (a tern extension): stored and shown in `GET /vm/config` on x86;
/// bad strings, UUIDs and fields refused with the field named; ARM64 refuses it (no UEFI).
#[test]
fn smbios() {
    let t = Tern::start("smbios");
    let good = r#"{"manufacturer": "Acme", "serial": "SN-1", "uuid": "12345678-9abc-def0-1122-334455667788", "oem_strings": ["a=1", "b=2"]}"#;
    if cfg!(target_arch = "x86_64") {
        assert_eq!(t.req("PUT", "/tern/v1/smbios", Some(good)).status, 204);
        let c = t.config();
        assert!(
            c.contains(r#""smbios":{"manufacturer":"Acme","oem_strings":["a=1","b=2"],"serial":"SN-1","uuid":"12345678-9abc-def0-1122-334455667788"}"#),
            "{c}"
        );
    } else {
        refused(
            &t,
            "PUT",
            "/tern/v1/smbios",
            Some(good),
            "leave smbios out on ARM64",
        );
    }
    refused(
        &t,
        "PUT",
        "/tern/v1/smbios",
        Some(r#"{"serial": "tab\there"}"#),
        "smbios.serial: character 3 is '\\t', a control character",
    );
    refused(
        &t,
        "PUT",
        "/tern/v1/smbios",
        Some(r#"{"uuid": "not-a-uuid"}"#),
        "smbios.uuid: \"not-a-uuid\" is not a UUID",
    );
    refused(
        &t,
        "PUT",
        "/tern/v1/smbios",
        Some(r#"{"serial_number": "x"}"#),
        "unknown field",
    );
}

#[test]
fn cpu_config() {
    let t = Tern::start("cpu-config");
    let good = r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
        "modifiers": [{"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]}],
        "msr_modifiers": [{"addr": "0x1a0", "bitmap": "0b1"}]}"#;
    assert_eq!(t.req("PUT", "/cpu-config", Some(good)).status, 204);
    let bad_bitmap = r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0", "modifiers": [{"register": "ecx", "bitmap": "0b12"}]}]}"#;
    refused(
        &t,
        "PUT",
        "/cpu-config",
        Some(bad_bitmap),
        "cpu-config.cpuid_modifiers[0].modifiers[0].bitmap",
    );
    let bad_reg = r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0", "modifiers": [{"register": "esi", "bitmap": "0b1"}]}]}"#;
    refused(
        &t,
        "PUT",
        "/cpu-config",
        Some(bad_reg),
        "is not eax, ebx, ecx or edx",
    );
    refused(
        &t,
        "PUT",
        "/cpu-config",
        Some(r#"{"msr_modifiers": [{"addr": "zz", "bitmap": "0b1"}]}"#),
        "is not a number",
    );
    refused(
        &t,
        "PUT",
        "/cpu-config",
        Some(r#"{"kvm_capabilities": ["!56"]}"#),
        "kvm_capabilities",
    );
    refused(
        &t,
        "PUT",
        "/cpu-config",
        Some(r#"{"reg_modifiers": []}"#),
        "unknown field",
    );
}

#[test]
fn wrong_methods_are_refused_on_every_route() {
    let t = Tern::start("methods");
    for (m, p) in [
        ("PUT", "/"),
        ("DELETE", "/"),
        ("PUT", "/version"),
        ("PATCH", "/version"),
        ("PUT", "/vm/config"),
        ("PATCH", "/vm/config"),
        ("GET", "/boot-source"),
        ("PATCH", "/boot-source"),
        ("DELETE", "/machine-config"),
        ("GET", "/logger"),
        ("GET", "/serial"),
        ("GET", "/actions"),
        ("GET", "/vm"),
        ("PUT", "/vm"),
        ("PUT", "/tern/v1/metrics"),
        ("GET", "/tern/v1/nothing"),
    ] {
        refused(&t, m, p, Some("{}"), "Invalid request method and/or path");
    }
    // A body over Firecracker's 51,200-byte limit.
    let big = format!(r#"{{"kernel_image_path": "{}"}}"#, "x".repeat(60_000));
    refused(
        &t,
        "PUT",
        "/boot-source",
        Some(&big),
        "larger than 51200 bytes",
    );
}

#[test]
fn snapshot_routes_refuse_what_cannot_be_done() {
    let t = Tern::start("snapshots");
    refused(&t, "PUT", "/snapshot/create", Some("{}"), "snapshot_path");
    let create = r#"{"snapshot_type": "Full", "snapshot_path": "s", "mem_file_path": "m"}"#;
    refused(
        &t,
        "PUT",
        "/snapshot/create",
        Some(create),
        "has not started",
    );
    let missing = r#"{"snapshot_path": "/no/such/state", "mem_file_path": "/no/such/mem"}"#;
    refused(&t, "PUT", "/snapshot/load", Some(missing), "/no/such/state");
    let odd =
        r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Disk", "backend_path": "u"}}"#;
    refused(&t, "PUT", "/snapshot/load", Some(odd), "not File or Uffd");
    // Dirty-page tracking is taken; the load still fails on its missing file.
    let dirty =
        r#"{"snapshot_path": "/no/such/state", "mem_file_path": "m", "track_dirty_pages": true}"#;
    refused(&t, "PUT", "/snapshot/load", Some(dirty), "/no/such/state");
    let partial = r#"{"snapshot_type": "Partial", "snapshot_path": "s", "mem_file_path": "m"}"#;
    refused(
        &t,
        "PUT",
        "/snapshot/create",
        Some(partial),
        "\"Full\" or \"Diff\"",
    );
    // Not a tern snapshot: refused by its magic, before any VM exists.
    let bogus = t.sock.with_extension("state");
    std::fs::write(&bogus, [7u8; 64]).unwrap();
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "/no/such/mem"}}"#,
        bogus.display()
    );
    refused(
        &t,
        "PUT",
        "/snapshot/load",
        Some(&body),
        "not a tern snapshot",
    );
    let _ = std::fs::remove_file(&bogus);
}

#[test]
fn device_routes() {
    let t = Tern::start("devices");
    let img = t.sock.with_extension("img");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    let img = img.display().to_string();
    let drive = |id: &str, root: bool| {
        format!(r#"{{"drive_id": "{id}", "path_on_host": "{img}", "is_root_device": {root}}}"#)
    };
    assert_eq!(
        t.req("PUT", "/drives/rootfs", Some(&drive("rootfs", true)))
            .status,
        204
    );
    assert_eq!(
        t.req("PUT", "/drives/data", Some(&drive("data", false)))
            .status,
        204
    );
    // PUT with the same id replaces.
    assert_eq!(
        t.req("PUT", "/drives/data", Some(&drive("data", false)))
            .status,
        204
    );
    let cfg: serde_json::Value = serde_json::from_str(&t.config()).unwrap();
    assert_eq!(cfg["drives"].as_array().unwrap().len(), 2, "{cfg}");
    assert_eq!(cfg["drives"][0]["drive_id"], "rootfs");
    refused(
        &t,
        "PUT",
        "/drives/other",
        Some(&drive("other", true)),
        "already the root device",
    );
    refused(
        &t,
        "PUT",
        "/drives/x",
        Some(&drive("y", false)),
        "the path says",
    );
    refused(
        &t,
        "PUT",
        "/drives/x",
        Some(r#"{"drive_id": "x", "path_on_host": "/nonexistent.img", "is_root_device": false}"#),
        "/nonexistent.img",
    );
    refused(
        &t,
        "PUT",
        "/drives/x",
        Some(r#"{"drive_id": "x"}"#),
        "missing field",
    );
    refused(
        &t,
        "PATCH",
        "/drives/data",
        Some(&format!(
            r#"{{"drive_id": "data", "path_on_host": "{img}"}}"#
        )),
        "running VM",
    );
    let net = r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}"#;
    assert_eq!(
        t.req("PUT", "/network-interfaces/eth0", Some(net)).status,
        204
    );
    refused(
        &t,
        "PUT",
        "/network-interfaces/eth1",
        Some(r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#),
        "already uses",
    );
    refused(
        &t,
        "PUT",
        "/network-interfaces/eth1",
        Some(r#"{"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "01:00:00:00:00:01"}"#),
        "multicast",
    );
    refused(
        &t,
        "PATCH",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0"}"#),
        "running VM",
    );
    assert_eq!(
        t.req(
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid": 3, "uds_path": "/tmp/tern-v.sock"}"#)
        )
        .status,
        204
    );
    refused(
        &t,
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 1, "uds_path": "/tmp/v"}"#),
        "reserved",
    );
    refused(&t, "GET", "/balloon", None, "no balloon device");
    let balloon = r#"{"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 2}"#;
    assert_eq!(t.req("PUT", "/balloon", Some(balloon)).status, 204);
    let b = t.req("GET", "/balloon", None);
    assert_eq!(b.status, 200);
    assert!(b.body.contains(r#""amount_mib":16"#), "{}", b.body);
    refused(
        &t,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 1, "deflate_on_oom": true, "free_page_hinting": true}"#),
        "free_page_hinting",
    );
    refused(&t, "GET", "/balloon/statistics", None, "not started");
    refused(
        &t,
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 1}"#),
        "running VM",
    );
    refused(
        &t,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 1}"#),
        "running VM",
    );
}

#[test]
fn socket_is_private_exclusive_and_cleaned_up() {
    use std::os::unix::fs::PermissionsExt;
    let t = Tern::start("sock");
    let mode = std::fs::metadata(&t.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second tern on a live socket fails with a clear message.
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--api-sock", t.sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serving"), "{err}");
    // SIGTERM removes the socket.
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.sock.exists() {
        assert!(
            Instant::now() < deadline,
            "socket left behind after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn stale_socket_is_replaced() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("api");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("stale.sock");
    let _ = std::fs::remove_file(&sock);
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap()); // leaves the file, nobody listening
    assert!(sock.exists());
    let t = Tern {
        child: spawn_on(&sock),
        sock: sock.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while http::request(&t.sock, "GET", "/", None).is_err() {
        assert!(
            Instant::now() < deadline,
            "tern did not take over the stale socket"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn spawn_on(sock: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--api-sock", sock.to_str().unwrap(), "--level", "Off"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

// ---- a whole life through the socket, in a booted guest -------------------------------------

/// The whole life. Ctrl+Alt+Del needs a guest kernel with the i8042 and atkbd drivers: tern's
/// own guest kernel (Debian's cloud kernel) has them; the kit's minimal one leaves them out.
const LIFECYCLE_STEPS: &str = r#"[
  {"req": "GET /"},
  {"req": "PUT /boot-source", "body": {"kernel_image_path": "own-bzImage", "initrd_path": "initramfs.cpio.gz",
     "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet guest.cmd=ticks guest.ticks=300"}},
  {"req": "PUT /machine-config", "body": {"vcpu_count": 2, "mem_size_mib": 256}},
  {"req": "PUT /machine-config", "body": {"vcpu_count": 0, "mem_size_mib": 256}},
  {"req": "PUT /actions", "body": {"action_type": "SendCtrlAltDel"}},
  {"req": "PUT /actions", "body": {"action_type": "InstanceStart"}},
  {"req": "GET /"},
  {"req": "PUT /boot-source", "body": {"kernel_image_path": "vmlinux"}},
  {"req": "PATCH /machine-config", "body": {"vcpu_count": 1}},
  {"wait": "GUEST TICK 3"},
  {"req": "PATCH /vm", "body": {"state": "Paused"}},
  {"req": "GET /"},
  {"sleep_ms": 1500},
  {"req": "PATCH /vm", "body": {"state": "Resumed"}},
  {"req": "GET /"},
  {"req": "GET /tern/v1/metrics"},
  {"wait": "GUEST TICK 12"},
  {"req": "PUT /actions", "body": {"action_type": "SendCtrlAltDel"}}
]"#;

const SCENARIOS: &[Scenario] = &[Scenario {
    api_steps: Some(LIFECYCLE_STEPS),
    // Ctrl+Alt+Del needs the x86 i8042 (and tern's own x86 kernel).
    x86_only: true,
    ..Scenario::new("api_lifecycle")
}];

static BATCHES: common::Batches = common::Batches::new();

#[test]
fn api_lifecycle_configure_start_pause_resume_ctrl_alt_del() {
    let Some(o) = common::outcomes(&BATCHES, "api", SCENARIOS, "api_lifecycle").pop() else {
        return;
    };
    let ctx = || format!("{}\napi: {:#?}", o.console(), o.api);
    assert_eq!(o.steps_error, None, "{}", ctx());
    let calls: Vec<(&str, u16)> = o
        .api
        .iter()
        .map(|c| (c.request.as_str(), c.status))
        .collect();
    assert_eq!(
        calls,
        [
            ("GET /", 200),
            ("PUT /boot-source", 204),
            ("PUT /machine-config", 204),
            ("PUT /machine-config", 400),
            ("PUT /actions", 400), // SendCtrlAltDel before start
            ("PUT /actions", 204),
            ("GET /", 200),
            ("PUT /boot-source", 400),
            ("PATCH /machine-config", 400),
            ("PATCH /vm", 204),
            ("GET /", 200),
            ("PATCH /vm", 204),
            ("GET /", 200),
            ("GET /tern/v1/metrics", 200),
            ("PUT /actions", 204), // SendCtrlAltDel
        ],
        "{}",
        ctx()
    );
    let state = |i: usize| -> String {
        serde_json::from_str::<serde_json::Value>(&o.api[i].body).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        [state(0), state(6), state(10), state(12)],
        ["Not started", "Running", "Paused", "Running"]
    );
    assert!(
        fault_of(&o.api[7]).contains("only allowed before the VM starts"),
        "{}",
        ctx()
    );

    // While paused the counter stops; after resume it continues without a gap.
    let (paused_at, resumed_at) = (o.api[9].done_ms, o.api[11].sent_ms);
    let ticks = o.line_times("GUEST TICK ");
    let during: Vec<_> = ticks
        .iter()
        .filter(|(t, _)| *t > paused_at + 50.0 && *t < resumed_at)
        .collect();
    assert!(
        during.is_empty(),
        "ticks while paused: {during:?}\n{}",
        ctx()
    );
    let numbers: Vec<u32> = ticks
        .iter()
        .filter_map(|(_, l)| l.rsplit(' ').next()?.parse().ok())
        .collect();
    // Counted without a gap up to the reboot, which came long before the 300th tick.
    let last = numbers.last().copied().unwrap_or(0);
    assert!((12..300).contains(&last), "last tick {last}\n{}", ctx());
    assert_eq!(numbers, (1..=last).collect::<Vec<_>>(), "{}", ctx());
    // SendCtrlAltDel: the guest's keyboard driver saw it, the kernel restarted through the
    // i8042, and tern ended with 0.
    assert!(o.has_line("guest reset through the i8042"), "{}", ctx());
    assert!(
        ticks.iter().any(|(t, _)| *t > resumed_at),
        "no ticks after resume\n{}",
        ctx()
    );
    assert_eq!(o.guest_value("NPROC").as_deref(), Some("2"), "{}", ctx());
    // The metrics saw the running guest and the pause.
    let prom = &o.api[13].body;
    let value = |name: &str| -> u64 {
        prom.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{prom}"))
    };
    assert!(value("tern_vcpu_exit_io_out_total") > 0, "{prom}");
    assert!(value("tern_uart_write_count_total") > 0, "{prom}");
    assert!(value("tern_latencies_us_pause_vm") > 0, "{prom}");
    assert!(
        value("tern_patch_api_requests_vm_count_total") >= 2,
        "{prom}"
    );
    assert_eq!(o.exit_code, Some(0), "{}", ctx());
}

fn fault_of(c: &common::ApiCall) -> String {
    serde_json::from_str::<serde_json::Value>(&c.body).unwrap()["fault_message"]
        .as_str()
        .unwrap_or("")
        .to_string()
}
