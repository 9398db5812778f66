//! Boots the test guest under real KVM (directly or nested; see tests/common) and checks what
//! the guest and tern report: vCPU count, memory, boot protocols, power-off, reboot, panic.

mod common;

use common::{Arch, Kernel, Outcome, Scenario};

const SCENARIOS: &[Scenario] = &[
    Scenario {
        extra_args: "guest.hwrng=1",
        entropy: true,
        ..Scenario::new("virtio_rng")
    },
    Scenario {
        extra_args: "guest.cpuflags=1",
        x86_only: true,
        ..Scenario::new("cpuflags_default")
    },
    Scenario {
        extra_args: "guest.cpuflags=1",
        cpu_config: Some(NO_SSE3),
        ..Scenario::new("cpuflags_template")
    },
    Scenario {
        vcpus: 1,
        mem_mib: 256,
        ..Scenario::new("pvh_1vcpu_256m")
    },
    Scenario {
        vcpus: 2,
        mem_mib: 5120,
        ..Scenario::new("pvh_2vcpu_5g")
    },
    Scenario {
        boot_protocol: Some("linux"),
        vcpus: 2,
        mem_mib: 256,
        ..Scenario::new("linux64_vmlinux_2vcpu")
    },
    Scenario {
        kernel: Kernel::BzImage,
        vcpus: 1,
        mem_mib: 512,
        // Firecracker's logging flags; /proc/self/fd/2 (stderr) so the lines reach tern-bench.
        tern_flags: &[
            "--id",
            "vm-7",
            "--log-path",
            "/proc/self/fd/2",
            "--show-level",
            "--level",
            "Info",
        ],
        ..Scenario::new("bzimage_1vcpu_512m")
    },
    Scenario {
        guest_cmd: "reboot",
        ..Scenario::new("guest_reboot")
    },
    // ARM64 only: a host whose GIC is a GICv2 (the nest's L1 gets one) makes tern fall back
    // from a GICv3.
    Scenario {
        vcpus: 2,
        mem_mib: 256,
        gicv2: true,
        ..Scenario::new("gicv2_2vcpu")
    },
    Scenario {
        guest_cmd: "panic",
        ..Scenario::new("guest_panic")
    },
    // SMBIOS identity (x86 direct boot: the tables in the F-segment), as the guest kernel
    // reads it into /sys/class/dmi/id and /sys/firmware/dmi/tables, and as Debian's
    // dmidecode decodes those tables. The first OEM string follows the binary part of its
    // structure without a NUL, hence the sed.
    Scenario {
        guest_cmd: "shell",
        x86_only: true,
        config_extra: SMBIOS,
        host_build: Some("sh \"$TERN_WORKSPACE/tests/guest/debian-tools.sh\" dmi_tools.img"),
        drives: &[
            r#"{"drive_id": "tools", "path_on_host": "dmi_tools.img", "is_root_device": false, "is_read_only": true}"#,
        ],
        script: Some(
            "for f in sys_vendor product_name product_version product_serial product_uuid \
             product_sku product_family board_vendor board_serial chassis_serial \
             chassis_asset_tag bios_vendor; do echo \"GUEST DMI_$f $(cat /sys/class/dmi/id/$f)\"; done\n\
             echo \"GUEST DMI_EP $(head -c 5 /sys/firmware/dmi/tables/smbios_entry_point)\"\n\
             tr '\\000' '\\n' < /sys/firmware/dmi/tables/DMI | sed -n 's/^.*\\(oem-\\)/\\1/p' | \
             while read -r l; do echo \"GUEST DMI_OEM $l\"; done\n\
             mkdir /t && tar -xf /dev/vda -C /t\n\
             /t/run dmidecode > /tmp/dmi 2>&1; echo \"GUEST DMIDECODE_EXIT $?\"\n\
             sed 's/^/GUEST DMIDECODE /' /tmp/dmi\n",
        ),
        ..Scenario::new("smbios_identity")
    },
];

/// The `smbios` section of the `smbios_identity` scenario.
const SMBIOS: &str = r#""smbios": {"manufacturer": "Acme Corp", "product": "Roadrunner",
    "version": "7.1", "serial": "RR-0042", "uuid": "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9",
    "sku": "RR-SKU", "family": "Birds", "chassis_serial": "CH-7", "chassis_asset_tag": "AT-9",
    "oem_strings": ["oem-first=1", "oem-second=two words"]}"#;

/// Firecracker's custom CPU template format: clear CPUID.1:ECX bit 0 (SSE3, "pni" in
/// /proc/cpuinfo), a feature every x86-64 host has and this guest does not need.
const NO_SSE3: &str = r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
    "modifiers": [{"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]}]}"#;

static BATCHES: common::Batches = common::Batches::new();

/// The scenario's outcome on each architecture that ran it.
fn runs(name: &str) -> Vec<&'static Outcome> {
    common::outcomes(&BATCHES, "boot", SCENARIOS, name)
}

fn scenario(name: &str) -> &'static Scenario {
    SCENARIOS
        .iter()
        .find(|s| s.name == name)
        .expect("scenario is listed")
}

