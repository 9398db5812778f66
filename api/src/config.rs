//! `--config-file`: a Firecracker-format JSON document → `VmResources`.

use std::path::{Path, PathBuf};

use vmm::resources::VmResources;

use crate::models::{self, VmConfig};

/// Errors reading a config file. Each names the file and the JSON path of the culprit.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The JSON is malformed or does not match the schema.
    #[error("config file {path}: {field}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// JSON path of the offending value (`.` for the document).
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// Sections that Firecracker has and tern does not support yet, with the issue bringing them.
const NOT_YET: &[(&str, &str)] = &[
    (
        "metrics",
        "in --config-file; use PUT /metrics on the API socket",
    ),
    ("mmds-config", "MMDS is not supported yet"),
    (
        "cpu-config",
        "custom CPU templates arrive with the REST API issue (#3)",
    ),
    ("pmem", "virtio-pmem is not supported yet"),
    ("memory-hotplug", "memory hotplug is not supported yet"),
];

fn is_empty(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Parses `text` (the contents of `path`) into the VM description and the logger section.
pub fn parse_config(
    path: &Path,
    text: &str,
) -> Result<(VmResources, Option<models::Logger>), ConfigFileError> {
    let invalid = |field: String, message: String| ConfigFileError::Invalid {
        path: path.to_path_buf(),
        field,
        message,
    };
    let de = &mut serde_json::Deserializer::from_str(text);
    let cfg: VmConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends " at line L column C"; keep it, it helps find the spot.
        invalid(
            if field.is_empty() { ".".into() } else { field },
            inner.to_string(),
        )
    })?;

    let sections: [(&str, &Option<serde_json::Value>); 4] = [
        ("metrics", &cfg.metrics),
        ("mmds-config", &cfg.mmds_config),
        ("pmem", &cfg.pmem),
        ("memory-hotplug", &cfg.memory_hotplug),
    ];
    for (name, value) in sections {
        if let Some(v) = value.as_ref().filter(|v| !is_empty(v)) {
            let _ = v;
            let why = NOT_YET
                .iter()
                .find(|(n, _)| *n == name)
                .map_or("not supported yet", |(_, w)| w);
            return Err(invalid(name.into(), format!("not supported yet: {why}")));
        }
    }

    let mut res = VmResources {
        boot_source: Some(cfg.boot_source.into_vmm()),
        ..Default::default()
    };
    if let Some(m) = cfg.machine_config {
        res.machine_config = m
            .into_vmm()
            .map_err(|(field, message)| invalid(field, message))?;
    }
    if let Some(e) = cfg.entropy {
        e.check()
            .map_err(|(field, message)| invalid(field, message))?;
        res.entropy = true;
        res.entropy_rate_limiter = e.rate_limiter;
    }
    if let Some(s) = cfg.smbios {
        res.put_smbios(s).map_err(|e| invalid(e.field, e.message))?;
    }
    for d in cfg.drives {
        let d = d
            .into_vmm()
            .map_err(|(field, message)| invalid(field, message))?;
        res.put_drive(d).map_err(|e| invalid(e.field, e.message))?;
    }
    for n in cfg.network_interfaces {
        let n = n
            .into_vmm()
            .map_err(|(field, message)| invalid(field, message))?;
        res.put_net(n).map_err(|e| invalid(e.field, e.message))?;
    }
    if let Some(v) = cfg.vsock {
        let v = v.into_vmm();
        v.validate().map_err(|e| invalid(e.field, e.message))?;
        res.vsock = Some(v);
    }
    if let Some(b) = cfg.balloon {
        res.balloon = Some(
            b.into_vmm()
                .map_err(|(field, message)| invalid(field, message))?,
        );
    }
    if let Some(c) = cfg.cpu_config {
        res.cpu_template = Some(
            c.into_vmm()
                .map_err(|(field, message)| invalid(field, message))?,
        );
    }
    if let Some(s) = cfg.serial {
        res.serial_out_path = s.serial_out_path.map(Into::into);
    }
    Ok((res, cfg.logger))
}

