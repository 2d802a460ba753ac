//! The stream header and status: sans-IO encode/decode (spec: docs/protocol.md).
//!
//! STUB: the API below is the contract; bodies are filled in by the owner.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

/// The only header/status version this build speaks.
pub const VERSION: u8 = 1;
/// Upper bound on the encoded header body (after version and length).
pub const MAX_HEADER_BODY: usize = 1024;
/// Upper bound on a status reason, bytes.
pub const MAX_REASON: usize = 255;

/// Opens every tunnel stream, L1 → L2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// Original destination of the client's TCP connection (pod IP:port).
    pub dst: SocketAddr,
    /// The client pod's address (IP:port of its socket).
    pub src: SocketAddr,
    /// Claimed source identity, `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub src_identity: String,
    /// Flag bits; unknown bits are ignored by receivers.
    pub flags: u16,
    /// Optional trace id.
    pub trace_id: Option<[u8; 16]>,
}

/// Status codes L2 answers a header with; also used as QUIC stream reset codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StatusCode {
    /// Connected; payload follows.
    Ok = 0,
    /// Refused by policy or identity checks.
    Denied = 1,
    /// Destination is not a meshed pod on this node.
    NoRoute = 2,
    /// Connecting to the destination failed.
    ConnectFailed = 3,
    /// The header was malformed or oversized.
    BadHeader = 4,
    /// The header version is not supported.
    UnsupportedVersion = 5,
    /// L2 is shutting down or overloaded.
    Unavailable = 6,
    /// Anything else.
    Internal = 7,
}

/// L2's answer to a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// What happened.
    pub code: StatusCode,
    /// Short machine-readable reason (`source_not_on_peer`, ...), may be empty.
    pub reason: String,
}

/// Why a header or status could not be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// Placeholder until implemented.
    #[error("not implemented")]
    Unimplemented,
}

impl HeaderError {
    /// The status (and stream reset code) this error answers with.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::BadHeader
    }
}

/// Result of decoding from a byte buffer that may hold a partial message.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A whole message, and how many bytes of the buffer it used.
    Complete(T, usize),
    /// At least this many more bytes are needed.
    NeedMore(usize),
}

impl StreamHeader {
    /// Appends the encoded header to `out`.
    pub fn encode(&self, _out: &mut Vec<u8>) -> Result<(), HeaderError> {
        Err(HeaderError::Unimplemented)
    }
    /// Decodes from the start of `buf`.
    pub fn decode(_buf: &[u8]) -> Result<Decoded<Self>, HeaderError> {
        Err(HeaderError::Unimplemented)
    }
}

impl Status {
    /// Appends the encoded status to `out`.
    pub fn encode(&self, _out: &mut Vec<u8>) {}
    /// Decodes from the start of `buf`.
    pub fn decode(_buf: &[u8]) -> Result<Decoded<Self>, HeaderError> {
        Err(HeaderError::Unimplemented)
    }
}

impl StatusCode {
    /// From a wire byte or reset code.
    pub fn from_u64(_v: u64) -> Option<Self> {
        None
    }
    /// Lowercase name for logs and metric labels (`ok`, `denied`, ...).
    pub fn as_str(&self) -> &'static str {
        "internal"
    }
}

/// Reads exactly one header from `r`, never reading past its end.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<StreamHeader, HeaderError> {
    let _ = r.read_u8().await;
    Err(HeaderError::Unimplemented)
}

/// Reads exactly one status from `r`, never reading past its end.
pub async fn read_status<R: AsyncRead + Unpin>(r: &mut R) -> Result<Status, HeaderError> {
    let _ = r.read_u8().await;
    Err(HeaderError::Unimplemented)
}

/// Writes a header (helper for `AsyncWrite` sinks).
pub async fn write_header<W: AsyncWrite + Unpin>(
    _w: &mut W,
    _h: &StreamHeader,
) -> Result<(), HeaderError> {
    Err(HeaderError::Unimplemented)
}
