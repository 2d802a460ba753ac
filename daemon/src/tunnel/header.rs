//! The stream header and status: sans-IO encode/decode (spec: docs/protocol.md).
//!
//! Owns the two messages that open every tunnel stream: the [`StreamHeader`]
//! L1 writes first (destination, source address, claimed source identity,
//! flags, trace id) and the [`Status`] L2 answers with before any payload.
//! Encoding and decoding work on byte buffers and never panic; the async
//! helpers ([`read_header`], [`read_status`], [`write_header`],
//! [`write_status`]) are thin wrappers that read exactly one message so the
//! payload that follows is left in the stream.
//!
//! Header wire format (all integers big-endian):
//!
//! ```text
//! version u8 (=1) | body_len u16 (<= 1024) | body: TLV fields, each  type u8 | len u8 | value
//! ```
//!
//! Status wire format: `version u8 (=1) | code u8 | reason_len u8 | reason (printable ASCII)`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The only header/status version this build speaks.
pub const VERSION: u8 = 1;
/// Upper bound on the encoded header body (after version and length).
pub const MAX_HEADER_BODY: usize = 1024;
/// Upper bound on a status reason, bytes.
pub const MAX_REASON: usize = 255;
/// Upper bound on the source identity, bytes (a TLV value length is one byte).
pub const MAX_IDENTITY: usize = 255;
/// Every source identity starts with this.
pub const IDENTITY_PREFIX: &str = "spiffe://";

/// Bytes before the header body: version and body length.
const HEADER_PREFIX: usize = 3;
/// Bytes before the status reason: version, code and reason length.
const STATUS_PREFIX: usize = 3;
/// Bytes before a TLV value: type and length.
const TLV_PREFIX: usize = 2;
/// Types at or above this are optional: receivers that do not know them skip them.
const FIRST_OPTIONAL_TYPE: u8 = 128;
/// Address family byte of an IPv4 address.
const FAMILY_V4: u8 = 4;
/// Address family byte of an IPv6 address.
const FAMILY_V6: u8 = 6;
/// Encoded address length: family + 4 address bytes + port.
const ADDR_V4_LEN: usize = 1 + 4 + 2;
/// Encoded address length: family + 16 address bytes + port.
const ADDR_V6_LEN: usize = 1 + 16 + 2;

/// The typed fields of a header body, by wire type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FieldKind {
    /// Type 1: destination address (required).
    Dst = 1,
    /// Type 2: source address (required).
    Src = 2,
    /// Type 3: source identity (required).
    SrcIdentity = 3,
    /// Type 4: flags, u16 (optional).
    Flags = 4,
    /// Type 5: trace id, 16 bytes (optional).
    TraceId = 5,
}

impl FieldKind {
    /// The known field with wire type `kind`.
    pub fn from_u8(kind: u8) -> Option<Self> {
        match kind {
            1 => Some(Self::Dst),
            2 => Some(Self::Src),
            3 => Some(Self::SrcIdentity),
            4 => Some(Self::Flags),
            5 => Some(Self::TraceId),
            _ => None,
        }
    }

    /// Field name for errors and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Dst => "dst",
            Self::Src => "src",
            Self::SrcIdentity => "src_identity",
            Self::Flags => "flags",
            Self::TraceId => "trace_id",
        }
    }
}

impl std::fmt::Display for FieldKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Opens every tunnel stream, L1 → L2.
///
/// IPv6 flow info and scope id are not carried: they are meaningful only on
/// the host that made them, and decode as zero.
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
    ///
    /// On the wire: at most [`MAX_REASON`] bytes of printable ASCII
    /// (0x20..=0x7E). [`Status::encode`] truncates a longer reason and
    /// replaces other characters with `?`.
    pub reason: String,
}

/// Why a header or status could not be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The first byte names a version this build does not speak.
    #[error("unsupported version {version} (this build speaks {VERSION})")]
    UnsupportedVersion {
        /// The version byte received.
        version: u8,
    },
    /// The declared header body is longer than the limit.
    #[error("header body of {len} bytes exceeds the limit of {max}")]
    BodyTooLong {
        /// Declared body length.
        len: usize,
        /// The limit, [`MAX_HEADER_BODY`].
        max: usize,
    },
    /// One or two bytes are left at the end of the body: too few for a field.
    #[error("{len} trailing byte(s) at the end of the header body")]
    TrailingBytes {
        /// How many bytes were left over.
        len: usize,
    },
    /// A field's declared value length runs past the end of the body.
    #[error(
        "field type {kind} declares {len} value bytes but only {remaining} remain in the body"
    )]
    FieldOverrunsBody {
        /// The field's wire type.
        kind: u8,
        /// The declared value length.
        len: usize,
        /// Body bytes left after the field's type and length.
        remaining: usize,
    },
    /// A required field is absent.
    #[error("required field {field} is missing")]
    MissingField {
        /// The missing field.
        field: FieldKind,
    },
    /// A field appears twice.
    #[error("field {field} appears more than once")]
    DuplicateField {
        /// The repeated field.
        field: FieldKind,
    },
    /// A field's value has the wrong length for its type.
    #[error("field {field} has invalid length {len}")]
    FieldLength {
        /// The field.
        field: FieldKind,
        /// Its value length.
        len: usize,
    },
    /// An address field names a family other than 4 or 6.
    #[error("field {field} has unknown address family {family}")]
    BadAddressFamily {
        /// The address field.
        field: FieldKind,
        /// The family byte received.
        family: u8,
    },
    /// The source identity is not valid UTF-8.
    #[error("source identity is not valid UTF-8")]
    IdentityNotUtf8,
    /// The source identity is empty.
    #[error("source identity is empty")]
    IdentityEmpty,
    /// The source identity does not start with `spiffe://`.
    #[error("source identity {identity:?} does not start with {IDENTITY_PREFIX}")]
    IdentityNotSpiffe {
        /// The identity received or given.
        identity: String,
    },
    /// The source identity is too long to encode.
    #[error("source identity of {len} bytes exceeds the limit of {max}")]
    IdentityTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit, [`MAX_IDENTITY`].
        max: usize,
    },
    /// A field type below 128 that this build does not know.
    #[error("unknown critical field type {kind}")]
    UnknownCriticalField {
        /// The field's wire type.
        kind: u8,
    },
    /// A status carries a code this build does not know.
    #[error("unknown status code {code}")]
    UnknownStatusCode {
        /// The code byte received.
        code: u8,
    },
    /// A status reason byte is not printable ASCII.
    #[error("status reason byte {byte:#04x} at offset {offset} is not printable ASCII")]
    ReasonNotPrintable {
        /// The offending byte.
        byte: u8,
        /// Its offset in the reason.
        offset: usize,
    },
    /// Reading or writing the stream failed (including EOF mid-message).
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl HeaderError {
    /// The status (and stream reset code) this error answers with.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::UnsupportedVersion { .. } => StatusCode::UnsupportedVersion,
            _ => StatusCode::BadHeader,
        }
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