/// Booted, saw the expected CPUs and memory, powered off, tern exited 0; tern logged
/// `x86_log` (x86) or `arm_log` (aarch64) about the kernel it loaded.
fn check_boot(name: &str, x86_log: &str, arm_log: &str) {
    for o in runs(name) {
        check_boot_on(
            o,
            name,
            if o.arch == Arch::X86_64 {
                x86_log
            } else {
                arm_log
            },
        );
    }
}

fn check_boot_on(o: &Outcome, name: &str, protocol_log: &str) {
    let s = scenario(name);
    let ctx = || format!("scenario {name} ({:?}):\n{}", o.arch, o.console());
    assert!(!o.timed_out, "timed out; {}", ctx());
    assert!(
        o.marker_ms("GUEST BOOTED").is_some(),
        "no GUEST BOOTED; {}",
        ctx()
    );
    assert_eq!(
        o.guest_value("NPROC").as_deref(),
        Some(s.vcpus.to_string().as_str()),
        "{}",
        ctx()
    );
    // x86: the RAM the kernel got from tern's e820 map: all of it but the 385 KiB legacy BIOS
    // area between the EBDA (0x9fc00) and 1 MiB, and page 0, which Linux always reserves
    // itself. ARM64: the device tree's memory node, all of it.
    let configured = s.mem_mib * 1024;
    let expected = match o.arch {
        Arch::X86_64 => configured - 385 - 4,
        Arch::Aarch64 => configured,
    };
    let ram_kib: u64 = o
        .guest_value("RAM")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert_eq!(
        ram_kib,
        expected,
        "System RAM (kB) vs configured; {}",
        ctx()
    );
    // MemTotal is that minus what the kernel keeps for itself: its image, page structs, and
    // with RAM above 4 GiB a 64 MiB swiotlb buffer. Loosely bounded: it depends on the kernel.
    let mem_kib: u64 = o
        .guest_value("MEMTOTAL")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let floor = ram_kib * 3 / 4;
    assert!(
        (floor..ram_kib).contains(&mem_kib),
        "MemTotal {mem_kib} kB not within [{floor}, {ram_kib}) kB; {}",
        ctx()
    );
    assert!(
        o.has_line(protocol_log),
        "tern did not log {protocol_log:?}; {}",
        ctx()
    );
    assert!(o.marker_ms("GUEST POWEROFF").is_some(), "{}", ctx());
    assert_eq!(o.exit_code, Some(0), "{}", ctx());
}

#[test]
fn pvh_1vcpu_256m() {
    check_boot("pvh_1vcpu_256m", "Pvh {", "(arm64 Image, ");
}

#[test]
fn pvh_2vcpu_5g() {
    check_boot("pvh_2vcpu_5g", "Pvh {", "(arm64 Image, ");
}

#[test]
fn gicv2_2vcpu_boots_with_the_fallback() {
    check_boot("gicv2_2vcpu", "not on x86", "(arm64 Image, ");
    for o in runs("gicv2_2vcpu") {
        // Nested, L1 has a GICv2; on an ARM64 host it is whatever the host has.
        if Arch::host() != Arch::Aarch64 {
            assert!(o.has_line("using a GICv2"), "{}", o.console());
            assert!(o.has_line("(arm64 Image, V2)"), "{}", o.console());
        }
    }
}

#[test]
fn linux64_vmlinux_2vcpu() {
    check_boot("linux64_vmlinux_2vcpu", "(Elf, Linux64 {", "x86 only");
}

#[test]
fn bzimage_1vcpu_512m_with_logging_flags() {
    // On ARM64 the same scenario boots the gzip-compressed Image.
    check_boot(
        "bzimage_1vcpu_512m",
        "(BzImage, Linux64 {",
        "(arm64 Image, gzip, ",
    );
    for o in runs("bzimage_1vcpu_512m") {
        assert!(o.has_line("[vm-7:main]:INFO booting"), "{}", o.console());
    }
}

#[test]
fn guest_reboot_ends_tern_with_0() {
    for o in runs("guest_reboot") {
        guest_reboot_on(o);
    }
}

fn guest_reboot_on(o: &Outcome) {
    assert!(!o.timed_out, "{}", o.console());
    let marker = o
        .marker_ms("GUEST REBOOT")
        .unwrap_or_else(|| panic!("no GUEST REBOOT:\n{}", o.console()));
    assert_eq!(o.exit_code, Some(0), "{}", o.console());
    // Reported, not asserted: timings vary with the host (and a nest).
    eprintln!(
        "guest_reboot: tern exited {:.0} ms after GUEST REBOOT",
        o.wall_ms - marker
    );
}

