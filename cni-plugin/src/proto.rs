//! The registration protocol between `nodemesh-cni` and the node's daemon.
//!
//! Owns the wire types and their framing. Transport: a Unix stream socket
//! (default [`DEFAULT_SOCKET_PATH`]); one request per connection; the request
//! is one JSON object followed by `\n`, and so is the answer. Messages are
//! bounded by [`MAX_MESSAGE_BYTES`]; anything longer, or not valid JSON of
//! these shapes, is refused with [`ErrorCode::BadRequest`].
//!
//! The daemon answers `register` only once the pod's in-netns listeners are
//! listening, and tells the plugin the ports and the socket mark to write into
//! the capture rules, so the two can never disagree.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the daemon listens for registrations unless configured otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/run/nodemesh/cni.sock";
/// Upper bound on one request or response line, newline included.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Default outbound capture port inside each pod (on 127.0.0.1).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default inbound plaintext capture port inside each pod.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Default `SO_MARK` on the daemon's own sockets inside pods (ASCII "NM").
pub const DEFAULT_SOCKET_MARK: u32 = 0x4e4d;

/// A pod as the CNI plugin knows it at ADD time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRegistration {
    /// Container (sandbox) ID from `CNI_CONTAINERID`: the registration key.
    pub container_id: String,
    /// `K8S_POD_UID`, when the runtime gives it.
    #[serde(default)]
    pub pod_uid: Option<String>,
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// Service account, when the caller knows it; otherwise the daemon's
    /// discovery view decides.
    #[serde(default)]
    pub service_account: Option<String>,
    /// Path of the pod's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The pod's addresses, from `prevResult.ips`.
    pub ips: Vec<IpAddr>,
}

/// A request from the plugin to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Create the pod's listeners; answered with [`Response::Registered`].
    Register(PodRegistration),
    /// Close the pod's listeners and connections and forget it. Idempotent.
    Unregister {
        /// The container ID given at register.
        container_id: String,
    },
    /// Is this pod registered with listeners up? Answered with
    /// [`Response::Registered`] or [`ErrorCode::NotRegistered`].
    Check {
        /// The container ID given at register.
        container_id: String,
    },
    /// Is the daemon ready to take pods? Answered with [`Response::Ready`].
    Status,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The pod's listeners are up; capture rules must use these values.
    Registered {
        /// Port of the outbound listener on 127.0.0.1 in the pod.
        outbound_port: u16,
        /// Port of the inbound plaintext listener in the pod.
        inbound_port: u16,
        /// `SO_MARK` the daemon puts on its sockets inside the pod.
        mark: u32,
    },
    /// The daemon's view says this pod is not meshed (for example annotated
    /// `nodemesh.io/inject: disabled`): the plugin passes it through untouched.
    Skipped {
        /// Why the pod is not meshed.
        reason: String,
    },
    /// The pod was unregistered (or was not registered).
    Unregistered,
    /// Readiness of the daemon.
    Ready {
        /// Whether new pods can be registered.
        ready: bool,
        /// Why not, when not.
        #[serde(default)]
        reason: Option<String>,
    },
    /// The request failed.
    Error {
        /// Class of failure.
        code: ErrorCode,
        /// What went wrong, and what to check.
        message: String,
    },
}

/// Classes of registration failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request was not valid JSON of a known shape, or too long.
    BadRequest,
    /// The netns path could not be opened or entered.
    Netns,
    /// A listener could not be created inside the pod.
    Listen,
    /// `check` for a container that is not registered.
    NotRegistered,
    /// The daemon is shutting down or not ready.
    Unavailable,
    /// Anything else on the daemon side.
    Internal,
}

/// Framing errors, on either side.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The message exceeded [`MAX_MESSAGE_BYTES`] without a newline.
    #[error("message longer than {MAX_MESSAGE_BYTES} bytes")]
    TooLong,
    /// The peer closed before a full line arrived.
    #[error("connection closed before a complete message")]
    Truncated,
    /// The line was not valid JSON of the expected shape.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Encodes a message as one JSON line.
pub fn encode_line<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    if line.len() > MAX_MESSAGE_BYTES {
        return Err(FrameError::TooLong);
    }
    Ok(line)
}

/// Decodes one JSON line (with or without its trailing newline).
pub fn decode_line<'a, T: Deserialize<'a>>(line: &'a [u8]) -> Result<T, FrameError> {
    if line.len() > MAX_MESSAGE_BYTES {
        return Err(FrameError::TooLong);
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    Ok(serde_json::from_slice(line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_wire_shape_is_stable() {
        let req = Request::Register(PodRegistration {
            container_id: "c1".into(),
            pod_uid: Some("u1".into()),
            namespace: "default".into(),
            name: "web-0".into(),
            service_account: None,
            netns: "/run/netns/p".into(),
            ips: vec!["10.0.0.2".parse().expect("ip")],
        });
        let line = encode_line(&req).expect("encode");
        assert_eq!(
            std::str::from_utf8(&line).expect("utf8"),
            "{\"op\":\"register\",\"container_id\":\"c1\",\"pod_uid\":\"u1\",\"namespace\":\"default\",\
             \"name\":\"web-0\",\"service_account\":null,\"netns\":\"/run/netns/p\",\"ips\":[\"10.0.0.2\"]}\n"
        );
        let back: Request = decode_line(&line).expect("decode");
        assert_eq!(back, req);
    }

    #[test]
    fn oversized_and_malformed_are_refused() {
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            decode_line::<Request>(&big),
            Err(FrameError::TooLong)
        ));
        assert!(matches!(
            decode_line::<Request>(b"{\"op\":\"explode\"}\n"),
            Err(FrameError::Malformed(_))
        ));
    }
}
