//! Host ends of the vsock scenario (Firecracker's hybrid vsock over Unix sockets):
//! `tern-bench vsock-serve PATH N` accepts one connection on PATH (the `<uds_path>_<port>`
//! socket a guest-initiated connection reaches) and echoes N messages;
//! `tern-bench vsock-connect UDS PORT N` connects to the VM through `CONNECT PORT`, retrying
//! until the guest listens, sends N numbered messages and checks each echo.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// Message size, as in tests/guest/vsock-echo.c.
const MSG: usize = 64;

fn message(n: u32) -> [u8; MSG] {
    let mut m = [0u8; MSG];
    let s = format!("seq={n}");
    m[..s.len()].copy_from_slice(s.as_bytes());
    for (i, b) in m.iter_mut().enumerate().skip(16) {
        *b = (n.wrapping_mul(31).wrapping_add(i as u32)) as u8;
    }
    m
}

fn count(arg: Option<&String>) -> Result<u32, String> {
    arg.ok_or("missing message count")?
        .parse()
        .map_err(|e| format!("message count: {e}"))
}

/// `vsock-serve PATH N`.
pub fn serve(args: &[String]) -> Result<String, String> {
    let path = args.first().ok_or("usage: vsock-serve PATH N")?;
    let n = count(args.get(1))?;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| format!("{path}: {e}"))?;
    let (mut s, _) = l.accept().map_err(|e| e.to_string())?;
    let mut m = [0u8; MSG];
    for i in 0..n {
        s.read_exact(&mut m)
            .and_then(|()| s.write_all(&m))
            .map_err(|e| format!("message {i}: {e}"))?;
    }
    Ok(format!("HOST VSOCK SERVER OK {n}"))
}

/// `vsock-connect UDS PORT N`.
pub fn connect(args: &[String]) -> Result<String, String> {
    let (Some(uds), Some(port)) = (args.first(), args.get(1)) else {
        return Err("usage: vsock-connect UDS PORT N".into());
    };
    let n = count(args.get(2))?;
    let deadline = Instant::now() + Duration::from_secs(240);
    let (mut s, host_port) = loop {
        let attempt = || -> std::io::Result<(UnixStream, String)> {
            let mut s = UnixStream::connect(uds)?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            match line.strip_prefix("OK ") {
                Some(p) => Ok((s, p.trim().to_string())),
                None => Err(std::io::Error::other(format!("answer {line:?}"))),
            }
        };
        match attempt() {
            Ok(x) => break x,
            Err(e) if Instant::now() > deadline => return Err(format!("never connected: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let t = Instant::now();
    let mut e = [0u8; MSG];
    for i in 0..n {
        let m = message(i);
        s.write_all(&m)
            .and_then(|()| s.read_exact(&mut e))
            .map_err(|err| format!("message {i}: {err}"))?;
        if e != m {
            return Err(format!("message {i} came back as another"));
        }
    }
    Ok(format!(
        "HOST VSOCK CLIENT OK {n} port {host_port} in {} ms",
        t.elapsed().as_millis()
    ))
}