#[test]
fn guest_panic_ends_tern_with_2_and_shows_the_panic() {
    for o in runs("guest_panic") {
        guest_panic_on(o);
    }
}

fn guest_panic_on(o: &Outcome) {
    assert!(!o.timed_out, "{}", o.console());
    assert!(o.marker_ms("GUEST PANIC").is_some(), "{}", o.console());
    assert!(o.has_line("Kernel panic - not syncing"), "{}", o.console());
    assert!(
        o.has_line("tern: the guest kernel panicked"),
        "{}",
        o.console()
    );
    assert_eq!(o.exit_code, Some(2), "{}", o.console());
}

#[test]
fn cpu_template_changes_what_the_guest_sees() {
    let (Some(plain), Some(templ)) = (
        runs("cpuflags_default").pop(),
        runs("cpuflags_template").pop(),
    ) else {
        return;
    };
    let flags = |o: &Outcome| -> Vec<String> {
        o.guest_value("CPUFLAGS")
            .unwrap_or_else(|| panic!("no GUEST CPUFLAGS:\n{}", o.console()))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let (a, b) = (flags(plain), flags(templ));
    assert!(
        a.iter().any(|f| f == "pni"),
        "the host's CPUID has SSE3: {a:?}"
    );
    assert!(
        !b.iter().any(|f| f == "pni"),
        "the template cleared SSE3: {b:?}"
    );
    assert!(
        b.iter().any(|f| f == "sse2"),
        "nothing else was touched: {b:?}"
    );
    assert_eq!(templ.exit_code, Some(0), "{}", templ.console());
}

#[test]
fn smbios_identity_reaches_the_guests_dmi() {
    for o in runs("smbios_identity") {
        let v = |k: &str| o.guest_value(&format!("DMI_{k}"));
        for (k, want) in [
            ("sys_vendor", "Acme Corp"),
            ("product_name", "Roadrunner"),
            ("product_version", "7.1"),
            ("product_serial", "RR-0042"),
            ("product_uuid", "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"),
            ("product_sku", "RR-SKU"),
            ("product_family", "Birds"),
            ("board_vendor", "Acme Corp"),
            ("board_serial", "RR-0042"),
            ("chassis_serial", "CH-7"),
            ("chassis_asset_tag", "AT-9"),
            ("bios_vendor", "tern"),
            ("EP", "_SM3_"),
        ] {
            assert_eq!(v(k).as_deref(), Some(want), "DMI {k}; {}", o.console());
        }
        let oem: Vec<String> = o
            .lines
            .iter()
            .filter_map(|(_, _, l)| {
                l.split_once("GUEST DMI_OEM ")
                    .map(|(_, r)| r.trim().to_string())
            })
            .collect();
        assert_eq!(
            oem,
            ["oem-first=1", "oem-second=two words"],
            "{}",
            o.console()
        );
        // dmidecode: the entry point and every structure parse, and it prints the identity.
        assert_eq!(
            o.guest_value("DMIDECODE_EXIT").as_deref(),
            Some("0"),
            "{}",
            o.console()
        );
        let dmi: Vec<&str> = o
            .lines
            .iter()
            .filter_map(|(_, _, l)| l.split_once("GUEST DMIDECODE ").map(|(_, r)| r.trim()))
            .collect();
        for want in [
            "SMBIOS 3.0.0 present.",
            "Manufacturer: Acme Corp",
            "Product Name: Roadrunner",
            "Serial Number: RR-0042",
            "UUID: 0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9",
            "SKU Number: RR-SKU",
            "Asset Tag: AT-9",
            "String 1: oem-first=1",
            "String 2: oem-second=two words",
        ] {
            assert!(
                dmi.contains(&want),
                "dmidecode: no {want:?}\n{}",
                o.console()
            );
        }
        for bad in ["Invalid", "invalid", "checksum", "Wrong", "truncated"] {
            assert!(
                !dmi.iter().any(|l| l.contains(bad)),
                "dmidecode complains ({bad})\n{}",
                o.console()
            );
        }
        assert_eq!(o.exit_code, Some(0), "{}", o.console());
    }
}

#[test]
fn virtio_rng_serves_the_guest_hwrng() {
    for o in runs("virtio_rng") {
        virtio_rng_on(o);
    }
}

fn virtio_rng_on(o: &Outcome) {
    assert_eq!(
        o.guest_value("RNG_CURRENT").as_deref(),
        Some("virtio_rng.0"),
        "{}",
        o.console()
    );
    assert_eq!(
        o.guest_value("HWRNG_BYTES").as_deref(),
        Some("1048576"),
        "{}",
        o.console()
    );
    assert_eq!(o.exit_code, Some(0), "{}", o.console());
}
