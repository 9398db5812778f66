//! `tern-bench api-bench`: control-socket latency of a VMM, tern's REST API or QEMU's QMP.
//!
//! `tern-bench api-bench --proto tern|qmp --sock SOCK -n N [--steps FILE] [--pause] -- CMD...`
//!
//! Spawns CMD, polls the socket until a connection is accepted (time from spawn), runs the
//! optional steps (tern: `tern-bench run` step format, e.g. configure and start a VM), then
//! sends N reads (`GET /`, or QMP `query-status`) and, with `--pause`, N pause/resume requests
//! alternating (`PATCH /vm`, or QMP `stop`/`cont`), one at a time, and prints JSON with the
//! latency percentiles in microseconds. The VMM is killed at the end.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::http;

#[derive(Serialize, Default)]
pub struct Percentiles {
    pub n: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    Percentiles {
        n: v.len(),
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
        max_us: at(1.0),
    }
}

#[derive(Serialize, Default)]
struct Report {
    proto: String,
    socket_ready_ms: f64,
    read: Percentiles,
    pause_resume: Option<Percentiles>,
    errors: Vec<String>,
}

/// One persistent QMP session.
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub(crate) fn connect(sock: &Path) -> std::io::Result<Self> {
        let s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        };
        q.line()?; // greeting
        q.exec("qmp_capabilities")?;
        Ok(q)
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut l = String::new();
        self.reader.read_line(&mut l)?;
        Ok(l)
    }

    /// Sends a command and waits for its `return` (skipping asynchronous events).
    fn exec(&mut self, cmd: &str) -> std::io::Result<String> {
        self.exec_json(&format!("{{\"execute\": \"{cmd}\"}}"))
    }

    /// Sends a whole command object (one line of JSON) and waits for its `return` or `error`.
    pub(crate) fn exec_json(&mut self, cmd: &str) -> std::io::Result<String> {
        writeln!(self.writer, "{cmd}")?;
        loop {
            let l = self.line()?;
            if l.is_empty() {
                return Err(std::io::Error::other("QMP connection closed"));
            }
            if l.contains("\"return\"") || l.contains("\"error\"") {
                return Ok(l);
            }
        }
    }
}

pub fn main(args: Vec<String>) -> Result<(), String> {
    let mut proto = "tern".to_string();
    let mut sock = PathBuf::new();
    let mut n = 10_000usize;
    let mut steps: Option<PathBuf> = None;
    let mut pause = false;
    let mut cmd = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--proto" => proto = val()?,
            "--sock" => sock = val()?.into(),
            "-n" => n = val()?.parse().map_err(|e| format!("-n: {e}"))?,
            "--steps" => steps = Some(val()?.into()),
            "--pause" => pause = true,
            "--" => {
                cmd = it.by_ref().collect();
                break;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if cmd.is_empty() {
        return Err("no command after --".into());
    }
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", cmd[0]))?;
    let mut report = Report {
        proto: proto.clone(),
        ..Default::default()
    };
    let ready = loop {
        if UnixStream::connect(&sock).is_ok() {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            return Err("the socket never accepted a connection".into());
        }
        std::thread::sleep(Duration::from_micros(100));
    };
    report.socket_ready_ms = ready.as_secs_f64() * 1000.0;

    if let Some(file) = &steps {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let steps: Vec<crate::Step> =
            serde_json::from_str(&text).map_err(|e| format!("steps: {e}"))?;
        for s in steps {
            if let Some(ms) = s.sleep_ms {
                std::thread::sleep(Duration::from_millis(ms));
            }
            if let Some(req) = &s.req {
                let (m, p) = req.split_once(' ').ok_or("bad step")?;
                let body = s.body.as_ref().map(|b| b.to_string());
                match http::request(&sock, m, p, body.as_deref()) {
                    Ok(r) if r.status < 300 => {}
                    Ok(r) => report
                        .errors
                        .push(format!("{req}: {} {}", r.status, r.body)),
                    Err(e) => report.errors.push(format!("{req}: {e}")),
                }
            }
        }
    }

    let mut reads = Vec::with_capacity(n);
    let mut pauses = Vec::with_capacity(if pause { n } else { 0 });
    let err = |e: String, errors: &mut Vec<String>| {
        if errors.len() < 10 {
            errors.push(e);
        }
    };
    if proto == "qmp" {
        let mut q = Qmp::connect(&sock).map_err(|e| format!("QMP: {e}"))?;
        for _ in 0..n {
            let t = Instant::now();
            if let Err(e) = q.exec("query-status") {
                err(e.to_string(), &mut report.errors);
            }
            reads.push(t.elapsed().as_secs_f64() * 1e6);
        }
        for i in 0..if pause { n } else { 0 } {
            let t = Instant::now();
            if let Err(e) = q.exec(if i % 2 == 0 { "stop" } else { "cont" }) {
                err(e.to_string(), &mut report.errors);
            }
            pauses.push(t.elapsed().as_secs_f64() * 1e6);
        }
    } else {
        for _ in 0..n {
            let t = Instant::now();
            match http::request(&sock, "GET", "/", None) {
                Ok(r) if r.status == 200 => {}
                Ok(r) => err(format!("GET /: {}", r.status), &mut report.errors),
                Err(e) => err(format!("GET /: {e}"), &mut report.errors),
            }
            reads.push(t.elapsed().as_secs_f64() * 1e6);
        }
        for i in 0..if pause { n } else { 0 } {
            let body = if i % 2 == 0 {
                r#"{"state": "Paused"}"#
            } else {
                r#"{"state": "Resumed"}"#
            };
            let t = Instant::now();
            match http::request(&sock, "PATCH", "/vm", Some(body)) {
                Ok(r) if r.status == 204 => {}
                Ok(r) => err(
                    format!("PATCH /vm: {} {}", r.status, r.body),
                    &mut report.errors,
                ),
                Err(e) => err(format!("PATCH /vm: {e}"), &mut report.errors),
            }
            pauses.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    report.read = percentiles(reads);
    report.pause_resume = pause.then(|| percentiles(pauses));
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "{}",
        serde_json::to_string(&report).map_err(|e| e.to_string())?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_nearest_rank() {
        let p = percentiles((1..=100).map(f64::from).collect());
        assert_eq!(
            (p.p50_us, p.p90_us, p.p99_us, p.max_us),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(percentiles(vec![]).n, 0);
    }
}
