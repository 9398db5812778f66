//! Firecracker's REST routes → typed VMM actions, and VMM results → HTTP replies.
//! Pure functions: the server thread does the I/O.

use serde::de::DeserializeOwned;
use vmm::controller::{ActionError, LoggerUpdate, VmmAction, VmmData};

use crate::models;

/// An HTTP answer: status and optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<String>,
    /// The body is plain text rather than JSON.
    pub text: bool,
}

impl Reply {
    fn json(status: u16, v: serde_json::Value) -> Self {
        Self {
            status,
            body: Some(v.to_string()),
            text: false,
        }
    }

    /// `{"fault_message": ...}` with `status`.
    pub fn fault(status: u16, msg: impl std::fmt::Display) -> Self {
        Self::json(
            status,
            serde_json::json!({ "fault_message": msg.to_string() }),
        )
    }

    fn bad(msg: impl std::fmt::Display) -> Self {
        Self::fault(400, msg)
    }

    fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
            text: false,
        }
    }
}

/// Where a request goes.
#[derive(Debug)]
pub enum Route {
    /// To the VMM thread.
    Action(VmmAction),
    /// Answered by the API thread itself.
    Reply(Reply),
}

fn parse<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, Reply> {
    if body.is_empty() {
        return Err(Reply::bad(format!("{what}: the request needs a JSON body")));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            what.to_string()
        } else {
            format!("{what}.{path}")
        };
        Reply::bad(format!("{field}: {}", e.into_inner()))
    })
}

/// Counts a request in Firecracker's API metrics (`*_count`, and `*_fails` when refused).
pub fn count(method: &str, path: &str, status: u16) {
    let m = &metrics::METRICS;
    let failed = status >= 400;
    let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
    let pair = match (method, path) {
        ("GET", "") => Some((&m.get_api_requests.instance_info_count, None)),
        ("GET", "/machine-config") => Some((&m.get_api_requests.machine_cfg_count, None)),
        ("GET", "/vm/config") => Some((&m.get_api_requests.vm_config_count, None)),
        ("GET", "/version") => Some((&m.get_api_requests.version_count, None)),
        ("PUT", "/actions") => Some((
            &m.put_api_requests.actions_count,
            Some(&m.put_api_requests.actions_fails),
        )),
        ("PUT", "/boot-source") => Some((
            &m.put_api_requests.boot_source_count,
            Some(&m.put_api_requests.boot_source_fails),
        )),
        ("PUT", "/logger") => Some((
            &m.put_api_requests.logger_count,
            Some(&m.put_api_requests.logger_fails),
        )),
        ("PUT", "/machine-config") => Some((
            &m.put_api_requests.machine_cfg_count,
            Some(&m.put_api_requests.machine_cfg_fails),
        )),
        ("PUT", "/metrics") => Some((
            &m.put_api_requests.metrics_count,
            Some(&m.put_api_requests.metrics_fails),
        )),
        ("PUT", "/serial") => Some((
            &m.put_api_requests.serial_count,
            Some(&m.put_api_requests.serial_fails),
        )),
        ("PATCH", "/machine-config") => Some((
            &m.patch_api_requests.machine_cfg_count,
            Some(&m.patch_api_requests.machine_cfg_fails),
        )),
        ("PATCH", "/vm") => Some((
            &m.patch_api_requests.vm_count,
            Some(&m.patch_api_requests.vm_fails),
        )),
        _ => None,
    };
    if let Some((count, fails)) = pair {
        count.inc();
        if let (true, Some(f)) = (failed, fails) {
            f.inc();
        }
    }
}

/// Maps a request to a route, or to an error reply.
pub fn route(method: &str, path: &str, body: &[u8]) -> Route {
    match route_inner(method, path, body) {
        Ok(r) => r,
        Err(reply) => Route::Reply(reply),
    }
}