fn check_version(version: u8) -> Result<(), HeaderError> {
    if version == VERSION {
        Ok(())
    } else {
        Err(HeaderError::UnsupportedVersion { version })
    }
}

/// The identity rules shared by encode and decode.
fn check_identity(identity: &str) -> Result<(), HeaderError> {
    if identity.is_empty() {
        return Err(HeaderError::IdentityEmpty);
    }
    if identity.len() > MAX_IDENTITY {
        return Err(HeaderError::IdentityTooLong {
            len: identity.len(),
            max: MAX_IDENTITY,
        });
    }
    if !identity.starts_with(IDENTITY_PREFIX) {
        return Err(HeaderError::IdentityNotSpiffe {
            identity: identity.to_owned(),
        });
    }
    Ok(())
}

fn addr_len(addr: &SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => ADDR_V4_LEN,
        SocketAddr::V6(_) => ADDR_V6_LEN,
    }
}

fn put_addr(out: &mut Vec<u8>, kind: FieldKind, addr: &SocketAddr) {
    out.push(kind as u8);
    // Lengths are 7 or 19: they fit a u8.
    out.push(addr_len(addr) as u8);
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn parse_addr(field: FieldKind, value: &[u8]) -> Result<SocketAddr, HeaderError> {
    let (&family, rest) = value
        .split_first()
        .ok_or(HeaderError::FieldLength { field, len: 0 })?;
    let bad_len = HeaderError::FieldLength {
        field,
        len: value.len(),
    };
    match family {
        FAMILY_V4 => {
            let bytes: &[u8; 6] = rest.try_into().map_err(|_| bad_len)?;
            let ip = Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]);
            let port = u16::from_be_bytes([bytes[4], bytes[5]]);
            Ok(SocketAddr::new(IpAddr::V4(ip), port))
        }
        FAMILY_V6 => {
            let bytes: &[u8; 18] = rest.try_into().map_err(|_| bad_len)?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&bytes[..16]);
            let port = u16::from_be_bytes([bytes[16], bytes[17]]);
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        family => Err(HeaderError::BadAddressFamily { field, family }),
    }
}

/// Sets a once-only field, rejecting a repeat.
fn set_once<T>(slot: &mut Option<T>, field: FieldKind, value: T) -> Result<(), HeaderError> {
    if slot.is_some() {
        return Err(HeaderError::DuplicateField { field });
    }
    *slot = Some(value);
    Ok(())
}