/// Reads and parses the config file at `path`.
pub fn read_config(path: &Path) -> Result<(VmResources, Option<models::Logger>), ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_config(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmResources, String> {
        parse_config(Path::new("vm.json"), text)
            .map(|(r, _)| r)
            .map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"{
        "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false},
        "drives": [], "network-interfaces": []
    }"#;

    #[test]
    fn firecracker_config_parses() {
        let r = parse(GOOD).unwrap();
        assert_eq!(r.machine_config.vcpu_count, 2);
        assert_eq!(r.machine_config.mem_size_mib, 256);
        let b = r.boot_source.unwrap();
        assert_eq!(b.kernel_image_path, PathBuf::from("/k"));
        assert_eq!(b.initrd_path, Some(PathBuf::from("/i")));
        assert_eq!(b.boot_args.as_deref(), Some("console=ttyS0"));
    }

    #[test]
    fn unknown_field_is_named() {
        let e = parse(r#"{"boot-source": {"kernel_image_path": "/k", "kernel_args": "x"}}"#)
            .unwrap_err();
        assert!(e.contains("boot-source"), "{e}");
        assert!(e.contains("unknown field `kernel_args`"), "{e}");
        let e = parse(r#"{"boot-source": {"kernel_image_path": "/k"}, "bogus": 1}"#).unwrap_err();
        assert!(e.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_path() {
        let e = parse(r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": "two", "mem_size_mib": 128}}"#).unwrap_err();
        assert!(e.contains("machine-config.vcpu_count: invalid type"), "{e}");
        let e = parse(r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 300, "mem_size_mib": 128}}"#).unwrap_err();
        assert!(e.contains("machine-config.vcpu_count"), "{e}");
    }

    #[test]
    fn malformed_json_and_missing_sections() {
        assert!(parse("{").unwrap_err().contains("EOF"));
        assert!(
            parse("{}")
                .unwrap_err()
                .contains("missing field `boot-source`")
        );
    }

    #[test]
    fn device_sections_parse_and_are_checked() {
        let img = std::env::temp_dir().join(format!("tern-cfg-{}.img", std::process::id()));
        std::fs::write(&img, [0u8; 4096]).unwrap();
        let img = img.display().to_string();
        let doc = |drives: &str, rest: &str| {
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "/k"}}, "drives": [{drives}]{rest}}}"#
            )
        };
        let root = format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{img}", "is_root_device": true, "is_read_only": true}}"#
        );
        let data = format!(
            r#"{{"drive_id": "data", "path_on_host": "{img}", "is_root_device": false,
                "rate_limiter": {{"bandwidth": {{"size": 1000, "refill_time": 100}}}}}}"#
        );
        let r = parse(&doc(
            &format!("{data}, {root}"),
            r#", "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}],
               "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"},
               "balloon": {"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
        ))
        .unwrap();
        assert_eq!(r.drives.len(), 2);
        assert_eq!(r.ordered_drives()[0].drive_id, "rootfs", "root goes first");
        assert!(r.full_boot_args().ends_with("root=/dev/vda ro"));
        assert_eq!(r.net[0].guest_mac, Some([6, 0, 0, 0, 0, 1]));
        assert_eq!(r.vsock.as_ref().unwrap().guest_cid, 3);
        assert_eq!(r.balloon.as_ref().unwrap().stats_polling_interval_s, 1);
        // Refusals, each naming the field.
        let e = parse(&doc(
            r#"{"drive_id": "x", "path_on_host": "/nonexistent", "is_root_device": false}"#,
            "",
        ))
        .unwrap_err();
        assert!(
            e.contains("drives[x].path_on_host") && e.contains("/nonexistent"),
            "{e}"
        );
        let e = parse(&doc(
            &format!("{root}, {}", root.replace("rootfs", "other")),
            "",
        ))
        .unwrap_err();
        assert!(e.contains("already the root device"), "{e}");
        let e = parse(&doc(&root.replace("rootfs", "bad id"), "")).unwrap_err();
        assert!(e.contains("not a valid id"), "{e}");
        let e = parse(&doc(&data.replace("1000", "0"), "")).unwrap_err();
        assert!(e.contains("rate_limiter.bandwidth.size"), "{e}");
        // num_queues (a tern extension): 1 by default, 1 to 16.
        assert!(r.drives.iter().all(|d| d.num_queues == 1));
        let mq = root.replace(
            "\"is_read_only\": true",
            "\"is_read_only\": true, \"num_queues\": 4",
        );
        assert_eq!(parse(&doc(&mq, "")).unwrap().drives[0].num_queues, 4);
        for bad in ["0", "17"] {
            let e = parse(&doc(&mq.replace(": 4", &format!(": {bad}")), "")).unwrap_err();
            assert!(
                e.contains("drives[rootfs].num_queues") && e.contains("1 to 16"),
                "{e}"
            );
        }
        let e = parse(&doc("", r#", "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"}]"#)).unwrap_err();
        assert!(e.contains("guest_mac"), "{e}");
        let e = parse(&doc("", r#", "network-interfaces": [{"iface_id": "a", "host_dev_name": "tap0"}, {"iface_id": "b", "host_dev_name": "tap0"}]"#)).unwrap_err();
        assert!(e.contains("already uses"), "{e}");
        // num_queue_pairs (a tern extension): 1 by default, 1 to 8.
        let one = r#", "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}]"#;
        assert_eq!(parse(&doc("", one)).unwrap().net[0].num_queue_pairs, 1);
        let mq = one.replace("\"tap0\"", "\"tap0\", \"num_queue_pairs\": 4");
        assert_eq!(parse(&doc("", &mq)).unwrap().net[0].num_queue_pairs, 4);
        for bad in ["0", "9"] {
            let e = parse(&doc("", &mq.replace(": 4", &format!(": {bad}")))).unwrap_err();
            assert!(
                e.contains("network-interfaces[eth0].num_queue_pairs") && e.contains("1 to 8"),
                "{e}"
            );
        }
        let e = parse(&doc(
            "",
            r#", "vsock": {"guest_cid": 2, "uds_path": "/tmp/v"}"#,
        ))
        .unwrap_err();
        assert!(e.contains("vsock.guest_cid"), "{e}");
        let e = parse(&doc(
            "",
            r#", "balloon": {"amount_mib": 0, "deflate_on_oom": false, "free_page_hinting": true}"#,
        ))
        .unwrap_err();
        assert!(e.contains("free_page_hinting"), "{e}");
        let e = parse(r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"}}"#).unwrap_err();
        assert!(e.contains("huge_pages"), "{e}");
    }

    #[test]
    fn boot_protocol_extension() {
        let r = parse(r#"{"boot-source": {"kernel_image_path": "/k", "boot_protocol": "linux"}}"#)
            .unwrap();
        assert_eq!(
            r.boot_source.unwrap().boot_protocol,
            vmm::resources::BootProtocol::Linux
        );
        assert!(
            parse(r#"{"boot-source": {"kernel_image_path": "/k", "boot_protocol": "bios"}}"#)
                .is_err()
        );
    }
}
