//! The registration server the CNI plugin talks to.
//!
//! Owns the Unix socket (default `/run/nodemesh/cni.sock`, mode 0600) and the
//! request/response exchange of `nodemesh_cni::proto`: one bounded JSON line
//! each way per connection. Malformed requests are answered with
//! `bad_request`, logged and counted; they never reach the pod manager.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nodemesh_cni::proto::{
    decode_line, encode_line, ErrorCode, Request, Response, MAX_MESSAGE_BYTES,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::admin::Readiness;
use crate::metrics as m;
use crate::pods::{PodManager, RegisterError};

/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket, replacing a stale one, with owner-only permissions.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves registration requests until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    pods: Arc<PodManager>,
    ready: Arc<Readiness>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let (pods, ready) = (pods.clone(), ready.clone());
                tokio::spawn(async move {
                    if let Err(e) = exchange(stream, &pods, &ready).await {
                        debug!(error = %e, "cni client connection failed");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "cni socket accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn exchange(stream: UnixStream, pods: &PodManager, ready: &Readiness) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = Vec::with_capacity(512);
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new(r)
            .take(MAX_MESSAGE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line),
    )
    .await;
    let response = match read {
        Err(_) => bad_request("no complete request line in time"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if line.len() > MAX_MESSAGE_BYTES => bad_request("request longer than 64 KiB"),
        Ok(Ok(_)) if !line.ends_with(b"\n") => bad_request("request must end with a newline"),
        Ok(Ok(_)) => match decode_line::<Request>(&line) {
            Ok(req) => handle(req, pods, ready).await,
            Err(e) => bad_request(&e.to_string()),
        },
    };
    let out = encode_line(&response).map_err(io::Error::other)?;
    w.write_all(&out).await?;
    w.shutdown().await
}

fn bad_request(msg: &str) -> Response {
    metrics::counter!(m::CNI_REQUESTS, "op" => "unknown", "result" => "bad_request").increment(1);
    warn!(error = msg, "malformed registration request");
    Response::Error {
        code: ErrorCode::BadRequest,
        message: format!("malformed request: {msg}"),
    }
}

/// Handles one decoded request.
pub async fn handle(req: Request, pods: &PodManager, ready: &Readiness) -> Response {
    let (op, resp) = match req {
        Request::Register(reg) => {
            if let Some(reason) = pods.opt_out_reason(&reg) {
                tracing::info!(
                    pod = %format_args!("{}/{}", reg.namespace, reg.name),
                    %reason,
                    "pod not meshed"
                );
                metrics::counter!(m::CNI_REQUESTS, "op" => "register", "result" => "skipped")
                    .increment(1);
                return Response::Skipped { reason };
            }
            let resp = match pods.register(reg).await {
                Ok(()) => {
                    let (outbound_port, inbound_port, mark) = pods.capture_params();
                    Response::Registered {
                        outbound_port,
                        inbound_port,
                        mark,
                    }
                }
                Err(e) => {
                    warn!(error = %e, "pod registration failed");
                    let code = match e {
                        RegisterError::Invalid(_) => ErrorCode::BadRequest,
                        RegisterError::Netns { .. } => ErrorCode::Netns,
                        RegisterError::Listen { .. } => ErrorCode::Listen,
                        RegisterError::ShuttingDown => ErrorCode::Unavailable,
                    };
                    Response::Error {
                        code,
                        message: e.to_string(),
                    }
                }
            };
            ("register", resp)
        }
        Request::Unregister { container_id } => {
            pods.unregister(&container_id).await;
            ("unregister", Response::Unregistered)
        }
        Request::Check { container_id } => {
            let resp = if pods.is_registered(&container_id) {
                let (outbound_port, inbound_port, mark) = pods.capture_params();
                Response::Registered {
                    outbound_port,
                    inbound_port,
                    mark,
                }
            } else {
                Response::Error {
                    code: ErrorCode::NotRegistered,
                    message: format!("container {container_id} is not registered with this daemon"),
                }
            };
            ("check", resp)
        }
        Request::Status => {
            let reasons = ready.not_ready_reasons();
            let resp = Response::Ready {
                ready: reasons.is_empty(),
                reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
            };
            ("status", resp)
        }
    };
    let result = match &resp {
        Response::Error { .. } => "error",
        _ => "ok",
    };
    metrics::counter!(m::CNI_REQUESTS, "op" => op, "result" => result).increment(1);
    resp
}
