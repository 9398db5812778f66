//! `tern-bench`: runs a VMM command and measures it the same way whatever the VMM.
//!
//! `tern-bench run [--timeout S] [--marker TEXT]... [--mem-sample-after TEXT --guest-mib N]
//!                 [--kill-after TEXT] -- COMMAND...`
//!
//! Prints one JSON object: exit code (or signal), wall time, the time of the first line
//! containing each marker (ms from spawn), the whole output (stdout and stderr interleaved, one
//! line each, with ms timestamps), peak RSS (wait4's ru_maxrss) and, with `--mem-sample-after`,
//! the VMM's RSS split into guest memory and everything else at the moment that marker appeared.
//! The test harness and the benchmarks both use it, inside the nest or directly.
//!
//! With `--api-sock SOCK --steps FILE` it also drives the VMM's API while it runs: FILE holds a
//! JSON array of steps, each `{"wait": "console text"}`, `{"sleep_ms": N}`,
//! `{"req": "METHOD /path", "body": {...}}` (with `"until": "text"`: sent again every 20 ms until
//! the answer contains the text; with `"until_changed": true`: until the answer differs from the
//! previous answer to the same request), `{"qmp": {"execute": ...}, "until": "text"}` (QEMU),
//! `{"sh": "host command"}` or `{"kill": true}`
//! (SIGKILL), done in order; every request's status, body and times go into the report's `api`
//! list.

mod apibench;
mod http;
mod uffd;
mod vsock;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Serialize, Default)]
struct Report {
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    wall_ms: f64,
    markers: Vec<(String, Option<f64>)>,
    lines: Vec<(f64, char, String)>,
    max_rss_kib: i64,
    mem_sample: Option<MemSample>,
    api: Vec<ApiCall>,
    steps_error: Option<String>,
}

#[derive(Serialize, Clone, Default, Debug)]
struct ApiCall {
    request: String,
    sent_ms: f64,
    done_ms: f64,
    status: u16,
    body: String,
}

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct Step {
    /// Wait until a console line so far contains this text.
    #[serde(default)]
    pub(crate) wait: Option<String>,
    /// Wait for a console line containing this text that comes after this step began (the
    /// guest's next report of something, once the previous steps changed it).
    #[serde(default)]
    pub(crate) wait_next: Option<String>,
    #[serde(default)]
    pub(crate) sleep_ms: Option<u64>,
    #[serde(default)]
    pub(crate) req: Option<String>,
    #[serde(default)]
    pub(crate) body: Option<serde_json::Value>,
    /// Record the VMM's resident memory (KiB) as a call named "RSS <label>".
    #[serde(default)]
    pub(crate) rss: Option<String>,
    /// SIGKILL the VMM (after this step's request, if any), as a crash would.
    #[serde(default)]
    pub(crate) kill: bool,
    /// A QMP command object (`{"execute": ..., "arguments": ...}`) sent to the API socket
    /// (QEMU's `-qmp unix:...`), recorded as a call named "QMP <execute>" (status 200 for a
    /// `return`, 500 for an `error`).
    #[serde(default)]
    pub(crate) qmp: Option<serde_json::Value>,
    /// With `qmp` or `req`: send it again (every 10 or 20 ms) until the reply contains this
    /// text, or the run's deadline passes (then the steps end with an error).
    #[serde(default)]
    pub(crate) until: Option<String>,
    /// With `req`: send it again every 20 ms until the answer's body differs from the previous
    /// answer to the same request (a device state that was refreshed).
    #[serde(default)]
    pub(crate) until_changed: bool,
    /// A host shell command (`sh -c`, in the current directory) after this step's request;
    /// one that fails ends the steps with its output as the error.
    #[serde(default)]
    pub(crate) sh: Option<String>,
}

