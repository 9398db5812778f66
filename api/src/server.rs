//! The HTTP server on the API Unix socket, in its own thread. Each request is routed
//! (`crate::routes`), handed to the VMM thread as a typed action, and answered with its result.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use vmm::controller::Request;
use vmm_sys_util::eventfd::EventFd;

use crate::routes::{self, Reply, Route};

/// Largest request body accepted (Firecracker's default limit).
pub const MAX_BODY: usize = 51_200;

/// Errors setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process is serving on the path.
    #[error(
        "--api-sock {0}: another process is already serving on this socket; pick another path or stop it"
    )]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("--api-sock {0}: exists and is not a socket; remove it or pick another path")]
    NotASocket(PathBuf),
    /// An OS call failed.
    #[error("--api-sock {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Binds the API socket at `path` with mode 0600. A stale socket (nobody listening) is
/// replaced; a live one is refused.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let io = |source| ApiError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_path_buf()));
        }
        log::info!("replacing stale API socket {}", path.display());
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

fn respond(request: tiny_http::Request, reply: Reply) {
    let content_type = if reply.text {
        "text/plain; version=0.0.4"
    } else {
        "application/json"
    };
    let result = match reply.body {
        Some(body) => {
            let mut response =
                tiny_http::Response::from_string(body).with_status_code(reply.status);
            if let Ok(header) = tiny_http::Header::from_bytes("Content-Type", content_type) {
                response = response.with_header(header);
            }
            request.respond(response)
        }
        None => request.respond(tiny_http::Response::empty(reply.status)),
    };
    if let Err(e) = result {
        log::debug!("API: cannot answer: {e}");
    }
}

/// Reads the body, refusing one over [`MAX_BODY`].
fn read_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, Reply> {
    let mut body = Vec::new();
    match request
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
    {
        Ok(_) if body.len() > MAX_BODY => Err(Reply::fault(
            400,
            format!("the request body is larger than {MAX_BODY} bytes"),
        )),
        Ok(_) => Ok(body),
        Err(e) => Err(Reply::fault(
            400,
            format!("cannot read the request body: {e}"),
        )),
    }
}

fn answer(
    method: &str,
    path: &str,
    body: &[u8],
    to_vmm: &mpsc::Sender<Request>,
    wake: &EventFd,
) -> Reply {
    let action = match routes::route(method, path, body) {
        Route::Reply(r) => return r,
        Route::Action(a) => a,
    };
    log::debug!("API {method} {path}");
    let (tx, rx) = mpsc::channel();
    if to_vmm.send(Request { action, reply: tx }).is_err() || wake.write(1).is_err() {
        return Reply::fault(500, "the VMM thread is gone");
    }
    // No timeout: the answer says what the VMM thread really did. A long action (a snapshot
    // of a large guest) is answered when it is done, as in Firecracker; an answer given
    // before that would be a guess with the work still going on behind it.
    match rx.recv() {
        Ok(result) => routes::render(result),
        Err(_) => Reply::fault(500, "the VMM thread ended without answering"),
    }
}

/// Starts the API thread serving `listener`.
pub fn spawn(
    listener: UnixListener,
    to_vmm: mpsc::Sender<Request>,
    wake: EventFd,
) -> std::io::Result<JoinHandle<()>> {
    let server = tiny_http::Server::from_listener(listener, None).map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            loop {
                let mut request = match server.recv() {
                    Ok(r) => r,
                    Err(e) => {
                        log::warn!("API server: {e}");
                        continue;
                    }
                };
                let method = request.method().as_str().to_string();
                let path = request.url().to_string();
                let reply = match read_body(&mut request) {
                    Ok(body) => answer(&method, &path, &body, &to_vmm, &wake),
                    Err(reply) => reply,
                };
                routes::count(&method, &path, reply.status);
                respond(request, reply);
            }
        })
}