fn route_inner(method: &str, path: &str, body: &[u8]) -> Result<Route, Reply> {
    use Route::Action as A;
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let invalid = || {
        Reply::bad(format!(
            "Invalid request method and/or path: {method} {path}"
        ))
    };
    Ok(match (method, segments.as_slice()) {
        ("GET", [] | [""]) => A(VmmAction::GetInstanceInfo),
        ("GET", ["version"]) => Route::Reply(Reply::json(
            200,
            serde_json::json!({ "firecracker_version": env!("CARGO_PKG_VERSION") }),
        )),
        ("GET", ["vm", "config"]) => A(VmmAction::GetVmConfig),
        ("PUT", ["boot-source"]) => A(VmmAction::PutBootSource(
            parse::<models::BootSource>("boot-source", body)?.into_vmm(),
        )),
        ("GET", ["machine-config"]) => A(VmmAction::GetMachineConfig),
        ("PUT", ["machine-config"]) => {
            let m = parse::<models::MachineConfig>("machine-config", body)?;
            A(VmmAction::PutMachineConfig(
                m.into_vmm()
                    .map_err(|(f, m)| Reply::bad(format!("{f}: {m}")))?,
            ))
        }
        ("PATCH", ["machine-config"]) => {
            let m = parse::<models::MachineConfigPatch>("machine-config", body)?;
            A(VmmAction::PatchMachineConfig(
                m.into_vmm()
                    .map_err(|(f, m)| Reply::bad(format!("{f}: {m}")))?,
            ))
        }
        ("PUT", ["logger"]) => {
            let l = parse::<models::Logger>("logger", body)?;
            if l.module.is_some() {
                return Err(Reply::bad(
                    "logger.module: filtering by module is not supported yet",
                ));
            }
            A(VmmAction::PutLogger(LoggerUpdate {
                log_path: l.log_path.map(Into::into),
                level: l.level,
                show_level: l.show_level,
                show_log_origin: l.show_log_origin,
            }))
        }
        ("PUT", ["serial"]) => {
            let s = parse::<models::Serial>("serial", body)?;
            A(VmmAction::PutSerial(s.serial_out_path.map(Into::into)))
        }
        ("PUT", ["actions"]) => {
            match parse::<models::InstanceActionInfo>("actions", body)?.action_type {
                models::ActionType::InstanceStart => A(VmmAction::InstanceStart),
                models::ActionType::SendCtrlAltDel => A(VmmAction::SendCtrlAltDel),
                models::ActionType::FlushMetrics => A(VmmAction::FlushMetrics),
            }
        }
        ("PATCH", ["vm"]) => match parse::<models::VmState>("vm", body)?.state {
            models::VmStateValue::Paused => A(VmmAction::Pause),
            models::VmStateValue::Resumed => A(VmmAction::Resume),
        },
        ("PUT", ["metrics"]) => A(VmmAction::PutMetrics(
            parse::<models::Metrics>("metrics", body)?
                .metrics_path
                .into(),
        )),
        ("GET", ["tern", "v1", "metrics"]) => Route::Reply(Reply {
            status: 200,
            body: Some(metrics::METRICS.prometheus()),
            text: true,
        }),
        ("PUT", ["tern", "v1", "smbios"]) => {
            let c = parse::<vmm::resources::SmbiosConfig>("smbios", body)?;
            A(VmmAction::PutSmbios(Box::new(c)))
        }
        ("PUT", ["cpu-config"]) => {
            let c = parse::<models::CpuConfig>("cpu-config", body)?;
            A(VmmAction::PutCpuConfig(
                c.into_vmm()
                    .map_err(|(f, m)| Reply::bad(format!("{f}: {m}")))?,
            ))
        }
        ("PUT", ["snapshot", "create"]) => {
            let p = parse::<models::SnapshotCreateParams>("snapshot-create", body)?;
            A(VmmAction::CreateSnapshot {
                snapshot_type: p.snapshot_type,
                snapshot_path: p.snapshot_path.into(),
                mem_file_path: p.mem_file_path.into(),
            })
        }
        ("PUT", ["snapshot", "load"]) => {
            let p = parse::<models::SnapshotLoadParams>("snapshot-load", body)?;
            let (mem, uffd) = p
                .mem_source()
                .map_err(|(f, m)| Reply::bad(format!("{f}: {m}")))?;
            A(VmmAction::LoadSnapshot {
                snapshot_path: p.snapshot_path.into(),
                mem_path: mem.into(),
                uffd,
                resume_vm: p.resume_vm,
                track_dirty_pages: p.track_dirty_pages || p.enable_diff_snapshots,
            })
        }
        ("PUT", ["drives", id]) => {
            let d = parse::<models::Drive>("drive", body)?;
            same_id("drive_id", id, &d.drive_id)?;
            A(VmmAction::PutDrive(
                d.into_vmm()
                    .map_err(|(f, m)| Reply::bad(format!("{f}: {m}")))?,
            ))
        }
        ("PATCH", ["drives", id]) => {
            let d = parse::<models::PartialDrive>("drive", body)?;
            same_id("drive_id", id, &d.drive_id)?;
            if d.path_on_host.is_none() && d.rate_limiter.is_none() {
                return Err(Reply::bad(
                    "drive: give path_on_host and/or rate_limiter to change",
                ));
            }
            A(VmmAction::PatchDrive {
                drive_id: d.drive_id,
                path_on_host: d.path_on_host.map(Into::into),
                rate_limiter: d.rate_limiter,
            })
        }
        ("PUT", ["network-interfaces", id]) => {
            let n = parse::<models::NetworkInterface>("network-interface", body)?;
            same_id("iface_id", id, &n.iface_id)?;
            A(VmmAction::PutNet(
                n.into_vmm()
                    .map_err(|(f, m)| Reply::bad(format!("{f}: {m}")))?,
            ))
        }
        ("PATCH", ["network-interfaces", id]) => {
            let n = parse::<models::PartialNetworkInterface>("network-interface", body)?;
            same_id("iface_id", id, &n.iface_id)?;
            A(VmmAction::PatchNet {
                iface_id: n.iface_id,
                rx: n.rx_rate_limiter,
                tx: n.tx_rate_limiter,
            })
        }
        ("PUT", ["vsock"]) => A(VmmAction::PutVsock(
            parse::<models::Vsock>("vsock", body)?.into_vmm(),
        )),
        ("PUT", ["entropy"]) => {
            let e = parse::<models::Entropy>("entropy", body)?;
            e.check()
                .map_err(|(f, m)| Reply::bad(format!("{f}: {m}")))?;
            A(VmmAction::PutEntropy(e.rate_limiter))
        }
        ("PUT", ["balloon"]) => A(VmmAction::PutBalloon(
            parse::<models::Balloon>("balloon", body)?
                .into_vmm()
                .map_err(|(f, m)| Reply::bad(format!("{f}: {m}")))?,
        )),
        ("GET", ["balloon"]) => A(VmmAction::GetBalloon),
        ("PATCH", ["balloon"]) => A(VmmAction::PatchBalloon(
            parse::<models::BalloonUpdate>("balloon", body)?.amount_mib,
        )),
        ("GET", ["balloon", "statistics"]) => A(VmmAction::GetBalloonStats),
        ("PATCH", ["balloon", "statistics"]) => A(VmmAction::PatchBalloonStats(
            parse::<models::BalloonStatsUpdate>("balloon statistics", body)?
                .stats_polling_interval_s,
        )),
        _ => return Err(invalid()),
    })
}

