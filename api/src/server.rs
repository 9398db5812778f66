//! The HTTP server on the API Unix socket, in its own thread. Each request is routed
//! (`crate::routes`), handed to the VMM thread as a typed action, and answered with its result.

use std::os::fd::IntoRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use dbs_uhttp::{Body, HttpServer, MediaType, Response, StatusCode, Version};
use vmm::controller::Request;
use vmm_sys_util::eventfd::EventFd;

use crate::routes::{self, Reply, Route};

/// How long a request may wait for the VMM thread.
const VMM_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

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

fn http_response(reply: Reply, version: Version) -> Response {
    let status = match reply.status {
        200 => StatusCode::OK,
        204 => StatusCode::NoContent,
        400 => StatusCode::BadRequest,
        404 => StatusCode::NotFound,
        _ => StatusCode::InternalServerError,
    };
    let mut r = Response::new(version, status);
    r.set_server("tern");
    if let Some(body) = reply.body {
        r.set_content_type(if reply.text {
            MediaType::PlainText
        } else {
            MediaType::ApplicationJson
        });
        r.set_body(Body::new(body));
    }
    r
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
    match rx.recv_timeout(VMM_REPLY_TIMEOUT) {
        Ok(result) => routes::render(result),
        Err(_) => Reply::fault(500, "the VMM thread did not answer"),
    }
}

/// Starts the API thread serving `listener`.
pub fn spawn(
    listener: UnixListener,
    to_vmm: mpsc::Sender<Request>,
    wake: EventFd,
) -> std::io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    // SAFETY: `into_raw_fd` hands over sole ownership of the descriptor, as
    // `new_from_fd` requires; nothing else refers to it afterwards.
    let mut server = HttpServer::new_from_fd(listener.into_raw_fd())
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    server
        .start_server()
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            loop {
                let requests = match server.requests() {
                    Ok(r) => r,
                    Err(e) => {
                        log::warn!("API server: {e:?}");
                        continue;
                    }
                };
                for req in requests {
                    let resp = req.process(|r| {
                        let body = r.body.as_ref().map(|b| b.raw()).unwrap_or(&[]);
                        let (method, path) = (r.method().to_str(), r.uri().get_abs_path());
                        let reply = answer(method, path, body, &to_vmm, &wake);
                        routes::count(method, path, reply.status);
                        http_response(reply, r.http_version())
                    });
                    if let Err(e) = server.respond(resp) {
                        log::warn!("API server: cannot answer: {e:?}");
                    }
                }
            }
        })
}
