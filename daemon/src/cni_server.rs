//! The registration server the CNI plugin talks to.
//!
//! Owns the Unix socket (default `/run/nodemesh/cni.sock`, mode 0600), the
//! [`CniServer`] serving it (stoppable without losing a request, for a
//! hand-over to a successor daemon) and the request/response exchange of
//! `nodemesh_cni::proto`: one bounded JSON line each way per connection. Malformed requests are answered with
//! `bad_request`, logged and counted; they never reach the pod manager.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nodemesh_cni::proto::{
    decode_line, encode_line, ErrorCode, Request, Response, MAX_MESSAGE_BYTES,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admin::Readiness;
use crate::handover::{self, SocketFile};
use crate::metrics as m;
use crate::pods::{PodManager, RegisterError};

/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket with owner-only permissions: on a temporary name, then
/// renamed over `path`, so a stale socket is replaced and a predecessor's
/// running one is taken over atomically (see `handover`).
pub fn bind(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    handover::bind_replacing(path)
}

/// The registration server: started on a listener, stoppable (for a
/// hand-over) without losing a request, and restartable on a new listener.
#[derive(Debug)]
pub struct CniServer {
    pods: Arc<PodManager>,
    ready: Arc<Readiness>,
    shutdown: CancellationToken,
    running: Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    stop: CancellationToken,
    accept: tokio::task::JoinHandle<()>,
    requests: TaskTracker,
    file: SocketFile,
}

impl CniServer {
    /// A server for `pods`; nothing is served until [`CniServer::start`].
    pub fn new(pods: Arc<PodManager>, ready: Arc<Readiness>, shutdown: CancellationToken) -> Self {
        Self {
            pods,
            ready,
            shutdown,
            running: Mutex::new(None),
        }
    }

    /// Serves `listener` (bound at `file`) until [`CniServer::stop`] or shutdown.
    pub async fn start(&self, listener: UnixListener, file: SocketFile) {
        let stop = CancellationToken::new();
        let requests = TaskTracker::new();
        let accept = tokio::spawn(serve(
            listener,
            self.pods.clone(),
            self.ready.clone(),
            self.shutdown.clone(),
            stop.clone(),
            requests.clone(),
        ));
        let previous = self.running.lock().await.replace(Running {
            stop,
            accept,
            requests,
            file,
        });
        if let Some(previous) = previous {
            previous.finish().await;
        }
    }

    /// Stops accepting, serves the connections already queued, and waits
    /// until every request is answered. Idempotent.
    pub async fn stop(&self) {
        let running = self.running.lock().await.take();
        if let Some(running) = running {
            let file = running.file.clone();
            running.finish().await;
            info!(path = %file.path().display(), "CNI server stopped");
        }
    }

    /// Whether this server runs and `cni.sock` still names its socket (a
    /// successor may have renamed its own over it).
    pub async fn serves_the_path(&self) -> bool {
        self.running
            .lock()
            .await
            .as_ref()
            .is_some_and(|r| r.file.is_still_ours())
    }

    /// Removes the socket file if it still is the one this server bound (a
    /// successor's socket renamed over it is left alone).
    pub async fn remove_socket_file(&self) {
        if let Some(running) = self.running.lock().await.as_ref() {
            running.file.remove_if_still_ours();
        }
    }
}

impl Running {
    async fn finish(self) {
        self.stop.cancel();
        let _ = self.accept.await;
        self.requests.close();
        self.requests.wait().await;
    }
}

/// Serves registration requests until `shutdown` or `stop`; on `stop`, the
/// connections already queued are served too.
async fn serve(
    listener: UnixListener,
    pods: Arc<PodManager>,
    ready: Arc<Readiness>,
    shutdown: CancellationToken,
    stop: CancellationToken,
    requests: TaskTracker,
) {
    let spawn = |stream: UnixStream| {
        let (pods, ready) = (pods.clone(), ready.clone());
        requests.spawn(async move {
            if let Err(e) = exchange(stream, &pods, &ready).await {
                debug!(error = %e, "cni client connection failed");
            }
        });
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => spawn(stream),
            Err(e) => {
                warn!(error = %e, "cni socket accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // Clients that connected before the successor's socket replaced the path
    // are queued here; the reactor may not have reported them yet.
    let Ok(std) = listener.into_std() else { return };
    loop {
        match std.accept() {
            Ok((s, _)) => match s
                .set_nonblocking(true)
                .and_then(|()| UnixStream::from_std(s))
            {
                Ok(s) => spawn(s),
                Err(e) => debug!(error = %e, "cannot adopt a queued cni connection"),
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
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
