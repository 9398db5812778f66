//! Bad input on the command line or in the config file: one line naming the field or path,
//! exit code 1, no panic, no backtrace. Needs no KVM (everything is checked before it is used).

use std::path::PathBuf;
use std::process::Command;

fn tern(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("tern runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config(name: &str, json: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, json).unwrap();
    p
}

/// A real ELF file that passes the kernel-format check (the tern binary itself).
fn elf() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

fn machine(vcpus: &str, mem: &str) -> String {
    format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "machine-config": {{"vcpu_count": {vcpus}, "mem_size_mib": {mem}}}}}"#,
        elf()
    )
}

/// Runs tern on `json` and checks it failed cleanly with a line containing all of `expect`.
fn refused(name: &str, json: &str, expect: &[&str]) {
    let p = config(name, json);
    let (code, stdout, stderr) = tern(&["--no-api", "--config-file", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{name}: exit code; stderr: {stderr}");
    assert!(stdout.is_empty(), "{name}: stdout: {stdout}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{name}: one line expected:\n{stderr}"
    );
    assert!(stderr.starts_with("tern: error: "), "{name}: {stderr}");
    for e in expect {
        assert!(stderr.contains(e), "{name}: {stderr:?} lacks {e:?}");
    }
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(bad), "{name}: {stderr}");
    }
}

#[test]
fn missing_kernel_file() {
    refused(
        "missing.json",
        r#"{"boot-source": {"kernel_image_path": "/no/such/vmlinux"}}"#,
        &[
            "boot-source.kernel_image_path",
            "/no/such/vmlinux",
            "No such file",
        ],
    );
}

#[test]
fn file_that_is_not_a_kernel() {
    let p = config("notakernel.bin", "just some text, not a kernel");
    refused(
        "notkernel.json",
        &format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}}}"#,
            p.display()
        ),
        &["boot-source.kernel_image_path", "not a Linux kernel"],
    );
}

#[test]
fn missing_initrd() {
    refused(
        "initrd.json",
        &format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "initrd_path": "/no/initrd"}}}}"#,
            elf()
        ),
        &["boot-source.initrd_path", "/no/initrd"],
    );
}

#[test]
fn zero_vcpus() {
    refused(
        "vcpu0.json",
        &machine("0", "128"),
        &["machine-config.vcpu_count", "1 to"],
    );
}

#[test]
fn zero_memory() {
    refused(
        "mem0.json",
        &machine("1", "0"),
        &["machine-config.mem_size_mib", "0 MiB"],
    );
}

#[test]
fn more_memory_than_the_host_has() {
    refused(
        "memhuge.json",
        &machine("1", "1073741824"),
        &["machine-config.mem_size_mib", "more than this host"],
    );
}

#[test]
fn unknown_field() {
    refused(
        "unknown.json",
        &format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "kernel_args": "x"}}}}"#,
            elf()
        ),
        &["boot-source", "unknown field `kernel_args`"],
    );
    refused(
        "unknown-top.json",
        &format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "gpu": {{}}}}"#,
            elf()
        ),
        &["unknown field `gpu`"],
    );
}

#[test]
fn wrong_types() {
    refused(
        "type1.json",
        &machine("\"two\"", "128"),
        &["machine-config.vcpu_count", "invalid type"],
    );
    refused(
        "type2.json",
        &machine("1", "-5"),
        &["machine-config.mem_size_mib", "invalid value"],
    );
    refused(
        "type3.json",
        &machine("300", "128"),
        &["machine-config.vcpu_count"],
    );
}

#[test]
fn malformed_json() {
    refused(
        "malformed.json",
        r#"{"boot-source": {"kernel_image_path": "#,
        &["malformed.json", "EOF"],
    );
}

#[test]
fn bad_device_sections_are_refused_before_kvm() {
    refused(
        "drives.json",
        &format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "drives": [{{"drive_id": "root"}}]}}"#,
            elf()
        ),
        &["drives[0]", "missing field `path_on_host`"],
    );
    refused(
        "drive-file.json",
        &format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "drives": [{{"drive_id": "root",
                "path_on_host": "/no/such.ext4", "is_root_device": true}}]}}"#,
            elf()
        ),
        &["drives[root].path_on_host", "/no/such.ext4"],
    );
    refused(
        "mmds.json",
        &format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "mmds-config": {{"network_interfaces": ["eth0"]}}}}"#,
            elf()
        ),
        &["mmds-config", "not supported yet"],
    );
}

/// An SMBIOS section that cannot be written is refused before anything is built: a string
/// too long for the F-segment (x86), a control character, a bad UUID.
#[test]
fn bad_smbios_sections_are_refused() {
    let with = |smbios: &str| {
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "smbios": {smbios}}}"#,
            elf()
        )
    };
    if cfg!(target_arch = "x86_64") {
        refused(
            "smbios-big.json",
            &with(&format!(r#"{{"oem_strings": ["{}"]}}"#, "x".repeat(70_000))),
            &["smbios:", "at most 65536 fit", "shorten the strings"],
        );
    }
    refused(
        "smbios-nul.json",
        &with(r#"{"product": "a\u0000b"}"#),
        &["smbios.product:", "a control character"],
    );
    refused(
        "smbios-uuid.json",
        &with(r#"{"uuid": "0a1b2c3d4e5f60718293a4b5c6d7e8f9"}"#),
        &["smbios.uuid:", "is not a UUID"],
    );
}

/// A PCI machine is checked before anything is built: more virtio devices than the bus has
/// slots is refused with the field and what to do.
#[test]
fn pci_machines_that_cannot_be_built_are_refused() {
    let drives: Vec<String> = (0..31)
        .map(|i| {
            format!(
                r#"{{"drive_id": "d{i}", "path_on_host": "{}", "is_root_device": false, "is_read_only": true}}"#,
                elf()
            )
        })
        .collect();
    let json = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128, "pci": true}},
            "drives": [{}], "entropy": {{}}}}"#,
        elf(),
        drives.join(", ")
    );
    refused(
        "pci-slots.json",
        &json,
        &[
            "machine-config.pci:",
            "32 virtio devices",
            "31 free slots",
            "configure fewer devices",
        ],
    );
}

#[test]
fn missing_config_file_and_bad_flags() {
    let (code, _, stderr) = tern(&["--no-api", "--config-file", "/no/vm.json"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("/no/vm.json") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let (code, _, stderr) = tern(&["--no-api"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--config-file"), "{stderr}");
    let (code, _, stderr) = tern(&["--level", "loud", "--no-api", "--config-file", "/x"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--level"), "{stderr}");
    let (code, _, stderr) = tern(&["--frobnicate"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--frobnicate") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn version_and_help_exit_0() {
    let (code, stdout, _) = tern(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("tern "), "{stdout}");
    let (code, stdout, _) = tern(&["--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("--config-file") && stdout.contains("--boot-timer"));
}