/// The id in the path and the body must agree, as Firecracker requires.
fn same_id(field: &str, in_path: &str, in_body: &str) -> Result<(), Reply> {
    if in_path == in_body {
        Ok(())
    } else {
        Err(Reply::bad(format!(
            "{field}: the path says {in_path:?} but the body says {in_body:?}"
        )))
    }
}

/// Turns a VMM result into the reply Firecracker would send.
pub fn render(result: Result<VmmData, ActionError>) -> Reply {
    match result {
        Ok(VmmData::Empty) => Reply::no_content(),
        Ok(VmmData::InstanceInfo {
            id,
            state,
            vmm_version,
        }) => Reply::json(
            200,
            serde_json::json!({ "id": id, "state": state, "vmm_version": vmm_version, "app_name": "tern" }),
        ),
        Ok(VmmData::MachineConfig(m)) => Reply::json(
            200,
            serde_json::to_value(models::MachineConfig::from_vmm(&m)).unwrap_or_default(),
        ),
        Ok(VmmData::Balloon(b)) => Reply::json(
            200,
            serde_json::to_value(models::Balloon::from_vmm(&b)).unwrap_or_default(),
        ),
        Ok(VmmData::BalloonStats(s)) => {
            let mut v = serde_json::json!({
                "target_pages": s.target_pages,
                "actual_pages": s.actual_pages,
                "target_mib": s.target_pages / 256,
                "actual_mib": s.actual_pages / 256,
            });
            for (name, value) in &s.tags {
                v[*name] = serde_json::json!(value);
            }
            Reply::json(200, v)
        }
        Ok(VmmData::VmConfig(r)) => {
            let drives: Vec<_> = r.drives.iter().map(models::Drive::from_vmm).collect();
            let nets: Vec<_> = r
                .net
                .iter()
                .map(models::NetworkInterface::from_vmm)
                .collect();
            let mut v = serde_json::json!({
                "machine-config": models::MachineConfig::from_vmm(&r.effective_machine_config()),
                "drives": drives,
                "network-interfaces": nets,
            });
            if let Some(b) = &r.balloon {
                v["balloon"] =
                    serde_json::to_value(models::Balloon::from_vmm(b)).unwrap_or_default();
            }
            if let Some(s) = &r.vsock {
                v["vsock"] = serde_json::json!({
                    "guest_cid": s.guest_cid,
                    "uds_path": s.uds_path.display().to_string(),
                });
            }
            if r.entropy {
                v["entropy"] = serde_json::json!({ "rate_limiter": r.entropy_rate_limiter });
            }
            if let Some(s) = &r.smbios {
                v["smbios"] = serde_json::to_value(s).unwrap_or_default();
            }
            if let Some(b) = &r.boot_source {
                v["boot-source"] =
                    serde_json::to_value(models::BootSource::from_vmm(b)).unwrap_or_default();
            }
            if let Some(p) = &r.serial_out_path {
                v["serial"] = serde_json::json!({ "serial_out_path": p.display().to_string() });
            }
            Reply::json(200, v)
        }
        Err(e) if e.is_client_error() => Reply::bad(e),
        Err(e) => Reply::fault(500, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(r: Route) -> Reply {
        match r {
            Route::Reply(r) => r,
            Route::Action(a) => panic!("expected a reply, got {a:?}"),
        }
    }

    fn fault(r: Route) -> String {
        let r = reply(r);
        assert_eq!(r.status, 400, "{r:?}");
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        v["fault_message"].as_str().unwrap().to_string()
    }

    #[test]
    fn firecracker_routes_map_to_actions() {
        assert!(matches!(
            route("GET", "/", b""),
            Route::Action(VmmAction::GetInstanceInfo)
        ));
        assert!(matches!(
            route("GET", "/machine-config", b""),
            Route::Action(VmmAction::GetMachineConfig)
        ));
        assert!(matches!(
            route("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#),
            Route::Action(VmmAction::InstanceStart)
        ));
        assert!(matches!(
            route("PATCH", "/vm", br#"{"state": "Paused"}"#),
            Route::Action(VmmAction::Pause)
        ));
        assert!(matches!(
            route("PATCH", "/vm", br#"{"state": "Resumed"}"#),
            Route::Action(VmmAction::Resume)
        ));
        match route(
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path": "/k", "boot_args": "x"}"#,
        ) {
            Route::Action(VmmAction::PutBootSource(b)) => {
                assert_eq!(b.boot_args.as_deref(), Some("x"))
            }
            other => panic!("{other:?}"),
        }
        match route("PATCH", "/machine-config", br#"{"vcpu_count": 3}"#) {
            Route::Action(VmmAction::PatchMachineConfig(u)) => assert_eq!(u.vcpu_count, Some(3)),
            other => panic!("{other:?}"),
        }
        let v = reply(route("GET", "/version", b""));
        assert_eq!(v.status, 200);
        assert!(v.body.unwrap().contains("firecracker_version"));
    }

    #[test]
    fn bad_bodies_name_the_field() {
        assert!(
            fault(route(
                "PUT",
                "/machine-config",
                br#"{"vcpu_count": "x", "mem_size_mib": 1}"#
            ))
            .starts_with("machine-config.vcpu_count: invalid type")
        );
        assert!(
            fault(route(
                "PUT",
                "/boot-source",
                br#"{"kernel_image_path": "/k", "x": 1}"#
            ))
            .contains("unknown field `x`")
        );
        assert!(fault(route("PUT", "/boot-source", b"{not json")).starts_with("boot-source"));
        assert!(fault(route("PUT", "/boot-source", b"")).contains("needs a JSON body"));
        assert!(
            fault(route("PUT", "/actions", br#"{"action_type": "Explode"}"#))
                .contains("unknown variant")
        );
        assert!(
            fault(route("PATCH", "/vm", br#"{"state": "Running"}"#)).contains("unknown variant")
        );
        assert!(
            fault(route(
                "PUT",
                "/machine-config",
                br#"{"vcpu_count": 1, "mem_size_mib": 1, "huge_pages": "2M"}"#
            ))
            .contains("huge_pages")
        );
    }

    #[test]
    fn unknown_routes_and_methods_are_400() {
        assert!(fault(route("GET", "/nope", b"")).contains("Invalid request method and/or path"));
        assert!(fault(route("DELETE", "/machine-config", b"")).contains("DELETE /machine-config"));
        assert!(fault(route("PUT", "/drives/rootfs", b"{}")).contains("missing field `drive_id`"));
        assert!(
            fault(route(
                "PUT",
                "/drives/a",
                br#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#
            ))
            .contains("the path says \"a\" but the body says \"b\"")
        );
        assert!(fault(route("PUT", "/snapshot/create", b"{}")).contains("snapshot_path"));
        let odd = br#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Disk", "backend_path": "u"}}"#;
        assert!(fault(route("PUT", "/snapshot/load", odd)).contains("not File or Uffd"));
        let both = br#"{"snapshot_path": "s", "mem_file_path": "m", "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#;
        assert!(fault(route("PUT", "/snapshot/load", both)).contains("not both"));
        assert!(fault(route("PUT", "/metrics", b"{}")).contains("missing field `metrics_path`"));
        let prom = reply(route("GET", "/tern/v1/metrics", b""));
        assert!(prom.text && prom.body.unwrap().contains("tern_vcpu_exit_io_out_total"));
        assert!(matches!(
            route("PUT", "/actions", br#"{"action_type": "SendCtrlAltDel"}"#),
            Route::Action(VmmAction::SendCtrlAltDel)
        ));
    }

    #[test]
    fn results_render_like_firecracker() {
        assert_eq!(
            render(Ok(VmmData::Empty)),
            Reply {
                status: 204,
                body: None,
                text: false
            }
        );
        let r = render(Ok(VmmData::InstanceInfo {
            id: "a".into(),
            state: "Running",
            vmm_version: "0",
        }));
        let v: serde_json::Value = serde_json::from_str(&r.body.unwrap()).unwrap();
        assert_eq!(v["state"], "Running");
        assert_eq!(v["app_name"], "tern");
        let r = render(Err(ActionError::InvalidState("too late".into())));
        assert_eq!(r.status, 400);
        assert_eq!(render(Err(ActionError::Internal("x".into()))).status, 500);
    }
}