impl StreamHeader {
    /// The number of bytes [`StreamHeader::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        HEADER_PREFIX + self.body_len()
    }

    fn body_len(&self) -> usize {
        let mut len = TLV_PREFIX + addr_len(&self.dst);
        len += TLV_PREFIX + addr_len(&self.src);
        len += TLV_PREFIX + self.src_identity.len();
        if self.flags != 0 {
            len += TLV_PREFIX + 2;
        }
        if self.trace_id.is_some() {
            len += TLV_PREFIX + 16;
        }
        len
    }

    /// Appends the encoded header to `out`.
    ///
    /// Fields are written in type order; `flags` only when non-zero and the
    /// trace id only when present. Fails, leaving `out` unchanged, when the
    /// identity breaks the rules a receiver enforces.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), HeaderError> {
        check_identity(&self.src_identity)?;
        let body_len = self.body_len();
        // At most 2+19 + 2+19 + 2+255 + 2+2 + 2+16 = 321 bytes.
        if body_len > MAX_HEADER_BODY {
            return Err(HeaderError::BodyTooLong {
                len: body_len,
                max: MAX_HEADER_BODY,
            });
        }
        out.reserve(HEADER_PREFIX + body_len);
        out.push(VERSION);
        // body_len <= MAX_HEADER_BODY < u16::MAX.
        out.extend_from_slice(&(body_len as u16).to_be_bytes());
        put_addr(out, FieldKind::Dst, &self.dst);
        put_addr(out, FieldKind::Src, &self.src);
        out.push(FieldKind::SrcIdentity as u8);
        // checked above: <= MAX_IDENTITY = 255.
        out.push(self.src_identity.len() as u8);
        out.extend_from_slice(self.src_identity.as_bytes());
        if self.flags != 0 {
            out.push(FieldKind::Flags as u8);
            out.push(2);
            out.extend_from_slice(&self.flags.to_be_bytes());
        }
        if let Some(trace_id) = &self.trace_id {
            out.push(FieldKind::TraceId as u8);
            out.push(16);
            out.extend_from_slice(trace_id);
        }
        Ok(())
    }

    /// Decodes from the start of `buf`.
    ///
    /// Errors as soon as the bytes present are known to be invalid (a wrong
    /// version after one byte, an oversized length after three); otherwise
    /// `NeedMore` until the whole declared body is present. Bytes after the
    /// header are not looked at.
    pub fn decode(buf: &[u8]) -> Result<Decoded<Self>, HeaderError> {
        let Some(&version) = buf.first() else {
            return Ok(Decoded::NeedMore(HEADER_PREFIX));
        };
        check_version(version)?;
        let Some(&[len_hi, len_lo]) = buf.get(1..HEADER_PREFIX) else {
            return Ok(Decoded::NeedMore(HEADER_PREFIX - buf.len()));
        };
        let body_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        check_body_len(body_len)?;
        let total = HEADER_PREFIX + body_len;
        match buf.get(HEADER_PREFIX..total) {
            Some(body) => Ok(Decoded::Complete(Self::decode_body(body)?, total)),
            None => Ok(Decoded::NeedMore(total - buf.len())),
        }
    }

    /// Decodes a whole header body (the bytes after version and length).
    fn decode_body(body: &[u8]) -> Result<Self, HeaderError> {
        let mut dst = None;
        let mut src = None;
        let mut identity = None;
        let mut flags = None;
        let mut trace_id = None;
        let mut rest = body;
        while !rest.is_empty() {
            let [kind, len, tail @ ..] = rest else {
                return Err(HeaderError::TrailingBytes { len: rest.len() });
            };
            let (kind, len) = (*kind, usize::from(*len));
            let Some(value) = tail.get(..len) else {
                return Err(HeaderError::FieldOverrunsBody {
                    kind,
                    len,
                    remaining: tail.len(),
                });
            };
            rest = &tail[len..];
            let Some(field) = FieldKind::from_u8(kind) else {
                if kind >= FIRST_OPTIONAL_TYPE {
                    continue;
                }
                return Err(HeaderError::UnknownCriticalField { kind });
            };
            match field {
                FieldKind::Dst => set_once(&mut dst, field, parse_addr(field, value)?)?,
                FieldKind::Src => set_once(&mut src, field, parse_addr(field, value)?)?,
                FieldKind::SrcIdentity => {
                    if identity.is_some() {
                        return Err(HeaderError::DuplicateField { field });
                    }
                    let text =
                        std::str::from_utf8(value).map_err(|_| HeaderError::IdentityNotUtf8)?;
                    check_identity(text)?;
                    identity = Some(text.to_owned());
                }
                FieldKind::Flags => {
                    let bytes: [u8; 2] =
                        value.try_into().map_err(|_| HeaderError::FieldLength {
                            field,
                            len: value.len(),
                        })?;
                    set_once(&mut flags, field, u16::from_be_bytes(bytes))?;
                }
                FieldKind::TraceId => {
                    let bytes: [u8; 16] =
                        value.try_into().map_err(|_| HeaderError::FieldLength {
                            field,
                            len: value.len(),
                        })?;
                    set_once(&mut trace_id, field, bytes)?;
                }
            }
        }
        Ok(Self {
            dst: dst.ok_or(HeaderError::MissingField {
                field: FieldKind::Dst,
            })?,
            src: src.ok_or(HeaderError::MissingField {
                field: FieldKind::Src,
            })?,
            src_identity: identity.ok_or(HeaderError::MissingField {
                field: FieldKind::SrcIdentity,
            })?,
            flags: flags.unwrap_or(0),
            trace_id,
        })
    }
}

fn check_body_len(len: usize) -> Result<(), HeaderError> {
    if len > MAX_HEADER_BODY {
        return Err(HeaderError::BodyTooLong {
            len,
            max: MAX_HEADER_BODY,
        });
    }
    Ok(())
}

fn is_reason_byte(b: u8) -> bool {
    (0x20..=0x7e).contains(&b)
}

impl Status {
    /// A status with code `code` and an empty reason.
    pub fn new(code: StatusCode) -> Self {
        Self {
            code,
            reason: String::new(),
        }
    }

    /// The number of bytes [`Status::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        STATUS_PREFIX + self.reason.len().min(MAX_REASON)
    }

    /// Appends the encoded status to `out`.
    ///
    /// The reason is truncated to [`MAX_REASON`] bytes and any byte that is
    /// not printable ASCII is written as `?`, so this cannot fail.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let reason = &self.reason.as_bytes()[..self.reason.len().min(MAX_REASON)];
        out.reserve(STATUS_PREFIX + reason.len());
        out.push(VERSION);
        out.push(self.code as u8);
        // <= MAX_REASON = 255.
        out.push(reason.len() as u8);
        out.extend(
            reason
                .iter()
                .map(|&b| if is_reason_byte(b) { b } else { b'?' }),
        );
    }

    /// Decodes from the start of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Decoded<Self>, HeaderError> {
        let Some(&version) = buf.first() else {
            return Ok(Decoded::NeedMore(STATUS_PREFIX));
        };
        check_version(version)?;
        let Some(&[code, reason_len]) = buf.get(1..STATUS_PREFIX) else {
            return Ok(Decoded::NeedMore(STATUS_PREFIX - buf.len()));
        };
        let code = parse_code(code)?;
        let total = STATUS_PREFIX + usize::from(reason_len);
        match buf.get(STATUS_PREFIX..total) {
            Some(reason) => Ok(Decoded::Complete(
                Self {
                    code,
                    reason: parse_reason(reason)?,
                },
                total,
            )),
            None => Ok(Decoded::NeedMore(total - buf.len())),
        }
    }
}