/// Runs the API steps; `lines` is the console so far.
fn run_steps(
    pid: u32,
    sock: std::path::PathBuf,
    steps: Vec<Step>,
    lines: Arc<Mutex<Vec<String>>>,
    t0: Instant,
    deadline: Instant,
) -> (Vec<ApiCall>, Option<String>) {
    let ms = |t: Instant| (t - t0).as_secs_f64() * 1000.0;
    let mut calls = Vec::new();
    for step in steps {
        let waits = [
            (step.wait.as_ref(), 0),
            (
                step.wait_next.as_ref(),
                lines.lock().map(|l| l.len()).unwrap_or(0),
            ),
        ];
        for (m, from) in waits {
            let Some(m) = m else { continue };
            while !lines
                .lock()
                .map(|l| l.iter().skip(from).any(|x| x.contains(m.as_str())))
                .unwrap_or(false)
            {
                if Instant::now() >= deadline {
                    return (calls, Some(format!("timed out waiting for {m:?}")));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if let Some(n) = step.sleep_ms {
            std::thread::sleep(Duration::from_millis(n));
        }
        if let Some(label) = &step.rss {
            let at = Instant::now();
            let kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .map(|v| v.trim().trim_end_matches("kB").trim().to_string())
                })
                .unwrap_or_default();
            calls.push(ApiCall {
                request: format!("RSS {label}"),
                sent_ms: ms(at),
                done_ms: ms(at),
                status: 200,
                body: kib,
            });
        }
        if let Some(req) = &step.req {
            let Some((method, path)) = req.split_once(' ') else {
                return (
                    calls,
                    Some(format!("bad step {req:?}: want \"METHOD /path\"")),
                );
            };
            let body = step.body.as_ref().map(|b| b.to_string());
            let previous = calls
                .iter()
                .rev()
                .find(|c: &&ApiCall| &c.request == req)
                .map(|c| c.body.clone());
            // The socket appears a little after the process starts.
            let sent = Instant::now();
            let resp = loop {
                let resp = loop {
                    match http::request(&sock, method, path, body.as_deref()) {
                        Ok(r) => break r,
                        Err(e)
                            if Instant::now() < deadline
                                && sent.elapsed() < Duration::from_secs(10) =>
                        {
                            let _ = e;
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => return (calls, Some(format!("{req}: {e}"))),
                    }
                };
                let wanted = step
                    .until
                    .as_ref()
                    .is_none_or(|u| resp.body.contains(u.as_str()));
                let changed = !step.until_changed || previous.as_ref() != Some(&resp.body);
                if wanted && changed {
                    break resp;
                }
                if Instant::now() >= deadline {
                    return (
                        calls,
                        Some(format!(
                            "timed out repeating {req} (until {:?}, until_changed {}); last answer: {}",
                            step.until, step.until_changed, resp.body
                        )),
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            calls.push(ApiCall {
                request: req.clone(),
                sent_ms: ms(sent),
                done_ms: ms(Instant::now()),
                status: resp.status,
                body: resp.body,
            });
        }
        if let Some(cmd) = &step.qmp {
            let name = cmd["execute"].as_str().unwrap_or("?").to_string();
            let line = cmd.to_string();
            let sent = Instant::now();
            let reply = loop {
                let r = apibench::Qmp::connect(&sock).and_then(|mut q| q.exec_json(&line));
                match r {
                    Ok(r) if step.until.as_ref().is_none_or(|u| r.contains(u.as_str())) => {
                        break r;
                    }
                    Ok(r) if r.contains("\"error\"") => break r,
                    Err(e) if sent.elapsed() > Duration::from_secs(10) => {
                        return (calls, Some(format!("QMP {name}: {e}")));
                    }
                    _ if Instant::now() >= deadline => {
                        return (calls, Some(format!("timed out on QMP {name}")));
                    }
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            calls.push(ApiCall {
                request: format!("QMP {name}"),
                sent_ms: ms(sent),
                done_ms: ms(Instant::now()),
                status: if reply.contains("\"return\"") {
                    200
                } else {
                    500
                },
                body: reply.trim().to_string(),
            });
        }
        if let Some(cmd) = &step.sh {
            match std::process::Command::new("sh").arg("-c").arg(cmd).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    return (
                        calls,
                        Some(format!(
                            "sh {cmd:?}: {}: {}{}",
                            o.status,
                            String::from_utf8_lossy(&o.stdout),
                            String::from_utf8_lossy(&o.stderr)
                        )),
                    );
                }
                Err(e) => return (calls, Some(format!("sh {cmd:?}: {e}"))),
            }
        }
        if step.kill {
            // SAFETY: kill(2) on the child's pid with a constant signal.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    (calls, None)
}

#[derive(Serialize, Clone, Copy, Default, Debug, PartialEq)]
struct MemSample {
    at_ms: f64,
    rss_kib: u64,
    guest_rss_kib: u64,
    overhead_kib: u64,
}

/// Splits a process's resident memory into the guest-memory mappings (anonymous mappings at
/// least `guest_bytes / 2` large: the guest RAM regions of any VMM) and the rest.
fn split_rss(smaps: &str, guest_bytes: u64) -> (u64, u64) {
    let (mut total, mut guest) = (0u64, 0u64);
    let mut size_kib = 0u64;
    let mut named = false;
    for line in smaps.lines() {
        let mut parts = line.split_whitespace();
        let Some(first) = parts.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            named = parts.nth(4).is_some_and(|p| !p.starts_with("[anon"));
            let mut range = first.split('-');
            let a = range
                .next()
                .and_then(|x| u64::from_str_radix(x, 16).ok())
                .unwrap_or(0);
            let b = range
                .next()
                .and_then(|x| u64::from_str_radix(x, 16).ok())
                .unwrap_or(0);
            size_kib = b.saturating_sub(a) / 1024;
        } else if first == "Rss:" {
            let rss: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += rss;
            if !named && size_kib * 1024 >= guest_bytes / 2 {
                guest += rss;
            }
        }
    }
    (total, guest)
}

struct Args {
    timeout: Duration,
    markers: Vec<String>,
    mem_after: Option<String>,
    guest_mib: u64,
    kill_after: Option<String>,
    api_sock: Option<std::path::PathBuf>,
    steps: Option<std::path::PathBuf>,
    /// Every line also goes here as it comes (for a report on a run that never ends).
    live: Option<std::path::PathBuf>,
    cmd: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    if it.next().as_deref() != Some("run") {
        return Err("usage: tern-bench run [--timeout S] [--marker TEXT]... [--mem-sample-after TEXT --guest-mib N] [--kill-after TEXT] [--api-sock SOCK --steps FILE] [--live FILE] -- COMMAND...".into());
    }
    let mut a = Args {
        timeout: Duration::from_secs(120),
        markers: vec![],
        mem_after: None,
        guest_mib: 0,
        kill_after: None,
        api_sock: None,
        steps: None,
        live: None,
        cmd: vec![],
    };
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--timeout" => {
                a.timeout =
                    Duration::from_secs_f64(val()?.parse().map_err(|e| format!("--timeout: {e}"))?)
            }
            "--marker" => a.markers.push(val()?),
            "--mem-sample-after" => a.mem_after = Some(val()?),
            "--guest-mib" => {
                a.guest_mib = val()?.parse().map_err(|e| format!("--guest-mib: {e}"))?
            }
            "--kill-after" => a.kill_after = Some(val()?),
            "--api-sock" => a.api_sock = Some(val()?.into()),
            "--steps" => a.steps = Some(val()?.into()),
            "--live" => a.live = Some(val()?.into()),
            "--" => {
                a.cmd = it.by_ref().collect();
                break;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.cmd.is_empty() {
        return Err("no command given after --".into());
    }
    Ok(a)
}

/// "TIMEOUT thread <tid> (<name>) state <S> wchan <fn> stack <frames>" for each thread of
/// `pid`, from /proc (the kernel stack needs root; without it the field is empty).
fn thread_states(pid: libc::pid_t) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    let mut out = Vec::new();
    for t in dir.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, r)| r.split(' ').next())
            .unwrap_or("?")
            .to_string();
        let stack: Vec<String> = read("stack")
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .take(12)
            .collect();
        out.push(format!(
            "TIMEOUT thread {} ({}) state {state} wchan {} stack {}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
            stack.join(" < ")
        ));
    }
    out.sort();
    out
}

/// The last `n` events of the kernel's trace buffer (`/sys/kernel/tracing/trace`, where the
/// nest's L1 records KVM's exits) that threads of `pid` caused, as "TIMEOUT kvmtrace ..."
/// lines, after one giving the kernel's uptime now (the events' clock). Nothing when there is
/// no trace.
fn kvm_trace_tail(pid: libc::pid_t, n: usize) -> Vec<String> {
    let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .map(|t| t.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let Ok(trace) = std::fs::read_to_string("/sys/kernel/tracing/trace") else {
        return vec![];
    };
    // "  <comm>-<tid>  [cpu] flags  <seconds>: <event>: ..."
    let ours = |l: &&str| {
        l.split_whitespace()
            .next()
            .and_then(|task| task.rsplit_once('-'))
            .is_some_and(|(_, tid)| tids.iter().any(|t| t == tid))
    };
    let mine: Vec<&str> = trace.lines().filter(ours).collect();
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let mut out = vec![format!(
        "TIMEOUT kvmtrace {} events of the VMM's threads in the buffer; uptime now {}",
        mine.len(),
        uptime.split_whitespace().next().unwrap_or("?")
    )];
    let skip = mine.len().saturating_sub(n);
    out.extend(
        mine[skip..]
            .iter()
            .map(|l| format!("TIMEOUT kvmtrace {}", l.trim())),
    );
    out
}

fn pump(r: impl Read + Send + 'static, tag: char, tx: mpsc::Sender<(Instant, char, String)>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .replace('\r', "");
                    if tx.send((Instant::now(), tag, line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(cmd @ ("vsock-serve" | "vsock-connect")) = argv.get(1).map(String::as_str) {
        let r = if cmd == "vsock-serve" {
            vsock::serve(&argv[2..])
        } else {
            vsock::connect(&argv[2..])
        };
        match r {
            Ok(line) => println!("{line}"),
            Err(e) => {
                println!("HOST VSOCK FAIL {cmd}: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if argv.get(1).map(String::as_str) == Some("uffd-serve") {
        match uffd::serve(&argv[2..]) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                println!("HOST UFFD FAIL: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("mktap") {
        // `tern-bench mktap [--multi-queue] NAME...`: persistent TAP devices (what `ip tuntap
        // add [multi_queue]` does; busybox ip cannot), for the network scenarios.
        let mut queues = 1;
        for name in std::env::args().skip(2) {
            if name == "--multi-queue" {
                queues = 2;
                continue;
            }
            let made = devices::virtio::net::Tap::open_queues(&name, queues)
                .and_then(|t| t.first().map_or(Ok(()), |t| t.persist()));
            if let Err(e) = made {
                eprintln!("tern-bench mktap {name}: {e}");
                std::process::exit(2);
            }
        }
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("api-bench") {
        if let Err(e) = apibench::main(std::env::args().skip(2).collect()) {
            eprintln!("tern-bench api-bench: {e}");
            std::process::exit(2);
        }
        return;
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tern-bench: {e}");
            std::process::exit(2);
        }
    };
    let t0 = Instant::now();
    let mut child = match Command::new(&args.cmd[0])
        .args(&args.cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tern-bench: cannot run {}: {e}", args.cmd[0]);
            std::process::exit(2);
        }
    };
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    if let Some(o) = child.stdout.take() {
        pump(o, 'o', tx.clone());
    }
    if let Some(e) = child.stderr.take() {
        pump(e, 'e', tx);
    }
    let ms = |t: Instant| (t - t0).as_secs_f64() * 1000.0;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let steps = match (&args.api_sock, &args.steps) {
        (Some(sock), Some(file)) => {
            let steps: Vec<Step> = match std::fs::read_to_string(file)
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tern-bench: steps {}: {e}", file.display());
                    // SAFETY: plain kill(2) of our own child.
                    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
                    std::process::exit(2);
                }
            };
            let (sock, seen, deadline) = (sock.clone(), seen.clone(), t0 + args.timeout);
            let pid = child.id();
            Some(std::thread::spawn(move || {
                run_steps(pid, sock, steps, seen, t0, deadline)
            }))
        }
        _ => None,
    };
    let mut report = Report {
        markers: args.markers.iter().map(|m| (m.clone(), None)).collect(),
        ..Default::default()
    };
    let mut live = args
        .live
        .as_ref()
        .and_then(|p| match std::fs::File::create(p) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!(
                    "tern-bench: --live {}: {e} (going on without it)",
                    p.display()
                );
                None
            }
        });
    let deadline = t0 + args.timeout;
    loop {
        let now = Instant::now();
        if now >= deadline {
            report.timed_out = true;
            // Where each of the VMM's threads is, before it goes: a vCPU in KVM_RUN or one
            // blocked in tern tells a frozen guest from a stuck VMM.
            for line in thread_states(pid) {
                report.lines.push((ms(Instant::now()), 'e', line));
            }
            // What KVM did for the VMM's threads lately (the nest's L1 traces its exits): a
            // guest exiting in a loop, or one that has not exited for seconds.
            for line in kvm_trace_tail(pid, 40) {
                report.lines.push((ms(Instant::now()), 'e', line));
            }
            // Then where each vCPU is in the guest: tern logs their registers on SIGUSR2
            // (it pauses and resumes them to read them, so this comes after the trace).
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGUSR2) };
            let until = Instant::now() + Duration::from_secs(3);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok((t, tag, line)) => {
                        let end = line.contains("vCPU dump end");
                        report.lines.push((ms(t), tag, line));
                        if end {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok((t, tag, line)) => {
                for (m, at) in report.markers.iter_mut() {
                    if at.is_none() && line.contains(m.as_str()) {
                        *at = Some(ms(t));
                    }
                }
                if args.mem_after.as_deref().is_some_and(|m| line.contains(m))
                    && report.mem_sample.is_none()
                {
                    // Let the guest settle for a moment, as a user's first command would.
                    std::thread::sleep(Duration::from_millis(200));
                    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) {
                        let (rss, guest) = split_rss(&s, args.guest_mib << 20);
                        report.mem_sample = Some(MemSample {
                            at_ms: ms(Instant::now()),
                            rss_kib: rss,
                            guest_rss_kib: guest,
                            overhead_kib: rss.saturating_sub(guest),
                        });
                    }
                }
                let kill = args.kill_after.as_deref().is_some_and(|m| line.contains(m));
                if let Ok(mut s) = seen.lock() {
                    s.push(line.clone());
                }
                if let Some(f) = &mut live {
                    use std::io::Write;
                    let _ = writeln!(f, "{:.0} {tag} {line}", ms(t));
                }
                report.lines.push((ms(t), tag, line));
                if kill && (args.mem_after.is_none() || report.mem_sample.is_some()) {
                    // SAFETY: plain kill(2) of our own child.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let mut status = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `usage` are valid for writes.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    report.wall_ms = ms(Instant::now());
    if r == pid {
        let st = std::process::ExitStatus::from_raw(status);
        report.exit_code = st.code();
        report.signal = st.signal();
        report.max_rss_kib = usage.ru_maxrss;
    }
    // Drain what the pipes still held.
    let _ = child.try_wait();
    if let Some(h) = steps {
        match h.join() {
            Ok((calls, err)) => {
                report.api = calls;
                report.steps_error = err;
            }
            Err(_) => report.steps_error = Some("the steps thread panicked".into()),
        }
    }
    match serde_json::to_string(&report) {
        Ok(s) => println!("{s}"),
        Err(e) => {
            eprintln!("tern-bench: {e}");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_mappings_are_split_from_the_rest() {
        let smaps = "\
7f0000000000-7f0010000000 rw-p 00000000 00:00 0 \n\
Size:             262144 kB\n\
Rss:               20000 kB\n\
55d000000000-55d000100000 r-xp 00000000 08:01 123 /usr/bin/tern\n\
Size:               1024 kB\n\
Rss:                 900 kB\n\
7f1000000000-7f1000200000 rw-p 00000000 00:00 0 \n\
Rss:                 300 kB\n";
        let (total, guest) = split_rss(smaps, 256 << 20);
        assert_eq!(total, 21200);
        assert_eq!(guest, 20000);
    }
}