fn parse_code(code: u8) -> Result<StatusCode, HeaderError> {
    StatusCode::from_u64(u64::from(code)).ok_or(HeaderError::UnknownStatusCode { code })
}

fn parse_reason(reason: &[u8]) -> Result<String, HeaderError> {
    if let Some(offset) = reason.iter().position(|&b| !is_reason_byte(b)) {
        return Err(HeaderError::ReasonNotPrintable {
            byte: reason[offset],
            offset,
        });
    }
    // Printable ASCII is UTF-8.
    Ok(reason.iter().map(|&b| char::from(b)).collect())
}

impl StatusCode {
    /// Every status code, in wire order.
    pub const ALL: [StatusCode; 8] = [
        Self::Ok,
        Self::Denied,
        Self::NoRoute,
        Self::ConnectFailed,
        Self::BadHeader,
        Self::UnsupportedVersion,
        Self::Unavailable,
        Self::Internal,
    ];

    /// From a wire byte or reset code.
    pub fn from_u64(v: u64) -> Option<Self> {
        let v = usize::try_from(v).ok()?;
        Self::ALL.get(v).copied()
    }

    /// Lowercase name for logs and metric labels (`ok`, `denied`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Denied => "denied",
            Self::NoRoute => "no_route",
            Self::ConnectFailed => "connect_failed",
            Self::BadHeader => "bad_header",
            Self::UnsupportedVersion => "unsupported_version",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

impl std::fmt::Display for StatusCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads exactly one header from `r`, never reading past its end.
///
/// Reads the version byte, then the length, then exactly the declared body,
/// so a wrong version or an oversized length is refused before the body is
/// read. EOF before the end of the header is [`HeaderError::Io`].
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<StreamHeader, HeaderError> {
    check_version(r.read_u8().await?)?;
    let body_len = usize::from(r.read_u16().await?);
    check_body_len(body_len)?;
    // On the heap, briefly: an array here would sit in the state of every
    // connection task that awaits this (1 KiB each, for the connection's life).
    let mut body = vec![0u8; body_len];
    r.read_exact(&mut body).await?;
    StreamHeader::decode_body(&body)
}

/// Reads exactly one status from `r`, never reading past its end.
pub async fn read_status<R: AsyncRead + Unpin>(r: &mut R) -> Result<Status, HeaderError> {
    check_version(r.read_u8().await?)?;
    let mut prefix = [0u8; STATUS_PREFIX - 1];
    r.read_exact(&mut prefix).await?;
    let [code, reason_len] = prefix;
    let code = parse_code(code)?;
    // On the heap, as in `read_header`.
    let mut reason = vec![0u8; usize::from(reason_len)];
    r.read_exact(&mut reason).await?;
    Ok(Status {
        code,
        reason: parse_reason(&reason)?,
    })
}

/// Writes a header (helper for `AsyncWrite` sinks).
pub async fn write_header<W: AsyncWrite + Unpin>(
    w: &mut W,
    h: &StreamHeader,
) -> Result<(), HeaderError> {
    let mut buf = Vec::with_capacity(h.encoded_len());
    h.encode(&mut buf)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Writes a status (helper for `AsyncWrite` sinks).
pub async fn write_status<W: AsyncWrite + Unpin>(w: &mut W, s: &Status) -> Result<(), HeaderError> {
    let mut buf = Vec::with_capacity(s.encoded_len());
    s.encode(&mut buf);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use proptest::prelude::*;
    use tokio::io::ReadBuf;

    use super::*;

    const ID_WEB: &str = "spiffe://cluster.local/ns/default/sa/web";

    fn v4_header() -> StreamHeader {
        StreamHeader {
            dst: "10.42.1.7:80".parse().expect("addr"),
            src: "10.42.0.5:43210".parse().expect("addr"),
            src_identity: ID_WEB.to_owned(),
            flags: 0x0001,
            trace_id: Some([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]),
        }
    }

    /// The v4 header, written out by hand (also the worked example in docs/protocol.md).
    fn v4_bytes() -> Vec<u8> {
        let mut b = vec![
            0x01, 0x00, 0x52, // version 1, body 82 bytes
            0x01, 0x07, 0x04, 10, 42, 1, 7, 0x00, 0x50, // dst 10.42.1.7:80
            0x02, 0x07, 0x04, 10, 42, 0, 5, 0xa8, 0xca, // src 10.42.0.5:43210
            0x03, 0x28, // identity, 40 bytes
        ];
        b.extend_from_slice(ID_WEB.as_bytes());
        b.extend_from_slice(&[0x04, 0x02, 0x00, 0x01]); // flags 0x0001
        b.extend_from_slice(&[0x05, 0x10]); // trace id
        b.extend(0u8..16);
        b
    }

    fn v6_header() -> StreamHeader {
        StreamHeader {
            dst: "[fd00:10:42::1:7]:8080".parse().expect("addr"),
            src: "[fd00:10:42::5]:5000".parse().expect("addr"),
            src_identity: "spiffe://cluster.local/ns/a/sa/b".to_owned(),
            flags: 0,
            trace_id: None,
        }
    }

    fn v6_bytes() -> Vec<u8> {
        let mut b = vec![0x01, 0x00, 0x4c]; // version 1, body 76 bytes
        b.extend_from_slice(&[0x01, 0x13, 0x06]); // dst, 19 bytes, IPv6
        b.extend_from_slice(&[
            0xfd, 0, 0, 0x10, 0, 0x42, 0, 0, 0, 0, 0, 0, 0, 0x01, 0, 0x07,
        ]);
        b.extend_from_slice(&[0x1f, 0x90]); // port 8080
        b.extend_from_slice(&[0x02, 0x13, 0x06]); // src, 19 bytes, IPv6
        b.extend_from_slice(&[0xfd, 0, 0, 0x10, 0, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x05]);
        b.extend_from_slice(&[0x13, 0x88]); // port 5000
        b.extend_from_slice(&[0x03, 0x20]);
        b.extend_from_slice(b"spiffe://cluster.local/ns/a/sa/b");
        b
    }

    fn encode(h: &StreamHeader) -> Vec<u8> {
        let mut out = Vec::new();
        h.encode(&mut out).expect("encodable");
        out
    }

    /// A header message around the given raw body.
    fn with_body(body: &[u8]) -> Vec<u8> {
        let len = u16::try_from(body.len()).expect("short body");
        let mut b = vec![VERSION];
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(body);
        b
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut b = vec![kind, u8::try_from(value.len()).expect("short value")];
        b.extend_from_slice(value);
        b
    }

    fn dst_tlv() -> Vec<u8> {
        tlv(1, &[4, 10, 42, 1, 7, 0, 80])
    }
    fn src_tlv() -> Vec<u8> {
        tlv(2, &[4, 10, 42, 0, 5, 0xa8, 0xca])
    }
    fn id_tlv() -> Vec<u8> {
        tlv(3, ID_WEB.as_bytes())
    }

    fn decode_err(buf: &[u8]) -> HeaderError {
        match StreamHeader::decode(buf) {
            Err(e) => e,
            Ok(d) => panic!("expected an error, got {d:?}"),
        }
    }

    fn body_err(parts: &[Vec<u8>]) -> HeaderError {
        decode_err(&with_body(&parts.concat()))
    }

    #[test]
    fn v4_header_encodes_byte_exact() {
        let h = v4_header();
        assert_eq!(encode(&h), v4_bytes());
        assert_eq!(h.encoded_len(), v4_bytes().len());
    }

    #[test]
    fn v6_header_encodes_byte_exact() {
        let h = v6_header();
        assert_eq!(encode(&h), v6_bytes());
        assert_eq!(h.encoded_len(), v6_bytes().len());
    }

    #[test]
    fn headers_decode_from_hand_written_bytes() {
        for (h, b) in [(v4_header(), v4_bytes()), (v6_header(), v6_bytes())] {
            assert_eq!(
                StreamHeader::decode(&b).expect("valid"),
                Decoded::Complete(h, b.len())
            );
        }
    }

    #[test]
    fn encode_appends_to_existing_bytes() {
        let mut out = vec![0xaa];
        v6_header().encode(&mut out).expect("encodable");
        assert_eq!(out[0], 0xaa);
        assert_eq!(&out[1..], v6_bytes().as_slice());
    }

    #[test]
    fn decode_stops_at_the_end_of_the_header() {
        let mut b = v4_bytes();
        let len = b.len();
        b.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            StreamHeader::decode(&b).expect("valid"),
            Decoded::Complete(v4_header(), len)
        );
    }

    #[test]
    fn header_partial_buffers_need_more_at_every_split_point() {
        for full in [v4_bytes(), v6_bytes()] {
            for k in 0..full.len() {
                let expected = if k < 3 { 3 - k } else { full.len() - k };
                assert_eq!(
                    StreamHeader::decode(&full[..k]).expect("valid prefix"),
                    Decoded::NeedMore(expected),
                    "split at {k}"
                );
            }
        }
    }

    #[test]
    fn fields_are_accepted_in_any_order_and_optional_ones_default() {
        let b = with_body(&[id_tlv(), src_tlv(), dst_tlv()].concat());
        let Decoded::Complete(h, n) = StreamHeader::decode(&b).expect("valid") else {
            panic!("complete")
        };
        assert_eq!(n, b.len());
        assert_eq!(h.flags, 0);
        assert_eq!(h.trace_id, None);
        assert_eq!(h.dst, "10.42.1.7:80".parse().expect("addr"));
    }

    #[test]
    fn zero_flags_field_is_accepted() {
        let b = with_body(&[dst_tlv(), src_tlv(), id_tlv(), tlv(4, &[0, 0])].concat());
        assert!(matches!(
            StreamHeader::decode(&b),
            Ok(Decoded::Complete(StreamHeader { flags: 0, .. }, _))
        ));
    }

    #[test]
    fn unknown_optional_fields_are_skipped() {
        let b = with_body(
            &[
                tlv(200, b"xyz"),
                dst_tlv(),
                tlv(128, &[]),
                src_tlv(),
                id_tlv(),
                tlv(255, &[1; 255]),
            ]
            .concat(),
        );
        let Decoded::Complete(h, _) = StreamHeader::decode(&b).expect("valid") else {
            panic!("complete")
        };
        assert_eq!(h.src_identity, ID_WEB);
    }

    #[test]
    fn ipv6_scope_and_flowinfo_are_not_carried() {
        let mut h = v6_header();
        h.dst = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().expect("ip"),
            80,
            7,
            3,
        ));
        let Decoded::Complete(back, _) = StreamHeader::decode(&encode(&h)).expect("valid") else {
            panic!("complete")
        };
        assert_eq!(
            back.dst,
            "[fe80::1]:80".parse::<SocketAddr>().expect("addr")
        );
    }

    #[test]
    fn wrong_versions_are_rejected_from_the_first_byte() {
        for version in [0u8, 2, 255] {
            assert!(
                matches!(decode_err(&[version]), HeaderError::UnsupportedVersion { version: v } if v == version)
            );
            let s = [version, 0, 0];
            assert!(matches!(
                Status::decode(&s),
                Err(HeaderError::UnsupportedVersion { .. })
            ));
        }
        assert_eq!(
            decode_err(&[2]).status_code(),
            StatusCode::UnsupportedVersion
        );
    }

    #[test]
    fn oversized_body_is_rejected_from_the_length() {
        let e = decode_err(&[1, 0x04, 0x01]);
        assert!(
            matches!(
                e,
                HeaderError::BodyTooLong {
                    len: 1025,
                    max: 1024
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.status_code(), StatusCode::BadHeader);
        assert!(matches!(
            decode_err(&[1, 0xff, 0xff]),
            HeaderError::BodyTooLong { len: 65535, .. }
        ));
        // Exactly the limit is allowed (and here made of skipped optional fields).
        let mut body = Vec::new();
        body.extend([dst_tlv(), src_tlv(), id_tlv()].concat());
        while body.len() < MAX_HEADER_BODY {
            let room = (MAX_HEADER_BODY - body.len() - 2).min(255);
            body.extend(tlv(130, &vec![0; room]));
        }
        assert_eq!(body.len(), MAX_HEADER_BODY);
        assert!(matches!(
            StreamHeader::decode(&with_body(&body)),
            Ok(Decoded::Complete(..))
        ));
    }

    #[test]
    fn trailing_bytes_inside_the_body_are_rejected() {
        // One byte cannot start a field (a field needs its type and length).
        for extra in [0x80u8, 0x01, 0x05] {
            let e = body_err(&[dst_tlv(), src_tlv(), id_tlv(), vec![extra]]);
            assert!(matches!(e, HeaderError::TrailingBytes { len: 1 }), "{e:?}");
        }
    }

    #[test]
    fn field_overrunning_the_body_is_rejected() {
        let e = body_err(&[dst_tlv(), vec![2, 7, 4, 10]]);
        assert!(
            matches!(
                e,
                HeaderError::FieldOverrunsBody {
                    kind: 2,
                    len: 7,
                    remaining: 2
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn missing_required_fields_are_named() {
        for (parts, missing) in [
            (vec![src_tlv(), id_tlv()], FieldKind::Dst),
            (vec![dst_tlv(), id_tlv()], FieldKind::Src),
            (vec![dst_tlv(), src_tlv()], FieldKind::SrcIdentity),
            (vec![], FieldKind::Dst),
        ] {
            let e = body_err(&parts);
            assert!(
                matches!(e, HeaderError::MissingField { field } if field == missing),
                "{e:?}"
            );
        }
    }

    #[test]
    fn duplicate_fields_are_named() {
        for (dup, field) in [
            (dst_tlv(), FieldKind::Dst),
            (src_tlv(), FieldKind::Src),
            (id_tlv(), FieldKind::SrcIdentity),
            (tlv(4, &[0, 1]), FieldKind::Flags),
            (tlv(5, &[0; 16]), FieldKind::TraceId),
        ] {
            let e = body_err(&[dst_tlv(), src_tlv(), id_tlv(), dup.clone(), dup]);
            assert!(
                matches!(e, HeaderError::DuplicateField { field: f } if f == field),
                "{e:?}"
            );
        }
    }

    #[test]
    fn wrong_field_lengths_are_named() {
        for (bad, field, len) in [
            (tlv(1, &[4, 10, 42, 1, 7, 0, 80, 0]), FieldKind::Dst, 8),
            (tlv(1, &[4, 10, 42, 1, 7, 0]), FieldKind::Dst, 6),
            (tlv(1, &[]), FieldKind::Dst, 0),
            (tlv(2, &[6, 0, 0, 0, 0, 0, 0, 0]), FieldKind::Src, 8),
            (tlv(4, &[1]), FieldKind::Flags, 1),
            (tlv(4, &[0, 0, 1]), FieldKind::Flags, 3),
            (tlv(5, &[0; 15]), FieldKind::TraceId, 15),
        ] {
            let mut parts = vec![bad];
            if field != FieldKind::Dst {
                parts.push(dst_tlv());
            }
            if field != FieldKind::Src {
                parts.push(src_tlv());
            }
            parts.push(id_tlv());
            let e = body_err(&parts);
            assert!(
                matches!(e, HeaderError::FieldLength { field: f, len: l } if f == field && l == len),
                "{e:?}"
            );
        }
    }

    #[test]
    fn bad_address_family_is_named() {
        let e = body_err(&[tlv(1, &[5, 10, 42, 1, 7, 0, 80]), src_tlv(), id_tlv()]);
        assert!(
            matches!(
                e,
                HeaderError::BadAddressFamily {
                    field: FieldKind::Dst,
                    family: 5
                }
            ),
            "{e:?}"
        );
        let e = body_err(&[dst_tlv(), tlv(2, &[0; 7]), id_tlv()]);
        assert!(
            matches!(
                e,
                HeaderError::BadAddressFamily {
                    field: FieldKind::Src,
                    family: 0
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn bad_identities_are_rejected() {
        let e = body_err(&[dst_tlv(), src_tlv(), tlv(3, b"spiffe://\xff\xfe")]);
        assert!(matches!(e, HeaderError::IdentityNotUtf8), "{e:?}");
        let e = body_err(&[dst_tlv(), src_tlv(), tlv(3, b"")]);
        assert!(matches!(e, HeaderError::IdentityEmpty), "{e:?}");
        let e = body_err(&[dst_tlv(), src_tlv(), tlv(3, b"https://example")]);
        assert!(
            matches!(e, HeaderError::IdentityNotSpiffe { ref identity } if identity == "https://example"),
            "{e:?}"
        );
        let e = body_err(&[dst_tlv(), src_tlv(), tlv(3, b"SPIFFE://upper/case")]);
        assert!(matches!(e, HeaderError::IdentityNotSpiffe { .. }), "{e:?}");
    }

    #[test]
    fn unknown_critical_fields_are_rejected() {
        for kind in [0u8, 6, 127] {
            let e = body_err(&[dst_tlv(), src_tlv(), id_tlv(), tlv(kind, &[1, 2])]);
            assert!(
                matches!(e, HeaderError::UnknownCriticalField { kind: k } if k == kind),
                "{e:?}"
            );
        }
    }

    #[test]
    fn encode_rejects_unrepresentable_identities_and_leaves_out_unchanged() {
        let cases = [
            (format!("spiffe://{}", "a".repeat(247)), "IdentityTooLong"),
            (String::new(), "IdentityEmpty"),
            ("web".to_owned(), "IdentityNotSpiffe"),
        ];
        for (identity, want) in cases {
            let h = StreamHeader {
                src_identity: identity,
                ..v4_header()
            };
            let mut out = vec![9];
            let e = h.encode(&mut out).expect_err("unencodable");
            let got = match e {
                HeaderError::IdentityTooLong { len: 256, max: 255 } => "IdentityTooLong",
                HeaderError::IdentityEmpty => "IdentityEmpty",
                HeaderError::IdentityNotSpiffe { .. } => "IdentityNotSpiffe",
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(got, want);
            assert_eq!(out, vec![9]);
        }
        // 255 bytes is the largest that fits.
        let h = StreamHeader {
            src_identity: format!("spiffe://{}", "a".repeat(246)),
            ..v4_header()
        };
        let b = encode(&h);
        assert_eq!(
            StreamHeader::decode(&b).expect("valid"),
            Decoded::Complete(h, b.len())
        );
    }

    #[test]
    fn statuses_encode_byte_exact() {
        let mut out = Vec::new();
        Status::new(StatusCode::Ok).encode(&mut out);
        assert_eq!(out, [0x01, 0x00, 0x00]);

        let denied = Status {
            code: StatusCode::Denied,
            reason: "source_not_on_peer".to_owned(),
        };
        let mut want = vec![0x01, 0x01, 0x12];
        want.extend_from_slice(b"source_not_on_peer");
        let mut out = Vec::new();
        denied.encode(&mut out);
        assert_eq!(out, want);
        assert_eq!(denied.encoded_len(), want.len());
        assert_eq!(
            Status::decode(&want).expect("valid"),
            Decoded::Complete(denied, want.len())
        );
    }

    #[test]
    fn every_status_code_round_trips() {
        for (i, code) in StatusCode::ALL.into_iter().enumerate() {
            assert_eq!(code as usize, i);
            assert_eq!(StatusCode::from_u64(i as u64), Some(code));
            let s = Status {
                code,
                reason: code.as_str().to_owned(),
            };
            let mut out = Vec::new();
            s.encode(&mut out);
            assert_eq!(out[1], i as u8);
            assert_eq!(
                Status::decode(&out).expect("valid"),
                Decoded::Complete(s, out.len())
            );
        }
        assert_eq!(StatusCode::from_u64(8), None);
        assert_eq!(StatusCode::from_u64(u64::MAX), None);
        let names: Vec<_> = StatusCode::ALL.iter().map(StatusCode::as_str).collect();
        assert_eq!(
            names,
            [
                "ok",
                "denied",
                "no_route",
                "connect_failed",
                "bad_header",
                "unsupported_version",
                "unavailable",
                "internal"
            ]
        );
    }

    #[test]
    fn status_encode_sanitizes_the_reason() {
        let s = Status {
            code: StatusCode::Internal,
            reason: format!("é\n{}", "x".repeat(300)),
        };
        let mut out = Vec::new();
        s.encode(&mut out);
        assert_eq!(out.len(), 3 + MAX_REASON);
        assert_eq!(s.encoded_len(), out.len());
        assert_eq!(&out[..6], &[1, 7, 255, b'?', b'?', b'?']);
        assert!(matches!(Status::decode(&out), Ok(Decoded::Complete(..))));
    }

    #[test]
    fn status_errors_are_named() {
        assert!(matches!(
            Status::decode(&[1, 8, 0]),
            Err(HeaderError::UnknownStatusCode { code: 8 })
        ));
        assert!(matches!(
            Status::decode(&[1, 1, 3, b'a', 0x7f, b'c']),
            Err(HeaderError::ReasonNotPrintable {
                byte: 0x7f,
                offset: 1
            })
        ));
        assert!(matches!(
            Status::decode(&[1, 1, 1, 0xc3]),
            Err(HeaderError::ReasonNotPrintable {
                byte: 0xc3,
                offset: 0
            })
        ));
    }

    #[test]
    fn status_partial_buffers_need_more_at_every_split_point() {
        let mut full = Vec::new();
        Status {
            code: StatusCode::NoRoute,
            reason: "no_pod".to_owned(),
        }
        .encode(&mut full);
        for k in 0..full.len() {
            let expected = if k < 3 { 3 - k } else { full.len() - k };
            assert_eq!(
                Status::decode(&full[..k]).expect("valid prefix"),
                Decoded::NeedMore(expected)
            );
        }
        full.extend_from_slice(b"payload");
        assert!(matches!(Status::decode(&full), Ok(Decoded::Complete(_, 9))));
    }

    /// Hands out one byte per read, to exercise every partial read.
    struct Trickle<'a>(&'a [u8]);

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some((&first, rest)) = self.0.split_first() {
                buf.put_slice(&[first]);
                self.0 = rest;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn read_header_and_status_leave_the_payload_unread() {
        let mut wire = Vec::new();
        write_header(&mut wire, &v4_header()).await.expect("write");
        write_status(&mut wire, &Status::new(StatusCode::Ok))
            .await
            .expect("write");
        wire.extend_from_slice(b"payload");

        let mut r = wire.as_slice();
        assert_eq!(read_header(&mut r).await.expect("header"), v4_header());
        assert_eq!(
            read_status(&mut r).await.expect("status"),
            Status::new(StatusCode::Ok)
        );
        assert_eq!(r, b"payload");

        let mut t = Trickle(&wire);
        assert_eq!(read_header(&mut t).await.expect("header"), v4_header());
        assert_eq!(
            read_status(&mut t).await.expect("status"),
            Status::new(StatusCode::Ok)
        );
        assert_eq!(t.0, b"payload");
    }

    #[tokio::test]
    async fn read_fails_with_io_on_eof_mid_message() {
        let full = v6_bytes();
        for k in 0..full.len() {
            let mut r = &full[..k];
            let e = read_header(&mut r).await.expect_err("truncated");
            assert!(
                matches!(e, HeaderError::Io(ref io) if io.kind() == std::io::ErrorKind::UnexpectedEof),
                "split {k}: {e:?}"
            );
        }
        let mut s = Vec::new();
        Status {
            code: StatusCode::Denied,
            reason: "x".to_owned(),
        }
        .encode(&mut s);
        for k in 0..s.len() {
            assert!(matches!(
                read_status(&mut &s[..k]).await,
                Err(HeaderError::Io(_))
            ));
        }
    }

    #[tokio::test]
    async fn read_rejects_before_reading_the_body() {
        // Version 2 and an oversized length are refused without waiting for a body.
        let mut r: &[u8] = &[2, 0, 5];
        assert!(matches!(
            read_header(&mut r).await,
            Err(HeaderError::UnsupportedVersion { version: 2 })
        ));
        assert_eq!(r, &[0, 5]);
        let mut r: &[u8] = &[1, 0x10, 0x00, 0xaa];
        assert!(matches!(
            read_header(&mut r).await,
            Err(HeaderError::BodyTooLong { len: 4096, .. })
        ));
        assert_eq!(r, &[0xaa]);
        let mut r: &[u8] = &[1, 9, 0];
        assert!(matches!(
            read_status(&mut r).await,
            Err(HeaderError::UnknownStatusCode { code: 9 })
        ));
    }

    /// Deterministic xorshift64*, so the smoke test is reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// The check the fuzz target makes, on one input.
    fn check_decoders(data: &[u8]) {
        if let Ok(Decoded::Complete(h, n)) = StreamHeader::decode(data) {
            assert!(n <= data.len());
            let again = encode(&h);
            assert_eq!(
                StreamHeader::decode(&again).expect("re-decode"),
                Decoded::Complete(h, again.len())
            );
        }
        if let Ok(Decoded::Complete(s, n)) = Status::decode(data) {
            let mut again = Vec::new();
            s.encode(&mut again);
            assert_eq!(again, &data[..n]);
        }
    }

    #[test]
    fn pseudo_random_inputs_never_panic_the_decoders() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let seeds = [v4_bytes(), v6_bytes(), vec![1, 1, 2, b'o', b'k']];
        let mut decoded = 0;
        for i in 0..6000 {
            let data: Vec<u8> = if i % 2 == 0 {
                // Mutations of valid messages reach deep into the body parser.
                let mut d = seeds[rng.below(seeds.len())].clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(d.len());
                    match rng.below(3) {
                        0 => d[at] = rng.next() as u8,
                        1 => d.truncate(at),
                        _ => d.insert(at, rng.next() as u8),
                    }
                    if d.is_empty() {
                        break;
                    }
                }
                d
            } else {
                let mut d: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                if let Some(first) = d.first_mut() {
                    *first = VERSION;
                }
                d
            };
            check_decoders(&data);
            decoded += usize::from(matches!(
                StreamHeader::decode(&data),
                Ok(Decoded::Complete(..))
            ));
        }
        assert!(
            decoded > 100,
            "only {decoded} inputs decoded: mutations too destructive"
        );
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
        ]
    }

    fn arb_header() -> impl Strategy<Value = StreamHeader> {
        (
            arb_addr(),
            arb_addr(),
            "[a-z0-9./é_-]{0,120}",
            any::<u16>(),
            proptest::option::of(any::<[u8; 16]>()),
        )
            .prop_map(|(dst, src, rest, flags, trace_id)| StreamHeader {
                dst,
                src,
                src_identity: format!("{IDENTITY_PREFIX}{rest}"),
                flags,
                trace_id,
            })
    }

    proptest! {
        #[test]
        fn header_round_trips(h in arb_header(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut b = encode(&h);
            prop_assert_eq!(b.len(), h.encoded_len());
            let n = b.len();
            b.extend_from_slice(&tail);
            prop_assert_eq!(StreamHeader::decode(&b).expect("valid"), Decoded::Complete(h, n));
        }

        #[test]
        fn status_round_trips(code in 0u8..8, reason in "[ -~]{0,255}") {
            let s = Status { code: StatusCode::from_u64(code.into()).expect("known"), reason };
            let mut b = Vec::new();
            s.encode(&mut b);
            prop_assert_eq!(Status::decode(&b).expect("valid"), Decoded::Complete(s, b.len()));
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            check_decoders(&data);
        }
    }
}
